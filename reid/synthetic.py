"""A generator of realistic, non-IID synthetic ReID federations in Market-1501 layout.

Real ReID data sets are not available offline, so the demo, the tests and the benchmarks use this.
What makes it a fair stand-in:

* each **identity** has a persistent appearance: upper/lower clothing colours and patterns (solid,
  stripes, checks), sleeve and trouser length, hair, skin, shoes, hat, bag, body proportions;
* each **camera** has its own style: background (wall/floor colours and texture), illumination gain,
  colour cast, blur, sensor noise, viewpoint mix (front/back, which moves the bag), scale/position
  jitter and partial occlusion, so that camera-invariant features matter;
* each **site** is its own domain: colour temperature, saturation, resolution, background palette;
* sites have disjoint identities and very unequal sizes (largest/smallest = `size_ratio`), with more
  cameras at larger sites, like the paper's nine data sets;
* each site has a query/gallery split with cross-camera matches, pid 0 distractors and pid -1 junk;
* a separate unlabeled **public** set (its own identities and domain) serves server-side KD.

Deterministic for a seed: every site draws from its own child of `numpy.random.SeedSequence(seed)`.
"""

from __future__ import annotations

import colorsys
import dataclasses
import json
import math
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageFilter
from pydantic import BaseModel, ConfigDict, Field

Progress = Callable[[int], None]


class SyntheticConfig(BaseModel):
    """Settings of a synthetic federation. The defaults make a small one (about 3,000 images)."""

    model_config = ConfigDict(extra="forbid")

    seed: int = 0
    sites: int = Field(6, ge=1, le=64)
    train_images_max: int = Field(
        1200,
        ge=8,
        description="training images of the largest site (to the nearest whole identity; every site has at "
        "least 2 identities, so at least 2 x images_per_id_max at the largest)",
    )
    size_ratio: float = Field(20.0, ge=1.0, description="largest / smallest site, in training images")
    images_per_id_max: int = Field(16, ge=2, description="training images per identity at the largest site")
    images_per_id_min: int = Field(4, ge=2, description="training images per identity at the smallest site")
    test_id_fraction: float = Field(0.5, gt=0.0, description="test identities per training identity")
    min_test_ids: int = Field(6, ge=2)
    distractor_fraction: float = Field(0.1, ge=0.0, description="pid 0 images, as a fraction of the gallery")
    junk_fraction: float = Field(0.03, ge=0.0, description="pid -1 images, as a fraction of the gallery")
    max_cameras: int = Field(6, ge=2, le=15)
    public_images: int = Field(400, ge=0, description="unlabeled images for server-side KD")
    height: int = Field(256, ge=32)
    width: int = Field(128, ge=16)
    jpeg_quality: int = Field(90, ge=30, le=100)
    domains: bool = Field(
        False,
        description="sites differ as real data sets do (a `SiteDomain` per site): crop size and aspect, crop "
        "tightness, occlusion, colour statistics, 2-6 cameras, images per identity",
    )
    min_queries: int = Field(
        0, ge=0, description="queries per site at least (50: one query <= 2 rank-1 points)"
    )


@dataclass(frozen=True)
class Identity:
    upper: np.ndarray
    upper_pattern: int  # 0 solid, 1 horizontal stripes, 2 vertical stripes, 3 checks
    pattern_colour: np.ndarray
    pattern_freq: float
    long_sleeves: bool
    lower: np.ndarray
    lower_kind: int  # 0 trousers, 1 shorts, 2 skirt
    shoes: np.ndarray
    skin: np.ndarray
    hair: np.ndarray
    long_hair: bool
    hat: np.ndarray | None
    bag: int  # 0 none, 1 backpack, 2 handbag
    bag_colour: np.ndarray
    bag_side: int
    height_scale: float
    width_scale: float


@dataclass(frozen=True)
class CameraStyle:
    wall: np.ndarray
    floor: np.ndarray
    horizon: float
    texture: np.ndarray  # (H, W, 3) smooth field
    gain: float
    cast: np.ndarray
    saturation: float
    blur: float
    noise: float
    back_view_prob: float
    occlusion_prob: float
    person_height: float
    low_res: bool


def _hsv(h: float, s: float, v: float) -> np.ndarray:
    return np.array(colorsys.hsv_to_rgb(h % 1.0, s, v), dtype=np.float32)


def _clothing_colour(rng: np.random.Generator) -> np.ndarray:
    if rng.random() < 0.25:  # black / grey / white garments are common
        return np.full(3, rng.uniform(0.08, 0.9), dtype=np.float32)
    return _hsv(rng.random(), rng.uniform(0.35, 1.0), rng.uniform(0.3, 0.95))


def random_identity(rng: np.random.Generator) -> Identity:
    skin_v = rng.uniform(0.35, 0.95)
    hair_choices = [
        (0.07, 0.6, 0.12),
        (0.08, 0.55, 0.35),
        (0.12, 0.5, 0.75),
        (0.0, 0.0, 0.6),
        (0.0, 0.0, 0.08),
    ]
    return Identity(
        upper=_clothing_colour(rng),
        upper_pattern=int(rng.choice(4, p=[0.5, 0.2, 0.15, 0.15])),
        pattern_colour=_clothing_colour(rng),
        pattern_freq=float(rng.uniform(6, 14)),
        long_sleeves=bool(rng.random() < 0.5),
        lower=_clothing_colour(rng)
        if rng.random() < 0.6
        else _hsv(0.6, rng.uniform(0.3, 0.7), rng.uniform(0.2, 0.5)),
        lower_kind=int(rng.choice(3, p=[0.65, 0.2, 0.15])),
        shoes=np.full(3, rng.uniform(0.05, 0.9), dtype=np.float32),
        skin=_hsv(0.07, rng.uniform(0.25, 0.55), skin_v),
        hair=_hsv(*hair_choices[int(rng.integers(len(hair_choices)))]),
        long_hair=bool(rng.random() < 0.35),
        hat=_clothing_colour(rng) if rng.random() < 0.15 else None,
        bag=int(rng.choice(3, p=[0.5, 0.25, 0.25])),
        bag_colour=_clothing_colour(rng),
        bag_side=int(rng.choice([-1, 1])),
        height_scale=float(rng.uniform(0.86, 1.0)),
        width_scale=float(rng.uniform(0.85, 1.2)),
    )


@dataclass(frozen=True)
class SiteStyle:
    temperature: np.ndarray
    saturation: float
    low_res_prob: float
    hue: float


@dataclass(frozen=True)
class SiteDomain:
    """How one site's data set differs from the others' (`SyntheticConfig.domains`), as real data sets
    do: its crops' size and aspect, how tightly they frame the person, how often people are occluded,
    its colour statistics, its number of cameras and its images per identity."""

    height: int
    width: int
    person_height: float  # the person's height as a fraction of the crop's (tightness)
    occlusion: float  # the largest per-camera occlusion probability
    warmth: float  # colour temperature shift
    saturation: float
    gain: float
    cameras: int
    images_per_id: int


def random_site_domain(rng: np.random.Generator, cfg: SyntheticConfig) -> SiteDomain:
    height = max(32, 2 * round(cfg.height * float(rng.uniform(0.5, 1.0)) / 2))
    return SiteDomain(
        height=height,
        width=max(16, 2 * round(height / float(rng.uniform(1.8, 3.0)) / 2)),
        person_height=float(rng.uniform(0.62, 0.95)),
        occlusion=float(rng.uniform(0.0, 0.5)),
        warmth=float(rng.uniform(-0.25, 0.25)),
        saturation=float(rng.uniform(0.45, 1.3)),
        gain=float(rng.uniform(0.6, 1.25)),
        cameras=int(rng.integers(2, 7)),
        images_per_id=int(rng.integers(cfg.images_per_id_min, cfg.images_per_id_max + 1)),
    )


def random_site_style(rng: np.random.Generator) -> SiteStyle:
    warm = rng.uniform(-0.12, 0.12)
    return SiteStyle(
        temperature=np.array([1 + warm, 1.0, 1 - warm], dtype=np.float32),
        saturation=float(rng.uniform(0.6, 1.15)),
        low_res_prob=float(rng.choice([0.0, 0.5, 1.0], p=[0.5, 0.3, 0.2])),
        hue=float(rng.random()),
    )


def _smooth_field(rng: np.random.Generator, height: int, width: int, amplitude: float) -> np.ndarray:
    small = rng.standard_normal((max(2, height // 24), max(2, width // 24), 3)).astype(np.float32)
    lo, hi = small.min(), small.max()
    img = Image.fromarray(((small - lo) / (hi - lo + 1e-6) * 255).astype(np.uint8))
    field = np.asarray(img.resize((width, height), Image.BILINEAR), dtype=np.float32) / 255.0
    return (field - 0.5) * 2 * amplitude


def random_camera(
    rng: np.random.Generator, site: SiteStyle, renderer: Renderer, domain: SiteDomain | None = None
) -> CameraStyle:
    height, width = renderer.height, renderer.width
    cam = CameraStyle(
        wall=_hsv(site.hue + rng.normal(0, 0.08), rng.uniform(0.05, 0.45), rng.uniform(0.35, 0.85)),
        floor=_hsv(site.hue + 0.5 + rng.normal(0, 0.1), rng.uniform(0.0, 0.35), rng.uniform(0.2, 0.6)),
        horizon=float(rng.uniform(0.55, 0.8)),
        texture=_smooth_field(rng, height, width, float(rng.uniform(0.03, 0.15))),
        gain=float(rng.uniform(0.65, 1.25)),
        cast=(site.temperature * rng.uniform(0.88, 1.12, size=3)).astype(np.float32),
        saturation=float(site.saturation * rng.uniform(0.8, 1.15)),
        blur=float(rng.uniform(0.0, 1.3)),
        noise=float(rng.uniform(0.01, 0.06)),
        back_view_prob=float(rng.uniform(0.1, 0.9)),
        occlusion_prob=float(rng.uniform(0.0, 0.3)),
        person_height=float(rng.uniform(0.78, 0.94)),
        low_res=bool(rng.random() < site.low_res_prob),
    )
    if domain is None:
        return cam
    warm = domain.warmth + rng.normal(0, 0.03)
    cast = np.array([1 + warm, 1.0, 1 - warm]) * rng.uniform(0.92, 1.08, size=3)
    return dataclasses.replace(
        cam,
        person_height=float(np.clip(domain.person_height + rng.normal(0, 0.03), 0.5, 0.98)),
        occlusion_prob=float(rng.uniform(0.0, domain.occlusion)),
        cast=cast.astype(np.float32),
        saturation=float(domain.saturation * rng.uniform(0.85, 1.15)),
        gain=float(domain.gain * rng.uniform(0.85, 1.15)),
    )


class Renderer:
    """Draws one person crop at a time on precomputed coordinate grids."""

    def __init__(self, height: int, width: int) -> None:
        # Draw at half resolution and upscale at the end: 4x less work, and real crops are upscaled
        # detections anyway.
        self.out_size = (width, height)
        self.height, self.width = (height // 2, width // 2) if height >= 128 else (height, width)
        self.yy, self.xx = np.mgrid[0 : self.height, 0 : self.width].astype(np.float32)
        self.vertical = (self.yy / self.height)[..., None]

    def background(self, cam: CameraStyle, rng: np.random.Generator) -> np.ndarray:
        shift = int(rng.integers(self.width))
        texture = np.roll(cam.texture, shift, axis=1)
        floor = self.vertical > cam.horizon + rng.normal(0, 0.02)
        return np.where(floor, cam.floor, cam.wall) + texture

    def draw_person(
        self,
        img: np.ndarray,
        person: Identity,
        cam: CameraStyle,
        rng: np.random.Generator,
        shift_y: float = 0.0,
    ) -> None:
        h = self.height * cam.person_height * person.height_scale * rng.uniform(0.93, 1.05)
        top = (self.height - h) / 2 + rng.normal(0, 0.03) * self.height + shift_y * self.height
        cx = self.width / 2 + rng.normal(0, 0.06) * self.width
        v = (self.yy - top) / h
        u = (self.xx - cx) / h
        ws = person.width_scale
        au = np.abs(u)
        back = rng.random() < cam.back_view_prob
        spread = rng.uniform(0.5, 1.6)

        person_mask = np.zeros(v.shape, dtype=bool)

        def paint(mask: np.ndarray, colour: np.ndarray) -> None:
            img[mask] = colour
            person_mask[mask] = True

        legs = (v > 0.5) & (v < 0.95) & (np.abs(au - ws * 0.045 * spread) < ws * 0.04)
        paint(legs, person.lower)
        if person.lower_kind == 1:
            paint(legs & (v > 0.66), person.skin)
        elif person.lower_kind == 2:
            paint(legs & (v > 0.72), person.skin)
            paint((v > 0.48) & (v < 0.72) & (au < ws * (0.09 + 0.08 * (v - 0.48))), person.lower)
        paint((v > 0.93) & (v < 0.985) & (np.abs(au - ws * 0.045 * spread) < ws * 0.05), person.shoes)

        torso = (v > 0.14) & (v < 0.51) & (au < ws * (0.11 - 0.05 * (v - 0.14)))
        if person.upper_pattern == 0:
            paint(torso, person.upper)
        else:
            phase_v = np.sin(2 * math.pi * v * person.pattern_freq) > 0
            phase_u = np.sin(2 * math.pi * u * person.pattern_freq * 1.5) > 0
            stripe = {1: phase_v, 2: phase_u, 3: phase_v ^ phase_u}[person.upper_pattern]
            paint(torso & stripe, person.pattern_colour)
            paint(torso & ~stripe, person.upper)
        arms = (v > 0.15) & (v < 0.47) & (au >= ws * 0.105) & (au < ws * 0.145)
        paint(arms, person.upper if person.long_sleeves else person.skin)
        if not person.long_sleeves:
            paint(arms & (v < 0.26), person.upper)
        paint((v >= 0.47) & (v < 0.51) & (au >= ws * 0.105) & (au < ws * 0.14), person.skin)
        paint((v > 0.12) & (v < 0.15) & (au < 0.022), person.skin)

        head = (u / (0.055 * ws)) ** 2 + ((v - 0.07) / 0.07) ** 2 < 1
        paint(head, person.hair if back else person.skin)
        paint(head & (v < (0.045 if person.long_hair else 0.03)), person.hair)
        if person.long_hair and back:
            paint((v > 0.1) & (v < 0.24) & (au < ws * 0.07), person.hair)
        if person.hat is not None:
            paint(head & (v < 0.035), person.hat)
            paint((v > 0.025) & (v < 0.045) & (au < 0.075 * ws), person.hat)

        side = person.bag_side * (-1 if back else 1)
        if person.bag == 1:
            if back:
                paint((v > 0.17) & (v < 0.42) & (au < ws * 0.08), person.bag_colour)
            else:
                paint((v > 0.14) & (v < 0.33) & (np.abs(au - ws * 0.06) < ws * 0.012), person.bag_colour)
        elif person.bag == 2:
            su = u * side
            paint((v > 0.38) & (v < 0.52) & (su > ws * 0.13) & (su < ws * 0.21), person.bag_colour)

        shade = np.clip(1.0 - 2.5 * u[person_mask] ** 2, 0.75, 1.0)
        img[person_mask] *= shade[:, None]

    def occlude(self, img: np.ndarray, rng: np.random.Generator) -> None:
        colour = _hsv(rng.random(), rng.uniform(0, 0.6), rng.uniform(0.1, 0.9))
        if rng.random() < 0.5:  # from below (a car, a railing)
            y0 = int(self.height * rng.uniform(0.6, 0.85))
            img[y0:] = colour
        else:  # from a side (another pedestrian, a pole)
            w = int(self.width * rng.uniform(0.2, 0.4))
            if rng.random() < 0.5:
                img[:, :w] = colour
            else:
                img[:, -w:] = colour

    def finish(self, img: np.ndarray, cam: CameraStyle, rng: np.random.Generator) -> Image.Image:
        img *= cam.gain * rng.uniform(0.9, 1.1) * cam.cast
        grey = img.mean(axis=2, keepdims=True)
        img = grey + cam.saturation * (img - grey)
        img += rng.standard_normal(img.shape, dtype=np.float32) * cam.noise
        out = Image.fromarray((np.clip(img, 0.0, 1.0) * 255).astype(np.uint8))
        if cam.blur > 0.05:
            out = out.filter(ImageFilter.GaussianBlur(cam.blur * self.height / 256))
        if cam.low_res:
            out = out.resize((self.width // 3, self.height // 3), Image.BILINEAR)
        return out.resize(self.out_size, Image.BILINEAR)

    def render(
        self, person: Identity | None, cam: CameraStyle, rng: np.random.Generator, junk: bool = False
    ) -> Image.Image:
        img = self.background(cam, rng)
        if person is not None:
            self.draw_person(img, person, cam, rng, shift_y=rng.choice([-0.55, 0.6]) if junk else 0.0)
        if rng.random() < cam.occlusion_prob:
            self.occlude(img, rng)
        return self.finish(img, cam, rng)


@dataclass
class SiteSummary:
    name: str
    cameras: int
    train_ids: int
    train_images: int
    test_ids: int
    query_images: int
    gallery_images: int
    pid_range: tuple[int, int]
    domain: dict | None = None  # the site's `SiteDomain` when `domains` is on


def site_plan(cfg: SyntheticConfig) -> list[tuple[int, int, int]]:
    """(train identities, images per identity, cameras) per site, largest first, geometric sizes."""
    plan = []
    for k in range(cfg.sites):
        t = k / (cfg.sites - 1) if cfg.sites > 1 else 0.0
        images = cfg.train_images_max * cfg.size_ratio ** (-t)
        per_id = round(cfg.images_per_id_max * (cfg.images_per_id_min / cfg.images_per_id_max) ** t)
        ids = max(2, round(images / per_id))
        cams = max(2, round(cfg.max_cameras - (cfg.max_cameras - 2) * t))
        plan.append((ids, per_id, cams))
    return plan


class _SiteWriter:
    def __init__(self, root: Path, renderer: Renderer, quality: int) -> None:
        self.root, self.renderer, self.quality = root, renderer, quality
        self.frame = 0
        self.written = 0

    def save(self, folder: str, pid: int, cam_index: int, image: Image.Image) -> None:
        self.frame += 1
        name = (
            f"{pid:04d}_c{cam_index + 1}s1_{self.frame:06d}_00.jpg"
            if pid >= 0
            else (f"-1_c{cam_index + 1}s1_{self.frame:06d}_00.jpg")
        )
        image.save(self.root / folder / name, quality=self.quality)
        self.written += 1


def _write_site(
    cfg: SyntheticConfig,
    name: str,
    out: Path,
    rng: np.random.Generator,
    plan: tuple[int, int, int],
    first_pid: int,
    progress: Progress | None,
) -> SiteSummary:
    ids, per_id, n_cams = plan
    domain = random_site_domain(rng, cfg) if cfg.domains else None
    if domain is not None:  # the planned training images, its own cameras and images per identity
        images = ids * per_id
        per_id = max(2, min(domain.images_per_id, images // 4))  # (four identities at least)
        ids, n_cams = max(2, round(images / per_id)), domain.cameras
        domain = dataclasses.replace(domain, images_per_id=per_id)
    renderer = Renderer(domain.height, domain.width) if domain else Renderer(cfg.height, cfg.width)
    style = random_site_style(rng)
    cams = [random_camera(rng, style, renderer, domain) for _ in range(n_cams)]
    root = out / "sites" / name
    for folder in ("bounding_box_train", "query", "bounding_box_test"):
        (root / folder).mkdir(parents=True, exist_ok=True)
    writer = _SiteWriter(root, renderer, cfg.jpeg_quality)

    def emit(folder: str, pid: int, person: Identity | None, cam: int, junk: bool = False) -> None:
        writer.save(folder, pid, cam, renderer.render(person, cams[cam], rng, junk=junk))
        if progress is not None:
            progress(1)

    pid = first_pid
    for _ in range(ids):
        person = random_identity(rng)
        for i in range(per_id):
            emit("bounding_box_train", pid, person, (i + int(rng.integers(n_cams))) % n_cams)
        pid += 1
    train_images = writer.written

    queries_per_id = min(2, n_cams - 1)
    test_ids = max(cfg.min_test_ids, round(ids * cfg.test_id_fraction), -(-cfg.min_queries // queries_per_id))
    gallery_per_id = max(2, per_id)
    n_query = 0
    for _ in range(test_ids):
        person = random_identity(rng)
        query_cams = rng.choice(n_cams, size=min(2, n_cams - 1), replace=False)
        for cam in query_cams:
            emit("query", pid, person, int(cam))
            n_query += 1
        other = [c for c in range(n_cams) if c not in set(query_cams.tolist())]
        for i in range(gallery_per_id):  # cycle through the non-query cameras first: a cross-camera match
            cam = other[i] if i < len(other) else int(rng.integers(n_cams))
            emit("bounding_box_test", pid, person, cam)
        pid += 1
    gallery_core = test_ids * gallery_per_id
    for _ in range(round(gallery_core * cfg.distractor_fraction)):
        emit("bounding_box_test", 0, random_identity(rng), int(rng.integers(n_cams)))
    for _ in range(round(gallery_core * cfg.junk_fraction)):
        emit("bounding_box_test", -1, random_identity(rng), int(rng.integers(n_cams)), junk=True)
    gallery_images = writer.written - train_images - n_query
    return SiteSummary(
        name,
        n_cams,
        ids,
        train_images,
        test_ids,
        n_query,
        gallery_images,
        (first_pid, pid - 1),
        domain.__dict__ if domain else None,
    )


def _write_public(
    cfg: SyntheticConfig, out: Path, rng: np.random.Generator, progress: Progress | None
) -> None:
    folder = out / "public"
    folder.mkdir(parents=True, exist_ok=True)
    renderer = Renderer(cfg.height, cfg.width)
    style = random_site_style(rng)
    cams = [random_camera(rng, style, renderer) for _ in range(4)]
    people = [random_identity(rng) for _ in range(max(1, cfg.public_images // 4))]
    for i in range(cfg.public_images):
        img = renderer.render(people[i % len(people)], cams[int(rng.integers(len(cams)))], rng)
        img.save(folder / f"public_{i:06d}.jpg", quality=cfg.jpeg_quality)
        if progress is not None:
            progress(1)


def total_images(cfg: SyntheticConfig) -> int:
    """Upper estimate of the number of images `generate_federation` writes (for progress bars)."""
    total = cfg.public_images
    for ids, per_id, _ in site_plan(cfg):
        test_ids = max(cfg.min_test_ids, round(ids * cfg.test_id_fraction), cfg.min_queries)
        gallery = test_ids * max(2, per_id)
        total += ids * per_id + 2 * test_ids + gallery
        total += round(gallery * cfg.distractor_fraction) + round(gallery * cfg.junk_fraction)
    return total


def generate_federation(
    cfg: SyntheticConfig, out: str | Path, progress: Progress | None = None
) -> list[SiteSummary]:
    """Write the federation to `out/sites/<site>/` (Market-1501 layout) and `out/public/`.

    Also writes `out/federation.json` with the settings and per-site counts. Refuses a non-empty `out`.
    """
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"output folder is not empty: {out}")
    out.mkdir(parents=True, exist_ok=True)
    seeds = np.random.SeedSequence(cfg.seed).spawn(cfg.sites + 1)
    summaries = []
    first_pid = 1
    for k, plan in enumerate(site_plan(cfg)):
        summary = _write_site(
            cfg, f"site{k:02d}", out, np.random.default_rng(seeds[k]), plan, first_pid, progress
        )
        summaries.append(summary)
        first_pid = summary.pid_range[1] + 1
    if cfg.public_images:
        _write_public(cfg, out, np.random.default_rng(seeds[-1]), progress)
    manifest = {"config": cfg.model_dump(), "sites": [s.__dict__ for s in summaries]}
    (out / "federation.json").write_text(json.dumps(manifest, indent=2))
    return summaries


def cached_federation(cfg: SyntheticConfig, out: Path, progress: Progress | None = None) -> Path:
    """`out`, holding the federation of `cfg`: generated unless a complete one is there. federation.json
    is written last, so a generation stopped halfway is discarded and started again; one of other
    settings is refused (a cache, not a place to overwrite)."""
    manifest = out / "federation.json"
    if manifest.is_file():
        if json.loads(manifest.read_text()).get("config") != json.loads(json.dumps(cfg.model_dump())):
            raise FileExistsError(f"{out} holds a synthetic federation of other settings: use another folder")
        return out
    shutil.rmtree(out, ignore_errors=True)
    generate_federation(cfg, out, progress)
    return out

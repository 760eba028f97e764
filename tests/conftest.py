"""Shared fixtures: a tiny synthetic federation (64x32 images) and a real mosquitto broker."""

from __future__ import annotations

import io
import os
import struct
import zlib
from collections.abc import Iterator
from pathlib import Path

import pytest
from PIL import Image

from protocol.broker import LocalBroker, find_mosquitto
from reid.synthetic import SyntheticConfig, generate_federation

TINY = SyntheticConfig(
    seed=7,
    sites=3,
    train_images_max=240,
    size_ratio=4,
    images_per_id_max=8,
    images_per_id_min=4,
    public_images=16,
    height=64,
    width=32,
)


@pytest.fixture(scope="session")
def tiny_federation(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("federation")
    generate_federation(TINY, root)
    return root


@pytest.fixture(autouse=True)
def _unreadable_images_named_afresh(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each test starts with no unreadable image named yet (a process names only the first 20)."""
    from reid.data import images

    monkeypatch.setattr(images, "_warned", set())


def png_claiming(width: int, height: int) -> bytes:
    """A 1x1 PNG whose header claims `width` x `height` pixels (a decompression bomb's header)."""
    out = io.BytesIO()
    Image.new("L", (1, 1)).save(out, format="PNG")
    data = bytearray(out.getvalue())
    data[16:24] = struct.pack(">II", width, height)  # the IHDR chunk's width and height
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))  # and its checksum
    return bytes(data)


def missing(message: str) -> None:
    """A system part a test needs is not installed: skipped locally, a failure in CI (`make setup` installs
    every part, so CI must never pass by skipping)."""
    if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
        pytest.fail(message)
    pytest.skip(message)


@pytest.fixture(scope="session")
def mosquitto_url() -> Iterator[str]:
    """A real mosquitto on a free loopback port."""
    if find_mosquitto() is None:
        missing("mosquitto is not installed (apt-get install mosquitto; `make setup` does it as root)")
    with LocalBroker() as broker:
        yield broker.url


@pytest.fixture(scope="session")
def exported(tiny_federation, tmp_path_factory):
    """(model, model.onnx, contract, parity, image paths): a tiny ResNet-18 at 64x32, exported."""
    import torch

    from export.onnx_export import export_onnx
    from reid.data import ImageDataset, InputSpec, eval_transform, read_dataset
    from reid.model import ModelSpec, build_model

    spec = InputSpec(height=64, width=32)
    torch.manual_seed(0)
    model = build_model(ModelSpec(arch="resnet18"), 5)
    paths = [r.path for r in read_dataset(tiny_federation / "sites" / "site01").gallery][:24]
    images = torch.stack([ImageDataset(paths, eval_transform(spec))[i][0] for i in range(len(paths))])
    model.train()
    with torch.no_grad():  # realistic BatchNorm statistics instead of the init values
        model(images)
    model.eval()
    out = tmp_path_factory.mktemp("export") / "model.onnx"
    contract, parity = export_onnx(model, spec, out, images, version="round-3")
    return model, out, contract, parity, paths

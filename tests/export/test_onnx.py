"""ONNX export with the parity gate and the contract; FeatureExtractor matches PyTorch and enforces it."""

from __future__ import annotations

import json
import threading

import numpy as np
import pytest
import torch

from export.contract import contract_path
from export.onnx_export import export_onnx
from export.runtime import ContractError, FeatureExtractor
from export.tensorrt import TensorRTError
from reid.data import ImageDataset, InputSpec, eval_transform, make_loader
from reid.evaluate import extract_features
from reid.model import ModelSpec, build_model

SPEC = InputSpec(height=64, width=32)


def test_export_passes_the_gate_and_writes_the_contract(exported):
    _model, out, contract, parity, _ = exported
    assert parity.min_cosine >= 0.9999 and parity.max_abs_diff < 1e-3
    sidecar = json.loads(contract_path(out).read_text())
    assert sidecar["height"] == 64 and sidecar["width"] == 32 and sidecar["output_dim"] == 512
    assert sidecar["normalization_in_graph"] is False and sidecar["l2_normalized"] is True
    assert sidecar["version"] == "round-3" and sidecar["model"]["arch"] == "resnet18"
    assert contract.opset in (17, 18)


def test_feature_extractor_matches_pytorch_with_dynamic_batch(exported):
    model, out, _, _, paths = exported
    fx = FeatureExtractor(out, batch_size=5)
    assert fx.providers[-1] == "CPUExecutionProvider"
    loader = make_loader(ImageDataset(paths, eval_transform(SPEC)), 8, train=False)
    ref, _ = extract_features(model, loader, flip=False)
    got = fx(paths)
    assert got.shape == (len(paths), 512)
    assert np.sum(ref.numpy() * got, axis=1).min() >= 0.9999
    # flip: the sum of the normalised features of the image and its mirror (the graph outputs normalised ones)
    x = torch.cat([b.images for b in loader])
    with torch.no_grad():
        norm = torch.nn.functional.normalize
        flipped = norm(norm(model.embed(x), dim=1) + norm(model.embed(torch.flip(x, dims=[3])), dim=1), dim=1)
    assert np.sum(flipped.numpy() * fx(paths, flip=True), axis=1).min() >= 0.9999
    assert fx(paths[:1]).shape == (1, 512)
    np.testing.assert_allclose(np.linalg.norm(fx(paths[:7]), axis=1), 1.0, atol=1e-5)
    # threads that sleep between runs (a service with two models) compute the same features
    calm = FeatureExtractor(out, batch_size=5, spin=False)
    spinning = "session.intra_op.allow_spinning"
    assert calm.backend.session.get_session_options().get_session_config_entry(spinning) == "0"
    np.testing.assert_array_equal(calm(paths), got)


def test_contract_is_enforced(exported, tmp_path):
    _, out, _, _, _ = exported
    copy = tmp_path / "model.onnx"
    copy.write_bytes(out.read_bytes())
    with pytest.raises(ContractError, match="no contract"):
        FeatureExtractor(copy)
    contract_path(copy).write_text(contract_path(out).read_text())
    FeatureExtractor(copy)  # an exact copy with its contract is fine
    data = bytearray(copy.read_bytes())
    data[-10] ^= 0xFF
    copy.write_bytes(bytes(data))
    with pytest.raises(ContractError, match="sha256"):
        FeatureExtractor(copy)
    with pytest.raises(TensorRTError, match="TensorRT engines need"):
        FeatureExtractor(tmp_path / "model.engine")


def test_cloud_aggregator_export_from_a_run(tiny_federation, tmp_path):
    from typer.testing import CliRunner

    from cloud.cli import app
    from cloud.config import ServeConfig
    from cloud.journal import Journal
    from reid.model import shared_state

    cfg = ServeConfig(federation="fx", state_dir=tmp_path, model=ModelSpec(arch="resnet18"), input=SPEC)
    journal = Journal(tmp_path / "fx")
    journal.check_identity(cfg.identity())
    torch.manual_seed(1)
    journal.save_global(-1, shared_state(build_model(cfg.model, 1)), cfg.model, cfg.input, cfg.strategy.bn)
    images = tiny_federation / "sites" / "site00" / "query"
    args = ["export", "--state-dir", str(tmp_path), "--federation", "fx", "--images", str(images)]
    result = CliRunner().invoke(app, [*args, "--out", str(tmp_path / "m.onnx")])
    assert result.exit_code == 0, result.output
    assert "min cosine" in result.output and "fx/round--1" in result.output
    assert FeatureExtractor(tmp_path / "m.onnx")(sorted(images.glob("*.jpg"))[:3]).shape == (3, 512)
    half = CliRunner().invoke(app, [*args, "--fp16", "--out", str(tmp_path / "h.onnx")])
    assert half.exit_code == 0, half.output
    assert json.loads(contract_path(tmp_path / "h.onnx").read_text())["precision"] == "fp16"
    assert (tmp_path / "h.onnx").stat().st_size < 0.6 * (tmp_path / "m.onnx").stat().st_size
    crops = sorted(images.glob("*.jpg"))[:6]
    full, fp16 = FeatureExtractor(tmp_path / "m.onnx")(crops), FeatureExtractor(tmp_path / "h.onnx")(crops)
    assert np.sum(full * fp16, axis=1).min() >= 0.999
    missing = CliRunner().invoke(app, [*args, "--round", "7", "--out", str(tmp_path / "x.onnx")])
    assert missing.exit_code != 0 and "no global model for round 7" in missing.output


def test_edge_agent_extract_and_search(exported, tiny_federation, tmp_path):
    import shutil

    from typer.testing import CliRunner

    from edge.cli import app
    from export.gallery import Gallery

    _, out, contract, _, _ = exported
    site = tiny_federation / "sites" / "site01"
    runner = CliRunner()
    npz = tmp_path / "gallery.npz"
    result = runner.invoke(
        app, ["extract", "--model", str(out), "--images", str(site / "bounding_box_test"), "--out", str(npz)]
    )
    assert result.exit_code == 0, result.output
    gallery = Gallery.load(npz)
    files = sorted((site / "bounding_box_test").glob("*.jpg"))
    assert gallery.names == [f.name for f in files] and gallery.features.shape == (len(files), 512)
    assert gallery.version == "round-3" and gallery.model_sha256 == contract.sha256
    query = files[5]  # a gallery image as its own query: it must rank first
    result = runner.invoke(
        app, ["search", "--model", str(out), "--gallery", str(npz), "--query", str(query), "--top-k", "3"]
    )
    assert result.exit_code == 0, result.output
    first = next(line for line in result.output.splitlines() if "│ 1 " in line or "│    1 " in line)
    assert query.name in first and "1.0000" in first
    queries = tmp_path / "queries"  # one unreadable crop among the queries: skipped, the others searched
    queries.mkdir()
    shutil.copy(query, queries / query.name)
    (queries / "0001_c1s1_000000_00.jpg").write_bytes(b"\xff\xd8 not a jpeg")
    result = runner.invoke(
        app, ["search", "--model", str(out), "--gallery", str(npz), "--query", str(queries)]
    )
    assert result.exit_code == 0, result.output
    assert f"query {query.name}" in result.output and "query 0001_c1s1" not in result.output
    result = runner.invoke(
        app,
        [
            "search",
            "--model",
            str(out),
            "--gallery",
            str(npz),
            "--query",
            str(queries / "0001_c1s1_000000_00.jpg"),
        ],
    )
    assert result.exit_code == 2 and "no readable image" in result.output
    bad = runner.invoke(app, ["extract", "--model", str(tmp_path / "nope.onnx"), "--images", str(site)])
    assert bad.exit_code != 0 and "Invalid value for --model" in bad.output


def test_search_renders_refuses_other_models_and_reindexes(exported, tiny_federation, tmp_path):
    import shutil

    from PIL import Image
    from typer.testing import CliRunner

    from edge.cli import app
    from export.gallery import Gallery

    _, out, _, _, paths = exported
    folder = tmp_path / "gallery"
    shutil.copytree(tiny_federation / "sites" / "site01" / "bounding_box_test", folder)
    (folder / "corrupt.jpg").write_bytes(b"\xff\xd8 not a jpeg")
    runner = CliRunner()
    npz = tmp_path / "g.npz"
    result = runner.invoke(app, ["extract", "--model", str(out), "--images", str(folder), "--out", str(npz)])
    assert result.exit_code == 0, result.output
    gallery = Gallery.load(npz)
    assert "corrupt.jpg" not in gallery.names and len(gallery.names) == len(list(folder.glob("*.jpg"))) - 1
    query = folder / gallery.names[2]
    png, html = tmp_path / "r.png", tmp_path / "r.html"
    args = ["search", "--model", str(out), "--gallery", str(npz), "--query", str(query), "--top-k", "4"]
    result = runner.invoke(app, [*args, "--png", str(png), "--html", str(html)])
    assert result.exit_code == 0, result.output
    with Image.open(png) as sheet:  # one row: the query + 4 matches, 64x128 cells, a 12 px gap
        assert sheet.size == (5 * 64 + 12, 128 + 14)
    page = html.read_text()
    assert page.count("<img") == 5 and f"<b>{query.name}</b>" in page and "1.0000" in page

    # another model (other weights): the .npz is refused, then --reindex re-extracts and rewrites it
    torch.manual_seed(5)
    other = build_model(ModelSpec(arch="resnet18"), 5).eval()
    images = torch.stack([ImageDataset(paths, eval_transform(SPEC))[i][0] for i in range(8)])
    other_path = tmp_path / "other.onnx"
    export_onnx(other, SPEC, other_path, images, version="round-9")
    again = ["search", "--model", str(other_path), "--gallery", str(npz), "--query", str(query)]
    refused = runner.invoke(app, again)
    assert refused.exit_code != 0 and "extracted with model round-3" in refused.output
    assert "--reindex" in refused.output and "One version, two files" not in refused.output
    # the same version label on another file (two exports of one round): the message says why
    export_onnx(other, SPEC, tmp_path / "same-label.onnx", images, version="round-3")
    same = runner.invoke(
        app, ["search", "--model", str(tmp_path / "same-label.onnx"), *again[3:]], env={"COLUMNS": "300"}
    )
    words = " ".join(same.output.replace("│", " ").split())  # (rich wraps the message in a box)
    assert same.exit_code != 0 and "One version, two files" in words, same.output
    redone = runner.invoke(app, [*again, "--reindex"])
    assert redone.exit_code == 0, redone.output
    assert "re-indexed" in redone.output and Gallery.load(npz).version == "round-9"
    (tmp_path / "broken.npz").write_bytes(b"PK\x03\x04 truncated")
    broken_args = [*again[:3], "--gallery", str(tmp_path / "broken.npz"), "--query", str(query)]
    broken = runner.invoke(app, broken_args, env={"COLUMNS": "300"})
    assert broken.exit_code != 0 and "not a features file" in broken.output, broken.output


@pytest.mark.filterwarnings("ignore:invalid value encountered in sqrt:RuntimeWarning")  # (the point)
def test_a_model_whose_features_are_nan_fails_the_parity_gate(exported, tmp_path):
    """Negative BatchNorm variances (what a hostile update could once set in the global copy) make every
    feature NaN in both runtimes; a NaN cosine must fail the gate, not pass it (NaN < x is false)."""
    from export.onnx_export import ExportError

    model, _out, _contract, _parity, paths = exported
    broken = build_model(ModelSpec(arch="resnet18"), 5)
    broken.load_state_dict(model.state_dict())
    for name, buffer in broken.named_buffers():
        if name.endswith("running_var"):
            buffer.fill_(-1.0)
    images = torch.stack([ImageDataset(paths[:4], eval_transform(SPEC))[i][0] for i in range(4)])
    with pytest.raises(ExportError, match="parity gate failed: min cosine nan"):
        export_onnx(broken, SPEC, tmp_path / "broken.onnx", images)
    assert not (tmp_path / "broken.onnx").exists()


def test_an_export_beside_a_training_thread_breaks_neither(exported, tiny_federation, tmp_path):
    """A site installs a deployment (an export) while it trains a round in another thread: torch.export's
    process-wide tracing state met autograd's backward there (KeyError: 'custom'), failing the round or
    the export. Both complete, and the export is still the dynamo one (opset 18)."""
    from reid.site import SiteData
    from reid.train import TrainConfig, train_local

    model, _, _, _, paths = exported
    site = SiteData(tiny_federation / "sites" / "site01", SPEC, batch_size=8, seed=0)
    student = build_model(ModelSpec(arch="resnet18"), site.num_classes)
    errors: list[BaseException] = []
    stop = threading.Event()

    def train() -> None:
        try:
            while not stop.is_set():
                train_local(student, site.train_loader(), TrainConfig(epochs=1, seed=0))
        except BaseException as err:
            errors.append(err)

    trainer = threading.Thread(target=train, daemon=True)
    trainer.start()
    images = torch.stack([ImageDataset(paths, eval_transform(SPEC))[i][0] for i in range(8)])
    try:
        for i in range(3):
            contract, _ = export_onnx(model, SPEC, tmp_path / f"m{i}.onnx", images, keep_batchnorm=True)
            assert contract.opset == 18
    finally:
        stop.set()
        trainer.join(timeout=120)
    assert not errors, errors


def test_what_a_user_gets_wrong_is_one_line_not_a_traceback(exported, tiny_federation, tmp_path):
    """2026-12-04 new-user audit: a damaged .onnx whose sidecar names its hash, an empty .npz ("Aborted."),
    a gallery folder without crops, an --out folder that does not exist (found after the work) and a
    site whose query crops are all unreadable each ended in a traceback."""
    import shutil

    from typer.testing import CliRunner

    from edge.cli import app
    from export.contract import file_sha256

    _, out, _, _, _ = exported
    site = tiny_federation / "sites" / "site01"
    damaged = tmp_path / "damaged.onnx"
    damaged.write_bytes(out.read_bytes()[: out.stat().st_size // 3])
    sidecar = json.loads(contract_path(out).read_text())
    contract_path(damaged).write_text(json.dumps({**sidecar, "sha256": file_sha256(damaged)}))
    (tmp_path / "empty.npz").write_bytes(b"")
    (tmp_path / "no-crops").mkdir()
    unreadable = tmp_path / "site"
    shutil.copytree(site, unreadable)
    for crop in (unreadable / "query").iterdir():
        crop.write_bytes(b"")
    crops = str(site / "query")
    cases = [
        (["extract", "--model", str(damaged), "--images", crops], "ONNX Runtime cannot load it"),
        (["search", "--model", str(out), "--gallery", str(tmp_path / "empty.npz"), "--query", crops],
         "not a features file"),
        (["search", "--model", str(out), "--gallery", str(tmp_path / "no-crops"), "--query", crops],
         "Invalid value for --gallery: no images in"),
        (["extract", "--model", str(out), "--images", crops, "--out", str(tmp_path / "missing" / "f.npz")],
         "is not a folder"),
        (["evaluate", "--model", str(out), "--data", crops], "is an exported model"),
        (["serve-features", "--model", str(out), "--retention-days", "0"], "leave it out to keep them all"),
        (["serve-features", "--model", str(out), "--gallery", str(tmp_path / "typo" / "g.db")],
         "is not a folder"),
        (["evaluate", "--arch", "resnet18", "--height", "64", "--width", "32", "--data", str(unreadable)],
         "query images can be read"),
    ]  # fmt: skip
    for command, says in cases:
        result = CliRunner().invoke(app, command)
        said = " ".join(result.output.replace("│", " ").split())
        assert result.exit_code != 0 and says in said and "Traceback" not in said, (command, result.output)
    assert not (tmp_path / "typo").exists()
    # a port taken: one line, and no gallery file made by the start that failed
    import socket

    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = str(taken.getsockname()[1])
        command = ["serve-features", "--model", str(out), "--gallery", str(tmp_path / "g.db"), "--port", port]
        result = CliRunner().invoke(app, command)
    assert result.exit_code != 0 and "cannot listen on 127.0.0.1" in result.output
    assert not (tmp_path / "g.db").exists()


def test_a_full_disk_is_one_error_not_a_second_export(tmp_path, monkeypatch):
    """The dynamo export failing on a full disk fell back to the TorchScript exporter, which failed the
    same way (two lines, twice the time; 2026-12-05 chaos audit F7): a full disk is an OSError at once."""
    import errno

    import export.onnx_export as onnx_export

    calls: list[bool] = []

    def export(*args, dynamo: bool, **kwargs) -> None:
        calls.append(dynamo)
        try:
            raise OSError(errno.ENOSPC, "No space left on device")
        except OSError as err:
            raise RuntimeError("serialising the model failed") from err  # (as the exporter wraps it)

    monkeypatch.setattr(onnx_export.torch.onnx, "export", export)
    net = onnx_export.FeatureNet(build_model(ModelSpec(arch="resnet18"), 4).eval())
    with pytest.raises(OSError, match=r"no room to export model\.onnx"):
        onnx_export._export(net, torch.zeros(1, 3, 64, 32), tmp_path / "model.onnx", keep_batchnorm=False)
    assert calls == [True]

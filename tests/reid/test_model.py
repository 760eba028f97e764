"""The network: shapes for every backbone, the shared/local split, pretrained loading, checkpoints."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file
from torchvision import models as tvm

from reid.data import InputSpec
from reid.model import (
    ModelError,
    ModelSpec,
    build_model,
    is_bn_buffer,
    load_local_state,
    load_shared_state,
    local_state,
    shared_state,
)
from reid.weights import load_checkpoint, save_checkpoint

ARCHS = ["resnet18", "resnet34", "resnet50", "mobilenet_v3_small", "mobilenet_v3_large"]


@pytest.mark.parametrize("arch", ARCHS)
def test_output_shapes_for_every_backbone(arch):
    torch.manual_seed(0)
    model = build_model(ModelSpec(arch=arch), num_classes=7)
    x = torch.randn(2, 3, 64, 32)
    model.train()
    assert model(x).shape == (2, 7)
    model.eval()
    with torch.no_grad():
        assert model.embed(x).shape == (2, 512)
    assert not any(k.startswith("classifier") for k in shared_state(model))
    assert set(local_state(model)) == {"classifier.weight", "classifier.bias"}


@pytest.mark.parametrize("arch", ["resnet18", "resnet50", "mobilenet_v3_small"])
def test_last_stride_one_doubles_the_final_feature_map(arch):
    x = torch.randn(1, 3, 128, 64)
    sizes = {}
    for stride in (1, 2):
        model = build_model(ModelSpec(arch=arch, last_stride=stride), 3).eval()
        with torch.no_grad():
            sizes[stride] = model.backbone.trunk(x).shape[-2:]
    assert sizes[2] == (4, 2)
    assert sizes[1] == (8, 4)


def test_paper_initialisation_of_the_head():
    torch.manual_seed(0)
    model = build_model(ModelSpec(arch="resnet18"), num_classes=751)
    assert model.classifier.weight.std().item() == pytest.approx(0.001, rel=0.05)
    assert model.classifier.bias.abs().sum().item() == 0
    assert model.embedding.bn.weight.mean().item() == pytest.approx(1.0, abs=0.01)
    assert model.embedding.linear.bias.abs().sum().item() == 0
    # kaiming fan_out: std = sqrt(2 / fan_out) = sqrt(2 / 512)
    assert model.embedding.linear.weight.std().item() == pytest.approx((2 / 512) ** 0.5, rel=0.05)


def test_shared_state_round_trips_exactly_and_keeps_the_classifier():
    torch.manual_seed(1)
    a = build_model(ModelSpec(arch="resnet18"), num_classes=5)
    a.train()
    a(torch.randn(4, 3, 64, 32))  # move the BN running statistics away from their init
    torch.manual_seed(2)
    b = build_model(ModelSpec(arch="resnet18"), num_classes=9)
    b_classifier = local_state(b)
    state = shared_state(a)
    assert any(is_bn_buffer(k) for k in state)
    load_shared_state(b, state)
    for key, value in shared_state(b).items():
        assert torch.equal(value, state[key]), key
    for key, value in local_state(b).items():
        assert torch.equal(value, b_classifier[key])
    a.eval(), b.eval()
    x = torch.randn(3, 3, 64, 32)
    with torch.no_grad():
        assert torch.equal(a.embed(x), b.embed(x))
    # the copy is independent of the source model
    state["embedding.linear.weight"].zero_()
    assert shared_state(a)["embedding.linear.weight"].abs().sum() > 0


def test_loading_a_state_that_does_not_fit_is_a_clear_error():
    model = build_model(ModelSpec(arch="resnet18"), num_classes=5)
    state = shared_state(model)
    missing = dict(state)
    missing.pop("embedding.linear.weight")
    with pytest.raises(ModelError, match="1 missing"):
        load_shared_state(model, missing)
    wrong = dict(state, **{"embedding.linear.weight": torch.zeros(3, 3)})
    with pytest.raises(ModelError, match="shape"):
        load_shared_state(model, wrong)
    with pytest.raises(ModelError, match="shape"):
        load_local_state(model, local_state(build_model(ModelSpec(arch="resnet18"), num_classes=6)))


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_pretrained_weights_load_from_a_local_torchvision_file(tmp_path, suffix):
    torch.manual_seed(3)
    reference = tvm.resnet18(weights=None)
    path = tmp_path / f"resnet18{suffix}"
    if suffix == ".pth":
        torch.save(reference.state_dict(), path)
    else:
        save_file(reference.state_dict(), str(path))
    model = build_model(ModelSpec(arch="resnet18"), 4, pretrained=path)
    assert torch.equal(model.backbone.trunk[0].weight, reference.conv1.weight)
    assert torch.equal(model.backbone.trunk[7][1].bn2.running_var, reference.layer4[1].bn2.running_var)


def test_pretrained_errors(tmp_path):
    with pytest.raises(ModelError, match="never downloaded"):
        build_model(ModelSpec(arch="resnet18"), 4, pretrained=tmp_path / "nope.pth")
    path = tmp_path / "mobilenet.pth"
    torch.save(tvm.mobilenet_v3_small(weights=None).state_dict(), path)
    with pytest.raises(ModelError, match="missing"):
        build_model(ModelSpec(arch="resnet18"), 4, pretrained=path)
    path34 = tmp_path / "resnet34.pth"
    torch.save(tvm.resnet34(weights=None).state_dict(), path34)
    with pytest.raises(ModelError, match="unexpected"):
        build_model(ModelSpec(arch="resnet18"), 4, pretrained=path34)
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(bytes(range(256)) * 8)  # never unpickled: one line, no traceback
    with pytest.raises(ModelError, match="not a readable weights file"):
        build_model(ModelSpec(arch="resnet18"), 4, pretrained=garbage)
    truncated = tmp_path / "cut.safetensors"
    truncated.write_bytes(b"\x40\x00\x00\x00\x00\x00\x00\x00{")
    with pytest.raises(ModelError, match="not a readable weights file"):
        build_model(ModelSpec(arch="resnet18"), 4, pretrained=truncated)
    own = save_checkpoint(
        tmp_path / "own.safetensors", build_model(ModelSpec(arch="resnet18"), 2), InputSpec()
    )
    with pytest.raises(
        ModelError, match="is a resnet18 model file; this model is a resnet34: use --arch resnet18"
    ):
        build_model(ModelSpec(arch="resnet34"), 4, pretrained=own)


def test_checkpoint_round_trip_with_and_without_classifier(tmp_path):
    torch.manual_seed(4)
    model = build_model(ModelSpec(arch="mobilenet_v3_small", last_stride=1), num_classes=6)
    spec = InputSpec(height=96, width=48)
    site = save_checkpoint(tmp_path / "site.safetensors", model, spec, meta={"round": "3"})
    ckpt = load_checkpoint(site)
    assert ckpt.has_classifier and ckpt.model.num_classes == 6
    assert ckpt.input_spec == spec and ckpt.meta == {"round": "3"}
    assert ckpt.model.spec == model.spec
    for key, value in model.state_dict().items():
        assert torch.equal(ckpt.model.state_dict()[key], value), key
    glob = load_checkpoint(
        save_checkpoint(tmp_path / "g.safetensors", model, spec, include_classifier=False), 11
    )
    assert not glob.has_classifier and glob.model.num_classes == 11
    (tmp_path / "bad.safetensors").write_bytes(b"\x00" * 20)
    with pytest.raises(ModelError, match="not a readable"):
        load_checkpoint(tmp_path / "bad.safetensors")

"""Server-side KD: the target, one step lowers the MSE, the student changes and teachers do not."""

from __future__ import annotations

import pytest
import torch

from cloud.strategy import KDConfig, TeacherMean, distill, embed_public, kd_target
from reid.data import ImageDataset, InputSpec, eval_transform, make_loader, read_image_folder
from reid.model import ModelSpec, build_model, shared_state


def test_target_is_the_mean_of_normalised_teacher_embeddings():
    torch.manual_seed(0)
    teachers = [torch.randn(6, 4) * (i + 1) for i in range(3)]
    want = sum(torch.nn.functional.normalize(t, dim=1) for t in teachers) / 3
    torch.testing.assert_close(kd_target(teachers), want)
    torch.testing.assert_close(kd_target(teachers, normalize=False), sum(teachers) / 3)
    running = TeacherMean()
    for t in teachers:
        running.add(t)
    torch.testing.assert_close(running.target(), want)
    with pytest.raises(ValueError, match="NaN"):
        running.add(torch.full((6, 4), float("nan")))
    with pytest.raises(ValueError, match="!="):
        running.add(torch.randn(5, 4))
    assert running.count == 3  # the bad teachers changed nothing


def test_kd_step_lowers_mse_changes_student_not_teachers(tiny_federation):
    spec = InputSpec(height=64, width=32)
    paths = read_image_folder(tiny_federation / "public")
    dataset = ImageDataset(paths, eval_transform(spec))
    ordered = make_loader(dataset, 8, train=False)
    torch.manual_seed(0)
    teachers = [build_model(ModelSpec(arch="resnet18"), 3) for _ in range(2)]
    teacher_before = [shared_state(t) for t in teachers]
    target = kd_target([embed_public(t, ordered, len(dataset)) for t in teachers])
    assert target.shape == (len(dataset), 512)
    student = build_model(ModelSpec(arch="resnet18"), 3)
    student_before = shared_state(student)

    def mse() -> float:
        emb = embed_public(student, ordered, len(dataset))
        return float(torch.nn.functional.mse_loss(emb, target))

    before = mse()
    config = KDConfig(lr=0.05, epochs=5, batch_size=8, max_batches=3)
    result = distill(student, make_loader(dataset, 8, train=True, seed=0), target, config)
    assert result.batches == 3 and result.stopped_by_budget
    assert mse() < before
    assert any(not torch.equal(v, student_before[k]) for k, v in shared_state(student).items())
    for t, state in zip(teachers, teacher_before, strict=True):
        for k, v in shared_state(t).items():
            assert torch.equal(v, state[k]), k

"""Server-side KD: the target, one step lowers the MSE, the student changes and teachers do not; under
bn=local the student's statistics come from the public set; a diverging KD leaves the aggregate."""

from __future__ import annotations

import pytest
import torch

from cloud.strategy import KDConfig, KDDiverged, TeacherMean, distill, embed_public, kd_target
from reid.data import ImageDataset, InputSpec, eval_transform, make_loader, read_image_folder
from reid.model import ModelSpec, build_model, shared_state
from reid.train import TrainConfig, estimate_batchnorm


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
    assert running.add(torch.full((6, 4), float("nan"))) == 0  # a model not finite anywhere adds nothing
    with pytest.raises(ValueError, match="!="):
        running.add(torch.randn(5, 4))
    assert running.count == 3  # the bad teachers changed nothing
    torch.testing.assert_close(running.target(), want)
    # a row that is not finite (a corrupt public image; a model that is not finite on it) is left out of
    # that image's mean only; an image no teacher covers has a NaN target, which KD skips
    partial = teachers[0].clone()
    partial[1] = float("inf")
    assert running.add(partial) == 5
    got = running.target()
    torch.testing.assert_close(got[1], want[1])
    torch.testing.assert_close(got[0], (want[0] * 3 + torch.nn.functional.normalize(partial[0], dim=0)) / 4)
    holes = TeacherMean()
    holes.add(partial)
    assert torch.isnan(holes.target()[1]).all() and torch.isfinite(holes.target()[0]).all()


def test_kd_runs_after_every_nth_training_round():
    """The one schedule the simulator and the aggregator share: after rounds every-1, 2*every-1, ..."""
    assert [r for r in range(10) if KDConfig(every=3).due(r)] == [2, 5, 8]
    assert all(KDConfig().due(r) for r in range(5))


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


def test_under_bn_local_the_students_statistics_are_estimated_on_the_public_set_first(tiny_federation):
    """bn=local: the global copy's BatchNorm statistics are its initial ones (the sites keep theirs), far
    from the public images' after training; KD estimates them on the public set before it distils."""
    spec = InputSpec(height=64, width=32)
    dataset = ImageDataset(read_image_folder(tiny_federation / "public"), eval_transform(spec))
    ordered = make_loader(dataset, 8, train=False)
    torch.manual_seed(0)
    teacher = build_model(ModelSpec(arch="resnet18"), 3)
    target = kd_target([embed_public(teacher, ordered, len(dataset))])
    student = build_model(ModelSpec(arch="resnet18"), 3)
    for m in student.modules():  # statistics that fit no image: what a global copy may carry
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_var.fill_(0.1)
    state = shared_state(student)
    config = KDConfig(lr=1e-5, batch_size=8, max_batches=1)
    for statistics in (False, True):
        model = build_model(ModelSpec(arch="resnet18"), 3)
        model.load_state_dict(state, strict=False)
        loader = make_loader(dataset, 8, train=True, seed=0)
        if not statistics:  # MSE ~1e12 at the first batch; one step and the embeddings overflow
            with pytest.raises(KDDiverged, match="embeddings are not finite"):
                distill(model, loader, target, config, statistics=False)
        else:
            result = distill(model, loader, target, config, statistics=True)
            assert result.loss_first < 10  # teachers' targets are unit rows: the student is on their scale
            estimated = build_model(ModelSpec(arch="resnet18"), 3)
            estimated.load_state_dict(state, strict=False)
            estimate_batchnorm(estimated, make_loader(dataset, 8, train=True, seed=0))
            kept = shared_state(model)  # KD keeps (and uses) the statistics it estimated
            for k, v in shared_state(estimated).items():
                if k.endswith("running_mean"):
                    torch.testing.assert_close(kept[k], v)


def test_diverging_kd_raises_and_the_simulator_keeps_the_aggregate(tiny_federation, tmp_path):
    from cloud.simulate import SimulationConfig, Simulator

    spec = InputSpec(height=64, width=32)
    dataset = ImageDataset(read_image_folder(tiny_federation / "public"), eval_transform(spec))
    torch.manual_seed(0)
    student = build_model(ModelSpec(arch="resnet18"), 3)
    target = torch.randn(len(dataset), 512)
    with pytest.raises(KDDiverged):
        distill(student, make_loader(dataset, 8, train=True, seed=0), target, KDConfig(lr=1e12, batch_size=8))

    cfg = SimulationConfig(
        algorithm="kd",
        rounds=1,
        eval_local=False,
        model=ModelSpec(arch="resnet18"),
        input=spec,
        train=TrainConfig(batch_size=16, lr_head=0.02, lr_backbone=0.02),
        kd=KDConfig(lr=1e12, batch_size=8, max_batches=4),
    )
    sites = sorted((tiny_federation / "sites").iterdir())
    sim = Simulator(cfg, sites, tmp_path / "run", tiny_federation / "public")
    records = sim.run()
    summary = next(r for r in records if r.get("kind") == "round")
    assert "diverged" in summary["kd"]
    assert all(bool(torch.isfinite(v).all()) for v in sim.global_state.values() if v.is_floating_point())
    scored = [r for r in records if r.get("model") == "global"]
    assert len(scored) == len(sites) and all(r["rank1"] >= 0 for r in scored)


def test_kd_whose_loss_explodes_but_stays_finite_keeps_the_aggregate(tiny_federation, tmp_path):
    """A MobileNet student at the default KD lr goes from MSE ~30 to ~1e7 in one step with finite weights;
    its embeddings then overflowed and every site's CDW of the next round was NaN (no update accepted,
    the simulation stopped). KD now counts as diverged and the next round takes every site."""
    from cloud.simulate import SimulationConfig, Simulator

    cfg = SimulationConfig(
        algorithm="cdw_kd",
        rounds=2,
        eval_local=False,
        model=ModelSpec(arch="mobilenet_v3_small"),
        input=InputSpec(height=64, width=32),
        train=TrainConfig(batch_size=16, lr_head=0.02, lr_backbone=0.02),
        kd=KDConfig(batch_size=8, max_batches=2),
    )
    sites = sorted((tiny_federation / "sites").iterdir())
    records = Simulator(cfg, sites, tmp_path / "run", tiny_federation / "public").run()
    rounds = [r for r in records if r.get("kind") == "round"]
    assert "diverged" in rounds[0]["kd"] and "first batch" in rounds[0]["kd"]["diverged"]
    assert sorted(rounds[1]["weights"]) == [p.name for p in sites]
    assert all(0.0 <= d <= 2.0 for d in rounds[1]["cdw"].values())

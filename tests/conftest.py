"""Shared fixtures: a tiny synthetic federation (64x32 images) generated once per test session."""

from __future__ import annotations

from pathlib import Path

import pytest

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

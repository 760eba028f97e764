"""Shared fixtures: a tiny synthetic federation (64x32 images) and a real mosquitto broker."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

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


@pytest.fixture(scope="session")
def mosquitto_url() -> Iterator[str]:
    """A real mosquitto on a free loopback port. Missing binary: skipped locally, a failure in CI."""
    if find_mosquitto() is None:
        message = "mosquitto is not installed (apt-get install mosquitto; `make setup` does it as root)"
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
            pytest.fail(message)
        pytest.skip(message)
    with LocalBroker() as broker:
        yield broker.url

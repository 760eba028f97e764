"""Per-camera scoring in the federated-by-camera scenario: each camera's query and gallery crops are
embedded by the model of the client that holds that camera's training images (the global weights with
that client's own BatchNorm layers under bn=local: what a camera serving its own model computes), and
the site is scored once, on the union of its cameras' crops. This is the camera-based BatchNorm view of
person re-identification (Zhuang et al., ECCV 2020): statistics estimated on one camera's images fit
that camera's crops, not the other cameras'. It also embeds each test crop once, not once per client.

Cameras of a site that have no client of their own (too few training images, or test-only cameras) are
embedded by the site's client with the most training images."""

from __future__ import annotations

import logging
from collections import Counter
from pathlib import Path

from reid.data import read_dataset
from reid.data.camera_split import camera_clients
from reid.evaluate import Embedded, Metrics

log = logging.getLogger(__name__)


def crops_per_client(clients: list[Path]) -> dict[str, tuple[int, ...]]:
    """Client name -> the cameras whose query/gallery crops it embeds; {} when the folders are sites."""
    listed = camera_clients(clients)
    folders = {c.name: c for c in clients}
    by_site: dict[str, list] = {}
    for client in listed.values():
        by_site.setdefault(client.site, []).append(client)
    crops: dict[str, tuple[int, ...]] = {}
    for members in by_site.values():
        splits = read_dataset(folders[members[0].name])  # every client holds its site's query/gallery
        tested = {r.camid for r in (*splits.query, *splits.gallery)}
        unowned = tested - {c.camera for c in members}
        largest = min(members, key=lambda c: (-c.train_images, c.name))
        for c in members:
            crops[c.name] = tuple(sorted({c.camera} | (unowned if c is largest else set())))
    return crops


class CameraScores:
    """One round's embedded crops by (model, site); a site is scored once all of its clients sent theirs."""

    def __init__(self, site_of: dict[str, str]) -> None:
        self.site_of = site_of
        self.clients = Counter(site_of.values())
        self.parts: dict[tuple[str, str], list[Embedded]] = {}

    def add(self, model: str, client: str, embedded: Embedded) -> None:
        self.parts.setdefault((model, self.site_of[client]), []).append(embedded)

    def scored(self) -> list[tuple[str, str, Metrics]]:
        """(site, model, metrics) of every complete site; a site missing a client's crops (it failed, or
        was not sampled) is not scored: its score would leave out the crops of that client's cameras."""
        out = []
        for (model, site), parts in sorted(self.parts.items(), key=lambda kv: (kv[0][1], kv[0][0])):
            if len(parts) < self.clients[site]:
                log.warning(
                    "site %s: %d of %d camera clients embedded their crops for the %s model: not scored",
                    site,
                    len(parts),
                    self.clients[site],
                    model,
                )
                continue
            out.append((site, model, Embedded.union(parts).score()))
        return out

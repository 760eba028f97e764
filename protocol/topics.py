"""The versioned topic tree of one federation: ``fedreid/v1/<federation>/...``.

| Topic | Publisher | Payload | Retained |
| --- | --- | --- | --- |
| ``status/<node>`` | every node (and its last will) | NodeStatus | yes |
| ``round`` | aggregator | RoundStart of the round in progress | yes |
| ``global/chunks`` | aggregator | chunks of the global model blobs | no |
| ``global/resend`` | sites | ChunkRequest for global-model chunks | no |
| ``sites/<site>/update`` | that site | UpdateManifest | no |
| ``sites/<site>/chunks`` | that site | chunks of its update blob | no |
| ``sites/<site>/eval`` | that site | EvalReport (evaluation round after the last one) | no |
| ``sites/<site>/ack`` | aggregator | UpdateAck | no |
| ``sites/<site>/resend`` | aggregator | ChunkRequest for that site's chunks | no |
| ``deploy`` | aggregator | Deployment: the model sites serve inference with | yes |
| ``deploy/chunks`` | aggregator | chunks of the deployed model file | no |
| ``deploy/resend`` | sites | ChunkRequest for chunks of the deployed model | no |
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from protocol.messages import NAME

PREFIX = "fedreid/v1"
_NAME = re.compile(NAME)
# the aggregator's and the read-only operator's node names: no site may take them (their status topics)
RESERVED_NODES = ("aggregator", "operator")


def check_name(value: str, what: str = "name") -> str:
    if not _NAME.match(value):
        raise ValueError(f"invalid {what} {value!r}: 1-64 characters of A-Z a-z 0-9 _ . -")
    return value


def check_site_name(value: str, what: str = "site") -> str:
    """A site's name: a name that is not one of `RESERVED_NODES`."""
    if check_name(value, what) in RESERVED_NODES:
        raise ValueError(f"invalid {what} {value!r}: {' and '.join(RESERVED_NODES)} are reserved node names")
    return value


@dataclass(frozen=True)
class Topics:
    federation: str

    def __post_init__(self) -> None:
        check_name(self.federation, "federation")

    @property
    def root(self) -> str:
        return f"{PREFIX}/{self.federation}"

    def status(self, node: str) -> str:
        return f"{self.root}/status/{check_name(node, 'node')}"

    @property
    def status_all(self) -> str:
        return f"{self.root}/status/+"

    @property
    def round(self) -> str:
        return f"{self.root}/round"

    @property
    def global_chunks(self) -> str:
        return f"{self.root}/global/chunks"

    @property
    def global_resend(self) -> str:
        return f"{self.root}/global/resend"

    @property
    def deploy(self) -> str:
        return f"{self.root}/deploy"

    @property
    def deploy_chunks(self) -> str:
        return f"{self.root}/deploy/chunks"

    @property
    def deploy_resend(self) -> str:
        return f"{self.root}/deploy/resend"

    def may_be_retained(self, topic: str) -> bool:
        """Only status documents, the round document and the deployment manifest are ever retained."""
        return topic in (self.round, self.deploy) or (
            topic.startswith(self.root + "/status/") and topic.count("/") == self.root.count("/") + 2
        )

    def is_state(self, topic: str) -> bool:
        """Topics whose newest message supersedes the older ones: what may be retained, and a site's
        update manifest (a site has at most one update pending)."""
        return self.may_be_retained(topic) or (
            topic.startswith(self.root + "/sites/")
            and topic.endswith("/update")
            and topic.count("/") == self.root.count("/") + 3
        )

    def is_request(self, topic: str) -> bool:
        """The resend topics (ChunkRequest): cheap to drop, the requester asks again."""
        return topic in (self.global_resend, self.deploy_resend) or self._site_leaf(topic) == "resend"

    def is_chunks(self, topic: str) -> bool:
        """The chunk topics: binary chunks, never signed (docs/protocol.md). Exact topics, not a suffix: a
        node may be named ``chunks`` (its ``status/chunks`` is a signed status like any other)."""
        return topic in (self.global_chunks, self.deploy_chunks) or self._site_leaf(topic) == "chunks"

    def _site_leaf(self, topic: str) -> str | None:
        """The leaf of a ``sites/<site>/<leaf>`` topic of this federation, else None."""
        return topic.rsplit("/", 1)[1] if self.site_of(topic) is not None else None

    def site(self, site: str, leaf: str) -> str:
        return f"{self.root}/sites/{check_name(site, 'site')}/{leaf}"

    def any_site(self, leaf: str) -> str:
        return f"{self.root}/sites/+/{leaf}"

    def site_of(self, topic: str) -> str | None:
        """The site named in a ``sites/<site>/...`` topic of this federation, else None."""
        parts = topic.split("/")
        root = self.root.split("/")
        if len(parts) == len(root) + 3 and parts[: len(root)] == root and parts[len(root)] == "sites":
            return parts[len(root) + 1]
        return None

"""Control messages: small JSON documents validated by pydantic models with a schema version.

Every message carries ``schema_version`` (1) and ``kind``. `parse_message` turns untrusted bytes into a
model or raises `MessageError` with one clear line; it never evaluates or unpickles anything.
"""

from __future__ import annotations

import json
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    TypeAdapter,
    ValidationError,
    model_serializer,
    model_validator,
)

SCHEMA_VERSION = 1
MAX_MESSAGE_BYTES = 256 * 1024
# sites one RoundStart names: 1,000 of the longest names, listed again in its groups, stay under
# MAX_MESSAGE_BYTES (10,000 did not fit: a round no site could read)
MAX_SELECTED = 1000
NAME = r"^[A-Za-z0-9_.-]{1,64}$"
SHA256 = r"^[0-9a-f]{64}$"


def untrusted_json(data: bytes | str) -> Any:
    """`json.loads` of a peer's bytes: ValueError for anything that is not JSON, including nesting deeper
    than the parser's recursion limit (json raises RecursionError there, which no ValueError guard
    catches: 300 KB of '[' once stopped a node's message thread). UTF-8 only, as docs/protocol.md says
    (json.loads would also take UTF-16 and UTF-32 bytes, and no other client would)."""
    try:
        return json.loads(data.decode("utf-8") if isinstance(data, bytes) else data)
    except RecursionError:
        raise ValueError("JSON nested too deeply") from None


Name = Annotated[str, Field(pattern=NAME)]
Sha256 = Annotated[str, Field(pattern=SHA256)]
Encoding = Literal["fp32", "fp16", "int8"]
Finite = Annotated[float, Field(allow_inf_nan=False)]
PositiveFinite = Annotated[float, Field(gt=0, allow_inf_nan=False)]
Metric = Annotated[float, Field(ge=0, allow_inf_nan=False)]
Metrics = Annotated[dict[Name, Metric], Field(max_length=32)]
PERCENTAGES = ("rank1", "rank5", "rank10", "mAP", "mINP")
RESERVED_METRICS = ("round", "site", "model", "kind")  # the aggregator's record keys (metrics.jsonl)


def _check_scores(scores: dict[str, float]) -> dict[str, float]:
    reserved = [k for k in RESERVED_METRICS if k in scores]
    if reserved:
        raise ValueError(f"metrics name {reserved[0]!r} is reserved ({', '.join(RESERVED_METRICS)})")
    over = [k for k in PERCENTAGES if scores.get(k, 0.0) > 100]
    if over:
        raise ValueError(f"{over[0]} is a percentage (0 to 100)")
    return scores


Scores = Annotated[Metrics, AfterValidator(_check_scores)]  # a site's evaluation of a model
MAX_SAMPLES = 2**31 - 1  # far above any data set; the float arithmetic of weights never overflows


class MessageError(ValueError):
    """An incoming message is not valid; the text says why in one line."""


class _Message(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    schema_version: Literal[1] = SCHEMA_VERSION


class BlobRef(BaseModel):
    """What a receiver needs to fetch and verify a blob sent as chunks."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    blob_id: str = Field(pattern=r"^[0-9a-f]{8,64}$")
    size: int = Field(ge=0)
    sha256: Sha256
    chunks: int = Field(ge=1)
    encoding: Encoding = "fp32"
    compressed: bool = False


PREPROCESSING = ("mean", "std", "pad")  # ModelInfo's optional preprocessing fields


class ModelInfo(BaseModel):
    """The architecture and preprocessing of the federation's model, so a site can build it."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    arch: str = Field(pattern=r"^[a-z0-9_]{1,40}$")
    embed_dim: int = Field(512, ge=1, le=65536)
    last_stride: Literal[1, 2] = 2
    dropout: float = Field(0.5, ge=0, lt=1)
    height: int = Field(256, ge=16, le=4096)
    width: int = Field(128, ge=16, le=4096)
    # preprocessing: per-channel normalisation of RGB in 0..1 and the training pad/crop jitter in pixels;
    # null (or absent): the ImageNet statistics, and 10 px at 256 high scaled to `height`
    mean: list[Finite] | None = Field(None, min_length=3, max_length=3)
    std: list[PositiveFinite] | None = Field(None, min_length=3, max_length=3)
    pad: int | None = Field(None, ge=0, le=1024)

    @model_serializer(mode="wrap")
    def _defaults_left_out(self, handler: Any) -> dict[str, Any]:
        """The preprocessing fields go out only when set: a federation on the defaults sends what sites
        of earlier versions read (they refuse unknown fields)."""
        data = handler(self)
        for name in PREPROCESSING:
            if data.get(name) is None:
                data.pop(name, None)
        return data


class TrainingInfo(BaseModel):
    """Local-training settings of a round."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    local_epochs: int = Field(1, ge=1, le=1000)
    batch_size: int = Field(32, ge=2, le=4096)
    lr_head: float = Field(0.05, gt=0, le=10)
    lr_backbone: float = Field(0.005, ge=0, le=10)
    keep_local_bn: bool = False


class NodeStatus(_Message):
    """Retained liveness document of a node (also its last will, with state "offline")."""

    kind: Literal["status"] = "status"
    node: Name
    role: Literal["aggregator", "site"]
    state: Literal["online", "offline", "training", "idle", "failed"]
    round: int | None = None
    time: Finite
    deployed: str | None = Field(None, max_length=160)  # sites: the model version serving inference
    reason: str = Field("", max_length=300)  # "failed": why this node cannot take part in `round`


def _check_base(m: RoundStart | GroupBase) -> RoundStart | GroupBase:
    """`base_hash` is the sha256 of the model blob it names (a site could never get the model otherwise)."""
    if m.base_hash != m.blob.sha256:
        raise ValueError("base_hash is not blob.sha256")
    return m


class GroupBase(BaseModel):
    """Client clustering: the model the listed selected sites train from in place of the round's base."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    group: int = Field(ge=0, le=63)
    base_hash: Sha256
    blob: BlobRef
    sites: list[Name] = Field(min_length=1, max_length=MAX_SELECTED)

    @model_validator(mode="after")
    def _base_is_the_blob(self) -> GroupBase:
        return _check_base(self)


class RoundStart(_Message):
    """Retained by the aggregator: the round in progress and how to take part in it."""

    kind: Literal["round_start"] = "round_start"
    federation: Name
    round: int = Field(ge=0)
    base_hash: Sha256
    blob: BlobRef
    model: ModelInfo
    training: TrainingInfo
    deadline: Finite
    selected: list[Name] = Field(max_length=MAX_SELECTED)
    evaluate: bool = False
    upload_encoding: Encoding = "fp16"
    upload_compressed: bool = False
    train: bool = True  # False: the evaluation round after the last one (evaluate, send an EvalReport)
    # the run this round belongs to: it changes with a new run and when the aggregator had to go back on
    # work it acknowledged (a damaged state dir); a site then drops the progress it made in another run
    run_id: str = Field("", pattern=r"^[0-9a-f]{0,32}$")
    groups: list[GroupBase] = Field(default_factory=list, max_length=64)  # sent only when not empty

    @model_validator(mode="after")
    def _one_group_per_site(self) -> RoundStart:
        _check_base(self)
        listed = [s for g in self.groups for s in g.sites]
        if len(listed) != len(set(listed)):
            raise ValueError("a site is listed in two groups")
        if not set(listed) <= set(self.selected):
            raise ValueError("a group lists a site that is not selected")
        return self

    def for_site(self, site: str) -> RoundStart:
        """The round as `site` takes part in it: its group's base hash and blob in place of the round's
        (a site in no group trains from the round's own base)."""
        for g in self.groups:
            if site in g.sites:
                return self.model_copy(update={"base_hash": g.base_hash, "blob": g.blob, "groups": []})
        return self


class RunEnd(_Message):
    """Retained by the aggregator on the round topic when the run has completed all its rounds."""

    kind: Literal["run_end"] = "run_end"
    federation: Name
    rounds: int = Field(ge=0)
    run_id: str = Field("", pattern=r"^[0-9a-f]{0,32}$")  # the run that ended (RoundStart's run_id)


class UpdateManifest(_Message):
    """A site's update for a round; the delta follows as chunks on the site's chunk topic."""

    kind: Literal["update"] = "update"
    site: Name
    round: int = Field(ge=0)
    base_hash: Sha256
    blob: BlobRef
    n_samples: int = Field(ge=1, le=MAX_SAMPLES)
    cdw: float = Field(ge=0.0, le=2.0)
    loss: Finite
    train_seconds: Metric
    timings: Metrics = Field(default_factory=dict)
    metrics: Scores = Field(default_factory=dict)
    dp_epsilon: Metric | None = None  # privacy spent so far by this site, when it uses DP


class EvalReport(_Message):
    """A site's evaluation of the model of an evaluation round (``train`` false); empty `metrics`: the
    site does not evaluate (it has no query/gallery, or evaluation is off there)."""

    kind: Literal["eval"] = "eval"
    site: Name
    round: int = Field(ge=0)
    base_hash: Sha256
    metrics: Scores = Field(default_factory=dict)

    @model_validator(mode="after")
    def _scores_together(self) -> EvalReport:
        scores = {k: v for k, v in self.metrics.items() if k in ("rank1", "mAP")}
        if len(scores) == 1:
            raise ValueError("metrics carry rank1 and mAP together or neither")
        return self


class UpdateAck(_Message):
    """The aggregator's answer to an update: journaled (accepted) or rejected with the reason."""

    kind: Literal["ack"] = "ack"
    site: Name
    round: int = Field(ge=0)
    blob_id: str = Field(pattern=r"^[0-9a-f]{8,64}$")
    accepted: bool
    reason: str = Field("", max_length=1000)


class Deployment(_Message):
    """Retained by the aggregator on ``deploy``: the model the sites should serve inference with.

    The exported ONNX file follows as chunks (never retained) on ``deploy/chunks``; `contract` is its
    JSON sidecar (export.contract.Contract), whose ``sha256`` must equal ``blob.sha256``.
    """

    kind: Literal["deployment"] = "deployment"
    federation: Name
    version: str = Field(pattern=r"^[A-Za-z0-9_.:/+-]{1,128}$")
    round: int = Field(ge=-1)
    blob: BlobRef
    contract: dict[str, Any]
    created: Finite


# a request for the most indices, each of up to 8 digits (100 GB in 1 KiB chunks), fits MAX_MESSAGE_BYTES
MAX_REQUEST_INDICES = 25_000


class ChunkRequest(_Message):
    """Ask the sender of a blob to publish some of its chunks again."""

    kind: Literal["resend"] = "resend"
    requester: Name
    blob_id: str = Field(pattern=r"^[0-9a-f]{8,64}$")
    indices: list[int] = Field(max_length=MAX_REQUEST_INDICES)

    @classmethod
    def first_of(cls, requester: str, blob_id: str, missing: list[int]) -> ChunkRequest:
        """A request for (at most the first `MAX_REQUEST_INDICES` of) the missing chunks."""
        return cls(requester=requester, blob_id=blob_id, indices=missing[:MAX_REQUEST_INDICES])


Message = Annotated[
    NodeStatus | RoundStart | RunEnd | UpdateManifest | EvalReport | UpdateAck | ChunkRequest | Deployment,
    Field(discriminator="kind"),
]
_ADAPTER: TypeAdapter[Message] = TypeAdapter(Message)


def parse_message(payload: bytes, expected: type[_Message] | None = None) -> _Message:
    """Validate untrusted bytes as a message (of the `expected` type when given)."""
    if len(payload) > MAX_MESSAGE_BYTES:
        raise MessageError(f"message of {len(payload)} bytes exceeds {MAX_MESSAGE_BYTES}")
    try:
        data = untrusted_json(payload)
    except ValueError as err:  # (UnicodeDecodeError is one)
        raise MessageError(f"not JSON: {err}") from None
    if not isinstance(data, dict):
        raise MessageError("not a JSON object")
    if type(data.get("schema_version")) is not int or data["schema_version"] != SCHEMA_VERSION:
        raise MessageError(
            f"unsupported schema_version {data.get('schema_version')!r} (expected {SCHEMA_VERSION})"
        )
    try:
        message = _ADAPTER.validate_python(data, strict=True)  # JSON types as they are: no coercion
    except ValidationError as err:
        first = err.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "message"
        raise MessageError(f"invalid {data.get('kind', 'message')}: {where}: {first['msg']}") from None
    if expected is not None and not isinstance(message, expected):
        raise MessageError(f"expected a {expected.__name__}, got kind {message.kind!r}")
    return message


OMIT_WHEN_EMPTY = {"groups"}  # optional fields sent only when set: readers that predate them keep working


def encode_message(message: _Message) -> bytes:
    empty = {
        name for name in OMIT_WHEN_EMPTY if name in type(message).model_fields and not getattr(message, name)
    }
    return message.model_dump_json(exclude=empty or None).encode()

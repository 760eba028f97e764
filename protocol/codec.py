"""The blob codec: a state (name -> numpy array) as safetensors bytes, never pickle.

Encodings of floating-point tensors: ``fp32``; ``fp16`` (a tensor that would overflow float16 stays
fp32); ``int8`` (symmetric per-tensor: q = round(x / s), s = max|x| / 127, stored as the int8 tensor
``<name>`` plus a float32 scalar ``<name>::scale``). Integer tensors travel unchanged. Optional zstd
compression of the whole safetensors payload. The safetensors header carries one metadata entry,
``{"format": "fedreid-blob/1;encoding=<encoding>"}``: exactly one, because safetensors writes metadata
maps in a random order, and a blob's sha256 (the base hash of a round) must be the same for the same
state in every process.

Decoding never trusts the input: size limits before and during decompression (streamed, cut off at the
limit: a zstd bomb costs at most the limit), the safetensors parser, then names, dtypes and finiteness
are checked. Every failure is a `CodecError`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Literal

import numpy as np
import zstandard
from safetensors import safe_open
from safetensors.numpy import load, save

from protocol.messages import untrusted_json

Encoding = Literal["fp32", "fp16", "int8"]
FORMAT = "fedreid-blob/1"
SCALE_SUFFIX = "::scale"
ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
DEFAULT_MAX_BYTES = 1 << 30  # 1 GiB: far above a ResNet-50 fp32 state (98 MB)
# the safetensors header (JSON: ~180 bytes per tensor; a ResNet-50 int8 blob's is 58 KB), read before
# anything else: a header of millions of tiny entries within the blob limit took seconds and GBs to parse
MAX_HEADER_BYTES = 1 << 20
_FP16_MAX = float(np.finfo(np.float16).max)
_INT_DTYPES = {np.dtype(np.int64), np.dtype(np.int32)}
_WIRE_DTYPES = {"F32", "F16", "I8", "I32", "I64"}  # safetensors' names of the dtypes a blob may hold


class CodecError(ValueError):
    """A blob could not be encoded or decoded; the message says why."""


def encode_state(
    state: Mapping[str, np.ndarray],
    encoding: Encoding = "fp32",
    compress: bool = False,
    level: int = 1,
) -> bytes:
    """Encode a state as safetensors bytes (optionally zstd-compressed)."""
    tensors: dict[str, np.ndarray] = {}
    for name, value in state.items():
        if SCALE_SUFFIX in name:
            raise CodecError(f"tensor name {name!r} uses the reserved suffix {SCALE_SUFFIX!r}")
        arr = np.asarray(value)
        if not arr.flags.c_contiguous:
            arr = arr.copy(order="C")  # (np.ascontiguousarray would turn 0-d scalars into 1-d)
        if arr.dtype.kind != "f":
            if arr.dtype not in _INT_DTYPES:
                raise CodecError(f"{name}: unsupported dtype {arr.dtype}")
            tensors[name] = arr
            continue
        arr = arr.astype(np.float32, copy=False)
        if encoding == "fp16" and (arr.size == 0 or float(np.abs(arr).max()) < _FP16_MAX):
            tensors[name] = arr.astype(np.float16)
        elif encoding == "int8":
            peak = float(np.abs(arr).max()) if arr.size else 0.0
            scale = peak / 127.0 if peak > 0 else 1.0
            tensors[name] = np.clip(np.rint(arr / scale), -127, 127).astype(np.int8)
            tensors[name + SCALE_SUFFIX] = np.array([scale], dtype=np.float32)
        else:
            tensors[name] = arr
    payload = save(tensors, metadata={"format": f"{FORMAT};encoding={encoding}"})
    return zstandard.ZstdCompressor(level=level).compress(payload) if compress else payload


def _decompress(blob: bytes, max_bytes: int) -> bytes:
    """zstd-decompress, streaming, stopping as soon as the output would pass `max_bytes`.

    The frame's declared content size is checked first, and is not trusted: a frame that declares
    less than it holds (or nothing) is still cut off at the limit, so a small "bomb" never costs
    more than `max_bytes` of memory.
    """
    try:
        declared = zstandard.frame_content_size(blob)
    except zstandard.ZstdError as err:
        raise CodecError(f"bad zstd payload: {err}") from None
    if declared > max_bytes:
        raise CodecError(f"compressed blob declares {declared} bytes, over the limit of {max_bytes}")
    out = bytearray()
    try:
        with zstandard.ZstdDecompressor().stream_reader(blob, read_across_frames=True) as reader:
            while piece := reader.read(min(1 << 20, max_bytes + 1 - len(out))):
                out += piece
                if len(out) > max_bytes:
                    raise CodecError(f"decompressed blob exceeds the limit of {max_bytes} bytes")
    except zstandard.ZstdError as err:
        raise CodecError(f"bad zstd payload: {err}") from None
    return bytes(out)


def _check_dtypes(read: Callable[[int, int], bytes], size: int) -> None:
    """Refuse a safetensors payload holding a dtype a blob never has (bfloat16, float8, bool, ...) from
    its header alone, before the parser converts anything (some of those it cannot convert to numpy).
    `read(offset, n)` reads n bytes of the payload, which is `size` bytes long."""
    try:
        length = int.from_bytes(read(0, 8), "little")
        if not 0 < length <= size - 8:
            raise ValueError(f"header length {length} does not fit a payload of {size} bytes")
        if length > MAX_HEADER_BYTES:
            raise ValueError(f"header of {length} bytes, over the limit of {MAX_HEADER_BYTES}")
        header = untrusted_json(read(8, length))
        dtypes = {v.get("dtype") for k, v in header.items() if k != "__metadata__"}
    except (ValueError, AttributeError) as err:  # (json's errors are ValueErrors)
        raise CodecError(f"not a safetensors payload: {err}") from None
    if not dtypes <= _WIRE_DTYPES:
        raise CodecError(f"unsupported dtype {sorted(map(str, dtypes - _WIRE_DTYPES))[0]}")


def _decoded(names: list[str], get: Callable[[str], np.ndarray]) -> Iterator[tuple[str, np.ndarray]]:
    """The checks and conversions of decoding, reading one raw tensor at a time through `get`."""
    present = set(names)
    int8: set[str] = set()
    for name in names:
        if name.endswith(SCALE_SUFFIX):
            if name[: -len(SCALE_SUFFIX)] not in present:
                raise CodecError(f"scale {name!r} without an int8 tensor")
            continue
        arr = get(name)
        if arr.dtype == np.int8:
            scale = get(name + SCALE_SUFFIX) if name + SCALE_SUFFIX in present else None
            if scale is None or scale.shape != (1,) or scale.dtype != np.float32:
                raise CodecError(f"int8 tensor {name!r} without a float32 scale")
            if not np.isfinite(scale[0]) or scale[0] <= 0:
                raise CodecError(f"int8 tensor {name!r} has an invalid scale {scale[0]}")
            int8.add(name)
            value = arr.astype(np.float32) * scale[0]
        elif arr.dtype.kind == "f":
            if arr.dtype not in (np.float32, np.float16):
                raise CodecError(f"{name}: unsupported float dtype {arr.dtype}")
            value = arr.astype(np.float32, copy=False)
        elif arr.dtype in _INT_DTYPES:
            value = arr
        else:
            raise CodecError(f"{name}: unsupported dtype {arr.dtype}")
        if value.dtype.kind == "f" and not np.isfinite(value).all():
            raise CodecError(f"{name}: contains NaN or Inf")
        yield name, value
    orphans = [n for n in names if n.endswith(SCALE_SUFFIX) and n[: -len(SCALE_SUFFIX)] not in int8]
    if orphans:
        raise CodecError(f"scale {orphans[0]!r} without an int8 tensor")


def iter_state(blob: bytes, max_bytes: int = DEFAULT_MAX_BYTES) -> Iterator[tuple[str, np.ndarray]]:
    """Decode a blob tensor by tensor into float32 / integer arrays (one float32 copy alive at a time, so
    a caller can copy each into a flat buffer). Raises CodecError for anything malformed, possibly after
    some tensors were yielded (at the latest when the last one was): a caller keeps nothing from a blob
    that failed."""
    if len(blob) > max_bytes:
        raise CodecError(f"blob of {len(blob)} bytes exceeds the limit of {max_bytes}")
    if blob[:4] == ZSTD_MAGIC:
        blob = _decompress(blob, max_bytes)
    _check_dtypes(lambda offset, n, payload=blob: payload[offset : offset + n], len(blob))
    try:
        raw = load(bytes(blob))
    except Exception as err:  # the parser's failure on any input is the input's fault
        raise CodecError(f"not a safetensors payload: {type(err).__name__}: {err}") from None
    del blob
    yield from _decoded(list(raw), raw.__getitem__)


def iter_state_file(path: Path, max_bytes: int = DEFAULT_MAX_BYTES) -> Iterator[tuple[str, np.ndarray]]:
    """`iter_state` of a blob stored in a file, reading one tensor at a time from disk (memory: one
    tensor, not the blob); a compressed blob is read whole and decompressed (within `max_bytes`)."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            magic = f.read(4)
    except OSError as err:
        raise CodecError(f"blob file unreadable: {err}") from None
    if size > max_bytes:
        raise CodecError(f"blob of {size} bytes exceeds the limit of {max_bytes}")
    if magic == ZSTD_MAGIC:
        yield from iter_state(path.read_bytes(), max_bytes)
        return
    try:
        with open(path, "rb") as f:

            def read(offset: int, n: int) -> bytes:
                f.seek(offset)
                return f.read(n)

            _check_dtypes(read, size)
        with safe_open(str(path), framework="numpy") as f:
            yield from _decoded(list(f.keys()), f.get_tensor)
    except CodecError:
        raise
    except Exception as err:  # the parser's failure on any input is the input's fault
        raise CodecError(f"not a safetensors payload: {type(err).__name__}: {err}") from None


def decode_state(blob: bytes, max_bytes: int = DEFAULT_MAX_BYTES) -> dict[str, np.ndarray]:
    """Decode a blob into float32 / integer arrays. Raises CodecError for anything malformed."""
    return dict(iter_state(blob, max_bytes))

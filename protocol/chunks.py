"""Chunked transfer of blobs over MQTT: framing, splitting and reassembly.

A chunk message is ``b"FRC1" + uint32 big-endian header length + header JSON + data``. The header
(`ChunkHeader`) names the blob (id, total size, chunk size, chunk count, whole-blob sha256) and the chunk
(index, sha256 of its data), so a receiver can start from any chunk, in any order. The reassembler:

* ignores duplicates, rejects chunks that disagree with the blob's first chunk, a bad chunk hash, an
  index out of range, or a blob over the size limit (`ChunkError`, the transfer keeps going);
* writes chunks into a buffer at their offset (above `spool_bytes`, straight into a temporary file with
  `pwrite`: the blob then sits in the page cache, not in the process, so a receiver with many uploads in
  flight holds one chunk at a time in its own memory);
* tells which chunks are missing (for a re-request) and how long since the last progress (timeouts
  are about lack of progress, not wall-clock);
* verifies the whole-blob sha256 before handing the bytes out.

`InboundBlob` is what every receiver keeps (a site fetching the global model, the aggregator collecting
an update, a site fetching a deployment): the signed reference that announced the blob, against which
each chunk's header is checked first (`ForeignChunk`: dropped, the transfer goes on), and a reassembler
started by the first chunk that agrees; it says which chunks are missing and for how long nothing came.
"""

from __future__ import annotations

import hashlib
import os
import struct
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from protocol.messages import BlobRef, Encoding, untrusted_json

MAGIC = b"FRC1"
DEFAULT_CHUNK_BYTES = 1 << 20
MIN_CHUNK_BYTES = 1024  # the smallest chunk (but the last) a sender may use: bounds a blob's chunk count
MAX_CHUNK_BYTES = 16 << 20  # the largest chunk our nodes send (the provisioned broker's packet limit)
MAX_HEADER_BYTES = 4096
_LEN = struct.Struct(">I")
_HEX64 = r"^[0-9a-f]{64}$"


class ChunkError(ValueError):
    """A chunk message is malformed or does not belong to the transfer."""


class ChunkHeader(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    blob_id: str = Field(pattern=r"^[0-9a-f]{8,64}$")
    index: int = Field(ge=0)
    count: int = Field(ge=1)
    chunk_size: int = Field(ge=1)
    blob_size: int = Field(ge=0)
    blob_sha256: str = Field(pattern=_HEX64)
    sha256: str = Field(pattern=_HEX64)

    def expected_length(self) -> int:
        if self.index == self.count - 1:
            return self.blob_size - self.chunk_size * (self.count - 1)
        return self.chunk_size


def sha256_hex(data: bytes | memoryview) -> str:
    return hashlib.sha256(data).hexdigest()


def split_blob(blob: bytes, blob_id: str, chunk_size: int = DEFAULT_CHUNK_BYTES) -> Iterator[bytes]:
    """The chunk messages of a blob, in order (an empty blob is one empty chunk)."""
    if chunk_size < 1:
        raise ValueError("chunk_size must be >= 1")
    view = memoryview(blob)
    count = max(1, -(-len(blob) // chunk_size))
    blob_sha = sha256_hex(view)
    for index in range(count):
        data = view[index * chunk_size : (index + 1) * chunk_size]
        header = ChunkHeader(
            blob_id=blob_id,
            index=index,
            count=count,
            chunk_size=chunk_size,
            blob_size=len(blob),
            blob_sha256=blob_sha,
            sha256=sha256_hex(data),
        )
        head = header.model_dump_json().encode()
        yield MAGIC + _LEN.pack(len(head)) + head + bytes(data)


def blob_ref(blob: bytes, chunk_size: int, encoding: Encoding = "fp32", compressed: bool = False) -> BlobRef:
    """The reference (id = first 32 hex digits of the sha256) of a blob sent in `chunk_size` chunks."""
    digest = sha256_hex(blob)
    return BlobRef(
        blob_id=digest[:32],
        size=len(blob),
        sha256=digest,
        chunks=max(1, -(-len(blob) // chunk_size)),
        encoding=encoding,
        compressed=compressed,
    )


def chunk_size_for(ref: BlobRef, preferred: int) -> int:
    """The chunk size to send the blob of `ref` in: `preferred` when it gives the announced `chunks`, else
    one that does (an update announced before a restart with another chunk size: chunks of another count
    than its manifest says are dropped by the receiver)."""
    if max(1, -(-ref.size // preferred)) == ref.chunks:
        return preferred
    return max(MIN_CHUNK_BYTES, -(-ref.size // ref.chunks))


def check_ref(ref: BlobRef, max_bytes: int) -> str | None:
    """Why a receiver must refuse to collect the announced blob (before keeping any state), or None."""
    if ref.size > max_bytes:
        return f"blob of {ref.size} bytes exceeds the limit of {max_bytes} for this transfer"
    most = max(1, -(-ref.size // MIN_CHUNK_BYTES))
    if ref.chunks > most:
        return f"{ref.chunks} chunks for {ref.size} bytes (chunks must hold >= {MIN_CHUNK_BYTES} bytes)"
    return None


def parse_chunk(payload: bytes) -> tuple[ChunkHeader, memoryview]:
    """Split a chunk message into its validated header and its data (hash checked)."""
    view = memoryview(payload)
    if len(view) < 8 or bytes(view[:4]) != MAGIC:
        raise ChunkError("not a chunk message (bad magic)")
    (head_len,) = _LEN.unpack(view[4:8])
    if head_len > MAX_HEADER_BYTES or 8 + head_len > len(view):
        raise ChunkError(f"bad chunk header length {head_len}")
    try:
        header = ChunkHeader.model_validate(untrusted_json(bytes(view[8 : 8 + head_len])), strict=True)
    except (ValueError, ValidationError) as err:
        raise ChunkError(f"bad chunk header: {str(err).splitlines()[0]}") from None
    if header.index >= header.count:
        raise ChunkError(f"chunk index {header.index} out of range (count {header.count})")
    if header.count != max(1, -(-header.blob_size // header.chunk_size)):
        raise ChunkError("chunk count does not match blob and chunk sizes")
    data = view[8 + head_len :]
    if len(data) != header.expected_length():
        raise ChunkError(f"chunk {header.index} has {len(data)} bytes, expected {header.expected_length()}")
    if sha256_hex(data) != header.sha256:
        raise ChunkError(f"chunk {header.index} of blob {header.blob_id} fails its sha256")
    return header, data


class Reassembler:
    """Collects the chunks of one blob."""

    def __init__(
        self,
        first: ChunkHeader,
        max_bytes: int = 1 << 30,
        spool_bytes: int = 64 << 20,
        spool_dir: Path | None = None,
    ) -> None:
        if first.blob_size > max_bytes:
            raise ChunkError(
                f"blob {first.blob_id} of {first.blob_size} bytes exceeds the limit of {max_bytes}"
            )
        self.header = first
        self.received = bytearray(first.count)  # 0/1 per chunk
        self.done = 0
        self.bytes_received = 0
        self.last_progress = time.monotonic()
        self._file = None
        if first.blob_size > spool_bytes:
            self._file = tempfile.TemporaryFile(dir=spool_dir)  # noqa: SIM115 (lives as long as self)
            self._file.truncate(first.blob_size)
        self._buffer = bytearray(0 if self._file is not None else first.blob_size)

    @property
    def complete(self) -> bool:
        return self.done == self.header.count

    def add(self, header: ChunkHeader, data: memoryview) -> bool:
        """Store a chunk; returns False for a duplicate. Raises ChunkError if it is not of this blob."""
        h = self.header
        if (header.blob_id, header.count, header.chunk_size, header.blob_size, header.blob_sha256) != (
            h.blob_id,
            h.count,
            h.chunk_size,
            h.blob_size,
            h.blob_sha256,
        ):
            raise ChunkError(f"chunk {header.index} disagrees with blob {h.blob_id}'s size, count or hash")
        if self.received[header.index]:
            return False
        start = header.index * h.chunk_size
        if self._file is not None:
            os.pwrite(self._file.fileno(), data, start)
        else:
            self._buffer[start : start + len(data)] = data
        self.received[header.index] = 1
        self.done += 1
        self.bytes_received += len(data)
        self.last_progress = time.monotonic()
        return True

    def missing(self) -> list[int]:
        return [i for i, got in enumerate(self.received) if not got]

    def idle_seconds(self) -> float:
        return time.monotonic() - self.last_progress

    def result(self) -> bytes:
        """The whole blob, after checking its sha256 (ChunkError if it does not match)."""
        if not self.complete:
            raise ChunkError(f"blob {self.header.blob_id} is missing chunks {self.missing()[:10]}")
        if self._file is not None:
            self._file.seek(0)
            data = self._file.read()
        else:
            data = bytes(self._buffer)
        if sha256_hex(data) != self.header.blob_sha256:
            raise ChunkError(f"blob {self.header.blob_id} fails its sha256")
        return data

    def close(self) -> None:
        self._buffer = bytearray()
        if self._file is not None:
            self._file.close()


class ForeignChunk(ChunkError):
    """A chunk whose header disagrees with the announced blob: drop it, the transfer goes on."""


class InboundBlob:
    """One announced blob being received: `ref` (from a signed manifest or announcement) checks every
    chunk, a `Reassembler` (started by the first chunk that agrees) collects them. A `ref` that
    `check_ref` refuses raises ChunkError here."""

    def __init__(
        self,
        ref: BlobRef,
        max_bytes: int = 1 << 30,
        spool_bytes: int = 64 << 20,
        spool_dir: Path | None = None,
    ) -> None:
        if why := check_ref(ref, max_bytes):  # before anything sized by the announcement is kept
            raise ChunkError(why)
        self.ref = ref
        self._limits = (max_bytes, spool_bytes, spool_dir)
        self._parts: Reassembler | None = None
        self._announced = time.monotonic()

    def add(self, header: ChunkHeader, data: memoryview) -> bool:
        """Store a chunk of the blob; False for a duplicate. ForeignChunk when its header is not the
        announced blob's; ChunkError when it is but cannot be kept (over the size limit)."""
        ref = self.ref
        if (header.blob_id, header.blob_size, header.blob_sha256, header.count) != (
            ref.blob_id,
            ref.size,
            ref.sha256,
            ref.chunks,
        ):
            raise ForeignChunk(
                f"chunk {header.index} of blob {ref.blob_id} has another size, sha256 or count"
            )
        if self._parts is not None and header.chunk_size != self._parts.header.chunk_size:
            # the announced blob, cut at another chunk size (a sender restarted with other settings):
            # the newest cut wins, and the sha256 of the whole blob still decides at the end
            self._parts.close()
            self._parts = None
        if self._parts is None:
            self._parts = Reassembler(header, *self._limits)
        return self._parts.add(header, data)

    @property
    def complete(self) -> bool:
        return self._parts is not None and self._parts.complete

    def missing(self) -> list[int]:
        return self._parts.missing() if self._parts is not None else list(range(self.ref.chunks))

    def received(self) -> int:
        """Chunks received so far."""
        return self._parts.done if self._parts is not None else 0

    def idle_seconds(self) -> float:
        """Since the last chunk that made progress (or the announcement, before any)."""
        return self._parts.idle_seconds() if self._parts is not None else time.monotonic() - self._announced

    def result(self) -> bytes:
        """The whole blob, its sha256 checked (ChunkError if incomplete or wrong)."""
        if self._parts is None:
            raise ChunkError(f"blob {self.ref.blob_id}: no chunk received")
        return self._parts.result()

    def close(self) -> None:
        if self._parts is not None:
            self._parts.close()

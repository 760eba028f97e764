"""Flat contiguous buffers for shared states: one float32 vector for every floating-point tensor and one
int64 vector for the integer ones (BatchNorm ``num_batches_tracked``), in a fixed key order.

Aggregation works on these buffers with in-place kernels (no per-key Python loop, no temporaries).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import numpy as np
import torch


class LayoutError(ValueError):
    """A state does not have the keys, shapes or dtypes of the layout."""


@dataclass(frozen=True)
class Entry:
    key: str
    shape: tuple[int, ...]
    is_float: bool
    offset: int
    numel: int


class FlatLayout:
    """Key order, shapes and offsets of a shared state packed into flat buffers."""

    def __init__(self, reference: Mapping[str, torch.Tensor]) -> None:
        entries, f_off, i_off = [], 0, 0
        for key, tensor in reference.items():
            n = tensor.numel()
            if tensor.dtype.is_floating_point:
                entries.append(Entry(key, tuple(tensor.shape), True, f_off, n))
                f_off += n
            else:
                entries.append(Entry(key, tuple(tensor.shape), False, i_off, n))
                i_off += n
        self.entries: list[Entry] = entries
        self.by_key = {e.key: e for e in entries}
        self.float_numel = f_off
        self.int_numel = i_off

    @property
    def keys(self) -> list[str]:
        return [e.key for e in self.entries]

    def positions(self, keys: Iterable[str]) -> torch.Tensor:
        """Indices in the float buffer of the given float keys (e.g. the BatchNorm ones)."""
        wanted = set(keys)
        parts = [
            torch.arange(e.offset, e.offset + e.numel) for e in self.entries if e.is_float and e.key in wanted
        ]
        return torch.cat(parts) if parts else torch.empty(0, dtype=torch.long)

    def check(self, state: Mapping[str, torch.Tensor], what: str = "state") -> None:
        missing = [k for k in self.by_key if k not in state]
        unexpected = [k for k in state if k not in self.by_key]
        if missing or unexpected:
            raise LayoutError(
                f"{what}: {len(missing)} keys missing {missing[:3]}, {len(unexpected)} unexpected"
            )
        for e in self.entries:
            t = state[e.key]
            if tuple(t.shape) != e.shape:
                raise LayoutError(f"{what}: {e.key} has shape {tuple(t.shape)}, expected {e.shape}")
            if t.dtype.is_floating_point != e.is_float:
                raise LayoutError(f"{what}: {e.key} has dtype {t.dtype}")

    def flatten(
        self,
        state: Mapping[str, torch.Tensor],
        out: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Pack `state` into (float32 vector, int64 vector), reusing `out` when given."""
        self.check(state)
        floats, ints = out if out is not None else self.empty()
        for e in self.entries:
            target = floats if e.is_float else ints
            target[e.offset : e.offset + e.numel].copy_(state[e.key].reshape(-1))
        return floats, ints

    def fill(
        self,
        items: Iterable[tuple[str, np.ndarray]],
        out: tuple[torch.Tensor, torch.Tensor] | None = None,
        what: str = "state",
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Pack a state that arrives tensor by tensor (e.g. `protocol.codec.iter_state`) into the flat
        buffers, holding no more than one tensor besides them; every key exactly once (LayoutError)."""
        floats, ints = out if out is not None else self.empty()
        seen: set[str] = set()
        for key, arr in items:
            e = self.by_key.get(key)
            if e is None:
                raise LayoutError(f"{what}: unexpected key {key!r}")
            if key in seen:
                raise LayoutError(f"{what}: {key} given twice")
            if tuple(arr.shape) != e.shape:
                raise LayoutError(f"{what}: {key} has shape {tuple(arr.shape)}, expected {e.shape}")
            if (arr.dtype.kind == "f") != e.is_float:
                raise LayoutError(f"{what}: {key} has dtype {arr.dtype}")
            target = floats if e.is_float else ints
            target[e.offset : e.offset + e.numel].copy_(
                torch.from_numpy(np.ascontiguousarray(arr)).reshape(-1)
            )
            seen.add(key)
        if len(seen) != len(self.entries):
            missing = [k for k in self.by_key if k not in seen]
            raise LayoutError(f"{what}: {len(missing)} keys missing {missing[:3]}")
        return floats, ints

    def empty(self) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.empty(self.float_numel, dtype=torch.float32), torch.empty(
            self.int_numel, dtype=torch.int64
        )

    def unflatten(
        self, floats: torch.Tensor, ints: torch.Tensor, like: Mapping[str, torch.Tensor] | None = None
    ) -> dict[str, torch.Tensor]:
        """Views of the flat buffers as a state dict (cast to the dtypes of `like` when given)."""
        state = {}
        for e in self.entries:
            src = floats if e.is_float else ints
            t = src[e.offset : e.offset + e.numel].view(e.shape)
            if like is not None and like[e.key].dtype != t.dtype:
                t = t.to(like[e.key].dtype)
            state[e.key] = t
        return state


def l2_norm(buffer: torch.Tensor, block: int = 1 << 20) -> float:
    """The L2 norm of a flat buffer, summed in float64 block by block: finite for any finite input
    (a float32 norm overflows to inf from |x| ~ 1e19 on), inf for NaN/Inf, no full-size temporary."""
    total = 0.0
    for start in range(0, buffer.numel(), block):
        part = buffer[start : start + block].to(torch.float64)
        total += float(torch.dot(part, part))
    return math.sqrt(total) if math.isfinite(total) else math.inf

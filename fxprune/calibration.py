"""Calibration statistics across processes: one small interface that sums over ``torch.distributed``.

Every calibration-driven criterion accumulates *sums* (of squares, of Taylor terms, of moments, token counts) over
its batches. :class:`Accumulator` holds such sums by key (float64); :meth:`Accumulator.reduce` adds them up over
all ranks of the default process group when one is initialised (``torch.distributed.is_initialized()``: gloo on
CPU, NCCL on GPUs, launched with ``torchrun``) and does nothing otherwise. Each rank feeds its own shard of the
calibration data (:func:`shard`); after the reduction every rank holds the statistics of the whole data set, so
the scores (and the pruning decisions) are the single-process ones up to the order of the float64 additions.

    acc = Accumulator()
    for batch in shard(loader):
        acc.add("site3.ss", per_position_sum_of_squares(batch))
        acc.add("site3.count", rows)
    acc.reduce()          # all_reduce(SUM) of every key at once; a no-op without a process group

Keys must be the same on every rank, in any order, with the same shapes (checked: a mismatch would silently sum
unrelated statistics); a rank with no batches adds zeros (:meth:`Accumulator.zeros`).
"""
from __future__ import annotations

import hashlib
from typing import Any, Iterable, Iterator

import numpy as np
import torch


def distributed() -> bool:
    """Whether a ``torch.distributed`` process group is initialised (statistics are then summed over ranks)."""
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def rank_and_world() -> tuple[int, int]:
    """(rank, world size) of the default process group, or (0, 1) without one."""
    if not distributed():
        return 0, 1
    return torch.distributed.get_rank(), torch.distributed.get_world_size()


def shard(data: Iterable[Any], rank: int | None = None, world: int | None = None) -> Iterator[Any]:
    """Every ``world``-th batch of ``data`` starting at ``rank`` (default: this process' rank and world size), so
    that the ranks together see each batch exactly once."""
    r, w = rank_and_world()
    rank = r if rank is None else rank
    world = w if world is None else world
    for i, batch in enumerate(data):
        if i % world == rank:
            yield batch


def _device() -> torch.device:
    """The device collectives of the default group run on (NCCL needs CUDA tensors)."""
    if torch.distributed.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


class Accumulator:
    """Named float64 sums that :meth:`reduce` adds up over the ranks of the default process group."""

    def __init__(self) -> None:
        self._sums: dict[str, np.ndarray] = {}

    def add(self, key: str, value: Any) -> None:
        """Add ``value`` (a number or an array, converted to float64) to the sum under ``key``."""
        v = np.asarray(value.detach().cpu() if isinstance(value, torch.Tensor) else value, dtype=np.float64)
        prev = self._sums.get(key)
        if prev is not None and prev.shape != v.shape:
            raise ValueError(f"calibration statistic {key!r}: shape {v.shape} added to a sum of shape {prev.shape}")
        self._sums[key] = v.copy() if prev is None else prev + v

    def zeros(self, key: str, shape: tuple[int, ...] = ()) -> None:
        """Make sure ``key`` exists (a zero sum of ``shape``) so every rank reduces the same keys."""
        if key not in self._sums:
            self._sums[key] = np.zeros(shape, dtype=np.float64)

    def get(self, key: str, default: Any = None) -> Any:
        return self._sums.get(key, default)

    def keys(self) -> list[str]:
        return sorted(self._sums)

    def reduce(self) -> "Accumulator":
        """Sum every statistic over all ranks (one ``all_reduce`` of the concatenated values, keys in sorted
        order); a no-op without a process group. Raises ValueError when the ranks' keys or shapes differ."""
        if not distributed():
            return self
        keys = self.keys()
        sig = hashlib.blake2b(repr([(k, self._sums[k].shape) for k in keys]).encode(), digest_size=8).digest()
        mine = torch.tensor([int.from_bytes(sig, "little") >> 1], dtype=torch.int64, device=_device())
        lo, hi = mine.clone(), mine.clone()
        torch.distributed.all_reduce(lo, op=torch.distributed.ReduceOp.MIN)
        torch.distributed.all_reduce(hi, op=torch.distributed.ReduceOp.MAX)
        if int(lo) != int(hi):
            raise ValueError("calibration statistics differ in keys or shapes between ranks (a rank saw other sites "
                             "or groups); every rank must trace the same model and add the same keys")
        if not keys:
            return self
        flat = torch.from_numpy(np.concatenate([self._sums[k].reshape(-1) for k in keys])).to(_device())
        torch.distributed.all_reduce(flat, op=torch.distributed.ReduceOp.SUM)
        flat = flat.cpu().numpy()
        off = 0
        for k in keys:
            n = self._sums[k].size
            self._sums[k] = flat[off:off + n].reshape(self._sums[k].shape).copy()
            off += n
        return self

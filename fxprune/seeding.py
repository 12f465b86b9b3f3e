"""One seeding function for every random choice: a run seed plus a salt string name one stream.

The stream's seed is a real hash (BLAKE2b) of the *whole* salt and the run seed, so different salts give
independent streams (``random-importance-3`` and ``random-importance-4`` differ) and the same pair is stable across
runs, processes and platforms.
"""
from __future__ import annotations

import hashlib

import numpy as np
import torch


def derive_seed(seed: int, salt: str = "") -> int:
    """A 63-bit seed from ``seed`` and ``salt``."""
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
        raise TypeError(f"seed must be an int, got {type(seed).__name__}")
    h = hashlib.blake2b(f"{int(seed)}\x00{salt}".encode(), digest_size=8).digest()
    return int.from_bytes(h, "little") & (2 ** 63 - 1)


def torch_generator(seed: int, salt: str = "") -> torch.Generator:
    """A CPU ``torch.Generator`` for the stream (``seed``, ``salt``)."""
    return torch.Generator().manual_seed(derive_seed(seed, salt))


def numpy_rng(seed: int, salt: str = "") -> np.random.Generator:
    """A numpy ``Generator`` for the stream (``seed``, ``salt``)."""
    return np.random.default_rng(derive_seed(seed, salt))

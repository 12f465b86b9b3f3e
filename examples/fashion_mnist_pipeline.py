"""Both training-time pruning pipelines on a small CNN trained on Fashion-MNIST (real data, Debian package
``dataset-fashion-mnist``).

* ``--pipeline yolov8``: sparsity-aware training (L1 on BN gammas, decaying rate) -> BN-scale pruning (50% of the
  channels of every layer) -> fine-tuning with channel-wise distillation from the dense model (trained without
  sparsity, as in the papers).
* ``--pipeline yolov4``: dynamic sparse training (variable rate) -> group channel pruning (per-partition
  quantiles, partitions found automatically) -> fine-tuning with spatial attention distillation.

    .venv/bin/python examples/fashion_mnist_pipeline.py --pipeline yolov8
    .venv/bin/python examples/fashion_mnist_pipeline.py --pipeline yolov4 --train-limit 6000   # quicker

``benchmarks/training_pruning.py`` runs the comparison (dense, with/without sparse training, CWD/SAD/plain
fine-tune) with the pieces defined here.
"""
from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import fxprune  # noqa: E402
from fxprune.data import fashion_mnist, loader  # noqa: E402
from fxprune.distill import ChannelWiseLoss, SpatialAttentionLoss  # noqa: E402
from fxprune.train import SparsityRegularizer, accuracy, fit  # noqa: E402


def cbr(cin: int, cout: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU())


class SmallCNN(nn.Module):
    """~100k parameters, ~5.5M MACs: 28x28 -> 14x14 -> 7x7, one residual block, global pooling, linear classifier."""

    def __init__(self, width: int = 16, classes: int = 10):
        super().__init__()
        w = width
        self.stem = cbr(1, w)
        self.stage1 = cbr(w, 2 * w, 2)
        self.stage2 = cbr(2 * w, 4 * w, 2)
        self.block = nn.Sequential(cbr(4 * w, 4 * w), nn.Conv2d(4 * w, 4 * w, 3, 1, 1, bias=False),
                                   nn.BatchNorm2d(4 * w))
        self.fc = nn.Linear(4 * w, classes)

    def forward(self, x):
        x = self.stage2(self.stage1(self.stem(x)))
        x = F.relu(x + self.block(x))
        return self.fc(x.mean((2, 3)))


TAPS = ["stage1", "stage2", "relu_4"]  # two module outputs and the node after the residual add
ce = nn.CrossEntropyLoss()


def data(train_limit: int | None = None, test_limit: int | None = None, batch: int = 128, seed: int = 0):
    xtr, ytr = fashion_mnist("train", train_limit)
    xte, yte = fashion_mnist("test", test_limit)
    return loader(xtr, ytr, batch, True, seed), loader(xte, yte, 512, False, seed)


def graph_view(model: nn.Module, example: torch.Tensor) -> Any:
    """``fxprune.trace`` without copying: a GraphModule sharing the model's parameters. It gives the regularizer
    its groups, and of the dense model it is the (frozen) distillation teacher."""
    return fxprune.trace(model, (example,), copy_model=False)


def optimizer(params, opt: str, lr: float) -> torch.optim.Optimizer:
    """SGD with Nesterov momentum (what the pruning papers train with: an L1 term added to the gradient moves
    gammas by ``lr * s`` per step) or Adam (which rescales the L1 term with the task gradient: sparse training then
    needs many more steps)."""
    params = [p for p in params if p.requires_grad]
    if opt == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=0.9, nesterov=True)
    return torch.optim.Adam(params, lr=lr)


def train_model(model: nn.Module, train, epochs: int, *, sparse: str | None = None, s: float = 1e-3,
                lr: float = 0.1, opt: str = "sgd", seed: int = 0, view: Any = None,
                example: torch.Tensor | None = None) -> dict[str, Any]:
    """Plain training, or sparse training with the ``"decay"`` (YOLOv8) / ``"variable"`` (YOLOv4) schedule."""
    reg = None
    if sparse is not None:
        target = view if view is not None else model
        reg = SparsityRegularizer(target, module=model, example_inputs=(example,), s=s, schedule=sparse,
                                  epochs=epochs)
    hist = fit(model, train, ce, epochs=epochs, optimizer=optimizer(model.parameters(), opt, lr), regularizer=reg,
               seed=seed)
    if reg is not None:
        reg.detach()
        hist["gammas"] = reg.summary()
    return hist


def prune(model: nn.Module, example: torch.Tensor, method: str, ratio: float = 0.5, seed: int = 0,
          quantiles: Any = 0.5) -> Any:
    from fxprune.passes import ChannelPrune, Shrink
    from fxprune.passes.bn_absorb import AbsorbBNShift
    from fxprune.passes.bn_prune import BNScalePrune, GroupChannelPrune

    if method == "magnitude":
        passes = [ChannelPrune(ratio=ratio, importance="l2"), Shrink()]
    elif method == "bn_scale":
        passes = [BNScalePrune(ratio, scope="layer"), AbsorbBNShift(), Shrink()]
    elif method == "bn_scale_global":
        passes = [BNScalePrune(ratio, scope="global"), AbsorbBNShift(), Shrink()]
    elif method == "group":
        passes = [GroupChannelPrune("auto", quantiles, min_channels=4), AbsorbBNShift(), Shrink()]
    else:
        raise ValueError(method)
    return fxprune.compile(model, (example,), passes=passes, seed=seed)


def finetune(teacher: nn.Module, student: nn.Module, train, epochs: int, *, distill: str | None = None,
             lr: float = 0.01, opt: str = "sgd", seed: int = 0, tau: float = 4.0, cwd_weight: float = 1.0,
             sad_beta: float = 100.0, example: torch.Tensor | None = None, taps: list[str] = TAPS) -> dict:
    d = None
    if distill == "cwd":
        d = ChannelWiseLoss(teacher, student, taps=taps, tau=tau, weight=cwd_weight,
                            example_inputs=(example,) if example is not None else None, seed=seed)
    elif distill == "sad":
        d = SpatialAttentionLoss(teacher, student, taps=taps, betas=sad_beta)
    params = list(student.parameters()) + (list(d.parameters()) if d is not None else [])
    return fit(student, train, ce, epochs=epochs, optimizer=optimizer(params, opt, lr), distiller=d, seed=seed)


def run(pipeline: str = "yolov8", *, train_limit: int | None = None, test_limit: int | None = None,
        epochs: int = 2, ft_epochs: int = 1, seed: int = 0, log=print) -> dict[str, Any]:
    torch.manual_seed(seed)
    train, test = data(train_limit, test_limit, seed=seed)
    example = next(iter(test))[0][:2]
    init = SmallCNN()
    t0 = time.perf_counter()
    # the papers' recipe (benchmarks/training_pruning.py measures it): SGD with momentum, the L1 rate s = 1e-3, and
    # the dense model trained without sparsity as the distillation teacher
    dense = copy.deepcopy(init)
    train_model(dense, train, epochs, seed=seed)
    acc_dense = accuracy(dense, test)
    log(f"[{pipeline}] dense teacher: acc {acc_dense:.4f}")
    teacher = graph_view(dense, example)  # frozen from here on
    model = copy.deepcopy(init)
    sched = "decay" if pipeline == "yolov8" else "variable"
    view = graph_view(model, example)
    hist = train_model(model, train, epochs, sparse=sched, s=1e-3, seed=seed, view=view)
    acc_sparse = accuracy(model, test)
    log(f"[{pipeline}] sparse-trained: acc {acc_sparse:.4f}, gammas {hist['gammas']}")
    if pipeline == "yolov8":
        out = prune(model, example, "bn_scale", 0.5, seed)
    else:
        out = prune(model, example, "group", seed=seed, quantiles={"s1/*": 0.3, "s2/*": 0.5, "s4/*": 0.6})
    acc_pruned = accuracy(out.module, test)
    log(f"[{pipeline}] pruned: MACs {out.report.macs_before:,} -> {out.report.macs_after:,}, acc {acc_pruned:.4f}")
    finetune(teacher, out.module, train, ft_epochs, distill="cwd" if pipeline == "yolov8" else "sad", seed=seed)
    acc_final = accuracy(out.module, test)
    log(f"[{pipeline}] after distillation fine-tune: acc {acc_final:.4f} ({time.perf_counter() - t0:.1f} s)")
    res = {"pipeline": pipeline, "acc_dense": acc_dense, "acc_sparse": acc_sparse, "acc_pruned": acc_pruned, "acc_final": acc_final,
           "macs_before": out.report.macs_before, "macs_after": out.report.macs_after,
           "params_before": out.report.params_before, "params_after": out.report.params_after,
           "verified": out.report.verified, "module": out.module, "report": out.report}
    if pipeline == "yolov4":
        res["partitions"] = next(h["stats"]["partitions"] for h in out.report.passes
                                 if h["pass"] == "group_channel_prune")
    return res


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pipeline", choices=("yolov8", "yolov4"), default="yolov8")
    ap.add_argument("--train-limit", type=int, default=None)
    ap.add_argument("--test-limit", type=int, default=None)
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--ft-epochs", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args(argv)
    torch.set_num_threads(1)
    res = run(a.pipeline, train_limit=a.train_limit, test_limit=a.test_limit, epochs=a.epochs,
              ft_epochs=a.ft_epochs, seed=a.seed)
    res.pop("module")
    print(res.pop("report").table())
    print(json.dumps(res, indent=1, default=str))


if __name__ == "__main__":
    main()

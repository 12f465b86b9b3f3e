"""Search- and initialization-based pruning (issue 15): PAGCP, PreCrop and TAS against their simplest strong baseline
at the same budget, >= 3 seeds, mean +- sd. CPU only, one thread, small models and Fashion-MNIST subsets so that
each part runs in about 15 minutes on one busy core (the numbers are for these budgets, not the papers' settings).

    .venv/bin/python benchmarks/search_init.py pagcp-multitask   # -> results/pagcp_multitask.json
    .venv/bin/python benchmarks/search_init.py pagcp-yolo        # -> results/pagcp_yolo.json
    .venv/bin/python benchmarks/search_init.py pagcp-oracle      # -> results/pagcp_oracle.json
    .venv/bin/python benchmarks/search_init.py precrop           # -> results/precrop.json
    .venv/bin/python benchmarks/search_init.py tas               # -> results/tas.json
    (--seeds 0 1 2, --quick for a smoke run that writes *_quick.json)

* pagcp-multitask: the multitask CNN (``fxprune.models`` "multitask", tiny: width 16) on Fashion-MNIST padded to
  32x32: classification (10 classes) + regression of the garment's bounding box computed from the pixels. Dense
  training, then PAGCP (authors' defaults) vs global L1 channel pruning (``ChannelPrune(target_macs=<PAGCP's>,
  importance="l1", scope="global")``) at equal MACs, each fine-tuned with the same budget; per-task test losses,
  worst-task relative degradation before and after fine-tuning, PAGCP's calibration-oracle cost.
* pagcp-yolo: the YOLOv8-style detector (``fxprune.models`` "yolov8" tiny) on the synthetic shapes data of
  ``examples/yolov8_pipeline.py``; tasks: box (DFL + L1 at positives) and class (BCE) losses. Same comparison.
* precrop: ResNet-14 (CIFAR ResNet, 2 blocks per stage, width 12) trained from scratch at 30% of the parameters:
  PreCrop (SynFlow densities -> channel ratios; and the convex allocation) vs the dense network, vs SynFlow's own
  sparse mask at the same parameter count (masked training), vs uniform width scaling (every group the same ratio,
  ``PreCrop(0.3, allocation="uniform")``: one ratio for every group fitted to the budget, re-initialised). Test
  accuracy and CPU seconds per training step.
* tas: ResNet-56 (9 blocks per stage, width 8: the ResNet-56 topology at half width) on Fashion-MNIST downsampled to
  14x14: dense teacher; TAS search at 50% of the MACs, materialised (arg-max), KD fine-tune; vs uniform L1 pruning of
  the teacher at the same MACs (``ChannelPrune(target_macs=<TAS's>, scope="local")``) with the same KD budget.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "examples"))

import fxprune  # noqa: E402
from fxprune.data import fashion_mnist, loader  # noqa: E402
from fxprune.flops import count_macs, count_params  # noqa: E402
from fxprune.passes import ChannelPrune, PAGCP, PreCrop, Shrink, TASearch, TASTrainer  # noqa: E402
from fxprune.passes.pagcp import PAGCPRecord  # noqa: E402
from fxprune.passes.precrop import PreCropRecord, prunable_weights, synflow_masks  # noqa: E402
from fxprune.passes.tas import kd_finetune, materialize  # noqa: E402
from fxprune.train import accuracy, fit, train_mode  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"


def ms(values: list[float], nd: int = 4) -> dict[str, float]:
    vals = [float(v) for v in values]
    sd = statistics.stdev(vals) if len(vals) > 1 else 0.0
    return {"mean": round(statistics.fmean(vals), nd), "sd": round(sd, nd), "n": len(vals)}


def machine() -> dict[str, Any]:
    return {"python": platform.python_version(), "torch": torch.__version__, "threads": torch.get_num_threads(),
            "cpus": os.cpu_count(), "loadavg_at_start": [round(x, 2) for x in os.getloadavg()]}


def write(name: str, payload: dict) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / name
    path.write_text(json.dumps(payload, indent=1, default=str))
    print(f"wrote {path}")
    return path


# ------------------------------------------------------------------------------------------------- data helpers
BG = (0.0 - 0.2860) / 0.3530  # a black pixel after fashion_mnist's normalisation


def to3(x: torch.Tensor, size: int = 32) -> torch.Tensor:
    """(N, 1, 28, 28) -> (N, 3, size, size): padded with the background value, channels repeated."""
    p = (size - x.shape[-1]) // 2
    return F.pad(x, (p, p, p, p), value=BG).repeat(1, 3, 1, 1)


def boxes(x: torch.Tensor) -> torch.Tensor:
    """The garment's bounding box (x1, y1, x2, y2) from the pixels (> 10% grey), in units of 7 pixels (0..4)."""
    raw = x[:, 0] * 0.3530 + 0.2860
    on = raw > 0.1
    out = torch.zeros(x.shape[0], 4)
    idx = torch.arange(x.shape[-1], dtype=torch.float32)
    for i in range(x.shape[0]):
        cols, rows = on[i].any(0), on[i].any(1)
        if cols.any():
            c, r = idx[cols], idx[rows]
            out[i] = torch.stack([c.min(), r.min(), c.max() + 1, r.max() + 1]) / 7.0
    return out


class Batches:
    """Seeded shuffled batches over tensors whose targets are a tuple of tensors."""

    def __init__(self, x: torch.Tensor, ys: tuple[torch.Tensor, ...], bs: int, seed: int, shuffle: bool = True):
        self.x, self.ys, self.bs, self.shuffle = x, ys, bs, shuffle
        self.g = torch.Generator().manual_seed(seed)

    def __iter__(self):
        n = self.x.shape[0]
        idx = torch.randperm(n, generator=self.g) if self.shuffle else torch.arange(n)
        for k in range(0, n, self.bs):
            j = idx[k:k + self.bs]
            yield self.x[j], tuple(y[j] for y in self.ys)

    def __len__(self):
        return math.ceil(self.x.shape[0] / self.bs)


@torch.no_grad()
def task_losses(model: nn.Module, data, tasks: dict[str, Callable]) -> dict[str, float]:
    was = model.training
    for m in model.modules():
        m.training = False
    tot = {k: 0.0 for k in tasks}
    n = 0
    for x, y in data:
        out = model(x)
        b = x.shape[0]
        for k, fn in tasks.items():
            tot[k] += float(fn(out, y)) * b
        n += b
    for m in model.modules():
        m.training = was
    return {k: v / n for k, v in tot.items()}


def degradation(after: dict[str, float], dense: dict[str, float]) -> dict[str, float]:
    rel = {k: after[k] / dense[k] - 1 for k in dense}
    rel["worst"] = max(rel.values())
    return rel


# ---------------------------------------------------------------------------------------------------- PAGCP
#: PAGCP settings: the authors' defaults (T = 6: the product of all per-group loss tolerances) and a looser first
#: tolerance (t_1 = 0.25), for small networks where removing one channel already costs more than 6% of a task loss
SETTINGS = {"defaults": {}, "loose": {"initial_rate": 0.25, "initial_thres": 6.0}}
SETTINGS_TEXT = {"defaults": "authors' defaults: initial_rate 0.06, initial_thres 6, topk 0.8, 1 round",
                 "loose": "initial_rate 0.25, initial_thres 6, topk 0.8, 1 round"}
BASELINE_TEXT = "ChannelPrune(target_macs=PAGCP's MACs (absolute), importance='l1', scope='global', max_ratio=0.99)"
MT_TASKS = {"cls": lambda o, y: F.cross_entropy(o[0], y[0]), "box": lambda o, y: F.mse_loss(o[1], y[1])}


def pagcp_compare(model: nn.Module, ex: tuple, tasks: dict, calib, train, test, *, ft_epochs: int, lr: float,
                  seed: int, max_steps: int | None, pagcp_kw: dict, classify: bool = False) -> dict[str, Any]:
    """Dense test losses; PAGCP; global L1 at PAGCP's MACs; both fine-tuned with the same budget."""
    loss_sum = lambda out, y: sum(fn(out, y) for fn in tasks.values())  # noqa: E731
    dense = task_losses(model, test, tasks)
    t0 = time.perf_counter()
    pg = fxprune.compile(model, ex, passes=[PAGCP(tasks, calib, **pagcp_kw), Shrink()], seed=seed)
    t_pagcp = time.perf_counter() - t0
    rec = pg.program.records_of(PAGCPRecord)[0]
    st = pg.report.passes[0]["stats"]
    frac = pg.report.macs_after / pg.report.macs_before
    # the same MACs as an absolute count (a fraction of 1.0 would read as "1 MAC")
    l1 = fxprune.compile(model, ex, passes=[ChannelPrune(target_macs=float(max(pg.report.macs_after, 1)),
                                                         importance="l1", scope="global", max_ratio=0.99),
                                            Shrink()], seed=seed)
    row: dict[str, Any] = {"dense": dense, "macs_dense": pg.report.macs_before,
                           "pagcp": {"macs": pg.report.macs_after, "macs_frac": round(frac, 4),
                                     "params": pg.report.params_after, "verified": pg.report.verified,
                                     "seconds": round(t_pagcp, 2), "calib_seconds": st["calib_seconds"],
                                     "calib_forwards": st["calib_forwards"], "calib_candidates": st["calib_candidates"],
                                     "calib_fraction": st["calib_fraction"],
                                     "groups_pruned": st["groups_pruned"], "lambda": rec.rounds[0].lam,
                                     "groups_considered": len(rec.rounds[0].decisions)},
                           "l1_global": {"macs": l1.report.macs_after, "macs_frac": round(
                               l1.report.macs_after / l1.report.macs_before, 4), "params": l1.report.params_after,
                               "verified": l1.report.verified}}
    for key, out in (("pagcp", pg), ("l1_global", l1)):
        before = task_losses(out.module, test, tasks)
        fit(out.module, train, loss_sum, epochs=ft_epochs, lr=lr, seed=seed, max_steps=max_steps)
        after = task_losses(out.module, test, tasks)
        row[key].update({"before_ft": before, "after_ft": after, "degradation_before_ft": degradation(before, dense),
                         "degradation_after_ft": degradation(after, dense)})
        if classify:
            row[key]["acc_after_ft"] = round(accuracy(out.module, ((x, y[0]) for x, y in test)), 4)
    if classify:
        row["dense_acc"] = round(accuracy(model, ((x, y[0]) for x, y in test)), 4)
    return row


def summarize_pagcp(rows: list[dict]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key in ("pagcp", "l1_global"):
        out[key] = {"macs_frac": ms([r[key]["macs_frac"] for r in rows])}
        for phase in ("degradation_before_ft", "degradation_after_ft"):
            out[key][phase] = {t: ms([r[key][phase][t] for r in rows]) for t in rows[0][key][phase]}
        if "acc_after_ft" in rows[0][key]:
            out[key]["acc_after_ft"] = ms([r[key]["acc_after_ft"] for r in rows])
    out["pagcp"]["calib_seconds"] = ms([r["pagcp"]["calib_seconds"] for r in rows], 2)
    out["pagcp"]["calib_fraction"] = ms([r["pagcp"]["calib_fraction"] for r in rows], 3)
    out["pagcp"]["calib_forwards"] = ms([r["pagcp"]["calib_forwards"] for r in rows], 1)
    if "dense_acc" in rows[0]:
        out["dense_acc"] = ms([r["dense_acc"] for r in rows])
    return out


def run_pagcp_multitask(seeds: list[int], quick: bool) -> None:
    from fxprune import models

    n_train, n_test, n_calib = (600, 300, 128) if quick else (6000, 2000, 256)
    epochs, ft_epochs = (1, 1) if quick else (6, 1)
    xtr, ytr = fashion_mnist("train", n_train + n_calib)
    xte, yte = fashion_mnist("test", n_test)
    btr, bte = boxes(xtr), boxes(xte)
    xtr3, xte3 = to3(xtr), to3(xte)
    rows = []
    t_all = time.perf_counter()
    for seed in seeds:
        torch.manual_seed(seed)
        model = models.multitask.build("tiny", seed=seed)
        train = Batches(xtr3[:n_train], (ytr[:n_train], btr[:n_train]), 64, seed)
        calib = list(Batches(xtr3[n_train:], (ytr[n_train:], btr[n_train:]), 128, seed, shuffle=False))
        test = list(Batches(xte3, (yte, bte), 250, seed, shuffle=False))
        t0 = time.perf_counter()
        fit(model, train, lambda o, y: sum(fn(o, y) for fn in MT_TASKS.values()), epochs=epochs, lr=2e-3, seed=seed)
        model.eval()
        t_train = time.perf_counter() - t0
        for setting, kw in SETTINGS.items():
            row = pagcp_compare(model, (xtr3[:2],), MT_TASKS, calib, train, test, ft_epochs=ft_epochs, lr=1e-3,
                                seed=seed, max_steps=None, pagcp_kw=kw, classify=True)
            row.update({"seed": seed, "setting": setting, "train_seconds": round(t_train, 1)})
            rows.append(row)
            print(json.dumps({k: row[k] for k in ("seed", "setting", "dense")}), "pagcp", row["pagcp"]["macs_frac"],
                  row["pagcp"]["degradation_after_ft"], "l1", row["l1_global"]["degradation_after_ft"], flush=True)
    write("pagcp_multitask_quick.json" if quick else "pagcp_multitask.json", {
        "benchmark": "PAGCP vs global L1 at equal MACs, multitask CNN on Fashion-MNIST (class + garment box)",
        "settings": {"model": "fxprune.models multitask tiny (width 16), input 3x32x32 (padded, repeated)",
                     "train": n_train, "calib": n_calib, "test": n_test, "dense_epochs": epochs,
                     "ft_epochs": ft_epochs, "pagcp": SETTINGS_TEXT,
                     "baseline": BASELINE_TEXT,
                     "degradation": "test loss / dense test loss - 1 per task; worst = max over tasks",
                     "seeds": seeds},
        "machine": machine(), "seconds": round(time.perf_counter() - t_all, 1),
        "summary": {k: summarize_pagcp([r for r in rows if r["setting"] == k]) for k in SETTINGS}, "rows": rows})


def run_pagcp_yolo(seeds: list[int], quick: bool) -> None:
    import yolov8_pipeline as yp

    n_train, n_val, n_calib = (64, 32, 32) if quick else (384, 192, 96)
    epochs, ft_epochs = (1, 1) if quick else (4, 1)
    rows = []
    t_all = time.perf_counter()
    for seed in seeds:
        torch.manual_seed(seed)
        model, spec, source = yp.get_detector("tiny", seed=seed)
        train, val = yp.make_data(spec, n_train, n_val, 32, seed)
        xc, bc = yp.synthetic_detection(n_calib, spec.image_size, seed=seed + 500)
        calib = list(yp.DetectionData(xc, yp.build_targets(bc, spec), 48, False, seed))
        test = list(val)

        def box_loss(outs, targets, spec=spec):
            npos = max(sum(int(t["pos"].sum()) for t in targets), 1)
            total = outs[0].new_zeros(())
            for o, t in zip(outs, targets):
                box, _ = yp._split(o, spec)
                pos = t["pos"]
                if pos.any():
                    logits, ltrb = yp._expected_ltrb(box, spec.reg_max)
                    tgt = t["ltrb"]
                    lo = tgt.floor().long()
                    wr = tgt - lo
                    lg = logits.permute(0, 3, 4, 1, 2)[pos]
                    lo_p, wr_p = lo.permute(0, 2, 3, 1)[pos], wr.permute(0, 2, 3, 1)[pos]
                    logp = lg.log_softmax(-1)
                    dfl = -(logp.gather(-1, lo_p[..., None]).squeeze(-1) * (1 - wr_p)
                            + logp.gather(-1, (lo_p + 1).clamp(max=spec.reg_max - 1)[..., None]).squeeze(-1) * wr_p)
                    l1 = (ltrb.permute(0, 2, 3, 1)[pos] - tgt.permute(0, 2, 3, 1)[pos]).abs()
                    total = total + dfl.sum() + l1.sum()
            return total / npos

        def cls_loss(outs, targets, spec=spec):
            npos = max(sum(int(t["pos"].sum()) for t in targets), 1)
            return sum(F.binary_cross_entropy_with_logits(yp._split(o, spec)[1], t["cls"], reduction="sum")
                       for o, t in zip(outs, targets)) / npos

        tasks = {"box": box_loss, "cls": cls_loss}
        t0 = time.perf_counter()
        fit(model, train, lambda o, t: yp.detection_loss(o, t, spec), epochs=epochs, lr=2e-3, seed=seed)
        model.eval()
        t_train = time.perf_counter() - t0
        dense_metrics = yp.evaluate(model, val, spec)
        for setting, kw in SETTINGS.items():
            row = pagcp_compare(model, (xc[:2],), tasks, calib, train, test, ft_epochs=ft_epochs, lr=1e-3,
                                seed=seed, max_steps=None, pagcp_kw=kw)
            row.update({"seed": seed, "setting": setting, "train_seconds": round(t_train, 1), "detector": source,
                        "dense_metrics": dense_metrics})
            rows.append(row)
            print(json.dumps({k: row[k] for k in ("seed", "setting", "dense")}), "pagcp", row["pagcp"]["macs_frac"],
                  row["pagcp"]["degradation_after_ft"], "l1", row["l1_global"]["degradation_after_ft"], flush=True)
    write("pagcp_yolo_quick.json" if quick else "pagcp_yolo.json", {
        "benchmark": "PAGCP vs global L1 at equal MACs, YOLOv8-style detector on synthetic shapes (box + class)",
        "settings": {"model": "fxprune.models yolov8 tiny (nc 4, 64x64) via examples/yolov8_pipeline.get_detector",
                     "train": n_train, "calib": n_calib, "val": n_val, "dense_epochs": epochs,
                     "ft_epochs": ft_epochs, "pagcp": SETTINGS_TEXT,
                     "baseline": BASELINE_TEXT,
                     "seeds": seeds},
        "machine": machine(), "seconds": round(time.perf_counter() - t_all, 1),
        "summary": {k: summarize_pagcp([r for r in rows if r["setting"] == k]) for k in SETTINGS}, "rows": rows})


def run_pagcp_oracle(seeds: list[int], quick: bool) -> None:
    """The calibration oracle's cost (the slow part of PAGCP): one candidate per forward (``stack=1``) vs four
    candidates stacked in the batch (``stack=4``), and the calibration chunk size, on the trained multitask CNN."""
    from fxprune import models

    n_train, n_calib = (300, 64) if quick else (2000, 256)
    xtr, ytr = fashion_mnist("train", n_train + n_calib)
    btr, xtr3 = boxes(xtr), to3(xtr)
    rows = []
    for seed in seeds:
        model = models.multitask.build("tiny", seed=seed)
        fit(model, Batches(xtr3[:n_train], (ytr[:n_train], btr[:n_train]), 64, seed),
            lambda o, y: sum(fn(o, y) for fn in MT_TASKS.values()), epochs=1, lr=2e-3, seed=seed)
        model.eval()
        calib = list(Batches(xtr3[n_train:], (ytr[n_train:], btr[n_train:]), 64, seed, shuffle=False))
        for stack, chunk in ((1, 256), (1, 64), (4, 256)):
            t0 = time.perf_counter()
            out = fxprune.compile(model, (xtr3[:2],), passes=[PAGCP(MT_TASKS, calib, initial_rate=0.25, stack=stack,
                                                                    calib_batch=chunk)], seed=seed)
            st = out.report.passes[0]["stats"]
            row = {"seed": seed, "stack": stack, "calib_batch": chunk,
                   "pass_seconds": round(time.perf_counter() - t0, 2),
                   "calib_seconds": st["calib_seconds"], "calib_forwards": st["calib_forwards"],
                   "calib_candidates": st["calib_candidates"], "calib_fraction": st["calib_fraction"],
                   "seconds_per_candidate": round(st["calib_seconds"] / max(st["calib_candidates"], 1), 4),
                   "macs_estimate": st["macs_estimate"]}
            rows.append(row)
            print(row, flush=True)
    variants = sorted({(r["stack"], r["calib_batch"]) for r in rows})
    summary = {f"stack{a}_chunk{b}": {k: ms([r[k] for r in rows if (r["stack"], r["calib_batch"]) == (a, b)], 4)
                                      for k in ("calib_seconds", "seconds_per_candidate", "calib_fraction",
                                                "calib_forwards")} for a, b in variants}
    same = all(len({r["macs_estimate"] for r in rows if r["seed"] == sd}) == 1 for sd in seeds)
    write("pagcp_oracle_quick.json" if quick else "pagcp_oracle.json", {
        "benchmark": "PAGCP calibration oracle cost: candidates per forward and calibration chunk size",
        "settings": {"model": "multitask tiny, 1 epoch on 2000 Fashion-MNIST images", "calib": n_calib,
                     "pagcp": "initial_rate 0.25, initial_thres 6, topk 0.8", "seeds": seeds},
        "same_selection_in_every_variant": same, "machine": machine(), "summary": summary, "rows": rows})


# --------------------------------------------------------------------------------------------------- PreCrop
def train_timed(model: nn.Module, data, *, epochs: int, lr: float, seed: int,
                masks: dict[str, torch.Tensor] | None = None) -> dict[str, float]:
    """Adam training, cosine learning rate; per-step wall time; fixed weight masks (zeroed weights stay zero:
    gradient hooks)."""
    torch.manual_seed(seed)
    params = [p for p in model.parameters() if p.requires_grad]
    handles = []
    if masks:
        named = dict(model.named_parameters())
        with torch.no_grad():
            for n, m in masks.items():
                named[n].mul_(m.to(named[n].dtype))
                handles.append(named[n].register_hook(lambda g, m=m: g * m.to(g.dtype)))
    opt = torch.optim.Adam(params, lr=lr)
    total = epochs * len(data)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, total)  # annealed: less end-of-training noise
    times = []
    with train_mode(model):
        for _ in range(epochs):
            for x, y in data:
                t = time.perf_counter()
                loss = F.cross_entropy(model(x), y)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
                times.append(time.perf_counter() - t)
    for h in handles:
        h.remove()
    times = times[3:] if len(times) > 6 else times  # warm-up
    return {"step_seconds": statistics.median(times), "steps": len(times)}


def run_precrop(seeds: list[int], quick: bool, density: float = 0.3) -> None:
    from fxprune.models.resnet import CifarResNet

    n_train, n_test = (512, 256) if quick else (6000, 2000)
    epochs = 1 if quick else 3
    xtr, ytr = fashion_mnist("train", n_train)
    xte, yte = fashion_mnist("test", n_test)
    xtr3, xte3 = xtr.repeat(1, 3, 1, 1), xte.repeat(1, 3, 1, 1)
    test = loader(xte3, yte, 500, shuffle=False)
    rows = []
    t_all = time.perf_counter()
    for seed in seeds:
        def fresh():
            torch.manual_seed(seed)
            return CifarResNet(n=2, width=12).eval()

        ex = (xtr3[:2],)
        dense_params = count_params(fresh())
        target = density * dense_params
        row: dict[str, Any] = {"seed": seed, "dense_params": dense_params, "target_params": round(target)}

        def run(name: str, module: nn.Module, masks=None, extra=None):
            train = loader(xtr3, ytr, 64, seed=seed)
            t = train_timed(module, train, epochs=epochs, lr=2e-3, seed=seed, masks=masks)
            acc = accuracy(module, test)
            params = count_params(module) if masks is None else int(
                sum(int(m.sum()) for m in masks.values()) + sum(p.numel() for n, p in module.named_parameters()
                                                                if n not in masks))
            row[name] = {"acc": round(acc, 4), "params": params, "params_vs_target": round(params / target - 1, 4),
                         "macs": count_macs(module, (xte3[:1],)), **t, **(extra or {})}
            print(seed, name, row[name], flush=True)

        run("dense", fresh())
        for alloc in ("ratio", "convex"):
            out = fxprune.compile(fresh(), ex, passes=[PreCrop(density, "synflow", alloc), Shrink()], seed=seed)
            rec = out.program.records_of(PreCropRecord)[0]
            run(f"precrop_{alloc}", out.module, extra={"verified": out.report.verified,
                                                      "ratios": {str(k): round(v, 3) for k, v in rec.ratios.items()}})
        # SynFlow's own sparse mask with the same number of nonzero parameters
        model = fresh()
        program = fxprune.compile(model, ex, passes=[]).program
        names = prunable_weights(program)
        prunable = sum(program.param(n).numel() for n in names)
        d = (target - (dense_params - prunable)) / prunable
        masks = synflow_masks(program.gm, program.args, names, d, 100)
        run("synflow_sparse", model, masks={n: m for n, m in masks.items()}, extra={"mask_density": round(d, 4)})
        out = fxprune.compile(fresh(), ex, passes=[PreCrop(density, allocation="uniform"), Shrink()], seed=seed)
        run("uniform_width", out.module, extra={"verified": out.report.verified})
        rows.append(row)
    keys = ["dense", "precrop_ratio", "precrop_convex", "synflow_sparse", "uniform_width"]
    summary = {k: {"acc": ms([r[k]["acc"] for r in rows]), "params_vs_target": ms([r[k]["params_vs_target"]
                                                                                   for r in rows]),
                   "step_seconds": ms([r[k]["step_seconds"] for r in rows]), "macs": rows[0][k]["macs"]}
               for k in keys}
    write("precrop_quick.json" if quick else "precrop.json", {
        "benchmark": f"PreCrop at {density:.0%} of the parameters, trained from scratch, vs dense, SynFlow's sparse "
                     "mask and uniform width at the same parameter count",
        "settings": {"model": "CIFAR ResNet-14 (2 BasicBlocks per stage, width 12), 3x28x28 Fashion-MNIST",
                     "train": n_train, "test": n_test, "epochs": epochs,
                     "optimizer": "Adam 2e-3 cosine-annealed to 0, batch 64",
                     "density": density, "synflow_iterations": 100, "seeds": seeds,
                     "step_seconds": "median wall seconds per training step (batch 64, 1 thread, shared CPU)"},
        "machine": machine(), "seconds": round(time.perf_counter() - t_all, 1), "summary": summary, "rows": rows})


# ------------------------------------------------------------------------------------------------------- TAS
def run_tas(seeds: list[int], quick: bool, target: float = 0.5) -> None:
    from fxprune.models.resnet import CifarResNet

    n_train, n_test = (256, 256) if quick else (6000, 2000)
    n_blocks = 2 if quick else 9
    teacher_epochs, search_epochs, kd_epochs = (1, 1, 1) if quick else (3, 3, 2)
    xtr, ytr = fashion_mnist("train", n_train)
    xte, yte = fashion_mnist("test", n_test)
    down = lambda x: F.avg_pool2d(x, 2).repeat(1, 3, 1, 1)  # noqa: E731  (14x14, 3 channels)
    xtr3, xte3 = down(xtr), down(xte)
    test = loader(xte3, yte, 500, shuffle=False)
    rows = []
    t_all = time.perf_counter()
    for seed in seeds:
        torch.manual_seed(seed)
        teacher = CifarResNet(n=n_blocks, width=8)
        t0 = time.perf_counter()
        fit(teacher, loader(xtr3, ytr, 64, seed=seed), lambda o, y: F.cross_entropy(o, y), epochs=teacher_epochs,
            lr=2e-3, seed=seed)
        teacher.eval()
        row: dict[str, Any] = {"seed": seed, "teacher_acc": round(accuracy(teacher, test), 4),
                               "teacher_seconds": round(time.perf_counter() - t0, 1)}
        ex = (xtr3[:2],)
        # TAS: the supernet starts from the trained teacher's weights (the per-width BNs from its BNs)
        t0 = time.perf_counter()
        sup = fxprune.compile(teacher, ex, passes=[TASearch(flops_target=target)], seed=seed)
        ctrl = sup.module.tas
        tr = TASTrainer(sup.module, lambda o, y: F.cross_entropy(o, y), lr=1e-3, arch_lr=0.02, seed=seed)
        tr.fit(loader(xtr3, ytr, 64, seed=seed), epochs=search_epochs)
        t_search = time.perf_counter() - t0
        tas = materialize(sup, seed=seed)
        dense_macs = ctrl.dense_macs
        tas_frac = count_macs(tas.module, ex) / dense_macs
        row["tas"] = {"macs_frac": round(tas_frac, 4), "target": target,
                      "within_5pct": abs(tas_frac - target) <= 0.05, "verified": tas.report.verified,
                      "params": count_params(tas.module), "search_seconds": round(t_search, 1),
                      "search_steps": len(tr.history), "settle_steps": tr.settle_steps,
                      "argmax_frac_end_of_search": round(tr.history[-1]["argmax_macs"] / dense_macs, 4),
                      "widths": {str(k): v for k, v in ctrl.argmax_widths().items()},
                      "depths": ctrl.argmax_depths(), "acc_before_kd": round(accuracy(tas.module, test), 4)}
        # uniform L1 pruning of the teacher at the same MACs
        uni = fxprune.compile(teacher, ex, passes=[ChannelPrune(target_macs=tas_frac, importance="l1",
                                                                scope="local"), Shrink()], seed=seed)
        row["uniform"] = {"macs_frac": round(count_macs(uni.module, ex) / dense_macs, 4),
                          "verified": uni.report.verified, "params": count_params(uni.module),
                          "acc_before_kd": round(accuracy(uni.module, test), 4)}
        for key, out in (("tas", tas), ("uniform", uni)):
            t0 = time.perf_counter()
            kd_finetune(out.module, teacher, loader(xtr3, ytr, 64, seed=seed + 7), epochs=kd_epochs, lr=1e-3,
                        seed=seed)
            row[key]["kd_seconds"] = round(time.perf_counter() - t0, 1)
            row[key]["acc"] = round(accuracy(out.module, test), 4)
        rows.append(row)
        print(json.dumps(row), flush=True)
    summary = {"teacher_acc": ms([r["teacher_acc"] for r in rows])}
    for key in ("tas", "uniform"):
        summary[key] = {m: ms([r[key][m] for r in rows]) for m in ("macs_frac", "acc_before_kd", "acc")}
    summary["tas"]["within_5pct"] = sum(bool(r["tas"]["within_5pct"]) for r in rows)
    summary["tas"]["settle_steps"] = ms([r["tas"]["settle_steps"] for r in rows], 1)
    summary["tas"]["search_seconds"] = ms([r["tas"]["search_seconds"] for r in rows], 1)
    write("tas_quick.json" if quick else "tas.json", {
        "benchmark": f"TAS at {target:.0%} of the MACs vs uniform L1 pruning at the same MACs, both with the same KD "
                     "fine-tune",
        "settings": {"model": f"CIFAR ResNet-{6 * n_blocks + 2} ({n_blocks} BasicBlocks per stage, width 8), "
                              "Fashion-MNIST avg-pooled to 14x14, 3 channels",
                     "train": n_train, "test": n_test, "teacher_epochs": teacher_epochs,
                     "search_epochs": search_epochs, "kd_epochs": kd_epochs,
                     "search": "TASearch(flops_target, widths 0.3..1.0, depth, tau 5 -> 0.1, lambda 2, tol 5%) "
                               "from the teacher's weights; TASTrainer weights Adam 1e-3 / arch Adam 0.02 on two "
                               "halves of the training subset, then TASTrainer.settle (architecture-only cost "
                               "steps until the arg-max is in [target - 5%, target])",
                     "kd": "alpha 0.9, T 4, Adam 1e-3", "seeds": seeds},
        "machine": machine(), "seconds": round(time.perf_counter() - t_all, 1), "summary": summary, "rows": rows})


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("part", choices=["pagcp-multitask", "pagcp-yolo", "pagcp-oracle", "precrop", "tas"])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--quick", action="store_true", help="tiny sizes, writes *_quick.json")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    {"pagcp-multitask": run_pagcp_multitask, "pagcp-yolo": run_pagcp_yolo, "pagcp-oracle": run_pagcp_oracle,
     "precrop": run_precrop,
     "tas": run_tas}[args.part](args.seeds, args.quick)


if __name__ == "__main__":
    main()

"""The ``fxprune`` command line.

    fxprune demo [--model resnet56] [--size full] [--ratio 0.5] [--out fxprune-out] [--json] [--quiet]
    fxprune passes
    fxprune report DIR

Exit codes: 0 ok, 2 bad usage, 1 failure (one-line reason; ``--debug`` shows the traceback).
"""
from __future__ import annotations

import argparse
import inspect
import json
import sys
import time
from pathlib import Path
from typing import Any, Sequence

from .errors import FxPruneError


class UsageError(Exception):
    """Bad command-line usage (exit code 2)."""


def _log(args: argparse.Namespace, msg: str) -> None:
    if not getattr(args, "quiet", False):
        print(msg, file=sys.stderr, flush=True)


def cmd_demo(args: argparse.Namespace) -> int:
    import torch

    from . import compile as fx_compile
    from . import models
    from .passes import ChannelPrune, Shrink
    from .testing import make_observable

    if args.model not in models.names():
        raise UsageError(f"unknown model {args.model!r}; choose from {', '.join(models.names())}")
    torch.manual_seed(args.seed)
    _log(args, f"[1/3] building reference model {args.model} ({args.size})")
    model, inputs = models.get(args.model, size=args.size, seed=args.seed)
    make_observable(model, seed=args.seed)  # random init: make every channel visible to the verification
    _log(args, f"[2/3] compiling: ChannelPrune(ratio={args.ratio}) -> Shrink (verified)")
    out = fx_compile(model, inputs, passes=[ChannelPrune(ratio=args.ratio), Shrink()], seed=args.seed)
    _log(args, "[3/3] measuring eager latency, dense vs pruned")
    latency = _eager_latency(model, out.module, inputs)
    out.report.latency.update(latency)
    outdir = Path(args.out)
    outdir.mkdir(parents=True, exist_ok=True)
    (outdir / "report.json").write_text(out.report.to_json(indent=1))
    (outdir / "report.txt").write_text(str(out.report) + "\n")
    if args.json:
        print(out.report.to_json(indent=1))
    else:
        print(str(out.report))
        print(f"\nfiles written to {outdir}/ (report.json, report.txt)")
    return 0 if out.report.verified else 1


def _eager_latency(dense: Any, pruned: Any, inputs: tuple, repeats: int = 10) -> dict[str, Any]:
    """Median eager latency (ms) of dense and pruned, interleaved in one run."""
    import statistics

    import torch

    times: dict[str, list[float]] = {"dense": [], "pruned": []}
    with torch.no_grad():
        for m in (dense, pruned):
            m(*inputs)  # warm-up
        for _ in range(repeats):
            for name, m in (("dense", dense), ("pruned", pruned)):
                t = time.perf_counter()
                m(*inputs)
                times[name].append((time.perf_counter() - t) * 1e3)
    d, p = statistics.median(times["dense"]), statistics.median(times["pruned"])
    return {"eager_dense_ms": round(d, 3), "eager_pruned_ms": round(p, 3), "eager_speedup": round(d / p, 3)}


def cmd_passes(args: argparse.Namespace) -> int:
    import fxprune.passes  # noqa: F401 - registers the built-in passes

    from .pass_manager import PASS_REGISTRY

    rows = []
    for name, cls in sorted(PASS_REGISTRY.items()):
        sig = inspect.signature(cls.__init__)
        opts = {p.name: (None if p.default is inspect.Parameter.empty else repr(p.default))
                for p in list(sig.parameters.values())[1:] if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)}
        doc = (inspect.getdoc(cls) or "").splitlines()[0] if inspect.getdoc(cls) else ""
        rows.append({"name": name, "class": cls.__name__, "options": opts, "doc": doc})
    if args.json:
        print(json.dumps(rows, indent=1))
        return 0
    for r in rows:
        opts = ", ".join(k if v is None else f"{k}={v}" for k, v in r["options"].items())
        print(f"{r['name']:<22} {r['class']}({opts})\n{'':<22} {r['doc']}")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    path = Path(args.dir) / "report.json"
    if not path.exists():
        raise FxPruneError(f"no report.json in {args.dir}", fix="pass the output folder of `fxprune demo/compile`")
    data = json.loads(path.read_text())
    if args.json:
        print(json.dumps(data, indent=1))
        return 0
    from .report import GroupRow, Report

    fields = {k: v for k, v in data.items() if k in Report.__dataclass_fields__}
    fields["groups"] = [GroupRow(**{k: v for k, v in g.items() if k in GroupRow.__dataclass_fields__})
                        for g in data.get("groups", [])]
    print(str(Report(**fields)))
    return 0


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="fxprune", description="A compiler for pruning neural networks.")
    ap.add_argument("--debug", action="store_true", help="show Python tracebacks on failure")
    sub = ap.add_subparsers(dest="command", required=True)
    d = sub.add_parser("demo", help="prune a reference model 50%%, shrink, verify, print a before/after table")
    d.add_argument("--model", default="resnet56")
    d.add_argument("--size", default="full", choices=["tiny", "full"])
    d.add_argument("--ratio", type=float, default=0.5)
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--out", default="fxprune-out")
    d.add_argument("--json", action="store_true")
    d.add_argument("--quiet", action="store_true")
    d.set_defaults(fn=cmd_demo)
    p = sub.add_parser("passes", help="list registered passes and their options")
    p.add_argument("--json", action="store_true")
    p.set_defaults(fn=cmd_passes)
    r = sub.add_parser("report", help="re-print a saved report")
    r.add_argument("dir")
    r.add_argument("--json", action="store_true")
    r.set_defaults(fn=cmd_report)
    return ap


def main(argv: Sequence[str] | None = None) -> int:
    ap = build_parser()
    args = ap.parse_args(argv)  # argparse exits with code 2 on bad usage
    try:
        return int(args.fn(args) or 0)
    except UsageError as e:
        print(f"fxprune: error: {e}", file=sys.stderr)
        return 2
    except Exception as e:  # one line, no traceback unless --debug
        if args.debug:
            raise
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        print(f"fxprune: {type(e).__name__}: {first}", file=sys.stderr)
        return 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())

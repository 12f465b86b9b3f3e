"""The ``fxprune`` command line (also ``python -m fxprune``).

    fxprune demo    [--model resnet56] [--size full] [--ratio 0.5] [--out fxprune-out] [--json] [--quiet]
    fxprune compile MODEL --recipe recipe.yaml [--input-shape 2,3,224,224] [--out DIR] [--weights FILE]
    fxprune report  DIR [--json]
    fxprune passes  [NAME] [--json]

MODEL: a reference model name (``fxprune.models.names()``), ``torchvision:NAME``, ``timm:NAME``, ``hf:NAME``
(a transformers model type such as ``llama``, ``gpt2``, ``bert``, built from a small config, random init) or
``path/to/file.py:factory``, resolved by :func:`fxprune.zoo.resolve`. Progress goes to stderr (``--quiet`` silences
it, ``--json`` makes it JSON lines and prints one JSON document on stdout). Exit codes: 0 ok, 2 bad usage (unknown
command/option/model, bad recipe or input shape), 1 failure (a one-line reason; ``--debug`` shows the traceback).
See docs/cli.md.
"""
from __future__ import annotations

import argparse
import contextlib
import inspect
import json
import logging
import os
import re
import sys
import warnings
from pathlib import Path
from typing import Any, Iterator, Sequence

from .errors import BackendUnavailableError, InputError, LoadError, RecipeError
from .progress import Progress

DEMO_MODEL = "resnet56"  # CIFAR ResNet-56 (0.85M params, 32x32): the whole demo takes about a minute on 2 cores


class UsageError(Exception):
    """Bad command-line usage (exit code 2)."""


# ============================================================================================ models and inputs
def parse_shape(text: str) -> list[tuple[int, ...]]:
    """``"2,3,224,224"`` -> [(2, 3, 224, 224)]; several inputs separated by ``;`` or ``:``
    (:func:`fxprune.zoo.parse_shape`; a bad shape is a usage error)."""
    from .zoo import parse_shape as parse

    try:
        return parse(text)
    except InputError as e:
        raise UsageError(str(e).replace("bad input shape", "bad --input-shape")) from None


def resolve_model(spec: str, *, size: str = "full", input_shape: str | None = None, seed: int = 0,
                  hf_config: Sequence[str] = (), hf_task: str | None = None) -> tuple[Any, tuple, str]:
    """``(model in eval mode, example inputs, label)`` for a MODEL argument: :func:`fxprune.zoo.resolve` at batch 2
    (a dynamic batch in the program and the ONNX files); an unknown name or a bad option is a usage error."""
    from . import zoo

    shapes = parse_shape(input_shape) if input_shape else None
    if (hf_config or hf_task) and not spec.startswith("hf:"):
        raise UsageError(f"--hf-config and --hf-task apply to hf: models, not {spec!r}")
    try:
        return zoo.resolve(spec, batch=2, size=size, input_shape=shapes, seed=seed, overrides=hf_config,
                           task=hf_task)
    except InputError as e:  # unknown name (with a did-you-mean), missing file or factory, bad option
        raise UsageError(str(e).replace("the input shape gives", "--input-shape gives")) from None


def _load_weights(model: Any, path: str) -> None:
    import torch

    p = Path(path)
    if not p.exists():
        raise UsageError(f"--weights {path!r} does not exist")
    if p.suffix == ".safetensors":
        try:
            from safetensors.torch import load_file
        except ImportError as e:
            raise BackendUnavailableError("reading .safetensors needs the safetensors package",
                                          fix="pip install safetensors") from e
        sd = load_file(str(p))
    else:
        try:
            sd = torch.load(p, map_location="cpu", weights_only=True)
        except Exception as e:
            raise LoadError(f"cannot read {path} with torch.load(weights_only=True): {str(e).splitlines()[0]}",
                            fix="save a plain state_dict: torch.save(model.state_dict(), path)") from e
    for key in ("state_dict", "model_state_dict", "model"):
        if isinstance(sd, dict) and isinstance(sd.get(key), dict):
            sd = sd[key]
    if not isinstance(sd, dict):
        raise LoadError(f"{path} does not hold a state_dict (got {type(sd).__name__})")
    if sd and all(k.startswith("module.") for k in sd):
        sd = {k[len("module."):]: v for k, v in sd.items()}
    res = model.load_state_dict(sd, strict=False)
    if res.missing_keys or res.unexpected_keys:
        raise LoadError(f"{path} does not match the model: {len(res.missing_keys)} missing keys (e.g. "
                        f"{res.missing_keys[:2]}), {len(res.unexpected_keys)} unexpected (e.g. "
                        f"{res.unexpected_keys[:2]})", fix="pass weights saved from this architecture")


# ============================================================================================ the pipeline
@contextlib.contextmanager
def _quiet_libraries(args: argparse.Namespace) -> Iterator[None]:
    """Keep library chatter (warnings, torch logs, partial graphs printed on export errors) off the terminal:
    dropped, unless --debug (then stray stdout goes to stderr, so that stdout stays ours). Progress objects
    hold the real stderr, taken before this redirect."""
    if getattr(args, "debug", False):
        with contextlib.redirect_stdout(sys.stderr):
            yield
        return
    levels = {n: logging.getLogger(n).level for n in ("torch", "onnxscript", "onnx_ir", "transformers")}
    for n in levels:
        logging.getLogger(n).setLevel(logging.ERROR)
    sink = open(os.devnull, "w")
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(sink), contextlib.redirect_stderr(sink):
            warnings.simplefilter("ignore")
            yield
    finally:
        sink.close()
        for n, lv in levels.items():
            logging.getLogger(n).setLevel(lv)


def _pipeline_text(passes: Sequence[Any]) -> str:
    """``ChannelPrune(ratio=0.5) -> Shrink()``: each pass with the options that differ from the defaults."""
    from .recipe import dump_recipe, pass_options

    parts = []
    for p, entry in zip(passes, dump_recipe(passes)):
        defaults = {n: o.default for n, o in pass_options(type(p)).items()}
        opts = [f"{k}={v!r}" for k, v in entry.items() if k != "pass" and not (
            k in defaults and (defaults[k] == v or (isinstance(defaults[k], tuple) and list(defaults[k]) == v)))]
        parts.append(f"{type(p).__name__}({', '.join(opts)})")
    return " -> ".join(parts)


def run_pipeline(args: argparse.Namespace, model: Any, inputs: tuple, passes: list, label: str,
                 progress: Progress) -> tuple[Any, dict[str, Any]]:
    """compile -> (ONNX dense + pruned -> onnxruntime latency) -> save to args.out. Returns (compiled, result)."""
    from . import compile as fx_compile
    from . import latency, serialize
    from .recipe import dump_recipe

    outdir = Path(args.out)
    outdir.mkdir(parents=True, exist_ok=True)
    recipe = dump_recipe(passes)
    progress.step(f"compiling {label}: {_pipeline_text(passes)}")
    out = fx_compile(model, inputs, passes=passes, seed=args.seed)
    r = out.report
    v = {None: "not run", True: "yes", False: "NO"}[r.verified]
    progress.info(f"params {r.params_before:,} -> {r.params_after:,}, MACs x{r.macs_ratio:.3f}, verified: {v}")
    files: dict[str, str] = {}
    extra: dict[str, Any] = {"source": label, "files": files}
    notes: list[str] = []
    bench = None
    if not args.no_onnx:
        progress.step("exporting dense and pruned models to ONNX (checked against torch in onnxruntime)")
        try:
            from fxprune.backends import onnx as onnx_backend

            example = latency.example_inputs(out)
            dres = onnx_backend.export(model, example, outdir / "dense.onnx", dynamic_batch=True,
                                       simplify=not args.no_simplify)
            pres = onnx_backend.export(out, example, outdir / "pruned.onnx", dynamic_batch=True,
                                       simplify=not args.no_simplify)
            files["dense.onnx"] = "the unpruned model in ONNX"
            files["pruned.onnx"] = "the pruned model in ONNX"
            extra["onnx"] = {"dense": _export_info(dres), "pruned": _export_info(pres)}
            progress.info(f"pruned.onnx: {'dynamic' if pres.dynamic_batch else 'static'} batch, "
                          f"{'simplified' if pres.simplified else 'not simplified'}, exporter {pres.exporter}")
            if not args.no_latency:
                batch = args.batch if (args.batch and pres.dynamic_batch and dres.dynamic_batch) else None
                progress.step(f"timing dense vs pruned in onnxruntime (batch {batch or latency.batch_size(example)}"
                              f", {args.threads} threads, {args.repeats} interleaved rounds)")
                bench = latency.benchmark(out, batch=batch, threads=args.threads, repeats=args.repeats,
                                          warmup=args.warmup, record=False,
                                          onnx_files=(outdir / "dense.onnx", outdir / "pruned.onnx"))
        except BackendUnavailableError as e:
            notes.append(f"ONNX skipped: {str(e).splitlines()[0]}")
            progress.warn(notes[-1] + "; timing eager torch instead")
            if not args.no_latency:
                bench = latency.benchmark(out, backend="torch", dense=model, threads=args.threads,
                                            repeats=args.repeats, warmup=args.warmup, record=False)
    elif not args.no_latency:
        progress.step("timing dense vs pruned in eager torch")
        bench = latency.benchmark(out, backend="torch", dense=model, threads=args.threads, repeats=args.repeats,
                                    warmup=args.warmup, record=False)
    if bench is not None:
        r.latency[f"{bench['backend']} (batch {bench['batch']}, {bench['threads']} threads)"] = \
            latency.latency_line(bench)
        extra["benchmark"] = bench
    if notes:
        extra["notes"] = notes
    progress.step(f"saving program, weights, recipe, report and plot to {outdir}/")
    files.update({
        "program.pt2": "the pruned program (torch.export; fxprune.load)",
        "weights.pt": "pruned weights by parameter name (fxprune.replay)",
        "keep.json": "kept original indices per resized parameter",
        "recipe.yaml": "the pass pipeline", "report.json": "the report (machine-readable)",
        "report.md": "the report (Markdown)", "report.png": "channels per group and per-layer sparsity",
        "manifest.json": "format, versions, model class, conv groups", "history.json": "every pass, options, stats",
        "inputs.pt": "example inputs", "outputs.pt": "the pruned module's outputs on them",
    })
    serialize.save(out, outdir, recipe=recipe, extra=extra)
    if not (outdir / "report.png").exists():
        files.pop("report.png", None)
    return out, {"report": serialize.read_report(outdir), "out": str(outdir)}


def _export_info(res: Any) -> dict[str, Any]:
    return {"path": str(res.path), "exporter": res.exporter, "opset": res.opset, "dynamic_batch": res.dynamic_batch,
            "simplified": res.simplified, "max_abs_diff": res.max_abs_diff, "notes": list(res.notes)}


def _print_result(args: argparse.Namespace, out: Any, result: dict[str, Any]) -> None:
    if args.json:
        print(json.dumps(result["report"], indent=1, default=str))
        return
    print(out.report.summary())
    print(out.report.table(max_rows=args.rows))
    files = sorted(p.name for p in Path(result["out"]).iterdir() if p.is_file())
    print(f"\nfiles written to {result['out']}/: {', '.join(files)}")


# ============================================================================================ commands
def _progress(args: argparse.Namespace, total: int) -> Progress:
    return Progress(total=total, quiet=args.quiet, json=args.json, stream=sys.stderr)


def _steps(args: argparse.Namespace) -> int:
    """build, compile, [ONNX], [latency], save."""
    return 3 + (0 if args.no_onnx else 1) + (0 if args.no_latency else 1)


def cmd_demo(args: argparse.Namespace) -> int:
    from . import models
    from .passes import ChannelPrune, Shrink
    from .testing import make_observable

    if args.model not in models.names():
        raise UsageError(f"unknown model {args.model!r}; choose from {', '.join(models.names())}")
    if not 0.0 <= args.ratio < 1.0:
        raise UsageError(f"--ratio must be in [0, 1), got {args.ratio}")
    if args.batch is None:
        args.batch = 8  # latency at batch 8 (the program is traced at batch 2 with a dynamic batch)
    progress = _progress(args, _steps(args))
    with _quiet_libraries(args):
        progress.step(f"building reference model {args.model} ({args.size}), random init, seed {args.seed}")
        model, inputs, label = resolve_model(args.model, size=args.size, seed=args.seed)
        make_observable(model, seed=args.seed)  # random init: make every channel visible to the verification
        passes = [ChannelPrune(ratio=args.ratio), Shrink()]
        out, result = run_pipeline(args, model, inputs, passes, label, progress)
    _print_result(args, out, result)
    return 0 if out.report.verified else 1


def cmd_compile(args: argparse.Namespace) -> int:
    from .recipe import load_recipe

    passes = load_recipe(args.recipe)  # RecipeError (exit 2) before anything slow
    if args.input_shape:
        parse_shape(args.input_shape)  # UsageError (exit 2) before anything slow
    progress = _progress(args, _steps(args))
    with _quiet_libraries(args):
        progress.step(f"building {args.model}")
        model, inputs, label = resolve_model(args.model, size=args.size, input_shape=args.input_shape,
                                             seed=args.seed, hf_config=args.hf_config,
                                             hf_task=args.hf_task)
        if args.weights:
            _load_weights(model, args.weights)
            progress.info(f"loaded weights from {args.weights}")
        shapes = ", ".join(str(tuple(x.shape)) for x in inputs)
        progress.info(f"{type(model).__name__}, inputs {shapes}")
        if inputs and getattr(inputs[0], "dim", lambda: 0)() >= 1 and inputs[0].shape[0] == 1:
            progress.warn("batch 1: torch.export specialises it, so the pruned program and its ONNX file accept "
                          "only batch 1 (use a batch >= 2 in --input-shape for a dynamic batch)")
        out, result = run_pipeline(args, model, inputs, passes, label, progress)
    _print_result(args, out, result)
    return 0 if out.report.verified in (True, None) else 1


def _option_docs(cls: type) -> dict[str, str]:
    """For each option of a pass: the docstring sentence that describes it (``name``: ... preferred)."""
    from .recipe import pass_options

    doc = inspect.getdoc(cls) or ""
    init_doc = inspect.getdoc(cls.__init__) if cls.__init__ is not object.__init__ else ""
    if init_doc and not init_doc.startswith("Initialize self"):
        doc += "\n" + init_doc
    sentences = re.split(r"(?<=[.;])\s+|\n\s*\n|\n(?=\s*[*-] )", doc)
    sentences = [" ".join(x.split()) for x in sentences if x.strip()]
    out = {}
    for name in pass_options(cls):
        mark = f"``{name}``"
        hits = [x for x in sentences if mark in x]
        if not hits:
            continue
        best = next((x for x in hits if x.lstrip("*- ").startswith(mark)), None) or \
            next((x for x in hits if f"{mark}:" in x), hits[0])
        text = best.lstrip("*- ").replace("``", "")
        if text.startswith(f"{name}:"):
            text = text[len(name) + 1:].strip()
        out[name] = text if len(text) <= 200 else text[:197] + "..."
    return out


def _pass_rows(only: str | None = None) -> list[dict[str, Any]]:
    from .recipe import pass_options, registry
    from .zoo import did_you_mean

    reg = registry()
    if only is not None and only not in reg:
        raise UsageError(f"unknown pass {only!r}{did_you_mean(only, list(reg))}; registered: "
                         f"{', '.join(sorted(reg))}")
    rows = []
    for name, cls in sorted(reg.items()):
        if only is not None and name != only:
            continue
        docs = _option_docs(cls)
        opts = []
        for pname, p in pass_options(cls).items():
            required = p.default is inspect.Parameter.empty
            default = None if required else p.default
            opts.append({"name": pname, "required": required,
                         "default": default if isinstance(default, (int, float, str, bool, type(None)))
                         else (list(default) if isinstance(default, tuple) else repr(default)),
                         "annotation": None if p.annotation is inspect.Parameter.empty else str(p.annotation),
                         "doc": docs.get(pname, "")})
        full = inspect.getdoc(cls) or ""
        rows.append({"name": name, "class": cls.__name__, "module": cls.__module__,
                     "doc": full.split("\n\n")[0].replace("\n", " "), "full_doc": full,
                     "requires": sorted(getattr(cls, "requires", ())),
                     "modifies_weights": bool(cls.modifies_weights), "changes_graph": bool(cls.changes_graph),
                     "options": opts})
    return rows


def cmd_passes(args: argparse.Namespace) -> int:
    with _quiet_libraries(args):
        rows = _pass_rows(args.name)
    if args.json:
        print(json.dumps(rows, indent=1, default=str))
        return 0
    for r in rows:
        print(f"{r['name']}  ({r['class']}, {r['module']})")
        print(f"    {r['doc']}" if not args.name else "\n".join("    " + ln for ln in r["full_doc"].splitlines()))
        for o in r["options"]:
            dflt = "required" if o["required"] else f"default {o['default']!r}"
            print(f"    - {o['name']} ({dflt})" + (f": {o['doc']}" if o["doc"] else ""))
        print()
    print("use a pass in a recipe as:  - pass: NAME\n                               OPTION: VALUE   (docs/cli.md)")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from .serialize import read_report, report_from_dict

    data = read_report(args.dir)
    if args.json:
        print(json.dumps(data, indent=1))
        return 0
    rep = report_from_dict(data)
    print(rep.summary())
    print(rep.table(max_rows=args.rows))
    if data.get("recipe"):
        from .recipe import recipe_to_yaml

        print("\nrecipe:\n" + "\n".join("  " + ln for ln in recipe_to_yaml(data["recipe"]).splitlines()))
    return 0


# ============================================================================================ parser
def build_parser() -> argparse.ArgumentParser:
    from .zoo import HF_TASKS

    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--json", action="store_true", help="machine-readable: JSON on stdout, JSON-lines progress")
    common.add_argument("--quiet", action="store_true", help="no progress output on stderr")
    common.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                        help="show Python tracebacks and library warnings")
    work = argparse.ArgumentParser(add_help=False)
    work.add_argument("--out", default="fxprune-out", help="output folder (default ./fxprune-out)")
    work.add_argument("--seed", type=int, default=0, help="seed of every random choice (default 0)")
    work.add_argument("--no-onnx", action="store_true", help="skip the ONNX export (latency then in eager torch)")
    work.add_argument("--no-simplify", action="store_true", help="do not run onnxsim on the exported files")
    work.add_argument("--no-latency", action="store_true", help="skip the latency measurement")
    work.add_argument("--batch", type=int, default=None,
                      help="batch size for latency (default: demo 8, compile the example's)")
    work.add_argument("--threads", type=int, default=2, help="onnxruntime/torch threads for latency (default 2)")
    work.add_argument("--repeats", type=int, default=20, help="timed rounds per model (default 20)")
    work.add_argument("--warmup", type=int, default=3, help="untimed rounds per model (default 3)")
    work.add_argument("--rows", type=int, default=60, help="group rows printed (default 60)")

    ap = argparse.ArgumentParser(prog="fxprune", description="A compiler for pruning neural networks.",
                                 epilog="exit codes: 0 ok, 2 bad usage, 1 failure. Docs: docs/cli.md")
    ap.add_argument("--debug", action="store_true", help="show Python tracebacks and library warnings")
    sub = ap.add_subparsers(dest="command", required=True, metavar="{demo,compile,report,passes}")

    d = sub.add_parser("demo", parents=[common, work],
                       help="prune a reference model 50%%, shrink, verify, export to ONNX, time it, report",
                       description="Reference model -> ChannelPrune(ratio) -> Shrink (verified) -> ONNX (dense and "
                                   "pruned) -> onnxruntime latency -> report, plot and saved program in --out.")
    d.add_argument("--model", default=DEMO_MODEL, help=f"reference model (default {DEMO_MODEL})")
    d.add_argument("--size", default="full", choices=["tiny", "full"], help="model size (default full)")
    d.add_argument("--ratio", type=float, default=0.5, help="fraction of channels removed (default 0.5)")
    d.set_defaults(fn=cmd_demo)

    c = sub.add_parser("compile", parents=[common, work], help="prune MODEL with a recipe; write program, ONNX, report",
                       description="MODEL: reference name, torchvision:NAME, timm:NAME, hf:NAME or file.py:factory.")
    c.add_argument("model", metavar="MODEL")
    c.add_argument("--recipe", required=True, help="YAML recipe (see docs/cli.md)")
    c.add_argument("--input-shape", default=None,
                   help="example input shape, e.g. 2,3,224,224 (hf: batch,seq); several inputs: 2,3,32,32;2,4")
    c.add_argument("--weights", default=None, help="state_dict to load (.pt/.pth via weights_only, .safetensors)")
    c.add_argument("--size", default="full", choices=["tiny", "full"], help="reference model size (default full)")
    c.add_argument("--hf-config", action="append", default=[], metavar="KEY=VALUE",
                   help="hf: models: override a transformers config field (repeatable)")
    c.add_argument("--hf-task", default=None, choices=list(HF_TASKS),
                   help="hf: models: the head (default: causal-lm, else masked-lm, else base)")
    c.set_defaults(fn=cmd_compile)

    r = sub.add_parser("report", parents=[common], help="re-print a saved report")
    r.add_argument("dir")
    r.add_argument("--rows", type=int, default=60, help="group rows printed (default 60)")
    r.set_defaults(fn=cmd_report)

    p = sub.add_parser("passes", parents=[common], help="list registered passes and their options")
    p.add_argument("name", nargs="?", default=None, help="show one pass in full")
    p.set_defaults(fn=cmd_passes)
    return ap


def _fail(args: Any, code: int, kind: str, message: str) -> int:
    line = message.strip().splitlines()[0] if message.strip() else kind
    fix = ""
    if "\n  fix: " in message:
        fix = message.split("\n  fix: ", 1)[1].splitlines()[0]
    if getattr(args, "json", False):
        print(json.dumps({"event": "error", "exit_code": code, "type": kind, "message": line, "fix": fix or None}),
              file=sys.stderr)
    else:
        print(f"fxprune: {'error' if code == 2 else kind}: {line}" + (f" (fix: {fix})" if fix else ""),
              file=sys.stderr)
    return code


def main(argv: Sequence[str] | None = None) -> int:
    ap = build_parser()
    try:
        args = ap.parse_args(argv)
    except SystemExit as e:  # argparse: 2 on bad usage, 0 for --help
        return int(e.code or 0)
    try:
        return int(args.fn(args) or 0)
    except (UsageError, RecipeError) as e:
        if getattr(args, "debug", False):
            raise
        return _fail(args, 2, type(e).__name__, str(e))
    except KeyboardInterrupt:
        return _fail(args, 1, "Interrupted", "interrupted")
    except BrokenPipeError:  # `fxprune ... | head`: stop quietly
        with contextlib.suppress(Exception):
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    except Exception as e:  # one line, no traceback unless --debug
        if getattr(args, "debug", False):
            raise
        return _fail(args, 1, type(e).__name__, str(e) or type(e).__name__)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())

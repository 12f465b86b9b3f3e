"""The ``fxprune`` command line (also ``python -m fxprune``).

    fxprune demo    [--model resnet56] [--size full] [--target-latency 0.5 | --ratio R] [--out fxprune-out] [--json]
    fxprune compile MODEL --recipe recipe.yaml [--input-shape 2,3,224,224 | --input 2,16:int64 ...]
                    [--input-dtype int64] [--out DIR] [--weights FILE]
    fxprune report  DIR [--json]
    fxprune passes  [NAME] [--json]
    fxprune --version

MODEL: a reference model name (``fxprune.models.names()``), ``torchvision:NAME``, ``timm:NAME``, ``hf:NAME``
(a transformers model type such as ``llama``, ``gpt2``, ``bert``, built from a small config, random init; or a
local folder, with its ``*.safetensors`` weights) or ``path/to/file.py:factory``, resolved by
:func:`fxprune.zoo.build`. Every flag is checked before any slow work. Progress goes to stderr (``--quiet`` silences
it, ``--json`` makes it JSON lines and prints one JSON document on stdout); it says where the weights come from
("random init" whenever they are random). Exit codes: 0 ok, 2 bad usage (unknown command/option/model, bad flag
value, recipe or input shape), 1 failure; either way one line on stderr, without terminal escape codes (``--debug``
shows the traceback). See docs/cli.md.
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
from typing import Any, Iterator, Mapping, Sequence

from .errors import BackendUnavailableError, InputError, LoadError, RecipeError
from .progress import Progress
from .zoo import strip_ansi

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
        raise UsageError(_message(e).replace("bad input shape", "bad --input-shape")) from None


def input_spec(args: argparse.Namespace) -> tuple[str | None, str | None]:
    """``(input_shape, input_dtype)`` for :func:`fxprune.zoo.build` from ``--input-shape`` / ``--input`` (typed:
    ``2,16:int64``) / ``--input-dtype``, checked (a usage error says what is wrong)."""
    from .zoo import parse_dtypes, parse_inputs

    shape = getattr(args, "input_shape", None)
    many = getattr(args, "input", None) or []
    dtype = getattr(args, "input_dtype", None)
    if shape and many:
        raise UsageError("give the inputs with --input-shape or with --input, not both")
    if many:
        for one in many:
            if ";" in one or len(_parse_inputs(one, "--input")) != 1:
                raise UsageError(f"--input {one!r}: one input per --input (repeat the option for several inputs)")
        shape = ";".join(many)
    if shape:
        typed = _parse_inputs(shape, "--input" if many else "--input-shape")
        if dtype and any(d is not None for _, d in typed):
            raise UsageError("give the dtypes either in the shapes (2,16:int64) or with --input-dtype, not both")
    if dtype:
        try:
            dts = parse_dtypes(dtype)
        except InputError as e:
            raise UsageError(f"--input-dtype: {_message(e)}") from None
        if shape and len(dts) not in (1, len(_parse_inputs(shape, "--input-shape"))):
            raise UsageError(f"--input-dtype gives {len(dts)} dtypes for {len(_parse_inputs(shape, '--input-shape'))} "
                             f"inputs: give one for all or one per input")
    return shape, dtype


def _parse_inputs(text: str, flag: str) -> list[Any]:
    from .zoo import parse_inputs

    try:
        return parse_inputs(text)
    except InputError as e:
        raise UsageError(_message(e).replace("bad input shape", f"bad {flag}")) from None


def resolve_model(spec: str, *, size: str = "full", input_shape: str | None = None, seed: int = 0,
                  hf_config: Sequence[str] = (), hf_task: str | None = None,
                  input_dtype: str | None = None, batch: int = 2) -> Any:
    """:class:`fxprune.zoo.Resolved` ``(model in eval mode, example inputs, label, weights)`` for a MODEL argument:
    :func:`fxprune.zoo.build` at ``batch`` (default 2: a dynamic batch in the program and the ONNX files); an
    unknown name or a bad option is a usage error."""
    from . import zoo

    if input_shape:
        _parse_inputs(input_shape, "--input-shape")
    if (hf_config or hf_task) and not spec.startswith("hf:"):
        raise UsageError(f"--hf-config and --hf-task apply to hf: models, not {spec!r}")
    try:
        return zoo.build(spec, batch=batch, size=size, input_shape=input_shape, seed=seed, overrides=hf_config,
                         task=hf_task, input_dtype=input_dtype)
    except InputError as e:  # unknown name (with a did-you-mean), missing file or factory, bad option
        raise UsageError(_message(e).replace("the input shape gives", "--input-shape gives")) from None


def _message(e: BaseException) -> str:
    """An exception's text without its ``fix:`` line or terminal escape codes."""
    return strip_ansi(str(e)).split("\n  fix: ")[0]


def _load_weights(model: Any, path: str) -> str:
    """Load the state_dict in ``path`` into ``model``; returns "loaded from PATH"."""
    import torch

    p = Path(path)
    if not p.is_file():
        raise UsageError(f"--weights {path!r} does not exist" if not p.exists() else f"--weights {path!r} is not a file")
    if p.suffix == ".safetensors":
        try:
            from safetensors.torch import load_file
        except ImportError as e:
            raise BackendUnavailableError("reading .safetensors needs the safetensors package",
                                          fix="pip install safetensors") from e
        try:
            sd = load_file(str(p))
        except Exception as e:  # noqa: BLE001 - a damaged file: one line naming it
            raise LoadError(f"cannot read {path} as safetensors: {_first_line(e)}") from e
    else:
        try:
            sd = torch.load(p, map_location="cpu", weights_only=True)
        except Exception as e:
            text = strip_ansi(str(e))
            found = re.search(r"Unsupported global: GLOBAL ([\w.]+)", text)
            if found or "Weights only load failed" in text:
                what = f" (it holds a {found.group(1)})" if found else ""
                raise LoadError(f"{path} holds pickled Python objects{what}, not only tensors; fxprune reads "
                                f"weights with torch.load(weights_only=True) and never unpickles code",
                                fix="save a state_dict: torch.save(model.state_dict(), path), or a .safetensors "
                                    "file") from e
            raise LoadError(f"cannot read {path} with torch.load(weights_only=True): {_first_line(e)}",
                            fix="save a plain state_dict: torch.save(model.state_dict(), path)") from e
    for key in ("state_dict", "model_state_dict", "model"):
        if isinstance(sd, dict) and isinstance(sd.get(key), dict):
            sd = sd[key]
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise LoadError(f"{path} does not hold a state_dict (got {type(sd).__name__})",
                        fix="save a state_dict: torch.save(model.state_dict(), path)")
    if sd and all(k.startswith("module.") for k in sd):
        sd = {k[len("module."):]: v for k, v in sd.items()}
    try:
        res = model.load_state_dict(sd, strict=False)
    except RuntimeError as e:  # shape mismatches
        raise LoadError(f"{path} does not match the model: {_first_line(e)}",
                        fix="pass weights saved from this architecture") from e
    if res.missing_keys or res.unexpected_keys:
        raise LoadError(f"{path} does not match the model: {len(res.missing_keys)} missing keys (e.g. "
                        f"{res.missing_keys[:2]}), {len(res.unexpected_keys)} unexpected (e.g. "
                        f"{res.unexpected_keys[:2]})", fix="pass weights saved from this architecture")
    return f"loaded from {path}"


def _first_line(e: BaseException) -> str:
    lines = [ln.strip() for ln in _message(e).splitlines() if ln.strip()]
    return lines[0] if lines else type(e).__name__


# ============================================================================================ flag checks
def _check_flags(args: argparse.Namespace) -> None:
    """Every flag of demo/compile, checked before anything slow (a usage error, exit 2)."""
    def positive(flag: str, value: Any, low: int = 1) -> None:
        if value is not None and (not isinstance(value, int) or value < low):
            raise UsageError(f"{flag} must be an integer >= {low}, got {value}")

    positive("--seed", args.seed, 0)
    positive("--batch", args.batch)
    positive("--threads", args.threads)
    positive("--repeats", args.repeats)
    positive("--warmup", args.warmup, 0)
    positive("--rows", args.rows, 0)
    if args.seed >= 2 ** 63:
        raise UsageError(f"--seed must be below 2**63, got {args.seed}")
    ratio = getattr(args, "ratio", None)
    if ratio is not None and not (0.0 <= ratio < 1.0):
        raise UsageError(f"--ratio must be in [0, 1), got {ratio}")
    target = getattr(args, "target_latency", None)
    if target is not None and not (0.0 < target < 1.0):
        raise UsageError(f"--target-latency must be in (0, 1) (a fraction of the dense latency), got {target}")
    if target is not None and (args.no_onnx or args.no_latency):
        raise UsageError("--target-latency measures on onnxruntime: drop --no-onnx / --no-latency")
    if target is not None and ratio is not None:
        raise UsageError("give --target-latency (LatencyPrune) or --ratio (ChannelPrune), not both")
    _check_out(Path(args.out))
    weights = getattr(args, "weights", None)
    if weights:
        p = Path(weights)
        if not p.exists():
            raise UsageError(f"--weights {weights!r} does not exist")
        if not p.is_file():
            raise UsageError(f"--weights {weights!r} is not a file")
    hf = [f for f in ("hf_config", "hf_task") if getattr(args, f, None)]
    if hf and not str(getattr(args, "model", "")).startswith("hf:"):
        raise UsageError(f"--hf-config and --hf-task apply to hf: models, not {args.model!r}")
    if getattr(args, "hf_config", None):
        from .zoo import parse_overrides

        try:
            parse_overrides(args.hf_config)
        except InputError as e:
            raise UsageError(f"--hf-config: {_message(e)}") from None


def _check_out(out: Path) -> None:
    """--out must be a folder we may write: not a file, and not a folder holding fxprune's file names without a
    previous save's manifest (fxprune.archive refuses to overwrite those; say so before the slow work)."""
    from .archive import FILES

    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {str(out)!r} is a file, not a folder")
    if out.is_dir() and not (out / FILES["manifest"]).is_file():
        clash = sorted(n for n in FILES.values() if (out / n).exists())
        if clash:
            raise UsageError(f"--out {str(out)!r} holds {', '.join(clash)} but no manifest.json of an fxprune save: "
                             f"fxprune does not overwrite files it did not write; use a new or empty folder")
    parent = out.resolve().parent
    while not parent.exists():
        parent = parent.parent
    if not os.access(parent if not out.exists() else out, os.W_OK):
        raise UsageError(f"--out {str(out)!r}: no write permission")


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


#: files the command line writes next to a save (fxprune.archive owns the others); a later run that does not write
#: them removes those an earlier run listed in its report.json, so the folder never mixes two runs
CLI_FILES = {"dense.onnx": "the unpruned model in ONNX", "pruned.onnx": "the pruned model in ONNX"}


def _save_files(plot: bool) -> dict[str, str]:
    """What fxprune.archive.save writes, described (report.png only when matplotlib can draw it)."""
    files = {
        "program.pt2": "the pruned program (torch.export; fxprune.load)",
        "weights.pt": "pruned weights by parameter name (fxprune.replay)",
        "inputs.pt": "example inputs", "outputs.pt": "the pruned module's outputs on them",
        "keep.json": "kept original indices per resized parameter",
        "recipe.yaml": "the pass pipeline", "history.json": "every pass, options, stats",
        "report.json": "the report (machine-readable)", "report.md": "the report (Markdown)",
        "report.png": "channels per group (fraction kept) and per-layer sparsity",
        "manifest.json": "format, versions, model class, checksums of the files of this save",
    }
    if not plot:
        files.pop("report.png")
    return files


def _previous_cli_files(outdir: Path) -> set[str]:
    """The CLI files (dense.onnx, pruned.onnx) an earlier run in ``outdir`` listed in its report.json."""
    try:
        files = json.loads((outdir / "report.json").read_text()).get("files") or {}
    except (OSError, ValueError, AttributeError):
        return set()
    return {n for n in files if n in CLI_FILES} if isinstance(files, dict) else set()


def run_pipeline(args: argparse.Namespace, model: Any, inputs: tuple, passes: list, label: str,
                 progress: Progress, *, weights: str = "") -> tuple[Any, dict[str, Any]]:
    """compile -> (ONNX dense + pruned -> onnxruntime latency) -> save to args.out. Returns (compiled, result);
    ``result["files"]`` lists the files this run wrote (and nothing else in the folder)."""
    import importlib.util
    import shutil
    import tempfile

    from . import compile as fx_compile
    from . import latency
    from .archive import read_report, save
    from .recipe import dump_recipe

    outdir = Path(args.out)
    recipe = dump_recipe(passes)
    progress.step(f"compiling {label}: {_pipeline_text(passes)}")
    out = fx_compile(model, inputs, passes=passes, seed=args.seed)
    r = out.report
    v = {None: "not run", True: "yes", False: "NO"}[r.verified]
    progress.info(f"params {r.params_before:,} -> {r.params_after:,}, MACs x{r.macs_ratio:.3f}, verified: {v}")
    if not r.dynamic_batch:
        progress.warn("static batch: the pruned program and its ONNX files accept only the example's batch size "
                      "(torch.export specialises a batch of 1; use a batch >= 2 in the input shape)")
    plot = importlib.util.find_spec("matplotlib") is not None
    files: dict[str, str] = {}
    extra: dict[str, Any] = {"source": label, "weights": weights, "files": files}
    notes: list[str] = []
    bench = None
    previous = _previous_cli_files(outdir)
    outdir.resolve().parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{outdir.resolve().name}.fxprune-onnx-", dir=outdir.resolve().parent))
    try:
        if not args.no_onnx:
            progress.step("exporting dense and pruned models to ONNX (checked against torch in onnxruntime)")
            try:
                from fxprune.backends import onnx as onnx_backend

                example = latency.example_inputs(out)
                dres = onnx_backend.export(model, example, staging / "dense.onnx", dynamic_batch=True,
                                           simplify=not args.no_simplify)
                pres = onnx_backend.export(out, example, staging / "pruned.onnx", dynamic_batch=True,
                                           simplify=not args.no_simplify)
                files.update(CLI_FILES)
                extra["onnx"] = {"dense": _export_info(dres, "dense.onnx"), "pruned": _export_info(pres, "pruned.onnx")}
                progress.info(f"pruned.onnx: {'dynamic' if pres.dynamic_batch else 'static'} batch, "
                              f"{'simplified' if pres.simplified else 'not simplified'}, exporter {pres.exporter}")
                if not args.no_latency:
                    batch = args.batch if (args.batch and pres.dynamic_batch and dres.dynamic_batch) else None
                    if args.batch and batch is None:
                        progress.warn(f"static batch in the ONNX files: timing at the example's batch, not "
                                      f"--batch {args.batch}")
                    progress.step(f"timing dense vs pruned in onnxruntime (batch "
                                  f"{batch or latency.batch_size(example)}, {args.threads} threads, "
                                  f"{args.repeats} interleaved rounds)")
                    bench = latency.benchmark(out, batch=batch, threads=args.threads, repeats=args.repeats,
                                              warmup=args.warmup, record=False,
                                              onnx_files=(staging / "dense.onnx", staging / "pruned.onnx"))
            except BackendUnavailableError as e:
                files.clear()
                notes.append(f"ONNX skipped: {_first_line(e)}")
                progress.warn(notes[-1] + "; timing eager torch instead")
                if not args.no_latency:
                    bench = _torch_latency(args, out, model, latency)
        elif not args.no_latency:
            progress.step("timing dense vs pruned in eager torch")
            bench = _torch_latency(args, out, model, latency)
        if bench is not None:
            r.latency[bench["backend"]] = _latency_entry(bench, latency.latency_line(bench))
            extra["benchmark"] = bench
        predicted = _predicted_latency(r)
        if predicted:
            r.latency["predicted"] = predicted
        if notes:
            extra["notes"] = notes
        progress.step(f"saving program, weights, recipe, report and plot to {outdir}/")
        files.update(_save_files(plot))
        save(out, outdir, recipe=recipe, extra=extra)
        for name in CLI_FILES:  # this run's ONNX files, or none: never an earlier run's next to this save
            if (staging / name).exists():
                os.replace(staging / name, outdir / name)
            elif name in previous:
                (outdir / name).unlink(missing_ok=True)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    written = _written(outdir, files)
    return out, {"report": read_report(outdir), "out": str(outdir), "files": written}


def _written(outdir: Path, files: Mapping[str, str]) -> list[str]:
    """The files of this run: the save's manifest (what it wrote) plus the ONNX files moved in."""
    try:
        saved = set(json.loads((outdir / "manifest.json").read_text()).get("files") or {}) | {"manifest.json"}
    except (OSError, ValueError, AttributeError):
        saved = set()
    return sorted(n for n in files if (n in saved or n in CLI_FILES) and (outdir / n).is_file())


def _torch_latency(args: argparse.Namespace, out: Any, model: Any, latency: Any) -> dict[str, Any]:
    batch = args.batch if (args.batch and out.report.dynamic_batch) else None
    return latency.benchmark(out, backend="torch", dense=model, batch=batch, threads=args.threads,
                             repeats=args.repeats, warmup=args.warmup, record=False)


def _predicted_latency(report: Any) -> str | None:
    """``report.latency["predicted"]``: what a LatencyPrune pass predicted and measured for its selection (at the
    example's shape), printed above this run's own measurement so the two read side by side."""
    for p in report.passes:
        st = p.get("stats") or {}
        if p.get("pass") == "latency_prune" and st.get("predicted_ms") is not None:
            return (f"LatencyPrune target {st['target_ratio']:.2f} of dense: predicted {st['predicted_ms']:.3f} ms "
                    f"({st['predicted_ratio']:.3f}), measured in the pass {st['measured_ms']:.3f} ms "
                    f"({st['measured_ratio']:.3f}) vs dense {st['dense_ms']:.3f} ms, "
                    f"{len(st.get('rounds') or [])} calibration round(s)")
    return None


def _latency_entry(bench: Mapping[str, Any], text: str) -> str:
    """``report.latency[backend]``: keyed by the backend (a stable key: ``"onnxruntime"`` or ``"torch"``), the value
    is the printed line; the numbers are in report.json's ``benchmark``."""
    return f"batch {bench.get('batch')}, {bench.get('threads')} threads: {text}"


def _export_info(res: Any, name: str) -> dict[str, Any]:
    """An ONNX export's facts for report.json; ``path`` is relative to the output folder."""
    return {"path": name, "exporter": res.exporter, "opset": res.opset, "dynamic_batch": res.dynamic_batch,
            "simplified": res.simplified, "max_abs_diff": res.max_abs_diff,
            "notes": [strip_ansi(str(n)) for n in res.notes]}


def _print_result(args: argparse.Namespace, out: Any, result: dict[str, Any]) -> None:
    if args.json:
        print(json.dumps(result["report"], indent=1, default=str))
        return
    print(out.report.summary())
    weights = result["report"].get("weights")
    if weights:
        print(f"  weights: {weights}")
    print(out.report.table(max_rows=args.rows))
    print(f"\nfiles written to {result['out']}/: {', '.join(result['files'])}")


# ============================================================================================ commands
def _progress(args: argparse.Namespace, total: int) -> Progress:
    return Progress(total=total, quiet=args.quiet, json=args.json, stream=sys.stderr)


def _steps(args: argparse.Namespace) -> int:
    """build, compile, [ONNX], [latency], save."""
    return 3 + (0 if args.no_onnx else 1) + (0 if args.no_latency else 1)


def _shapes_text(inputs: Sequence[Any]) -> str:
    return ", ".join(f"{tuple(x.shape)} {str(x.dtype).removeprefix('torch.')}" if hasattr(x, "shape") else
                     type(x).__name__ for x in inputs)


def _say_weights(progress: Progress, weights: str, hint: str = "give --weights FILE, or an hf: folder with "
                 "model.safetensors, to prune trained weights") -> None:
    from .zoo import RANDOM_INIT

    if weights.startswith(RANDOM_INIT):
        progress.warn(f"weights: {weights}: the pruning is planned on random weights ({hint})", weights=weights)
    else:
        progress.info(f"weights: {weights}", weights=weights)


def cmd_demo(args: argparse.Namespace) -> int:
    from . import models

    if args.model not in models.names():
        raise UsageError(f"unknown model {args.model!r}; choose from {', '.join(models.names())}")
    _check_flags(args)
    if args.batch is None:
        args.batch = 8  # latency at batch 8 (the program is traced at batch 2 with a dynamic batch)
    progress = _progress(args, _steps(args))
    with _quiet_libraries(args):
        from .passes import ChannelPrune, LatencyPrune, Shrink
        from .testing import make_observable

        progress.step(f"building reference model {args.model} ({args.size})")
        # default: LatencyPrune to half the measured latency; --ratio, --no-onnx or --no-latency: ChannelPrune
        if args.ratio is None and args.target_latency is None:
            if args.no_onnx or args.no_latency:
                args.ratio = 0.5
            else:
                args.target_latency = 0.5
        # LatencyPrune targets the latency of the example's shape: trace at the batch that is timed
        batch = args.batch if args.target_latency is not None else 2
        model, inputs, label, weights = resolve_model(args.model, size=args.size, seed=args.seed, batch=batch)
        make_observable(model, seed=args.seed)  # random init: make every channel visible to the verification
        weights += ", made observable (fxprune.testing.make_observable)"
        _say_weights(progress, weights, "a demo; `fxprune compile MODEL --weights FILE` prunes trained weights")
        if args.target_latency is not None:
            progress.info("LatencyPrune measures a latency table for this machine on its first run (cached in "
                          "~/.cache/fxprune/latency/), then times its selections end to end")
            # strict=False: a target missed after the calibration rounds is reported, not an error; max_spread=1:
            # the table's points only rank widths (the end-to-end calibration corrects their scale), so a busy
            # machine's noise does not stop a first run
            passes = [LatencyPrune(target_latency=args.target_latency, threads=args.threads, strict=False,
                                   max_spread=1.0), Shrink()]
        else:
            passes = [ChannelPrune(ratio=args.ratio), Shrink()]
        out, result = run_pipeline(args, model, inputs, passes, label, progress, weights=weights)
    _print_result(args, out, result)
    return 0 if out.report.verified else 1


def cmd_compile(args: argparse.Namespace) -> int:
    from .recipe import load_recipe

    _check_flags(args)  # every flag (UsageError, exit 2) before anything slow
    shape, dtype = input_spec(args)
    passes = load_recipe(args.recipe)  # RecipeError (exit 2) before anything slow
    if getattr(args, "checkpoint", None):
        return _compile_checkpoint(args, passes)
    progress = _progress(args, _steps(args))
    with _quiet_libraries(args):
        progress.step(f"building {args.model}")
        model, inputs, label, weights = resolve_model(args.model, size=args.size, input_shape=shape, seed=args.seed,
                                                      hf_config=args.hf_config, hf_task=args.hf_task,
                                                      input_dtype=dtype)
        if args.weights:
            weights = _load_weights(model, args.weights)
        _say_weights(progress, weights)
        progress.info(f"{type(model).__name__}, inputs {_shapes_text(inputs)}")
        out, result = run_pipeline(args, model, inputs, passes, label, progress, weights=weights)
    _print_result(args, out, result)
    return 0 if out.report.verified in (True, None) else 1


def _compile_checkpoint(args: argparse.Namespace, passes: list) -> int:
    """``compile hf:NAME --checkpoint DIR``: stream-prune the safetensors checkpoint DIR without loading it
    (:func:`fxprune.streaming.prune_checkpoint`; the config of NAME, with --hf-config overrides, names the
    architecture) into --out, which must not exist yet. Prints the summary (JSON with --json)."""
    if not str(args.model).startswith("hf:"):
        raise UsageError(f"--checkpoint applies to hf: models (their config names the architecture), not "
                         f"{args.model!r}")
    if not Path(args.checkpoint).exists():
        raise UsageError(f"--checkpoint {args.checkpoint!r} does not exist")
    import transformers as T

    from .streaming import prune_checkpoint
    from .zoo import parse_overrides

    cfg = T.AutoConfig.from_pretrained(args.model[3:])
    for k, v in parse_overrides(args.hf_config).items():
        setattr(cfg, k, v)
    res = prune_checkpoint(cfg, args.checkpoint, passes, args.out, seed=args.seed)
    if args.json:
        print(json.dumps(res.to_dict(), default=str))
    else:
        print(f"{res.params_before:,} -> {res.params_after:,} parameters, {len(res.files)} shard(s) in {res.out_dir}"
              f" ({res.timings['total']:.1f} s); layer-wise check: "
              f"{'ok' if res.verification.get('verified') else 'not run'}"
              + (f"; end-to-end: {res.end_to_end['tensors_compared']} tensors bit-identical" if res.end_to_end
                 else "") + "".join(f"\nnote: {n}" for n in res.notes))
    return 0


# ============================================================================================ pass option docs
_ABBREV = {"e.g.": "e\x00g\x00", "i.e.": "i\x00e\x00", "etc.": "etc\x00", "vs.": "vs\x00", "cf.": "cf\x00"}


def _pass_doc(cls: type) -> str:
    doc = inspect.getdoc(cls) or ""
    init = cls.__dict__.get("__init__") or getattr(cls, "__init__", None)
    init_doc = inspect.getdoc(init) if init is not None and init is not object.__init__ else ""
    if init_doc and not init_doc.startswith("Initialize self") and init_doc != doc:
        doc += "\n\n" + init_doc
    return doc


def _numpydoc(doc: str, names: Sequence[str]) -> tuple[dict[str, str], str]:
    """Options documented in a numpydoc ``Parameters`` section (``name : type`` + indented text) or a Google
    ``Args:`` section (``name (type): text``); returns them and the docstring without that section."""
    out: dict[str, list[str]] = {}
    lines = doc.splitlines()
    keep: list[str] = []

    def dashes(j: int) -> bool:
        return j < len(lines) and bool(lines[j].strip()) and set(lines[j].strip()) == {"-"}

    i = 0
    while i < len(lines):
        head = lines[i].strip()
        numpy = head in ("Parameters", "Other Parameters") and dashes(i + 1)
        google = head in ("Args:", "Arguments:", "Parameters:")
        if not (numpy or google):
            keep.append(lines[i])
            i += 1
            continue
        i += 2 if numpy else 1
        base: int | None = None
        targets: list[str] = []
        while i < len(lines):
            ln = lines[i]
            if not ln.strip():
                i += 1
                continue
            ind = len(ln) - len(ln.lstrip())
            if (numpy and dashes(i + 1)) or (google and ind == 0) or (base is not None and ind < base):
                break
            if base is None:
                base = ind
            if ind == base:
                m = (re.match(r"\s*\**(\w+(?:\s*,\s*\w+)*)\**\s*(?:\([^)]*\))?\s*:\s*(.*)$", ln) if google else
                     re.match(r"\s*(\w+(?:\s*,\s*\w+)*)\s*(?::\s*(.*))?$", ln))
                if not m:
                    break
                targets = [n.strip() for n in m.group(1).split(",") if n.strip() in names]
                for n in targets:
                    out[n] = [m.group(2)] if google and m.group(2) else []
            else:
                for n in targets:
                    out[n].append(ln.strip())
            i += 1
    joined = {n: " ".join(v).strip() for n, v in out.items()}
    return {n: t for n, t in joined.items() if t}, "\n".join(keep)


def _sentences(paragraph: str) -> list[str]:
    text = " ".join(paragraph.split())
    for k, v in _ABBREV.items():
        text = text.replace(k, v)
    parts = re.split(r"(?<=[.!?])\s+(?=[A-Z`(\"'*:])", text)
    back = {v: k for k, v in _ABBREV.items()}
    out = []
    for p in parts:
        for v, k in back.items():
            p = p.replace(v, k)
        out.append(p)
    return [p for p in out if p]


def option_docs(cls: type) -> dict[str, str]:
    """For each option of a pass (the parameters of its ``__init__``), its description from the pass' docstrings:
    a numpydoc ``Parameters`` / Google ``Args:`` entry, or the plain style fxprune's passes use, in which a
    clause starts with the option in double backticks (````ratio``: fraction ...``, ````n``, ``m``: ...``,
    ````scope="layer"`` removes ...``) and runs to the next such clause (sentences after it that mention the
    option or start with "or" carry on). An option only mentioned inside a sentence gets that sentence. Texts are
    whole sentences, never cut; an option the docstrings do not mention gets no entry
    (:func:`undocumented_options`)."""
    from .recipe import pass_options

    names = list(pass_options(cls))
    out, doc = _numpydoc(_pass_doc(cls), names)
    if not names:
        return out
    alt = "|".join(re.escape(n) for n in sorted(names, key=len, reverse=True))
    one = rf"``(?:{alt})(?:=[^`]*)?``"
    marker = re.compile(rf"(?P<m>{one}(?:(?:,| and| or|/) ?{one})*)")
    name_in = re.compile(rf"``(?P<n>{alt})(?:=[^`]*)?``")
    defined: dict[str, list[str]] = {}
    mentioned: dict[str, str] = {}
    for paragraph in re.split(r"\n\s*\n", doc):
        sentences = _sentences(paragraph)
        for si, sent in enumerate(sentences):
            starts = [m for m in marker.finditer(sent) if _clause_start(sent, m.start(), m.end())]
            for j, m in enumerate(starts):
                stop = starts[j + 1].start() if j + 1 < len(starts) else len(sent)
                clause = sent[m.start():stop].rstrip(" ;,")
                if j > 0 and len(clause.split()) < 6 and re.search(r"\b(?:it|them|this|that)\b", clause):
                    # "``calib_batches`` caps it": keep what "it" is
                    clause = sent[starts[j - 1].start():stop].rstrip(" ;,")
                own = [x.group("n") for x in name_in.finditer(m.group("m"))]
                if j + 1 == len(starts):  # the clause ends its sentence: carry on while the text stays on it
                    for nxt in sentences[si + 1:]:
                        first = marker.match(nxt)
                        if (first and _clause_start(nxt, 0, first.end())) or not (nxt[:1].islower() or nxt.startswith(("Or ", "And ")) or
                                                     any(re.search(rf"``[^`]*\b{re.escape(n)}\b[^`]*``", nxt)
                                                         for n in own)):
                            break
                        clause += " " + nxt
                for n in own:
                    defined.setdefault(n, []).append(clause)
            bounds = [m.start() for m in starts] + [len(sent)]
            clauses = [sent[:bounds[0]]] + [sent[a:b] for a, b in zip(bounds, bounds[1:])]
            for n in names:
                if n in mentioned:
                    continue
                for clause in clauses:
                    if re.search(rf"``[^`]*(?<![\w.]){re.escape(n)}(?!\w)[^`]*``", clause):
                        mentioned[n] = clause.strip().rstrip(";,").strip()
                        break
    for n in names:
        if n in out:
            continue
        text = "; ".join(c.rstrip(" .;") for c in defined[n]) if n in defined else mentioned.get(n)
        if not text:
            continue
        text = text.replace("``", "")
        text = re.sub(r":(?:class|meth|func|attr|mod|data):`~?([^`]+)`", r"\1", text)
        bare = re.match(rf"{re.escape(n)}\s*:\s*", text)
        if bare:
            text = text[bare.end():]
        text = text.strip()
        if text and not text.endswith((".", "!", "?")):
            text += "."
        out[n] = text[:1].upper() + text[1:] if bare else text
    return out


def _clause_start(sent: str, start: int, end: int) -> bool:
    """Does the option marker at ``sent[start:end]`` start the clause that describes it?"""
    before = sent[:start]
    if start == 0 or before.endswith("; "):
        return True
    return sent[end:end + 1] == ":" and before.endswith((". ", ", ", "("))


def undocumented_options(passes: Mapping[str, type] | None = None) -> dict[str, list[str]]:
    """``{pass name: [options its docstrings do not describe]}`` over the registered passes (or ``passes``)."""
    from .recipe import pass_options, registry

    reg = dict(passes) if passes is not None else registry()
    out = {}
    for name, cls in sorted(reg.items()):
        docs = option_docs(cls)
        missing = [o for o in pass_options(cls) if not docs.get(o)]
        if missing:
            out[name] = missing
    return out


def pass_name(name: str, reg: Mapping[str, type]) -> str:
    """The registered name for ``name``: a registered name, a class name (``ChannelPrune``) or either spelled
    loosely (``channel-prune``, ``channelprune``); a usage error with a did-you-mean otherwise."""
    from .zoo import did_you_mean

    if name in reg:
        return name
    by_class = {c.__name__: n for n, c in reg.items()}
    if name in by_class:
        return by_class[name]

    def norm(x: str) -> str:
        return re.sub(r"[^a-z0-9]", "", x.lower())

    loose = {norm(n): n for n in reg} | {norm(c): n for c, n in by_class.items()}
    if norm(name) in loose:
        return loose[norm(name)]
    raise UsageError(f"unknown pass {name!r}{did_you_mean(name, list(reg) + list(by_class))}; registered: "
                     f"{', '.join(sorted(reg))} (or their class names)")


def _pass_rows(only: str | None = None) -> list[dict[str, Any]]:
    from .recipe import pass_options, registry

    reg = registry()
    if only is not None:
        only = pass_name(only, reg)
    rows = []
    for name, cls in sorted(reg.items()):
        if only is not None and name != only:
            continue
        docs = option_docs(cls)
        opts = []
        for pname, p in pass_options(cls).items():
            required = p.default is inspect.Parameter.empty
            default = None if required else p.default
            opts.append({"name": pname, "required": required,
                         "default": default if isinstance(default, (int, float, str, bool, type(None)))
                         else (list(default) if isinstance(default, tuple) else repr(default)),
                         "annotation": None if p.annotation is inspect.Parameter.empty else
                         (p.annotation if isinstance(p.annotation, str) else inspect.formatannotation(p.annotation)),
                         "doc": docs.get(pname, "")})
        full = _pass_doc(cls)
        rows.append({"name": name, "class": cls.__name__, "module": cls.__module__,
                     "doc": " ".join(full.split("\n\n")[0].split()), "full_doc": full,
                     "requires": sorted(getattr(cls, "requires", ())),
                     "modifies_weights": bool(cls.modifies_weights), "changes_graph": bool(cls.changes_graph),
                     "options": opts})
    return rows


def cmd_passes(args: argparse.Namespace) -> int:
    import shutil
    import textwrap

    with _quiet_libraries(args):
        rows = _pass_rows(args.name)
    if args.json:
        print(json.dumps(rows, indent=1, default=str))
        return 0
    width = max(60, min(120, shutil.get_terminal_size((120, 24)).columns))
    for r in rows:
        print(f"{r['name']}  ({r['class']}, {r['module']})")
        if args.name:
            print("\n".join("    " + ln if ln else "" for ln in r["full_doc"].splitlines()))
        else:
            print(textwrap.fill(r["doc"], width, initial_indent="    ", subsequent_indent="    "))
        if r["options"]:
            print("    options:")
        for o in r["options"]:
            dflt = "required" if o["required"] else f"default {o['default']!r}"
            doc = o["doc"] or "(not described in the pass' docstring)"
            print(textwrap.fill(f"{o['name']} ({dflt}): {doc}", width, initial_indent="      - ",
                                subsequent_indent="        "))
        print()
    print("use a pass in a recipe as:  - pass: NAME        (a registered name or the class name)\n"
          "                               OPTION: VALUE   (docs/cli.md)")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from .archive import read_report
    from .report import Report

    if args.rows < 0:
        raise UsageError(f"--rows must be an integer >= 0, got {args.rows}")
    data = read_report(args.dir)
    if args.json:
        print(json.dumps(data, indent=1))
        return 0
    rep = Report.from_dict(data, source=str(Path(args.dir) / "report.json"))
    print(rep.summary())
    if data.get("weights"):
        print(f"  weights: {data['weights']}")
    print(rep.table(max_rows=args.rows))
    if data.get("recipe"):
        from .recipe import recipe_to_yaml

        print("\nrecipe:\n" + "\n".join("  " + ln for ln in recipe_to_yaml(data["recipe"]).splitlines()))
    return 0


# ============================================================================================ parser
class _Parser(argparse.ArgumentParser):
    """argparse whose usage errors are :class:`UsageError` (one line, exit 2) instead of usage text + exit."""

    def error(self, message: str) -> Any:  # noqa: D401 - argparse's hook
        raise UsageError(f"{self.prog}: {message} (see {self.prog} --help)")


def version_text() -> str:
    """``fxprune 0.1.0 (torch 2.x, Python 3.x)``."""
    import platform

    import torch

    from . import __version__

    return f"fxprune {__version__} (torch {torch.__version__}, Python {platform.python_version()})"


def build_parser() -> argparse.ArgumentParser:
    from .zoo import HF_TASKS

    common = _Parser(add_help=False)
    common.add_argument("--json", action="store_true", help="machine-readable: JSON on stdout, JSON-lines progress")
    common.add_argument("--quiet", action="store_true", help="no progress output on stderr")
    common.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                        help="show Python tracebacks and library warnings")
    work = _Parser(add_help=False)
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

    ap = _Parser(prog="fxprune", description="A compiler for pruning neural networks.",
                 epilog="exit codes: 0 ok, 2 bad usage, 1 failure. Docs: docs/cli.md")
    ap.add_argument("--debug", action="store_true", help="show Python tracebacks and library warnings")
    ap.add_argument("--version", action="version", version=version_text(), help="print the version and exit")
    sub = ap.add_subparsers(dest="command", required=True, metavar="{demo,compile,report,passes}",
                            parser_class=_Parser)

    d = sub.add_parser("demo", parents=[common, work],
                       help="prune a reference model to half its measured latency, shrink, verify, export to "
                            "ONNX, time it, report",
                       description="Reference model -> LatencyPrune(target_latency) (or ChannelPrune(ratio)) -> "
                                   "Shrink (verified) -> ONNX (dense and pruned) -> onnxruntime latency, predicted "
                                   "and measured -> report, plot and saved program in --out.")
    d.add_argument("--model", default=DEMO_MODEL, help=f"reference model (default {DEMO_MODEL})")
    d.add_argument("--size", default="full", choices=["tiny", "full"], help="model size (default full)")
    d.add_argument("--target-latency", type=float, default=None, metavar="FRAC",
                   help="LatencyPrune to FRAC of the dense onnxruntime latency at --batch, widths chosen from "
                        "latencies measured on this machine (the default, 0.5)")
    d.add_argument("--ratio", type=float, default=None,
                   help="instead: ChannelPrune removing this fraction of channels (the default, 0.5, with "
                        "--no-onnx or --no-latency, which leave nothing to measure latency on)")
    d.set_defaults(fn=cmd_demo)

    c = sub.add_parser("compile", parents=[common, work], help="prune MODEL with a recipe; write program, ONNX, report",
                       description="MODEL: reference name, torchvision:NAME, timm:NAME, hf:NAME or file.py:factory.")
    c.add_argument("model", metavar="MODEL")
    c.add_argument("--recipe", required=True, help="YAML recipe (see docs/cli.md)")
    c.add_argument("--input-shape", default=None,
                   help="example input shape, e.g. 2,3,224,224 (hf: batch,seq); several inputs: 2,3,32,32;2,4; "
                        "a dtype after a shape: 2,16:int64")
    c.add_argument("--input", action="append", default=[], metavar="SHAPE[:DTYPE]",
                   help="one example input, typed: 2,16:int64 (token ids), 2,3,32,32 (float); repeat for several")
    c.add_argument("--input-dtype", default=None, metavar="DTYPE",
                   help="dtype of the example inputs: int64 (token ids), float16, bool, ...; one per input: "
                        "int64;int64")
    c.add_argument("--weights", default=None, help="state_dict to load (.pt/.pth via weights_only, .safetensors)")
    c.add_argument("--checkpoint", default=None, metavar="DIR",
                   help="hf: models: prune this safetensors checkpoint by streaming, without loading it "
                        "(docs/scale.md); --out must not exist")
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


_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f]")


def _fail(args: Any, code: int, kind: str, message: str) -> int:
    """Print the error as one line on stderr (JSON with --json), without terminal escape codes."""
    text = _CONTROL.sub("", strip_ansi(message).replace("\t", " "))
    main_text, _, fix = text.partition("\n  fix: ")
    lines = [ln.strip() for ln in main_text.splitlines() if ln.strip()]
    line = lines[0] if lines else kind
    fix = fix.strip().splitlines()[0].strip() if fix.strip() else ""
    if getattr(args, "json", False):
        print(json.dumps({"event": "error", "exit_code": code, "type": kind, "message": line, "fix": fix or None}),
              file=sys.stderr)
    else:
        print(f"fxprune: {'error' if code == 2 else kind}: {line}" + (f" (fix: {fix})" if fix else ""),
              file=sys.stderr)
    return code


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    ap = build_parser()
    try:
        args = ap.parse_args(argv)
    except UsageError as e:  # bad usage found by argparse: one line, exit 2
        if "--debug" in argv:
            raise
        return _fail(argparse.Namespace(json="--json" in argv), 2, "UsageError", str(e))
    except SystemExit as e:  # --help, --version
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

"""Pictures and Markdown for compile reports.

``plot_report(report, "report.png")``: one PNG (matplotlib, Agg backend, no display needed) with

* top: the fraction of each prunable group kept (after / before), channel groups and head groups (attention
  heads, conv groups) in their own colours, so a group of 4 heads shows as plainly as one of 512 channels (the
  counts are in the tick labels and in report.md);
* bottom: per-layer sparsity of the final module: the fraction of exactly-zero weights of every conv/linear
  weight (red; structured pruning removes channels instead of zeroing them, so this stays near 0 unless a
  fine-grained pass ran: unstructured, N:M, block sparsity) and, when the original model was known, the
  fraction of the layer's original weights that remain (blue).

``write_markdown(report, "report.md", plot="report.png")``: the summary, latency, recipe, per-group table and
per-layer sparsity as Markdown tables (labels in full, ``|`` escaped), embedding the picture.

``report`` is a :class:`~fxprune.report.Report`, a Compiled, or ``report.json``'s dict (what
:func:`fxprune.report.report_json` returns; it adds ``recipe`` and ``layer_sparsity`` to ``Report.to_dict()``).
This module reads reports only: it never imports the archive (save/load) or compile modules.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Mapping

from .report import Report, jsonable, report_json

__all__ = ["plot_report", "write_markdown", "markdown", "group_fractions"]


def _as_dict(report: Any) -> dict[str, Any]:
    """report.json's form of ``report`` (tuples as lists, as JSON has them: what Report.from_dict reads)."""
    if isinstance(report, Mapping):
        return jsonable(dict(report))
    if hasattr(report, "report") and hasattr(report, "module"):  # a Compiled
        return report_json(report)
    if isinstance(report, Report):
        return jsonable(report.to_dict())
    raise TypeError(f"expected a Report, a Compiled or a report dict, got {type(report).__name__}")


def group_fractions(report: Any) -> list[dict[str, Any]]:
    """What the top panel of :func:`plot_report` draws: for each prunable group, ``id``, ``kind`` (``"channels"`` or
    ``"heads"``), ``before``, ``after`` and ``kept`` = after / before."""
    d = _as_dict(report)
    return [{"id": g["id"], "kind": g.get("kind", "channels"), "before": g["before"], "after": g["after"],
             "kept": g["after"] / max(g["before"], 1)} for g in d.get("groups", []) if not g.get("frozen")]


def plot_report(report: Any, path: str | os.PathLike, *, max_bars: int = 120) -> Path:
    """Write the two-panel PNG to ``path`` and return it. Needs matplotlib (``pip install 'fxprune[plot]'``)."""
    try:
        import matplotlib
    except ImportError as e:
        from .errors import BackendUnavailableError

        raise BackendUnavailableError("matplotlib is not installed", fix="pip install 'fxprune[plot]'") from e
    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    d = _as_dict(report)
    groups = group_fractions(d)
    layers = d.get("layer_sparsity", [])
    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(max(8.0, min(18.0, 0.12 * max(len(groups), len(layers)) + 6)),
                                                  7.5), constrained_layout=True)
    # --- fraction of each prunable group kept; channels and heads in their own colours
    gs = groups[:max_bars]
    xs = list(range(len(gs)))
    if gs:
        colours = {"channels": "#2171b5", "heads": "#d94801"}
        kinds = sorted({g.get("kind", "channels") for g in gs}, key=lambda k: (k != "channels", k))
        ax1.bar(xs, [1.0] * len(gs), color="#e5e5e5", width=0.85, label="before (1.0)")
        for kind in kinds:
            idx = [i for i, g in enumerate(gs) if g.get("kind", "channels") == kind]
            ax1.bar(idx, [gs[i]["kept"] for i in idx],
                    color=colours.get(kind, "#6a51a3"), width=0.85, label=f"{kind} kept")
        ax1.set_ylim(0, 1.08)
        step = max(1, len(gs) // 30)
        ax1.set_xticks(xs[::step])
        ax1.set_xticklabels([f"{g['id']}\n{g['after']}/{g['before']}" for g in gs][::step], fontsize=6)
        ax1.legend(loc="lower right", fontsize=8)
    else:
        ax1.text(0.5, 0.5, "no prunable groups", ha="center", va="center", transform=ax1.transAxes)
    more = f" (first {max_bars} of {len(groups)})" if len(groups) > max_bars else ""
    ax1.set_title(f"{d.get('model', '')}: fraction of each prunable group kept{more}  "
                  f"(params x{d.get('params_ratio', 0):.3f}, MACs x{d.get('macs_ratio', 0):.3f})", fontsize=10)
    ax1.set_xlabel("group id, kept/before", fontsize=8)
    ax1.set_ylabel("fraction kept", fontsize=8)
    # --- per-layer sparsity
    ls = layers[:max_bars]
    lx = list(range(len(ls)))
    if ls:
        if any("kept_fraction" in r for r in ls):
            ax2.bar(lx, [r.get("kept_fraction", 1.0) for r in ls], color="#9ecae1", width=0.85,
                    label="weights kept (of the original layer)")
        ax2.bar(lx, [r["sparsity"] for r in ls], color="#cb181d", width=0.5, label="zero weights (sparsity)")
        ax2.set_ylim(0, 1.0)
        step = max(1, len(ls) // 40)
        ax2.set_xticks(lx[::step])
        ax2.set_xticklabels([_short(r["name"]) for r in ls][::step], rotation=90, fontsize=6)
        ax2.legend(loc="upper right", fontsize=8)
    else:
        ax2.text(0.5, 0.5, "no conv/linear weights", ha="center", va="center", transform=ax2.transAxes)
    more = f" (first {max_bars} of {len(layers)})" if len(layers) > max_bars else ""
    ax2.set_title(f"per conv/linear layer: fraction of zero weights in the final module, and of the original "
                  f"weights kept{more}", fontsize=10)
    ax2.set_ylabel("fraction", fontsize=8)
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def _short(name: str, n: int = 28) -> str:
    name = name[:-len(".weight")] if name.endswith(".weight") else name
    return name if len(name) <= n else "…" + name[-(n - 1):]


def _cell(v: Any) -> str:
    """A Markdown table cell: the whole text, ``|`` escaped, newlines as spaces."""
    return " ".join(str(v).split()).replace("|", "\\|")


def _code(v: Any) -> str:
    text = " ".join(str(v).split()).replace("|", "\\|")
    return f"`` {text} ``" if "`" in text else f"`{text}`"


def _num(v: Any) -> str:
    return f"{v:,}" if isinstance(v, int) and not isinstance(v, bool) else ("" if v is None else str(v))


def markdown(report: Any, *, plot: str | None = None, max_rows: int = 200) -> str:
    """The Markdown text of :func:`write_markdown`: summary, latency, plot, recipe, files, the group table and the
    per-layer sparsity, as Markdown tables with every label in full."""
    d = _as_dict(report)
    rep = Report.from_dict(d)
    verified = {None: "not run", True: "yes", False: "**NO**"}[rep.verified]
    if getattr(rep, "approximate", None):
        verified = "no: approximate by design (norms renormalized over the kept width)"
    out = [f"# fxprune report: {d.get('model', '')}", ""]
    out += ["| | before | after | ratio |", "|---|---:|---:|---:|",
            f"| params | {rep.params_before:,} | {rep.params_after:,} | {rep.params_ratio:.3f} |",
            f"| MACs | {rep.macs_before:,} | {rep.macs_after:,} | {rep.macs_ratio:.3f} |", ""]
    facts = [("verified (shrunk == masked)", verified + (f", max abs diff {rep.max_abs_diff:.3g}"
                                                        if rep.max_abs_diff is not None else "")),
             ("traced with", f"{rep.tracer}, {'dynamic' if rep.dynamic_batch else 'static'} batch, "
                             f"{rep.seconds:.2f} s")]
    if rep.observable is False:
        facts.append(("observable", "no: pruning did not change the output, so the check could not see it"))
    if d.get("source"):
        facts.append(("model", _code(d["source"])))
    if d.get("weights"):
        facts.append(("weights", _cell(d["weights"])))
    out += ["| | |", "|---|---|"] + [f"| {k} | {_cell(v) if k != 'model' else v} |" for k, v in facts] + [""]
    bench = d.get("benchmark")
    if bench:
        out += ["## Latency", "", "| backend | batch | threads | dense ms | pruned ms | speedup | ideal (MACs) |",
                "|---|---:|---:|---:|---:|---:|---:|"]
        for b in bench if isinstance(bench, list) else [bench]:
            out.append(f"| {b.get('backend')} | {_num(b.get('batch'))} | {_num(b.get('threads'))} | "
                       f"{_f(b.get('dense_ms'))} | {_f(b.get('pruned_ms'))} | {_f(b.get('speedup'), 'x')} | "
                       f"{_f(b.get('ideal_speedup'), 'x')} |")
        out.append("")
    elif rep.latency:
        out += ["## Latency", "", "| key | result |", "|---|---|"]
        out += [f"| {_cell(k)} | {_cell(v.get('text', v) if isinstance(v, Mapping) else v)} |"
                for k, v in rep.latency.items()] + [""]
    if plot:
        out += [f"![fraction of each group kept and per-layer sparsity]({plot})", ""]
    recipe = d.get("recipe")
    if recipe:
        import yaml

        out += ["## Recipe", "", "```yaml", yaml.safe_dump({"passes": recipe}, sort_keys=False).rstrip(), "```", ""]
    files = d.get("files")
    if files:
        out += ["## Files", "", "| file | content |", "|---|---|"]
        out += [f"| {_code(k)} | {_cell(v)} |" for k, v in files.items()] + [""]
    out += _group_table(rep, max_rows)
    layers = d.get("layer_sparsity", [])
    if layers:
        out += ["## Per-layer sparsity", "", "| layer | op | shape (original) | zero weights | sparsity | kept |",
                "|---|---|---|---:|---:|---:|"]
        for r in layers[:max_rows]:
            orig = f" ({'x'.join(map(str, r['orig_shape']))})" if r.get("orig_shape") else ""
            kept = f"{r['kept_fraction']:.3f}" if "kept_fraction" in r else ""
            out.append(f"| {_code(r['name'])} | {_cell(r['op'])} | {'x'.join(map(str, r['shape']))}{orig} | "
                       f"{r['zeros']:,} | {r['sparsity']:.3f} | {kept} |")
        if len(layers) > max_rows:
            out += ["", f"{len(layers) - max_rows} more layers in report.json (`layer_sparsity`)."]
        out.append("")
    notes = d.get("notes", []) or []
    if notes:
        out += ["## Notes", ""] + [f"- {_cell(n)}" for n in notes] + [""]
    return "\n".join(out).rstrip() + "\n"


def _group_table(rep: Report, max_rows: int) -> list[str]:
    out = ["## Groups", "", "Prunable groups first, then frozen ones (with the reason).", "",
           "| group | kind | channels | members | layer | importance min / mean / max | note |",
           "|---:|---|---|---:|---|---|---|"]
    shown = sorted(rep.groups, key=lambda g: (g.frozen is not None, g.id))
    for g in shown[:max_rows]:
        imp = " / ".join(f"{v:.3g}" for v in g.importance) if g.importance else ""
        note = f"frozen: {_cell(g.frozen)}" if g.frozen else ""
        out.append(f"| {g.id} | {g.kind} | {g.before} → {g.after} | {g.members} | {_code(g.label)} | {imp} | "
                   f"{note} |")
    if len(shown) > max_rows:
        out += ["", f"{len(shown) - max_rows} more groups in report.json (`groups`)."]
    out.append("")
    if rep.unknown_ops:
        out += ["Ops without a rule (the channels touching them are frozen):", ""]
        out += [f"- `{op}` at {', '.join(_code(n) for n in nodes)}" for op, nodes in rep.unknown_ops.items()]
        out.append("")
    return out


def _f(v: Any, unit: str = "") -> str:
    return "" if v is None else (f"{v:.3f}{unit}" if isinstance(v, (int, float)) else str(v))


def write_markdown(report: Any, path: str | os.PathLike, *, plot: str | None = None) -> Path:
    """Write :func:`markdown` to ``path``; ``plot`` is the picture's path relative to it."""
    p = Path(path)
    p.write_text(markdown(report, plot=plot), encoding="utf-8")
    return p

"""Pictures and Markdown for compile reports.

``plot_report(report, "report.png")``: one PNG (matplotlib, Agg backend, no display needed) with

* top: channels per prunable group, before (light) and after (dark) pruning;
* bottom: per-layer sparsity of the final module: the fraction of exactly-zero weights of every conv/linear
  weight (red; structured pruning removes channels instead of zeroing them, so this stays near 0 unless a
  fine-grained pass ran: unstructured, N:M, block sparsity) and, when the original model was known, the
  fraction of the layer's original weights that remain (blue).

``write_markdown(report, "report.md", plot="report.png")``: the summary, latency, recipe, per-group table and
per-layer sparsity as Markdown, embedding the picture.

``report`` is a :class:`~fxprune.report.Report`, a Compiled, or ``report.json``'s dict (what
:func:`fxprune.report.report_json` returns; it adds ``recipe`` and ``layer_sparsity`` to ``Report.to_dict()``).
This module reads reports only: it never imports the archive (save/load) or compile modules.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Mapping

from .report import Report, report_json

__all__ = ["plot_report", "write_markdown", "markdown"]


def _as_dict(report: Any) -> dict[str, Any]:
    if isinstance(report, Mapping):
        return dict(report)
    if hasattr(report, "report") and hasattr(report, "module"):  # a Compiled
        return report_json(report)
    if isinstance(report, Report):
        return report.to_dict()
    raise TypeError(f"expected a Report, a Compiled or a report dict, got {type(report).__name__}")


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
    groups = [g for g in d.get("groups", []) if not g.get("frozen")]
    layers = d.get("layer_sparsity", [])
    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(max(8.0, min(18.0, 0.12 * max(len(groups), len(layers)) + 6)),
                                                  7.5), constrained_layout=True)
    # --- channels per group
    gs = groups[:max_bars]
    xs = list(range(len(gs)))
    if gs:
        ax1.bar(xs, [g["before"] for g in gs], color="#c6dbef", label="before", width=0.85)
        ax1.bar(xs, [g["after"] for g in gs], color="#2171b5", label="after", width=0.85)
        step = max(1, len(gs) // 30)
        ax1.set_xticks(xs[::step])
        ax1.set_xticklabels([str(g["id"]) for g in gs][::step], fontsize=7)
        ax1.legend(loc="upper right", fontsize=8)
    else:
        ax1.text(0.5, 0.5, "no prunable groups", ha="center", va="center", transform=ax1.transAxes)
    more = f" (first {max_bars} of {len(groups)})" if len(groups) > max_bars else ""
    ax1.set_title(f"{d.get('model', '')}: channels per prunable group, before vs after{more}  "
                  f"(params x{d.get('params_ratio', 0):.3f}, MACs x{d.get('macs_ratio', 0):.3f})", fontsize=10)
    ax1.set_xlabel("group id", fontsize=8)
    ax1.set_ylabel("channels", fontsize=8)
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


def markdown(report: Any, *, plot: str | None = None, max_rows: int = 200) -> str:
    """The Markdown text of :func:`write_markdown`."""
    d = _as_dict(report)
    rep = Report.from_dict(d)
    out = [f"# fxprune report: {d.get('model', '')}", ""]
    out += ["```", rep.summary(), "```", ""]
    bench = d.get("benchmark")
    if bench:
        out += ["## Latency", "", "| backend | batch | threads | dense ms | pruned ms | speedup | ideal (MACs) |",
                "|---|---|---|---|---|---|---|"]
        for b in bench if isinstance(bench, list) else [bench]:
            out.append(f"| {b.get('backend')} | {b.get('batch')} | {b.get('threads')} | {_f(b.get('dense_ms'))} | "
                       f"{_f(b.get('pruned_ms'))} | {_f(b.get('speedup'), 'x')} | {_f(b.get('ideal_speedup'), 'x')} |")
        out.append("")
    if plot:
        out += [f"![channels per group and per-layer sparsity]({plot})", ""]
    recipe = d.get("recipe")
    if recipe:
        import yaml

        out += ["## Recipe", "", "```yaml", yaml.safe_dump({"passes": recipe}, sort_keys=False).rstrip(), "```", ""]
    files = d.get("files")
    if files:
        out += ["## Files", ""] + [f"- `{k}`: {v}" for k, v in files.items()] + [""]
    out += ["## Groups", "", "```", rep.table(max_rows=max_rows), "```", ""]
    layers = d.get("layer_sparsity", [])
    if layers:
        out += ["## Per-layer sparsity", "", "| layer | op | shape (original) | zero weights | sparsity | kept |",
                "|---|---|---|---|---|---|"]
        for r in layers[:max_rows]:
            orig = f" ({'x'.join(map(str, r['orig_shape']))})" if r.get("orig_shape") else ""
            kept = f"{r['kept_fraction']:.3f}" if "kept_fraction" in r else ""
            out.append(f"| `{r['name']}` | {r['op']} | {'x'.join(map(str, r['shape']))}{orig} | {r['zeros']:,} | "
                       f"{r['sparsity']:.3f} | {kept} |")
        if len(layers) > max_rows:
            out.append(f"\n... {len(layers) - max_rows} more layers in report.json")
        out.append("")
    for n in d.get("notes", []) or []:
        out.append(f"- note: {n}")
    return "\n".join(out).rstrip() + "\n"


def _f(v: Any, unit: str = "") -> str:
    return "" if v is None else (f"{v:.3f}{unit}" if isinstance(v, (int, float)) else str(v))


def write_markdown(report: Any, path: str | os.PathLike, *, plot: str | None = None) -> Path:
    """Write :func:`markdown` to ``path``; ``plot`` is the picture's path relative to it."""
    p = Path(path)
    p.write_text(markdown(report, plot=plot))
    return p

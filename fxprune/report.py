"""The compile report: params and MACs before/after, verification, and a per-group table."""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass
class GroupRow:
    id: int
    label: str
    kind: str
    members: int
    before: int
    after: int
    frozen: str | None = None
    importance: tuple[float, float, float] | None = None  # min, mean, max of the scores used


@dataclass
class Report:
    model: str
    tracer: str
    dynamic_batch: bool
    params_before: int
    params_after: int
    macs_before: int
    macs_after: int
    verified: bool | None = None  # None: no Shrink ran (nothing to verify)
    max_abs_diff: float | None = None
    observable: bool | None = None
    groups: list[GroupRow] = field(default_factory=list)
    passes: list[dict[str, Any]] = field(default_factory=list)
    unknown_ops: dict[str, list[str]] = field(default_factory=dict)
    frozen_by: list[dict[str, str]] = field(default_factory=list)
    latency: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0
    timings: dict[str, float] = field(default_factory=dict)  # seconds per phase: trace, analyze, <pass>, report

    @property
    def params_ratio(self) -> float:
        return self.params_after / max(self.params_before, 1)

    @property
    def macs_ratio(self) -> float:
        return self.macs_after / max(self.macs_before, 1)

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["params_ratio"] = self.params_ratio
        d["macs_ratio"] = self.macs_ratio
        return d

    def to_json(self, **kw: Any) -> str:
        return json.dumps(self.as_dict(), default=str, **kw)

    def summary(self) -> str:
        v = {None: "not run", True: "yes", False: "NO"}[self.verified]
        lines = [
            f"fxprune report: {self.model}  (traced with {self.tracer}, "
            f"{'dynamic' if self.dynamic_batch else 'static'} batch, {self.seconds:.2f} s)",
            f"  {'':<10}{'before':>16}{'after':>16}{'ratio':>10}",
            f"  {'params':<10}{self.params_before:>16,}{self.params_after:>16,}{self.params_ratio:>10.3f}",
            f"  {'MACs':<10}{self.macs_before:>16,}{self.macs_after:>16,}{self.macs_ratio:>10.3f}",
            f"  verified (shrunk == masked): {v}" + (f", max abs diff {self.max_abs_diff:.3g}"
                                                     if self.max_abs_diff is not None else "")
            + ("" if self.observable in (None, True) else "  [unobservable: pruning did not change the output]"),
        ]
        for k, val in self.latency.items():
            lines.append(f"  latency {k}: {val}")
        return "\n".join(lines)

    def table(self, max_rows: int = 60) -> str:
        head = (f"  {'group':>5}  {'kind':<8}  {'channels':>13}  {'members':>7}  {'layer':<40}  "
                f"{'importance min/mean/max':<24}  note")
        rows = [head, "  " + "-" * (len(head) + 8)]
        shown = sorted(self.groups, key=lambda g: (g.frozen is not None, g.id))
        for g in shown[:max_rows]:
            ch = f"{g.before} -> {g.after}"
            note = f"frozen: {g.frozen}" if g.frozen else ""
            imp = "/".join(f"{v:.3g}" for v in g.importance) if g.importance else ""
            rows.append(f"  {g.id:>5}  {g.kind:<8}  {ch:>13}  {g.members:>7}  {g.label[:40]:<40}  {imp:<24}  "
                        f"{note[:90]}")
        if len(shown) > max_rows:
            rows.append(f"  ... {len(shown) - max_rows} more groups (Report.as_dict() has all)")
        if self.unknown_ops:
            rows.append("  ops without a rule (channels touching them are frozen): " +
                        ", ".join(f"{k} at {', '.join(v[:3])}" for k, v in self.unknown_ops.items()))
        return "\n".join(rows)

    def __str__(self) -> str:
        return self.summary() + "\n" + self.table()

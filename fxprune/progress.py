"""Progress lines for long command-line work, on stderr.

    p = Progress(total=5)             # human lines: "[1/5] tracing ...  (0.0 s)"
    p = Progress(total=5, json=True)  # one JSON object per line: {"event": "step", "step": 1, "of": 5, ...}
    p = Progress(quiet=True)          # nothing
    p.step("tracing resnet56")
    p.info("dense ONNX written")      # a line without a step number

stdout is left alone so that ``--json`` output stays one parseable document.
"""
from __future__ import annotations

import json as _json
import sys
import time
from typing import Any, TextIO


class Progress:
    """Numbered steps with elapsed time, written to ``stream`` (default stderr)."""

    def __init__(self, total: int | None = None, *, quiet: bool = False, json: bool = False,
                 stream: TextIO | None = None):
        self.total = total
        self.quiet = quiet
        self.json = json
        self.stream = stream
        self.n = 0
        self.t0 = time.perf_counter()

    @property
    def elapsed(self) -> float:
        return time.perf_counter() - self.t0

    def _emit(self, text: str, record: dict[str, Any]) -> None:
        if self.quiet:
            return
        out = self.stream or sys.stderr
        if self.json:
            print(_json.dumps({**record, "elapsed_s": round(self.elapsed, 2)}, default=str), file=out, flush=True)
        else:
            print(f"{text}  ({self.elapsed:.1f} s)", file=out, flush=True)

    def step(self, message: str, **fields: Any) -> None:
        """Start step ``n + 1`` (of ``total``)."""
        self.n += 1
        of = f"/{self.total}" if self.total else ""
        self._emit(f"[{self.n}{of}] {message}", {"event": "step", "step": self.n, "of": self.total,
                                                 "message": message, **fields})

    def info(self, message: str, **fields: Any) -> None:
        """A line that belongs to the current step."""
        self._emit(f"      {message}", {"event": "info", "step": self.n, "message": message, **fields})

    def warn(self, message: str, **fields: Any) -> None:
        """A warning line (shown unless quiet)."""
        self._emit(f"      warning: {message}", {"event": "warning", "step": self.n, "message": message, **fields})

"""fxprune's logger: progress of the long steps of the Python API (trace, analyze, each pass, export).

fxprune logs to the standard :mod:`logging` logger ``"fxprune"`` (children such as ``"fxprune.onnx"``) and is
quiet by default, as libraries are: the logger has a :class:`logging.NullHandler`, so nothing is printed until the
application configures logging. To see the progress::

    import logging
    logging.basicConfig(level=logging.INFO)                  # everything at INFO and above, fxprune included
    logging.getLogger("fxprune").setLevel(logging.INFO)      # or fxprune alone (with a handler of your own)

INFO lines are one per step with its time (``trace: 1.42 s``); warnings (a static batch, a note about the model)
are WARNING; DEBUG adds details. Messages are plain text (no terminal colour codes).
"""
from __future__ import annotations

import contextlib
import logging
import time
from typing import Any, Iterator

logger = logging.getLogger("fxprune")
logger.addHandler(logging.NullHandler())


def get_logger(name: str | None = None) -> logging.Logger:
    """The ``fxprune`` logger, or its child ``fxprune.<name>``."""
    return logger.getChild(name) if name else logger


@contextlib.contextmanager
def timed(what: str, log: logging.Logger | None = None, level: int = logging.INFO) -> Iterator[dict[str, Any]]:
    """Log ``"<what> ..."`` at DEBUG when the block starts and ``"<what>: <seconds> s[, <details>]"`` at ``level``
    when it ends; the yielded dict collects ``details`` (a string) and holds ``seconds`` afterwards. Nothing is
    logged at the end when the block raises (the exception says what happened)."""
    lg = log or logger
    info: dict[str, Any] = {"details": ""}
    lg.debug("%s ...", what)
    t0 = time.perf_counter()
    yield info
    info["seconds"] = dt = time.perf_counter() - t0
    lg.log(level, "%s: %.2f s%s", what, dt, f", {info['details']}" if info.get("details") else "")

"""Deprecated: the old home of save/load/replay, kept while callers move. Use :mod:`fxprune.archive` (save, load,
read_report, kept_indices, FILES), :mod:`fxprune.replay` (replay) and :mod:`fxprune.report` (``Report.to_dict`` /
``Report.from_dict``, ``report_json``, ``layer_sparsity``, ``graph_facts``)."""
from __future__ import annotations

from .archive import FILES, FORMAT_VERSION, kept_indices, load, read_report, save
from .replay import replay
from .report import Report, graph_facts, layer_sparsity
from .report import report_json as report_dict

report_from_dict = Report.from_dict

__all__ = ["save", "load", "replay", "layer_sparsity", "report_from_dict", "report_dict", "read_report",
           "kept_indices", "graph_facts", "FILES", "FORMAT_VERSION"]

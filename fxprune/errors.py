"""Every error fxprune raises on purpose.

Each exception names what went wrong (the pass, node or module involved) and how to fix it. Catch
:class:`FxPruneError` to catch them all.
"""
from __future__ import annotations


class FxPruneError(Exception):
    """Base class of all fxprune errors."""

    def __init__(self, message: str, *, fix: str | None = None):
        self.fix = fix
        super().__init__(message if fix is None else f"{message}\n  fix: {fix}")


class InputError(FxPruneError, ValueError):
    """The arguments given to an fxprune API are invalid (wrong type, ratio out of range, ...)."""


class TraceError(FxPruneError):
    """The model could not be captured as a graph."""


class AnalysisError(FxPruneError):
    """The dependency analyzer could not process the graph."""


class BudgetError(FxPruneError, ValueError):
    """A pruning target cannot be reached (e.g. frozen channels alone exceed the MACs budget)."""


class PassError(FxPruneError):
    """A pass failed or broke an invariant. The previous program is left intact."""

    def __init__(self, message: str, *, pass_name: str, node: str | None = None, fix: str | None = None):
        self.pass_name = pass_name
        self.node = node
        where = f"pass {pass_name!r}" + (f" at node {node!r}" if node else "")
        super().__init__(f"{where}: {message}", fix=fix)


class StageError(PassError, InputError):
    """A pass was put where the pipeline cannot run it (e.g. a graph rewrite before the selection is applied)."""


class VerificationError(FxPruneError):
    """The shrunk program does not compute the same function as the masked program."""


class RecipeError(FxPruneError, ValueError):
    """A recipe names an unknown pass or option."""


class ExportError(FxPruneError):
    """Export to a deployment format failed or the exported model disagrees with torch."""


class BackendUnavailableError(FxPruneError, RuntimeError):
    """An optional backend (TensorRT, a GPU, onnxruntime, ...) is not installed or not usable here."""


class LoadError(FxPruneError):
    """A saved fxprune artifact could not be loaded."""


class MeasurementError(FxPruneError, RuntimeError):
    """A latency measurement failed or was too noisy to trust (a latency table, a measured latency target)."""

"""Built-in passes. Every pass is a small class with ``name``, ``requires`` and ``run(program, ctx)``.

Importing this package registers every pass below in ``fxprune.PASS_REGISTRY`` (recipes refer to them by name).
"""
from .apply_masks import ApplyMasks
from .block_sparsity import BlockSparseRewrite, BlockSparsity
from .bn_absorb import AbsorbBNShift
from .bn_prune import YOLOV4_QUANTILES, BNScalePrune, GroupChannelPrune
from .channel_prune import ChannelPrune
from .ftwt import FTWTGates, FTWTLoss
from .heads import HeadPrune
from .macprune import MACPruneGate
from .nm_sparsity import NMSparsity
from .pdp import PDP
from .shrink import Shrink
from .unstructured import Unstructured
from .think import ThinKCache; from .lowrank_kv import LowRankKV, LowRankKVCache  # noqa: E702 (KV-cache methods)
from .udfc import UDFCompensate
from .pagcp import PAGCP; from .precrop import PreCrop; from .tas import TASearch, TASTrainer  # noqa: E702 (issue 15)

__all__ = ["ChannelPrune", "ApplyMasks", "Shrink", "BNScalePrune", "GroupChannelPrune", "AbsorbBNShift",
           "YOLOV4_QUANTILES", "Unstructured", "NMSparsity", "BlockSparsity", "BlockSparseRewrite", "HeadPrune",
           "PDP", "MACPruneGate", "FTWTGates", "FTWTLoss"]
from .latency_prune import LatencyPrune  # noqa: E402 (issue 17: latency-aware widths)

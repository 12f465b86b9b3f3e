"""Built-in passes. Every pass is a small class with ``name``, ``requires`` and ``run(program, ctx)``."""
from .apply_masks import ApplyMasks
from .bn_absorb import AbsorbBNShift
from .bn_prune import YOLOV4_QUANTILES, BNScalePrune, GroupChannelPrune
from .channel_prune import ChannelPrune
from .shrink import Shrink

__all__ = ["ChannelPrune", "ApplyMasks", "Shrink", "BNScalePrune", "GroupChannelPrune", "AbsorbBNShift",
           "YOLOV4_QUANTILES"]

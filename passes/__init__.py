"""Built-in passes. Every pass is a small class with ``name``, ``requires`` and ``run(program, ctx)``."""
from .apply_masks import ApplyMasks
from .channel_prune import ChannelPrune
from .shrink import Shrink

__all__ = ["ChannelPrune", "ApplyMasks", "Shrink"]

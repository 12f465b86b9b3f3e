"""Registry entry ``resnet56``: CIFAR ResNet-56 (BasicBlocks, 1x1-conv+BN downsample shortcuts); see :mod:`.resnet`.

forward(x: (B, 3, 32, 32)) -> logits (B, 10). Sizes: "tiny" (ResNet-8, width 8), "full" (ResNet-56, 16/32/64).
"""
from .resnet import RESNET56_SIZES as SIZES
from .resnet import build_resnet56 as build
from .resnet import example_inputs_resnet56 as example_inputs

__all__ = ["SIZES", "build", "example_inputs"]

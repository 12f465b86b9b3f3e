"""Registry entry ``resnet50``: ImageNet-style ResNet-50-like (Bottlenecks [3, 4, 6, 3]); see :mod:`.resnet`.

forward(x: (B, 3, img, img)) -> logits (B, num_classes). Sizes: "tiny" (64x64, [1, 1, 1, 1], width 8, 10 classes),
"full" (224x224, [3, 4, 6, 3], width 64, 1000 classes).
"""
from .resnet import RESNET50_SIZES as SIZES
from .resnet import build_resnet50 as build
from .resnet import example_inputs_resnet50 as example_inputs

__all__ = ["SIZES", "build", "example_inputs"]

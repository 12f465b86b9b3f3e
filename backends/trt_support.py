"""What TensorRT's ONNX parser accepts: the operator table used by :func:`fxprune.backends.tensorrt.check`.

Source: onnx-tensorrt ``docs/operators.md`` at the 10.1-GA release (parser of TensorRT 10.0/10.1; opsets 9 to 20).
Update :data:`TRT_VERSION`, :data:`TRT_OPSET_RANGE` and the tables together when moving to a newer release.
Later TensorRT 10.x parsers accept more (never fewer) operators, so a file that passes here parses there.
"""
from __future__ import annotations

TRT_VERSION = "10.1"
TABLE_SOURCE = "onnx-tensorrt docs/operators.md, release 10.1-GA"
TRT_OPSET_RANGE = (9, 20)

_F = "FP32, FP16, BF16"
_FI = "FP32, FP16, BF16, INT32, INT64"
_FIB = "FP32, FP16, BF16, INT32, INT64, BOOL"

# op_type (default ONNX domain) -> (supported tensor types, restriction or "")
SUPPORTED_OPS: dict[str, tuple[str, str]] = {
    "Abs": (_FI, ""), "Acos": (_F, ""), "Acosh": (_F, ""), "Add": (_FI, ""), "And": ("BOOL", ""),
    "ArgMax": (_FI, ""), "ArgMin": (_FI, ""), "Asin": (_F, ""), "Asinh": (_F, ""), "Atan": (_F, ""),
    "Atanh": (_F, ""),
    "AveragePool": (_F, "1D (expanded to 2D), 2D or 3D pooling; dilations must be absent or all 1"),
    "BatchNormalization": (_F, ""),
    "Cast": ("FP32, FP16, BF16, INT32, INT64, UINT8, BOOL", ""),
    "CastLike": ("FP32, FP16, BF16, INT32, INT64, UINT8, BOOL", ""),
    "Ceil": (_F, ""), "Celu": (_F, ""), "Clip": (_F, "float min/max inputs must be initializers"), "Concat": (_FIB, ""),
    "Constant": (_FIB, "sparse_value, value_string and value_strings attributes are not supported"),
    "ConstantOfShape": (_FIB, ""), "Conv": (_F, "bias must be an initializer"), "ConvTranspose": (_F, ""),
    "Cos": (_F, ""),
    "Cosh": (_F, ""),
    "CumSum": (_F, "axis must be an initializer"),
    "DeformConv": ("FP32, FP16", "1D or 2D spatial input only; begin and end pads must be equal per axis"),
    "DepthToSpace": (_FI, ""),
    "DequantizeLinear": ("INT8, FP8, INT4", "x_zero_point must be zero"),
    "Div": (_FI, ""),
    "Dropout": (_F, "is_training must be an initializer that is False"),
    "Einsum": (_F, ""), "Elu": (_F, ""), "Equal": (_FI, ""), "Erf": (_F, ""), "Exp": (_F, ""),
    "Expand": (_FIB, ""),
    "EyeLike": (_FIB, "input must have static dimensions"),
    "Flatten": (_FIB, ""), "Floor": (_F, ""), "Gather": (_FIB, ""), "GatherElements": (_FIB, ""),
    "GatherND": (_FIB, ""), "Gelu": ("FP32, FP16, BF16, INT8, INT32, INT64", ""), "Gemm": (_F, ""),
    "GlobalAveragePool": (_F, ""), "GlobalLpPool": (_F, ""), "GlobalMaxPool": (_F, ""), "Greater": (_FI, ""),
    "GreaterOrEqual": (_FI, ""),
    "GridSample": ("FP32, FP16", "input must be 4D"),
    "GroupNormalization": (_F, ""),
    "GRU": (_F, "bidirectional: both directions must use the same activations"),
    "HardSigmoid": (_F, ""), "HardSwish": (_F, ""),
    "Hardmax": (_F, "the size of the axis dimension must be known at build time"),
    "Identity": (_FIB, ""),
    "If": (_FIB, "both branches' outputs must have the same rank and distinct names"),
    "ImageScaler": (_F, ""), "InstanceNormalization": (_F, ""), "IsInf": (_F, ""), "IsNaN": (_FI, ""),
    "LayerNormalization": (_F, "only the first output (Y) is supported"),
    "LeakyRelu": (_F, ""), "Less": (_FI, ""), "LessOrEqual": (_FI, ""), "Log": (_F, ""), "LogSoftmax": (_F, ""),
    "Loop": (_FIB, "scan outputs need a static length; loop-carried shapes must not change between iterations"),
    "LRN": (_F, ""),
    "LSTM": (_F, "bidirectional: same activations both ways; input_forget must be 0; layout must be 0"),
    "LpNormalization": (_F, ""),
    "LpPool": (_F, "dilations must be absent or all 1"),
    "MatMul": (_F, ""), "Max": (_FI, ""),
    "MaxPool": (_F, "1D (expanded to 2D), 2D or 3D pooling; the Indices output is not supported; dilations must "
                    "be absent or all 1"),
    "Mean": ("FP32, FP16, BF16, FP8, INT32, INT64", ""), "MeanVarianceNormalization": (_F, ""), "Min": (_FI, ""),
    "Mish": ("FP32, FP16", ""), "Mod": (_FI, ""), "Mul": (_FI, ""), "Neg": (_FI, ""),
    "NonMaxSuppression": ("FP32, FP16", ""), "NonZero": ("FP32, FP16", ""), "Not": ("BOOL", ""),
    "OneHot": (_FIB, "depth must be known at build time"),
    "Or": ("BOOL", ""),
    "Pad": (_FI, "axes must be an initializer"),
    "ParametricSoftplus": (_F, ""), "Pow": (_F, ""), "PRelu": (_F, ""),
    "QuantizeLinear": (_F, "y_zero_point must be zero"),
    "RandomNormal": (_F, "seed is ignored"), "RandomNormalLike": (_F, "seed is ignored"),
    "RandomUniform": (_F, "seed is ignored"), "RandomUniformLike": (_F, "seed is ignored"),
    "Range": (_FI, ""), "Reciprocal": (_F, ""),
    **{op: (_FI, "axes must be an initializer") for op in (
        "ReduceL1", "ReduceL2", "ReduceLogSum", "ReduceLogSumExp", "ReduceMax", "ReduceMean", "ReduceMin",
        "ReduceProd", "ReduceSum", "ReduceSumSquare")},
    "Relu": (_FI, ""), "Reshape": (_FIB, ""),
    "Resize": (_F, "modes nearest/linear only (no cubic); coordinate modes half_pixel, pytorch_half_pixel, "
                   "tf_half_pixel_for_nn, asymmetric, align_corners; aspect ratio policy stretch; no antialias; "
                   "with a scales tensor, axes must be 0..rank-1"),
    "ReverseSequence": (_FIB, ""),
    "RNN": (_F, "bidirectional: both directions must use the same activations"),
    "RoiAlign": ("FP32, FP16", ""), "Round": (_F, ""), "ScaledTanh": (_F, ""), "Scan": (_F, ""),
    "Scatter": (_FI, ""), "ScatterElements": (_FI, ""),
    "ScatterND": (_FI, "the reduction attribute is not supported"),
    "Selu": (_F, ""), "Shape": (_FIB, ""), "Shrink": (_FI, ""), "Sigmoid": (_F, ""), "Sign": (_FI, ""),
    "Sin": (_F, ""), "Sinh": (_F, ""), "Size": (_FIB, ""),
    "Slice": (_FIB, "axes must be an initializer"),
    "Softmax": (_F, ""), "Softplus": (_F, ""), "Softsign": (_F, ""), "SpaceToDepth": (_FI, ""),
    "Split": (_FIB, ""), "Sqrt": (_F, ""),
    "Squeeze": (_FIB, "axes must be an initializer"),
    "Sub": (_FI, ""), "Sum": (_FI, ""), "Tan": (_F, ""), "Tanh": (_F, ""), "ThresholdedRelu": (_F, ""),
    "Tile": (_FIB, ""),
    "TopK": (_FI, "sorted must be 1; K must be below 3840"),
    "Transpose": (_FIB, ""), "Trilu": (_FIB, ""),
    "Unsqueeze": (_FIB, "axes must be a constant tensor"),
    "Upsample": (_F, ""), "Where": (_FIB, ""), "Xor": ("BOOL", ""),
}

# ops the table lists as not supported (anything absent from SUPPORTED_OPS is unsupported as well)
UNSUPPORTED_OPS: frozenset[str] = frozenset({
    "AffineGrid", "Bernoulli", "BitShift", "BitwiseAnd", "BitwiseNot", "BitwiseOr", "BitwiseXor", "BlackmanWindow",
    "Col2Im", "CenterCropPad", "Compress", "ConcatFromSequence", "ConvInteger", "DFT", "Det",
    "DynamicQuantizeLinear", "HammingWindow", "HannWindow", "ImageDecoder", "MatMulInteger", "MaxRoiPool",
    "MaxUnpool", "MelWeightMatrix", "Multinomial", "NegativeLogLikelihoodLoss", "Optional", "OptionalGetElement",
    "OptionalHasElement", "QLinearConv", "QLinearMatMul", "RegexFullMatch", "STFT", "SequenceAt",
    "SequenceConstruct", "SequenceEmpty", "SequenceErase", "SequenceInsert", "SequenceLength", "SequenceMap",
    "SoftmaxCrossEntropyLoss", "SplitToSequence", "StringConcat", "StringNormalizer", "StringSplit",
    "TfIdfVectorizer", "Unique",
})

# op_type -> indices of inputs the parser reads as weights: they must be initializers or Constant outputs
# (the "... must be an initializer" restrictions; Conv bias and Clip min/max are enforced by the parser's code)
CONSTANT_INPUTS: dict[str, tuple[int, ...]] = {
    "CumSum": (1,), "Pad": (3,), "Slice": (3,), "Squeeze": (1,), "Dropout": (2,), "Conv": (2,), "Clip": (1, 2),
    **{op: (1,) for op in ("ReduceL1", "ReduceL2", "ReduceLogSum", "ReduceLogSumExp", "ReduceMax", "ReduceMean",
                           "ReduceMin", "ReduceProd", "ReduceSum", "ReduceSumSquare")},
}
# inputs whose values only need to be known at build time (constant-foldable shape arithmetic is fine)
BUILD_TIME_INPUTS: dict[str, tuple[int, ...]] = {"Unsqueeze": (1,), "OneHot": (1,)}

# ONNX TensorProto element types (onnx.TensorProto.DataType values; kept numeric so no onnx import is needed)
DTYPE_NAMES = {1: "FLOAT", 2: "UINT8", 3: "INT8", 4: "UINT16", 5: "INT16", 6: "INT32", 7: "INT64", 8: "STRING",
               9: "BOOL", 10: "FLOAT16", 11: "DOUBLE", 12: "UINT32", 13: "UINT64", 14: "COMPLEX64",
               15: "COMPLEX128", 16: "BFLOAT16", 17: "FLOAT8E4M3FN", 18: "FLOAT8E4M3FNUZ", 19: "FLOAT8E5M2",
               20: "FLOAT8E5M2FNUZ", 21: "UINT4", 22: "INT4", 23: "FLOAT4E2M1"}
SUPPORTED_DTYPES = frozenset({1, 6, 7, 9, 10, 16})  # FLOAT, INT32, INT64, BOOL, FLOAT16, BFLOAT16
# usable with a caveat: DOUBLE is cast to FLOAT (clamped to +-FLT_MAX); INT8/INT4/FP8 only as quantized types
# (through Q/DQ from a wider float); UINT8 only as a network input or output
LIMITED_DTYPES: dict[int, str] = {
    11: "DOUBLE is cast down to FLOAT (values clamped to +-FLT_MAX)",
    3: "INT8 is only usable as a quantized type (Q/DQ from a wider float)",
    22: "INT4 is only usable as a quantized type (Q/DQ from a wider float)",
    17: "FP8 is only usable as a quantized type (Q/DQ from a wider float)",
    2: "UINT8 is only supported for network inputs and outputs",
}


def op_note(op_type: str) -> str:
    """The restriction the table records for ``op_type`` ("" if none or unknown)."""
    return SUPPORTED_OPS.get(op_type, ("", ""))[1]

"""A failed trace says why (issues 11 and 12): TraceError.cause classifies it (device, dtype, shape, control flow,
unsupported op, dynamic dims), names the user's file:line where it applies, gives the matching fix, and carries no
terminal colour codes."""
import pytest
import torch
import torch.nn as nn

import fxprune
from fxprune.errors import FxPruneError, TraceError


class Emb(nn.Module):
    def __init__(self):
        super().__init__()
        self.e = nn.Embedding(50, 8)
        self.fc = nn.Linear(8, 2)

    def forward(self, ids):
        return self.fc(self.e(ids))


class Conv(nn.Module):
    def __init__(self):
        super().__init__()
        self.c = nn.Conv2d(3, 8, 3)

    def forward(self, x):
        return self.c(x)


class Branch(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(4, 4), nn.Linear(4, 4)

    def forward(self, x):
        if x.sum() > 0:  # BRANCH-LINE: data-dependent Python control flow
            return self.a(x)
        return self.b(x)


class Item(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(4, 4)

    def forward(self, x):
        k = int(self.a(x).abs().max().item())  # ITEM-LINE
        return self.a(x) * k


@torch.library.custom_op("fxprune_test::opaque", mutates_args=())
def _opaque(x: torch.Tensor) -> torch.Tensor:
    return x.clone()


class Custom(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(4, 4)

    def forward(self, x):
        return _opaque(self.a(x))


def _line(tag: str) -> int:
    src = open(__file__).read().splitlines()
    return next(i + 1 for i, line in enumerate(src) if tag in line and "_line(" not in line)


def _trace_error(model, inputs, **kw) -> TraceError:
    with pytest.raises(TraceError) as e:
        fxprune.compile(model, inputs, passes=[], **kw)
    err = e.value
    assert isinstance(err, FxPruneError) and err.fix
    assert "\x1b" not in str(err)
    return err


def test_float_ids_into_an_embedding_is_a_dtype_error():
    err = _trace_error(Emb().eval(), (torch.randn(2, 5),))
    assert err.cause == "dtype"
    assert "example input dtype mismatch" in str(err) and "torch.long" in err.fix
    assert "control flow" not in str(err)


def test_wrong_channel_count_is_a_shape_error():
    err = _trace_error(Conv().eval(), (torch.randn(2, 4, 8, 8),))
    assert err.cause == "shape"
    assert "channels" in str(err) and "shape the model expects" in err.fix


def test_data_dependent_branch_names_the_users_line():
    err = _trace_error(Branch().eval(), (torch.randn(2, 4),))
    assert err.cause == "control_flow"
    assert err.where == f"{__file__}:{_line('BRANCH-LINE')}"
    assert "if x.sum() > 0" in str(err) and "torch.where" in err.fix


def test_item_is_data_dependent_too():
    err = _trace_error(Item().eval(), (torch.randn(2, 4),))
    assert err.cause == "control_flow"
    assert err.where == f"{__file__}:{_line('ITEM-LINE')}"


def test_op_without_a_fake_implementation_is_unsupported():
    err = _trace_error(Custom().eval(), (torch.randn(2, 4),))
    assert err.cause == "unsupported_op"
    assert "register_fake" in err.fix


def test_device_mismatch_is_named_before_tracing():
    with torch.device("meta"):
        m = Conv()
    err = _trace_error(m, (torch.randn(2, 3, 8, 8),))
    assert err.cause == "device"
    assert "meta" in str(err) and "'x'" in str(err) and "device='meta'" in err.fix
    assert "control flow" not in str(err)


def test_explicit_dynamic_dims_the_model_fixes():
    class Fixed(nn.Module):
        def __init__(self):
            super().__init__()
            self.c = nn.Conv2d(3, 4, 3)

        def forward(self, x):
            return self.c(x).reshape(2, -1)

    err = _trace_error(Fixed().eval(), (torch.randn(2, 3, 8, 8),), dynamic={"x": {0: "batch"}})
    assert err.cause == "dynamic_shapes" and "dynamic=" in err.fix


def test_analyze_raises_the_same_classified_errors():
    with pytest.raises(TraceError) as e:
        fxprune.analyze(Emb().eval(), (torch.randn(2, 5),))
    assert e.value.cause == "dtype"


def test_float64_example_for_a_float32_model_is_a_dtype_error():
    # export's fake tensors let float64 x float32 conv through; the first real run used to fail inside torch
    with pytest.raises(TraceError) as e:
        fxprune.compile(Conv().eval(), (torch.randn(2, 3, 8, 8, dtype=torch.float64),))
    assert e.value.cause == "dtype" and "float64" in str(e.value)


def test_a_model_that_casts_its_input_is_not_refused():
    class Cast(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 3)

        def forward(self, x):
            return self.fc(x.to(self.fc.weight.dtype))

    out = fxprune.compile(Cast().eval(), (torch.randn(2, 4, dtype=torch.float64),))
    assert out.module(torch.randn(5, 4, dtype=torch.float64)).shape == (5, 3)

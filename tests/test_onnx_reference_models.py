"""Every reference model, pruned at 50% and shrunk, exports to ONNX with a dynamic batch and matches torch in
onnxruntime (parity checked by the backend at the example batch and at batch + 3)."""
import pytest
import torch

pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

import fxprune  # noqa: E402
from fxprune import models  # noqa: E402
from fxprune.backends import onnx as fx_onnx  # noqa: E402
from fxprune.passes import ChannelPrune, Shrink  # noqa: E402
from fxprune.testing import make_observable  # noqa: E402


@pytest.mark.parametrize("name", models.names())
def test_pruned_reference_model_onnx_parity(name, tmp_path):
    model, inputs = models.get(name, size="tiny", seed=0, batch=2)
    make_observable(model, 0)
    out = fxprune.compile(model, inputs, passes=[ChannelPrune(0.5), Shrink()])
    assert out.report.verified is True
    assert out.report.params_after < out.report.params_before
    res = fx_onnx.export(out, inputs, tmp_path / f"{name}.onnx", dynamic_batch=True)
    assert res.max_abs_diff, "parity was not checked"
    assert res.dynamic_batch, res.notes
    assert len(res.parity_batch_sizes) == 2  # example batch and a different one
    # the file holds the shrunk weights: fewer initializer elements than the dense model has parameters (tied
    # weights and rotary tables may be duplicated as constants, so this is not compared with params_after)
    import onnx

    proto = onnx.load(res.path)
    n_init = sum(int(torch.tensor(list(i.dims)).prod()) if i.dims else 1 for i in proto.graph.initializer)
    assert n_init < out.report.params_before

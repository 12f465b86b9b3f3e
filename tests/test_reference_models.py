"""Every reference model at ratio 0.5: MACs fall, shrunk == masked on fresh inputs, output shapes unchanged."""
import pytest
import torch
from torch.utils._pytree import tree_flatten

import fxprune
from fxprune import models
from fxprune.passes import ApplyMasks, ChannelPrune, Shrink
from fxprune.testing import make_observable
from fxprune.verify import random_like


def _leaves(out):
    return [x for x in tree_flatten(out)[0] if isinstance(x, torch.Tensor)]


@pytest.mark.parametrize("name", models.names())
def test_reference_model(name):
    model, inputs = models.get(name, size="tiny", seed=0, batch=2)
    make_observable(model, seed=0)
    shrunk = fxprune.compile(model, inputs, passes=[ChannelPrune(0.5), Shrink()])
    masked = fxprune.compile(model, inputs, passes=[ChannelPrune(0.5), ApplyMasks()])
    r = shrunk.report
    assert r.verified is True and r.observable is not False
    assert r.macs_after < r.macs_before and r.params_after < r.params_before
    args, kwargs = random_like(inputs, {}, seed=5)
    with torch.no_grad():
        ys, ym, yd = _leaves(shrunk.module(*args)), _leaves(masked.module(*args)), _leaves(model(*args))
    assert [y.shape for y in ys] == [y.shape for y in yd]
    for a, b in zip(ys, ym):
        assert (a - b).abs().max() <= 1e-4 * max(float(b.abs().max()), 1e-6)

"""The end-to-end example pipelines on tiny settings (the scripts in examples/ run the same code, bigger).

By default each recipe runs once end to end (YOLOv8 recipe on the detector, YOLOv4 recipe on the Fashion-MNIST CNN);
the other two combinations are marked slow (``-m slow``) to keep this file under a minute on 2 shared cores."""
import importlib.util
import math
import sys
from pathlib import Path

import pytest
import torch

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def load(name):
    spec = importlib.util.spec_from_file_location(f"fxprune_example_{name}", EXAMPLES / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up
    spec.loader.exec_module(mod)
    return mod


def finite(metrics):
    return all(math.isfinite(v) for v in metrics.values())


def test_synthetic_detection_data_and_loss():
    y8 = load("yolov8_pipeline")
    model, spec, _ = y8.get_detector("tiny")
    x, boxes = y8.synthetic_detection(4, spec.image_size, seed=0)
    x2, boxes2 = y8.synthetic_detection(4, spec.image_size, seed=0)
    assert torch.equal(x, x2) and all(torch.equal(a, b) for a, b in zip(boxes, boxes2))  # seeded
    t = y8.build_targets(boxes, spec)
    assert sum(int(tt["pos"].sum()) for tt in t) == sum(len(b) for b in boxes)
    outs = model.eval()(x)
    assert len(outs) == 3
    loss = y8.detection_loss(outs, t, spec)
    assert loss.ndim == 0 and math.isfinite(float(loss.detach()))


def test_yolov8_pipeline_tiny():
    y8 = load("yolov8_pipeline")
    res = y8.run("tiny", log=lambda s: None)
    assert res["verified"] and res["macs_after"] < 0.5 * res["macs_before"]
    assert len(res["taps"]) == 3 and res["adapters"] == 3  # CWD adapters where channel counts shrank
    assert res["absorb"]["layers_absorbed"] > 0
    for k in ("dense", "sparse", "pruned", "final"):
        assert finite(res[k])
    size, strides = res["image_size"], res["strides"]
    with torch.no_grad():
        outs = res["module"](torch.randn(3, 3, size, size))
    assert [o.shape[-1] for o in outs] == [size // s for s in strides]


@pytest.mark.slow  # the YOLOv4 recipe runs by default on the CNN (test_fashion_mnist_yolov4_pipeline_tiny)
def test_yolov4_pipeline_tiny():
    y4 = load("yolov4_pipeline")
    res = y4.run("tiny", log=lambda s: None)
    assert res["verified"] and res["macs_after"] < res["macs_before"]
    parts = res["partitions"]
    assert len({p.split("/")[0] for p in parts}) >= 3  # several feature scales
    for name, p in parts.items():  # per-partition ratios follow the quantiles (min-channel floor aside)
        assert p["ratio"] <= p["quantile"] + 1e-9
        if not p["floored_groups"]:
            assert abs(p["ratio"] - p["quantile"]) <= 1.0 / p["channels"] + 1e-9
    assert finite(res["final"])


def _fashion(pipeline):
    from fxprune.data import fashion_mnist_dir

    if fashion_mnist_dir() is None:
        pytest.skip("Fashion-MNIST not installed (apt-get install dataset-fashion-mnist)")
    fm = load("fashion_mnist_pipeline")
    res = fm.run(pipeline, train_limit=2048, test_limit=512, epochs=1, ft_epochs=1, log=lambda s: None)
    assert res["verified"] and res["macs_after"] < 0.5 * res["macs_before"]
    assert res["acc_final"] > 0.2  # far above chance (0.1) after a couple of thousand images
    return res


@pytest.mark.slow  # the YOLOv8 recipe runs by default on the detector (test_yolov8_pipeline_tiny)
def test_fashion_mnist_yolov8_pipeline_tiny():
    _fashion("yolov8")


def test_fashion_mnist_yolov4_pipeline_tiny():
    res = _fashion("yolov4")
    assert {p.split("/")[0] for p in res["partitions"]} == {"s1", "s2", "s4"}

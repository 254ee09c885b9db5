"""INT8 options of pipeline.lib.quantize: weight-scale granularity, activation type, excluded
layers, and their validation (on a tiny lenet, like tests/test_predict.py)."""
from __future__ import annotations

import json
from pathlib import Path

import mxnet as mx
import numpy as np
import pytest

from pipeline.lib import quantize as Q
from tests.conftest import train_lenet

NET = "lenet"
pytestmark = pytest.mark.skipif(not mx.runtime.Features().is_enabled("MKLDNN"),
                                reason="INT8 needs oneDNN")


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> tuple[Path, Path]:
    """(records, checkpoints) of a lenet trained for one epoch on tiny synthetic data."""
    return train_lenet(tmp_path_factory.mktemp("quantize"), test=4)


@pytest.fixture(scope="module")
def net_and_inputs(trained):
    """The fp32 net as predict runs it, and 24 calibration views of its training records."""
    from pipeline.lib.checkpoint import load_model, run_dir
    from pipeline.lib.records import RecordReader, fold_indices, load_meta
    from pipeline.lib.tta import tta_matrices

    records, ck = trained
    net, spec = load_model(run_dir(ck, NET, 0))
    net.hybridize(static_alloc=True)
    train_idx, _ = fold_indices(load_meta(records), 0)
    matrices = tta_matrices(spec["augment"], 8, spec["size"], "random", 0)
    reader = RecordReader(records, "train")
    rec, tr = Q.calibration_plan(train_idx, 24, len(matrices), seed=0)
    return net, Q.calibration_inputs(reader, rec, tr, matrices), (reader, train_idx, matrices)


def graph_nodes(qnet) -> list[dict]:
    """The nodes of the quantized graph (ops and attributes)."""
    return json.loads(qnet(mx.sym.var("data")).tojson())["nodes"]


def test_granularity_sets_per_unit_classifier_scales(net_and_inputs):
    net, calib, _ = net_and_inputs
    x = mx.nd.array(calib[:6])
    ref = net(x).asnumpy()
    for granularity, flag in (("tensor-wise", None), ("channel-wise", "True")):
        qnet = Q.quantize(net, calib, granularity=granularity)
        fc = [n for n in graph_nodes(qnet) if n["op"] == "_sg_mkldnn_fully_connected"]
        assert fc and all(n.get("attrs", {}).get("channel_wise_quantize") == flag for n in fc)
        out = qnet(x).asnumpy()
        assert out.shape == ref.shape and np.abs(out - ref).max() < 0.25 * np.abs(ref).max()


def test_exclude_and_dtype_reach_the_graph(net_and_inputs):
    net, calib, _ = net_and_inputs
    layers = Q.quantized_layers(net)
    assert "conv" in layers[0] and "dense" in layers[-1] and len(layers) >= 3
    qnet = Q.quantize(net, calib, exclude=layers[:-1], dtype="int8")
    nodes = graph_nodes(qnet)
    quantized = [n for n in nodes if n.get("attrs", {}).get("quantized", "").lower() == "true"]
    assert [n["op"] for n in quantized] == ["_sg_mkldnn_fully_connected"]
    assert np.isfinite(qnet(mx.nd.array(calib[:3])).asnumpy()).all()


def test_int8_net_takes_named_options(net_and_inputs):
    net, _, (reader, train_idx, matrices) = net_and_inputs
    opts = dict(calib_images=16, calib_mode="naive", keep_fp32=[], seed=0)
    _, about = Q.int8_net(net, reader, train_idx, matrices, granularity="tensor-wise", **opts)
    assert about["int8_granularity"] == "tensor-wise" and about["keep_fp32"] == []
    opts.update(keep_fp32=["first_conv"])
    qnet, about = Q.int8_net(net, reader, train_idx, matrices, granularity="channel-wise",
                             **opts)
    assert about["int8_granularity"] == "channel-wise" and about["keep_fp32"] == ["first_conv"]
    nodes = graph_nodes(qnet)
    assert any(n.get("attrs", {}).get("channel_wise_quantize") == "True" for n in nodes)
    convs = [n for n in nodes if n["op"] == "_sg_mkldnn_conv"]
    assert "quantized" not in convs[0].get("attrs", {})  # the first conv stays fp32
    assert all(n["attrs"]["quantized"] == "true" for n in convs[1:])


@pytest.mark.parametrize("key,value,message", [
    ("granularity", "per-channel", "tta.int8_granularity must be one of"),
    ("calib_mode", "kl", "tta.calib_mode must be one of"),
    ("keep_fp32", "first_conv", "tta.int8_keep_fp32 must be a list"),
    ("keep_fp32", ["conv0"], "tta.int8_keep_fp32 takes")])
def test_invalid_int8_settings_name_their_key(net_and_inputs, key, value, message):
    net, _, (reader, train_idx, matrices) = net_and_inputs
    opts = dict(calib_images=8, calib_mode="naive", keep_fp32=[], seed=0,
                granularity="tensor-wise")
    opts[key] = value
    with pytest.raises(Q.QuantizeError, match=message):
        Q.int8_net(net, reader, train_idx, matrices, **opts)
    with pytest.raises(Q.QuantizeError, match="quantized dtype"):
        Q.quantize(net, np.zeros((2, 1, 32, 32), np.float32), dtype="int4")



def test_mean_calibration_averages_batch_ranges_inside_naive_ones(net_and_inputs, monkeypatch):
    net, calib, _ = net_and_inputs
    monkeypatch.setattr(Q, "CALIB_BATCH", 8)  # 24 views: three batches to average over

    def ranges(mode: str) -> dict[str, float]:
        nodes = graph_nodes(Q.quantize(net, calib, mode=mode))
        return {n["name"]: float(n["attrs"]["max_calib_range"]) for n in nodes
                if "max_calib_range" in n.get("attrs", {})}

    naive, mean = ranges("naive"), ranges("mean")
    assert naive.keys() == mean.keys() and naive
    assert all(mean[k] <= naive[k] + 1e-6 for k in naive)
    assert any(mean[k] < naive[k] - 1e-6 for k in naive)

"""Registry networks: build, train step, export, table fidelity, options, and Table 4.7.

Every registered net runs forward and backward on 2 one-channel images at 28-64 px (big
ones at reduced ``width``) and survives export + ``SymbolBlock.imports`` with identical
inference outputs. At the thesis' input sizes the per-row output shapes must equal the
tables' ``output`` columns; that part is symbolic (no weights), so it is cheap even for
224 px.
"""
from __future__ import annotations

import math

import mxnet as mx
import numpy as np
import pytest
from mxnet import autograd, gluon, nd

import nets
from nets.build import parse_output
from nets.summary import format_summary, main as summary_main, row_shapes, summarize

pytestmark = pytest.mark.filterwarnings("ignore:Cannot decide type")

# Small but valid inputs per net; big nets at reduced width to keep the test fast.
SMALL = {
    "lenet": (28, {}),
    "alexnet": (64, {"width": 0.25}),
    "vgg16": (32, {"width": 0.25}),
    "vgg19": (32, {"width": 0.25}),
    "inception_bn": (32, {"width": 0.5}),
    "tinynet": (64, {}),
    "tinynet_cifar": (32, {}),
    "ndsb_net1": (48, {}),
    "ndsb_net2": (48, {}),
    "maxdepth": (32, {"z": 32}),
}
# Table 4.7 setting: ImageNet, 3 channels, 1000 classes, no batch norm (2015 nets).
IMAGENET = {"in_channels": 3, "classes": 1000, "bn": False, "act": "relu"}


def test_registry_lists_every_net():
    assert nets.list_models() == sorted(SMALL)


def test_unknown_name_lists_valid_names():
    with pytest.raises(ValueError) as err:
        nets.get_model("resnet50")
    for name in nets.list_models():
        assert name in str(err.value)


def test_unknown_keyword_is_an_error():
    with pytest.raises(ValueError, match="valid"):
        nets.get_model("ndsb_net1", depth=3)
    with pytest.raises(ValueError, match="pool"):
        nets.get_model("ndsb_net1", pool="median")
    with pytest.raises(ValueError, match="variant"):
        nets.get_model("tinynet", variant="C")


def _train_step(net, x: nd.NDArray) -> nd.NDArray:
    with autograd.record():
        out = net(x)
        loss = gluon.loss.SoftmaxCrossEntropyLoss()(out, nd.array([0, 1]))
    loss.backward()
    return out


@pytest.mark.parametrize("name", sorted(SMALL))
def test_net_trains_exports_and_reimports(name, tmp_path):
    size, kw = SMALL[name]
    net = nets.get_model(name, classes=5, **kw)
    nets.initialize(net)
    net.hybridize()
    x = nd.random.normal(shape=(2, 1, size, size))
    out = _train_step(net, x)
    assert out.shape == (2, 5)
    assert np.isfinite(out.asnumpy()).all() and np.abs(out.asnumpy()).sum() > 0
    for param in net.collect_params().values():
        if param.grad_req != "null":
            grad = param.grad().asnumpy()
            assert np.isfinite(grad).all(), param.name
    first_weight = next(iter(net.features[0].collect_params().values()))
    assert np.abs(first_weight.grad().asnumpy()).sum() > 0  # gradient reaches the input layer
    reference = net(x).asnumpy()  # inference mode
    net.export(str(tmp_path / name))
    loaded = gluon.SymbolBlock.imports(str(tmp_path / f"{name}-symbol.json"), ["data"],
                                       str(tmp_path / f"{name}-0000.params"))
    np.testing.assert_array_equal(loaded(x).asnumpy(), reference)


TABLE_NETS = [("ndsb_net1", 128, {}), ("ndsb_net2", 144, {}),
              ("tinynet", 224, {"variant": "B"}), ("tinynet", 112, {"variant": "A"}),
              ("tinynet_cifar", 28, {}), ("lenet", 28, {})]


@pytest.mark.parametrize("name,size,kw", TABLE_NETS)
def test_row_outputs_match_the_thesis_table(name, size, kw):
    net = nets.get_model(name, **kw)
    shapes = row_shapes(net, size)
    checked = 0
    for row, shape in zip(net.rows, shapes):
        expected = parse_output(row.get("output"))
        if expected:
            h, w, c = expected
            assert shape == (c, h, w), (row, shape)
            checked += 1
    assert checked == sum(1 for r in net.rows if r.get("output"))


def test_inception_output_channels_and_sizes():
    net = nets.get_model("inception_bn")
    shapes = row_shapes(net, 224)
    modules = {r["type"]: s for r, s in zip(net.rows, shapes) if r["type"].startswith("incep")}
    assert modules["inception (3a)"] == (256, 28, 28)
    assert modules["inception (3c)"] == (576, 14, 14)
    assert modules["inception (4e)"] == (1056, 7, 7)
    assert modules["inception (5b)"] == (1024, 7, 7)


def test_alexnet_and_vgg_spatial_sizes():
    alex = row_shapes(nets.get_model("alexnet"), 227)
    assert [s[1] for s, r in zip(alex, nets.get_model("alexnet").rows)
            if r["type"] == "max pooling"] == [27, 13, 6]
    vgg = nets.get_model("vgg16")
    pools = [s for s, r in zip(row_shapes(vgg, 224), vgg.rows) if r["type"] == "max pooling"]
    assert pools[-1] == (512, 7, 7)


def test_table_inconsistency_is_caught():
    from nets.build import build

    rows = list(nets.TABLES["tinynet"]["rows"])
    rows[3] = ("module-1", "", "28x28x64", 32, 33)  # 1x1 + 3x3 filters no longer add to 64
    with pytest.raises(ValueError, match="built 65 channels, the table says 64"):
        build(dict(nets.TABLES["tinynet"], rows=rows), variant="B")


def test_options_pool_dropout_bn_width_act():
    both = nets.get_model("ndsb_net1", pool="both")
    assert both.output[-1]._in_units == 1024  # avg and max features concatenated
    nets.initialize(both)
    assert both(nd.zeros((1, 1, 40, 40))).shape == (1, 121)
    assert nets.get_model("ndsb_net1", pool="max").features[-1].mode == "max"
    drop = nets.get_model("ndsb_net1", dropout=0.5)
    assert isinstance(drop.output[1], gluon.nn.Dropout)
    plain = nets.get_model("ndsb_net1", bn=False, act="tanh")
    blocks = []
    plain.apply(blocks.append)
    assert not any(isinstance(b, gluon.nn.BatchNorm) for b in blocks)
    assert sum(isinstance(b, gluon.nn.Activation) for b in blocks) == 10  # one per conv
    narrow = summarize("ndsb_net1", 64, width=0.5)["params"]
    assert narrow < summarize("ndsb_net1", 64)["params"] / 3
    assert nets.get_model("tinynet", variant="A").features[0][0]._kwargs["kernel"] == (7, 7)
    assert nets.get_model("tinynet").features[0][0]._kwargs["kernel"] == (9, 9)


@pytest.mark.parametrize("act", nets.ACTIVATIONS)
def test_every_activation_in_a_net(act):
    net = nets.get_model("lenet", act=act, classes=3)
    nets.initialize(net)
    net.hybridize()
    out = _train_step(net, nd.random.normal(shape=(2, 1, 28, 28)))
    assert out.shape == (2, 3) and np.isfinite(out.asnumpy()).all()


def test_rgb_input_and_arch_record():
    net = nets.get_model("tinynet_cifar", in_channels=3, classes=10, act="leaky",
                         act_kw={"a": 7.5})
    assert net.arch["act_kw"] == {"a": 7.5} and net.arch["input"] == 28
    nets.initialize(net)
    assert net(nd.zeros((1, 3, 28, 28))).shape == (1, 10)


def _logit_std(init: mx.init.Initializer) -> float:
    mx.random.seed(0)
    net = nets.get_model("maxdepth", z=64, t=0.25, bn=False, act="rrelu", classes=10)
    net.initialize(init)
    return float(net(nd.random.normal(shape=(4, 1, 64, 64))).asnumpy().std())


def test_msra_keeps_the_signal_where_the_framework_default_loses_it():
    # 13 plain convolutions: MXNet's default Uniform(0.07) shrinks the signal by orders of
    # magnitude (uniform softmax outputs); MSRA with the RReLU mid-slope gain keeps it O(1).
    assert _logit_std(mx.init.Uniform(0.07)) < 1e-3
    assert 0.1 < _logit_std(nets.default_initializer("rrelu")) < 10


# ------------------------------------------------------------------ summary vs Table 4.7


def test_tinynet_b_against_table_4_7():
    s = summarize("tinynet", 224, **IMAGENET)
    assert s["params"] == 2_051_352
    assert s["size_mb"] == pytest.approx(7.9, abs=0.1)  # Table 4.7: 7.9 MB ...
    assert s["params"] > 1.56e6 * 1.3  # ... but not 1.56M parameters (that would be 6.0 MiB)
    alexnet = summarize("alexnet", 227, **IMAGENET)
    assert s["macs"] / alexnet["macs"] == pytest.approx(0.42, abs=0.02)  # Table 4.7: 0.42X
    a = summarize("tinynet", 112, variant="A", **IMAGENET)
    assert s["params"] - a["params"] == 64 * 3 * (81 - 49)  # 9x9 vs 7x7 first filters
    assert a["macs"] / alexnet["macs"] == pytest.approx(0.40, abs=0.03)  # Table 4.7: 0.40X
    assert s["output_shape"] == (1, 1000)


def test_vgg16_and_alexnet_against_table_4_7():
    vgg = summarize("vgg16", 224, **IMAGENET)
    assert vgg["params"] == 138_357_544  # Table 4.7: 138M
    assert vgg["size_mb"] == pytest.approx(528, abs=1)  # 528 MB
    alexnet = summarize("alexnet", 227, **IMAGENET)
    assert alexnet["params"] == pytest.approx(60e6, rel=0.02)  # 60M
    assert vgg["macs"] / alexnet["macs"] == pytest.approx(22.6, rel=0.1)  # 22.6X


def test_ndsb_complexity_relative_to_alexnet():
    # §6.2 says 12x (Net-1) and 6x (Net-2) AlexNet; Tables 6.1/6.2 as printed give ~2x and
    # ~3.4x (and Net-2 is the costlier one). Pinned here so the docs stay true.
    alexnet = summarize("alexnet", 227, **IMAGENET)["macs"]
    net1 = summarize("ndsb_net1", 128, bn=False)
    net2 = summarize("ndsb_net2", 144, bn=False)
    assert net1["macs"] / alexnet == pytest.approx(2.07, abs=0.05)
    assert net2["macs"] / alexnet == pytest.approx(3.38, abs=0.05)
    assert net1["rf"] == 143 and net2["rf"] == 191


def test_summary_macs_follow_eq_4_7():
    s = summarize("lenet", 28, bn=False, classes=10)
    # conv 1->20 5x5 on 24x24, conv 20->50 5x5 on 8x8, FC 800->500, FC 500->10
    expected = 1 * 25 * 20 * 24 ** 2 + 20 * 25 * 50 * 8 ** 2 + 800 * 500 + 500 * 10
    assert s["macs"] == expected
    assert s["params"] == (20 * 25 + 20) + (50 * 20 * 25 + 50) + (800 * 500 + 500) + 5010
    assert s["size_mb"] == pytest.approx(s["params"] * 4 / 2 ** 20)


def test_summary_cli(capsys):
    summary_main(["tinynet", "--size", "224", "--in-channels", "3", "--classes", "1000",
                  "--no-bn", "--act", "relu", "--layers", "variant=B"])
    out = capsys.readouterr().out
    assert "2,051,352" in out and "7.83 MiB" in out and "(1, 1000)" in out
    assert "conv19" in out  # per-layer lines
    assert math.isfinite(summarize("maxdepth", 64, z=64)["macs"])
    assert "receptive field" in format_summary(summarize("lenet", 28))

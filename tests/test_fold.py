"""nets.fold: batch norm merged into the layer before it gives the same inference outputs."""
from __future__ import annotations

import mxnet as mx
import numpy as np
import pytest
from mxnet import autograd
from mxnet.gluon import nn

import nets
from nets.fold import Identity, fold_batchnorm
from tests.conftest import needs_bf16

# Input sides each table accepts (its own is too slow for a unit test where it is large).
SIZES = {"alexnet": 67, "lenet": 28, "tinynet_cifar": 28, "tinynet": 48}
# Batch norms that do not directly follow a convolution or FC layer (a pooling in between).
NOT_AFTER_A_LAYER = {"alexnet": 2, "lenet": 2}


def _trained_like(name: str, size: int, seed: int = 0):
    """A registry net with every shape known and batch norm statistics far from identity."""
    net = nets.get_model(name, classes=7, act="rrelu", bn=True, in_channels=1)
    mx.random.seed(seed)
    nets.initialize(net, ctx=mx.cpu())
    x = mx.nd.array(np.random.default_rng(seed).random((3, 1, size, size), dtype=np.float32))
    with autograd.record():  # training-mode pass: statistics move off their initial values
        net(x)
    rng = np.random.default_rng(seed + 1)
    for p in net.collect_params().values():
        if p.name.endswith(("running_mean", "beta")):
            p.set_data(mx.nd.array(rng.normal(0, 0.5, p.shape)))
        elif p.name.endswith(("running_var", "gamma")):
            p.set_data(mx.nd.array(rng.uniform(0.3, 2.0, p.shape)))
    nets.set_deterministic(net)
    return net, x


def _count(net, kind) -> int:
    found = []
    net.apply(lambda b: found.append(b) if isinstance(b, kind) else None)
    return len(found)


@pytest.mark.parametrize("name", nets.list_models())
def test_every_batchnorm_after_a_layer_folds_and_outputs_stay(name):
    net, x = _trained_like(name, SIZES.get(name, 64))
    before = net(x).asnumpy()
    bns = _count(net, nn.BatchNorm)
    assert fold_batchnorm(net) == bns - NOT_AFTER_A_LAYER.get(name, 0)
    assert _count(net, nn.BatchNorm) == NOT_AFTER_A_LAYER.get(name, 0)
    net.hybridize(static_alloc=True)
    after = net(x).asnumpy()
    np.testing.assert_allclose(after, before, rtol=0, atol=2e-5 * np.abs(before).max())


def test_concat_paths_are_not_treated_as_a_sequence():
    """Inception: a Concat's last path does not feed the next block's batch norm alone."""
    net, x = _trained_like("inception_bn", 64)
    before = net(x).asnumpy()
    fold_batchnorm(net)
    np.testing.assert_allclose(net(x).asnumpy(), before, atol=2e-5 * np.abs(before).max())


@needs_bf16
def test_folded_net_runs_in_bfloat16_like_the_unfolded_one():
    net, x = _trained_like("ndsb_net1", 64)
    ref = net(x).asnumpy()
    fold_batchnorm(net)
    nets.set_precision(net, "bfloat16")
    net.hybridize(static_alloc=True)
    out = net(x).asnumpy()
    assert out.dtype == np.float32
    assert np.abs(out - ref).max() < 0.05 * np.abs(ref).max()


def test_deferred_shapes_are_left_alone_and_a_second_fold_is_a_no_op():
    net = nets.get_model("lenet", classes=7, act="rrelu", bn=True, in_channels=1)
    nets.initialize(net, ctx=mx.cpu())
    folded = fold_batchnorm(net)  # the FC's input size is not known before a forward
    net(mx.nd.zeros((1, 1, 28, 28)))
    assert folded + fold_batchnorm(net) == 1
    assert fold_batchnorm(net) == 0
    assert _count(net, Identity) == 1

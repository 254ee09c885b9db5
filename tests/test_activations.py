"""Activations (thesis ch. 5) and initialisers (§5.5.1).

RReLU is the delicate one: its train/inference switch lives inside the graph (a Dropout on
a constant, see nets/activations.py), so every property is checked imperatively,
hybridized, and after export + SymbolBlock.imports.
"""
from __future__ import annotations

import math

import mxnet as mx
import numpy as np
import pytest
from mxnet import autograd, gluon, nd

from nets.activations import (ACTIVATIONS, RRELU_LOWER, RRELU_UPPER, RReLU, make_activation,
                              negative_slope, set_deterministic)
from nets.init import default_initializer, gain, initialize, kaiming, xavier

pytestmark = pytest.mark.filterwarnings("ignore:Cannot decide type")

MID = np.float32((RRELU_LOWER + RRELU_UPPER) / 2)


IMPLS = ("native", "ops")  # the fused operator of nets/native and the operator graph


def _rrelu(mode: str, tmp_path=None, impl: str = "native", **kw) -> gluon.HybridBlock:
    """An RReLU block as used imperatively, hybridized, or exported and re-imported."""
    block = make_activation("rrelu", impl=impl, **kw)
    block.initialize()
    if mode == "imperative":
        return block
    block.hybridize()
    if mode == "hybrid":
        return block
    block(nd.ones((1, 2)))  # export needs a cached graph
    block.export(str(tmp_path / "rrelu"))
    return gluon.SymbolBlock.imports(str(tmp_path / "rrelu-symbol.json"), ["data"],
                                     str(tmp_path / "rrelu-0000.params"))


MODES = ("imperative", "hybrid", "exported")


def _slopes(block, x: nd.NDArray, train: bool) -> np.ndarray:
    with autograd.train_mode() if train else autograd.predict_mode():
        y = block(x)
    return (y / x).asnumpy()


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("impl", IMPLS)
def test_rrelu_inference_is_exactly_mid_slope(mode, tmp_path, impl):
    block = _rrelu(mode, tmp_path, impl)
    x = nd.random.normal(shape=(4, 3, 5, 5))
    y = block(x).asnumpy()
    xn = x.asnumpy()
    neg = xn < 0
    np.testing.assert_array_equal(y[~neg], xn[~neg])
    np.testing.assert_array_equal(y[neg], xn[neg] * MID)  # bit for bit, not approximately
    np.testing.assert_array_equal(block(x).asnumpy(), y)  # and deterministic


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("impl", IMPLS)
def test_rrelu_training_slopes_are_uniform_per_element(mode, tmp_path, impl):
    block = _rrelu(mode, tmp_path, impl)
    x = -nd.ones((4, 5, 32, 32))  # 20480 negative inputs
    s = _slopes(block, x, train=True).ravel()
    assert s.min() >= RRELU_LOWER - 1e-6 and s.max() <= RRELU_UPPER + 1e-6
    n, width = s.size, RRELU_UPPER - RRELU_LOWER
    assert abs(s.mean() - MID) < 5 * width / math.sqrt(12 * n)
    assert abs(s.std() - width / math.sqrt(12)) < 0.01 * width
    counts, _ = np.histogram(s, bins=10, range=(RRELU_LOWER, RRELU_UPPER))
    chi2 = ((counts - n / 10) ** 2 / (n / 10)).sum()
    assert chi2 < 40  # 9 degrees of freedom: p < 1e-5 for a correct sampler
    assert len(np.unique(s)) > 0.99 * n  # one draw per element, not per channel or batch
    assert not np.array_equal(s, _slopes(block, x, train=True).ravel())  # fresh every step


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("impl", IMPLS)
def test_rrelu_training_keeps_positive_part(mode, tmp_path, impl):
    block = _rrelu(mode, tmp_path, impl)
    x = nd.random.uniform(0.1, 2, shape=(3, 100))
    with autograd.train_mode():
        np.testing.assert_array_equal(block(x).asnumpy(), x.asnumpy())


@pytest.mark.parametrize("impl", IMPLS)
def test_rrelu_custom_range_and_validation(impl):
    block = _rrelu("hybrid", impl=impl, l=0.2, u=0.3)
    x = -nd.ones((1000,))
    s = _slopes(block, x, train=True)
    assert s.min() >= 0.2 - 1e-6 and s.max() <= 0.3 + 1e-6
    np.testing.assert_allclose(_slopes(block, x, train=False), 0.25, rtol=1e-6)
    with pytest.raises(ValueError):
        RReLU(lower=0.5, upper=0.4)
    with pytest.raises(ValueError):
        RReLU(lower=0.1, upper=1.5)
    assert negative_slope("rrelu", l=0.2, u=0.3) == pytest.approx(0.25)


@pytest.mark.parametrize("hybrid", [False, True])
@pytest.mark.parametrize("impl", IMPLS)
def test_rrelu_gradient_is_the_sampled_slope(hybrid, impl):
    block = _rrelu("hybrid" if hybrid else "imperative", impl=impl)
    x = nd.random.normal(shape=(2, 3, 8, 8))
    x.attach_grad()
    with autograd.record():
        y = block(x)
    y.backward()
    xn, g = x.asnumpy(), x.grad.asnumpy()
    slope = y.asnumpy() / xn
    neg = xn < 0
    np.testing.assert_allclose(g[neg], slope[neg], rtol=1e-6)
    np.testing.assert_array_equal(g[~neg], 1.0)
    assert g[neg].std() > 0.01  # the gradient sees the random slopes, not the mean


def _finite_difference(f, x: np.ndarray, eps: float = 1e-2) -> np.ndarray:
    grad = np.zeros_like(x)
    for i in range(x.size):
        step = np.zeros_like(x)
        step.flat[i] = eps
        grad.flat[i] = (f(x + step) - f(x - step)) / (2 * eps)
    return grad


def _away_from_zero(shape, seed=3) -> np.ndarray:
    rng = np.random.default_rng(seed)
    x = rng.uniform(0.2, 2.0, size=shape) * rng.choice([-1, 1], size=shape)
    return x.astype(np.float32)


def _check_gradient(block, x: np.ndarray, seed: int | None = None, rtol=2e-3) -> None:
    """Autograd vs central differences of sum(w * block(x)) in training mode.

    With ``seed`` the RNG is reset before every evaluation, so a random activation draws the
    same slopes in all of them and the finite difference sees one fixed function.
    """
    w = nd.array(np.random.default_rng(0).normal(size=x.shape).astype(np.float32))

    def loss(xv: np.ndarray) -> float:
        if seed is not None:
            mx.random.seed(seed)
        with autograd.train_mode():
            return float((block(nd.array(xv)) * w).sum().asscalar())

    xa = nd.array(x)
    xa.attach_grad()
    if seed is not None:
        mx.random.seed(seed)
    with autograd.record():
        out = (block(xa) * w).sum()
    out.backward()
    np.testing.assert_allclose(xa.grad.asnumpy(), _finite_difference(loss, x),
                               rtol=rtol, atol=1e-3)


@pytest.mark.parametrize("hybrid", [False, True])
@pytest.mark.parametrize("impl", IMPLS)
def test_rrelu_finite_difference_with_fixed_seed(hybrid, impl):
    block = _rrelu("hybrid" if hybrid else "imperative", impl=impl)
    _check_gradient(block, _away_from_zero((2, 3, 4)), seed=11)


@pytest.mark.parametrize("impl", IMPLS)
def test_seeding_fixes_the_rrelu_sample(impl):
    block = _rrelu("hybrid", impl=impl)
    x = -nd.ones((50,))
    mx.random.seed(5)
    a = _slopes(block, x, train=True)
    mx.random.seed(5)
    np.testing.assert_array_equal(a, _slopes(block, x, train=True))


def test_prelu_gradient_and_per_channel_slope():
    block = make_activation("prelu")
    block.initialize()
    x = _away_from_zero((2, 4, 3, 3))
    block(nd.array(x))
    assert block.alpha.shape == (4,)  # one slope per channel, inferred
    assert block.alpha.wd_mult == 0.0
    block.alpha.set_data(nd.array([0.1, 0.2, 0.3, 0.4]))
    _check_gradient(block, x)
    # d loss / d alpha_c = sum over negative inputs of channel c of w * x  (Eqs. 5.4-5.5)
    xa, w = nd.array(x), nd.array(np.random.default_rng(0).normal(size=x.shape))
    with autograd.record():
        loss = (block(xa) * w).sum()
    loss.backward()
    expected = (np.minimum(x, 0) * w.asnumpy()).sum(axis=(0, 2, 3))
    np.testing.assert_allclose(block.alpha.grad().asnumpy(), expected, rtol=1e-4)


def test_sigmoid_star_value_and_gradient():
    block = make_activation("sigmoid_star")
    block.hybridize()
    x = np.linspace(-4, 4, 17, dtype=np.float32)
    np.testing.assert_allclose(block(nd.array(x)).asnumpy(), 4 / (1 + np.exp(-x)) - 2,
                               rtol=1e-5, atol=1e-6)
    xa = nd.zeros((1,))
    xa.attach_grad()
    with autograd.record():
        y = block(xa)
    y.backward()
    assert xa.grad.asscalar() == pytest.approx(1.0)  # slope 1 at 0, like tanh (Eq. 5.36)
    _check_gradient(block, x.reshape(1, -1), rtol=5e-3)


@pytest.mark.parametrize("a", [5.5, 7.5, 100.0])
def test_leaky_slope_is_one_over_a(a):
    block = make_activation("leaky", a=a)
    x = nd.array([-2.0, 3.0])
    np.testing.assert_allclose(block(x).asnumpy(), [-2.0 / a, 3.0], rtol=1e-6)
    with pytest.raises(ValueError):
        make_activation("leaky", a=0.5)


@pytest.mark.parametrize("name", ACTIVATIONS)
def test_every_activation_builds_and_runs(name):
    block = make_activation(name)
    block.initialize()
    block.hybridize()
    y = block(nd.array([[-1.0, 0.5]]))
    assert y.shape == (1, 2) and np.isfinite(y.asnumpy()).all()


def test_unknown_activation_and_keyword():
    with pytest.raises(ValueError, match="relu, leaky, prelu, rrelu, tanh, sigmoid"):
        make_activation("swish")
    with pytest.raises(ValueError, match="takes"):
        make_activation("relu", a=3)


def test_deterministic_rrelu_equals_random_graph_at_inference():
    net = gluon.nn.HybridSequential()
    net.add(gluon.nn.Conv2D(4, 3, in_channels=1), RReLU(), gluon.nn.Conv2D(2, 3), RReLU())
    net.initialize(default_initializer("rrelu"))
    x = nd.random.normal(shape=(2, 1, 10, 10))
    net.hybridize()
    random_graph = net(x).asnumpy()
    assert set_deterministic(net) == 2
    net.hybridize()  # rebuild the cached graph
    np.testing.assert_array_equal(net(x).asnumpy(), random_graph)
    with autograd.train_mode():  # the inference-only graph is no longer random
        np.testing.assert_array_equal(net(x).asnumpy(), random_graph)
    fixed = make_activation("rrelu", deterministic=True)  # the same via act_kw
    with autograd.train_mode():
        np.testing.assert_array_equal(_slopes(fixed, -nd.ones((100,)), train=True), MID)


# ------------------------------------------------------------------ initialisation


def test_default_initializer_per_activation():
    for act in ("relu", "leaky", "prelu", "rrelu"):
        assert isinstance(default_initializer(act), mx.init.MSRAPrelu)
    for act in ("tanh", "sigmoid", "sigmoid_star"):
        assert isinstance(default_initializer(act), mx.init.Xavier)
        assert not isinstance(default_initializer(act), mx.init.MSRAPrelu)
    assert gain("relu") == pytest.approx(math.sqrt(2))
    assert gain("leaky", a=5.5) == pytest.approx(math.sqrt(2 / (1 + (1 / 5.5) ** 2)))
    assert gain("rrelu") == pytest.approx(math.sqrt(2 / (1 + float(MID) ** 2)))
    with pytest.raises(ValueError):
        default_initializer("nope")


def _init_std(init: mx.init.Initializer, shape: tuple[int, ...]) -> float:
    arr = nd.zeros(shape)
    init(mx.init.InitDesc("conv_weight"), arr)
    return float(arr.asnumpy().std())


def test_kaiming_variance_uses_the_rrelu_mid_slope():
    shape = (128, 64, 3, 3)  # fan_in = 576
    expected = math.sqrt(2 / ((1 + float(MID) ** 2) * 576))
    assert _init_std(default_initializer("rrelu"), shape) == pytest.approx(expected, rel=0.02)
    assert _init_std(kaiming(0.0), shape) == pytest.approx(math.sqrt(2 / 576), rel=0.02)


def test_xavier_variance_is_eq_5_27():
    shape = (128, 64, 3, 3)  # n_l = 576, n_{l+1} = 1152
    expected = math.sqrt(2 / (576 + 1152))
    assert _init_std(xavier(), shape) == pytest.approx(expected, rel=0.02)


def test_initialize_reads_the_activation_recorded_by_get_model():
    import nets

    net = nets.get_model("lenet", act="leaky", act_kw={"a": 7.5})
    initialize(net)
    net(nd.zeros((1, 1, 28, 28)))
    weight = net.features[0][0].weight.data().asnumpy()  # 20 x 1 x 5 x 5, fan_in 25
    assert weight.std() == pytest.approx(math.sqrt(2 / ((1 + 1 / 7.5 ** 2) * 25)), rel=0.25)

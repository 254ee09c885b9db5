"""Activation functions of thesis ch. 5, selectable by name for every network.

Names (``ACTIVATIONS``) and keyword arguments:

* ``relu``          Eq. 5.1.
* ``leaky``         Eq. 5.2, ``y = x / a`` for ``x < 0``; ``a`` in (1, inf), the thesis uses
                    100, 7.5 (Table 5.2) and 5.5. Default ``a=5.5``.
* ``prelu``         Eq. 5.3, slope learned per channel (initial 0.25 as in He et al. [24];
                    no weight decay on it, as they recommend).
* ``rrelu``         Eqs. 5.6-5.7, slope ``~ U(l, u)`` drawn per element and per step in
                    training, fixed ``(l + u) / 2`` at inference. Defaults ``l=1/8, u=1/3``
                    (the thesis writes the slope as a multiplier with ``u < 1``; the RReLU
                    paper writes ``x / a`` with ``a ~ U(3, 8)``, i.e. the same range).
* ``tanh``, ``sigmoid``.
* ``sigmoid_star``  Eq. 5.36, ``4 * sigmoid(x) - 2``: slope 1 at 0 like tanh, which is what
                    Xavier's initialisation assumes (§5.5.2).

Why RReLU is written here. MXNet's ``LeakyReLU(act_type='rrelu')`` crashes in training
(apache/mxnet#14447, #12894: it asks for the wrong resource type), so :class:`RReLU` is our
own block (a fused native operator, or ordinary operators; see *Cost*). The difficulty is that a hybridized (or exported) graph is
built once and cannot branch on ``autograd.is_training()`` in Python. The graph therefore
asks an operator that already switches on the run-time train flag: ``Dropout``. Applied to a
one-element tensor of ones with ``p=0.5`` it returns exactly ``1`` at inference (Dropout is
the identity there) and exactly ``0`` or ``2`` (``mask / (1 - p)``) in training, so
``t = |Dropout(1) - 1|`` is exactly ``1`` in training and exactly ``0`` at inference. The
slope is ``mid + t * n`` with ``n ~ U(-h, h)`` per element (``mid = (l+u)/2``,
``h = (u-l)/2``): uniform on ``[l, u]`` in training, and ``mid + 0 * n == mid`` bit for bit
at inference (the native operator receives ``t`` as an input and does the same). The switch
lives in the graph, so it survives ``hybridize()``, ``export`` and
``gluon.SymbolBlock.imports`` (tests/test_activations.py checks all three).

Cost. Composed of MXNet operators, the random graph draws one number per activation element
with MXNet's mt19937 sampler and makes five extra passes forward and
three backward; any non-oneDNN operator also makes MXNet reorder the convolutions' blocked
outputs to the plain layout and back. The default random graph is therefore the fused native
operator of :mod:`nets.native` (``nets/native/rrelu_op.cc``): one pass each way, a
counter-based generator (the slope of element ``i`` is a function of a per-step seed and
``i``), nothing but the seed kept for the backward pass; its kernels vectorize and run
forward + backward about as fast as oneDNN's LeakyReLU (the reorders around a non-oneDNN
operator remain; BENCHMARKS.md has the figures). ``impl='ops'`` (or
``NDSB_NATIVE=0``) selects the operator graph, which is also the fallback when no C++
compiler is available; both sample U(l, u) per element (tested). In bfloat16 networks
(:mod:`nets.precision`) the native operator takes bfloat16 directly; the operator graph runs in
float32 between two casts.

Inference needs no noise at all: ``contrib.cond`` would skip the draw but breaks shape
inference of the layers after it in MXNet 1.9 (deferred initialisation fails), so instead
``RReLU(deterministic=True)`` (``act_kw={'deterministic': True}``, or :func:`set_deterministic`
on a built net) gives the inference-only graph, plain leaky ReLU with slope ``(l+u)/2``: the
same outputs bit for bit (tested) at leaky ReLU's speed. Prediction / TTA uses it.
``python -m pipeline.tools.bench_act`` measures the variants.
"""
from __future__ import annotations

from typing import Any, Callable

import mxnet as mx
from mxnet.gluon import nn

from . import native
from .precision import Float32Island, LowPrecision, to_dtype
from .walk import set_on

ACTIVATIONS = ("relu", "leaky", "prelu", "rrelu", "tanh", "sigmoid", "sigmoid_star")

RRELU_LOWER = 1.0 / 8.0
RRELU_UPPER = 1.0 / 3.0
LEAKY_A = 5.5


class Leaky(nn.HybridBlock):
    """Leaky ReLU, Eq. 5.2: ``y = x`` for ``x >= 0`` and ``x / a`` otherwise."""

    def __init__(self, a: float = LEAKY_A, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if not a > 1:
            raise ValueError(f"leaky: a must be > 1 (Eq. 5.2), got {a}")
        self.a = float(a)

    def hybrid_forward(self, F, x):
        return F.LeakyReLU(x, act_type="leaky", slope=1.0 / self.a)


class PReLU(Float32Island, nn.HybridBlock):
    """Parametric ReLU, Eq. 5.3, one learned slope per channel (axis 1).

    The slope vector's length is inferred at the first forward (MXNet's ``prelu`` infers
    ``gamma`` as ``(channels,)`` when the parameter has no shape yet; a ``(0,)`` placeholder
    would block that), so the block needs no channel count.
    """

    def __init__(self, init: float = 0.25, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        with self.name_scope():
            self.alpha = self.params.get("alpha", shape=None, init=mx.init.Constant(init),
                                         allow_deferred_init=True)
        self.alpha.wd_mult = 0.0  # He et al.: decaying a_i towards 0 would bias towards ReLU

    def forward32(self, F, x, alpha):  # MXNet 1.9.1's prelu rejects bfloat16 data
        return F.LeakyReLU(x, gamma=alpha, act_type="prelu")


RRELU_IMPLS = ("auto", "native", "ops")


class RReLU(LowPrecision, nn.HybridBlock):
    """Randomized leaky ReLU, Eqs. 5.6-5.7 (see the module docstring for the mode switch).

    ``deterministic=True`` builds the inference-only graph ``LeakyReLU(slope=(l+u)/2)``,
    which gives the same outputs as the random graph at inference without drawing noise.
    ``impl`` picks the random graph: ``native`` (the fused operator of :mod:`nets.native`),
    ``ops`` (MXNet operators only) or ``auto`` (native when it builds and loads, else ops).
    Both draw the slope per element from U(l, u), from different random streams.
    """

    def __init__(self, lower: float = RRELU_LOWER, upper: float = RRELU_UPPER,
                 deterministic: bool = False, impl: str = "auto", **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if not 0 <= lower < upper < 1:
            raise ValueError(f"rrelu: need 0 <= l < u < 1 (Eq. 5.7), got l={lower}, u={upper}")
        if impl not in RRELU_IMPLS:
            raise ValueError(f"rrelu: impl must be one of {RRELU_IMPLS}, got {impl!r}")
        self.lower, self.upper = float(lower), float(upper)
        self.deterministic = deterministic
        self.impl = impl

    @property
    def mid(self) -> float:
        return (self.lower + self.upper) / 2.0

    def uses_native(self) -> bool:
        """Whether the random graph is the native operator (decided when it is traced)."""
        if self.impl == "ops":
            return False
        if native.load():
            return True
        if self.impl == "native":
            raise RuntimeError(f"rrelu impl='native' but the native operator is unavailable: "
                               f"{native.status().get('native_error', 'disabled')}")
        return False

    def hybrid_forward(self, F, x):
        if self.deterministic:  # oneDNN's leaky ReLU runs in bfloat16 as well
            return F.LeakyReLU(x, act_type="leaky", slope=self.mid)
        # One-element float32 ones on x's device; in a symbol graph the executor places it.
        one = F.ones((1,), ctx=x.context) if F is mx.nd else F.ones(shape=(1,))
        training = F.abs(F.Dropout(one, p=0.5) - 1)  # exactly 1 in training, 0 at inference
        on_gpu = F is mx.nd and x.context.device_type == "gpu"
        if not on_gpu and self.uses_native():  # CPU-only; takes float32 and bfloat16
            return F.ndsb_rrelu(x, training, lower=self.lower, upper=self.upper)[0]
        if self.low_precision:  # the operator graph needs float32 (see nets/precision.py)
            return to_dtype(F, self._random(F, to_dtype(F, x, "float32"), training), "bfloat16")
        return self._random(F, x, training)

    def _random(self, F, x, training):
        half = (self.upper - self.lower) / 2.0
        noise = F.random.uniform_like(x, low=-half, high=half)
        # BlockGrad: the slope is a sample, not a function of x; this also spares the backward
        # pass from differentiating through the sampling branch.
        slope = F.BlockGrad(F.broadcast_mul(noise, training) + self.mid)
        # slope < 1, so max(x, slope * x) is x for x >= 0 and slope * x for x < 0.
        return F.maximum(x, x * slope)


class SigmoidStar(Float32Island, nn.HybridBlock):
    """Sigmoid*, Eq. 5.36: ``4 * sigmoid(x) - 2``."""

    def forward32(self, F, x):  # MXNet's generic bfloat16 arithmetic is much slower
        return 4.0 * F.sigmoid(x) - 2.0


def _plain(name: str) -> Callable[..., nn.HybridBlock]:
    return lambda: nn.Activation(name)


_FACTORIES: dict[str, Callable[..., nn.HybridBlock]] = {
    "relu": _plain("relu"),
    "leaky": Leaky,
    "prelu": PReLU,
    "rrelu": RReLU,
    "tanh": _plain("tanh"),
    "sigmoid": _plain("sigmoid"),
    "sigmoid_star": SigmoidStar,
}

# Keyword arguments each activation accepts, with the names used in the thesis.
_KWARGS: dict[str, dict[str, str]] = {
    "leaky": {"a": "a"},
    "prelu": {"init": "init"},
    "rrelu": {"l": "lower", "u": "upper", "lower": "lower", "upper": "upper",
              "deterministic": "deterministic", "impl": "impl"},
}


def check_activation(name: str, act_kw: dict[str, Any] | None = None) -> dict[str, Any]:
    """Validate ``name`` and ``act_kw``; return the kwargs mapped to constructor names."""
    if name not in _FACTORIES:
        raise ValueError(f"unknown activation {name!r}; valid: {', '.join(ACTIVATIONS)}")
    allowed = _KWARGS.get(name, {})
    unknown = sorted(set(act_kw or {}) - set(allowed))
    if unknown:
        raise ValueError(f"activation {name!r} takes {sorted(allowed) or 'no'} keyword(s), "
                         f"got {unknown}")
    return {allowed[k]: v for k, v in (act_kw or {}).items()}


def make_activation(name: str, **act_kw: Any) -> nn.HybridBlock:
    """A new activation block, e.g. ``make_activation('leaky', a=7.5)``."""
    kwargs = check_activation(name, act_kw)  # before the lookup: unknown names get the list
    return _FACTORIES[name](**kwargs)


def negative_slope(name: str, **act_kw: Any) -> float | None:
    """Slope of the negative part used for initialisation gains, ``None`` if not rectified.

    ``rrelu`` uses its inference slope ``(l+u)/2``; ``prelu`` its initial value.
    """
    kw = check_activation(name, act_kw)
    if name == "relu":
        return 0.0
    if name == "leaky":
        return 1.0 / kw.get("a", LEAKY_A)
    if name == "prelu":
        return kw.get("init", 0.25)
    if name == "rrelu":
        return (kw.get("lower", RRELU_LOWER) + kw.get("upper", RRELU_UPPER)) / 2.0
    return None


def set_rrelu_impl(net: nn.Block, impl: str) -> int:
    """Set ``impl`` of every :class:`RReLU` in ``net`` (before ``hybridize``); returns how many.

    A hybridized graph is built without knowing its device, so GPU training must choose
    ``ops`` (the native operator has no GPU kernel); :mod:`pipeline.train` does.
    """
    if impl not in RRELU_IMPLS:
        raise ValueError(f"rrelu: impl must be one of {RRELU_IMPLS}, got {impl!r}")
    return set_on(net, RReLU, impl=impl)


def set_deterministic(net: nn.Block, flag: bool = True) -> int:
    """Switch every :class:`RReLU` in ``net`` to (or back from) its inference-only graph.

    Returns how many blocks were switched. Call before ``hybridize()`` (or re-hybridize):
    a cached graph is not rebuilt by changing the attribute alone.
    """
    return set_on(net, RReLU, deterministic=flag)

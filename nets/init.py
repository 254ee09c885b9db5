"""Weight initialisation of thesis §5.5.1, matched to the activation.

* Xavier (Eq. 5.27): ``Var[w] = 2 / (n_in + n_out)``, drawn uniform on ``±sqrt(3 Var)``. Its
  derivation assumes ``f'(0) = 1``: right for tanh and Sigmoid* (Eq. 5.36), wrong by 4x for
  the plain sigmoid (Eq. 5.34), which is the thesis' explanation of why sigmoid nets fail.
* Kaiming / MSRA (Eqs. 5.28-5.32): ``Var[w] = 2 / ((1 + s^2) n_in)`` (Gaussian), where ``s``
  is the slope of the negative part: 0 for ReLU, ``1/a`` for leaky ReLU, 0.25 (its initial
  value) for PReLU and the inference slope ``(l+u)/2`` for RReLU. ``n_in`` keeps the forward
  variance constant (Eq. 5.30); He et al. show either fan works for the backward pass too.

Contract with the networks: :func:`nets.get_model` returns an *uninitialised* network. The
caller does ``net.initialize(nets.default_initializer(act, **act_kw), ctx=...)``, or simply
``nets.initialize(net)`` which reads the activation recorded on the network by the registry.
Parameters that carry their own initialiser keep it (BatchNorm gamma/beta/statistics,
PReLU slopes); biases start at zero.

Why it matters: a deep plain (no BatchNorm) network started from MXNet's default
``Uniform(0.07)`` stays at uniform predictions, while MSRA with the RReLU mid-slope gain
learns at once.
"""
from __future__ import annotations

from typing import Any

import mxnet as mx
from mxnet.gluon import Block

from .activations import check_activation, negative_slope


def xavier() -> mx.init.Initializer:
    """Eq. 5.27: uniform with variance ``2 / (fan_in + fan_out)``."""
    return mx.init.Xavier(rnd_type="uniform", factor_type="avg", magnitude=3.0)


def kaiming(slope: float = 0.0, factor_type: str = "in") -> mx.init.Initializer:
    """MSRA for a rectifier whose negative part has slope ``slope``: gain ``sqrt(2/(1+s^2))``."""
    return mx.init.MSRAPrelu(factor_type=factor_type, slope=slope)


def gain(act: str, **act_kw: Any) -> float:
    """Standard deviation multiplier over ``1/sqrt(fan_in)`` implied by the activation.

    ``sqrt(2 / (1 + s^2))`` for the rectified family, 1 for the saturating ones (whose
    default initialiser is Xavier, which has its own fan-averaged scale).
    """
    slope = negative_slope(act, **act_kw)
    return 1.0 if slope is None else (2.0 / (1.0 + slope ** 2)) ** 0.5


def default_initializer(act: str = "rrelu", **act_kw: Any) -> mx.init.Initializer:
    """MSRA with the activation's slope for the rectified family, Xavier otherwise."""
    check_activation(act, act_kw)
    slope = negative_slope(act, **act_kw)
    return xavier() if slope is None else kaiming(slope)


def initialize(net: Block, act: str | None = None, act_kw: dict[str, Any] | None = None,
               ctx: Any = None, force_reinit: bool = False) -> Block:
    """Initialise ``net`` with :func:`default_initializer`; returns ``net``.

    ``act``/``act_kw`` default to what :func:`nets.get_model` recorded in ``net.arch``.
    """
    arch = getattr(net, "arch", {})
    act = act if act is not None else arch.get("act", "rrelu")
    act_kw = act_kw if act_kw is not None else arch.get("act_kw", {})
    net.initialize(default_initializer(act, **act_kw), ctx=ctx, force_reinit=force_reinit)
    return net

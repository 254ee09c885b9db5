"""Network registry for the NDSB pipeline: the thesis' tables as Gluon networks.

``get_model(name, classes=121, act='rrelu', bn=True, in_channels=1, **kw)`` returns an
*uninitialised* ``HybridBlock`` whose output is logits. Initialise it with
``net.initialize(nets.default_initializer(act, **act_kw))`` or ``nets.initialize(net)``
(which reads ``net.arch``); see :mod:`nets.init` for why the initialiser follows the
activation. Networks never read files.

Networks (``list_models()``):

==============  ==============================  =================================
name            source                          extra keywords
==============  ==============================  =================================
ndsb_net1       Table 6.1 (128 px)              common only
ndsb_net2       Table 6.2 (144 px)              common only
tinynet         Table 4.6, TinyNet-A / -B       ``variant='B'`` ('A': 7x7/2 stem)
tinynet_cifar   Table 5.1 (28 px)               common only
inception_bn    Table 4.4 (224 px)              common only
vgg16, vgg19    Table 4.3 (VGG-D / VGG-E)       common only (use ``width`` to shrink)
alexnet         Table 4.2 (227 px)              ``variant='grouped'`` ('single')
lenet           Table 4.1 (28 px)               common only
maxdepth        §4.3 designer                   ``z, k, t, form, base, max_width,
                                                pool_kernel`` (:mod:`nets.maxdepth`)
==============  ==============================  =================================

Common keywords (:mod:`nets.build`): ``act_kw`` (e.g. ``{'a': 7.5}`` for leaky,
``{'l': 1/8, 'u': 1/3}`` for rrelu), ``pool`` ('avg' | 'max' | 'both'), ``dropout``
(before the classifier), ``width`` (filter multiplier). Every net's last pooling is global,
so small inputs work (48-64 px for the samples; LeNet needs >= 16 px; AlexNet is tested at
64 px).

Prediction with RReLU: the training graph draws (and discards) noise at inference too; call
``nets.set_deterministic(net)`` before ``hybridize()`` (or build with
``act_kw={'deterministic': True}``) for the same outputs at leaky-ReLU speed, and
``nets.fold_batchnorm(net)`` (after loading the parameters) to merge every batch norm into
the convolution before it (:mod:`nets.fold`).
"""
from __future__ import annotations

from typing import Any, Callable

from mxnet.gluon import HybridBlock

from .activations import ACTIVATIONS, make_activation, set_deterministic
from .build import build, nominal_input
from .fold import fold_batchnorm
from .init import default_initializer, initialize
from .maxdepth import build_maxdepth
from .precision import set_precision
from .tables import TABLES

__all__ = ["get_model", "list_models", "default_initializer", "initialize", "ACTIVATIONS",
           "make_activation", "set_deterministic", "set_precision", "fold_batchnorm", "build",
           "TABLES"]

_COMMON = ("act_kw", "pool", "dropout", "width")


def _table_factory(name: str, defaults: dict[str, Any] | None = None
                   ) -> tuple[Callable[..., HybridBlock], dict[str, Any]]:
    return (lambda **kw: build(TABLES[name], **kw)), dict(defaults or {})


_REGISTRY: dict[str, tuple[Callable[..., HybridBlock], dict[str, Any]]] = {
    "ndsb_net1": _table_factory("ndsb_net1"),
    "ndsb_net2": _table_factory("ndsb_net2"),
    "tinynet": _table_factory("tinynet", {"variant": "B"}),
    "tinynet_cifar": _table_factory("tinynet_cifar"),
    "inception_bn": _table_factory("inception_bn"),
    "vgg16": _table_factory("vgg16"),
    "vgg19": _table_factory("vgg19"),
    "alexnet": _table_factory("alexnet", {"variant": "grouped"}),
    "lenet": _table_factory("lenet"),
    "maxdepth": (build_maxdepth, {"z": 128, "k": 3, "t": 0.25, "form": "consistent",
                                  "base": 16, "max_width": 512, "pool_kernel": 2}),
}


def list_models() -> list[str]:
    """Registered network names."""
    return sorted(_REGISTRY)


def get_model(name: str, classes: int = 121, act: str = "rrelu", bn: bool = True,
              in_channels: int = 1, **kw: Any) -> HybridBlock:
    """Build registered network ``name`` (uninitialised; outputs logits).

    The build options are recorded in ``net.arch`` (used by :func:`nets.initialize` and
    :mod:`nets.summary`).
    """
    if name not in _REGISTRY:
        raise ValueError(f"unknown network {name!r}; valid names: {', '.join(list_models())}")
    factory, defaults = _REGISTRY[name]
    unknown = sorted(set(kw) - set(_COMMON) - set(defaults))
    if unknown:
        raise ValueError(f"{name}: unknown keyword(s) {unknown}; valid: "
                         f"{sorted(set(_COMMON) | set(defaults))}")
    options = {**defaults, **kw}
    net = factory(classes=classes, act=act, bn=bn, in_channels=in_channels, **options)
    net.arch = {"name": name, "classes": classes, "act": act, "bn": bn,
                "in_channels": in_channels, "act_kw": dict(kw.get("act_kw") or {}), **options}
    if name in TABLES:
        net.arch["input"] = nominal_input(TABLES[name], options.get("variant"))
    return net

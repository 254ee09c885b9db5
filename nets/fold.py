"""Inference-time folding of batch norm into the convolution or FC layer before it.

Why. At inference a batch norm is a fixed per-channel affine map,
``y = gamma * (x - mean) / sqrt(var + eps) + beta``, so it can be merged into the weights and
bias of the layer that feeds it: one operator less per layer, one pass less over every
activation, and no batch norm on a plain-layout tensor (after the one-channel first
convolution oneDNN runs a slow generic kernel there). The folded network gives the same
outputs up to float rounding; it is for inference only (batch norm no longer learns, and the
parameters change names).

What is folded: a :class:`nets.precision.Conv2D` or :class:`nets.precision.Dense` whose
output goes straight into an ``nn.BatchNorm``: inside one sequence, the block that runs last
in a child and the block that runs first in the next child (descending through nested
sequences, never into the side-by-side paths of a ``Concat``). That covers every layout
:mod:`nets.build` produces for ``bn=True``. The batch norm becomes an identity; the layer gets
a bias. A batch norm after a pooling layer (AlexNet's) stays.
"""
from __future__ import annotations

import numpy as np
from mxnet.gluon import nn

from .build import Concat
from .precision import Conv2D, Dense


class Identity(nn.HybridBlock):
    """The folded batch norm's place holder."""

    def hybrid_forward(self, F, x):
        return x


def _sequential(block: nn.Block) -> bool:
    """Whether ``block`` runs its children one after another (a Concat runs them side by side)."""
    return isinstance(block, nn.HybridSequential) and not isinstance(block, Concat)


def _edge(block: nn.Block, last: bool) -> tuple[nn.Block | None, str | None, nn.Block]:
    """``(parent, key, leaf)``: the block that runs last (or first) inside ``block``, found
    by descending through sequences; ``parent`` is None when ``block`` is itself the leaf."""
    parent, key = None, None
    while _sequential(block) and block._children:
        keys = list(block._children)
        parent, key = block, keys[-1] if last else keys[0]
        block = block._children[key]
    return parent, key, block


def _affine(bn: nn.BatchNorm) -> tuple[np.ndarray, np.ndarray]:
    """``(scale, shift)`` of a batch norm at inference, from its running statistics."""
    kw = bn._kwargs
    mean = bn.running_mean.data().asnumpy().astype(np.float64)
    var = bn.running_var.data().asnumpy().astype(np.float64)
    gamma = (np.ones_like(mean) if kw.get("fix_gamma", False)  # scale=False
             else bn.gamma.data().asnumpy().astype(np.float64))
    beta = bn.beta.data().asnumpy().astype(np.float64)
    scale = gamma / np.sqrt(var + kw["eps"])
    return scale, beta - mean * scale


def _folded(layer: nn.Block, bn: nn.BatchNorm) -> nn.Block:
    """A new ``layer`` with ``bn`` merged into its weight and bias."""
    scale, shift = _affine(bn)
    weight = layer.weight.data().asnumpy().astype(np.float64)
    bias = (layer.bias.data().asnumpy().astype(np.float64) if layer.bias is not None
            else np.zeros(len(scale)))
    weight = weight * scale.reshape((-1,) + (1,) * (weight.ndim - 1))
    bias = bias * scale + shift
    if isinstance(layer, Conv2D):
        kw = layer._kwargs
        new = Conv2D(kw["num_filter"], kw["kernel"], strides=kw["stride"], padding=kw["pad"],
                     dilation=kw["dilate"], groups=kw["num_group"], use_bias=True,
                     in_channels=layer._in_channels, prefix=layer.prefix + "folded_")
    else:
        new = Dense(layer._units, use_bias=True, flatten=layer._flatten,
                    in_units=weight.shape[1], prefix=layer.prefix + "folded_")
    new.compute_dtype = layer.compute_dtype
    ctx = layer.weight.list_ctx()
    new.initialize(ctx=ctx)
    new.weight.set_data(weight.astype(np.float32))
    new.bias.set_data(bias.astype(np.float32))
    return new


def fold_batchnorm(net: nn.Block) -> int:
    """Fold every batch norm that follows a convolution or FC layer into it, in place.

    Returns how many were folded. For inference only; call before ``hybridize()`` and after
    the parameters are loaded (the folded values are computed from them).
    """
    sequences: list[nn.HybridSequential] = []
    net.apply(lambda b: sequences.append(b) if _sequential(b) else None)
    folded = 0
    for seq in sequences:
        keys = list(seq._children)
        for key, next_key in zip(keys, keys[1:]):
            lparent, lkey, layer = _edge(seq._children[key], last=True)
            bparent, bkey, bn = _edge(seq._children[next_key], last=False)
            if not (isinstance(layer, (Conv2D, Dense)) and isinstance(bn, nn.BatchNorm)):
                continue
            if bn._kwargs.get("axis", 1) != 1 or layer.weight._data is None:
                continue  # channels not on axis 1, or shapes not known yet (deferred init)
            (lparent or seq)._children[lkey or key] = _folded(layer, bn)
            (bparent or seq)._children[bkey or next_key] = Identity()
            folded += 1
    return folded

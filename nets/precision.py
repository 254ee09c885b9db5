"""Mixed precision: bfloat16 convolutions on CPUs with native bfloat16 instructions.

Why. On CPUs with AVX512-BF16 or AMX, oneDNN runs bfloat16 convolutions much faster than
float32 ones, forward and backward (BENCHMARKS.md has the figures per CPU kind). Which
precision ``auto`` means on a machine is decided by :func:`pipeline.lib.runtime.resolve_precision`;
this module only makes a built network run in the precision it is given.

What runs in which precision (:func:`set_precision` on a built :class:`nets.build.TableNet`):

* ``features`` (convolutions, hidden FC layers, batch norm, pooling, oneDNN activations) run
  in bfloat16: the input is cast once, weights are cast on the fly from their float32
  masters, and the activations flow between layers in bfloat16 (half the memory traffic).
* RReLU's native operator takes bfloat16 directly (:mod:`nets.native` patches the one
  missing type case of MXNet's ``lib_api.cc``). Blocks MXNet 1.9.1 cannot run fast (or at
  all) in bfloat16 run in float32 between two casts: RReLU's operator graph (the fallback),
  PReLU, Sigmoid*, Dropout.
* The classifier (``output``), the loss, the gradients' accumulation and the optimizer stay in
  float32: parameters, checkpoints and their names are identical in both precisions, so a
  checkpoint trained in one loads into a network of the other.

Batch norm keeps float32 statistics and parameters (oneDNN computes them in float32).
This is the standard mixed-precision recipe (float32 master weights, low-precision compute),
the CPU counterpart of AMP on GPUs; MXNet's own ``amp.init`` does the same by patching every
operator process-wide, which breaks our RReLU graph (it casts ``ones``), hence this explicit
version. The accuracy check against float32 on the sample is in BENCHMARKS.md.
"""
from __future__ import annotations

from mxnet.gluon import nn

from .walk import set_on

PRECISIONS = ("float32", "bfloat16")


def bfloat16():
    """MXNet 1.9's bfloat16 dtype object (numpy has none)."""
    from mxnet.contrib.amp.amp import bfloat16 as dtype
    return dtype


def to_dtype(F, x, precision: str):
    """``x`` cast to ``precision`` (``amp_cast``: its gradient is cast back)."""
    return F.amp_cast(x, dtype=bfloat16() if precision == "bfloat16" else "float32")


class LowPrecision:
    """Mixin: ``compute_dtype`` says which precision a block's input arrives in."""

    compute_dtype = "float32"

    @property
    def low_precision(self) -> bool:
        return self.compute_dtype == "bfloat16"

    def compute_params(self, F, weight, bias=None):
        """``(weight, bias)`` in the compute precision: float32 masters, cast on the fly."""
        if not self.low_precision:
            return weight, bias
        return (to_dtype(F, weight, "bfloat16"),
                None if bias is None else to_dtype(F, bias, "bfloat16"))


class Conv2D(LowPrecision, nn.Conv2D):
    """``nn.Conv2D`` whose float32 weights are cast when the network runs in bfloat16.

    Grouped convolutions (AlexNet's two towers) stay float32: MXNet 1.9.1's oneDNN cannot
    reorder grouped bfloat16 weights ("could not create a primitive descriptor").
    """

    def hybrid_forward(self, F, x, weight, bias=None):
        if self.low_precision and self._kwargs.get("num_group", 1) > 1:
            y = super().hybrid_forward(F, to_dtype(F, x, "float32"), weight, bias)
            return to_dtype(F, y, "bfloat16")
        return super().hybrid_forward(F, x, *self.compute_params(F, weight, bias))


class Dense(LowPrecision, nn.Dense):
    """``nn.Dense`` with the same float32-master / bfloat16-compute switch."""

    def hybrid_forward(self, F, x, weight, bias=None):
        return super().hybrid_forward(F, x, *self.compute_params(F, weight, bias))


class Float32Island(LowPrecision):
    """Mixin for blocks that compute in float32: cast in and out when the network is bf16.

    Subclasses implement ``forward32(F, x, *args)``.
    """

    def hybrid_forward(self, F, x, *args, **kwargs):
        if not self.low_precision:
            return self.forward32(F, x, *args, **kwargs)
        y = self.forward32(F, to_dtype(F, x, "float32"), *args, **kwargs)
        return to_dtype(F, y, "bfloat16")


class Dropout(Float32Island, nn.Dropout):
    """``nn.Dropout`` (MXNet 1.9.1's Dropout rejects bfloat16 input)."""

    def forward32(self, F, x):
        return nn.Dropout.hybrid_forward(self, F, x)


def set_precision(net: nn.Block, precision: str) -> int:
    """Run ``net``'s features in ``precision``; returns how many blocks were switched.

    ``net`` must be a :class:`nets.build.TableNet` (every registry network is). Call before
    the first forward / ``hybridize()``: a cached graph is not rebuilt by the attributes.
    """
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    features = getattr(net, "features", None)
    if not isinstance(net, LowPrecision) or features is None:
        raise ValueError(f"set_precision needs a TableNet, got {type(net).__name__}")
    count = set_on(features, LowPrecision, compute_dtype=precision)
    net.compute_dtype = precision
    return count

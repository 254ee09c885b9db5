"""Mixed precision: bfloat16 convolutions on CPUs with native bfloat16 instructions.

Why. On CPUs with AVX512-BF16 or AMX (this project's machine: AMD EPYC with AVX512-BF16),
oneDNN runs bfloat16 convolutions about twice as fast as float32 ones, forward and backward;
ndsb_net1 training went from 18-23 to 40-44 img/s with leaky ReLU (BENCHMARKS.md).

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

import ctypes
import platform
import sys
from typing import Any, Iterable

from mxnet.gluon import nn

from .walk import set_on

PRECISIONS = ("float32", "bfloat16")
REQUESTS = PRECISIONS + ("auto",)
# Linux x86-64 (asm/unistd_64.h, asm/prctl.h): arch_prctl, its AMX permission options, and
# the tile-data state component (pipeline.runtime.enable_amx asks for it).
SYS_ARCH_PRCTL = 158
ARCH_GET_XCOMP_PERM = 0x1022
ARCH_REQ_XCOMP_PERM = 0x1023
XFEATURE_XTILEDATA = 18


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


def cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo") as fh:
            line = next((l for l in fh if l.startswith("flags")), "")
    except OSError:
        return set()
    return set(line.split(":", 1)[-1].split())


def arch_prctl(option: int, arg: int) -> int:
    """Linux x86-64 ``arch_prctl``; -1 elsewhere."""
    if sys.platform != "linux" or platform.machine() != "x86_64":
        return -1
    return ctypes.CDLL(None, use_errno=True).syscall(SYS_ARCH_PRCTL, option, ctypes.c_ulong(arg))


def amx_permitted() -> bool:
    """Whether this process may execute AMX instructions (asked for by ``enable_amx``)."""
    mask = ctypes.c_uint64(0)
    if arch_prctl(ARCH_GET_XCOMP_PERM, ctypes.addressof(mask)) != 0:
        return False
    return bool(mask.value >> XFEATURE_XTILEDATA & 1)


def native_bfloat16() -> bool:
    """Whether bfloat16 runs fast here: MXNet with oneDNN on a CPU with usable bf16 kernels.

    On AMX CPUs that means AMX enabled for this process (:func:`pipeline.runtime.enable_amx`):
    without it oneDNN 2.4 falls back to its AVX512-BF16 kernels, which on such a CPU trained
    ndsb_net1 slower than float32 (20 against 24-25 img/s, BENCHMARKS.md). On CPUs with
    AVX512-BF16 and no AMX (AMD Zen 4) those kernels are the fast path (2x float32).
    """
    import mxnet as mx

    if not mx.runtime.Features().is_enabled("MKLDNN"):
        return False
    flags = cpu_flags()
    if "amx_bf16" in flags:
        return amx_permitted()
    return "avx512_bf16" in flags


def bfloat16_training_validated() -> bool:
    """Whether bfloat16 *training* matched float32 accuracy on this kind of CPU (AMX ones).

    Measured (BENCHMARKS.md): with AMX kernels, ndsb_net1's validation log loss moved by
    -0.006 +- 0.030 on the sample (8 seeds) and +0.001 +- 0.002 on 684 synthetic images
    (6 seeds). With AVX512-BF16 kernels and no AMX (AMD EPYC, 2026-11-29) it rose by
    +0.09 +- 0.04 (8 seeds), so ``auto`` trains in float32 there; bf16 inference on that CPU
    stayed within +0.006 and remains ``auto``.
    """
    return "amx_bf16" in cpu_flags()


def resolve_precision(requested: str, ctxs: Iterable[Any] = (), training: bool = False
                      ) -> str:
    """``auto`` -> ``bfloat16`` where it runs fast (all contexts CPU), else ``float32``.

    For ``training``, ``auto`` also needs bf16 training validated on this kind of CPU
    (:func:`bfloat16_training_validated`).

    An explicit ``bfloat16`` on a GPU context or without oneDNN raises ``ValueError``: MXNet
    1.9.1 has no bfloat16 kernels there.
    """
    import mxnet as mx

    if requested not in REQUESTS:
        raise ValueError(f"precision must be one of {REQUESTS}, got {requested!r}")
    on_cpu = all(getattr(c, "device_type", "cpu") == "cpu" for c in ctxs)
    if requested == "auto":
        fast = native_bfloat16() and (not training or bfloat16_training_validated())
        return "bfloat16" if on_cpu and fast else "float32"
    if requested == "bfloat16":
        if not on_cpu:
            raise ValueError("precision bfloat16 runs on CPU contexts only (MXNet 1.9.1)")
        if not mx.runtime.Features().is_enabled("MKLDNN"):
            raise ValueError("precision bfloat16 needs MXNet built with oneDNN (MKLDNN)")
    return requested


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

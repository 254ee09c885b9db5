"""What ``auto`` precision means on this machine (``train.precision``, ``tta.precision``).

bfloat16 where its kernels are fast on this CPU, float32 elsewhere, for training and inference
alike (float32 master weights). On CPUs with AVX512-BF16 and no AMX, bf16 training matched
float32 log loss within the seed spread on 121-class synthetic sets (BENCHMARKS.md, issue
15); on very small sets it cost a little, so ``train.precision: float32`` stays available. The
CPU facts come from :mod:`pipeline.lib.runtime`; how a network runs in the resolved precision is
:mod:`nets.precision`'s business.
"""
from __future__ import annotations

from typing import Any, Iterable

from pipeline.lib.runtime import cpu_flags, enable_amx


def native_bfloat16() -> bool:
    """Whether bfloat16 runs fast here: MXNet with oneDNN on a CPU with usable bf16 kernels.

    On AMX CPUs that means AMX enabled for this process (asked here through
    :func:`pipeline.lib.runtime.enable_amx`, idempotent, so the answer does not depend on
    what ran before): without it oneDNN 2.4 falls back to its
    AVX512-BF16 kernels, which on such a CPU trained slower than float32. On CPUs with
    AVX512-BF16 and no AMX those kernels are the fast path. BENCHMARKS.md has the measurements
    per CPU kind.
    """
    import mxnet as mx

    if not mx.runtime.Features().is_enabled("MKLDNN"):
        return False
    flags = cpu_flags()
    if "amx_bf16" in flags:
        return enable_amx()
    return "avx512_bf16" in flags


# oneDNN 2.4 (MXNet 1.9.1) has bfloat16 kernels for AVX-512 cores only (native with
# AVX512-BF16 or AMX, emulated on plain AVX-512); on an AVX2-only CPU it cannot build a
# bfloat16 convolution at all.
AVX512_CORE = frozenset({"avx512f", "avx512bw", "avx512vl", "avx512dq"})


def bfloat16_supported() -> bool:
    """Whether bfloat16 runs here at all (fast or not): oneDNN and an AVX-512 core. Where
    Linux does not report the CPU's flags, assume it does."""
    import mxnet as mx

    if not mx.runtime.Features().is_enabled("MKLDNN"):
        return False
    flags = cpu_flags()
    return not flags or AVX512_CORE <= flags


def resolve_precision(requested: str, ctxs: Iterable[Any] = ()) -> str:
    """``auto`` -> ``bfloat16`` where it runs fast (all contexts CPU), else ``float32``.

    An explicit ``bfloat16`` on a GPU context, without oneDNN or on a CPU without AVX-512
    raises ``ValueError``: MXNet 1.9.1 has no bfloat16 kernels there.
    """
    import mxnet as mx

    from nets.precision import PRECISIONS

    requests = PRECISIONS + ("auto",)
    if requested not in requests:
        raise ValueError(f"precision must be one of {requests}, got {requested!r}")
    on_cpu = all(getattr(c, "device_type", "cpu") == "cpu" for c in ctxs)
    if requested == "auto":
        return "bfloat16" if on_cpu and native_bfloat16() else "float32"
    if requested == "bfloat16":
        if not on_cpu:
            raise ValueError("precision bfloat16 runs on CPU contexts only (MXNet 1.9.1)")
        if not mx.runtime.Features().is_enabled("MKLDNN"):
            raise ValueError("precision bfloat16 needs MXNet built with oneDNN (MKLDNN)")
        if not bfloat16_supported():
            raise ValueError("precision bfloat16 needs a CPU with AVX-512 (MXNet 1.9.1's "
                             "oneDNN has no bfloat16 kernels for this one): use float32 or "
                             "auto")
    return requested

"""Process set-up shared by the stages: use every CPU we are allowed to, and all of each CPU.

Threads. MXNet leaves one of two cores idle by default; measured here, ``OMP_NUM_THREADS=2``
took NDSB-Net-1 training from ~15 to ~23-32 img/s and inference from ~55 to ~118 img/s. The
variables must be set before ``import mxnet`` to take effect, so stages call
:func:`configure_threads` first thing in ``main()``. A value the user already set wins.

AMX. On Intel CPUs with Advanced Matrix Extensions (Sapphire Rapids and later), MXNet 1.9.1's
oneDNN (v2.4.4) has AMX bfloat16 and INT8 kernels but leaves them off: it uses them only when
``DNNL_MAX_CPU_ISA=AVX512_CORE_AMX`` is set, and Linux kills a process that executes AMX
instructions without first asking for the tile state (``arch_prctl(ARCH_REQ_XCOMP_PERM)``),
which oneDNN 2.4 does not do. :func:`enable_amx` does both. Measured on such a CPU
(BENCHMARKS.md): ndsb_net1 bfloat16 training went from 20 img/s (AVX512-BF16 kernels, slower
than float32's 24-25) to 69-71 img/s. The variable is removed again once oneDNN has read it, so
child processes that do not ask for the permission never inherit an AMX setting (they would
die with SIGILL on the first AMX instruction).
"""
from __future__ import annotations

import os

ISA_VARIABLES = ("DNNL_MAX_CPU_ISA", "MKLDNN_MAX_CPU_ISA")
AMX_ISA = "AVX512_CORE_AMX"


def available_cpus() -> int:
    """CPUs this process may run on (affinity / cgroup aware where the OS tells)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


def configure_threads(n: int | None = None) -> int:
    """Set OpenMP and MXNet engine thread counts unless the user set them; return OMP threads.

    Also enables AMX where the CPU has it (:func:`enable_amx`).
    """
    n = n or available_cpus()
    os.environ.setdefault("OMP_NUM_THREADS", str(n))
    os.environ.setdefault("MXNET_CPU_WORKER_NTHREADS", str(max(1, n)))
    enable_amx()
    return int(os.environ["OMP_NUM_THREADS"])


def request_amx() -> bool:
    """Ask Linux for the AMX tile state for this process; True when granted."""
    from nets.precision import (ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA, amx_permitted,
                                arch_prctl, cpu_flags)

    if "amx_bf16" not in cpu_flags():
        return False
    return amx_permitted() or (arch_prctl(ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA) == 0
                               and amx_permitted())


def enable_amx() -> bool:
    """Let MXNet's oneDNN use AMX on CPUs that have it; True when it will.

    A ``DNNL_MAX_CPU_ISA`` / ``MKLDNN_MAX_CPU_ISA`` the user set wins (the permission is still
    requested, so a user's AMX setting works). Otherwise the variable is set, oneDNN is made to
    read it with one tiny convolution, and it is removed again. Effective only if oneDNN has
    not run in this process yet: stages call this first thing, through
    :func:`configure_threads`.
    """
    granted = request_amx()
    if any(v in os.environ for v in ISA_VARIABLES):
        return granted and AMX_ISA in (os.environ.get(ISA_VARIABLES[0])
                                       or os.environ.get(ISA_VARIABLES[1], "")).upper()
    if not granted:
        return False
    os.environ[ISA_VARIABLES[0]] = AMX_ISA
    try:
        import mxnet as mx

        one = mx.nd.ones((1, 1, 1, 1))
        mx.nd.Convolution(one, one, kernel=(1, 1), num_filter=1, no_bias=True).wait_to_read()
    finally:
        del os.environ[ISA_VARIABLES[0]]
    return True

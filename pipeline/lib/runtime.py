"""What this process runs on: CPUs, threads, CPU features and AMX.

This is the one place that probes the machine (``/proc/cpuinfo``, ``arch_prctl``); stages,
tools and :mod:`pipeline.lib.precision` ask it, nets never do.

Threads. MXNet leaves one of two cores idle by default; ``OMP_NUM_THREADS`` set to the CPUs we
may use gives every core work (BENCHMARKS.md has the figures). The variables must be set
before ``import mxnet`` to take effect, so stages call :func:`configure_threads` first thing in
``main()``. A value the user already set wins.

AMX. On Intel CPUs with Advanced Matrix Extensions (Sapphire Rapids and later), MXNet 1.9.1's
oneDNN (v2.4.4) has AMX bfloat16 and INT8 kernels but leaves them off: it uses them only when
``DNNL_MAX_CPU_ISA=AVX512_CORE_AMX`` is set, and Linux kills a process that executes AMX
instructions without first asking for the tile state (``arch_prctl(ARCH_REQ_XCOMP_PERM)``),
which oneDNN 2.4 does not do. :func:`enable_amx` does both. The variable is removed again once
oneDNN has read it, so child processes that do not ask for the permission never inherit an AMX
setting (they would die with SIGILL on the first AMX instruction).
"""
from __future__ import annotations

import ctypes
import os
import platform
import sys

# Nothing here imports mxnet at module level: the thread variables must be set before MXNet
# is first imported.
ISA_VARIABLES = ("DNNL_MAX_CPU_ISA", "MKLDNN_MAX_CPU_ISA")
AMX_ISA = "AVX512_CORE_AMX"
# Linux x86-64 (asm/unistd_64.h, asm/prctl.h): arch_prctl, its AMX permission options, and
# the tile-data state component that :func:`request_amx` asks for.
SYS_ARCH_PRCTL = 158
ARCH_GET_XCOMP_PERM = 0x1022
ARCH_REQ_XCOMP_PERM = 0x1023
XFEATURE_XTILEDATA = 18


# ------------------------------------------------------------------------------ CPUs, threads


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


# ---------------------------------------------------------------------- who else uses the CPUs


def cpu_times() -> tuple[float, float, float] | None:
    """(busy, total, own) CPU seconds so far: the machine's busy and total time over all its
    CPUs (``/proc/stat``; steal, time a hypervisor gave to other guests, counts as busy) and
    this process's own (every thread). None where Linux does not tell."""
    try:
        with open("/proc/stat") as fh:
            fields = fh.readline().split()
    except OSError:
        return None
    if not fields or fields[0] != "cpu" or len(fields) < 8:
        return None
    tick = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
    # user nice system idle iowait irq softirq steal [guest guest_nice: already in user/nice]
    values = [int(v) / tick for v in fields[1:9]]
    idle = values[3] + values[4]
    total = sum(values)
    mine = os.times()
    return total - idle, total, mine.user + mine.system


def busy_elsewhere(before: tuple[float, float, float] | None,
                   after: tuple[float, float, float] | None) -> float | None:
    """The share of the machine's CPU time that other processes (and other guests) used
    between two :func:`cpu_times` readings, 0..1; None if either is unknown or no time
    passed."""
    if before is None or after is None:
        return None
    busy, total, own = (a - b for a, b in zip(after, before))
    if total <= 0:
        return None
    return min(1.0, max(0.0, (busy - own) / total))


# -------------------------------------------------------------------------------- CPU features


def cpu_flags() -> set[str]:
    """The instruction-set flags Linux reports for this CPU (empty elsewhere)."""
    try:
        with open("/proc/cpuinfo") as fh:
            line = next((l for l in fh if l.startswith("flags")), "")
    except OSError:
        return set()
    return set(line.split(":", 1)[-1].split())


def cpu_kind() -> str:
    """A short description of this CPU for benchmark records: model name and bf16 features."""
    name = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as fh:
            name = next((l.split(":", 1)[1].strip() for l in fh if l.startswith("model name")),
                        name)
    except OSError:
        pass
    flags = cpu_flags()
    features = [f for f in ("avx512f", "avx512_bf16", "avx512_vnni", "amx_bf16", "amx_int8")
                if f in flags]
    return f"{name} ({', '.join(features) or 'no AVX-512'})"


def arch_prctl(option: int, arg: int) -> int:
    """Linux x86-64 ``arch_prctl``; -1 elsewhere."""
    if sys.platform != "linux" or platform.machine() != "x86_64":
        return -1
    return ctypes.CDLL(None, use_errno=True).syscall(SYS_ARCH_PRCTL, option, ctypes.c_ulong(arg))


def amx_permitted() -> bool:
    """Whether this process may execute AMX instructions (asked for by :func:`enable_amx`)."""
    mask = ctypes.c_uint64(0)
    if arch_prctl(ARCH_GET_XCOMP_PERM, ctypes.addressof(mask)) != 0:
        return False
    return bool(mask.value >> XFEATURE_XTILEDATA & 1)


def request_amx() -> bool:
    """Ask Linux for the AMX tile state for this process; True when granted."""
    if "amx_bf16" not in cpu_flags():
        return False
    return amx_permitted() or (arch_prctl(ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA) == 0
                               and amx_permitted())


_AMX_ENABLED: list[bool] = []  # the result of the first enable_amx() in this process


def enable_amx() -> bool:
    """Let MXNet's oneDNN use AMX on CPUs that have it; True when it will.

    Idempotent: the first call decides and later calls return its answer, so any code that
    needs to know (:func:`pipeline.lib.precision.native_bfloat16`) calls it instead of
    relying on an earlier call's side effect.

    A ``DNNL_MAX_CPU_ISA`` / ``MKLDNN_MAX_CPU_ISA`` the user set wins (the permission is still
    requested, so a user's AMX setting works). Otherwise the variable is set, oneDNN is made to
    read it with one tiny convolution, and it is removed again. Effective only if oneDNN has
    not run in this process yet: stages call this first thing, through
    :func:`configure_threads`.
    """
    if not _AMX_ENABLED:
        _AMX_ENABLED.append(_enable_amx())
    return _AMX_ENABLED[0]


def _enable_amx() -> bool:
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

"""What ``auto`` precision means here (``train.precision``, ``tta.precision``, ``tta.int8``).

``auto`` is decided by measurement, not by CPU flags: a flag says what an instruction set has,
not how fast MXNet's kernels are on it (a hypervisor may hide AMX; oneDNN ships different
kernels for different cores; on one Xeon kind bfloat16 trained slower than float32 although
the CPU reports AVX512-BF16: BENCHMARKS.md). On first use on a machine, every candidate path
the CPU can run (float32; bfloat16 where oneDNN has kernels for it; for inference also INT8
when ``tta.int8`` is ``auto``) is timed on the real network, input size and batch
(:mod:`pipeline.lib.speedtest`, a few seconds), and the fastest wins; a path less exact than
another (float32, then bfloat16, then INT8) must be at least :data:`MARGIN` faster to be
chosen, so timing noise between nearly equal paths does not flip the choice. The accuracy
rule: bfloat16 training matched float32 log loss within the seed spread (BENCHMARKS.md);
INT8 must also pass predict's validation guard per model.

The decision is cached per (CPU model and flags, MXNet and oneDNN, the network code, threads,
net and its settings, input size, batch, training or inference) in the user's cache folder
(:func:`cache_dir`), printed, and recorded in the stage's metrics (:meth:`Decision.as_dict`).
An explicit ``float32`` or ``bfloat16`` is never overridden.

Resume and DVC. A run that resumes keeps the precision its checkpoint (or predict's chunk
store) was made with, whatever a new measurement would say, so a kill -9 never turns into a
restart because of timing noise (:func:`choose`'s ``kept``). DVC tracks the requested value
(``auto``), not the outcome: a stage is not made stale by a new decision, and the precision
actually used is in each run's fingerprint, checkpoint and metrics.

``NDSB_AUTO=flags`` replaces the measurement by the old flag rule (bfloat16 where the CPU
reports AVX512-BF16 or usable AMX), e.g. for tests that must not depend on timing.
How a network runs in the resolved precision is :mod:`nets.precision`'s business.
"""
from __future__ import annotations

import contextlib
import datetime
import fcntl
import hashlib
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

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


# ------------------------------------------------------------------ auto, decided by measurement

TRAINING, INFERENCE = "training", "inference"
# From the most to the least exact: a later path must be MARGIN faster to be chosen.
ORDER = ("float32", "bfloat16", "int8")
MARGIN = 0.05
# Seconds of timed turns per decision (after one untimed call per candidate).
BUDGET = 3.0
# A measurement while other processes used more than this share of the machine's CPUs is
# provisional: contention slows the paths unevenly (oneDNN's threads wait on each other), so it
# can rank them wrongly, and a cached answer would stay wrong. It is reused for PROVISIONAL
# seconds only, so that shards or workers started together still run the same path.
BUSY_LIMIT = 0.25
PROVISIONAL = 3600
MODES = ("measure", "flags")


def cache_dir() -> Path:
    """Where decisions are cached: ``$NDSB_AUTO_CACHE``, else the user's cache folder."""
    return Path(os.environ.get("NDSB_AUTO_CACHE")
                or Path.home() / ".cache" / "ndsb-pipeline" / "auto")


def mode() -> str:
    """``measure`` (the default) or ``flags`` (``NDSB_AUTO=flags``: the CPU-flag rule)."""
    value = os.environ.get("NDSB_AUTO", "measure").strip().lower() or "measure"
    if value not in MODES:
        raise ValueError(f"NDSB_AUTO must be one of {MODES}, got {value!r}")
    return value


def float_candidates(ctxs: Iterable[Any] = ()) -> tuple[str, ...]:
    """The float paths this machine can run: float32, and bfloat16 on CPUs oneDNN has
    bfloat16 kernels for (never on GPUs in MXNet 1.9.1)."""
    on_cpu = all(getattr(c, "device_type", "cpu") == "cpu" for c in ctxs)
    return ("float32", "bfloat16") if on_cpu and bfloat16_supported() else ("float32",)


def decide(rates: dict[str, float], margin: float = MARGIN) -> str:
    """The fastest path of ``rates`` (images/s) whose lead over every more exact path that
    was measured is at least ``margin`` (paths ordered by :data:`ORDER`)."""
    order = [p for p in ORDER if p in rates]
    if not order:
        raise ValueError(f"no known path among {sorted(rates)}")
    choice = order[0]
    for path in order[1:]:
        if rates[path] > 0 and rates[path] >= rates[choice] * (1 + margin):
            choice = path
    return choice


@dataclass(frozen=True)
class Decision:
    """What ``precision`` a stage runs in, and why.

    ``source``: ``explicit`` (set in params), ``measured`` (timed now), ``cached`` (timed
    earlier on this machine), ``kept`` (the precision a checkpoint or chunk store being resumed
    was made with), ``only candidate`` (the CPU runs no other), ``flags`` (``NDSB_AUTO=flags``).
    ``int8_faster``: for inference with ``tta.int8: auto``, whether INT8 was measured at least
    :data:`MARGIN` faster than the chosen float path (None: not measured).
    """

    kind: str
    requested: str
    precision: str
    source: str
    rates: dict[str, float] = field(default_factory=dict)
    int8_faster: bool | None = None
    measured_on: str = ""
    errors: dict[str, str] = field(default_factory=dict)
    # the share of the CPUs other processes used while it was timed (> BUSY_LIMIT: provisional)
    busy: float | None = None

    def ratios(self) -> dict[str, float]:
        """Each measured path's speed relative to the chosen one."""
        base = self.rates.get(self.precision) or 0.0
        return {p: round(r / base, 3) for p, r in self.rates.items() if base}

    def line(self) -> str:
        """One line for the log, e.g. ``auto: float32 for training here: bfloat16 measured
        0.79x``."""
        if self.source == "explicit":
            return f"{self.kind} precision {self.precision} (set explicitly)"
        head = f"auto: {self.precision} for {self.kind} here"
        if self.source in ("measured", "cached"):
            others = [f"{p} measured {x:.2f}x" for p, x in self.ratios().items()
                      if p != self.precision]
            others += [f"{p} failed ({e})" for p, e in self.errors.items()]
            when = f" (cached measurement of {self.measured_on})" if self.source == "cached" \
                else ""
            if self.busy is not None and self.busy > BUSY_LIMIT:
                when = (f" (other processes used {self.busy:.0%} of the CPUs while it was "
                        f"timed{' now' if self.source == 'measured' else ''}: kept for an "
                        "hour only, then measured again)")
            return f"{head}: {', '.join(others)}{when}"
        reason = {"kept": "the precision of the run being resumed",
                  "only candidate": "the only path this CPU runs",
                  "flags": "NDSB_AUTO=flags (CPU-flag rule)"}[self.source]
        return f"{head}: {reason}"

    def as_dict(self) -> dict[str, Any]:
        """For the metrics: requested and used precision, why, and the measured rates."""
        out: dict[str, Any] = {"requested": self.requested, "used": self.precision,
                               "source": self.source}
        if self.rates:
            out.update(rates_img_s={p: round(r, 2) for p, r in self.rates.items()},
                       measured_on=self.measured_on)
        if self.int8_faster is not None:
            out["int8_faster"] = self.int8_faster
        if self.errors:
            out["errors"] = dict(self.errors)
        if self.busy is not None:
            out["busy_elsewhere"] = round(self.busy, 3)
        return out


def code_digest() -> str:
    """Hash of the code that decides which kernels run and how they are timed: the network
    library, the timed steps, this module and the runtime settings. An edit there measures
    again (an entry of older code may have been timed by rules since mended)."""
    import nets

    root = Path(nets.__file__).parent
    files = sorted([*root.glob("*.py"), *root.glob("native/*.cc")]) + [
        Path(__file__).with_name(n) for n in ("speedtest.py", "sgd.py", "quantize.py",
                                              "precision.py", "runtime.py")]
    h = hashlib.sha256()
    for f in files:
        h.update(f.name.encode())
        h.update(f.read_bytes())
    return h.hexdigest()[:16]


def cache_key(kind: str, net: str, kwargs: dict[str, Any], size: int, batch: int,
              candidates: Sequence[str], int8_options: dict[str, Any] | None = None
              ) -> dict[str, Any]:
    """Everything a measured decision depends on."""
    import mxnet as mx

    import nets.native
    from pipeline.lib.runtime import cpu_kind

    flags = hashlib.sha256(" ".join(sorted(cpu_flags())).encode()).hexdigest()[:16]
    return {"kind": kind, "cpu": cpu_kind(), "cpu_flags": flags, "mxnet": mx.__version__,
            "onednn": mx.runtime.Features().is_enabled("MKLDNN"),
            "native_ops": nets.native.enabled(), "code": code_digest(),
            "threads": os.environ.get("OMP_NUM_THREADS", ""),
            "isa": os.environ.get("DNNL_MAX_CPU_ISA", os.environ.get("MKLDNN_MAX_CPU_ISA", "")),
            "net": net, "kwargs": kwargs, "size": int(size), "batch": int(batch),
            "candidates": list(candidates), "int8": int8_options or {}}


def _entry_path(key: dict[str, Any]) -> Path:
    blob = json.dumps(key, sort_keys=True, default=str).encode()
    return cache_dir() / f"{key['kind']}-{key['net']}-{hashlib.sha256(blob).hexdigest()[:16]}.json"


def cached(key: dict[str, Any]) -> dict[str, Any] | None:
    """The cached measurement of ``key``, or None (absent, unreadable or of another key)."""
    path = _entry_path(key)
    try:
        entry = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    ok = (isinstance(entry, dict) and entry.get("key") == json.loads(json.dumps(key, default=str))
          and isinstance(entry.get("rates"), dict)
          and set(entry["rates"]) == set(key["candidates"])
          and all(isinstance(v, (int, float)) and v >= 0 for v in entry["rates"].values()))
    if ok and _provisional(entry):  # timed on a busy machine: good for an hour at most
        made = entry.get("time")
        # (a clock set back by less than a minute is not a reason to measure again)
        ok = isinstance(made, (int, float)) and -60 <= time.time() - made < PROVISIONAL
    return entry if ok else None


def _provisional(entry: dict[str, Any]) -> bool:
    busy = entry.get("busy_elsewhere")
    return isinstance(busy, (int, float)) and busy > BUSY_LIMIT


def record(key: dict[str, Any], rates: dict[str, float], errors: dict[str, str],
           seconds: float, busy: float | None = None) -> dict[str, Any]:
    """Write the measurement of ``key`` to the cache (atomically) and return the entry; a
    cache folder that cannot be written only costs a new measurement next time. One made
    while other processes used more than :data:`BUSY_LIMIT` of the CPUs is provisional
    (:func:`cached` serves it for :data:`PROVISIONAL` seconds)."""
    from pipeline.lib.fsutil import write_json

    entry = {"key": key, "rates": rates, "errors": errors, "seconds": round(seconds, 2),
             "busy_elsewhere": None if busy is None else round(busy, 3),
             "date": datetime.date.today().isoformat(), "time": time.time()}
    try:
        cache_dir().mkdir(parents=True, exist_ok=True)
        write_json(_entry_path(key), entry)
    except OSError as err:
        print(f"note: cannot cache the auto-precision measurement in {cache_dir()} ({err}); "
              "set NDSB_AUTO_CACHE to a writable folder")
    return json.loads(json.dumps(entry, default=str))


@contextlib.contextmanager
def _measuring_lock(key: dict[str, Any]) -> Iterator[None]:
    """One measurement of a key at a time on this machine: a second process (another shard,
    a dist_sync worker) waits, then reads the first one's result instead of timing paths
    while the first still runs."""
    path = _entry_path(key).with_suffix(".lock")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fh = open(path, "a")
    except OSError:
        yield
        return
    with fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def measure(kind: str, net: str, kwargs: dict[str, Any], size: int, batch: int,
            candidates: Sequence[str], int8_options: dict[str, Any] | None = None,
            budget: float = BUDGET
            ) -> tuple[dict[str, float], dict[str, str], float, float | None]:
    """(rates, errors, seconds, busy): each candidate's images/s, timed now (a path that fails
    to build or run gets rate 0 and its error), and the share of the machine's CPUs other
    processes used meanwhile (:func:`pipeline.lib.runtime.busy_elsewhere`; None: unknown).

    A Ctrl-C or SIGTERM meanwhile stops the timing after the call in progress and is then
    delivered again, to whatever handled it before (a stage's one-line "interrupted", exit
    130/143): without this, one arriving inside MXNet's INT8 calibration callback would be
    swallowed there (ctypes ignores exceptions in callbacks) and the Ctrl-C lost."""
    import signal

    from pipeline.lib import speedtest
    from pipeline.lib.runtime import busy_elsewhere, cpu_times
    from pipeline.lib.signals import graceful_stop

    t0, times = time.perf_counter(), cpu_times()
    signum = None
    with graceful_stop(f"auto: timing the {kind} precision paths") as stop:
        try:
            if kind == TRAINING:
                rates, errors = speedtest.training_rates(net, kwargs, size, batch, candidates,
                                                         budget, stopped=stop)
            else:
                rates, errors = speedtest.inference_rates(
                    net, kwargs, size, batch, candidates, budget, stopped=stop,
                    **(int8_options or {}))
        except speedtest.Stopped:
            signum = stop()
    if signum is not None:  # the handlers of before are back: they get the signal now
        signal.raise_signal(signum)
        raise KeyboardInterrupt  # a handler that let it pass: stop anyway, nothing recorded
    return rates, errors, time.perf_counter() - t0, busy_elsewhere(times, cpu_times())


def choose(kind: str, requested: str, net: str, kwargs: dict[str, Any], size: int,
           batch: int, ctxs: Iterable[Any] = (), int8: bool = False,
           int8_options: dict[str, Any] | None = None, kept: str | None = None,
           budget: float = BUDGET) -> Decision:
    """The precision ``kind`` (:data:`TRAINING` or :data:`INFERENCE`) runs in for
    ``requested`` (``auto``, ``float32`` or ``bfloat16``), with the network ``net``
    (``get_model`` ``kwargs``) at ``size`` px and ``batch`` images per step or forward.

    ``int8``: also time INT8 inference (``tta.int8: auto``), with ``int8_options``
    (``keep_fp32``, ``granularity``). ``kept``: the precision of the run being resumed, used
    when this machine can run it. Raises ``ValueError`` for a precision this machine cannot
    run (the stages turn it into their one-line error)."""
    import mxnet as mx

    ctxs = list(ctxs)
    if requested != "auto":
        return Decision(kind, requested, resolve_precision(requested, ctxs), "explicit")
    floats = float_candidates(ctxs)
    on_cpu = all(getattr(c, "device_type", "cpu") == "cpu" for c in ctxs)
    int8 = bool(int8) and on_cpu and mx.runtime.Features().is_enabled("MKLDNN")
    if kept is not None and kept in floats:
        return Decision(kind, requested, kept, "kept")
    if len(floats) == 1 and not int8:
        return Decision(kind, requested, floats[0], "only candidate")
    if mode() == "flags":
        return Decision(kind, requested, resolve_precision("auto", ctxs), "flags")
    candidates = floats + (("int8",) if int8 else ())
    key = cache_key(kind, net, kwargs, size, batch, candidates, int8_options if int8 else None)
    entry = cached(key)
    source = "cached"
    if entry is None:
        with _measuring_lock(key):
            entry = cached(key)  # measured by another process while this one waited
            if entry is None:
                rates, errors, seconds, busy = measure(kind, net, kwargs, size, batch,
                                                       candidates,
                                                       int8_options if int8 else None, budget)
                entry = record(key, rates, errors, seconds, busy)
                source = "measured"
    busy = entry.get("busy_elsewhere")
    rates = {p: float(r) for p, r in entry["rates"].items()}
    usable = {p: r for p, r in rates.items() if p in floats and r > 0}
    precision = decide(usable) if usable else "float32"
    int8_faster = None
    if int8:
        int8_faster = rates.get("int8", 0.0) >= rates.get(precision, 0.0) * (1 + MARGIN) > 0
    return Decision(kind, requested, precision, source, rates, int8_faster, entry["date"],
                    dict(entry.get("errors") or {}), busy)

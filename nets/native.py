"""Native operators, compiled on first use: the fused RReLU of ``nets/native/rrelu_op.cc``.

Why: RReLU composed of MXNet operators costs five extra passes over every activation forward,
three backward and MXNet's mt19937 sampler; the fused operator does one pass each way and
keeps only a seed for the backward pass (BENCHMARKS.md has the figures). MXNet 1.9 loads such
operators from a shared library built against its ``lib_api.h`` (``mx.library.load``).

The library is compiled with the machine's C++ compiler (``$CXX``, default ``g++``) into a
cache directory (``$NDSB_NATIVE_CACHE``, default ``~/.cache/ndsb-pipeline``), under a name that
hashes the source, the flags, the MXNet version and the instruction set the compiler targets
with ``-march=native`` (its predefined macros), so an edit, an upgrade or another CPU kind gets
its own build. The build writes a temporary file
and renames it, so concurrent processes (``dist_sync`` workers) never load half a library.

Nothing is compiled at import. :func:`load` builds and loads once per process and returns
``False`` (with one warning) when it cannot, e.g. without a compiler; callers then fall back
to the operator graph. ``NDSB_NATIVE=0`` disables the native path on purpose.
``python -m nets.native`` builds and reports.
"""
from __future__ import annotations

import hashlib
import logging
import os
import platform
import shlex
import subprocess
import sys
import tempfile
from pathlib import Path

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("native") / "rrelu_op.cc"
CXXFLAGS = ("-O3", "-march=native", "-std=c++17", "-shared", "-fPIC", "-fopenmp") + (
    # GCC keeps to 256-bit vectors on Intel CPUs by default; the bf16 kernels run faster with
    # 512 bits (BENCHMARKS.md).
    ("-mprefer-vector-width=512",) if platform.machine() in ("x86_64", "AMD64") else ())
OPS = ("ndsb_rrelu",)

# MXNet 1.9.1's lib_api.cc throws "Invalid dtype flag: 12" when it wraps a bfloat16 tensor
# for a library operator, although MXNet passes such tensors; the build compiles a copy with
# the one missing case (DLPack's kDLBfloat = 4), so bfloat16 networks need no casts around
# the operator. The patch is part of the build key.
LIB_API_ANCHOR = "  default:\n    dltensor.dtype.code = 0;\n"
LIB_API_BF16_CASE = ("  case 12:  // bfloat16 (mshadow::kBfloat16): added by nets/native.py\n"
                     "    dltensor.dtype.code = 4;\n"
                     "    dltensor.dtype.bits = 16;\n"
                     "    break;\n")

_state: dict[str, object] = {}


def cache_dir() -> Path:
    return Path(os.environ.get("NDSB_NATIVE_CACHE")
                or Path.home() / ".cache" / "ndsb-pipeline")


def _mxnet_dir() -> Path:
    import mxnet
    return Path(mxnet.__file__).parent


def target_isa() -> str:
    """The instruction set ``-march=native`` means here: the compiler's predefined macros.

    Exactly what the built library depends on (``__AVX512BF16__``, ``__AMX_TILE__``, ...),
    read the same way from GCC and Clang; the machine name where the compiler cannot tell.
    """
    cmd = [*shlex.split(os.environ.get("CXX", "g++")), "-march=native", "-dM", "-E", "-x", "c++",
           os.devnull]
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return platform.machine()
    if done.returncode != 0:
        return platform.machine()
    return "\n".join(sorted(done.stdout.splitlines()))


def library_path() -> Path:
    """Where the library for this source, compiler flags, MXNet and CPU lives."""
    import mxnet
    key = hashlib.sha256()
    cpu = target_isa()
    for part in (SOURCE.read_bytes(), LIB_API_BF16_CASE.encode(), " ".join(CXXFLAGS).encode(),
                 mxnet.__version__.encode(), cpu.encode(), os.environ.get("CXX", "g++").encode()):
        key.update(part)
    return cache_dir() / f"libndsb_ops-{key.hexdigest()[:16]}.so"


def patched_lib_api(source: str) -> str:
    """``lib_api.cc`` with the bfloat16 case added to its tensor-type switch."""
    if LIB_API_BF16_CASE in source:
        return source
    if source.count(LIB_API_ANCHOR) != 1:
        raise RuntimeError("lib_api.cc: the tensor-type switch to patch for bfloat16 was not "
                           "found (another MXNet version?)")
    return source.replace(LIB_API_ANCHOR, LIB_API_BF16_CASE + LIB_API_ANCHOR)


def build(force: bool = False) -> Path:
    """Compile the library unless an up-to-date build exists; returns its path.

    Raises ``RuntimeError`` with the compiler's output when the build fails.
    """
    target = library_path()
    if target.exists() and not force:
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    mx_dir = _mxnet_dir()
    lib_api = mx_dir / "src" / "lib_api.cc"
    if not lib_api.exists():
        raise RuntimeError(f"{lib_api} not found: this MXNet wheel ships no lib_api.cc")
    print(f"nets.native: compiling {SOURCE.name} into {target.parent} (first use with this "
          "source, MXNet and CPU; takes seconds)", file=sys.stderr, flush=True)
    api_source = patched_lib_api(lib_api.read_text())
    fd, tmp = tempfile.mkstemp(prefix=target.name, suffix=".tmp", dir=target.parent)
    os.close(fd)
    api_fd, api_copy = tempfile.mkstemp(prefix="lib_api-", suffix=".cc", dir=target.parent)
    cmd = [*shlex.split(os.environ.get("CXX", "g++")), *CXXFLAGS,
           f"-I{mx_dir / 'include'}", str(SOURCE), api_copy, "-o", tmp]
    try:
        with os.fdopen(api_fd, "w") as fh:
            fh.write(api_source)
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"building {SOURCE.name} failed ({shlex.join(cmd)}):\n"
                               f"{done.stderr[-4000:]}")
        os.replace(tmp, target)
    except FileNotFoundError as err:  # no compiler
        raise RuntimeError(f"building {SOURCE.name} needs a C++ compiler: {err}") from err
    finally:
        for path in (tmp, api_copy):
            if os.path.exists(path):
                os.unlink(path)
    return target


def enabled() -> bool:
    return os.environ.get("NDSB_NATIVE", "1").strip().lower() not in ("0", "false", "no", "off")


def load() -> bool:
    """Build (if needed) and load the native operators into MXNet, once per process.

    Returns whether ``F.ndsb_rrelu`` is available.
    """
    if "ok" in _state:
        return bool(_state["ok"])
    ok = False
    if enabled():
        try:
            import mxnet as mx
            mx.library.load(str(build()), verbose=False)
            ok = all(hasattr(mx.nd, op) and hasattr(mx.sym, op) for op in OPS)
            if not ok:
                raise RuntimeError(f"library loaded but {OPS} not registered")
        except Exception as err:  # noqa: BLE001 - any failure means: use the operator graph
            log.warning("native RReLU unavailable, using the slower operator graph: %s", err)
            _state["error"] = str(err)
    _state["ok"] = ok
    return ok


def status() -> dict[str, object]:
    """What :func:`load` decided, for benchmark and checkpoint records."""
    return {"native_ops": bool(_state.get("ok")), **({"native_error": _state["error"]}
                                                      if "error" in _state else {})}


def main(argv: list[str] | None = None) -> int:
    path = build(force="--force" in (argv if argv is not None else sys.argv[1:]))
    print(path)
    return 0 if load() else 1


if __name__ == "__main__":
    sys.exit(main())

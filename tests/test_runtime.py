"""Process set-up: threads and AMX (pipeline.lib.runtime), and what ``auto`` precision
(pipeline.lib.precision) makes of it."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.lib import precision, runtime

ROOT = Path(__file__).resolve().parents[1]
HAS_AMX = "amx_bf16" in runtime.cpu_flags()


def test_user_isa_setting_wins(monkeypatch):
    monkeypatch.setenv("DNNL_MAX_CPU_ISA", "AVX512_CORE")
    assert runtime._enable_amx() is False
    assert os.environ["DNNL_MAX_CPU_ISA"] == "AVX512_CORE"


def test_no_amx_cpu_sets_nothing(monkeypatch):
    monkeypatch.delenv("DNNL_MAX_CPU_ISA", raising=False)
    monkeypatch.setattr(runtime, "cpu_flags", lambda: {"avx512f", "avx512_bf16"})
    assert runtime.request_amx() is False
    assert runtime._enable_amx() is False
    assert "DNNL_MAX_CPU_ISA" not in os.environ


@pytest.mark.parametrize("flags,permitted,fast", [
    ({"avx512_bf16"}, False, True),                # AMD Zen 4: AVX512-BF16 kernels
    ({"avx512_bf16", "amx_bf16"}, True, True),     # Sapphire Rapids with AMX enabled
    ({"avx512_bf16", "amx_bf16"}, False, False),   # ... without: slower than float32
    ({"avx2", "fma"}, False, False),
])
def test_auto_precision_follows_the_usable_kernels(monkeypatch, flags, permitted, fast):
    monkeypatch.setattr(precision, "cpu_flags", lambda: flags)
    monkeypatch.setattr(precision, "enable_amx", lambda: permitted)
    assert precision.native_bfloat16() is fast
    assert precision.resolve_precision("auto") == ("bfloat16" if fast else "float32")
    assert precision.resolve_precision("float32") == "float32"


@pytest.mark.skipif(not HAS_AMX, reason="CPU without AMX")
def test_enable_amx_runs_amx_kernels_and_leaves_no_variable_behind():
    code = (
        "import os, sys; sys.path.insert(0, %r)\n"
        "os.environ.pop('DNNL_MAX_CPU_ISA', None)\n"
        "from pipeline.lib.runtime import enable_amx\n"
        "assert enable_amx()\n"
        "assert 'DNNL_MAX_CPU_ISA' not in os.environ  # children never inherit it\n"
        "import mxnet as mx\n"
        "from nets.precision import bfloat16\n"
        "from pipeline.lib.runtime import amx_permitted\n"
        "assert amx_permitted()\n"
        "x = mx.nd.amp_cast(mx.nd.ones((2, 16, 8, 8)), dtype=bfloat16())\n"
        "w = mx.nd.amp_cast(mx.nd.ones((16, 16, 3, 3)), dtype=bfloat16())\n"
        "y = mx.nd.Convolution(x, w, kernel=(3, 3), pad=(1, 1), num_filter=16, no_bias=True)\n"
        "print(float(mx.nd.amp_cast(y, dtype='float32')[0, 0, 4, 4].asscalar()))\n"
    ) % str(ROOT)
    env = {**os.environ, "DNNL_VERBOSE": "1"}
    env.pop("DNNL_MAX_CPU_ISA", None)
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "144.0" in done.stdout  # 16 channels x 3x3 ones
    assert "avx512_core_amx" in done.stdout  # oneDNN's verbose names the AMX kernel


def test_enable_amx_answers_once_per_process(monkeypatch):
    """Resolving a precision never depends on an earlier call's side effect: enable_amx is
    idempotent, so precision asks it directly."""
    calls = []
    monkeypatch.setattr(runtime, "_AMX_ENABLED", [])
    monkeypatch.setattr(runtime, "_enable_amx", lambda: calls.append(1) or True)
    assert runtime.enable_amx() is True and runtime.enable_amx() is True
    assert len(calls) == 1


def test_explicit_bfloat16_is_refused_where_onednn_has_no_kernels(monkeypatch):
    """AVX2-only CPUs (e.g. AMD EPYC Zen 3): auto means float32, and an explicit bfloat16
    ends in one clear line instead of an MXNetError deep in the first convolution."""
    monkeypatch.setattr(precision, "cpu_flags", lambda: {"avx", "avx2", "fma"})
    assert precision.resolve_precision("auto") == "float32"
    with pytest.raises(ValueError, match="needs a CPU with AVX-512"):
        precision.resolve_precision("bfloat16")
    monkeypatch.setattr(precision, "cpu_flags", lambda: set(precision.AVX512_CORE))
    assert precision.bfloat16_supported() is True

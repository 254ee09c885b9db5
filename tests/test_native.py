"""The native RReLU operator: build cache, fallback and agreement with the operator graph."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import mxnet as mx
import numpy as np
import pytest
from mxnet import autograd, nd

from nets import native
from nets.activations import RReLU
from tests.conftest import needs_bf16

ROOT = Path(__file__).resolve().parents[1]


def test_build_is_cached_and_keyed_by_source(tmp_path, monkeypatch):
    assert native.load()
    path = native.build()
    stamp = path.stat().st_mtime_ns
    assert native.build() == path and path.stat().st_mtime_ns == stamp  # no rebuild
    source = tmp_path / "rrelu_op.cc"
    source.write_text(native.SOURCE.read_text() + "\n// edited\n")
    monkeypatch.setattr(native, "SOURCE", source)
    assert native.library_path() != path  # an edit gets its own build


def test_disabled_by_environment_falls_back_to_the_operator_graph():
    code = ("import sys; sys.path.insert(0, %r)\n"
            "from nets import native; from nets.activations import RReLU\n"
            "assert not native.load()\n"
            "assert not RReLU().uses_native()\n"
            "print('ok')" % str(ROOT))
    env = {**os.environ, "NDSB_NATIVE": "0"}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "ok"


def test_explicit_native_fails_loudly_when_unavailable(monkeypatch):
    monkeypatch.setattr(native, "_state", {"ok": False, "error": "no compiler"})
    with pytest.raises(RuntimeError, match="no compiler"):
        RReLU(impl="native").uses_native()
    assert not RReLU(impl="auto").uses_native()  # auto falls back quietly
    with pytest.raises(ValueError, match="impl"):
        RReLU(impl="cuda")


def test_broken_compiler_reports_its_error(tmp_path, monkeypatch):
    monkeypatch.setenv("NDSB_NATIVE_CACHE", str(tmp_path))
    monkeypatch.setenv("CXX", "false")
    with pytest.raises(RuntimeError, match="failed"):
        native.build()
    assert not list(tmp_path.iterdir())  # no half-written library left behind


def test_native_and_ops_graphs_agree_in_distribution_and_gradient():
    x = -nd.ones((8, 16, 32, 32))
    slopes = {}
    for impl in ("native", "ops"):
        block = RReLU(impl=impl)
        block.hybridize()
        x.attach_grad()
        with autograd.record():
            y = block(x)
        y.backward()
        s = (y / x).asnumpy().ravel()
        np.testing.assert_allclose(x.grad.asnumpy().ravel(), s, rtol=1e-6)
        slopes[impl] = s
    for q in (0.1, 0.5, 0.9):  # same quantiles of U(l, u) within sampling error
        assert abs(np.quantile(slopes["native"], q) - np.quantile(slopes["ops"], q)) < 0.005
    assert not np.array_equal(slopes["native"], slopes["ops"])  # separate random streams


def test_native_sample_is_independent_of_the_batch_split():
    """Slopes are a function of (seed, element index): a step draws one seed for the tensor."""
    block = RReLU(impl="native")
    block.hybridize()
    x = -nd.ones((4, 3, 8, 8))
    mx.random.seed(1)
    with autograd.train_mode():
        a = (block(x) / x).asnumpy()
    assert len(np.unique(a)) > 0.99 * a.size
    seeds_differ = []
    for _ in range(2):
        with autograd.train_mode():
            seeds_differ.append((block(x) / x).asnumpy())
    assert not np.array_equal(*seeds_differ)


def test_set_rrelu_impl_switches_every_block():
    import nets
    from nets.activations import set_rrelu_impl

    net = nets.get_model("tinynet", classes=3, act="rrelu")
    assert set_rrelu_impl(net, "ops") == 20
    blocks = []
    net.apply(lambda b: blocks.append(b) if isinstance(b, RReLU) else None)
    assert {b.impl for b in blocks} == {"ops"} and not blocks[0].uses_native()
    with pytest.raises(ValueError):
        set_rrelu_impl(net, "gpu")


def test_lib_api_patch_adds_bfloat16_once():
    source = (native._mxnet_dir() / "src" / "lib_api.cc").read_text()
    patched = native.patched_lib_api(source)
    assert "Invalid dtype flag" in patched and patched.count("case 12:") == 1
    assert native.patched_lib_api(patched) == patched  # idempotent
    with pytest.raises(RuntimeError, match="bfloat16"):
        native.patched_lib_api("int main() {}")


def _bf16(a):
    from nets.precision import bfloat16
    return nd.amp_cast(a, dtype=bfloat16())


def _f32(a):
    return nd.amp_cast(a, dtype="float32")


def test_bfloat16_operator_equals_float32_rounded_to_bfloat16():
    """Same seed, same element indices: the bf16 op is the fp32 op rounded to nearest even."""
    assert native.load()
    xb = _bf16(nd.random.normal(0, 1, (4, 16, 32, 32)))
    dy = nd.full(xb.shape, 0.375)  # exact in bfloat16
    t = nd.ones((1,))
    results = {}
    for name, x, g in (("f32", _f32(xb), dy), ("bf16", xb, _bf16(dy))):
        x.attach_grad()
        mx.random.seed(3)
        with autograd.record():
            y = nd.ndsb_rrelu(x, t, lower=0.125, upper=1 / 3.0)[0]
        y.backward(g)
        assert y.dtype == x.dtype and x.grad.dtype == x.dtype
        results[name] = (y, x.grad)
    (y32, g32), (y16, g16) = results["f32"], results["bf16"]
    np.testing.assert_array_equal(_f32(y16).asnumpy(), _f32(_bf16(y32)).asnumpy())
    np.testing.assert_array_equal(_f32(g16).asnumpy(), _f32(_bf16(g32)).asnumpy())
    x = _f32(xb).asnumpy()
    assert np.array_equal(_f32(y16).asnumpy()[x >= 0], x[x >= 0])  # passed through exactly
    s = (_f32(y16).asnumpy() / x)[x < -0.1]
    assert 0.12 < s.min() and s.max() < 0.34 and s.std() > 0.05  # per-element U(l, u)


@needs_bf16
def test_bfloat16_network_calls_the_operator_without_casts():
    import json

    import nets

    counts = {}
    for impl in ("native", "ops"):
        net = nets.get_model("lenet", classes=3, act="rrelu", act_kw={"impl": impl})
        nets.set_precision(net, "bfloat16")
        net.initialize(nets.default_initializer("rrelu"))
        net.hybridize()
        x = nd.random.uniform(shape=(2, 1, 28, 28))
        with autograd.record():
            out = net(x)
        out.backward()
        assert np.isfinite(out.asnumpy()).all()
        nodes = json.loads(net._cached_graph[1].tojson(remove_amp_cast=False))["nodes"]
        counts[impl] = sum(n["op"] == "amp_cast" for n in nodes)
    rrelus = []
    net.apply(lambda b: rrelus.append(b) if isinstance(b, RReLU) else None)
    assert counts["ops"] - counts["native"] == 2 * len(rrelus) > 0

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

"""``auto`` precision by measurement (pipeline/lib/precision.py): the decision rule on recorded
timings, the cache, the lock, and a resumed run keeping its precision. No test here depends on
how fast anything is: timings are recorded, or only their presence is checked."""
from __future__ import annotations

import threading
import time
from pathlib import Path

import numpy as np
import pytest

from pipeline import predict as P
from pipeline import train as T
from pipeline.ingest import Settings, ingest
from pipeline.lib import checkpoint
from pipeline.lib import precision as prec
from pipeline.lib.records import load_meta
from pipeline.lib.settings import TrainSection, TTASection
from pipeline.tools.synth import generate
from tests.conftest import where

KW = {"classes": 3, "in_channels": 1, "act": "leaky", "bn": False}


@pytest.fixture
def measuring(tmp_path, monkeypatch):
    """Measure (not the tests' flag rule), into a cache of this test's own."""
    monkeypatch.setenv("NDSB_AUTO", "measure")
    monkeypatch.setenv("NDSB_AUTO_CACHE", str(tmp_path / "auto"))
    return tmp_path / "auto"


@pytest.fixture
def two_floats(monkeypatch):
    """As on a CPU with bfloat16 kernels, whatever this one has (only recorded timings or
    kept precisions are used with it: bfloat16 never runs)."""
    monkeypatch.setattr(prec, "float_candidates", lambda ctxs=(): ("float32", "bfloat16"))


def recorded(rates, calls=None, errors=None, busy=0.0):
    """A stand-in for :func:`prec.measure` returning recorded timings (and how busy the
    machine was meanwhile)."""
    def measure(kind, net, kwargs, size, batch, candidates, int8_options=None, budget=0):
        if calls is not None:
            calls.append(kind)
            time.sleep(0.2)  # long enough for a second caller to queue on the lock
        return {p: rates[p] for p in candidates}, dict(errors or {}), 0.2, busy
    return measure


# ------------------------------------------------------------------------ the decision rule

@pytest.mark.parametrize("rates,expected", [
    ({"float32": 19.2, "bfloat16": 15.2}, "float32"),   # bf16 0.79x: the Xeon of issue 29
    ({"float32": 10.0, "bfloat16": 25.0}, "bfloat16"),  # bf16 2.5x: an AMX Xeon
    # The same Emerald Rapids Xeon measured by `auto` itself, AMX exposed and hidden:
    ({"float32": 19.18, "bfloat16": 45.79}, "bfloat16"),  # training, AMX
    ({"float32": 74.66, "bfloat16": 201.41}, "bfloat16"),  # inference, AMX
    ({"float32": 15.99, "bfloat16": 13.27}, "float32"),  # training, AMX hidden
    ({"float32": 61.89, "bfloat16": 35.16}, "float32"),  # inference, AMX hidden
    ({"float32": 10.0, "bfloat16": 10.3}, "float32"),   # within the margin: the exact one
    ({"float32": 10.0, "bfloat16": 10.6}, "bfloat16"),
    ({"float32": 10.0, "bfloat16": 0.0}, "float32"),    # a path that failed
    ({"float32": 50.0, "bfloat16": 60.0, "int8": 200.0}, "int8"),
    ({"float32": 50.0, "int8": 51.0}, "float32"),
    ({"bfloat16": 3.0}, "bfloat16"),
])
def test_fastest_path_wins_unless_within_the_margin_of_a_more_exact_one(rates, expected):
    assert prec.decide(rates) == expected


def test_decide_refuses_unknown_paths():
    with pytest.raises(ValueError, match="no known path"):
        prec.decide({"float16": 3.0})


def test_explicit_precisions_are_never_overridden(measuring, two_floats, monkeypatch):
    monkeypatch.setattr(prec, "measure", recorded({"float32": 1.0, "bfloat16": 9.0}, []))
    d = prec.choose(prec.TRAINING, "float32", "lenet", KW, 32, 8)
    assert (d.precision, d.source, d.rates) == ("float32", "explicit", {})
    assert d.line() == "training precision float32 (set explicitly)"


def test_bfloat16_where_it_cannot_run_is_refused():
    if prec.bfloat16_supported():
        pytest.skip("this CPU runs bfloat16")
    with pytest.raises(ValueError, match="needs a CPU with AVX-512"):
        prec.choose(prec.TRAINING, "bfloat16", "lenet", KW, 32, 8)


# --------------------------------------------------------------------------- measure, cache

def test_measured_once_then_cached_printed_and_recorded(measuring, two_floats, monkeypatch):
    calls = []
    monkeypatch.setattr(prec, "measure", recorded({"float32": 19.2, "bfloat16": 15.2}, calls))
    first = prec.choose(prec.TRAINING, "auto", "lenet", KW, 32, 8)
    assert (first.precision, first.source) == ("float32", "measured")
    assert first.line() == "auto: float32 for training here: bfloat16 measured 0.79x"
    second = prec.choose(prec.TRAINING, "auto", "lenet", KW, 32, 8)
    assert (second.precision, second.source) == ("float32", "cached")
    assert second.line().startswith("auto: float32 for training here: bfloat16 measured 0.79x "
                                    "(cached measurement of ")
    assert calls == ["training"]
    assert second.as_dict() == {"requested": "auto", "used": "float32", "source": "cached",
                                "rates_img_s": {"float32": 19.2, "bfloat16": 15.2},
                                "measured_on": first.measured_on, "busy_elsewhere": 0.0}
    assert len(list(measuring.glob("training-lenet-*.json"))) == 1


def test_a_measurement_on_a_busy_machine_is_kept_for_an_hour_only(measuring, two_floats,
                                                                   monkeypatch):
    """Other processes on the CPUs slow the paths unevenly: such a ranking is provisional. It
    serves the processes started with it (shards, workers: they must run the same path) for
    an hour, says so, and is then measured again (and, on a quiet machine, cached for good)."""
    calls = []
    # what make repro measured beside a test run on an AMX Xeon: bfloat16 ranked last
    monkeypatch.setattr(prec, "measure", recorded({"float32": 31.07, "bfloat16": 20.48}, calls,
                                                  busy=0.6))
    busy = prec.choose(prec.TRAINING, "auto", "lenet", KW, 32, 8)
    assert (busy.precision, busy.source) == ("float32", "measured")
    assert busy.line() == ("auto: float32 for training here: bfloat16 measured 0.66x (other "
                           "processes used 60% of the CPUs while it was timed now: kept for an "
                           "hour only, then measured again)")
    assert busy.as_dict()["busy_elsewhere"] == 0.6
    shard = prec.choose(prec.TRAINING, "auto", "lenet", KW, 32, 8)  # started with it, at once
    assert (shard.precision, shard.source) == ("float32", "cached")
    assert "60% of the CPUs while it was timed: kept for an hour only" in shard.line()
    assert calls == ["training"]
    later = time.time() + prec.PROVISIONAL + 1
    monkeypatch.setattr(prec.time, "time", lambda: later)
    monkeypatch.setattr(prec, "measure", recorded({"float32": 56.2, "bfloat16": 85.9}, calls,
                                                  busy=prec.BUSY_LIMIT))
    quiet = prec.choose(prec.TRAINING, "auto", "lenet", KW, 32, 8)
    assert (quiet.precision, quiet.source) == ("bfloat16", "measured")
    assert quiet.line() == "auto: bfloat16 for training here: float32 measured 0.65x"
    later += 10 * prec.PROVISIONAL  # a quiet measurement does not expire
    assert prec.choose(prec.TRAINING, "auto", "lenet", KW, 32, 8).source == "cached"
    assert calls == ["training", "training"]


def test_busy_elsewhere_is_the_others_share_of_the_cpu_time():
    from pipeline.lib import runtime

    # 2 CPUs for 1 s: 4 s of CPU time in all, 3 busy, 1.5 of them this process's own
    assert runtime.busy_elsewhere((10.0, 20.0, 1.0), (13.0, 24.0, 2.5)) == pytest.approx(0.375)
    assert runtime.busy_elsewhere((10.0, 20.0, 1.0), (11.0, 24.0, 3.0)) == 0.0  # clamped
    assert runtime.busy_elsewhere(None, (1.0, 2.0, 0.0)) is None
    assert runtime.busy_elsewhere((1.0, 2.0, 0.0), (1.0, 2.0, 0.0)) is None  # no time passed
    now = runtime.cpu_times()
    if now is not None:  # Linux: the machine's busy time within its total, ours within both
        busy, total, own = now
        assert 0 <= busy <= total and own >= 0


@pytest.mark.parametrize("change", [dict(size=48), dict(batch=16), dict(net="tinynet"),
                                    dict(kind=prec.INFERENCE),
                                    dict(kwargs={**KW, "act": "rrelu"})])
def test_another_shape_or_net_is_measured_anew(measuring, two_floats, monkeypatch, change):
    calls = []
    monkeypatch.setattr(prec, "measure", recorded({"float32": 1.0, "bfloat16": 2.0}, calls))
    base = dict(kind=prec.TRAINING, requested="auto", net="lenet", kwargs=KW, size=32, batch=8)
    prec.choose(**base)
    assert prec.choose(**{**base, **change}).source == "measured"
    assert len(calls) == 2


def test_threads_and_cpu_are_part_of_the_key(monkeypatch):
    key = prec.cache_key(prec.TRAINING, "lenet", KW, 32, 8, ("float32", "bfloat16"))
    monkeypatch.setenv("OMP_NUM_THREADS", "7")
    assert prec.cache_key(prec.TRAINING, "lenet", KW, 32, 8, ("float32", "bfloat16")) != key
    for field in ("cpu", "cpu_flags", "mxnet", "onednn", "code", "isa"):
        assert field in key


def test_a_damaged_cache_entry_is_measured_again(measuring, two_floats, monkeypatch):
    calls = []
    monkeypatch.setattr(prec, "measure", recorded({"float32": 1.0, "bfloat16": 2.0}, calls))
    prec.choose(prec.TRAINING, "auto", "lenet", KW, 32, 8)
    for damage in ("{not json", '{"key": {}, "rates": {}}', ""):
        next(measuring.glob("training-*.json")).write_text(damage)
        assert prec.choose(prec.TRAINING, "auto", "lenet", KW, 32, 8).source == "measured"
    assert len(calls) == 4


def test_an_unwritable_cache_still_decides(tmp_path, two_floats, monkeypatch, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("")
    monkeypatch.setenv("NDSB_AUTO", "measure")
    monkeypatch.setenv("NDSB_AUTO_CACHE", str(blocker / "auto"))  # under a file: unwritable
    monkeypatch.setattr(prec, "measure", recorded({"float32": 1.0, "bfloat16": 2.0}))
    assert prec.choose(prec.TRAINING, "auto", "lenet", KW, 32, 8).precision == "bfloat16"
    assert "cannot cache the auto-precision measurement" in capsys.readouterr().out


def test_two_processes_measure_once(measuring, two_floats, monkeypatch):
    """The second caller waits for the first one's measurement instead of timing paths while
    the first still runs (shards, dist_sync workers on one machine)."""
    calls = []
    monkeypatch.setattr(prec, "measure", recorded({"float32": 1.0, "bfloat16": 2.0}, calls))
    out = []
    threads = [threading.Thread(target=lambda: out.append(
        prec.choose(prec.TRAINING, "auto", "lenet", KW, 32, 8))) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert calls == ["training"]
    assert sorted(d.source for d in out) == ["cached", "measured"]
    assert {d.precision for d in out} == {"bfloat16"}


def test_a_path_that_failed_is_reported_and_not_chosen(measuring, two_floats, monkeypatch):
    monkeypatch.setattr(prec, "measure", recorded(
        {"float32": 3.0, "bfloat16": 0.0}, errors={"bfloat16": "MXNetError: no primitive"}))
    d = prec.choose(prec.TRAINING, "auto", "lenet", KW, 32, 8)
    assert d.precision == "float32"
    assert "bfloat16 failed (MXNetError: no primitive)" in d.line()


def test_only_candidate_and_flags_need_no_measurement(measuring, monkeypatch):
    monkeypatch.setattr(prec, "measure", lambda *a, **k: pytest.fail("measured"))
    monkeypatch.setattr(prec, "float_candidates", lambda ctxs=(): ("float32",))
    d = prec.choose(prec.TRAINING, "auto", "lenet", KW, 32, 8)
    assert (d.precision, d.source) == ("float32", "only candidate")
    monkeypatch.setattr(prec, "float_candidates", lambda ctxs=(): ("float32", "bfloat16"))
    monkeypatch.setenv("NDSB_AUTO", "flags")
    assert prec.choose(prec.TRAINING, "auto", "lenet", KW, 32, 8).source == "flags"
    monkeypatch.setenv("NDSB_AUTO", "sometimes")
    with pytest.raises(ValueError, match="NDSB_AUTO must be one of"):
        prec.choose(prec.TRAINING, "auto", "lenet", KW, 32, 8)


def test_int8_is_tried_only_when_measured_faster(measuring, monkeypatch):
    monkeypatch.setattr(prec, "float_candidates", lambda ctxs=(): ("float32",))
    opts = {"keep_fp32": ["first_conv"], "granularity": "tensor-wise"}
    monkeypatch.setattr(prec, "measure", recorded({"float32": 53.5, "int8": 84.7}))
    d = prec.choose(prec.INFERENCE, "auto", "lenet", KW, 32, 128, int8=True, int8_options=opts)
    assert (d.precision, d.int8_faster) == ("float32", True)
    monkeypatch.setattr(prec, "measure", recorded({"float32": 53.5, "int8": 40.0}))
    d = prec.choose(prec.INFERENCE, "auto", "lenet", KW, 32, 64, int8=True, int8_options=opts)
    assert (d.precision, d.int8_faster) == ("float32", False)
    assert d.as_dict()["int8_faster"] is False


def test_a_real_measurement_times_every_candidate(measuring):
    """Real timing of a small net (the rates' values are not checked, only that each
    candidate was timed and the result cached, for good or, beside the test suite's other
    worker, for an hour)."""
    opts = {"keep_fp32": ["first_conv"], "granularity": "tensor-wise"}
    d = prec.choose(prec.INFERENCE, "auto", "lenet", KW, 32, 8, int8=True, int8_options=opts)
    assert d.source == "measured" and set(d.rates) == {*prec.float_candidates(), "int8"}
    assert all(r > 0 for r in d.rates.values()) and not d.errors
    assert isinstance(d.int8_faster, bool)
    again = prec.choose(prec.INFERENCE, "auto", "lenet", KW, 32, 8, int8=True,
                        int8_options=opts)
    assert again.source == "cached" and again.rates == d.rates


def test_ctrl_c_while_timing_stops_it_and_records_nothing(measuring, monkeypatch):
    """A Ctrl-C that arrives during INT8 calibration (inside MXNet's callbacks, which swallow
    exceptions) still stops the measurement, as a KeyboardInterrupt, and caches nothing."""
    import os
    import signal

    from pipeline.lib import quantize as Q

    real = Q.quantize
    calls = []

    def interrupted(*args, **kwargs):
        calls.append(1)
        os.kill(os.getpid(), signal.SIGINT)  # lands while calibrating
        return real(*args, **kwargs)

    monkeypatch.setattr(Q, "quantize", interrupted)
    opts = {"keep_fp32": ["first_conv"], "granularity": "tensor-wise"}
    t0 = time.perf_counter()
    with pytest.raises(KeyboardInterrupt):
        prec.choose(prec.INFERENCE, "auto", "lenet", KW, 32, 8, int8=True, int8_options=opts,
                    budget=30.0)
    assert calls and time.perf_counter() - t0 < 20  # stopped, not timed to the budget
    assert not list(measuring.glob("*.json"))
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # handler restored


def test_time_in_turns_stops_when_asked():
    from pipeline.lib import speedtest

    done = []
    steps = {"a": lambda: done.append("a") or 1, "b": lambda: done.append("b") or 1}
    with pytest.raises(speedtest.Stopped):
        speedtest.time_in_turns(steps, budget=60.0, stopped=lambda: len(done) >= 3 or None)
    assert len(done) == 3


# ------------------------------------------------------------------ resume keeps precision

@pytest.fixture(scope="module")
def records(tmp_path_factory) -> Path:
    base = tmp_path_factory.mktemp("auto")
    generate(base / "ndsb", classes=3, per_class=12, test=4, seed=3, max_size=80)
    ingest(base / "ndsb", base / "records", Settings(size=32), folds=2, workers=1)
    return base / "records"


def test_a_resumed_training_run_keeps_its_checkpoints_precision(records, tmp_path, measuring,
                                                                 two_floats, monkeypatch,
                                                                 capsys):
    cfg = TrainSection.of(epochs=1, batch_size=8, lr_steps=[], workers=0, act="leaky",
                          bn=False, precision="auto")
    paths = where(tmp_path, records)
    monkeypatch.setattr(prec, "measure", recorded({"float32": 2.0, "bfloat16": 1.0}))
    first = T.train(T.Run("lenet", 0, cfg, paths))
    assert first["precision"] == "float32"
    assert first["precision_decision"]["source"] == "measured"
    # Later measurements would pick bfloat16 (timing noise, a busy neighbour): the run that
    # continues from the checkpoint keeps float32 and resumes instead of starting afresh.
    for entry in measuring.glob("*.json"):
        entry.unlink()
    monkeypatch.setattr(prec, "measure", recorded({"float32": 1.0, "bfloat16": 2.0}))
    capsys.readouterr()
    more = T.train(T.Run("lenet", 0, cfg.replace(epochs=2), paths))
    out = capsys.readouterr().out
    assert "auto: float32 for training here: the precision of the run being resumed" in out
    assert "starting afresh" not in out
    assert more["precision"] == "float32" and more["epochs"] == 2
    assert more["precision_decision"]["source"] == "kept"
    assert (checkpoint.run_dir(paths.checkpoints, "lenet", 0) / "model.json").exists()
    # A checkpoint of other settings is not kept, whatever its precision.
    assert T.kept_precision(T.Run("lenet", 0, cfg.replace(lr=0.5), paths),
                            load_meta(records), "architecture") is None


def test_a_resumed_prediction_keeps_its_chunks_precision(tmp_path, monkeypatch, two_floats):
    """Chunks computed in float32 stay the ones resumed, whatever a new decision says."""
    monkeypatch.setenv("NDSB_AUTO", "measure")
    monkeypatch.setenv("NDSB_AUTO_CACHE", str(tmp_path / "auto"))
    monkeypatch.setattr(prec, "measure", recorded({"float32": 1.0, "bfloat16": 3.0}))
    model = tmp_path / "model"
    model.mkdir()
    (model / "model.json").write_text("{}")
    (tmp_path / "records").mkdir()
    (tmp_path / "records" / "meta.json").write_text("{}")
    cfg = TTASection.of(work=str(tmp_path / "work"), int8=False)
    spec = {"net": "lenet", "kwargs": KW, "size": 32}
    fresh = P.inference_decision("lenet", 0, cfg, spec, model, tmp_path / "records")
    assert (fresh.precision, fresh.source) == ("bfloat16", "measured")
    from pipeline.lib.chunks import ChunkStore

    store = ChunkStore(cfg.work, "lenet", 0, P.work_settings("lenet", 0, cfg, "float32", model,
                                                             tmp_path / "records"))
    store.open()
    store.save("test", 0, 0, 2, {"probs": np.zeros((2, 3))}, {"seconds": 1.0, "views": 2})
    kept = P.inference_decision("lenet", 0, cfg, spec, model, tmp_path / "records")
    assert (kept.precision, kept.source) == ("float32", "kept")

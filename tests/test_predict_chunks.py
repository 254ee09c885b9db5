"""The real job's predict: chunks that resume after kill -9, shards that merge, the INT8 guard."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from pipeline import predict as P
from pipeline.lib import chunks as C
from pipeline.lib.predictions import load_predictions
from pipeline.lib.settings import TTASection
from tests.conftest import train_lenet, write_params
from tests.test_predict import NET, at, cfg, pred

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> tuple[Path, Path]:
    """(records, checkpoints) of the lenet test_predict uses, trained for this module."""
    return train_lenet(tmp_path_factory.mktemp("chunks"))


def outputs(tmp: Path) -> dict[str, np.ndarray]:
    out = {}
    for split in ("valid", "test"):
        probs, names = load_predictions(pred(tmp), split, NET, 0)
        out[split], out[split + "_names"] = probs, np.array(names)
    return out


def predict_command(tmp: Path, records: Path, ck: Path, tta: TTASection
                    ) -> tuple[list[str], dict[str, str]]:
    """The module command (and its environment) predicting lenet fold 0 with ``tta``."""
    write_params(tmp / "params.yaml", at(tmp, ck, records, tmp / "m"), tta=tta)
    cmd = [sys.executable, "-m", "pipeline.predict", "--net", NET, "--fold", "0",
           "--params", str(tmp / "params.yaml")]
    return cmd, dict(os.environ, PYTHONPATH=str(ROOT))


def assert_same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        np.testing.assert_array_equal(a[key], b[key], err_msg=key)


def test_chunk_bounds_shards_and_shard_parsing():
    assert C.chunk_bounds(10, 4, 3) == [(0, 6), (6, 10)]  # rounded up to whole batches
    assert C.chunk_bounds(0, 4, 3) == []
    bounds = C.chunk_bounds(100, 7, 1)
    covered = [i for s in range(4) for i in C.shard_chunks(len(bounds), s, 4)]
    assert covered == list(range(len(bounds)))  # every chunk in exactly one shard, in order
    assert all(C.shard_of(i, len(bounds), 4) == s
               for s in range(4) for i in C.shard_chunks(len(bounds), s, 4))
    assert C.parse_shard("3/8") == (3, 8)
    for bad in ("8/8", "-1/4", "a/b", "3"):
        with pytest.raises(C.ChunkError, match="--shard"):
            C.parse_shard(bad)
    with pytest.raises(C.ChunkError, match="chunk_images"):
        C.chunk_bounds(10, 0, 3)


def test_chunk_store_detects_corruption_and_foreign_chunks(tmp_path, capsys):
    store = C.ChunkStore(tmp_path, NET, 0, {"n": 5})
    store.open()
    probs = np.random.default_rng(0).random((4, 3)).astype(np.float32)
    store.save("test", 0, 0, 4, {"probs": probs}, {"seconds": 1.0, "views": 20})
    arrays, info = store.load("test", 0, 0, 4)
    np.testing.assert_array_equal(arrays["probs"], probs)
    assert info == {"seconds": 1.0, "views": 20}
    assert store.load("test", 0, 0, 3) is None  # other bounds: not this chunk
    assert "corrupt" in capsys.readouterr().out and not store.path("test", 0).exists()

    store.save("test", 0, 0, 4, {"probs": probs}, {"seconds": 1.0, "views": 20})
    raw = bytearray(store.path("test", 0).read_bytes())
    raw[-200] ^= 0xFF  # one flipped bit-pattern inside the stored probabilities
    store.path("test", 0).write_bytes(bytes(raw))
    assert store.load("test", 0, 0, 4) is None
    assert "corrupt" in capsys.readouterr().out
    store.path("test", 1).write_bytes(b"half a zip")  # a torn write
    assert store.load("test", 1, 4, 8) is None
    other = C.ChunkStore(tmp_path, NET, 0, {"n": 6})
    other.open()
    assert [fp for fp, _ in store.others()] == [other.fingerprint]
    assert C.describe_difference(store.settings, other.settings) == "n: 6 vs 5"


def test_finished_predictions_keep_the_store_a_running_shard_holds(tmp_path, capsys):
    """remove() after a merge drops this model's work, but not a store of other settings
    that a shard still running holds (its lock is taken): that work is not ours to drop."""
    mine = C.ChunkStore(tmp_path, NET, 0, {"n": 5})
    mine.open()
    running = C.ChunkStore(tmp_path, NET, 0, {"n": 6})
    running.open()
    idle = C.ChunkStore(tmp_path, NET, 0, {"n": 7})
    idle.open()
    with running.lock(1, 4):
        mine.remove()
        assert running.dir.is_dir() and not mine.dir.exists() and not idle.dir.exists()
        assert f"keeping {running.dir}" in capsys.readouterr().out
    mine.remove()
    assert not mine.model_dir.exists()


def test_chunked_resumed_and_sharded_runs_equal_one_pass(trained, tmp_path, capsys):
    records, ck = trained
    whole = P.predict(NET, 0, cfg(tmp_path / "one", ck, chunk_images=1000), at(tmp_path / "one", ck, records, tmp_path / "m1"))
    assert whole["chunks"] == {"total": 2, "resumed": 0}
    small = dict(chunk_images=2, batch_size=2)
    one_pass = P.predict(NET, 0, cfg(tmp_path / "one2", ck, chunk_images=1000,
                                              batch_size=2), at(tmp_path / "one2", ck, records, tmp_path / "m1"))
    work = tmp_path / "sh"
    for s in (0, 2):  # shards 0 and 2 of 3; shard 1 is "lost on the cluster"
        out = P.predict(NET, 0, cfg(work, ck, **small), at(work, ck, records, tmp_path / "m"), (s, 3))
        assert out["shard"] == f"{s}/3" and out["computed"] > 0
    assert not (work / "pred").exists()  # a shard writes chunks only
    with pytest.raises(C.ChunkError, match=r"shard 1/3 not finished"):
        P.predict(NET, 0, cfg(work, ck, **small), at(work, ck, records, tmp_path / "m"), merge_only=True)
    out = P.predict(NET, 0, cfg(work, ck, **small), at(work, ck, records, tmp_path / "m"), (1, 3))
    rerun = P.predict(NET, 0, cfg(work, ck, **small), at(work, ck, records, tmp_path / "m"), (1, 3))
    assert rerun["computed"] == 0  # a requeued shard finds its work done
    merged = P.predict(NET, 0, cfg(work, ck, **small), at(work, ck, records, tmp_path / "m"), merge_only=True)
    assert merged["chunks"]["resumed"] == merged["chunks"]["total"] == 8 + 4
    assert_same(outputs(work), outputs(tmp_path / "one2"))
    assert merged["valid_logloss_by_n"] == one_pass["valid_logloss_by_n"]
    assert merged["valid_logloss_no_tta"] == one_pass["valid_logloss_no_tta"]
    assert not (work / "work").exists()  # the chunk store goes once the predictions exist
    # batch size 2 vs 3 changes oneDNN's batching only at the rounding level
    np.testing.assert_allclose(outputs(work)["test"], outputs(tmp_path / "one")["test"],
                               atol=2e-5)


def test_corrupt_chunk_is_recomputed_and_changed_settings_start_afresh(trained, tmp_path,
                                                                       capsys):
    records, ck = trained
    small = dict(chunk_images=2, batch_size=2)
    P.predict(NET, 0, cfg(tmp_path / "ref", ck, **small), at(tmp_path / "ref", ck, records, tmp_path / "m"))
    work = tmp_path / "run"
    for s in range(2):
        P.predict(NET, 0, cfg(work, ck, **small), at(work, ck, records, tmp_path / "m"), (s, 2))
    store_dir = next((work / "work" / f"{NET}--fold0").iterdir())
    victim = store_dir / "test-00001.npz"
    raw = bytearray(victim.read_bytes())
    raw[-100] ^= 0x55
    victim.write_bytes(bytes(raw))
    with pytest.raises(C.ChunkError, match=r"test chunks 1 of 4 \(shard 0/2"):
        P.predict(NET, 0, cfg(work, ck, **small), at(work, ck, records, tmp_path / "m"), merge_only=True)
    capsys.readouterr()
    out = P.predict(NET, 0, cfg(work, ck, **small), at(work, ck, records, tmp_path / "m"))
    assert out["chunks"] == {"total": 12, "resumed": 11}
    assert_same(outputs(work), outputs(tmp_path / "ref"))

    # chunks of other settings are named by a merge and removed by the next full run
    P.predict(NET, 0, cfg(work, ck, **small), at(work, ck, records, tmp_path / "m"), (0, 2))
    with pytest.raises(C.ChunkError, match=r"other settings exist .*n: 5 vs 4"):
        P.predict(NET, 0, cfg(work, ck, n=4, **small), at(work, ck, records, tmp_path / "m"), merge_only=True)
    capsys.readouterr()
    P.predict(NET, 0, cfg(work, ck, n=4, **small), at(work, ck, records, tmp_path / "m"))
    assert "settings changed: removed" in capsys.readouterr().out


def test_a_shard_running_twice_is_refused(trained, tmp_path):
    records, ck = trained
    c = cfg(tmp_path, ck, chunk_images=2, batch_size=2)
    settings = P.work_settings(NET, 0, c, "float32", ck / f"{NET}--fold0", records)
    store = C.ChunkStore(c.work, NET, 0, settings)
    with store.lock(1, 4):
        with pytest.raises(C.ChunkError, match=r"shard 1/4 is already running \(pid \d+"):
            P.predict(NET, 0, c, at(tmp_path, ck, records, tmp_path / "m"), (1, 4))
        P.predict(NET, 0, c, at(tmp_path, ck, records, tmp_path / "m"), (2, 4))  # another shard is fine


def test_int8_auto_uses_int8_within_tolerance_and_falls_back_beyond(trained, tmp_path,
                                                                    monkeypatch):
    records, ck = trained
    P.predict(NET, 0, cfg(tmp_path / "fp32", ck), at(tmp_path / "fp32", ck, records, tmp_path / "m32"))
    ok = P.predict(NET, 0, cfg(tmp_path / "ok", ck, int8="auto", int8_tolerance=1.0,
                                        int8_guard_views=2), at(tmp_path / "ok", ck, records, tmp_path / "mok"))
    guard = ok["int8_guard"]
    assert ok["int8"] == "auto" and ok["int8_used"] and ok["precision"] == "int8"
    assert guard["decision"] == "int8" and guard["views"] == 2 and guard["images"] == 15
    assert guard["delta"] == pytest.approx(guard["int8_logloss"] - guard["fp32_logloss"],
                                           abs=1e-6)
    # A guard that finds INT8 too costly: the float net predicts, and the metrics say why.
    real_guard = P.int8_guard

    def strict(*args, **kwargs):
        out = real_guard(*args, **kwargs)
        return dict(out, decision="float", reason="INT8 is +0.5 from fp32: INT8 off")

    monkeypatch.setattr(P, "int8_guard", strict)
    off = P.predict(NET, 0, cfg(tmp_path / "off", ck, int8="auto"), at(tmp_path / "off", ck, records, tmp_path / "moff"))
    saved = json.loads((tmp_path / "moff" / f"predict--{NET}--fold0.json").read_text())
    assert saved["int8_used"] is False and saved["precision"] == "float32"
    assert saved["int8_guard"]["reason"].endswith("INT8 off")
    assert_same(outputs(tmp_path / "off"), outputs(tmp_path / "fp32"))
    assert off["valid_logloss"] == saved["valid_logloss"]


@pytest.mark.slow
def test_kill_9_mid_tta_then_rerun_resumes_and_equals_uninterrupted(trained, tmp_path):
    records, ck = trained
    tta = cfg(tmp_path, ck, n=60, chunk_images=2, batch_size=2)
    cmd, env = predict_command(tmp_path, records, ck, tta)
    log = open(tmp_path / "first-run.log", "wb")  # a file, not a pipe: output never blocks
    proc = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)
    work = tmp_path / "work" / f"{NET}--fold0"
    deadline = time.time() + 300
    def finished() -> int:  # complete chunks, not the temporary file of one being written
        return len([f for f in work.glob("*/*.npz") if not f.name.startswith(".")])

    while finished() < 3:
        assert proc.poll() is None, (tmp_path / "first-run.log").read_text()
        assert time.time() < deadline
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)  # predict and its loader worker, mid-chunk
    proc.wait()
    log.close()
    done = finished()
    assert 3 <= done < 12 and not (tmp_path / "pred").exists()
    out = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True,
                         timeout=600)
    assert out.returncode == 0, out.stderr
    assert f"resuming: {done} of 12 chunks already done" in out.stdout
    resumed = outputs(tmp_path)
    P.predict(NET, 0, cfg(tmp_path / "ref", ck, n=60, chunk_images=2, batch_size=2), at(tmp_path / "ref", ck, records, tmp_path / "mref"))
    assert_same(resumed, outputs(tmp_path / "ref"))
    assert not work.exists()


def test_a_requested_stop_saves_the_partial_chunk_and_the_rerun_completes_it(
        trained, tmp_path, monkeypatch, capsys):
    import contextlib
    import signal as sig

    from pipeline.lib.errors import Stopped

    records, ck = trained
    small = dict(chunk_images=6, batch_size=2, n=3)
    P.predict(NET, 0, cfg(tmp_path / "ref", ck, **small), at(tmp_path / "ref", ck, records, tmp_path / "m"))
    polls = []

    @contextlib.contextmanager
    def stop_after(what):  # SIGTERM "arrives" after the 4th batch: mid-way through chunk 1
        yield lambda: sig.SIGTERM if len(polls) >= 4 or polls.append(1) else None

    monkeypatch.setattr(P, "graceful_stop", stop_after)
    with pytest.raises(Stopped, match=r"SIGTERM: chunk 1 of valid saved after 2 images") as err:
        P.predict(NET, 0, cfg(tmp_path / "run", ck, **small), at(tmp_path / "run", ck, records, tmp_path / "m"))
    assert err.value.signum == sig.SIGTERM
    store_dir = next((tmp_path / "run" / "work" / f"{NET}--fold0").iterdir())
    assert sorted(f.name for f in store_dir.glob("*.npz")) == ["valid-00000.npz",
                                                               "valid-00001.part.npz"]
    monkeypatch.undo()
    out = P.predict(NET, 0, cfg(tmp_path / "run", ck, **small), at(tmp_path / "run", ck, records, tmp_path / "m"))
    assert out["chunks"]["resumed"] == 1
    assert_same(outputs(tmp_path / "run"), outputs(tmp_path / "ref"))


@pytest.mark.slow
def test_sigterm_mid_tta_stops_gracefully_and_the_rerun_equals_uninterrupted(trained, tmp_path):
    records, ck = trained
    tta = cfg(tmp_path, ck, n=60, chunk_images=4, batch_size=2)
    cmd, env = predict_command(tmp_path, records, ck, tta)
    proc = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    work = tmp_path / "work" / f"{NET}--fold0"
    deadline = time.time() + 300
    while not list(work.glob("*/valid-*.npz")):
        assert proc.poll() is None and time.time() < deadline
        time.sleep(0.02)
    t0 = time.time()
    proc.send_signal(signal.SIGTERM)  # what SLURM / Kubernetes send before SIGKILL
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 128 + signal.SIGTERM, err
    assert time.time() - t0 < 30  # within a cluster's usual grace period
    assert "predict stopped: lenet--fold0: SIGTERM:" in err and "Traceback" not in err
    out = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True,
                         timeout=600)
    assert out.returncode == 0, out.stderr
    assert "resuming:" in out.stdout
    P.predict(NET, 0, cfg(tmp_path / "ref", ck, n=60, chunk_images=4, batch_size=2), at(tmp_path / "ref", ck, records, tmp_path / "mref"))
    assert_same(outputs(tmp_path), outputs(tmp_path / "ref"))


def test_a_full_work_disk_gives_one_error_and_no_ignored_traceback(tmp_path, monkeypatch, capfd):
    """A chunk write that fails for lack of space raises the OSError once, leaves no
    temporary file, and nothing prints "Exception ignored in ZipFile.__del__" afterwards."""
    import builtins
    import errno
    import gc

    class Full:
        def __init__(self, fh):
            self.fh, self.written = fh, 0

        def write(self, data):
            self.written += len(data)
            if self.written > 512:
                raise OSError(errno.ENOSPC, "No space left on device")
            return self.fh.write(data)

        def __getattr__(self, name):
            return getattr(self.fh, name)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.fh.close()

    monkeypatch.setattr(C, "open", lambda path, mode: Full(builtins.open(path, mode)),
                        raising=False)
    store = C.ChunkStore(tmp_path, NET, 0, {"n": 5})
    store.open()
    probs = np.random.default_rng(0).random((64, 3)).astype(np.float32)
    with pytest.raises(OSError) as err:
        store.save("test", 0, 0, 64, {"probs": probs}, {"seconds": 1.0, "views": 20})
    assert err.value.errno == errno.ENOSPC
    gc.collect()
    assert "Exception ignored" not in capfd.readouterr().err
    assert list(store.dir.glob("*.npz*")) == [] and not store.path("test", 0).exists()
    monkeypatch.undo()
    store.save("test", 0, 0, 64, {"probs": probs}, {"seconds": 1.0, "views": 20})
    np.testing.assert_array_equal(store.load("test", 0, 0, 64)[0]["probs"], probs)

"""Faults a long run meets, made real: a file system that fills up, SIGTERM mid-epoch, and the
temporary files of a killed run. Nothing already written may be lost, every temporary file
goes, and the user reads one line saying what happened."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml

from pipeline import ingest as I
from pipeline import train as T
from pipeline.lib import checkpoint, fsutil
from pipeline.lib.errors import Stopped, stage_errors
from pipeline.tools.synth import generate
from tests.conftest import ROOT, where, write_params
from tests.test_train import config as train_config
from tests.test_train import params_of

NET = "lenet"


# ------------------------------------------------------------------------------ fixtures

@pytest.fixture
def small_fs(tmp_path):
    """``make(mb)``: a fresh tmpfs of ``mb`` MB under tmp_path (skipped where mounting is not
    allowed); unmounted afterwards."""
    mounts: list[Path] = []

    def make(mb: float) -> Path:
        where = tmp_path / f"fs{len(mounts)}"
        where.mkdir()
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={int(mb * 1024)}k", "tmpfs",
                               str(where)], capture_output=True, text=True)
        if done.returncode != 0:
            pytest.skip(f"cannot mount a small tmpfs here ({done.stderr.strip() or 'not root'})")
        mounts.append(where)
        return where

    yield make
    for mount in mounts:
        subprocess.run(["umount", "-l", str(mount)], capture_output=True)


def fill(folder: Path, leave: int) -> Path:
    """Take all but ``leave`` bytes of ``folder``'s file system with one file."""
    filler = folder / "filler"
    size = fsutil.free_bytes(folder) - leave
    with open(filler, "wb") as f:
        os.posix_fallocate(f.fileno(), 0, size)
    return filler


def temps(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob(".*.tmp-*"))


@pytest.fixture(scope="module")
def ndsb(tmp_path_factory) -> Path:
    base = tmp_path_factory.mktemp("faults")
    generate(base / "ndsb", classes=3, per_class=30, test=12, seed=5, max_size=120)
    return base / "ndsb"


@pytest.fixture(scope="module")
def records(ndsb) -> Path:
    out = ndsb.parent / "records"
    I.ingest(ndsb, out, I.Settings(size=32), folds=2, workers=1)
    return out


def config(tmp: Path, **over) -> dict:
    """test_train's settings with the thesis' activation and BatchNorm, whose noise and running
    statistics a resumed run must reproduce."""
    return train_config(tmp, **{"act": "rrelu", "bn": True, **over})


def assert_same_params(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        np.testing.assert_allclose(a[key], b[key], rtol=1e-5, atol=1e-6, err_msg=key)


def ingest_params(tmp: Path, root: Path, records: Path) -> Path:
    path = tmp / "params.yaml"
    path.write_text(yaml.safe_dump({"data": {"root": str(root), "size": 32, "folds": 2,
                                             "workers": 1},
                                    "paths": {"records": str(records)},
                                    "models": {"folds": [0, 1]}}))
    return path


# ------------------------------------------------------------------------ a full disk

def test_ingest_refuses_before_writing_when_the_records_cannot_fit(ndsb, small_fs, capsys):
    records = small_fs(1)
    (records / "meta.json").write_text('{"old": true}')  # a previous run's output
    fill(records, leave=32 << 10)
    with pytest.raises(SystemExit) as err:
        I.main(["--params", str(ingest_params(records.parent, ndsb, records))])
    message = str(err.value.code)
    assert message.startswith(f"ingest failed: no space left on {records} (needed about ")
    assert "\n" not in message and "free" in message
    assert (records / "meta.json").read_text() == '{"old": true}'
    assert sorted(p.name for p in records.iterdir()) == ["filler", "meta.json"]


def test_ingest_that_fills_the_disk_mid_write_cleans_up(ndsb, small_fs, monkeypatch):
    records = small_fs(1)
    (records / "meta.json").write_text('{"old": true}')
    fill(records, leave=48 << 10)
    monkeypatch.setattr(I, "estimate_bytes", lambda *a, **k: None)  # no precheck: hit the wall
    with pytest.raises(SystemExit) as err:
        I.main(["--params", str(ingest_params(records.parent, ndsb, records))])
    assert str(err.value.code).startswith(f"ingest failed: no space left on {records} (needed "
                                          "more than the ")
    assert (records / "meta.json").read_text() == '{"old": true}'
    assert sorted(p.name for p in records.iterdir()) == ["filler", "meta.json"], "temps left"


def test_atomic_writes_on_a_full_disk_keep_the_old_file_and_no_temporary(small_fs):
    folder = small_fs(0.5)
    target = folder / "test--ensemble.npy"
    fsutil.save_npy(target, np.zeros(10, np.float32))
    old = target.read_bytes()
    with pytest.raises(SystemExit) as err, stage_errors("ensemble"):
        fsutil.save_npy(target, np.zeros(1 << 20, np.float32))  # 4 MB on 0.5 MB
    assert str(err.value.code).startswith(f"ensemble failed: no space left on {folder} "
                                          "(needed about 4.0 MB, ")
    assert target.read_bytes() == old and temps(folder) == []


def test_checkpoint_on_a_full_disk_fails_cleanly_and_loses_nothing(records, small_fs, tmp_path,
                                                                   capsys):
    disk = small_fs(24)
    cfg = config(disk, epochs=1)
    paths = where(disk, records).replace(metrics=str(tmp_path / "m"), plots=str(tmp_path / "p"))
    T.train(T.Run(NET, 0, cfg, paths))  # epoch 1 fits
    run_dir = disk / "ck" / f"{NET}--fold0"
    kept = sorted(p.name for p in run_dir.iterdir())
    filler = fill(disk, leave=256 << 10)
    cfg_path = write_params(tmp_path / "params.yaml", paths, train=cfg.replace(epochs=2))
    argv = ["--net", NET, "--fold", "0", "--params", str(cfg_path)]
    with pytest.raises(SystemExit) as err:
        T.main(argv)
    message = str(err.value.code)
    assert message.startswith(f"train failed: no space left on {run_dir} (needed about ")
    assert "\n" not in message
    assert sorted(p.name for p in run_dir.iterdir()) == kept  # no epoch 2 piece, no temp
    assert checkpoint.latest(run_dir)["epoch"] == 1
    filler.unlink()  # space again: the rerun picks up after the intact epoch
    T.main(argv)
    assert "resuming after epoch 1" in capsys.readouterr().out
    assert checkpoint.latest(run_dir)["epoch"] == 2


def test_predict_on_a_full_disk_keeps_its_chunks_and_the_rerun_only_writes(tmp_path, small_fs,
                                                                            capsys):
    from pipeline import predict as P
    from tests.conftest import train_lenet
    from tests.test_predict import at
    from tests.test_predict import cfg as tta_cfg

    records, ck = train_lenet(tmp_path / "model")
    disk = small_fs(1)
    filler = fill(disk, leave=8 << 10)
    tta = tta_cfg(tmp_path, ck)
    paths = at(tmp_path, ck, records, tmp_path / "m").replace(predictions=str(disk / "pred"))
    out = paths.models(1)
    with pytest.raises(SystemExit) as err, stage_errors("predict"):
        P.predict(NET, 0, tta, paths)
    assert str(err.value.code).startswith(f"predict failed: no space left on {out} ")
    assert temps(disk) == [] and temps(tmp_path / "work") == []
    filler.unlink()
    capsys.readouterr()
    P.predict(NET, 0, tta, paths)  # the chunks were kept: nothing recomputed
    assert "resuming:" in capsys.readouterr().out
    assert sorted(p.name for p in out.iterdir()) == sorted(
        f"{split}--{NET}--fold0.{ext}" for split in ("valid", "test") for ext in ("npy",
                                                                                 "names.txt"))


# ------------------------------------------------------------------ a graceful stop

def _signal_after(monkeypatch, calls: int, sig: int = signal.SIGTERM) -> list[int]:
    """Make the ``calls``-th optimizer step send ``sig`` to this process, as a cluster would."""
    from pipeline.lib import sgd

    step, count = sgd.step, []

    def signalling_step(*args, **kwargs):
        loss = step(*args, **kwargs)
        count.append(1)
        if len(count) == calls:
            os.kill(os.getpid(), sig)
        return loss

    monkeypatch.setattr(sgd, "step", signalling_step)
    return count


@pytest.mark.parametrize("ema", [0.0, 0.5])
def test_sigterm_mid_epoch_saves_and_the_rerun_equals_an_uninterrupted_run(
        records, tmp_path, monkeypatch, capsys, ema):
    full = config(tmp_path / "full", epochs=3, ema_half_life=ema)
    steps = _signal_after(monkeypatch, 0)  # counts the steps, never signals
    T.train(T.Run(NET, 0, full, where(tmp_path / "full", records)))
    per_epoch = len(steps) // 3
    assert per_epoch >= 3
    monkeypatch.undo()
    cut = config(tmp_path / "cut", epochs=3, ema_half_life=ema)
    _signal_after(monkeypatch, per_epoch + 2)  # epoch 2, after its 2nd batch
    with pytest.raises(Stopped, match=rf"saved epoch 2 after batch 2 of {per_epoch}") as err:
        T.train(T.Run(NET, 0, cut, where(tmp_path / "cut", records)))
    assert err.value.signum == signal.SIGTERM
    run_dir = tmp_path / "cut" / "ck" / f"{NET}--fold0"
    assert (run_dir / "partial.json").exists() and checkpoint.latest(run_dir)["epoch"] == 1
    monkeypatch.undo()
    capsys.readouterr()
    metrics = T.train(T.Run(NET, 0, cut, where(tmp_path / "cut", records)))
    assert "resumed in epoch 2 after batch 2" in capsys.readouterr().out
    assert metrics["origin"] == "resumed in epoch 2 after batch 2"
    assert not (run_dir / "partial.json").exists()  # the epoch completed
    assert_same_params(params_of(tmp_path / "full" / "ck" / f"{NET}--fold0"),
                       params_of(run_dir))
    a = json.loads((tmp_path / "full" / "ck" / f"{NET}--fold0" / "model.json").read_text())
    b = json.loads((run_dir / "model.json").read_text())
    for ha, hb in zip(a["history"], b["history"]):  # the stopped epoch's loss sums carried over
        assert ha["train_loss"] == pytest.approx(hb["train_loss"], rel=1e-5)
        assert ha["valid_logloss"] == pytest.approx(hb["valid_logloss"], rel=1e-5)


def test_sigterm_during_validation_keeps_the_trained_epoch(records, tmp_path, monkeypatch,
                                                           capsys):
    full = config(tmp_path / "full", epochs=2)
    T.train(T.Run(NET, 0, full, where(tmp_path / "full", records)))
    cut = config(tmp_path / "cut", epochs=2)
    evaluate, calls = T.evaluate, []

    def signalling_evaluate(net, loader, ctx, stop=lambda: None):
        calls.append(1)
        if len(calls) == 1:  # the first epoch's validation
            os.kill(os.getpid(), signal.SIGTERM)
        return evaluate(net, loader, ctx, stop)

    monkeypatch.setattr(T, "evaluate", signalling_evaluate)
    with pytest.raises(Stopped, match=r"saved epoch 1 after batch (\d+) of \1"):
        T.train(T.Run(NET, 0, cut, where(tmp_path / "cut", records)))
    monkeypatch.undo()
    capsys.readouterr()
    T.train(T.Run(NET, 0, cut, where(tmp_path / "cut", records)))
    assert "resumed in epoch 1 after batch" in capsys.readouterr().out
    assert_same_params(params_of(tmp_path / "full" / "ck" / f"{NET}--fold0"),
                       params_of(tmp_path / "cut" / "ck" / f"{NET}--fold0"))


SECOND_SIGNAL = """
import os, signal, sys
from pathlib import Path
from pipeline import train as T
from pipeline.lib import sgd
from pipeline.lib.settings import TrainSection
from tests.conftest import where

step = sgd.step

def twice(*args, **kwargs):
    loss = step(*args, **kwargs)
    os.kill(os.getpid(), signal.SIGINT)  # "stop after this batch"
    os.kill(os.getpid(), signal.SIGINT)  # impatient: stop now
    print("still running after the second signal", flush=True)
    return loss

sgd.step = twice
tmp = Path(sys.argv[2])
cfg = TrainSection.of(epochs=2, batch_size=8, workers=0, lr_steps=[1])
T.train(T.Run("lenet", 0, cfg, where(tmp, Path(sys.argv[1]))))
"""


def test_a_second_signal_stops_at_once(records, tmp_path):
    out = subprocess.run([sys.executable, "-c", SECOND_SIGNAL, str(records), str(tmp_path)],
                         env=dict(os.environ, PYTHONPATH=str(ROOT)), capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == -signal.SIGINT, out.stderr  # the default action: killed by it
    assert "still running" not in out.stdout and "SIGINT received" in out.stderr
    assert not (tmp_path / "ck" / f"{NET}--fold0" / "partial.json").exists()


FORKED_CHILD = r"""
import os, signal, sys, time
from pipeline.lib.signals import graceful_stop
with graceful_stop("parent") as stopped:
    pid = os.fork()
    if pid == 0:          # a data-loader worker: forked inside the block
        time.sleep(60)
        os._exit(0)
    time.sleep(0.2)
    os.kill(pid, signal.SIGTERM)   # what Pool.terminate() does
    _, status = os.waitpid(pid, 0)
    print(os.WIFSIGNALED(status) and os.WTERMSIG(status), stopped())
"""


def test_a_forked_worker_dies_of_sigterm_silently_and_the_parent_goes_on():
    out = subprocess.run([sys.executable, "-c", FORKED_CHILD],
                         env=dict(os.environ, PYTHONPATH=str(ROOT)), capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == [str(int(signal.SIGTERM)), "None"]
    assert "received" not in out.stderr


def test_sigterm_to_the_trainer_process_exits_143_and_the_rerun_finishes_the_same(
        records, tmp_path):
    """The real thing: a trainer process, SIGTERM once its first epoch is saved."""
    cfg = config(Path("."), epochs=4, batch_size=2, workers=1)  # folders relative to the cwd
    write_params(tmp_path / "params.yaml", where(Path("."), records), train=cfg)
    cmd = [sys.executable, "-m", "pipeline.train", "--net", NET, "--fold", "0",
           "--params", str(tmp_path / "params.yaml")]
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    log = tmp_path / "first.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=out, stderr=out)
        run_dir = tmp_path / "ck" / f"{NET}--fold0"
        deadline = time.time() + 300
        while not (run_dir / "epoch-0001.json").exists():
            assert proc.poll() is None, log.read_text()
            assert time.time() < deadline
            time.sleep(0.01)
        t0 = time.time()
        proc.send_signal(signal.SIGTERM)
        rc = proc.wait(timeout=60)
    text = log.read_text()
    assert rc == 128 + signal.SIGTERM, text
    assert "train stopped: " in text and "rerun to continue" in text and "Traceback" not in text
    assert time.time() - t0 < 30
    rerun = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True,
                           timeout=600)
    assert rerun.returncode == 0, rerun.stderr
    assert "resumed in epoch" in rerun.stdout or "resuming after epoch" in rerun.stdout
    (tmp_path / "ref").mkdir()  # the same command, never interrupted
    ref = subprocess.run(cmd, cwd=tmp_path / "ref", env=env, capture_output=True, text=True,
                         timeout=600)
    assert ref.returncode == 0, ref.stderr
    assert_same_params(params_of(tmp_path / "ref" / "ck" / f"{NET}--fold0"), params_of(run_dir))


# ------------------------------------------------------------ leftovers of a crash

def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_stale_temporary_files_go_but_not_a_live_or_foreign_writers(tmp_path):
    host = fsutil._host()
    dead = tmp_path / f".train.rec.tmp-{host}-{_dead_pid()}-x1"
    live = tmp_path / f".train.rec.tmp-{host}-{os.getpid()}-x2"
    foreign = tmp_path / f".train.rec.tmp-elsewhere-{_dead_pid()}-x3"
    nested = tmp_path / "sub" / f".model.params.tmp-{host}-{_dead_pid()}-x4"
    for p in (dead, live, foreign, nested):
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(b"x" * 10)
    assert fsutil.remove_stale_temps(tmp_path, recursive=False) == [dead]
    assert fsutil.remove_stale_temps(tmp_path) == [nested]
    assert live.exists() and foreign.exists()
    assert socket.gethostname()  # the host part comes from here


def test_a_killed_ingest_leaves_temporaries_that_the_next_run_removes(tmp_path):
    generate(tmp_path / "ndsb", classes=3, per_class=300, test=200, seed=1, max_size=200)
    records = tmp_path / "records"
    cfg = ingest_params(tmp_path, tmp_path / "ndsb", records)
    cmd = [sys.executable, "-m", "pipeline.ingest", "--params", str(cfg)]
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 120
    while not [p for p in temps(records) if p.stat().st_size > 0] if records.exists() else True:
        assert proc.poll() is None, "ingest finished before it could be killed"
        assert time.time() < deadline
        time.sleep(0.005)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    left = temps(records)
    assert left and not (records / "meta.json").exists()
    done = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr
    assert all(f"removed {p}" in done.stdout for p in left), done.stdout
    assert temps(records) == [] and (records / "meta.json").exists()


def test_train_removes_the_temporaries_of_a_killed_run(records, tmp_path, capsys):
    cfg = config(tmp_path, epochs=1)
    run_dir = tmp_path / "ck" / f"{NET}--fold0"
    run_dir.mkdir(parents=True)
    stale = run_dir / f".epoch-0001.params.tmp-{fsutil._host()}-{_dead_pid()}-abc"
    stale.write_bytes(b"half a checkpoint")
    T.train(T.Run(NET, 0, cfg, where(tmp_path, records)))
    assert not stale.exists() and f"removed {stale}" in capsys.readouterr().out

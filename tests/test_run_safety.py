"""Stops, run locks and diverged weights, made real (issue 26, items 1-3).

* A SIGINT or SIGTERM sent to the whole process group (a terminal's Ctrl-C, ``timeout``,
  ``scancel``, a stopped ``dvc repro``) reaches the trainer *and* its data loader workers. The
  workers must leave the stop to the trainer: it finishes its batch, saves ``partial.*`` and
  exits 130 / 143, and the rerun resumes. A worker that dies anyway (``kill -9``, the OOM
  killer) ends the run in one line instead of a wait for a batch that never comes.
* Two trainers of one run: the second refuses at once, naming the first.
* Weights that stop being numbers end in one line naming the epoch, the fix and the last
  checkpoint that exists.

The trainer runs as a real process in its own session (so a group signal reaches only it and
its workers). A small driver wraps ``pipeline.train``'s command line and can hold the run at a
chosen optimizer step or validation pass until the test has sent its signal, so where the
signal lands is chosen, not raced.
"""
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

from pipeline import train as T
from pipeline.lib import fsutil
from pipeline.lib.errors import stage_errors
from pipeline.tools.synth import generate
from tests.conftest import ROOT, train_lenet
from tests.conftest import where as paths_under
from tests.test_faults import assert_same_params
from tests.test_faults import config as faults_config
from tests.test_train import params_of

NET = "lenet"
RUN = f"{NET}--fold0"
BATCH = 4

# `python -m pipeline.train` with hooks set by environment variables: PAUSE_STEP=k holds the
# run after its k-th optimizer step, PAUSE_EVAL=k before its k-th validation pass (the one
# after the last epoch writes the out-of-fold predictions), PAUSE_OPEN=1 before the session
# opens (startup). At the hold it writes its pid to MARKER and waits for MARKER.go (the
# test's "signal sent").
DRIVER = r"""
import os, sys, time
from pathlib import Path
from pipeline import train as T
from pipeline.lib import sgd

marker = Path(os.environ.get("MARKER", "marker"))

def hold():
    marker.write_text(str(os.getpid()))
    deadline = time.time() + 120
    while not marker.with_suffix(".go").exists() and time.time() < deadline:
        time.sleep(0.01)

def counting(fn, variable):
    at, calls = int(os.environ.get(variable, "0")), []
    def wrapped(*args, **kwargs):
        calls.append(1)
        if len(calls) == at and variable != "PAUSE_STEP":
            hold()
        out = fn(*args, **kwargs)
        if len(calls) == at and variable == "PAUSE_STEP":
            hold()
        return out
    return wrapped

sgd.step = counting(sgd.step, "PAUSE_STEP")
T.evaluate = counting(T.evaluate, "PAUSE_EVAL")
T.open_session = counting(T.open_session, "PAUSE_OPEN")
sys.argv[0] = "pipeline.train"
T.main(sys.argv[1:])
"""


@pytest.fixture(scope="module")
def records(tmp_path_factory) -> Path:
    base = tmp_path_factory.mktemp("safety")
    generate(base / "ndsb", classes=3, per_class=30, test=12, seed=5, max_size=120)
    from pipeline.ingest import Settings, ingest

    ingest(base / "ndsb", base / "records", Settings(size=32), folds=2, workers=1)
    return base / "records"


@pytest.fixture(scope="module")
def per_epoch(records) -> int:
    from pipeline.lib.records import fold_indices, load_meta

    train_idx, _ = fold_indices(load_meta(records), 0)
    assert len(train_idx) // BATCH >= 5
    return len(train_idx) // BATCH  # drop_last


def write_params(where: Path, workers: int, **over) -> Path:
    where.mkdir(parents=True, exist_ok=True)
    cfg = faults_config(Path("."), epochs=3, batch_size=BATCH, workers=workers, **over)
    # Folders relative to the run's cwd; the records come with the command (--set).
    (where / "params.yaml").write_text(yaml.safe_dump({
        "train": cfg.as_dict(), "paths": {"checkpoints": "ck", "metrics": "m", "plots": "p"}}))
    return where / "params.yaml"


def command(records: Path, where: Path, driver: bool = True) -> list[str]:
    head = [sys.executable, "-c", DRIVER] if driver else [sys.executable, "-m",
                                                          "pipeline.train"]
    return head + ["--net", NET, "--fold", "0", "--set", f"paths.records={records}",
                   "--params", str(where / "params.yaml")]


def env(**hooks: int) -> dict[str, str]:
    return dict(os.environ, PYTHONPATH=str(ROOT), **{k: str(v) for k, v in hooks.items()})


class Trainer:
    """A trainer process in its own session, its output in a file (never a full pipe)."""

    def __init__(self, records: Path, where: Path, name: str = "run", **hooks: int):
        self.where, self.log = where, where / f"{name}.log"
        self.marker = where / f"{name}.marker"
        with open(self.log, "wb") as out:
            self.proc = subprocess.Popen(command(records, where), cwd=where,
                                         env=env(MARKER=self.marker, **hooks), stdout=out,
                                         stderr=subprocess.STDOUT, start_new_session=True)
        self.pid = self.proc.pid

    def held(self, timeout: float = 300) -> None:
        """Wait until the run is at its hold."""
        deadline = time.time() + timeout
        while not self.marker.exists():
            assert self.proc.poll() is None, self.text()
            assert time.time() < deadline, self.text()
            time.sleep(0.02)

    def go(self) -> None:
        self.marker.with_suffix(".go").touch()

    def wait(self, timeout: float = 60) -> int:
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:  # the hang this file is about: end it, then fail
            os.killpg(self.pid, signal.SIGKILL)
            self.proc.wait()
            pytest.fail(f"still running {timeout} s after the stop:\n{self.text()}")

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    def wait_for_output(self, needle: str, timeout: float = 60) -> None:
        deadline = time.time() + timeout
        while needle not in self.text():
            assert self.proc.poll() is None and time.time() < deadline, self.text()
            time.sleep(0.01)


def children(pid: int) -> list[int]:
    """Live child processes of ``pid`` (the loader workers of a trainer)."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid and fields[0] != "Z":
            found.append(int(stat.parent.name))
    return found


def group_gone(pgid: int, timeout: float = 30) -> bool:
    """Whether every process of the group has exited (within ``timeout``)."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return True
        time.sleep(0.05)
    os.killpg(pgid, signal.SIGKILL)
    return False


def last_line(text: str) -> str:
    return [line for line in text.splitlines() if line.strip()][-1]


@pytest.fixture(scope="module")
def reference(records, tmp_path_factory) -> dict[str, np.ndarray]:
    """The parameters of the same run, never interrupted."""
    where = tmp_path_factory.mktemp("reference")
    write_params(where, workers=1)
    done = subprocess.run(command(records, where, driver=False), cwd=where, env=env(),
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    return params_of(where / "ck" / RUN)


def rerun(records: Path, where: Path) -> subprocess.CompletedProcess:
    done = subprocess.run(command(records, where, driver=False), cwd=where, env=env(),
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    assert not (where / "ck" / f".{RUN}.lock").exists()
    return done


# ------------------------------------------------------------- item 1: group signals

# Both signals and both worker counts, in two runs (each run starts three processes).
@pytest.mark.parametrize("sig,workers", [(signal.SIGINT, 1), (signal.SIGTERM, 2)],
                         ids=["SIGINT-1", "SIGTERM-2"])
def test_a_signal_to_the_whole_group_stops_training_and_the_rerun_resumes(
        records, per_epoch, reference, tmp_path, workers, sig):
    write_params(tmp_path, workers)
    trainer = Trainer(records, tmp_path, PAUSE_STEP=per_epoch + 2)  # epoch 2, batch 2
    trainer.held()
    assert len(children(trainer.pid)) == workers  # the loader workers get the signal too
    os.killpg(trainer.pid, sig)
    trainer.go()
    assert trainer.wait() == 128 + sig, trainer.text()
    text = trainer.text()
    assert "Traceback" not in text
    assert last_line(text).startswith(f"train stopped: {RUN} saved epoch 2 after batch 2 of "
                                      f"{per_epoch}")
    assert group_gone(trainer.pid)  # no worker left behind
    run_dir = tmp_path / "ck" / RUN
    assert (run_dir / "partial.json").exists()
    assert not (tmp_path / "ck" / f".{RUN}.lock").exists()
    done = rerun(records, tmp_path)
    assert "resumed in epoch 2 after batch 2" in done.stdout
    assert_same_params(reference, params_of(run_dir))


def test_sigterm_to_the_group_during_validation_saves_the_trained_epoch(
        records, per_epoch, reference, tmp_path):
    write_params(tmp_path, workers=2)
    trainer = Trainer(records, tmp_path, PAUSE_EVAL=2)  # before epoch 2's validation
    trainer.held()
    os.killpg(trainer.pid, signal.SIGTERM)
    trainer.go()
    assert trainer.wait() == 128 + signal.SIGTERM, trainer.text()
    assert f"saved epoch 2 after batch {per_epoch} of {per_epoch}" in last_line(trainer.text())
    assert group_gone(trainer.pid)
    done = rerun(records, tmp_path)
    assert f"resumed in epoch 2 after batch {per_epoch}" in done.stdout
    assert_same_params(reference, params_of(tmp_path / "ck" / RUN))


@pytest.mark.parametrize("where", ["starting", "publishing"])
def test_a_signal_while_starting_or_publishing_stops_in_one_line(records, reference, tmp_path,
                                                                 where):
    write_params(tmp_path, workers=1)
    hook = {"PAUSE_OPEN": 1} if where == "starting" else {"PAUSE_EVAL": 4}  # after 3 epochs
    trainer = Trainer(records, tmp_path, **hook)
    trainer.held()
    os.killpg(trainer.pid, signal.SIGINT)
    trainer.go()
    assert trainer.wait() == 128 + signal.SIGINT, trainer.text()
    text = trainer.text()
    assert "Traceback" not in text and group_gone(trainer.pid)
    if where == "starting":
        assert last_line(text) == (f"train stopped: {RUN} stopped while starting, before its "
                                   "first batch (nothing new to save); rerun to continue")
        assert not (tmp_path / "ck" / RUN).exists()
    else:
        assert last_line(text) == (f"train stopped: {RUN}: all 3 epochs are saved in ck/{RUN}; "
                                   "stopped while writing the out-of-fold predictions; rerun "
                                   "to finish")
        assert not (tmp_path / "m").exists()
    done = rerun(records, tmp_path)
    assert ("already trained for 3 epochs" in done.stdout) == (where == "publishing")
    assert (tmp_path / "m" / f"train--{RUN}.json").exists()
    assert_same_params(reference, params_of(tmp_path / "ck" / RUN))


def test_ctrl_c_twice_to_the_group_stops_at_once_and_leaves_no_worker(
        records, per_epoch, reference, tmp_path):
    write_params(tmp_path, workers=2)
    trainer = Trainer(records, tmp_path, PAUSE_STEP=per_epoch + 2)
    trainer.held()
    os.killpg(trainer.pid, signal.SIGINT)
    trainer.wait_for_output("SIGINT received")  # two signals in a row could merge into one
    os.killpg(trainer.pid, signal.SIGINT)  # impatient: stop now, at the hold
    assert trainer.wait() == -signal.SIGINT, trainer.text()  # the default action
    assert group_gone(trainer.pid)  # the orphaned workers see their socket close and exit
    assert not (tmp_path / "ck" / RUN / "partial.json").exists()
    done = rerun(records, tmp_path)  # the lock of the killed run is taken over
    assert "resuming after epoch 1" in done.stdout
    assert_same_params(reference, params_of(tmp_path / "ck" / RUN))


def test_a_killed_loader_worker_ends_the_run_in_one_line(records, per_epoch, tmp_path):
    write_params(tmp_path, workers=2)
    trainer = Trainer(records, tmp_path, PAUSE_STEP=per_epoch + 2)
    trainer.held()
    victim = children(trainer.pid)[0]
    os.kill(victim, signal.SIGKILL)  # what the OOM killer does
    trainer.go()
    assert trainer.wait() == 1, trainer.text()
    text = trainer.text()
    assert "Traceback" not in text
    assert last_line(text).startswith(f"train failed: data loader worker (pid {victim}) was "
                                      "killed by SIGKILL; ")
    assert "lower train.workers" in last_line(text)
    assert group_gone(trainer.pid)
    assert "resuming after epoch 1" in rerun(records, tmp_path).stdout


def test_a_worker_ignores_a_signal_to_the_group_and_answers_in_order(records):
    """The loader alone: a group SIGINT and SIGTERM mid-epoch change nothing it yields."""
    from pipeline.lib.data import BatchLoader
    from pipeline.lib.records import RecordReader

    reader = RecordReader(records, "train")
    plain = [x for x, _ in BatchLoader(reader, np.arange(40), 4, workers=0).epoch(0)]
    with BatchLoader(reader, np.arange(40), 4, workers=2, prefetch=3) as loader:
        got = []
        for b, (x, _) in enumerate(loader.epoch(0)):
            if b == 2:
                pids = list(loader._pool.pids)
                for pid in pids:
                    os.kill(pid, signal.SIGINT)
                    os.kill(pid, signal.SIGTERM)
            got.append(x)
        assert loader._pool.pids == pids and all(Path(f"/proc/{p}").exists() for p in pids)
        next(iter(loader.epoch(1)))  # left after one batch: its workers still owe batches
        assert loader._pool is None and not any(Path(f"/proc/{p}").exists() for p in pids)
        again = [x for x, _ in loader.epoch(2)]  # new workers
    assert loader._pool is None
    for batches in (got, again):
        assert len(batches) == len(plain)
        assert all(np.array_equal(a, b) for a, b in zip(batches, plain))


def test_stage_errors_turns_a_loader_death_into_one_line():
    from pipeline.lib.data import LoaderError

    with pytest.raises(SystemExit, match=r"^train failed: data loader worker \(pid 7\)"):
        with stage_errors("train"):
            raise LoaderError("data loader worker (pid 7) was killed by SIGKILL; rerun")


PREDICT_TTA = dict(n=60, chunk_images=4, batch_size=2, precision="float32", int8=False)


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> tuple[Path, Path]:
    return train_lenet(tmp_path_factory.mktemp("predict"))


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_a_signal_to_the_whole_group_stops_predict_and_the_rerun_completes(trained, tmp_path,
                                                                          sig):
    records, ck = trained
    tta = dict(PREDICT_TTA, work=str(tmp_path / "work"))
    paths = {"records": str(records), "checkpoints": str(ck),
             "predictions": str(tmp_path / "pred"), "metrics": str(tmp_path / "m")}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump({"tta": tta, "paths": paths}))
    cmd = [sys.executable, "-m", "pipeline.predict", "--net", NET, "--fold", "0",
           "--params", str(tmp_path / "params.yaml")]
    with open(tmp_path / "log", "wb") as out:
        proc = subprocess.Popen(cmd, cwd=tmp_path, env=env(), stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True)
    work = tmp_path / "work" / RUN
    deadline = time.time() + 300
    while not list(work.glob("*/valid-*.npz")):
        assert proc.poll() is None and time.time() < deadline, (tmp_path / "log").read_text()
        time.sleep(0.02)
    os.killpg(proc.pid, sig)
    try:
        rc = proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        pytest.fail("predict still running 60 s after a group signal")
    text = (tmp_path / "log").read_text(errors="replace")
    assert rc == 128 + sig, text
    assert f"predict stopped: {RUN}: {signal.Signals(sig).name}:" in text
    assert "Traceback" not in text and group_gone(proc.pid)
    done = subprocess.run(cmd, cwd=tmp_path, env=env(), capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr
    assert "resuming:" in done.stdout


# ------------------------------------------------------------------ item 2: the run lock

def test_two_trainers_of_one_run_the_second_refuses_naming_the_first(
        records, per_epoch, reference, tmp_path):
    write_params(tmp_path, workers=1)
    first = Trainer(records, tmp_path, PAUSE_STEP=per_epoch + 2)
    first.held()
    metrics = tmp_path / "m" / f"train--{RUN}.json"
    before = {p: p.stat().st_mtime_ns for p in (tmp_path / "ck").rglob("*")}
    second = subprocess.run(command(records, tmp_path, driver=False), cwd=tmp_path, env=env(),
                            capture_output=True, text=True, timeout=300)
    assert second.returncode == 1
    assert "Traceback" not in second.stderr
    assert last_line(second.stderr) == (
        f"train failed: training of {RUN} (into ck/{RUN}) is already running (pid {first.pid} "
        f"on {socket.gethostname()}); wait for it or stop it before starting it again "
        f"(lock ck/.{RUN}.lock)")
    assert not metrics.exists()
    assert {p: p.stat().st_mtime_ns for p in (tmp_path / "ck").rglob("*")} == before
    first.go()
    assert first.wait(timeout=300) == 0, first.text()
    assert not (tmp_path / "ck" / f".{RUN}.lock").exists()  # not left among the outputs
    assert json.loads(metrics.read_text())["epochs"] == 3
    assert_same_params(reference, params_of(tmp_path / "ck" / RUN))


def test_the_lock_of_a_killed_trainer_is_taken_over(records, per_epoch, reference, tmp_path):
    write_params(tmp_path, workers=1)
    first = Trainer(records, tmp_path, PAUSE_STEP=per_epoch + 2)
    first.held()
    os.killpg(first.pid, signal.SIGKILL)
    first.proc.wait()
    # The loader worker shares the lock's open file until it is gone too.
    assert group_gone(first.pid)
    lock = tmp_path / "ck" / f".{RUN}.lock"
    assert lock.exists() and not fsutil.lock_held(lock)
    assert "resuming after epoch 1" in rerun(records, tmp_path).stdout
    assert_same_params(reference, params_of(tmp_path / "ck" / RUN))


def test_hold_lock_refuses_a_second_holder_and_cleans_up_only_when_asked(tmp_path):
    path = tmp_path / "sub" / "x.lock"
    with fsutil.hold_lock(path, "the thing", remove=True):
        assert fsutil.lock_held(path)
        assert path.read_text() == f"pid {os.getpid()} on {socket.gethostname()}"
        with pytest.raises(fsutil.LockHeld, match=rf"^the thing is already running \(pid "
                                                  rf"{os.getpid()} on .*\(lock {path}\)$"):
            with fsutil.hold_lock(path, "the thing"):
                pass
    assert not path.exists()
    with fsutil.hold_lock(path, "the thing"):
        pass
    assert path.exists() and not fsutil.lock_held(path)


def test_the_lock_sits_beside_the_run_folder_not_in_its_dvc_output(records, tmp_path):
    run = T.Run(NET, 0, faults_config(tmp_path), paths_under(tmp_path, records), seed=3)
    assert run.lock_path.parent == run.ckpt_dir.parent
    assert run.lock_path.name == f".{run.ckpt_dir.name}.lock"


# ----------------------------------------------------------- item 3: diverged weights

def _main(records: Path, where: Path, fold: int = 0, **over) -> str:
    """``pipeline.train``'s main in this process; its one-line failure message."""
    cfg = faults_config(where, workers=0, batch_size=BATCH, **over)
    (where / "params.yaml").write_text(yaml.safe_dump({
        "train": cfg.as_dict(), "paths": paths_under(where, records).as_dict()}))
    with pytest.raises(SystemExit) as err:
        T.main(["--net", NET, "--fold", str(fold), "--params", str(where / "params.yaml")])
    message = str(err.value.code)
    assert "\n" not in message
    return message


def test_nan_validation_outputs_name_the_epoch_the_fix_and_the_last_good_checkpoint(
        records, tmp_path, monkeypatch):
    evaluate, calls = T.evaluate, []

    def nan_in_epoch_2(net, loader, ctx, stop=lambda: None):
        probs, labels = evaluate(net, loader, ctx, stop)
        calls.append(1)
        return (probs * np.nan if len(calls) == 2 else probs), labels

    monkeypatch.setattr(T, "evaluate", nan_in_epoch_2)
    message = _main(records, tmp_path, epochs=3)
    run_dir = tmp_path / "ck" / RUN
    assert message == (f"train failed: {RUN}: validation outputs became NaN or infinite in "
                       "epoch 2 (lr 0.001): lower train.lr or check the data; the last good "
                       f"checkpoint (epoch 1) is kept in {run_dir}")
    assert (run_dir / "epoch-0001.json").exists() and not (run_dir / "epoch-0002.json").exists()
    assert not (tmp_path / "m").exists()


def test_nan_weights_without_validation_before_any_checkpoint_say_so(records, tmp_path,
                                                                     monkeypatch):
    from pipeline.lib import sgd
    from pipeline.lib.records import fold_indices, load_meta

    step, calls = sgd.step, []
    last = len(fold_indices(load_meta(records), -1)[0]) // BATCH

    def poisoning_step(net, *args, **kwargs):  # the last update of epoch 1 turns a weight NaN
        loss = step(net, *args, **kwargs)
        calls.append(1)
        if len(calls) == last:
            weight = next(iter(net.collect_params().values()))
            weight.set_data(weight.data() * np.nan)
        return loss

    monkeypatch.setattr(sgd, "step", poisoning_step)
    message = _main(records, tmp_path, fold=-1, epochs=2)  # fold -1: no validation images
    assert message.startswith(f"train failed: {NET}--fold-1: weights became NaN or infinite "
                              "in epoch 1 (lr 0.01): lower train.lr")
    assert message.endswith("; no checkpoint yet")
    assert not (tmp_path / "ck" / f"{NET}--fold-1").exists()


def test_a_nan_loss_names_a_checkpoint_that_exists(records, tmp_path, monkeypatch):
    from pipeline.lib import sgd

    step, calls = sgd.step, []

    def nan_later(*args, **kwargs):
        loss = step(*args, **kwargs)
        calls.append(1)
        return float("nan") if len(calls) == 15 else loss  # in epoch 2

    monkeypatch.setattr(sgd, "step", nan_later)
    message = _main(records, tmp_path, epochs=3)
    assert "loss became nan in epoch 2 (lr 0.001)" in message
    assert message.endswith(f"the last good checkpoint (epoch 1) is kept in {tmp_path}/ck/{RUN}")
    assert (tmp_path / "ck" / RUN / "epoch-0001.json").exists()


def test_a_huge_learning_rate_ends_in_one_line_not_a_traceback(records, tmp_path):
    """The issue's case, for real: lr 1000 at batch 4. Which check fires first depends on the
    numbers; each names the epoch and the fix, and a checkpoint only if it exists."""
    message = _main(records, tmp_path, epochs=3, lr=1000.0)
    assert message.startswith(f"train failed: {RUN}: ") and "lower train.lr" in message
    if "kept in " in message:
        assert Path(message.rsplit("kept in ", 1)[1]).is_dir()
    else:
        assert message.endswith("no checkpoint yet")

"""Multi-process training: the launcher's environment and teardown, and a real dist_sync run.

The fast tests drive :func:`pipeline.tools.launch.launch` with stand-in server and worker commands
(Python one-liners that record their pids), so they check the process handling without
MXNet. The slow tests start a real scheduler, one server and two workers on loopback and
train LeNet for three epochs: both workers must end with identical weights and the training
loss must fall; and when one worker fails, the job must end with its exit code, not hang.
"""
from __future__ import annotations

import argparse
import io
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

from pipeline.tools import launch as L
from tests.conftest import ROOT

PY = sys.executable


def _alive(pid: int) -> bool:
    """True if ``pid`` runs; a zombie (dead, not yet reaped by init) counts as gone."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state not in ("Z", "X")


def _survivors(pids: list[int], wait: float = 5.0) -> list[int]:
    """Processes of ``pids`` still running after up to ``wait`` s (SIGKILL is asynchronous)."""
    deadline = time.monotonic() + wait
    while [p for p in pids if _alive(p)] and time.monotonic() < deadline:
        time.sleep(0.05)
    return [p for p in pids if _alive(p)]


def _pids(folder: Path) -> list[int]:
    return [int(p.name) for p in folder.iterdir()]


def _script(folder: Path, body: str) -> str:
    """Python code that records its pid in ``folder``, starts a grandchild that records its
    pid and sleeps (teardown must reach whole process groups), then runs ``body``."""
    mark = ("import os, subprocess, sys, time\n"
            f"PIDS = {str(folder)!r}\n"
            "open(os.path.join(PIDS, str(os.getpid())), 'w').close()\n")
    child = mark + "print('ready', flush=True)\ntime.sleep(120)\n"
    return (mark + f"c = subprocess.Popen([sys.executable, '-c', {child!r}], "
            "stdout=subprocess.PIPE)\nc.stdout.readline()\n" + body + "\n")


# ---------------------------------------------------------------- environment

def test_role_env_sets_ps_lite_variables_only_where_they_belong():
    base = {"PATH": "/bin", "DMLC_RANK": "3", "PYTHONUNBUFFERED": "0"}
    env = L.role_env("worker", "10.0.0.1", 9000, workers=4, servers=2, worker_id=1,
                     node_host="127.0.0.1", base=base)
    assert env == {"PATH": "/bin", "PYTHONUNBUFFERED": "0", "DMLC_ROLE": "worker",
                   "DMLC_PS_ROOT_URI": "10.0.0.1", "DMLC_PS_ROOT_PORT": "9000",
                   "DMLC_NUM_WORKER": "4", "DMLC_NUM_SERVER": "2", "DMLC_WORKER_ID": "1",
                   "DMLC_NODE_HOST": "127.0.0.1"}
    server = L.role_env("server", "h", 1, 1, 1, worker_id=5, base={})
    assert "DMLC_WORKER_ID" not in server and "DMLC_NODE_HOST" not in server
    assert server["PYTHONUNBUFFERED"] == "1"
    assert base == {"PATH": "/bin", "DMLC_RANK": "3", "PYTHONUNBUFFERED": "0"}  # not mutated


@pytest.mark.parametrize("role, workers, servers", [("master", 1, 1), ("worker", 0, 1),
                                                    ("server", 1, 0)])
def test_role_env_rejects_bad_requests(role, workers, servers):
    with pytest.raises(L.LaunchError):
        L.role_env(role, "h", 1, workers, servers, base={})


def test_thread_env_splits_cpus_but_keeps_user_settings():
    assert L.thread_env({}, 0) == {"OMP_NUM_THREADS": "1", "MXNET_CPU_WORKER_NTHREADS": "1"}
    assert L.thread_env({"OMP_NUM_THREADS": "7"}, 2) == {
        "OMP_NUM_THREADS": "7", "MXNET_CPU_WORKER_NTHREADS": "2"}


def test_cluster_rank_and_role_for_rank():
    assert L.cluster_rank({}) is None
    assert L.cluster_rank({"OMPI_COMM_WORLD_RANK": "4"}) == 4
    assert L.cluster_rank({"SLURM_PROCID": "2", "OMPI_COMM_WORLD_RANK": "4"}) == 2
    roles = [L.role_for_rank(r, servers=2) for r in range(6)]
    assert roles == [("scheduler", None), ("server", None), ("server", None),
                     ("worker", 0), ("worker", 1), ("worker", 2)]


def _flags(**kw) -> argparse.Namespace:
    return argparse.Namespace(**{**dict(host=None, port=None, workers=None, servers=None), **kw})


def test_cluster_env_flags_override_environment_and_rank_gives_worker_id():
    env = {"DMLC_PS_ROOT_URI": "10.0.0.1", "DMLC_PS_ROOT_PORT": "9091",
           "DMLC_NUM_WORKER": "8", "DMLC_NUM_SERVER": "2", "SLURM_PROCID": "3"}
    role, out = L.cluster_env("worker", _flags(workers=4), env)
    assert role == "worker" and out["DMLC_NUM_WORKER"] == "4"
    assert out["DMLC_WORKER_ID"] == "3" and out["DMLC_PS_ROOT_URI"] == "10.0.0.1"
    role, out = L.cluster_env("auto", _flags(), env)
    assert (role, out["DMLC_ROLE"], out["DMLC_WORKER_ID"]) == ("worker", "worker", "0")
    role, out = L.cluster_env("auto", _flags(), {**env, "SLURM_PROCID": "0"})
    assert role == "scheduler" and "DMLC_WORKER_ID" not in out


def test_cluster_env_names_what_is_missing():
    with pytest.raises(L.LaunchError, match="DMLC_PS_ROOT_URI.*DMLC_NUM_SERVER"):
        L.cluster_env("server", _flags(port=1, workers=2), {})
    with pytest.raises(L.LaunchError, match="task rank"):
        L.cluster_env("auto", _flags(host="h", port=1, workers=1, servers=1), {})


def test_scheduler_ip_resolves_names_but_refuses_a_loopback_alias(monkeypatch):
    names = {"node1": "10.1.2.3", "myself": "127.0.1.1", "localhost": "127.0.0.1"}

    def fake_resolve(name):
        if name not in names:
            raise OSError("unknown host")
        return names[name]

    monkeypatch.setattr(L.socket, "gethostbyname", fake_resolve)
    assert L.scheduler_ip("192.168.0.7") == "192.168.0.7"
    assert L.scheduler_ip("node1") == "10.1.2.3"
    assert L.scheduler_ip("localhost") == "127.0.0.1"
    with pytest.raises(L.LaunchError, match="loopback"):
        L.scheduler_ip("myself")
    with pytest.raises(L.LaunchError, match="cannot resolve"):
        L.scheduler_ip("nowhere")


def test_free_port_is_bindable_on_loopback():
    port = L.free_port()
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", port))


# ---------------------------------------------------------------- process handling

def _run(tmp_path: Path, worker_body: str, server_body: str = "time.sleep(120)",
         workers: int = 2, servers: int = 1) -> tuple[int, str, list[int], float]:
    pids = tmp_path / "pids"
    pids.mkdir()
    out = io.BytesIO()
    t0 = time.monotonic()
    code = L.launch([PY, "-c", _script(pids, worker_body)], workers, servers,
                    server_cmd=[PY, "-c", _script(pids, server_body)], sink=out,
                    server_grace=0.5)
    return code, out.getvalue().decode(), _pids(pids), time.monotonic() - t0


def test_success_streams_prefixed_output_and_stops_lingering_servers(tmp_path):
    code, out, pids, _ = _run(tmp_path, "print('hello from', os.environ['DMLC_WORKER_ID'])")
    assert code == 0
    assert "[worker 0] hello from 0" in out and "[worker 1] hello from 1" in out
    assert len(pids) == 8  # scheduler, server, 2 workers, and a grandchild of each
    assert not _survivors(pids)


def _all_up(count: int) -> str:
    """Body code that waits (up to 60 s) until ``count`` processes recorded their pid: a
    failure before the others have started would make the pid count racy on a loaded box."""
    return ("deadline = time.time() + 60\n"
            f"while len(os.listdir(PIDS)) < {count} and time.time() < deadline:\n"
            "    time.sleep(0.05)\n")


def test_failing_worker_stops_everything_and_its_code_is_returned(tmp_path):
    body = (_all_up(8) + "sys.exit(3) if os.environ['DMLC_WORKER_ID'] == '1' "
            "else time.sleep(120)")
    code, out, pids, seconds = _run(tmp_path, body)
    assert code == 3 and seconds < 30
    assert "worker 1 exited with code 3" in out
    assert len(pids) == 8 and not _survivors(pids)


def test_failing_server_stops_the_waiting_workers(tmp_path):
    code, out, pids, seconds = _run(tmp_path, "time.sleep(120)", server_body="sys.exit(5)")
    assert code == 5 and seconds < 30 and "exited with code 5" in out
    assert not _survivors(pids)


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_cli_interrupt_tears_everything_down(tmp_path, sig):
    pids = tmp_path / "pids"
    pids.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith("DMLC_")}
    proc = subprocess.Popen([PY, "-m", "pipeline.tools.launch", "--workers", "2", "--servers", "1",
                             "--", PY, "-c", _script(pids, "time.sleep(120)")],
                            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    # Signal only once every process is up (2 workers + grandchildren): on a loaded machine
    # the scheduler and server (MXNet imports) can take longer than the teardown's timeout.
    deadline = time.monotonic() + 180
    while len(_pids(pids)) < 4 and time.monotonic() < deadline:
        assert proc.poll() is None, proc.stdout.read().decode()
        time.sleep(0.1)
    workers = _pids(pids)
    assert len(workers) == 4, "the launcher did not start every process within 180 s"
    proc.send_signal(sig)
    out, _ = proc.communicate(timeout=30)
    assert proc.returncode == 130, out.decode()
    assert b"interrupted" in out
    assert len(workers) == 4 and not _survivors(workers)


def test_cli_requires_a_worker_command():
    result = subprocess.run([PY, "-m", "pipeline.tools.launch", "--workers", "1"], cwd=ROOT,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode != 0 and "after --" in result.stderr


def test_train_shards_are_equal_and_cover_every_image():
    """dist_sync deadlocks if one worker takes a step more than another."""
    from pipeline.train import shard

    for n in range(8):
        for workers in (1, 2, 3):
            shards = [shard(np.arange(n) + 100, r, workers) for r in range(workers)]
            assert len({len(s) for s in shards}) == 1
            assert set(np.concatenate(shards)) == set(range(100, 100 + n))
            assert sum(map(len, shards)) - n < workers


# ---------------------------------------------------------------- a real dist_sync run

# The workers run pipeline.train.main unchanged; this wrapper only saves each rank's final
# parameters (the network passed to the last evaluate() call) for the comparison below, and
# makes worker rank FAIL_RANK (if set) fail after its first epoch.
WORKER = """
import os
import sys

import pipeline.train as train

_make_kvstore, _evaluate, _rank = train.make_kvstore, train.evaluate, []


def make_kvstore(kind, ctxs):
    kv = _make_kvstore(kind, ctxs)
    _rank.append(kv.rank)
    return kv


def evaluate(net, loader, ctx, *stop):
    if _rank[0] == int(os.environ.get("FAIL_RANK", -1)):
        raise RuntimeError(f"injected failure on rank {_rank[0]}")
    net.save_parameters(f"final.rank{_rank[0]}.params")
    return _evaluate(net, loader, ctx, *stop)


train.make_kvstore, train.evaluate = make_kvstore, evaluate
train.main(sys.argv[1:])
"""


def _launch_cli(args: list[str], cwd: Path, env: dict[str, str], timeout: float
                ) -> tuple[int, str]:
    """(exit code, output) of ``python -m pipeline.tools.launch ARGS``; on timeout the launcher is
    sent SIGTERM (it tears its processes down) and the test fails showing the output."""
    proc = subprocess.Popen([PY, "-m", "pipeline.tools.launch", *args], cwd=cwd, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.terminate()
        out, _ = proc.communicate(timeout=30)
        pytest.fail(f"launch did not finish within {timeout} s:\n{out}")
    return proc.returncode, out


def _dist_job(tmp_path: Path, **env_extra: str) -> tuple[int, str, float]:
    """Train LeNet 3 epochs with dist_sync: 1 server, 2 workers on loopback, in ``tmp_path``.

    Tiny synthetic data (3 classes x 24 images at 32 px, fold 0 of 2 -> 36 training images,
    18 per worker); leaky ReLU without batch norm, so the run is deterministic.
    """
    from pipeline.ingest import Settings, ingest
    from pipeline.tools.synth import generate

    generate(tmp_path / "ndsb", classes=3, per_class=24, test=3, seed=0, max_size=64)
    ingest(tmp_path / "ndsb", tmp_path / "records", Settings(size=32), folds=2, workers=1)
    train = {"act": "leaky", "bn": False, "epochs": 3, "batch_size": 6, "lr": 0.01,
             "lr_steps": [], "kvstore": "dist_sync", "workers": 0}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump({"train": train,
                                                          "paths": {"records": "records"}}))
    (tmp_path / "worker.py").write_text(WORKER)
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("DMLC_") and k not in L.THREAD_VARS}  # let the launcher split
    env.update(PYTHONPATH=str(ROOT), **env_extra)
    t0 = time.monotonic()
    code, out = _launch_cli(
        ["--workers", "2", "--servers", "1", "--", PY, "worker.py", "--net", "lenet",
         "--fold", "0", "--params", "params.yaml"],
        cwd=tmp_path, env=env, timeout=150)
    return code, out, time.monotonic() - t0


@pytest.mark.slow
def test_dist_sync_two_workers_end_with_identical_weights(tmp_path):
    import mxnet as mx

    code, out, seconds = _dist_job(tmp_path)
    assert code == 0, out
    print(f"dist_sync run: {seconds:.1f} s")

    weights = [mx.nd.load(str(tmp_path / f"final.rank{r}.params")) for r in (0, 1)]
    assert weights[0].keys() == weights[1].keys() and weights[0]
    for name in weights[0]:
        np.testing.assert_array_equal(weights[0][name].asnumpy(), weights[1][name].asnumpy(),
                                      err_msg=name)
    final = mx.nd.load(str(tmp_path / "checkpoints" / "lenet--fold0" / "model.params"))
    for name in final:
        np.testing.assert_array_equal(final[name].asnumpy(), weights[0][name].asnumpy())

    history = json.loads((tmp_path / "checkpoints" / "lenet--fold0" / "model.json")
                         .read_text())["history"]
    losses = [h["train_loss"] for h in history]
    assert len(losses) == 3 and losses[-1] < losses[0], losses
    assert history[-1]["valid_logloss"] < history[0]["valid_logloss"], history
    metrics = json.loads((tmp_path / "metrics" / "train--lenet--fold0.json").read_text())
    assert metrics["train_images"] == 18  # each worker its half of fold 0's 36 training images


@pytest.mark.slow
def test_dist_sync_worker_failure_ends_the_job_instead_of_hanging(tmp_path):
    """The healthy worker would wait forever for the failed one's gradients."""
    code, out, seconds = _dist_job(tmp_path, FAIL_RANK="1")
    assert code == 1, out
    assert "injected failure on rank 1" in out and "stopping the other processes" in out
    print(f"failing dist_sync run: {seconds:.1f} s")

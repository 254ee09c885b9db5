"""Start MXNet parameter-server training: a scheduler, S servers and N workers.

``train.kvstore: dist_sync`` makes every worker push its gradients to MXNet's parameter
servers (ps-lite) and pull back their sum, so N workers step in lockstep on identical weights,
each on its own shard of the records. ps-lite needs three kinds of process, told apart only by
environment variables (``DMLC_ROLE``, ``DMLC_PS_ROOT_URI``/``_PORT`` = the scheduler's address,
``DMLC_NUM_SERVER``, ``DMLC_NUM_WORKER``). A server or scheduler is nothing but ``import
mxnet`` with ``DMLC_ROLE=server|scheduler``: the import runs the server loop and exits when the
workers are done. MXNet's own ``tools/launch.py`` (dmlc tracker) breaks on Python >= 3.9
(``Thread.isAlive``), hence this small replacement.

Local mode, everything on this machine (loopback by default)::

    python -m pipeline.tools.launch --workers 2 --servers 1 -- \
        python -m pipeline.train --net X --fold 0

starts the scheduler, the servers and the workers as subprocesses, prefixes their output
(``[worker 1] ...``), splits the CPUs between the workers (``OMP_NUM_THREADS``, unless set),
waits for the workers and exits with the first non-zero exit code. The scheduler and the servers
are always torn down, with every process group they started: after success, when a worker or
server fails (the others would wait for it forever), on Ctrl-C and on SIGTERM.

Cluster mode, one process per call (SLURM ``srun``, ssh, ``mpirun``)::

    python -m pipeline.tools.launch --role worker|server|scheduler|auto [--host H --port P
        --workers N --servers S] [-- CMD ...]

sets ``DMLC_*`` (flags override the environment) and replaces itself with the role's process.
``auto`` picks the role from the task rank (``SLURM_PROCID``, ``OMPI_COMM_WORLD_RANK``,
``PMI_RANK``): rank 0 scheduler, ranks 1..S servers, the rest workers, so one ``srun``/
``mpirun`` line starts a whole job. The worker index (``DMLC_WORKER_ID``) comes from the same
rank variables; it is informational: ps-lite assigns ``kv.rank`` itself.
"""
from __future__ import annotations

import argparse
import ctypes
import functools
import ipaddress
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import IO, Mapping, Sequence

from pipeline.lib.errors import PipelineError
from pipeline.lib.runtime import available_cpus

ROLES = ("scheduler", "server", "worker")
SERVER_CMD: tuple[str, ...] = (sys.executable, "-c", "import mxnet")
RANK_VARS = ("SLURM_PROCID", "OMPI_COMM_WORLD_RANK", "PMI_RANK")
REQUIRED = ("DMLC_PS_ROOT_URI", "DMLC_PS_ROOT_PORT", "DMLC_NUM_SERVER", "DMLC_NUM_WORKER")
THREAD_VARS = ("OMP_NUM_THREADS", "MXNET_CPU_WORKER_NTHREADS")
POLL_S = 0.1
SERVER_GRACE_S = 10.0   # after the workers succeed, servers normally exit on their own
KILL_GRACE_S = 5.0      # SIGTERM -> SIGKILL


class LaunchError(PipelineError, RuntimeError):
    """The launch request is inconsistent (missing DMLC_* settings, bad counts, no command)."""


# ---------------------------------------------------------------- pure helpers

def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that is free on ``host`` right now (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def role_env(role: str, host: str, port: int, workers: int, servers: int,
             worker_id: int | None = None, node_host: str | None = None,
             base: Mapping[str, str] | None = None) -> dict[str, str]:
    """Environment of one ps-lite process: ``base`` (default ``os.environ``) plus ``DMLC_*``.

    ``host``/``port`` are the scheduler's address. ``node_host`` is the address this process
    binds and announces (``DMLC_NODE_HOST``); local mode passes the loopback address so nothing
    listens on a public interface. ``PYTHONUNBUFFERED`` makes prefixed output stream promptly.
    """
    if role not in ROLES:
        raise LaunchError(f"role must be one of {ROLES}, got {role!r}")
    if workers < 1 or servers < 1:
        raise LaunchError(f"need at least one worker and one server, got {workers}/{servers}")
    env = dict(os.environ if base is None else base)
    env.pop("DMLC_RANK", None)  # assigned by the scheduler; a stale value would confuse ps-lite
    env.update(DMLC_ROLE=role, DMLC_PS_ROOT_URI=host, DMLC_PS_ROOT_PORT=str(port),
               DMLC_NUM_WORKER=str(workers), DMLC_NUM_SERVER=str(servers))
    if worker_id is not None and role == "worker":
        env["DMLC_WORKER_ID"] = str(worker_id)
    if node_host is not None:
        env["DMLC_NODE_HOST"] = node_host
    env.setdefault("PYTHONUNBUFFERED", "1")
    return env


def scheduler_ip(host: str) -> str:
    """``host`` as an IPv4 address: ps-lite's scheduler cannot bind a host name ("bind failed").

    A name that resolves to a loopback address (Debian maps a machine's own name to
    127.0.1.1) would make the scheduler unreachable from other machines, so it is an error
    unless it is ``localhost`` itself.
    """
    try:
        return str(ipaddress.IPv4Address(host))
    except ValueError:
        pass
    try:
        ip = socket.gethostbyname(host)
    except OSError as exc:
        raise LaunchError(f"cannot resolve scheduler host {host!r}: {exc}") from None
    if ipaddress.IPv4Address(ip).is_loopback and host != "localhost":
        raise LaunchError(f"scheduler host {host!r} resolves to the loopback address {ip} here;"
                          " pass the scheduler's IP address instead")
    return ip


def thread_env(env: dict[str, str], share: int) -> dict[str, str]:
    """``env`` with OpenMP/engine threads capped at ``share`` unless the user set them."""
    for var in THREAD_VARS:
        env.setdefault(var, str(max(1, share)))
    return env


def cluster_rank(env: Mapping[str, str] | None = None) -> int | None:
    """Task rank from SLURM / Open MPI / MPICH-style launchers, or None outside them."""
    env = os.environ if env is None else env
    for var in RANK_VARS:
        if env.get(var, "").strip().isdigit():
            return int(env[var])
    return None


def role_for_rank(rank: int, servers: int) -> tuple[str, int | None]:
    """(role, worker index) of task ``rank``: 0 scheduler, 1..S servers, the rest workers."""
    if rank == 0:
        return "scheduler", None
    if rank <= servers:
        return "server", None
    return "worker", rank - servers - 1


def exit_code(returncode: int) -> int:
    """Shell convention: a process killed by signal N reports 128 + N."""
    return 128 - returncode if returncode < 0 else returncode


# ---------------------------------------------------------------- processes

def _die_with_parent(parent: int) -> None:
    """In the child before exec: get SIGTERM if the launcher dies (even by SIGKILL)."""
    if _PRCTL is not None:
        _PRCTL(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
        if os.getppid() != parent:  # the launcher died before prctl took effect
            os.kill(os.getpid(), signal.SIGTERM)


# Looked up before any fork: the child between fork and exec should only make the call.
_PRCTL = ctypes.CDLL(None, use_errno=True).prctl if sys.platform.startswith("linux") else None


@dataclass
class Proc:
    """A started child: its name for output prefixes, the Popen, and the thread copying output."""

    name: str
    popen: subprocess.Popen
    pump: threading.Thread = field(init=False)

    def poll(self) -> int | None:
        return self.popen.poll()


_OUT_LOCK = threading.Lock()


def _pump(prefix: bytes, source: IO[bytes], sink: IO[bytes]) -> None:
    """Copy a child's output line by line with ``prefix``; keep draining if ``sink`` breaks
    (e.g. ``| head``), so the child never blocks on a full pipe."""
    broken = False
    for line in iter(source.readline, b""):
        if broken:
            continue
        with _OUT_LOCK:
            try:
                sink.write(prefix + line if line.endswith(b"\n") else prefix + line + b"\n")
                sink.flush()
            except (OSError, ValueError):
                broken = True
    source.close()


def start(name: str, cmd: Sequence[str], env: Mapping[str, str],
          sink: IO[bytes] | None = None) -> Proc:
    """Start ``cmd`` in its own session (so its whole process group can be killed)."""
    popen = subprocess.Popen(list(cmd), env=dict(env), stdin=subprocess.DEVNULL,
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                             start_new_session=True,
                             preexec_fn=functools.partial(_die_with_parent, os.getpid()))
    proc = Proc(name, popen)
    proc.pump = threading.Thread(target=_pump, daemon=True,
                                 args=(f"[{name}] ".encode(), popen.stdout,
                                       sink or sys.stdout.buffer))
    proc.pump.start()
    return proc


def _signal_group(proc: Proc, sig: int) -> None:
    try:
        os.killpg(proc.popen.pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def stop(procs: Sequence[Proc], grace: float = KILL_GRACE_S) -> None:
    """SIGTERM every process group in ``procs``, SIGKILL what is left after ``grace`` s.

    Ctrl-C, SIGTERM and SIGHUP are held back meanwhile, so a second Ctrl-C cannot interrupt
    the teardown half way and leave processes behind.
    """
    held = {signal.SIGINT, signal.SIGTERM, signal.SIGHUP}
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, held)
    try:
        for proc in procs:
            _signal_group(proc, signal.SIGTERM)
        deadline = time.monotonic() + grace
        for proc in procs:
            try:
                proc.popen.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
        for proc in procs:  # the group may outlive its leader (forked data loaders)
            _signal_group(proc, signal.SIGKILL)
            proc.popen.wait()
            proc.pump.join(timeout=1.0)
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


def wait_workers(workers: Sequence[Proc], infra: Sequence[Proc]) -> tuple[int, str | None]:
    """Block until every worker succeeded, or anything failed: (exit code, who failed)."""
    while True:
        for proc in [*workers, *infra]:
            code = proc.poll()
            if code not in (None, 0):
                return exit_code(code), proc.name
        if all(proc.poll() == 0 for proc in workers):
            return 0, None
        time.sleep(POLL_S)


def _wait_quietly(procs: Sequence[Proc], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and any(p.poll() is None for p in procs):
        time.sleep(POLL_S)


def launch(cmd: Sequence[str], workers: int, servers: int, host: str = "127.0.0.1",
           port: int | None = None, server_cmd: Sequence[str] = SERVER_CMD,
           sink: IO[bytes] | None = None, server_grace: float = SERVER_GRACE_S) -> int:
    """Run a whole job on this machine; return the first non-zero exit code (0 on success)."""
    if not cmd:
        raise LaunchError("no worker command given (put it after --)")
    host = scheduler_ip(host)
    port = port or free_port(host)
    base = dict(os.environ)
    share = max(1, available_cpus() // workers)
    procs: list[Proc] = []
    try:
        procs.append(start("scheduler", server_cmd, thread_env(
            role_env("scheduler", host, port, workers, servers, node_host=host, base=base), 1),
            sink))
        for s in range(servers):
            procs.append(start(f"server {s}", server_cmd, thread_env(
                role_env("server", host, port, workers, servers, node_host=host, base=base), 1),
                sink))
        infra = list(procs)
        for w in range(workers):
            procs.append(start(f"worker {w}", cmd, thread_env(
                role_env("worker", host, port, workers, servers, worker_id=w, node_host=host,
                         base=base), share), sink))
        code, failed = wait_workers(procs[len(infra):], infra)
        if failed is None:
            _wait_quietly(infra, server_grace)
        else:
            _note(f"{failed} exited with code {code}; stopping the other processes", sink)
        return code
    except KeyboardInterrupt:
        _note("interrupted; stopping all processes", sink)
        return 130
    finally:
        stop(procs)


def _note(message: str, sink: IO[bytes] | None) -> None:
    with _OUT_LOCK:
        out = sink or sys.stdout.buffer
        try:
            out.write(f"[launch] {message}\n".encode())
            out.flush()
        except (OSError, ValueError):
            pass


# ---------------------------------------------------------------- cluster mode

def cluster_env(role: str, args: argparse.Namespace,
                env: Mapping[str, str] | None = None) -> tuple[str, dict[str, str]]:
    """(resolved role, environment) of one cluster process; flags override ``DMLC_*``."""
    env = dict(os.environ if env is None else env)
    overrides = {"DMLC_PS_ROOT_URI": args.host, "DMLC_PS_ROOT_PORT": args.port,
                 "DMLC_NUM_WORKER": args.workers, "DMLC_NUM_SERVER": args.servers}
    env.update({k: str(v) for k, v in overrides.items() if v is not None})
    missing = [k for k in REQUIRED if not env.get(k)]
    if missing:
        raise LaunchError(f"--role {role} needs {', '.join(missing)} (environment or flags)")
    rank = cluster_rank(env)
    worker_id = int(env["DMLC_WORKER_ID"]) if env.get("DMLC_WORKER_ID") else rank
    if role == "auto":
        if rank is None:
            raise LaunchError(f"--role auto needs a task rank in one of {RANK_VARS}")
        role, worker_id = role_for_rank(rank, int(env["DMLC_NUM_SERVER"]))
    return role, role_env(role, scheduler_ip(env["DMLC_PS_ROOT_URI"]),
                          int(env["DMLC_PS_ROOT_PORT"]),
                          int(env["DMLC_NUM_WORKER"]), int(env["DMLC_NUM_SERVER"]),
                          worker_id=worker_id, base=env)


def run_role(role: str, cmd: Sequence[str], args: argparse.Namespace) -> None:
    """Replace this process with the role's process (no launcher left in between)."""
    role, env = cluster_env(role, args)
    if role == "worker":
        if not cmd:
            raise LaunchError("--role worker needs the training command after --")
        argv = list(cmd)
    else:
        argv = list(SERVER_CMD)
    sys.stdout.flush()
    os.execvpe(argv[0], argv, env)


# ---------------------------------------------------------------- CLI

def _terminate_on_sigterm() -> None:
    """SIGTERM/SIGHUP (scancel, a closed ssh session) tear down like Ctrl-C does."""
    def handler(signum, frame):
        raise KeyboardInterrupt
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, handler)


def parse_args(argv: Sequence[str] | None) -> tuple[argparse.Namespace, list[str]]:
    argv = list(sys.argv[1:] if argv is None else argv)
    cmd: list[str] = []
    if "--" in argv:
        cut = argv.index("--")
        argv, cmd = argv[:cut], argv[cut + 1:]
    parser = argparse.ArgumentParser(
        prog="python -m pipeline.tools.launch", description=__doc__.split("\n")[0],
        epilog="The worker command follows `--`.")
    parser.add_argument("--workers", "-n", type=int, help="number of workers (local: 1)")
    parser.add_argument("--servers", "-s", type=int, help="number of servers (local: 1)")
    parser.add_argument("--host", help="scheduler address (local: 127.0.0.1, also bound by "
                                       "every process)")
    parser.add_argument("--port", type=int, help="scheduler port (local: a free one)")
    parser.add_argument("--role", choices=(*ROLES, "auto"),
                        help="cluster mode: run this one role with DMLC_* from the environment")
    return parser.parse_args(argv), cmd


def main(argv: Sequence[str] | None = None) -> None:
    args, cmd = parse_args(argv)
    try:
        if args.role:
            run_role(args.role, cmd, args)
            return
        _terminate_on_sigterm()
        code = launch(cmd, args.workers or 1, args.servers or 1, args.host or "127.0.0.1",
                      args.port)
    except LaunchError as exc:
        raise SystemExit(f"launch: {exc}") from None
    sys.exit(code)


if __name__ == "__main__":
    main()

"""Batches from RecordIO for training and prediction: decode + augment in worker processes.

* Model input: ``(255 - pixel) / 255`` as float32 NCHW with one channel. Plankton is dark on
  white, so inverting makes the background 0: the zero padding of every convolution and of the
  batched TTA warp then *is* background, and an organism's pixels carry the signal.
* Augmentation is deterministic per (seed, epoch, batch): every batch re-seeds the affine
  transform from those three numbers, so a run resumed after ``kill -9`` or run with another
  number of workers sees exactly the same augmented batches.
* Workers are forked processes (decode and cv2 warps release no GIL worth having), fed with
  bounded look-ahead (``prefetch`` batches in flight), so memory does not grow with the data
  set and the device rarely waits.
* Stops are the parent's business: workers ignore SIGINT and SIGTERM, so a Ctrl-C or a
  scheduler's SIGTERM sent to the whole process group reaches only the trainer, which finishes
  its batch, saves and ends the workers itself (SIGKILL: they hold nothing worth saving). A
  worker that dies anyway (the kernel's out-of-memory killer, ``kill -9``) is noticed at once
  (its socket closes) and ends the run with :class:`LoaderError` instead of a wait for a batch
  that never comes. Each worker has its own socket to the parent and nothing shared, so a dead
  worker cannot leave a lock held (what made :class:`multiprocessing.Pool` hang), and a worker
  whose parent is gone (``kill -9``) reads the end of its socket and exits: none is orphaned.
"""
from __future__ import annotations

import os
import pickle
import queue
import signal
import threading
import time
import traceback
from collections import deque
from multiprocessing import Pipe
from multiprocessing.pool import ExceptionWithTraceback
from typing import Any, Iterator, Sequence

import numpy as np

from pipeline.lib.errors import PipelineError
from pipeline.lib.records import RecordReader

# Worker-process state, inherited through fork (a RecordReader re-opens its handle per pid).
_STATE: dict[str, Any] = {}


def to_input(images: np.ndarray) -> np.ndarray:
    """uint8 (N, H, W) raw images -> float32 (N, 1, H, W) model input, background 0."""
    return ((255.0 - images.astype(np.float32)) / 255.0)[:, None]


def batch_seed(seed: int, epoch: int, batch: int) -> int:
    return int(np.random.SeedSequence([seed, epoch, batch]).generate_state(1)[0])


def _load_batch(task: tuple[np.ndarray, int | None]) -> tuple[np.ndarray, np.ndarray]:
    indices, seed = task
    reader: RecordReader = _STATE["reader"]
    transform = _STATE.get("transform")
    images, labels = [], []
    if transform is not None and seed is not None:
        transform.transforms[-1].reseed(seed)
    for i in indices:
        label, img = reader.read(int(i))
        if transform is not None:
            img = transform(image=img)["image"]
        images.append(img)
        labels.append(label)
    return to_input(np.stack(images)), np.asarray(labels, dtype=np.float32)


class LoaderError(PipelineError, RuntimeError):
    """A data loader worker process died (killed by the system or by hand)."""


STOP_SIGNALS = {signal.SIGINT, signal.SIGTERM}


def _serve(conn) -> None:
    """A worker's life: decode the batches the parent sends, send them back in order.

    The main thread takes tasks and decodes; a second thread sends the results, so the worker
    runs ahead of the parent by as many batches as the parent has asked for (``prefetch``)
    instead of waiting while a finished batch sits in the socket. Ends when the parent goes
    away (its end of the socket closes).
    """
    outbox: queue.SimpleQueue = queue.SimpleQueue()

    def send() -> None:
        while True:
            item = outbox.get()
            try:
                conn.send(item)
            except OSError:  # the parent is gone: nobody to send to
                os._exit(0)

    threading.Thread(target=send, daemon=True).start()
    while True:
        try:
            task = conn.recv()
        except (EOFError, OSError):  # the parent closed the loader or died
            return
        try:
            outbox.put(("ok", _load_batch(task)))
        except Exception as exc:  # noqa: BLE001 - re-raised in the parent, with this traceback
            outbox.put(("error", _portable(exc)))


def _portable(exc: Exception) -> BaseException:
    """``exc`` with its traceback as it will arrive in the parent, or, if it cannot travel
    (an exception whose arguments do not pickle), a RuntimeError saying the same."""
    wrapped = ExceptionWithTraceback(exc, exc.__traceback__)
    try:
        pickle.loads(pickle.dumps(wrapped))
    except Exception:  # noqa: BLE001 - any failure to travel
        return RuntimeError(f"{type(exc).__name__}: {exc}")
    return wrapped


class _Workers:
    """``n`` forked decode processes, each with its own socket. Tasks go to the workers in
    turn and every worker answers its tasks in order, so reading the batches back in the same
    turn gives them in task order."""

    def __init__(self, n: int):
        self.pids: list[int] = []
        self.conns: list = []
        self.sent = self.received = 0
        # Blocked around fork, so no stop signal reaches a child before it ignores them.
        mask = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
        try:
            for _ in range(n):
                ours, theirs = Pipe()
                pid = os.fork()
                if pid == 0:  # the worker
                    code = 1
                    try:
                        for s in STOP_SIGNALS:
                            signal.signal(s, signal.SIG_IGN)
                        signal.pthread_sigmask(signal.SIG_SETMASK, mask)
                        for c in [ours, *self.conns]:  # so the parent's exit reads as EOF
                            c.close()
                        _serve(theirs)
                        code = 0
                    except BaseException:  # a bug: say where before the parent reports the exit
                        traceback.print_exc()
                    finally:
                        os._exit(code)
                theirs.close()
                self.pids.append(pid)
                self.conns.append(ours)
        except BaseException:
            self.close()
            raise
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, mask)

    def submit(self, task: tuple[np.ndarray, int | None]) -> int:
        """Send ``task`` to the next worker; returns that worker's number for :meth:`result`."""
        w = self.sent % len(self.conns)
        try:
            self.conns[w].send(task)
        except OSError:
            raise LoaderError(self._death(w)) from None
        self.sent += 1
        return w

    @property
    def owed(self) -> int:
        """Batches sent for and not yet read back."""
        return self.sent - self.received

    def result(self, w: int) -> tuple[np.ndarray, np.ndarray]:
        """The oldest batch not yet read from worker ``w``; an error of its decoding is raised
        here, and a dead worker raises :class:`LoaderError`."""
        try:
            kind, value = self.conns[w].recv()
        except (EOFError, OSError):
            raise LoaderError(self._death(w)) from None
        self.received += 1
        if kind == "error":
            raise value
        return value

    def _death(self, w: int) -> str:
        """One line: which worker died, how, and what to do."""
        pid, status = self.pids[w], None
        # Its socket closed as it exited; the exit status follows within moments.
        for _ in range(100 if pid > 0 else 0):
            try:
                done, status = os.waitpid(pid, os.WNOHANG)
            except ChildProcessError:
                break
            if done:
                self.pids[w] = -1  # reaped
                break
            status = None
            time.sleep(0.01)
        hint = "rerun to continue from the last saved epoch"
        if status is None:
            how = "stopped answering"
        elif os.WIFSIGNALED(status):
            sig = os.WTERMSIG(status)
            how = f"was killed by {signal.Signals(sig).name}"
            if sig == signal.SIGKILL:
                hint = ("SIGKILL usually means the system ran out of memory: lower "
                        "train.workers, train.prefetch or train.batch_size, then " + hint)
        else:
            how = f"exited with code {os.WEXITSTATUS(status)}"
        return f"data loader worker (pid {pid}) {how}; {hint}"

    def close(self) -> None:
        """End every worker at once (SIGKILL) and reap it."""
        for pid in self.pids:
            if pid > 0:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        for conn in self.conns:
            conn.close()
        for pid in self.pids:
            if pid > 0:
                try:
                    os.waitpid(pid, 0)
                except ChildProcessError:
                    pass
        self.pids, self.conns = [], []


class BatchLoader:
    """Iterate (input, label) numpy batches over ``indices`` of one split's records.

    ``transform`` is an albumentations pipeline ending in an affine with a ``reseed`` method
    (:func:`pipeline.lib.augment.build_train_transform`), or None for plain decoding.
    """

    def __init__(self, reader: RecordReader, indices: Sequence[int], batch_size: int,
                 transform=None, shuffle: bool = False, seed: int = 0, workers: int = 1,
                 prefetch: int = 4, drop_last: bool = False):
        self.reader, self.indices = reader, np.asarray(indices, dtype=np.int64)
        self.batch_size, self.transform = batch_size, transform
        self.shuffle, self.seed, self.drop_last = shuffle, seed, drop_last
        self.workers, self.prefetch = workers, max(1, prefetch)
        self._pool = None

    def __len__(self) -> int:
        n = len(self.indices)
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def _tasks(self, epoch: int) -> list[tuple[np.ndarray, int | None]]:
        order = self.indices
        if self.shuffle:
            order = np.random.default_rng([self.seed, epoch]).permutation(order)
        chunks = [order[i:i + self.batch_size] for i in range(0, len(order), self.batch_size)]
        if self.drop_last and chunks and len(chunks[-1]) < self.batch_size:
            chunks.pop()
        return [(c, batch_seed(self.seed, epoch, b) if self.transform is not None else None)
                for b, c in enumerate(chunks)]

    def epoch(self, epoch: int = 0, start: int = 0) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """The batches of ``epoch``, from batch ``start`` on (a run resumed mid-epoch): the
        skipped ones are not decoded, and the rest are those of an uninterrupted epoch."""
        tasks = self._tasks(epoch)[start:]
        _STATE.update(reader=self.reader, transform=self.transform)
        if self.workers <= 0:
            yield from map(_load_batch, tasks)
            return
        if self._pool is not None and self._pool.owed:  # an earlier epoch was left mid-way
            self.close()
        pool = self._ensure_pool()
        pending: deque = deque()
        try:
            for task in tasks:
                pending.append(pool.submit(task))
                if len(pending) >= self.prefetch:
                    yield pool.result(pending.popleft())
            while pending:
                yield pool.result(pending.popleft())
        finally:
            if pending and self._pool is pool:  # left mid-epoch: batches are still owed
                self.close()

    def _ensure_pool(self) -> _Workers:
        if self._pool is None:
            # Workers inherit _STATE through fork; numpy/OpenCV inside them stay single-threaded
            # so they do not fight the training process for the cores.
            os.environ.setdefault("OPENCV_FOR_THREADS_NUM", "1")
            import cv2

            cv2.setNumThreads(1)
            self._pool = _Workers(self.workers)
        return self._pool

    def close(self) -> None:
        """End the worker processes (at once; a later epoch starts new ones)."""
        if self._pool is not None:
            pool, self._pool = self._pool, None
            pool.close()

    def __enter__(self) -> "BatchLoader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class MixedReader:
    """The train records followed by the test records, as one index space.

    Index ``i < len(train)`` reads train record ``i`` with its label; index ``len(train) + j``
    reads test record ``j`` with label ``-(1 + j)``, which :func:`soft_targets` turns into
    row ``j`` of the pseudo-label targets. One reader lets one worker pool decode and augment
    both kinds of images in the same batches.
    """

    def __init__(self, train: RecordReader, test: RecordReader):
        self.train, self.test = train, test
        self.offset = len(train)

    def __len__(self) -> int:
        return self.offset + len(self.test)

    def read(self, i: int) -> tuple[float, np.ndarray]:
        if i < self.offset:
            return self.train.read(i)
        j = i - self.offset
        return -(1.0 + j), self.test.read(j)[1]


class MixedBatchLoader(BatchLoader):
    """Batches of ``batch_size`` images, ``pseudo_per_batch`` of them pseudo-labelled test images.

    An epoch is one pass over the labelled ``indices`` (``batch_size - pseudo_per_batch`` per
    batch, shuffled per epoch); the test images are drawn in a shuffled order that runs on
    across epochs, so every test image is used about equally. Both orders and the
    augmentation are seeded from (seed, epoch[, batch]) like :class:`BatchLoader`'s, so a
    resumed run sees the same batches.
    """

    def __init__(self, reader: MixedReader, indices: Sequence[int], batch_size: int,
                 pseudo_per_batch: int, transform=None, seed: int = 0, workers: int = 1,
                 prefetch: int = 4):
        if not 0 < pseudo_per_batch < batch_size:
            raise ValueError(f"pseudo images per batch must be in (0, {batch_size}), got "
                             f"{pseudo_per_batch}")
        super().__init__(reader, indices, batch_size - pseudo_per_batch, transform,
                         shuffle=True, seed=seed, workers=workers, prefetch=prefetch,
                         drop_last=len(indices) >= batch_size - pseudo_per_batch)
        self.pseudo_per_batch = pseudo_per_batch
        self.n_test = len(reader.test)

    def _tasks(self, epoch: int) -> list[tuple[np.ndarray, int | None]]:
        labelled = super()._tasks(epoch)
        k, n = self.pseudo_per_batch, self.n_test
        start = epoch * len(labelled) * k  # where this epoch's draws begin in the long order
        draws = np.arange(start, start + len(labelled) * k)
        # Pass p over the test images is permutation([seed, "pseudo", p]) of them.
        order = np.empty(len(draws), dtype=np.int64)
        for p in np.unique(draws // n):
            here = draws // n == p
            perm = np.random.default_rng([self.seed, 7919, int(p)]).permutation(n)
            order[here] = perm[draws[here] % n]
        test = order + self.reader.offset
        return [(np.concatenate([chunk, test[b * k:(b + 1) * k]]), seed)
                for b, (chunk, seed) in enumerate(labelled)]


def soft_targets(labels: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """(N, classes) float32 targets of a mixed batch: one-hot rows for labels >= 0, and row
    ``j`` of ``targets`` (the pseudo-labels) for label ``-(1 + j)``."""
    labels = np.asarray(labels)
    out = np.zeros((len(labels), targets.shape[1]), dtype=np.float32)
    own = labels >= 0
    out[np.flatnonzero(own), labels[own].astype(np.int64)] = 1.0
    out[~own] = targets[(-labels[~own] - 1).astype(np.int64)]
    return out

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
"""
from __future__ import annotations

import os
from collections import deque
from multiprocessing import get_context
from typing import Any, Iterator, Sequence

import numpy as np

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
        pool = self._ensure_pool()
        pending: deque = deque()
        for task in tasks:
            pending.append(pool.apply_async(_load_batch, (task,)))
            if len(pending) >= self.prefetch:
                yield pending.popleft().get()
        while pending:
            yield pending.popleft().get()

    def _ensure_pool(self):
        if self._pool is None:
            # Workers inherit _STATE through fork; numpy/OpenCV inside them stay single-threaded
            # so they do not fight the training process for the cores.
            os.environ.setdefault("OPENCV_FOR_THREADS_NUM", "1")
            import cv2

            cv2.setNumThreads(1)
            self._pool = get_context("fork").Pool(self.workers)
        return self._pool

    def close(self) -> None:
        if self._pool is not None:
            self._pool.terminate()
            self._pool.join()
            self._pool = None

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

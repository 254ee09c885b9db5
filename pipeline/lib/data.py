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

    def epoch(self, epoch: int = 0) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        tasks = self._tasks(epoch)
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

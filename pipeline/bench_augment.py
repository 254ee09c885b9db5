"""Throughput of the two augmentation paths, printed as JSON lines (a benchmark, not a test).

* train: raw uint8 record-sized images through ``build_train_transform`` (albumentations +
  cv2.warpAffine) in this one process - what one DataLoader worker can deliver;
* tta: ``tta_batch`` with T=100 transforms on model-input float tensors - how fast the
  100-fold test-time views are produced before they reach the net.

Run: ``OMP_NUM_THREADS=2 python -m pipeline.bench_augment [--seconds 2]``.
"""
from __future__ import annotations

import argparse
import json
import os
import time
from typing import Callable, Dict

import cv2
import mxnet as mx
import numpy as np

from pipeline import augment as au


def _rate(step: Callable[[], int], seconds: float) -> float:
    """Items per second of ``step`` (which returns how many items it processed)."""
    step()  # warm-up: first-call allocations, MXNet operator set-up
    done, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        done += step()
    return done / (time.perf_counter() - start)


def bench_train(size: int, seconds: float, cv2_threads: int) -> Dict[str, object]:
    cv2.setNumThreads(cv2_threads)
    images = np.random.default_rng(0).integers(0, 256, (64, size, size), dtype=np.uint8)
    transform = au.build_train_transform(au.AffineRanges(), size=size, seed=0)

    def step() -> int:
        for img in images:
            transform(image=img)
        return len(images)

    return {"path": "train", "size": size, "cv2_threads": cv2_threads,
            "img_per_s": round(_rate(step, seconds), 1)}


def bench_tta(size: int, batch: int, seconds: float, n_tta: int = 100) -> Dict[str, object]:
    rng = np.random.default_rng(0)
    images = mx.nd.array(rng.random((batch, 1, size, size), dtype=np.float32))
    matrices = au.sample_matrices(au.AffineRanges(), n_tta, size, rng, method="halton")

    def step() -> int:
        au.tta_batch(images, matrices).wait_to_read()
        return batch

    source_rate = _rate(step, seconds)
    return {"path": "tta", "size": size, "batch": batch, "transforms": n_tta,
            "source_img_per_s": round(source_rate, 1),
            "views_per_s": round(source_rate * n_tta, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=2.0, help="timing window per figure")
    args = parser.parse_args()
    print(json.dumps({"omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
                      "cpus": len(os.sched_getaffinity(0))}), flush=True)
    default_cv2_threads = cv2.getNumThreads()
    for size in (64, 128):
        for threads in (1, default_cv2_threads):
            print(json.dumps(bench_train(size, args.seconds, threads)), flush=True)
    cv2.setNumThreads(default_cv2_threads)
    for size, batch in ((64, 1), (64, 16), (128, 1), (128, 8)):
        print(json.dumps(bench_tta(size, batch, args.seconds)), flush=True)


if __name__ == "__main__":
    main()

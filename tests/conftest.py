"""Shared fixtures: tiny NDSB folders built from real-looking images, and a thread cap."""
from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import signal
import tempfile

import numpy as np
import pytest

if TYPE_CHECKING:
    from pipeline.lib.settings import Paths

# A test run started in the background (a CI job, `make test &`) inherits SIGINT ignored, and
# so would every process the tests start, while the Ctrl-C tests need it delivered. A handler
# here is reset to the default action in the processes they exec.
if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)

# Tests share 2 cores with each other's subprocesses; set before any mxnet import.
os.environ.setdefault("OMP_NUM_THREADS", "2")
# Two MXNet engine threads, as the stages run (pipeline.lib.runtime.configure_threads).
os.environ.setdefault("MXNET_CPU_WORKER_NTHREADS", "2")
os.environ.setdefault("DVC_NO_ANALYTICS", "1")
# `auto` precision is measured on first use (pipeline.lib.precision): a test's outcome must not
# depend on timing, so the stages the tests run use the CPU-flag rule, and the measurement and
# its cache are tested on their own (tests/test_auto_precision.py) in a folder of their own.
os.environ.setdefault("NDSB_AUTO", "flags")
os.environ.setdefault("NDSB_AUTO_CACHE", tempfile.mkdtemp(prefix="ndsb-auto-"))
# As the stages do (pipeline.lib.runtime): AMX kernels on CPUs that have them, before oneDNN runs.
from pipeline.lib.runtime import enable_amx  # noqa: E402

enable_amx()

from pipeline.lib.precision import bfloat16_supported  # noqa: E402

# bfloat16 needs oneDNN on an AVX-512 CPU (MXNet 1.9.1); on others it is refused with a clear
# message (tests/test_precision.py), and the tests that run it are skipped.
needs_bf16 = pytest.mark.skipif(not bfloat16_supported(),
                                reason="bfloat16 needs oneDNN on an AVX-512 CPU")

ROOT = Path(__file__).resolve().parents[1]


def organism(h: int, w: int, seed: int, grey: int = 60) -> np.ndarray:
    """A dark ellipse on white with a gradient: enough structure to test resampling."""
    import cv2

    rng = np.random.default_rng(seed)
    img = np.full((h, w), 255, np.uint8)
    axes = (max(2, w // 3), max(2, h // 3))
    cv2.ellipse(img, (w // 2, h // 2), axes, float(rng.uniform(0, 180)), 0, 360, grey, -1)
    return img


def write_png(path: Path, img: np.ndarray) -> Path:
    import cv2

    path.parent.mkdir(parents=True, exist_ok=True)
    assert cv2.imwrite(str(path), img)
    return path


@pytest.fixture
def ndsb_folder(tmp_path: Path) -> Path:
    """train/<3 classes>/ 4 PNGs each of varied sizes, test/ 3 PNGs, no sample submission."""
    root = tmp_path / "ndsb"
    sizes = [(40, 30), (25, 70), (64, 64), (100, 20)]
    for c, cls in enumerate(["copepod", "amphipod", "diatom"]):
        for j, (h, w) in enumerate(sizes):
            write_png(root / "train" / cls / f"{cls}_{j}.png", organism(h, w, 10 * c + j, 40 + c * 40))
    for j in range(3):
        write_png(root / "test" / f"{j + 1}.png", organism(30 + 10 * j, 50, 100 + j))
    return root


def where(tmp: Path, records: Path) -> "Paths":
    """The paths section of a test run: ``records``, and ck/, m/, p/, pred/ under ``tmp``."""
    from pipeline.lib.settings import Paths

    return Paths.of(records=str(records), checkpoints=str(tmp / "ck"), metrics=str(tmp / "m"),
                    plots=str(tmp / "p"), predictions=str(tmp / "pred"))


def write_params(path: Path, paths: "Paths", **sections: Any) -> Path:
    """A params file with ``paths`` and the given sections (typed sections or dicts)."""
    import yaml

    data = {"paths": paths.as_dict()}
    for name, section in sections.items():
        data[name] = section if isinstance(section, dict) else section.as_dict()
    path.write_text(yaml.safe_dump(data))
    return path


def train_lenet(base: Path, per_class: int = 10, test: int = 7, size: int = 32,
                max_size: int = 80) -> tuple[Path, Path]:
    """(records, checkpoints) of a lenet trained for one epoch on a tiny synthetic 3-class
    NDSB folder under ``base``: the trained model that predict, INT8 and TTA tests share."""
    from pipeline import train as T
    from pipeline.ingest import Settings, ingest
    from pipeline.lib.settings import TrainSection
    from pipeline.tools.synth import generate

    generate(base / "ndsb", classes=3, per_class=per_class, test=test, seed=4,
             max_size=max_size)
    ingest(base / "ndsb", base / "records", Settings(size=size), folds=2, workers=1)
    cfg = TrainSection.of(epochs=1, batch_size=8, workers=0, act="leaky", bn=True,
                          lr_steps=[1])
    T.train(T.Run("lenet", 0, cfg, where(base, base / "records")))
    return base / "records", base / "ck"

"""The embedded default data: 105 real FlowCam plankton images in 6 classes, as an NDSB folder.

The images ship in the PyPI wheel ``planktonclas==0.2.4`` (Apache-2.0, by the AI4OS /
iMagine project) under ``planktonclas/resources/demo-images/<class>/``. This stage downloads the
wheel without installing it or its dependencies (``pip download --no-deps``), checks its sha256,
and lays the images out as an NDSB folder::

    data/sample/ndsb/train/<class>/*.jpg     a stratified part (``sample.train_fraction``)
    data/sample/ndsb/test/*.jpg              the rest, under their own file names
    data/sample/ndsb/sampleSubmission.csv    classes in a non-alphabetical order, as in NDSB
    data/sample/ndsb/test_labels.csv         image,class: the hidden test labels, for scoring
                                             (ingest reads only train/, test/ and the sample)

A wheel already on disk (``sample.wheel``) is used instead of downloading, for offline use.
"""
from __future__ import annotations

import csv
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path
from typing import Sequence

import numpy as np

from pipeline.lib import stage
from pipeline.lib.errors import PipelineError
from pipeline.lib.fsutil import sha256
from pipeline.lib.submission import non_alphabetical, write_sample_submission

WHEEL = "planktonclas-0.2.4-py3-none-any.whl"
WHEEL_SHA256 = "8117093b31700306b047adfb50cab8cb6fde773ebbb9688409621416e25c1530"
DEMO_PREFIX = "planktonclas/resources/demo-images/"



class SampleError(PipelineError, RuntimeError):
    """The wheel could not be obtained or is not the expected one."""


def fetch_wheel(dest: Path) -> Path:
    """Download the wheel (no dependencies, nothing installed) into ``dest``."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
           "--disable-pip-version-check", "-q", "-d", str(dest), "planktonclas==0.2.4"]
    result = subprocess.run(cmd, capture_output=True, text=True)
    wheel = dest / WHEEL
    if result.returncode != 0 or not wheel.exists():
        raise SampleError(f"pip download of planktonclas==0.2.4 failed:\n{result.stderr}")
    return wheel


def demo_images(wheel: Path) -> dict[str, list[tuple[str, bytes]]]:
    """{class: [(file name, bytes), ...]} of the wheel's demo images, sorted by name."""
    found = sha256(wheel)
    if found != WHEEL_SHA256:
        raise SampleError(f"{wheel}: sha256 {found} is not the expected {WHEEL_SHA256}")
    out: dict[str, list[tuple[str, bytes]]] = {}
    with zipfile.ZipFile(wheel) as zf:
        for member in sorted(zf.namelist()):
            if not member.startswith(DEMO_PREFIX) or member.endswith("/"):
                continue
            cls, name = member[len(DEMO_PREFIX):].split("/", 1)
            out.setdefault(cls, []).append((name, zf.read(member)))
    if not out:
        raise SampleError(f"{wheel}: no {DEMO_PREFIX} images inside")
    return out


def split_stratified(images: dict[str, list[tuple[str, bytes]]], train_fraction: float,
                     rng: np.random.Generator) -> tuple[dict, list[tuple[str, str, bytes]]]:
    """Per class, ``train_fraction`` (at least 2) to train, the rest (at least 1) to test."""
    train: dict[str, list[tuple[str, bytes]]] = {}
    test: list[tuple[str, str, bytes]] = []
    for cls, files in sorted(images.items()):
        order = rng.permutation(len(files))
        n_train = min(len(files) - 1, max(2, round(train_fraction * len(files))))
        train[cls] = [files[i] for i in sorted(order[:n_train])]
        test += [(cls, *files[i]) for i in sorted(order[n_train:])]
    # Opaque test names, as NDSB's numeric ones: the wheel's file names contain the class.
    test = [test[i] for i in rng.permutation(len(test))]
    return train, [(cls, f"{j + 1:04d}.jpg", data) for j, (cls, _, data) in enumerate(test)]


def sample(out: str | Path, wheel: Path, train_fraction: float = 0.7, seed: int = 0
                 ) -> dict[str, int]:
    """Write the NDSB-layout sample to ``out``; return image counts."""
    out = Path(out)
    rng = np.random.default_rng(seed)
    train, test = split_stratified(demo_images(wheel), train_fraction, rng)
    staging = Path(tempfile.mkdtemp(prefix=".sample-", dir=out.parent if out.parent.exists()
                                    else None))
    try:
        root = staging / "ndsb"
        for cls, files in train.items():
            (root / "train" / cls).mkdir(parents=True)
            for name, data in files:
                (root / "train" / cls / name).write_bytes(data)
        (root / "test").mkdir(parents=True)
        for _, name, data in test:
            (root / "test" / name).write_bytes(data)
        write_sample_submission(root / "sampleSubmission.csv", [n for _, n, _ in test],
                                non_alphabetical(sorted(train), rng))
        with open(root / "test_labels.csv", "w", newline="") as fh:
            writer = csv.writer(fh)
            writer.writerow(["image", "class"])
            writer.writerows((name, cls) for cls, name, _ in test)
        if out.exists():
            shutil.rmtree(out)
        out.parent.mkdir(parents=True, exist_ok=True)
        staging.rename(out)  # the whole folder appears at once
    finally:
        if staging.exists():
            shutil.rmtree(staging)
    return {"classes": len(train), "train": sum(map(len, train.values())), "test": len(test)}


def _run(cfg, args) -> str:
    p = cfg.sample
    with tempfile.TemporaryDirectory() as tmp:
        wheel = Path(p.wheel) if p.wheel else fetch_wheel(Path(tmp))
        counts = sample(p.out, wheel, p.train_fraction, p.seed)
    return (f"sample: {counts['classes']} classes, {counts['train']} train, {counts['test']} "
            f"test images -> {p.out}")


def main(argv: Sequence[str] | None = None) -> None:
    stage.run("sample", ("sample",), _run, argv, doc=__doc__)


if __name__ == "__main__":
    main()

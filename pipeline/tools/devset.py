"""Real labelled development sets in the NDSB layout, fetched reproducibly.

``python -m pipeline.tools.devset NAME OUT [--seed S] [--wheel FILE] [--per-class N]`` writes::

    OUT/train/<class>/*.png     labelled training images, one folder per class
    OUT/test/*.png              the fixed test split, under opaque numbered names
    OUT/sampleSubmission.csv    the test images and the classes in a non-alphabetical order
    OUT/test_labels.csv         image,class of the test images (``python -m pipeline.score
                                SUBMISSION OUT/test_labels.csv``; ingest never reads it)
    OUT/devset.json             what this folder is: source, checksum, seed, counts; written
                                last, so its presence means a complete folder

Set ``data.root: OUT`` (and ``score.labels: OUT/test_labels.csv``) to run the pipeline on it.

The sets (:data:`SETS`):

* ``animal-mnist``: the 10,000 28 x 28 animal silhouettes (10 classes of 1,000; MIT licence,
  by Sina Mohammadi) that the PyPI wheel ``animal-mnist==0.4`` carries as two pickled numpy
  arrays. The wheel is downloaded from PyPI's file server and its sha256 checked; nothing is
  installed, and the arrays are read by an unpickler that admits numpy arrays only. The 284
  images that repeat another one exactly are dropped (a copy on both sides of a split would
  flatter out-of-fold and test scores): 9,716 images remain. A fixed 20 % of each class,
  the same for every ``--seed``, is the test split. Every image is then made plankton-like:
  inverted (dark silhouette on white), its ink a random grey, mirrored or not, turned by a
  random angle, scaled by a random factor of 1-4 (28-112 px) and padded by random margins on
  each side, so canvases have many sizes and aspect ratios as NDSB's do. Each image's draws
  come from ``(seed, its index in the wheel)`` alone: the same seed gives the same files.

Reruns are cheap and safe: a complete OUT of the same set and settings is left as it is; the
folder is built under a temporary name beside OUT and renamed into place, so a half-written
OUT never exists (an interrupted run's temporary folder is removed by the next run). Errors
are one line: no network, a checksum mismatch, an OUT that holds something else.
"""
from __future__ import annotations

import argparse
import csv
import gzip
import io
import json
import os
import pickle
import shutil
import socket
import tempfile
import urllib.error
import urllib.request
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from pipeline.lib.errors import PipelineError, stage_errors
from pipeline.lib.fsutil import remove_stale_temps, sha256, temp_prefix, write_bytes
from pipeline.lib.submission import SAMPLE_SUBMISSION, non_alphabetical, write_sample_submission

MARKER = "devset.json"
LABELS = "test_labels.csv"
# Bump when the layout or the transform changes: a folder of another version is not reused.
VERSION = 1
TEST_FRACTION = 0.2
# The split's own seed: the test images stay the same animals whatever --seed draws.
SPLIT_SEED = 20150316


class DevsetError(PipelineError, RuntimeError):
    """The set cannot be fetched or laid out; the message says why and what to do."""


@dataclass(frozen=True)
class Source:
    """A wheel on PyPI's file server holding a labelled image set."""

    name: str
    url: str
    sha256: str
    licence: str
    classes: tuple[str, ...]
    read: Callable[[Path], tuple[np.ndarray, np.ndarray]]  # wheel -> (images N x H x W, labels)

    @property
    def filename(self) -> str:
        return self.url.rsplit("/", 1)[1]


class _ArraysOnly(pickle.Unpickler):
    """Unpickles numpy arrays and nothing else: a pickle can run any code it names."""

    ALLOWED = {("numpy.core.multiarray", "_reconstruct"), ("numpy", "ndarray"),
               ("numpy", "dtype")}

    def find_class(self, module: str, name: str):
        if (module, name) not in self.ALLOWED:
            raise DevsetError(f"the data names {module}.{name}, not a numpy array: refused")
        return super().find_class(module, name)


def _load_array(data: bytes) -> np.ndarray:
    return _ArraysOnly(io.BytesIO(gzip.decompress(data))).load()


def read_animal_mnist(wheel: Path) -> tuple[np.ndarray, np.ndarray]:
    """(uint8 images 10000 x 28 x 28, white on black; int64 labels 0-9) from the wheel."""
    prefix = "animal_mnist/data/Animal_MNIST/"
    with zipfile.ZipFile(wheel) as zf:
        images = _load_array(zf.read(prefix + "animal_data_version_3.gz"))
        labels = _load_array(zf.read(prefix + "animal_label_version_3.gz"))
    if images.dtype != np.uint8 or images.ndim != 3 or labels.shape != images.shape[:1]:
        raise DevsetError(f"{wheel}: unexpected arrays {images.dtype}{images.shape}, "
                          f"{labels.dtype}{labels.shape}")
    return images, labels.astype(np.int64)


SETS = {s.name: s for s in (
    Source("animal-mnist",
           "https://files.pythonhosted.org/packages/bb/ec/bd60c048875be7eb80f2ec83608551e34f0542"
           "e6fce8c4330b316a83992f/animal_mnist-0.4-py3-none-any.whl",
           "aeebf3d9de4552d6fd2d5701424e1a5b9020f8e5115d68df9db252f2f53ce2ce", "MIT",
           # The labels 0-9 in the order of the package's description (checked on the class
           # means: 6 is the one tall class, 9 the striped one).
           ("bear", "bird", "cat", "cow", "dog", "elephant", "giraffe", "horse", "sheep",
            "zebra"),
           read_animal_mnist),
)}


# ---------------------------------------------------------------------------- fetching

def fetch(source: Source, dest: Path, timeout: float = 60.0) -> Path:
    """Download ``source``'s wheel into the folder ``dest`` (atomically) and return it."""
    target = dest / source.filename
    try:
        with urllib.request.urlopen(source.url, timeout=timeout) as response:
            data = response.read()
    except (urllib.error.URLError, socket.timeout, ConnectionError) as exc:
        reason = getattr(exc, "reason", None) or exc
        raise DevsetError(f"cannot download {source.url} ({reason}): check the network, or "
                          f"download that file elsewhere and pass --wheel FILE") from None
    write_bytes(target, data)
    return target


def check_wheel(source: Source, wheel: Path) -> None:
    if not wheel.is_file():
        raise DevsetError(f"{wheel}: no such file (--wheel)")
    found = sha256(wheel)
    if found != source.sha256:
        raise DevsetError(f"{wheel}: sha256 {found} is not the expected {source.sha256} of "
                          f"{source.filename}: remove it and download it again")


# ---------------------------------------------------------------------------- the images

def unique_rows(images: np.ndarray) -> np.ndarray:
    """Indices of the first occurrence of every distinct image, in their original order."""
    flat = images.reshape(len(images), -1)
    _, first = np.unique(flat, axis=0, return_index=True)
    return np.sort(first)


def split(labels: np.ndarray, keep: np.ndarray, fraction: float = TEST_FRACTION,
          seed: int = SPLIT_SEED) -> tuple[np.ndarray, np.ndarray]:
    """(train, test) indices among ``keep``: ``fraction`` of each class (at least one) to
    test, drawn with ``seed``; both sorted."""
    rng = np.random.default_rng(seed)
    train, test = [], []
    for c in np.unique(labels[keep]):
        members = keep[labels[keep] == c]
        order = rng.permutation(members)
        n_test = max(1, round(fraction * len(members)))
        test.append(order[:n_test])
        train.append(order[n_test:])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(test))


def plankton_like(image: np.ndarray, rng: np.random.Generator, scale: tuple[float, float] =
                  (1.0, 4.0), margin: float = 0.3) -> np.ndarray:
    """A white-on-black silhouette as plankton: dark on white, any orientation and size.

    The ink becomes a grey in [20, 115] on white (255), the image is mirrored with
    probability 1/2, turned by an angle in [0, 360), scaled by a log-uniform factor in
    ``scale``, cropped to its ink and padded on each side by its own random margin of up to
    ``margin`` times the longer side (at least 2 px): canvases of many sizes and shapes.
    """
    import cv2

    ink = rng.uniform(0.55, 0.92)
    dark = 255.0 - image.astype(np.float64) * ink  # 0 -> white, 255 -> 255 * (1 - ink)
    if rng.random() < 0.5:
        dark = dark[:, ::-1]
    angle = rng.uniform(0.0, 360.0)
    factor = float(np.exp(rng.uniform(np.log(scale[0]), np.log(scale[1]))))
    h, w = dark.shape
    side = int(np.ceil(max(h, w) * factor * np.sqrt(2))) + 4
    m = cv2.getRotationMatrix2D((w / 2, h / 2), angle, factor)
    m[:, 2] += (side / 2 - w / 2, side / 2 - h / 2)  # centre on the output canvas
    warped = cv2.warpAffine(dark, m, (side, side), flags=cv2.INTER_LINEAR,
                            borderMode=cv2.BORDER_CONSTANT, borderValue=255.0)
    ys, xs = np.nonzero(warped < 250)
    if len(ys) == 0:  # an empty image stays an empty canvas of its scaled size
        ys, xs = np.array([0, side - 1]), np.array([0, side - 1])
    crop = warped[ys.min():ys.max() + 1, xs.min():xs.max() + 1]
    longest = max(crop.shape)
    top, bottom, left, right = (int(rng.integers(2, max(3, int(margin * longest) + 1)))
                                for _ in range(4))
    canvas = cv2.copyMakeBorder(crop, top, bottom, left, right, cv2.BORDER_CONSTANT,
                                value=255.0)
    return np.clip(np.rint(canvas), 0, 255).astype(np.uint8)


def image_rng(seed: int, index: int) -> np.random.Generator:
    """The draws of the image at ``index`` of the source: independent of every other image."""
    return np.random.default_rng(np.random.SeedSequence([seed, index]))


def png(image: np.ndarray) -> bytes:
    import cv2

    ok, data = cv2.imencode(".png", image)
    if not ok:
        raise DevsetError("PNG encoding failed")
    return data.tobytes()


# ---------------------------------------------------------------------------- the layout

def describe(source: Source, seed: int, per_class: int | None) -> dict:
    """What a folder holds; a rerun reuses a folder only when this matches."""
    return {"name": source.name, "version": VERSION, "source": source.url,
            "sha256": source.sha256, "licence": source.licence, "seed": seed,
            "per_class": per_class, "test_fraction": TEST_FRACTION, "split_seed": SPLIT_SEED}


def existing(out: Path) -> dict | None:
    """The description of a complete folder at ``out``; None if absent or empty; DevsetError
    if it holds anything else."""
    if not out.exists():
        return None
    if not out.is_dir():
        raise DevsetError(f"{out} is a file: choose a folder path for OUT")
    if not any(out.iterdir()):
        return None
    marker = out / MARKER
    try:
        return json.loads(marker.read_text())
    except (OSError, ValueError):
        raise DevsetError(f"{out} is not empty and holds no complete development set "
                          f"({MARKER} missing or unreadable): choose an empty or new folder, "
                          "or remove it") from None


def layout(source: Source, wheel: Path, out: Path, seed: int = 0,
           per_class: int | None = None) -> dict:
    """Lay out ``source`` (from the checked ``wheel``) at ``out``; return the description.

    ``per_class``: keep only the first N training images per class (and a proportional
    number of test images, at least one): a small set for quick trials and tests.
    """
    want = describe(source, seed, per_class)
    have = existing(out)
    if have is not None:
        if {k: have.get(k) for k in want} == want:
            return have
        diff = ", ".join(f"{k} {have.get(k)!r} (asked {v!r})" for k, v in want.items()
                         if have.get(k) != v)
        raise DevsetError(f"{out} already holds another development set ({diff}): choose "
                          "another folder or remove it")
    check_wheel(source, wheel)
    images, labels = source.read(wheel)
    keep = unique_rows(images)
    train, test = split(labels, keep)
    if per_class is not None:
        ratio = TEST_FRACTION / (1 - TEST_FRACTION)
        train = np.concatenate([train[labels[train] == c][:per_class]
                                for c in np.unique(labels[train])])
        test = np.concatenate([test[labels[test] == c][:max(1, round(per_class * ratio))]
                               for c in np.unique(labels[test])])
    names = source.classes
    out.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(out.parent, recursive=False)
    staging = Path(tempfile.mkdtemp(prefix=temp_prefix(out), dir=out.parent))
    try:
        for i in train:
            folder = staging / "train" / names[labels[i]]
            folder.mkdir(parents=True, exist_ok=True)
            (folder / f"{i:05d}.png").write_bytes(png(plankton_like(images[i],
                                                                    image_rng(seed, int(i)))))
        (staging / "test").mkdir()
        # Opaque names in a shuffled order, as NDSB's: neither the class nor the source
        # order can be read off a test file.
        order = np.random.default_rng(np.random.SeedSequence([SPLIT_SEED, 1])).permutation(test)
        rows = []
        for j, i in enumerate(order):
            name = f"{j + 1:05d}.png"
            (staging / "test" / name).write_bytes(png(plankton_like(images[i],
                                                                    image_rng(seed, int(i)))))
            rows.append((name, names[labels[i]]))
        write_sample_submission(staging / SAMPLE_SUBMISSION, [n for n, _ in rows],
                                non_alphabetical(names, np.random.default_rng(SPLIT_SEED)))
        with open(staging / LABELS, "w", newline="") as fh:
            writer = csv.writer(fh)
            writer.writerow(["image", "class"])
            writer.writerows(rows)
        described = dict(want, classes=list(names), train=int(len(train)),
                         test=int(len(test)), duplicates_dropped=int(len(images) - len(keep)))
        (staging / MARKER).write_text(json.dumps(described, indent=1) + "\n")
        staging.chmod(0o777 & ~_umask())  # mkdtemp makes 0700; the folder: the usual
        if out.exists():
            out.rmdir()  # empty (checked above); a race with another writer fails here
        os.rename(staging, out)  # the whole folder appears at once
    finally:
        if staging.exists():
            shutil.rmtree(staging)
    return described


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def devset(name: str, out: str | os.PathLike, seed: int = 0, wheel: str | None = None,
           per_class: int | None = None, cache: str | os.PathLike | None = None) -> dict:
    """Fetch (unless ``wheel`` is given or ``out`` is already complete) and lay out a set.

    ``cache``: a folder where the downloaded wheel is kept and looked for (checked by its
    sha256 either way); None downloads into a temporary folder.
    """
    if name not in SETS:
        raise DevsetError(f"unknown set {name!r}; known: {', '.join(sorted(SETS))}")
    source, out = SETS[name], Path(out)
    if seed < 0:
        raise DevsetError(f"--seed must be >= 0, got {seed}")
    if per_class is not None and per_class < 1:
        raise DevsetError(f"--per-class must be >= 1, got {per_class}")
    have = existing(out)
    if have is not None or wheel:  # nothing to download
        return layout(source, Path(wheel) if wheel else Path(), out, seed, per_class)
    if cache is not None:
        cached = Path(cache) / source.filename
        if not (cached.is_file() and sha256(cached) == source.sha256):
            fetch(source, Path(cache))
        return layout(source, cached, out, seed, per_class)
    with tempfile.TemporaryDirectory() as tmp:
        return layout(source, fetch(source, Path(tmp)), out, seed, per_class)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m pipeline.tools.devset",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("name", choices=sorted(SETS), help="which set")
    parser.add_argument("out", help="the folder to create (absent or empty)")
    parser.add_argument("--seed", type=int, default=0,
                        help="seed of the orientation, size and margins (the test split is "
                             "fixed)")
    parser.add_argument("--wheel", help="the source wheel already on disk (sha256-checked)")
    parser.add_argument("--cache", help="folder to keep the downloaded wheel in and reuse")
    parser.add_argument("--per-class", type=int, help="only the first N training images "
                        "per class (and a fifth as many test images): a quick small set")
    args = parser.parse_args(argv)
    with stage_errors("devset"):
        info = devset(args.name, args.out, args.seed, args.wheel, args.per_class, args.cache)
    print(f"devset: {info['name']} seed {info['seed']}: {len(info['classes'])} classes, "
          f"{info['train']} train, {info['test']} test images -> {args.out} (data.root; "
          f"labels for score: {Path(args.out) / LABELS})")


if __name__ == "__main__":
    main()

"""Read and write prediction files: one ``.npy`` probability matrix plus a ``.names.txt`` list.

Predict writes one pair per model (net, fold) and split; ensemble reads them and writes its
own pair without a fold. Keeping the naming and the format in one module means the writer and
the readers cannot drift apart:

* ``{dir}/{split}--{net}--fold{k}.npy``: float32 ``(N, C)`` class probabilities, columns in
  ``meta.json`` ``classes`` order (the submission order, not alphabetical);
* ``{dir}/{split}--{net}--fold{k}.names.txt``: the N image names, one per line, same order.

Names are stored beside the matrix (rather than relying on a shared order) so every consumer
aligns rows by image name and a reordering upstream can never silently mislabel rows.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import numpy as np

from pipeline.lib.fsutil import atomic_path
from pipeline.lib.names import describe_mismatch, duplicates, examples
from pipeline.lib.runs import artifact_name

SPLITS = ("valid", "test")
NAMES_SUFFIX = ".names.txt"


def prediction_path(directory: str | os.PathLike, split: str, net: str,
                    fold: int | None = None) -> Path:
    """Path of the ``.npy`` file for ``(split, net, fold)``; ``fold=None`` for fold-less files.

    The fold-less form (``{split}--{net}.npy``) is what the ensemble writes.
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    return Path(directory) / f"{artifact_name(split, net, fold)}.npy"


def names_path(npy_path: str | os.PathLike) -> Path:
    """The ``.names.txt`` file that accompanies a prediction ``.npy`` file."""
    npy_path = Path(npy_path)
    if npy_path.suffix != ".npy":
        raise ValueError(f"prediction file must end in .npy: {npy_path}")
    return npy_path.with_name(npy_path.name[:-len(".npy")] + NAMES_SUFFIX)


def prediction_files(directory: str | os.PathLike, split: str, net: str,
                     fold: int | None = None) -> tuple[Path, Path]:
    """Both files of one prediction: ``(npy, names)``."""
    npy = prediction_path(directory, split, net, fold)
    return npy, names_path(npy)


def save_prediction_file(npy_path: str | os.PathLike, probs: np.ndarray,
                         names: Sequence[str]) -> None:
    """Atomically write ``probs`` (cast to float32) and ``names`` to a file pair."""
    probs = np.asarray(probs)
    names = [str(n) for n in names]
    if probs.ndim != 2:
        raise ValueError(f"probs must be 2-D (N, C), got shape {probs.shape}")
    if len(names) != probs.shape[0]:
        raise ValueError(f"{len(names)} names for {probs.shape[0]} prediction rows")
    bad = [n for n in names if not n or "\n" in n or "\r" in n]
    if bad:
        raise ValueError(f"image names must be non-empty single lines, got {bad[:3]!r}")
    # Both files are written to temporary names first and renamed only when both writes have
    # succeeded, so a failure leaves neither (not one new file beside one stale one).
    with atomic_path(names_path(npy_path)) as tmp_names, \
            atomic_path(npy_path, suffix=".npy") as tmp_npy:
        tmp_names.write_text("".join(f"{n}\n" for n in names), encoding="utf-8")
        np.save(tmp_npy, probs.astype(np.float32, copy=False))


def load_prediction_file(npy_path: str | os.PathLike) -> tuple[np.ndarray, list[str]]:
    """Read a file pair written by :func:`save_prediction_file`; return ``(probs, names)``."""
    npy_path = Path(npy_path)
    probs = np.load(npy_path, allow_pickle=False)
    # split("\n") rather than splitlines(): the latter also breaks on rarer separators
    # (\x1c, \u2028, ...) that are legal inside a file name.
    names = names_path(npy_path).read_text(encoding="utf-8").split("\n")
    if names[-1] == "":
        names.pop()
    if probs.ndim != 2 or probs.shape[0] != len(names):
        raise ValueError(f"{npy_path}: shape {probs.shape} does not match "
                         f"{len(names)} names in {names_path(npy_path).name}")
    return probs, names


def save_predictions(directory: str | os.PathLike, split: str, net: str, fold: int | None,
                     probs: np.ndarray, names: Sequence[str]) -> Path:
    """Write the predictions of model ``(net, fold)`` on ``split``; return the ``.npy`` path."""
    path = prediction_path(directory, split, net, fold)
    save_prediction_file(path, probs, names)
    return path


def load_predictions(directory: str | os.PathLike, split: str, net: str,
                     fold: int | None = None) -> tuple[np.ndarray, list[str]]:
    """Read the predictions of model ``(net, fold)`` on ``split``: ``(probs, names)``."""
    return load_prediction_file(prediction_path(directory, split, net, fold))


def align_rows(probs: np.ndarray, names: Sequence[str], order: Sequence[str],
               what: str = "predictions", expected: str = "the expected images") -> np.ndarray:
    """Return the rows of ``probs`` reordered to ``order`` (matched by image name).

    See :func:`row_indices` for the checks; ``what`` and ``expected`` name the two sides in
    the error message.
    """
    return np.asarray(probs)[row_indices(names, order, what, expected)]


def row_indices(names: Sequence[str], order: Sequence[str], what: str = "predictions",
                expected: str = "the expected images") -> list[int]:
    """Index into ``names`` of each name in ``order``.

    The two must hold the same names, each once; otherwise a ``ValueError`` names every kind
    of mismatch (missing, extra, duplicated) with examples.
    """
    index = {n: i for i, n in enumerate(names)}
    missing = [n for n in order if n not in index]
    extra = sorted(set(index) - set(order))
    dup_names, dup_order = duplicates(names), duplicates(order)
    if not (missing or extra or dup_names or dup_order):
        return [index[n] for n in order]
    detail = describe_mismatch(missing, extra, dup_names)
    if dup_order:
        detail += f"; {len(dup_order)} listed twice in {expected} [{examples(dup_order)}]"
    raise ValueError(f"{what} do not match {expected}: {detail} (missing = expected but "
                     f"absent, extra = present but not expected)")

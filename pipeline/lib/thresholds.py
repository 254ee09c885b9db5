"""Per-class score thresholds for a target precision, fitted on out-of-fold predictions.

A classifier of new samples sees organisms of every kind, and a person then validates what it
predicted: for that person a prediction that is usually right saves time and one that is
often wrong costs it. IFCB tools therefore keep a prediction only when its score reaches a
per-class threshold and call the rest ``unclassified``. Here the thresholds are fitted on the
ensemble's out-of-fold predictions (calibrated, cross-fitted: no image's own label went into
the probability it is judged by), class by class:

* the images whose top-1 class is ``c`` are sorted by that probability, highest first;
* the threshold is the lowest probability ``t`` such that the images with top-1 ``c`` and
  probability ``>= t`` are right at least ``target`` of the time (the precision); of all
  such ``t`` the lowest keeps the most correct predictions (the recall);
* a class that never reaches the target (too few images, or too often confused) gets no
  threshold (``None``): its predictions are all ``unclassified``, which the report shows.

Ties are kept together: a threshold never splits images of equal probability. The precision
and recall are those on the out-of-fold images at the threshold, i.e. what the thresholds did
on data like the training set; a new sample with another mix of classes will see other
precisions (a rare class among many look-alikes is the usual way to lose precision).
"""
from __future__ import annotations

from typing import Any, Sequence

import numpy as np

UNCLASSIFIED = "unclassified"
# The bundle stage also writes the fitted thresholds (as the bundle's own thresholds.csv) under
# paths.metrics by this name, for the report (not under paths.plots: `dvc plots` draws every
# file there as a learning curve).
METRICS_FILE = "thresholds.csv"


def fit_thresholds(probs: np.ndarray, y: np.ndarray, classes: Sequence[str],
                   target: float) -> list[dict[str, Any]]:
    """One record per class: ``class``, ``threshold`` (None: never reaches ``target``),
    ``precision`` and ``recall`` at it (None where undefined), ``kept`` (images kept at the
    threshold), ``predicted`` (images with this top-1 class), ``support`` (images of this
    true class), and the precision without a threshold (``precision_top1``)."""
    probs = np.asarray(probs, dtype=np.float64)
    y = np.asarray(y, dtype=np.int64)
    if probs.ndim != 2 or probs.shape[1] != len(classes) or len(y) != len(probs):
        raise ValueError(f"need probs (N, {len(classes)}) and labels (N,), got {probs.shape} "
                         f"and {y.shape}")
    if not 0.0 <= target <= 1.0:
        raise ValueError(f"target precision must be in [0, 1], got {target}")
    top = probs.argmax(axis=1)
    score = probs[np.arange(len(probs)), top]
    out = []
    for c, name in enumerate(classes):
        rows = np.flatnonzero(top == c)
        support = int((y == c).sum())
        order = np.argsort(-score[rows], kind="stable")
        p, right = score[rows][order], (y[rows][order] == c)
        hits = np.cumsum(right)
        kept = np.arange(1, len(p) + 1)
        # Only where a run of equal probabilities ends may the kept set end.
        ends = np.flatnonzero(np.append(p[1:] != p[:-1], True)) if len(p) else np.array([], int)
        ok = ends[hits[ends] >= target * kept[ends] - 1e-12]
        record: dict[str, Any] = {
            "class": name, "predicted": int(len(p)), "support": support,
            "precision_top1": float(hits[-1] / len(p)) if len(p) else None}
        if len(ok):
            k = int(ok[-1])
            record.update(threshold=float(p[k]), kept=int(kept[k]),
                          precision=float(hits[k] / kept[k]),
                          recall=float(hits[k] / support) if support else None)
        else:
            record.update(threshold=None, kept=0, precision=None,
                          recall=0.0 if support else None)
        out.append(record)
    return out


def threshold_array(records: Sequence[dict[str, Any]]) -> np.ndarray:
    """The thresholds as a float array, ``inf`` for a class without one (never kept)."""
    return np.array([np.inf if r["threshold"] is None else r["threshold"] for r in records],
                    dtype=np.float64)


def apply_thresholds(top: np.ndarray, score: np.ndarray, thresholds: np.ndarray) -> np.ndarray:
    """Whether each prediction (top-1 class index, its probability) is kept."""
    return np.asarray(score) >= np.asarray(thresholds)[np.asarray(top)]

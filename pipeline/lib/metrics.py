"""The competition metric and its companions, the one implementation every stage uses.

NDSB was scored by multi-class log loss with Kaggle's conventions: probabilities are clipped to
``[1e-15, 1 - 1e-15]``, each row is then divided by its sum (:func:`clip_normalize`), and the
score is the mean of ``-log p(true class)``. :func:`ndsb_log_loss` implements exactly that
(sklearn's ``log_loss`` clips to the float's machine epsilon instead, so the two differ only on
0/1 entries). Blending (the ensemble stage) uses the same clipping, so the weights are fitted
on the very numbers Kaggle scores.
"""
from __future__ import annotations

from typing import Any, Sequence

import numpy as np

EPS = 1e-15


def clip_normalize(probs: np.ndarray) -> np.ndarray:
    """Kaggle's treatment of a probability matrix: clip to [EPS, 1 - EPS], rows sum to 1."""
    p = np.clip(np.asarray(probs, dtype=np.float64), EPS, 1 - EPS)
    return p / p.sum(axis=1, keepdims=True)


def apply_temperature(probs: np.ndarray, temperature: float) -> np.ndarray:
    """``p ** (1/T)`` renormalized, after :func:`clip_normalize`: T > 1 softens, T < 1 sharpens."""
    logp = np.log(clip_normalize(probs)) / float(temperature)
    logp -= logp.max(axis=1, keepdims=True)
    p = np.exp(logp)
    return p / p.sum(axis=1, keepdims=True)


def ndsb_log_loss(y_true_idx: Sequence[int] | np.ndarray, probs: np.ndarray) -> float:
    """Kaggle NDSB multi-class log loss: clip, renormalize rows, mean -log p(true class)."""
    return float(np.mean(sample_losses(y_true_idx, probs)))


def sample_losses(y_true_idx: Sequence[int] | np.ndarray, probs: np.ndarray) -> np.ndarray:
    """``-log p(true class)`` of every row, after :func:`clip_normalize`."""
    y, p = check_inputs(y_true_idx, probs)
    return -np.log(clip_normalize(p)[np.arange(len(y)), y])


def check_inputs(y_true_idx: Sequence[int] | np.ndarray, probs: np.ndarray
                 ) -> tuple[np.ndarray, np.ndarray]:
    """``(labels, probs)`` as arrays; ``ValueError`` for shapes, labels or values that cannot
    be scored."""
    y = np.asarray(y_true_idx)
    p = np.asarray(probs, dtype=np.float64)
    if p.ndim != 2 or y.ndim != 1 or len(y) != len(p) or len(y) == 0:
        raise ValueError(f"need labels (N,) and probs (N, C) with N > 0, "
                         f"got {y.shape} and {p.shape}")
    if not np.issubdtype(y.dtype, np.integer) or y.min() < 0 or y.max() >= p.shape[1]:
        raise ValueError(f"labels must be integer class indices in [0, {p.shape[1]})")
    if not np.isfinite(p).all():
        raise ValueError("probs contain NaN or infinite values")
    return y, p


def accuracy(y_true_idx: Sequence[int] | np.ndarray, probs: np.ndarray) -> float:
    """Fraction of rows whose arg-max class is the true class."""
    y, p = check_inputs(y_true_idx, probs)
    return float(np.mean(p.argmax(axis=1) == y))


def per_class_log_loss(y_true_idx: Sequence[int] | np.ndarray, probs: np.ndarray,
                       classes: Sequence[str]) -> dict[str, dict[str, Any]]:
    """``{class: {"n", "logloss", "accuracy"}}`` over the rows of each true class.

    Classes without any labelled row are left out (their loss is undefined, and JSON has no NaN).
    """
    y, p = check_inputs(y_true_idx, probs)
    if len(classes) != p.shape[1]:
        raise ValueError(f"{len(classes)} class names for {p.shape[1]} probability columns")
    losses = sample_losses(y, p)
    hits = p.argmax(axis=1) == y
    out = {}
    for k, name in enumerate(classes):
        rows = y == k
        if rows.any():
            out[name] = {"n": int(rows.sum()), "logloss": float(losses[rows].mean()),
                         "accuracy": float(hits[rows].mean())}
    return out


def summary(y_true_idx: Sequence[int] | np.ndarray, probs: np.ndarray) -> dict[str, float]:
    """``{"logloss", "accuracy"}``: what every stage reports about a set of predictions."""
    return {"logloss": ndsb_log_loss(y_true_idx, probs), "accuracy": accuracy(y_true_idx, probs)}


def evaluate(y_true_idx: Sequence[int] | np.ndarray, probs: np.ndarray,
             classes: Sequence[str]) -> dict[str, Any]:
    """Metrics dict: ``logloss`` (Kaggle's), ``accuracy``, ``n`` and ``per_class``."""
    return {**summary(y_true_idx, probs), "n": int(len(probs)),
            "per_class": per_class_log_loss(y_true_idx, probs, classes)}

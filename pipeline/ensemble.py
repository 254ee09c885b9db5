"""Blend the per-net predictions with log-loss-optimal weights fitted out of fold, calibrated.

A *model* is a net. Its out-of-fold (OOF) prediction is the concatenation of its fold-k
``valid`` predictions, aligned by image name to the train images of the chosen folds, so every
train image is predicted by a network that never saw it; its test prediction is the mean of
its per-fold test predictions (aligned by name). With ``seeds`` (the models grid trained each
net once per seed, as ``{net}-seed{s}``), a net's predictions are first averaged over its seeds
(image by image, before any weighting): the 10th NDSB place gained 0.02 this way. The blend
is ``sum_i w_i * P_i`` with ``w_i >= 0``, ``sum w_i = 1``, fitted to minimize the OOF NDSB log
loss.

Calibration (``calibration: temperature``): averaged TTA views and blends are under-confident
or over-confident in ways log loss punishes; the blend's probabilities are raised to the power
``1/T`` and renormalized, with ``T`` minimizing the OOF log loss. Measured honestly, by
cross-fitting: the OOF rows of fold k are calibrated with a ``T`` fitted on the other folds'
rows only, so ``ensemble.logloss`` (and ``valid--ensemble.npy``) never used a row's own label
to calibrate it; the test predictions get the ``T`` fitted on every OOF row. Both losses, before
and after, and every ``T`` are in the metrics.

Why this works well: on the simplex, ``-mean log(sum_i w_i p_i(true))`` is convex in ``w``
(negative log of a linear function), so SLSQP from uniform weights reaches the global optimum;
as a guard the fitted blend is compared with every single model and the best is kept, so the
blend is never worse than the best model on OOF data. The reported blend loss is fitted and
evaluated on the same OOF rows, hence slightly optimistic (by about M-1 parameters' worth).

Run as ``python -m pipeline.ensemble``; options default to the ``ensemble`` section of
params.yaml. Writes ``{valid,test}--ensemble.npy`` (+ ``.names.txt``) and the metrics JSON.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from scipy.optimize import minimize, minimize_scalar

from pipeline.lib import stage
from pipeline.lib.errors import PipelineError
from pipeline.lib.fsutil import sweep_stale, write_json
from pipeline.lib.metrics import apply_temperature, clip_normalize, summary
from pipeline.lib.names import duplicates
from pipeline.lib.predictions import (SPLITS, align_rows, load_predictions, prediction_files,
                                      save_predictions)
from pipeline.lib.records import load_meta
from pipeline.lib.runs import ENSEMBLE, member_name, pseudo_name

CALIBRATIONS = ("temperature", "none")



class EnsembleError(PipelineError, ValueError):
    """The ensemble cannot be built from the given predictions; the message says why."""


class MissingPredictionsError(PipelineError, FileNotFoundError):
    """Some prediction files do not exist; the message lists every one of them."""


@dataclass
class Model:
    """One net's predictions: OOF rows in ``valid_names`` order, test rows in test order."""

    net: str
    valid: np.ndarray
    test: np.ndarray


# ------------------------------------------------------------------------------ weights


def fit_weights(valid_probs: Sequence[np.ndarray], y_true_idx: np.ndarray) -> np.ndarray:
    """Non-negative weights summing to 1 that minimize the NDSB log loss of the blend.

    Each model's rows are first clipped and renormalized as the metric does, so the blend's
    rows sum to 1 and only the true-class probabilities matter: ``Q[n, i] = P_i[n, y_n]``.
    """
    if len(valid_probs) == 1:
        return np.ones(1)
    y = np.asarray(y_true_idx)
    q = np.stack([clip_normalize(p)[np.arange(len(y)), y] for p in valid_probs], axis=1)

    # SLSQP may probe slightly outside the bounds; the floor keeps log() finite there.
    def loss(w: np.ndarray) -> float:
        return float(-np.mean(np.log(np.maximum(q @ w, 1e-300))))

    def grad(w: np.ndarray) -> np.ndarray:
        return -np.mean(q / np.maximum(q @ w, 1e-300)[:, None], axis=0)

    m = q.shape[1]
    result = minimize(loss, np.full(m, 1.0 / m), jac=grad, method="SLSQP",
                      bounds=[(0.0, 1.0)] * m, options={"ftol": 1e-12, "maxiter": 500},
                      constraints=[{"type": "eq", "fun": lambda w: w.sum() - 1.0,
                                    "jac": lambda w: np.ones_like(w)}])
    # SLSQP leaves round-off like 1e-17 (or -1e-17) on dropped models: make those exactly 0.
    fitted = np.where(result.x > 1e-9, result.x, 0.0)
    fitted = fitted / fitted.sum() if fitted.sum() > 0 else np.full(m, 1.0 / m)
    # Guard against an optimizer hiccup: never return something worse than a single model.
    candidates = [fitted] + list(np.eye(m))
    return min(candidates, key=loss)


def blend(probs: Sequence[np.ndarray], weights: Sequence[float]) -> np.ndarray:
    """Weighted sum of the models' (clipped, renormalized) probability matrices."""
    return sum(w * clip_normalize(p) for w, p in zip(weights, probs) if w > 0)


def blend_models(models: Sequence[Model], y_true_idx: np.ndarray
             ) -> tuple[np.ndarray, np.ndarray, np.ndarray, dict[str, Any]]:
    """Fit weights on OOF data; return ``(weights, valid_blend, test_blend, metrics)``."""
    valid = [m.valid for m in models]
    weights = fit_weights(valid, y_true_idx)
    valid_blend = blend(valid, weights)
    test_blend = blend([m.test for m in models], weights)
    metrics = {
        "nets": [m.net for m in models],
        "weights": {m.net: float(w) for m, w in zip(models, weights)},
        "models": {m.net: summary(y_true_idx, m.valid) for m in models},
        "ensemble": summary(y_true_idx, valid_blend),
        "n_valid": int(len(y_true_idx)),
        "n_test": int(len(test_blend)),
    }
    return weights, valid_blend, test_blend, metrics


# ------------------------------------------------------------------------------ calibration


def fit_temperature(probs: np.ndarray, y_true_idx: np.ndarray) -> float:
    """The ``T`` in [0.05, 20] minimizing the log loss of :func:`apply_temperature`.

    The loss is convex in ``1/T`` (a log-sum-exp of a linear function of it), so a bounded
    scalar search finds the optimum.
    """
    y = np.asarray(y_true_idx)
    logp = np.log(clip_normalize(probs))

    def loss(inv_t: float) -> float:
        z = logp * inv_t
        z -= z.max(axis=1, keepdims=True)
        return float(np.mean(np.log(np.exp(z).sum(axis=1)) - z[np.arange(len(y)), y]))

    result = minimize_scalar(loss, bounds=(0.05, 20.0), method="bounded",
                             options={"xatol": 1e-6})
    return float(1.0 / result.x)


def calibrate(valid: np.ndarray, test: np.ndarray, y_true_idx: np.ndarray,
              row_folds: np.ndarray) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    """(cross-fitted OOF rows, test rows, metrics) of temperature calibration.

    Fold k's rows get the ``T`` fitted on the other folds' rows; with a single fold there is
    nothing to cross-fit on, so its rows stay as they are and only the test rows are calibrated
    (``cross_fitted: false`` says so).
    """
    y = np.asarray(y_true_idx)
    folds = sorted({int(k) for k in row_folds})
    overall = fit_temperature(valid, y)
    out = np.array(valid, dtype=np.float64, copy=True)
    per_fold: dict[str, float] = {}
    if len(folds) > 1:
        for k in folds:
            rows = row_folds == k
            per_fold[str(k)] = fit_temperature(valid[~rows], y[~rows])
            out[rows] = apply_temperature(valid[rows], per_fold[str(k)])
    before = summary(y, valid)["logloss"]
    info = {"method": "temperature", "temperature": overall, "fold_temperatures": per_fold,
            "cross_fitted": len(folds) > 1, "oof_logloss_before": before,
            "oof_logloss_after": summary(y, out)["logloss"],
            "oof_logloss_after_in_sample": summary(y, apply_temperature(valid, overall))[
                "logloss"]}
    return out, apply_temperature(test, overall), info


# ------------------------------------------------------------------------------ loading


def resolve_folds(folds: int | Sequence[int] | None, n_folds: int) -> list[int]:
    """``None`` -> all ``n_folds`` folds; ``K`` -> folds ``0..K-1``; a list is kept as given."""
    if folds is None:
        chosen = list(range(n_folds))
    elif isinstance(folds, (list, tuple)):
        chosen = [int(k) for k in folds]
    else:
        chosen = list(range(int(folds)))
    bad = [k for k in chosen if not 0 <= k < n_folds]
    if not chosen or bad or duplicates(chosen):
        raise EnsembleError(f"folds {folds!r} invalid: meta.json has folds 0..{n_folds - 1}")
    return chosen


def expected_files(directory: str | os.PathLike, nets: Sequence[str],
                   folds: Sequence[int]) -> list[Path]:
    """Every file the ensemble reads: both splits, ``.npy`` and ``.names.txt``, per model."""
    return [path for net in nets for fold in folds for split in SPLITS
            for path in prediction_files(directory, split, net, fold)]


def locate(directory: str | os.PathLike, member: str, folds: Sequence[int]) -> Path:
    """The folder holding ``member``'s predictions: ``directory`` or one of its subfolders.

    The first and second training rounds write to subfolders of their own (``round1``,
    ``round2``): a stage that makes pseudo-labels from the first round's files must not
    depend on the second round's. Without any file, ``directory`` (the error names it).
    """
    directory = Path(directory)
    folders = [directory] + (sorted(d for d in directory.iterdir() if d.is_dir())
                             if directory.is_dir() else [])
    found = [d for d in folders
             if any(prediction_files(d, "valid", member, k)[0].is_file() for k in folds)]
    if len(found) > 1:
        raise EnsembleError(f"{member}: prediction files in several folders "
                            f"({', '.join(map(str, found))}); remove the stale ones")
    return found[0] if found else directory


def check_files(directory: str | os.PathLike, nets: Sequence[str], folds: Sequence[int]) -> None:
    """Raise :class:`MissingPredictionsError` listing every missing prediction file at once."""
    missing = [str(p) for net in nets
               for p in expected_files(locate(directory, net, folds), [net], folds)
               if not p.is_file()]
    if missing:
        raise MissingPredictionsError(
            f"{len(missing)} prediction file(s) missing (run predict for these models):\n  "
            + "\n  ".join(missing))


def load_model(directory: str | os.PathLike, net: str, folds: Sequence[int],
               valid_order: Sequence[str], test_order: Sequence[str], n_classes: int) -> Model:
    """Read one net's fold predictions; OOF rows in ``valid_order``, fold-mean test rows."""
    valid_parts = [load_predictions(directory, "valid", net, k) for k in folds]
    probs = np.concatenate([p for p, _ in valid_parts])
    names = [n for _, part in valid_parts for n in part]
    _check_classes(net, probs, n_classes)
    valid = align_rows(probs, names, valid_order, f"{net} valid predictions of folds {folds}",
                       f"the train images of folds {folds}")
    test = np.zeros((len(test_order), n_classes))
    for k in folds:
        fold_probs, fold_names = load_predictions(directory, "test", net, k)
        _check_classes(f"{net} fold {k}", fold_probs, n_classes)
        test += align_rows(fold_probs, fold_names, test_order,
                           f"{net} fold {k} test predictions", "the meta.json test images")
    # float32 like the files: the full NDSB test set is 130k x 121 per net.
    return Model(net, valid.astype(np.float32), (test / len(folds)).astype(np.float32))


def _check_classes(what: str, probs: np.ndarray, n_classes: int) -> None:
    if probs.shape[1] != n_classes:
        raise EnsembleError(f"{what}: {probs.shape[1]} probability columns, meta.json has "
                            f"{n_classes} classes")


def check_settings(nets: Sequence[str], seeds: Sequence[int] | None, calibration: str) -> None:
    """Raise one :class:`EnsembleError` naming every bad setting."""
    problems = []
    if not nets or duplicates(nets):
        problems.append(f"need a list of distinct nets (params ensemble.nets or --nets), got "
                        f"{list(nets)!r}")
    if seeds is not None:
        seeds = list(seeds)
        if not seeds or duplicates(seeds) or not all(
                isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in seeds):
            problems.append(f"models.seeds must be a non-empty list of distinct integers >= 0 "
                            f"(or null), got {seeds!r}")
    if calibration not in CALIBRATIONS:
        problems.append(f"ensemble.calibration must be one of {CALIBRATIONS}, got "
                        f"{calibration!r}")
    if problems:
        raise EnsembleError("; ".join(problems))


def average_seeds(net: str, members: Sequence[Model]) -> Model:
    """One model of ``net``: its seeds' predictions averaged image by image."""
    if len(members) == 1:
        return Model(net, members[0].valid, members[0].test)
    valid = np.mean([clip_normalize(m.valid) for m in members], axis=0)
    test = np.mean([clip_normalize(m.test) for m in members], axis=0)
    return Model(net, valid.astype(np.float32), test.astype(np.float32))


def seed_metrics(members: dict[str, Sequence[Model]], models: Sequence[Model],
                 y_true_idx: np.ndarray) -> dict[str, Any]:
    """Per net: each seed's OOF log loss, their mean, and the seed average's (the gain)."""
    out = {}
    for model in models:
        single = {m.net: summary(y_true_idx, m.valid)["logloss"] for m in members[model.net]}
        averaged = summary(y_true_idx, model.valid)["logloss"]
        out[model.net] = {"members": single, "mean_single": float(np.mean(list(single.values()))),
                          "averaged": averaged,
                          "gain": float(np.mean(list(single.values()))) - averaged}
    return out


def ensemble(nets: Sequence[str], folds: int | Sequence[int] | None,
        predictions_dir: str | os.PathLike, records: str | os.PathLike,
        metrics_path: str | os.PathLike, out_dir: str | os.PathLike | None = None,
        seeds: Sequence[int] | None = None, calibration: str = "none",
        pseudo_nets: Sequence[str] | None = None) -> dict[str, Any]:
    """Load every model, blend, calibrate, write the ensemble predictions and metrics.

    The blend goes to ``out_dir`` (default: ``predictions_dir``); DVC wants it apart from the
    per-model files, which are the outputs of other stages. ``pseudo_nets``: nets whose second
    round (``{net}-pl``) is blended as nets of their own. Returns the metrics.
    """
    out_dir = predictions_dir if out_dir is None else out_dir
    nets = list(nets) + [pseudo_name(n) for n in (pseudo_nets or [])]
    check_settings(nets, seeds, calibration)
    grid = {net: [member_name(net, s) for s in seeds] if seeds is not None else [net]
            for net in nets}
    info = load_meta(records)
    chosen = resolve_folds(folds, int(info["folds"]))
    check_files(predictions_dir, [m for net in nets for m in grid[net]], chosen)
    train = [t for t in info["train"] if int(t["fold"]) in set(chosen)]
    valid_order = [t["name"] for t in train]
    y = np.array([int(t["label"]) for t in train], dtype=np.int64)
    test_order = [t["name"] for t in info["test"]]
    try:
        members = {net: [load_model(locate(predictions_dir, m, chosen), m, chosen, valid_order,
                                    test_order, len(info["classes"])) for m in grid[net]]
                   for net in nets}
    except ValueError as exc:  # misaligned rows: say so as an ensemble problem
        raise EnsembleError(str(exc)) from None
    models = [average_seeds(net, members[net]) for net in nets]
    _, valid_blend, test_blend, metrics = blend_models(models, y)
    metrics["folds"] = chosen
    if seeds is not None:
        metrics["seeds"] = seed_metrics(members, models, y)
    if calibration == "temperature":
        row_folds = np.array([int(t["fold"]) for t in train])
        valid_blend, test_blend, metrics["calibration"] = calibrate(valid_blend, test_blend, y,
                                                                    row_folds)
        metrics["uncalibrated"] = metrics["ensemble"]
        metrics["ensemble"] = summary(y, valid_blend)
    sweep_stale("ensemble", out_dir, Path(metrics_path).parent)
    save_predictions(out_dir, "valid", ENSEMBLE, None, valid_blend, valid_order)
    save_predictions(out_dir, "test", ENSEMBLE, None, test_blend, test_order)
    write_json(metrics_path, metrics)
    return metrics


def _run(cfg, args) -> str:
    paths, models = cfg.paths, cfg.models
    metrics = ensemble(models.nets, models.folds, paths.models(1).parent, paths.records,
                       paths.metrics_file("ensemble"), paths.ensemble, models.seeds,
                       cfg.ensemble.calibration, models.pseudo_nets)
    weights = ", ".join(f"{net} {w:.3f}" for net, w in metrics["weights"].items())
    lines = [f"ensemble OOF logloss {metrics['ensemble']['logloss']:.5f} "
             f"accuracy {metrics['ensemble']['accuracy']:.4f}; weights: {weights}"]
    if "calibration" in metrics:
        c = metrics["calibration"]
        lines.append(f"calibration: temperature {c['temperature']:.3f}; OOF log loss "
                     f"{c['oof_logloss_before']:.5f} -> {c['oof_logloss_after']:.5f} "
                     "(cross-fitted)")
    for net, seeds in metrics.get("seeds", {}).items():
        lines.append(f"{net}: {len(seeds['members'])} seeds, mean single-seed OOF log loss "
                     f"{seeds['mean_single']:.5f} -> averaged {seeds['averaged']:.5f}")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> None:
    stage.run("ensemble", ("ensemble", "models", "paths"), _run, argv, doc=__doc__)


if __name__ == "__main__":
    main()

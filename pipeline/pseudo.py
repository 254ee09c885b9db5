"""Pseudo-labels: soft targets for the test images, one set per fold, for a second round.

``python -m pipeline.pseudo --nets A B --folds 0 1 2 --seeds 0`` (DVC passes the ``models``
grid). NDSB's first place trained on test images labelled with its ensemble's predicted
probabilities (soft targets), mixed into every batch; this stage writes those targets and the
train stage's ``--pseudo`` option mixes them in (``pseudo.fraction`` of each batch).

No leakage: the targets for fold k are the mean of the *fold-k* models' test predictions
(every net and seed of the first round), and a fold-k model never saw fold k's validation
images. So a second-round model of fold k learns nothing about its own validation images, not
even through the targets, and its out-of-fold log loss stays honest. (An ensemble over all
folds would carry every labelled image into every fold's targets.)

``temperature`` < 1 sharpens the targets (``p ** (1/T)``, renormalized), > 1 softens them;
1 keeps the averaged probabilities. Writes ``{out}/test--pseudo--fold{k}.npy`` (+ names) and
``metrics/pseudo.json`` (how confident the targets are, how much the folds agree).
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from pipeline.lib import stage
from pipeline.lib.errors import PipelineError
from pipeline.lib.fsutil import sweep_stale, write_json
from pipeline.lib.metrics import apply_temperature, clip_normalize
from pipeline.lib.names import duplicates
from pipeline.lib.predictions import (align_rows, load_predictions, prediction_files,
                                      save_predictions)
from pipeline.lib.records import load_meta
from pipeline.lib.runs import PSEUDO_TARGETS, member_name




class PseudoError(PipelineError, ValueError):
    """The pseudo-labels cannot be made; the message says why and what to do."""


def check_settings(nets: Sequence[str], folds: Sequence[int], seeds: Sequence[int] | None,
                   temperature: Any, fraction: Any, n_folds: int) -> None:
    """Raise one :class:`PseudoError` naming every bad setting."""
    problems = []
    if not nets or duplicates(list(nets)):
        problems.append(f"need a list of distinct first-round nets (--nets), got {list(nets)!r}")
    if not folds or any(not 0 <= k < n_folds for k in folds) or duplicates(list(folds)):
        problems.append(f"folds {folds!r} invalid: meta.json has folds 0..{n_folds - 1}")
    if seeds is not None and (not seeds or duplicates(list(seeds))):
        problems.append(f"models.seeds must be a non-empty list of distinct seeds, got {seeds!r}")
    if not isinstance(temperature, (int, float)) or isinstance(temperature, bool) \
            or not temperature > 0:
        problems.append(f"pseudo.temperature must be > 0, got {temperature!r}")
    if not isinstance(fraction, (int, float)) or isinstance(fraction, bool) \
            or not 0 <= fraction <= 1:
        problems.append(f"pseudo.fraction must be in [0, 1], got {fraction!r}")
    if problems:
        raise PseudoError("; ".join(problems))


def fold_targets(directory: str | os.PathLike, members: Sequence[str], fold: int,
                 test_order: Sequence[str], temperature: float) -> np.ndarray:
    """The mean test prediction of ``members``' fold-``fold`` models, rows in ``test_order``."""
    parts = []
    for member in members:
        probs, names = load_predictions(directory, "test", member, fold)
        parts.append(clip_normalize(align_rows(probs, names, test_order,
                                               f"{member} fold {fold} test predictions",
                                               "the meta.json test images")))
    return apply_temperature(np.mean(parts, axis=0), temperature).astype(np.float32)


def pseudo(nets: Sequence[str], folds: Sequence[int] | None, seeds: Sequence[int] | None,
           predictions_dir: str | os.PathLike, records: str | os.PathLike,
           out: str | os.PathLike, temperature: float = 1.0, fraction: float = 0.25,
           metrics_path: str | os.PathLike | None = None) -> dict[str, Any]:
    """Write the soft targets of every fold; return (and write) their metrics."""
    meta = load_meta(records)
    n_folds = int(meta["folds"])
    folds = list(range(n_folds)) if folds is None else [int(k) for k in folds]
    check_settings(nets, folds, seeds, temperature, fraction, n_folds)
    members = [member_name(n, s) for n in nets for s in (seeds if seeds is not None else [None])]
    missing = [str(p) for m in members for k in folds
               for p in prediction_files(predictions_dir, "test", m, k) if not p.is_file()]
    if missing:
        raise PseudoError(f"{len(missing)} test prediction file(s) missing (run predict for "
                          "these models first): " + ", ".join(missing))
    test_order = [t["name"] for t in meta["test"]]
    if not test_order:
        raise PseudoError(f"{records}/meta.json lists no test images to pseudo-label")
    try:
        targets = {k: fold_targets(predictions_dir, members, k, test_order, temperature)
                   for k in folds}
    except ValueError as exc:  # misaligned or mismatched rows
        raise PseudoError(str(exc)) from None
    sweep_stale("pseudo", out, Path(metrics_path).parent if metrics_path else None)
    for k, t in targets.items():
        save_predictions(out, "test", PSEUDO_TARGETS, k, t, test_order)
    top = {k: t.argmax(axis=1) for k, t in targets.items()}
    metrics = {
        "members": members, "folds": folds, "temperature": temperature, "fraction": fraction,
        "test_images": len(test_order),
        "mean_max_probability": {str(k): float(t.max(axis=1).mean())
                                 for k, t in targets.items()},
        "mean_entropy": {str(k): float(-(t * np.log(np.maximum(t, 1e-15))).sum(1).mean())
                         for k, t in targets.items()},
        # How often two folds' targets name the same class: low agreement = noisy targets.
        "fold_agreement": float(np.mean([np.mean(top[a] == top[b]) for a in folds
                                         for b in folds if a < b])) if len(folds) > 1 else 1.0,
    }
    if metrics_path is not None:
        write_json(metrics_path, metrics)
    return metrics


def _run(cfg, args) -> str:
    paths = cfg.paths
    metrics = pseudo(cfg.models.nets, cfg.models.folds, cfg.models.seeds, paths.models(1),
                     paths.records, paths.pseudo, cfg.pseudo.temperature, cfg.pseudo.fraction,
                     paths.metrics_file("pseudo"))
    confidence = ", ".join(f"fold {k} {v:.3f}" for k, v in metrics["mean_max_probability"].items())
    return (f"pseudo-labels of {metrics['test_images']} test images from "
            f"{len(metrics['members'])} model(s) per fold; mean top probability: {confidence}; "
            f"fold agreement {metrics['fold_agreement']:.3f}")


def main(argv: Sequence[str] | None = None) -> None:
    stage.run("pseudo", ("pseudo", "models", "paths"), _run, argv, doc=__doc__)


if __name__ == "__main__":
    main()

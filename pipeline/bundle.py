"""Package the trained ensemble as one model bundle that classifies new samples anywhere.

``python -m pipeline.bundle`` (or ``dvc repro bundle``) reads what the pipeline produced:

* ``metrics/ensemble.json``: the blend weights of the nets, the folds, the temperature;
* every model of a net with a positive weight (each seed of ``models.seeds``, each fold):
  its checkpoint (``model.json`` + ``model.params``, what predict loaded), the TTA views
  predict drew for it (``tta`` section, the model's training ranges when ``tta.ranges`` is
  empty) and predict's INT8 decision (``metrics/predict--...json``); an INT8 model also gets
  its calibration images from the fold's training records;
* the ensemble's out-of-fold predictions (``valid--ensemble.npy``, calibrated and
  cross-fitted) with the labels, to fit per-class thresholds for ``bundle.target_precision``
  (:mod:`pipeline.lib.thresholds`);

and writes ``bundle.out`` (a folder) and ``bundle.out`` + ``.tar`` (the same as one file),
laid out and verified as :mod:`pipeline.lib.bundle` describes, plus ``metrics/bundle.json``
(the thresholds' effect out of fold). Classify new images with
``python -m pipeline.classify BUNDLE INPUT... --out FILE``.
"""
from __future__ import annotations

import datetime
import subprocess
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from pipeline.lib import stage
from pipeline.lib.bundle import BundleError

PREPROCESSING_KEYS = ("size", "background", "whiten_background", "format")


def git_state(root: Path) -> dict[str, Any]:
    """The commit the code was at and whether tracked files differed from it (None, None
    outside a git work tree or without git)."""
    def git(*args: str) -> str | None:
        try:
            done = subprocess.run(["git", *args], cwd=root, capture_output=True, text=True,
                                  timeout=30)
        except (OSError, subprocess.SubprocessError):
            return None
        return done.stdout.strip() if done.returncode == 0 else None

    commit = git("rev-parse", "HEAD")
    status = git("status", "--porcelain", "--untracked-files=no") if commit else None
    return {"git_commit": commit, "git_dirty": None if status is None else bool(status)}


def oof_labels(meta: dict[str, Any], names: Sequence[str]) -> np.ndarray:
    """The class index of each out-of-fold image ``names`` (train images of meta.json)."""
    label = {t["name"]: int(t["label"]) for t in meta["train"]}
    missing = [n for n in names if n not in label]
    if missing:
        raise BundleError(f"the ensemble's out-of-fold predictions name {len(missing)} images "
                          f"the records do not have (e.g. {missing[0]!r}): rerun the ensemble "
                          "stage (dvc repro ensemble)")
    return np.array([label[n] for n in names], dtype=np.int64)


def ensemble_models(ens: dict[str, Any], nets: Sequence[str], seeds: Sequence[int],
                    calibration: str) -> list[tuple[str, float, list[str]]]:
    """(net, weight, members) of each net the ensemble blends with a positive weight; checks
    that ``metrics/ensemble.json`` describes the models grid of the settings."""
    from pipeline.lib.runs import member_name

    weights = ens.get("weights")
    if not isinstance(weights, dict) or set(weights) != set(nets) or "folds" not in ens:
        raise BundleError(f"metrics/ensemble.json blends {sorted(weights or {})}, the settings "
                          f"{sorted(nets)}: rerun the ensemble stage (dvc repro ensemble)")
    if (calibration == "temperature") != ("calibration" in ens):
        raise BundleError("metrics/ensemble.json was written with another "
                          "ensemble.calibration: rerun the ensemble stage (dvc repro ensemble)")
    # Without seeds (a blend of plain nets, as ``pipeline.ensemble`` allows) a net is its
    # only member; the metrics then have no "seeds".
    return [(net, float(w), [member_name(net, s) for s in seeds] if "seeds" in ens else [net])
            for net, w in weights.items() if w > 0]


def make_bundle(out: str | Path, paths, models, tta, ensemble_cfg, data,
                target_precision: float, settings: dict[str, Any] | None = None
                ) -> dict[str, Any]:
    """Write the bundle of the ensemble ``paths`` point at (module docstring); return the
    bundle's metrics. ``models``, ``tta``, ``ensemble_cfg``, ``data``: the typed sections the
    ensemble and its models were made with; ``settings``: what to record as provenance."""
    import tempfile

    from pipeline.lib.fsutil import temp_prefix

    Path(out).parent.mkdir(parents=True, exist_ok=True)
    # The ONNX exports wait beside the bundle until it is built (a killed run's are swept).
    with tempfile.TemporaryDirectory(prefix=temp_prefix(f"{out}.onnx"),
                                     dir=Path(out).parent) as exports:
        return _make_bundle(out, paths, models, tta, ensemble_cfg, data, target_precision,
                            settings, Path(exports))


def _make_bundle(out, paths, models, tta, ensemble_cfg, data, target_precision: float,
                 settings: dict[str, Any] | None, exports: Path) -> dict[str, Any]:
    from pipeline.lib.bundle import archive_path, model_dir_name, thresholds_csv, write_bundle
    from pipeline.lib.checkpoint import load_model, load_spec, run_dir
    from pipeline.lib.inference import prepare_net
    from pipeline.lib.onnxmodel import export_onnx
    from pipeline.lib.fsutil import read_json, sha256, sweep_stale, write_json, write_text
    from pipeline.lib.predictions import load_predictions
    from pipeline.lib.quantize import calibration_images, calibration_plan
    from pipeline.lib.records import RecordReader, fold_indices, load_meta
    from pipeline.lib.runs import ENSEMBLE, artifact_name, pseudo_name, run_name
    from pipeline.lib.thresholds import (METRICS_FILE, apply_thresholds, fit_thresholds,
                                         threshold_array)
    from pipeline.lib.tta import plan as tta_plan

    records = Path(paths.records)
    meta = load_meta(records)
    classes = meta["classes"]
    ens_path = paths.metrics_file("ensemble")
    if not ens_path.is_file():
        raise BundleError(f"{ens_path} not found: run the ensemble stage first "
                          "(dvc repro ensemble)")
    ens = read_json(ens_path)
    nets = list(models.nets) + [pseudo_name(n) for n in models.pseudo_nets]
    blended = ensemble_models(ens, nets, models.seeds, ensemble_cfg.calibration)
    folds = [int(k) for k in ens["folds"]]
    try:
        oof, names = load_predictions(paths.ensemble, "valid", ENSEMBLE)
    except (OSError, ValueError) as err:
        raise BundleError(f"the ensemble's out-of-fold predictions cannot be read ({err}): "
                          "rerun the ensemble stage (dvc repro ensemble)") from None
    y = oof_labels(meta, names)
    thresholds = fit_thresholds(oof, y, classes, target_precision)

    entries, files, missing = [], [], []
    train_reader = None
    for net, weight, members in blended:
        for member in members:
            for fold in folds:
                ck = run_dir(paths.checkpoints, member, fold)
                decided = Path(paths.metrics) / f"{artifact_name('predict', member, fold)}.json"
                if not (ck / "model.json").is_file() or not decided.is_file():
                    missing.append(run_name(member, fold))
                    continue
                spec = load_spec(ck)
                if spec["classes"] != classes or spec["size"] != meta["size"]:
                    raise BundleError(f"{ck} was trained on other records (classes or size "
                                      "differ from meta.json): retrain it")
                about = read_json(decided)
                views = tta_plan(tta.ranges or spec["augment"], tta.n, spec["size"],
                                 tta.method, tta.seed, tta.mean, tta.batch_size,
                                 tta.max_views).matrices
                calib = None
                if about.get("int8_used"):
                    train_idx, _ = fold_indices(meta, fold)
                    picked, transforms = calibration_plan(train_idx, tta.calib_images,
                                                          len(views), tta.seed)
                    train_reader = train_reader or RecordReader(records, "train")
                    images, inverse = calibration_images(train_reader, picked)
                    calib = {"images": images, "inverse": inverse.astype(np.int64),
                             "transforms": transforms.astype(np.int64)}
                rel = model_dir_name(member, fold)
                onnx_file = exports / rel / "model.onnx"
                export_onnx(prepare_net(load_model(ck)[0], "float32"), spec["size"], onnx_file,
                            doc=f"{run_name(member, fold)}: float32 inference net, input "
                                f"(N, 1, {spec['size']}, {spec['size']}), output logits of "
                                f"{len(classes)} classes (bundle.json's order)")
                entries.append({"dir": rel, "net": net, "member": member, "fold": fold,
                                "int8_used": bool(about.get("int8_used")),
                                "int8_guard": about.get("int8_guard"),
                                "valid_logloss": about.get("valid_logloss")})
                files.append((rel, ck, views, calib, onnx_file))
    if missing:
        raise BundleError(f"{len(missing)} model(s) of the ensemble have no checkpoint or no "
                          f"predict metrics: {missing[:5]}: run train and predict for them "
                          "(dvc repro)")

    calibrated = "calibration" in ens
    oof_top = oof.argmax(axis=1)
    kept = apply_thresholds(oof_top, oof.max(axis=1), threshold_array(thresholds))
    info = {
        "classes": classes,
        "preprocessing": {**{k: meta[k] for k in PREPROCESSING_KEYS},
                          "jpeg_quality": data.jpeg_quality, "max_pixels": data.max_pixels,
                          "input": {"invert": True, "scale": 1 / 255,
                                    "layout": "N x 1 x size x size float32"}},
        "tta": {k: v for k, v in tta.as_dict().items() if k not in ("work", "chunk_images")},
        "ensemble": {
            "nets": [{"net": net, "weight": weight,
                      "members": [{"member": m,
                                   "folds": [{"fold": k, "dir": model_dir_name(m, k)}
                                             for k in folds]} for m in members]}
                     for net, weight, members in blended],
            "dropped": sorted(n for n, w in ens["weights"].items() if w <= 0),
            "folds": folds, "calibration": "temperature" if calibrated else "none",
            "temperature": ens["calibration"]["temperature"] if calibrated else None,
            "combine": "per member: mean of its folds' TTA probabilities; per net: mean of "
                       "its members' (clipped, renormalized) probabilities; blend: sum of "
                       "weight x clipped, renormalized net probabilities; then p^(1/T) "
                       "renormalized (the ensemble stage's test predictions)"},
        "models": entries,
        "thresholds": {"target_precision": target_precision,
                       "fitted_on": f"{len(y)} out-of-fold images (calibrated ensemble)",
                       "classes": thresholds},
        "provenance": {
            "created": datetime.datetime.now(datetime.timezone.utc).isoformat(
                timespec="seconds"),
            **git_state(Path.cwd()),
            "oof_logloss": ens["ensemble"]["logloss"],
            "oof_accuracy": ens["ensemble"]["accuracy"],
            "oof_images": int(len(y)),
            "records": {"root": meta.get("root"), "train_images": len(meta["train"]),
                        "folds": meta.get("folds"), "seed": meta.get("seed"),
                        "meta_sha256": sha256(records / "meta.json")},
            "settings": settings or {}},
    }
    reached = [r for r in thresholds if r["threshold"] is not None]
    metrics = {"models": len(entries), "int8_models": sum(e["int8_used"] for e in entries),
               "target_precision": target_precision,
               "classes_with_threshold": len(reached), "classes": len(classes),
               "oof_classified_share": float(kept.mean()),
               "oof_precision_classified": float((oof_top[kept] == y[kept]).mean())
               if kept.any() else None,
               "oof_accuracy_top1": float((oof_top == y).mean())}
    out = Path(out)
    sweep_stale("bundle", out.parent, Path(paths.metrics))
    metrics["id"] = write_bundle(out, info, files)
    metrics["bytes"] = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    metrics["archive"] = str(archive_path(out))
    write_json(paths.metrics_file("bundle"), metrics)
    # The report's copy of each class's threshold, precision and recall (dvc.yaml: a bundle
    # output the report depends on).
    write_text(Path(paths.metrics) / METRICS_FILE, thresholds_csv(thresholds))
    return metrics


def _run(cfg, args) -> str:
    b = cfg.bundle
    settings = {name: getattr(cfg, name).as_dict()
                for name in ("bundle", "models", "tta", "ensemble", "data")}
    m = make_bundle(b.out, cfg.paths, cfg.models, cfg.tta, cfg.ensemble, cfg.data,
                    b.target_precision, settings)
    share = m["oof_classified_share"]
    precision = m["oof_precision_classified"]
    return (f"bundle {b.out} (+ {m['archive']}): {m['models']} models "
            f"({m['int8_models']} INT8), {m['bytes'] / 1e6:.1f} MB; thresholds for precision "
            f"{b.target_precision}: {m['classes_with_threshold']} of {m['classes']} classes "
            f"reach it, out of fold {share:.1%} of the images classified"
            + (f" at precision {precision:.3f}" if precision is not None else ""))


def main(argv: Sequence[str] | None = None) -> None:
    stage.run("bundle", ("bundle", "models", "tta", "ensemble", "data", "paths"), _run, argv,
              doc=__doc__, threads=True)


if __name__ == "__main__":
    main()

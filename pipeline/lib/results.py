"""A run's outputs as tables: what the report stage and the notebooks show, computed one way.

Everything here only *reads* what the stages wrote, through the library modules that define
those files (:mod:`pipeline.lib.records` for ``meta.json`` and the records,
:mod:`pipeline.lib.predictions` for prediction files, :mod:`pipeline.lib.runs` for the
``{kind}--{net}--fold{k}`` names, :mod:`pipeline.lib.metrics` for the log loss), so a table
cannot disagree with the stage that made its data. Loaders return ``pandas.DataFrame`` tables
(one row per image, epoch, model, ...); :mod:`pipeline.lib.figures` draws them.

Where the outputs are comes from the ``report`` section of ``params.yaml`` (:func:`settings`),
resolved against a project root, so the same code reads the outputs of this checkout or of a
run made elsewhere.
"""
from __future__ import annotations

import os
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pandas as pd

from pipeline.lib import settings as settings_mod
from pipeline.lib import records, runs
from pipeline.lib.errors import PipelineError
from pipeline.lib.fsutil import read_json
from pipeline.lib.images import decode, decode_bytes
from pipeline.lib.metrics import ndsb_log_loss, per_class_log_loss
from pipeline.lib.predictions import load_predictions, prediction_files

ENSEMBLE = runs.ENSEMBLE
_CURVE_COLUMNS = ["net", "fold", "epoch", "lr", "train_loss", "valid_logloss", "valid_accuracy",
                  "img_s", "images", "seconds"]
_NEEDS_ENSEMBLE = "run the pipeline up to the ensemble stage first (dvc repro ensemble)"


class ResultsError(PipelineError, ValueError):
    """A run's output is missing, unreadable or does not fit the records it claims to be of."""


# ------------------------------------------------------------------------------ settings


@dataclass(frozen=True)
class ReportSettings:
    """Where a run's outputs are (absolute paths) and how much of them the report shows."""

    root: Path
    records: Path
    checkpoints: Path
    plots: Path
    metrics: Path
    predictions: Path
    ensemble_metrics: Path
    out: Path
    confusion: Path
    samples_per_class: int
    mistakes: int
    seed: int


def settings(root: str | os.PathLike = ".", params_file: str | os.PathLike | None = None
             ) -> ReportSettings:
    """The ``report`` and ``paths`` sections of ``root/params.yaml`` (defaults if that file
    is absent), the paths resolved against ``root``.

    Resolving against ``root`` lets notebooks point at a project that is not the current
    directory (``NDSB_ROOT``). An explicit ``params_file`` must exist; a bad setting anywhere
    in it is a :class:`pipeline.lib.settings.SettingsError`.
    """
    root = Path(root).resolve()
    if params_file is None and not (root / settings_mod.PARAMS_FILE).exists():
        file = None
    else:
        file = Path(params_file) if params_file is not None else root / settings_mod.PARAMS_FILE
    return from_settings(settings_mod.load(("report", "paths"), file), root)


def from_settings(cfg: Any, root: Path) -> ReportSettings:
    """:class:`ReportSettings` of loaded ``report`` and ``paths`` sections under ``root``."""
    paths, report = cfg.paths, cfg.report
    return ReportSettings(
        root=root, records=root / paths.records, checkpoints=root / paths.checkpoints,
        plots=root / paths.plots, metrics=root / paths.metrics,
        predictions=root / paths.predictions,
        ensemble_metrics=root / paths.metrics_file(ENSEMBLE), out=root / paths.reports,
        confusion=root / paths.confusion, samples_per_class=report.samples_per_class,
        mistakes=report.mistakes, seed=report.seed)


# ------------------------------------------------------------------- records and images


def load_meta(cfg: ReportSettings) -> dict[str, Any]:
    """``meta.json`` of the run's records, checked against the record files beside it."""
    return records.load_meta(cfg.records)


def records_table(meta: dict[str, Any]) -> pd.DataFrame:
    """One row per labelled image: record ``index``, ``name``, ``class``, ``label``, ``fold``
    and the original ``width``/``height`` (before ingest's resize)."""
    rows = [{"index": i, "name": r["name"], "class": meta["classes"][r["label"]],
             "label": r["label"], "fold": r.get("fold", -1), "width": r["width"],
             "height": r["height"]} for i, r in enumerate(meta["train"])]
    return pd.DataFrame(rows, columns=["index", "name", "class", "label", "fold", "width",
                                       "height"])


def class_counts(meta: dict[str, Any]) -> pd.DataFrame:
    """Labelled images per class in submission order, with each class's share and per-fold
    counts (``fold0``, ``fold1``, ...) to show that the folds are stratified."""
    table = records_table(meta)
    counts = table.groupby("class").size().reindex(meta["classes"], fill_value=0)
    out = pd.DataFrame({"class": counts.index, "images": counts.to_numpy()})
    out["share"] = out["images"] / max(1, out["images"].sum())
    per_fold = pd.crosstab(table["class"], table["fold"]).reindex(meta["classes"], fill_value=0)
    for fold in per_fold.columns:
        out[f"fold{fold}"] = per_fold[fold].to_numpy()
    return out


def ingest_geometry(meta: dict[str, Any]) -> pd.DataFrame:
    """:func:`records_table` plus what ingest's resize-and-pad did to every image.

    ``scale`` = record size / original longer side (> 1: enlarged), ``fill`` = the fraction of
    the square record covered by the resized image (the rest is background padding).
    """
    table = records_table(meta)
    size = int(meta["size"])
    long_side = table[["width", "height"]].max(axis=1)
    short_side = table[["width", "height"]].min(axis=1)
    table["long_side"] = long_side
    table["aspect"] = long_side / short_side
    table["scale"] = size / long_side
    table["fill"] = np.minimum(1.0, (short_side * table["scale"]).round() / size)
    return table


def sample_indices(meta: dict[str, Any], per_class: int, seed: int = 0
                   ) -> dict[str, list[int]]:
    """Up to ``per_class`` record indices per class, drawn reproducibly from ``seed``."""
    table = records_table(meta)
    rng = np.random.default_rng(seed)
    chosen = {}
    for cls in meta["classes"]:
        members = table.loc[table["class"] == cls, "index"].to_numpy()
        take = min(per_class, len(members))
        chosen[cls] = sorted(int(i) for i in rng.choice(members, size=take, replace=False))
    return chosen


def read_records(records_dir: str | os.PathLike, indices: Sequence[int],
                 split: str = "train") -> list[np.ndarray]:
    """The decoded record images (HxW uint8, as the networks see them before normalization)."""
    reader = records.RecordReader(records_dir, split)
    try:
        return [reader.read(int(i))[1] for i in indices]
    finally:
        reader.close()


def original_path(cfg: ReportSettings, meta: dict[str, Any], name: str, split: str = "train"
                  ) -> Path:
    """Where ingest read image ``name``: ``meta['root']`` (``data.root``) + ``train/``|``test/``;
    from an EcoTaxa export, the record's ``file`` inside the export (a zip's member: the zip
    then, see :func:`read_original`)."""
    folder = Path(meta["root"])
    folder = folder if folder.is_absolute() else cfg.root / folder
    if meta.get("ecotaxa") is None:
        return folder / split / name
    file = next((e.get("file") for e in meta.get(split, []) if e["name"] == name), None)
    return folder if file is None or folder.is_file() else folder / file


def read_original(cfg: ReportSettings, meta: dict[str, Any], name: str, split: str = "train"
                  ) -> np.ndarray | None:
    """The original image decoded exactly as ingest decodes it, or ``None`` if it is gone."""
    path = original_path(cfg, meta, name, split)
    if meta.get("ecotaxa") is not None and path.is_file() and zipfile.is_zipfile(path):
        from pipeline.lib.ecotaxa import read_member

        file = next((e.get("file") for e in meta.get(split, []) if e["name"] == name), None)
        try:
            return decode_bytes(read_member(str(path), file), int(meta["background"])) \
                if file else None
        except ValueError:  # the export changed since ingest: the original is gone
            return None
    if not path.is_file():
        return None
    return decode(str(path), int(meta["background"]))


def border_levels(images: dict[str, Sequence[np.ndarray | None]]) -> pd.DataFrame:
    """Median grey level of each image's outermost ring of pixels, per class key.

    Ingest pads every non-square image with ``data.background``; when the images' own
    background (their border, for organisms that do not touch the edge) is another grey, the
    padding draws a visible frame that the networks can learn from. ``None`` images are skipped.
    """
    rows = []
    for cls, imgs in images.items():
        for img in imgs:
            if img is None:
                continue
            ring = np.concatenate([img[0], img[-1], img[1:-1, 0], img[1:-1, -1]])
            rows.append({"class": cls, "width": img.shape[1], "height": img.shape[0],
                         "border": float(np.median(ring))})
    return pd.DataFrame(rows, columns=["class", "width", "height", "border"])


# ------------------------------------------------------------------------------ training


def _read_json(path: Path) -> Any:
    """A stage's JSON output; a corrupt file is a :class:`ResultsError` naming it."""
    try:
        return read_json(path)
    except ValueError as exc:  # json.JSONDecodeError, UnicodeDecodeError
        raise ResultsError(f"{path} is not valid JSON ({exc}); re-run the stage that wrote it"
                           ) from None


def learning_curves(plots_dir: str | os.PathLike) -> pd.DataFrame:
    """Every ``plots/train--NET--foldK.tsv`` stacked: ``net``, ``fold`` + the per-epoch columns
    (``epoch lr train_loss valid_logloss valid_accuracy img_s images seconds``; the last two
    are missing from runs trained before they were recorded)."""
    frames = []
    for net, fold, path in runs.find(plots_dir, "train", ".tsv"):
        frame = pd.read_csv(path, sep="\t")
        frame.insert(0, "fold", fold)
        frame.insert(0, "net", net)
        frames.append(frame)
    if not frames:
        return pd.DataFrame(columns=_CURVE_COLUMNS)
    return pd.concat(frames, ignore_index=True)


def train_metrics(metrics_dir: str | os.PathLike) -> pd.DataFrame:
    """The final metrics of every training run (``metrics/train--NET--foldK.json``)."""
    rows = [dict(_read_json(path), net=net, fold=fold)
            for net, fold, path in runs.find(metrics_dir, "train", ".json")]
    table = pd.DataFrame(rows)
    if table.empty:
        return table
    first = ["net", "fold", "epochs", "train_loss", "valid_logloss", "valid_accuracy",
             "chance_logloss"]
    return table[[c for c in first if c in table] + [c for c in table if c not in first]]


def run_specs(checkpoints_dir: str | os.PathLike) -> pd.DataFrame:
    """Net, fold, activation and build kwargs of every run, from its checkpoint spec.

    ``model.json`` (final model) when training finished, else the newest ``epoch-*.json`` of a
    run still in progress; ``finished`` says which. Run folders without either are left out.
    """
    rows = []
    for net, fold, run in runs.find_runs(checkpoints_dir):
        epochs = sorted(run.glob("epoch-*.json"))
        spec_path = run / "model.json" if (run / "model.json").exists() else \
            (epochs[-1] if epochs else None)
        if spec_path is None:
            continue
        spec = _read_json(spec_path)
        kwargs = spec.get("kwargs", {})
        rows.append({"net": net, "fold": fold,
                     "act": kwargs.get("act", "?"), "bn": kwargs.get("bn"),
                     "epoch": spec.get("epoch"), "finished": spec_path.name == "model.json",
                     # the fingerprinted train settings leave out the default schedule's name
                     "schedule": (spec.get("train") or {}).get("schedule", "steps"),
                     "kwargs": {k: v for k, v in kwargs.items() if k not in ("classes",)}})
    return pd.DataFrame(rows, columns=["net", "fold", "act", "bn", "epoch", "finished",
                                       "schedule", "kwargs"])


TIME_COLUMNS = ["variant", "net", "seed", "fold", "epoch", "images", "hours", "oof"]


def time_curves(curves: pd.DataFrame, specs: pd.DataFrame | None = None) -> pd.DataFrame:
    """Out-of-fold log loss against training images seen and wall-clock hours, per run.

    From :func:`learning_curves`: one row per (run, epoch) with ``images`` and ``hours`` summed
    over the epochs so far (``hours``: training and validation; an epoch resumed mid-way counts
    the part its last process ran), ``oof`` = the epoch's validation log loss (the fold's
    out-of-fold images, no TTA), ``net`` and ``seed`` from the member name and ``variant`` =
    the net and its learning-rate schedule (``schedule`` of :func:`run_specs`; ``steps`` for a
    run without a checkpoint spec). Runs written before the per-epoch ``images`` and
    ``seconds`` columns existed, or without validation images, are left out.
    """
    needed = {"images", "seconds", "valid_logloss"}
    if curves.empty or not needed <= set(curves):
        return pd.DataFrame(columns=TIME_COLUMNS)
    schedules = {} if specs is None or specs.empty else \
        {(r.net, r.fold): r.schedule for r in specs.itertuples()}
    frames = []
    for (member, fold), run in curves.groupby(["net", "fold"], sort=True):
        run = run.sort_values("epoch")
        if run[list(needed)].isna().any().any():
            continue
        net, seed = runs.parse_member(member)
        frames.append(pd.DataFrame({
            "variant": f"{net}, {schedules.get((member, fold), 'steps')}", "net": net,
            "seed": seed, "fold": fold, "epoch": run["epoch"].values,
            "images": run["images"].cumsum().values,
            "hours": run["seconds"].cumsum().values / 3600, "oof": run["valid_logloss"].values}))
    if not frames:
        return pd.DataFrame(columns=TIME_COLUMNS)
    return pd.concat(frames, ignore_index=True)[TIME_COLUMNS]


def with_activations(curves: pd.DataFrame, specs: pd.DataFrame) -> pd.DataFrame:
    """:func:`learning_curves` with each run's ``act`` from :func:`run_specs` (``?`` when the
    run has no checkpoint spec)."""
    acts = specs[["net", "fold", "act"]] if not specs.empty else \
        pd.DataFrame(columns=["net", "fold", "act"])
    merged = curves.merge(acts, on=["net", "fold"], how="left")
    merged["act"] = merged["act"].fillna("?")
    return merged


def activation_summary(curves: pd.DataFrame, specs: pd.DataFrame) -> pd.DataFrame:
    """Per activation and net: folds trained, final and best validation log loss (fold mean)."""
    trained = with_activations(curves, specs).dropna(subset=["valid_logloss"])
    if trained.empty:
        return pd.DataFrame(columns=["act", "net", "folds", "final_valid_logloss",
                                     "best_valid_logloss"])
    per_run = trained.sort_values("epoch").groupby(["act", "net", "fold"])["valid_logloss"]
    table = pd.DataFrame({"final": per_run.last(), "best": per_run.min()}).reset_index()
    return (table.groupby(["act", "net"])
            .agg(folds=("fold", "nunique"), final_valid_logloss=("final", "mean"),
                 best_valid_logloss=("best", "mean"))
            .reset_index())


# ---------------------------------------------------------------------------- prediction


def tta_curves(metrics_dir: str | os.PathLike) -> pd.DataFrame:
    """Validation log loss against the number of TTA views, per model, from
    ``metrics/predict--NET--foldK.json``: ``net fold n logloss``; ``n = 0`` is the plain image
    (``valid_logloss_no_tta``). Models of fold -1 (no validation images) are left out."""
    rows = []
    for net, fold, path in runs.find(metrics_dir, "predict", ".json"):
        metrics = _read_json(path)
        if "valid_logloss_no_tta" not in metrics:
            continue
        rows.append({"net": net, "fold": fold, "n": 0,
                     "logloss": metrics["valid_logloss_no_tta"]})
        rows += [{"net": net, "fold": fold, "n": int(n), "logloss": loss}
                 for n, loss in metrics.get("valid_logloss_by_n", {}).items()]
    return pd.DataFrame(rows, columns=["net", "fold", "n", "logloss"])


def ensemble_summary(path: str | os.PathLike) -> pd.DataFrame:
    """One row per blended net (weight, OOF log loss and accuracy) plus the blend itself,
    from the ensemble stage's metrics file."""
    path = Path(path)
    if not path.is_file():
        raise ResultsError(f"{path} not found: {_NEEDS_ENSEMBLE}")
    metrics = _read_json(path)
    try:
        rows = [{"model": net, "weight": metrics["weights"][net], **metrics["models"][net]}
                for net in metrics["nets"]]
        rows.append({"model": ENSEMBLE, "weight": float(sum(metrics["weights"].values())),
                     **metrics["ensemble"]})
    except (KeyError, TypeError, AttributeError) as exc:
        raise ResultsError(f"{path} is not an ensemble metrics file (no {exc}); "
                           f"{_NEEDS_ENSEMBLE}") from None
    return pd.DataFrame(rows, columns=["model", "weight", "logloss", "accuracy"])


def technique_summary(path: str | os.PathLike) -> pd.DataFrame:
    """Out-of-fold log loss after each step of the ensemble stage: what each technique bought.

    Rows, in order: every seed of a net (when the grid has seeds), each net (its seeds
    averaged), the weighted blend, and the calibrated blend (cross-fitted: no row calibrated
    with its own label). ``gain`` is the drop in log loss from the step before it.
    """
    path = Path(path)
    if not path.is_file():
        raise ResultsError(f"{path} not found: {_NEEDS_ENSEMBLE}")
    metrics = _read_json(path)
    rows: list[dict[str, Any]] = []
    try:
        for net in metrics["nets"]:
            seeds = metrics.get("seeds", {}).get(net)
            if seeds:
                rows += [{"step": f"{member} (one seed)", "logloss": loss, "gain": None}
                         for member, loss in seeds["members"].items()]
                rows.append({"step": f"{net}: {len(seeds['members'])} seeds averaged",
                             "logloss": seeds["averaged"], "gain": seeds["gain"]})
            else:
                rows.append({"step": net, "logloss": metrics["models"][net]["logloss"],
                             "gain": None})
        best = min(metrics["models"][net]["logloss"] for net in metrics["nets"])
        blend = metrics.get("uncalibrated", metrics["ensemble"])["logloss"]
        rows.append({"step": "blend of the nets (OOF-fitted weights)", "logloss": blend,
                     "gain": best - blend})
        if "calibration" in metrics:
            cal = metrics["calibration"]
            rows.append({"step": f"temperature {cal['temperature']:.3g} (cross-fitted)",
                         "logloss": cal["oof_logloss_after"],
                         "gain": cal["oof_logloss_before"] - cal["oof_logloss_after"]})
    except (KeyError, TypeError, AttributeError) as exc:
        raise ResultsError(f"{path} is not an ensemble metrics file (no {exc}); "
                           f"{_NEEDS_ENSEMBLE}") from None
    return pd.DataFrame(rows, columns=["step", "logloss", "gain"])


@dataclass
class Oof:
    """The ensemble's out-of-fold predictions joined with the labels of ``meta.json``."""

    names: list[str]
    y: np.ndarray          # true class index per row
    probs: np.ndarray      # (N, K) in meta ``classes`` order
    classes: list[str]
    index: np.ndarray      # record index (position in meta["train"]) per row


def load_oof(cfg: ReportSettings, meta: dict[str, Any]) -> Oof:
    """``predictions/valid--ensemble.npy`` (+ names), labelled from ``meta.json`` by name."""
    npy, names_file = prediction_files(cfg.predictions, "valid", ENSEMBLE)
    missing = [str(p) for p in (npy, names_file) if not p.is_file()]
    if missing:
        raise ResultsError(f"{' and '.join(missing)} not found: {_NEEDS_ENSEMBLE}")
    try:
        probs, names = load_predictions(cfg.predictions, "valid", ENSEMBLE)
    except ValueError as exc:
        raise ResultsError(f"{npy}: {exc}") from None
    classes = list(meta["classes"])
    if probs.shape[1] != len(classes):
        raise ResultsError(f"{npy} has {probs.shape[1]} class columns, meta.json {len(classes)}"
                           " classes: the predictions are from other records")
    position = {r["name"]: i for i, r in enumerate(meta["train"])}
    unknown = [n for n in names if n not in position]
    if unknown:
        raise ResultsError(f"{len(unknown)} ensemble rows are not train images of meta.json, "
                           f"e.g. {unknown[:3]!r}: the predictions are from other records")
    index = np.array([position[n] for n in names], dtype=np.int64)
    y = np.array([meta["train"][i]["label"] for i in index], dtype=np.int64)
    return Oof(names, y, np.asarray(probs, dtype=np.float64), classes, index)


def oof_table(oof: Oof) -> pd.DataFrame:
    """One row per OOF image: name, actual and predicted class, the predicted class's
    probability (``confidence``) and the true class's (``p_true``)."""
    rows = np.arange(len(oof.y))
    predicted = oof.probs.argmax(axis=1)
    return pd.DataFrame({
        "name": oof.names, "index": oof.index,
        "actual": [oof.classes[k] for k in oof.y],
        "predicted": [oof.classes[k] for k in predicted],
        "confidence": oof.probs[rows, predicted], "p_true": oof.probs[rows, oof.y]})


def confusion_pairs(oof: Oof) -> pd.DataFrame:
    """``actual,predicted`` class names per OOF image: the data of ``dvc plots``' confusion
    template."""
    return oof_table(oof)[["actual", "predicted"]]


def confusion_matrix(oof: Oof) -> pd.DataFrame:
    """Counts: rows = actual class, columns = predicted class, both in submission order."""
    pairs = confusion_pairs(oof)
    table = pd.crosstab(pairs["actual"], pairs["predicted"])
    table = table.reindex(index=oof.classes, columns=oof.classes, fill_value=0)
    table.index.name, table.columns.name = "actual", "predicted"
    return table


def per_class_logloss(oof: Oof) -> pd.DataFrame:
    """NDSB log loss and accuracy per true class
    (:func:`pipeline.lib.metrics.per_class_log_loss`), worst first."""
    scores = per_class_log_loss(oof.y, oof.probs, oof.classes)
    table = pd.DataFrame([{"class": c, **s} for c, s in scores.items()],
                         columns=["class", "n", "logloss", "accuracy"])
    return table.sort_values("logloss", ascending=False, ignore_index=True)


def confident_mistakes(oof: Oof, k: int) -> pd.DataFrame:
    """The ``k`` wrong OOF predictions made with the highest confidence, with each image's
    own NDSB log loss (:func:`pipeline.lib.metrics.ndsb_log_loss` of that row)."""
    table = oof_table(oof)
    wrong = table[table["actual"] != table["predicted"]]
    top = wrong.sort_values("confidence", ascending=False).head(k).copy()
    top["logloss"] = [ndsb_log_loss(oof.y[[i]], oof.probs[[i]]) for i in top.index]
    return top.reset_index(drop=True)

"""Read a run's outputs into tables and figures; write a static HTML report of the run.

The notebooks in ``notebooks/`` and the ``report`` stage share this module, so both show the
same numbers computed the same way. Everything here only *reads* what the stages wrote, through
the stages' own modules (:mod:`pipeline.lib.records`, :mod:`pipeline.lib.predictions`,
:mod:`pipeline.score`, :mod:`pipeline.ingest`):

* loaders return ``pandas.DataFrame`` tables (one row per image, epoch, model, ...);
* ``plot_*`` functions take those tables and return a ``matplotlib.figure.Figure`` (made
  without pyplot: no global state, no display needed), or ``None`` when there is nothing to
  compare;
* :func:`write_report` / ``python -m pipeline.report`` renders them to ``reports/index.html``
  + PNGs, so a run can be looked at without Jupyter, and writes ``plots/confusion.csv`` (one
  ``actual,predicted`` row per out-of-fold image, class names) for ``dvc plots show``.

Paths come from the ``report`` section of ``params.yaml`` (:func:`settings`), resolved against
a project root, so the same code reads the outputs of this checkout or of a run elsewhere.
"""
from __future__ import annotations

import argparse
import html
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np
import pandas as pd

from pipeline.lib import params as params_mod
from pipeline.lib import records
from pipeline.lib.fsutil import atomic_path, read_json, write_text
from pipeline.lib.images import decode
from pipeline.lib.predictions import load_predictions
from pipeline.lib.metrics import ndsb_log_loss, per_class_log_loss

if TYPE_CHECKING:
    from matplotlib.figure import Figure

DEFAULTS: dict[str, Any] = {
    "records": "data/records",
    "checkpoints": "checkpoints",
    "plots": "plots",
    "metrics": "metrics",
    "predictions": "predictions",
    "ensemble_metrics": "metrics/ensemble.json",
    "out": "reports",
    "confusion": "plots/confusion.csv",
    "samples_per_class": 6,
    "mistakes": 12,
    "seed": 0,
}
ENSEMBLE = "ensemble"
_TRAIN_TSV = re.compile(r"^train--(?P<net>.+)--fold(?P<fold>-?\d+)\.tsv$")
_PREDICT_JSON = re.compile(r"^predict--(?P<net>.+)--fold(?P<fold>-?\d+)\.json$")
_TRAIN_JSON = re.compile(r"^train--(?P<net>.+)--fold(?P<fold>-?\d+)\.json$")
_RUN_DIR = re.compile(r"^(?P<net>.+)--fold(?P<fold>-?\d+)$")


# ------------------------------------------------------------------------------ settings


@dataclass(frozen=True)
class Settings:
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
             ) -> Settings:
    """The ``report`` section of ``root/params.yaml`` (defaults if absent), paths under ``root``.

    Relative paths are resolved against ``root`` so notebooks can point at a project that is
    not the current directory (``NDSB_ROOT``).
    """
    root = Path(root).resolve()
    path = Path(params_file) if params_file is not None else root / params_mod.PARAMS_FILE
    cfg = params_mod.section("report", DEFAULTS, path) if path.exists() else dict(DEFAULTS)
    paths = {k: root / cfg[k] for k in ("records", "checkpoints", "plots", "metrics",
                                         "predictions", "ensemble_metrics", "out", "confusion")}
    return Settings(root=root, samples_per_class=int(cfg["samples_per_class"]),
                    mistakes=int(cfg["mistakes"]), seed=int(cfg["seed"]), **paths)


# ---------------------------------------------------------------------------- the data


def load_meta(cfg: Settings) -> dict[str, Any]:
    """``meta.json`` of the run's records, checked against the record files by the reader."""
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


def original_path(cfg: Settings, meta: dict[str, Any], name: str, split: str = "train"
                  ) -> Path:
    """Where ingest read image ``name``: ``meta['root']`` (``data.root``) + ``train/``|``test/``."""
    folder = Path(meta["root"])
    folder = folder if folder.is_absolute() else cfg.root / folder
    return folder / split / name


def read_original(cfg: Settings, meta: dict[str, Any], name: str, split: str = "train"
                  ) -> np.ndarray | None:
    """The original image decoded exactly as ingest decodes it, or ``None`` if it is gone."""
    path = original_path(cfg, meta, name, split)
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


def _parse_names(folder: Path, pattern: re.Pattern, glob: str) -> list[tuple[str, int, Path]]:
    found = []
    for path in sorted(folder.glob(glob)):
        match = pattern.match(path.name)
        if match:
            found.append((match["net"], int(match["fold"]), path))
    return found


def learning_curves(plots_dir: str | os.PathLike) -> pd.DataFrame:
    """Every ``plots/train--NET--foldK.tsv`` stacked: ``net``, ``fold`` + the per-epoch columns
    (``epoch lr train_loss valid_logloss valid_accuracy img_s``)."""
    frames = []
    for net, fold, path in _parse_names(Path(plots_dir), _TRAIN_TSV, "train--*.tsv"):
        frame = pd.read_csv(path, sep="\t")
        frame.insert(0, "fold", fold)
        frame.insert(0, "net", net)
        frames.append(frame)
    columns = ["net", "fold", "epoch", "lr", "train_loss", "valid_logloss", "valid_accuracy",
               "img_s"]
    if not frames:
        return pd.DataFrame(columns=columns)
    return pd.concat(frames, ignore_index=True)


def train_metrics(metrics_dir: str | os.PathLike) -> pd.DataFrame:
    """The final metrics of every training run (``metrics/train--NET--foldK.json``)."""
    rows = [dict(read_json(path), net=net, fold=fold)
            for net, fold, path in _parse_names(Path(metrics_dir), _TRAIN_JSON, "train--*.json")]
    table = pd.DataFrame(rows)
    if table.empty:
        return table
    first = ["net", "fold", "epochs", "train_loss", "valid_logloss", "valid_accuracy",
             "chance_logloss"]
    return table[[c for c in first if c in table] + [c for c in table if c not in first]]


def run_specs(checkpoints_dir: str | os.PathLike) -> pd.DataFrame:
    """Net, fold, activation and build kwargs of every run, from its checkpoint spec.

    ``model.json`` (final model) when training finished, else the newest ``epoch-*.json`` of a
    run still in progress; ``finished`` says which.
    """
    rows = []
    for run in sorted(p for p in Path(checkpoints_dir).glob("*--fold*") if p.is_dir()):
        match = _RUN_DIR.match(run.name)
        epochs = sorted(run.glob("epoch-*.json"))
        spec_path = run / "model.json" if (run / "model.json").exists() else \
            (epochs[-1] if epochs else None)
        if not match or spec_path is None:
            continue
        spec = read_json(spec_path)
        kwargs = spec.get("kwargs", {})
        rows.append({"net": match["net"], "fold": int(match["fold"]),
                     "act": kwargs.get("act", "?"), "bn": kwargs.get("bn"),
                     "epoch": spec.get("epoch"), "finished": spec_path.name == "model.json",
                     "kwargs": {k: v for k, v in kwargs.items() if k not in ("classes",)}})
    return pd.DataFrame(rows, columns=["net", "fold", "act", "bn", "epoch", "finished",
                                       "kwargs"])


def activation_summary(curves: pd.DataFrame, specs: pd.DataFrame) -> pd.DataFrame:
    """Per activation and net: folds trained, final and best validation log loss (fold mean)."""
    runs = _with_act(curves, specs).dropna(subset=["valid_logloss"])
    if runs.empty:
        return pd.DataFrame(columns=["act", "net", "folds", "final_valid_logloss",
                                     "best_valid_logloss"])
    per_run = runs.sort_values("epoch").groupby(["act", "net", "fold"])["valid_logloss"]
    table = pd.DataFrame({"final": per_run.last(), "best": per_run.min()}).reset_index()
    return (table.groupby(["act", "net"])
            .agg(folds=("fold", "nunique"), final_valid_logloss=("final", "mean"),
                 best_valid_logloss=("best", "mean"))
            .reset_index())


def _with_act(curves: pd.DataFrame, specs: pd.DataFrame) -> pd.DataFrame:
    acts = specs[["net", "fold", "act"]] if not specs.empty else \
        pd.DataFrame(columns=["net", "fold", "act"])
    merged = curves.merge(acts, on=["net", "fold"], how="left")
    merged["act"] = merged["act"].fillna("?")
    return merged


def tta_curves(metrics_dir: str | os.PathLike) -> pd.DataFrame:
    """Validation log loss against the number of TTA views, per model, from
    ``metrics/predict--NET--foldK.json``: ``net fold n logloss``; ``n = 0`` is the plain image
    (``valid_logloss_no_tta``)."""
    rows = []
    for net, fold, path in _parse_names(Path(metrics_dir), _PREDICT_JSON, "predict--*.json"):
        metrics = read_json(path)
        if "valid_logloss_no_tta" not in metrics:
            continue  # fold -1: no validation images
        rows.append({"net": net, "fold": fold, "n": 0,
                     "logloss": metrics["valid_logloss_no_tta"]})
        rows += [{"net": net, "fold": fold, "n": int(n), "logloss": loss}
                 for n, loss in metrics.get("valid_logloss_by_n", {}).items()]
    return pd.DataFrame(rows, columns=["net", "fold", "n", "logloss"])


def ensemble_summary(path: str | os.PathLike) -> pd.DataFrame:
    """One row per blended net (weight, OOF log loss and accuracy) plus the blend itself."""
    metrics = read_json(path)
    rows = [{"model": net, "weight": metrics["weights"][net], **metrics["models"][net]}
            for net in metrics["nets"]]
    rows.append({"model": ENSEMBLE, "weight": float(sum(metrics["weights"].values())),
                 **metrics["ensemble"]})
    return pd.DataFrame(rows, columns=["model", "weight", "logloss", "accuracy"])


@dataclass
class Oof:
    """The ensemble's out-of-fold predictions joined with the labels of ``meta.json``."""

    names: list[str]
    y: np.ndarray          # true class index per row
    probs: np.ndarray      # (N, K) in meta ``classes`` order
    classes: list[str]
    index: np.ndarray      # record index (position in meta["train"]) per row


def load_oof(cfg: Settings, meta: dict[str, Any]) -> Oof:
    """``predictions/valid--ensemble.npy`` (+ names), labelled from ``meta.json`` by name."""
    probs, names = load_predictions(cfg.predictions, "valid", ENSEMBLE)
    position = {r["name"]: i for i, r in enumerate(meta["train"])}
    unknown = [n for n in names if n not in position]
    if unknown:
        raise ValueError(f"{len(unknown)} ensemble rows are not train images of meta.json, "
                         f"e.g. {unknown[:3]!r}: the predictions are from other records")
    index = np.array([position[n] for n in names], dtype=np.int64)
    y = np.array([meta["train"][i]["label"] for i in index], dtype=np.int64)
    return Oof(names, y, np.asarray(probs, dtype=np.float64), list(meta["classes"]), index)


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
    """NDSB log loss and accuracy per true class (:func:`pipeline.score.per_class_log_loss`),
    worst first."""
    scores = per_class_log_loss(oof.y, oof.probs, oof.classes)
    table = pd.DataFrame([{"class": c, **s} for c, s in scores.items()],
                         columns=["class", "n", "logloss", "accuracy"])
    return table.sort_values("logloss", ascending=False, ignore_index=True)


def confident_mistakes(oof: Oof, k: int) -> pd.DataFrame:
    """The ``k`` wrong OOF predictions made with the highest confidence, with each image's
    own NDSB log loss (:func:`pipeline.score.ndsb_log_loss` of that row)."""
    table = oof_table(oof)
    wrong = table[table["actual"] != table["predicted"]]
    top = wrong.sort_values("confidence", ascending=False).head(k).copy()
    top["logloss"] = [ndsb_log_loss(oof.y[[i]], oof.probs[[i]]) for i in top.index]
    return top.reset_index(drop=True)


# ------------------------------------------------------------------------------- figures


def _figure(width: float, height: float) -> "Figure":
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), layout="constrained")


def _colors(n: int) -> list:
    from matplotlib import colormaps

    cmap = colormaps["tab10" if n <= 10 else "tab20"]
    return [cmap(i % cmap.N) for i in range(n)]


def _plain_log_ticks(ax, which: str = "both") -> None:
    """Label log axes 10, 20, 50, 100 rather than 10^1, 2x10^1 (sizes are read, not powers)."""
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    axes = [ax.xaxis, ax.yaxis] if which == "both" else [getattr(ax, f"{which}axis")]
    for axis in axes:
        axis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
        axis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
        axis.set_minor_formatter(NullFormatter())


def _integer_ticks(ax) -> None:
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))


def plot_class_counts(counts: pd.DataFrame) -> "Figure":
    """Horizontal bars: labelled images per class (submission order, top to bottom)."""
    fig = _figure(6, 1.2 + 0.22 * len(counts))
    ax = fig.subplots()
    ax.barh(counts["class"], counts["images"], color="tab:blue")
    ax.invert_yaxis()
    ax.set_xlabel("labelled images")
    ax.set_title(f"{int(counts['images'].sum())} images in {len(counts)} classes")
    return fig


def plot_sizes(table: pd.DataFrame, classes: Sequence[str]) -> "Figure":
    """Original image sizes: width x height per image (log axes), and the longer side per
    class as box plots (NDSB images range from tens to hundreds of pixels)."""
    fig = _figure(11, 1.5 + max(3.0, 0.22 * len(classes)))
    left, right = fig.subplots(1, 2)
    for cls, color in zip(classes, _colors(len(classes))):
        part = table[table["class"] == cls]
        left.scatter(part["width"], part["height"], s=12, alpha=0.7, color=color, label=cls)
    left.set(xscale="log", yscale="log", xlabel="original width (px)",
             ylabel="original height (px)", title="original size per image")
    if len(classes) <= 12:
        left.legend(fontsize=7)
    _plain_log_ticks(left)
    rng = np.random.default_rng(0)  # vertical jitter only, so the points do not overlap
    for row, (cls, color) in enumerate(zip(classes, _colors(len(classes)))):
        sides = table.loc[table["class"] == cls, ["width", "height"]].max(axis=1)
        right.scatter(sides, row + rng.uniform(-0.25, 0.25, len(sides)), s=8, alpha=0.7,
                      color=color)
    right.set_yticks(range(len(classes)), list(classes))
    right.invert_yaxis()
    right.set(xscale="log", xlabel="original longer side (px)", title="longer side per class")
    _plain_log_ticks(right, "x")
    right.tick_params(axis="y", labelsize=7)
    return fig


def plot_geometry(geometry: pd.DataFrame, size: int) -> "Figure":
    """What ingest's resize and padding did: the scale factor applied to each image (> 1 =
    enlarged) and how much of the square record the image fills (the rest is padding)."""
    fig = _figure(11, 3.2)
    left, right = fig.subplots(1, 2)
    scale = geometry["scale"]
    bins = np.geomspace(max(scale.min(), 1e-3) * 0.9, scale.max() * 1.1, 30)
    left.hist(scale, bins=bins, color="tab:blue")
    left.axvline(1.0, color="k", lw=1, ls="--")
    left.set(xscale="log", xlabel=f"scale = {size} / original longer side", ylabel="images",
             title=f"{(scale > 1).mean():.0%} enlarged, {(scale < 1).mean():.0%} shrunk")
    _plain_log_ticks(left, "x")
    right.hist(geometry["fill"], bins=np.linspace(0, 1, 21), color="tab:green")
    right.set(xlabel="fraction of the record covered by the image", ylabel="images",
              title=f"mean padding {1 - geometry['fill'].mean():.0%} of the square")
    return fig


def plot_image_grid(rows: dict[str, Sequence[np.ndarray]], titles: dict[str, Sequence[str]]
                    | None = None, tile: float = 1.1) -> "Figure":
    """A grid of grayscale images: one row per key (labelled with it), columns left-aligned."""
    ncols = max([len(v) for v in rows.values()] + [1])
    fig = _figure(1.8 + tile * ncols, 0.3 + tile * len(rows))
    axes = np.atleast_2d(fig.subplots(len(rows), ncols, squeeze=False))
    for r, (label, images) in enumerate(rows.items()):
        for c in range(ncols):
            ax = axes[r, c]
            ax.set_xticks([])
            ax.set_yticks([])
            if c < len(images):
                ax.imshow(images[c], cmap="gray", vmin=0, vmax=255)
                if titles and c < len(titles.get(label, ())):
                    ax.set_title(titles[label][c], fontsize=6)
            else:
                ax.axis("off")
        axes[r, 0].set_ylabel(label, rotation=0, ha="right", va="center", fontsize=7)
    return fig


def plot_ingest_pairs(pairs: Sequence[tuple[str, np.ndarray, np.ndarray]]) -> "Figure":
    """Original (drawn at its true pixel scale, on common axes) beside its record for each
    ``(name, original, record)``: the record is the original resized so that its longer side
    fills the square, centred on background padding."""
    longest = max(max(o.shape) for _, o, _ in pairs)
    fig = _figure(6, 2.6 * len(pairs))
    axes = np.atleast_2d(fig.subplots(len(pairs), 2, squeeze=False))
    for (name, original, record), (left, right) in zip(pairs, axes):
        h, w = original.shape
        left.imshow(original, cmap="gray", vmin=0, vmax=255, extent=(0, w, h, 0))
        left.set(xlim=(0, longest), ylim=(longest, 0))
        left.set_title(f"original {w}x{h}\n{Path(name).name[:40]}", fontsize=7)
        right.imshow(record, cmap="gray", vmin=0, vmax=255)
        size = record.shape[0]
        right.set_title(f"record {size}x{size} (scale {size / max(h, w):.2f})", fontsize=7)
        for ax in (left, right):
            ax.tick_params(labelsize=6)
    return fig


def plot_learning_curves(curves: pd.DataFrame, chance: float | None = None) -> "Figure":
    """One panel per net: train loss (dashed) and validation log loss (solid) per fold."""
    nets = sorted(curves["net"].unique()) or ["(no runs)"]
    ncols = min(3, len(nets))
    nrows = math.ceil(len(nets) / ncols)
    fig = _figure(4.2 * ncols, 3.2 * nrows)
    axes = np.atleast_1d(fig.subplots(nrows, ncols, squeeze=False).ravel())
    for ax, net in zip(axes, nets):
        runs = curves[curves["net"] == net]
        folds = sorted(runs["fold"].unique())
        for fold, color in zip(folds, _colors(len(folds))):
            run = runs[runs["fold"] == fold].sort_values("epoch")
            ax.plot(run["epoch"], run["train_loss"], ls="--", color=color,
                    label=f"fold {fold} train")
            if run["valid_logloss"].notna().any():
                ax.plot(run["epoch"], run["valid_logloss"], color=color,
                        label=f"fold {fold} valid")
        if chance is not None:
            ax.axhline(chance, color="grey", lw=0.8, ls=":", label="chance")
        ax.set(title=net, xlabel="epoch", ylabel="log loss")
        _integer_ticks(ax)
        ax.legend(fontsize=6)
    for ax in axes[len(nets):]:
        ax.axis("off")
    return fig


def plot_activations(curves: pd.DataFrame, specs: pd.DataFrame) -> "Figure | None":
    """Validation log loss per epoch, one panel per activation (``act`` of the checkpoint),
    shared y axis; ``None`` when fewer than two activations were trained."""
    runs = _with_act(curves, specs).dropna(subset=["valid_logloss"])
    acts = sorted(runs["act"].unique())
    if len(acts) < 2:
        return None
    fig = _figure(4.0 * len(acts), 3.2)
    axes = np.atleast_1d(fig.subplots(1, len(acts), sharey=True, squeeze=False).ravel())
    nets = sorted(runs["net"].unique())
    color_of = dict(zip(nets, _colors(len(nets))))
    for ax, act in zip(axes, acts):
        part = runs[runs["act"] == act]
        for (net, fold), run in part.groupby(["net", "fold"]):
            run = run.sort_values("epoch")
            ax.plot(run["epoch"], run["valid_logloss"], color=color_of[net],
                    ls=("-", "--", ":", "-.")[fold % 4], label=f"{net} fold {fold}")
        ax.set(title=f"act = {act}", xlabel="epoch")
        _integer_ticks(ax)
        ax.legend(fontsize=6)
    axes[0].set_ylabel("validation log loss")
    return fig


def plot_tta(curves: pd.DataFrame) -> "Figure":
    """Validation log loss against the number of TTA views (log x): thin lines per fold, a
    thick line for the fold mean of each net, dotted: the same net without TTA."""
    fig = _figure(6, 3.6)
    ax = fig.subplots()
    nets = sorted(curves["net"].unique())
    for net, color in zip(nets, _colors(len(nets))):
        part = curves[curves["net"] == net]
        views = part[part["n"] > 0]
        for _, run in views.groupby("fold"):
            run = run.sort_values("n")
            ax.plot(run["n"], run["logloss"], color=color, lw=0.7, alpha=0.5)
        mean = views.groupby("n")["logloss"].mean()
        ax.plot(mean.index, mean.to_numpy(), color=color, lw=2.2, marker="o", ms=3,
                label=f"{net} (fold mean)")
        plain = part.loc[part["n"] == 0, "logloss"]
        if len(plain):
            ax.axhline(plain.mean(), color=color, ls=":", lw=1.2, label=f"{net} no TTA")
    views = sorted(int(n) for n in curves.loc[curves["n"] > 0, "n"].unique())
    ax.set(xscale="log", xlabel="TTA views averaged (n)", ylabel="validation log loss",
           title="test-time augmentation")
    ax.set_xticks(views, [str(n) for n in views])
    ax.minorticks_off()
    ax.legend(fontsize=7)
    return fig


def plot_confusion(matrix: pd.DataFrame) -> "Figure":
    """Confusion matrix coloured by row share (recall per class), counts written in cells
    while the classes are few enough to read them."""
    k = len(matrix)
    side = max(4.5, 1.8 + 0.3 * k)
    fig = _figure(side + 1.0, side)
    ax = fig.subplots()
    counts = matrix.to_numpy()
    share = counts / np.maximum(counts.sum(axis=1, keepdims=True), 1)
    image = ax.imshow(share, cmap="Blues", vmin=0, vmax=1)
    fig.colorbar(image, ax=ax, shrink=0.7, label="share of the actual class")
    ax.set_xticks(range(k), matrix.columns, rotation=90, fontsize=7 if k <= 40 else 4)
    ax.set_yticks(range(k), matrix.index, fontsize=7 if k <= 40 else 4)
    ax.set(xlabel="predicted", ylabel="actual",
           title=f"out-of-fold ensemble: {np.trace(counts)} / {counts.sum()} right")
    if k <= 25:
        for i, j in zip(*np.nonzero(counts)):
            ax.text(j, i, str(counts[i, j]), ha="center", va="center", fontsize=7,
                    color="white" if share[i, j] > 0.5 else "black")
    return fig


def plot_per_class(table: pd.DataFrame, overall: float | None = None) -> "Figure":
    """Per-class log loss, worst at the top, with each class's image count."""
    fig = _figure(6.5, 1.2 + 0.24 * len(table))
    ax = fig.subplots()
    ax.barh(table["class"], table["logloss"], color="tab:red")
    ax.invert_yaxis()
    for i, (loss, n) in enumerate(zip(table["logloss"], table["n"])):
        ax.text(loss, i, f" n={n}", va="center", fontsize=6)
    if overall is not None:
        ax.axvline(overall, color="k", ls="--", lw=1, label=f"overall {overall:.3f}")
        ax.legend(fontsize=7)
    ax.set(xlabel="log loss (out of fold)", title="per-class log loss")
    ax.tick_params(axis="y", labelsize=7)
    return fig


def plot_mistakes(table: pd.DataFrame, images: Sequence[np.ndarray], ncols: int = 6
                  ) -> "Figure":
    """The most confident mistakes: each record with its true class, the predicted class and
    the confidence of that wrong prediction."""
    n = max(1, len(images))
    ncols = min(ncols, n)
    nrows = math.ceil(n / ncols)
    fig = _figure(1.9 * ncols, 2.2 * nrows)
    axes = np.atleast_1d(fig.subplots(nrows, ncols, squeeze=False).ravel())
    for ax in axes:
        ax.axis("off")
    for ax, image, row in zip(axes, images, table.itertuples()):
        ax.imshow(image, cmap="gray", vmin=0, vmax=255)
        ax.set_title(f"true {row.actual[:18]}\npred {row.predicted[:18]}\n"
                     f"p={row.confidence:.2f}", fontsize=6)
    if not len(images):
        axes[0].text(0.5, 0.5, "no mistakes", ha="center", va="center")
    return fig


def plot_weights(summary: pd.DataFrame) -> "Figure":
    """Blend weight per net, and each net's OOF log loss beside the blend's."""
    fig = _figure(9, 3.0)
    left, right = fig.subplots(1, 2)
    nets = summary[summary["model"] != ENSEMBLE]
    bars = left.bar(nets["model"], nets["weight"], color="tab:purple")
    left.bar_label(bars, fmt="%.3f", fontsize=7)
    left.set(ylim=(0, 1.1), ylabel="weight", title="ensemble weights")
    colors = ["tab:grey" if m != ENSEMBLE else "tab:purple" for m in summary["model"]]
    bars = right.bar(summary["model"], summary["logloss"], color=colors)
    right.bar_label(bars, fmt="%.3f", fontsize=7)
    right.set(ylabel="OOF log loss", title="out-of-fold log loss")
    for ax in (left, right):
        ax.tick_params(axis="x", rotation=30, labelsize=7)
    return fig


# ------------------------------------------------------------------------------- report


@dataclass
class Section:
    """One block of the HTML report: a heading, a sentence, optional image and table."""

    title: str
    text: str
    image: str | None = None
    table: pd.DataFrame | None = None


def save_figure(fig: "Figure", path: str | os.PathLike, dpi: int = 90) -> Path:
    """Write ``fig`` as PNG atomically (temporary name, then rename)."""
    with atomic_path(path, suffix=".png") as tmp:
        fig.savefig(tmp, dpi=dpi, format="png")
    return Path(path)


def build_sections(cfg: Settings, meta: dict[str, Any], oof: Oof
                   ) -> tuple[list[Section], dict[str, "Figure"]]:
    """Every section of the report and the figures it refers to (by file name)."""
    figures: dict[str, Figure] = {}
    sections: list[Section] = []
    for part in (_ensemble_section, _training_sections, _tta_section):
        part(cfg, meta, sections, figures)
    _prediction_sections(cfg, oof, sections, figures)
    _sample_section(cfg, meta, sections, figures)
    return sections, figures


def _ensemble_section(cfg: Settings, meta: dict[str, Any], sections: list[Section],
                      figures: dict[str, "Figure"]) -> None:
    summary = ensemble_summary(cfg.ensemble_metrics)
    figures["ensemble_weights.png"] = plot_weights(summary)
    sections.append(Section("Ensemble", "Blend weights fitted on out-of-fold (OOF) log loss; "
                            "each net's OOF score beside the blend's.",
                            "ensemble_weights.png", summary))


def _training_sections(cfg: Settings, meta: dict[str, Any], sections: list[Section],
                       figures: dict[str, "Figure"]) -> None:
    curves, specs = learning_curves(cfg.plots), run_specs(cfg.checkpoints)
    figures["learning_curves.png"] = plot_learning_curves(curves, math.log(len(meta["classes"])))
    sections.append(Section("Learning curves", "Train loss (dashed) and validation log loss "
                            "(solid) per epoch, per net and fold; dotted: chance.",
                            "learning_curves.png", train_metrics(cfg.metrics)))
    activations = plot_activations(curves, specs)
    if activations is not None:
        figures["activations.png"] = activations
        sections.append(Section("Activations", "Validation log loss grouped by the activation "
                                "the runs were built with.", "activations.png",
                                activation_summary(curves, specs)))


def _tta_section(cfg: Settings, meta: dict[str, Any], sections: list[Section],
                 figures: dict[str, "Figure"]) -> None:
    tta = tta_curves(cfg.metrics)
    figures["tta_curve.png"] = plot_tta(tta)
    table = tta.pivot_table(index=["net", "fold"], columns="n", values="logloss")
    table.columns = ["no TTA" if n == 0 else f"n={n}" for n in table.columns]
    sections.append(Section("Test-time augmentation", "Validation log loss against the number "
                            "of TTA views averaged (dotted: the plain image).", "tta_curve.png",
                            table.reset_index()))


def _prediction_sections(cfg: Settings, oof: Oof, sections: list[Section],
                         figures: dict[str, "Figure"]) -> None:
    matrix = confusion_matrix(oof)
    figures["confusion.png"] = plot_confusion(matrix)
    sections.append(Section("Confusion matrix", "Ensemble OOF predictions (arg-max) against "
                            "the labels of meta.json.", "confusion.png",
                            matrix.reset_index() if len(matrix) <= 25 else None))
    per_class = per_class_logloss(oof)
    overall = float(np.average(per_class["logloss"], weights=per_class["n"]))
    figures["per_class_logloss.png"] = plot_per_class(per_class, overall)
    sections.append(Section("Per-class log loss", "OOF log loss of the ensemble per true "
                            "class, worst first.", "per_class_logloss.png", per_class))
    mistakes = confident_mistakes(oof, cfg.mistakes)
    images = read_records(cfg.records, mistakes["index"])
    figures["mistakes.png"] = plot_mistakes(mistakes, images)
    sections.append(Section("Most confident mistakes", "Wrong OOF predictions with the "
                            "highest confidence (the records the nets saw).", "mistakes.png",
                            mistakes.drop(columns="index")))


def _sample_section(cfg: Settings, meta: dict[str, Any], sections: list[Section],
                    figures: dict[str, "Figure"]) -> None:
    chosen = sample_indices(meta, cfg.samples_per_class, cfg.seed)
    grid = {cls: read_records(cfg.records, idx) for cls, idx in chosen.items()}
    figures["samples.png"] = plot_image_grid(grid)
    sections.append(Section("Samples", f"{cfg.samples_per_class} random records per class "
                            f"({meta['size']}x{meta['size']}, as ingested).", "samples.png",
                            class_counts(meta)))


def render_html(sections: Sequence[Section], title: str) -> str:
    """A self-contained page (images referenced by relative file name)."""
    parts = [f"<!doctype html>\n<html><head><meta charset='utf-8'><title>{html.escape(title)}"
             "</title><style>body{font-family:sans-serif;max-width:1100px;margin:auto;"
             "padding:1em}table{border-collapse:collapse;font-size:12px;margin:.5em 0}"
             "td,th{border:1px solid #ccc;padding:2px 6px;text-align:right}"
             "img{max-width:100%}</style></head><body>", f"<h1>{html.escape(title)}</h1>"]
    parts.append("<ul>" + "".join(f"<li><a href='#s{i}'>{html.escape(s.title)}</a></li>"
                                  for i, s in enumerate(sections)) + "</ul>")
    for i, section in enumerate(sections):
        parts.append(f"<h2 id='s{i}'>{html.escape(section.title)}</h2>"
                     f"<p>{html.escape(section.text)}</p>")
        if section.image:
            parts.append(f"<img src='{html.escape(section.image)}' "
                         f"alt='{html.escape(section.title)}'>")
        if section.table is not None and not section.table.empty:
            parts.append(section.table.to_html(index=False, float_format=lambda v: f"{v:.4g}",
                                               border=0))
    parts.append("</body></html>\n")
    return "\n".join(parts)


def write_report(cfg: Settings) -> list[Path]:
    """Write ``index.html`` + PNGs to ``cfg.out`` and the OOF ``actual,predicted`` pairs to
    ``cfg.confusion``; return the paths written. PNGs of an earlier report that this one did
    not write (e.g. ``activations.png`` when only one activation is left) are removed."""
    meta = load_meta(cfg)
    oof = load_oof(cfg, meta)
    sections, figures = build_sections(cfg, meta, oof)
    cfg.out.mkdir(parents=True, exist_ok=True)
    written = [save_figure(fig, cfg.out / name) for name, fig in figures.items()]
    for stale in set(cfg.out.glob("*.png")) - set(written):
        stale.unlink()
    index = cfg.out / "index.html"
    write_text(index, render_html(sections, f"NDSB run report: {len(meta['classes'])} classes, "
                                            f"{len(meta['train'])} labelled images"))
    write_text(cfg.confusion, confusion_pairs(oof).to_csv(index=False))
    return written + [index, cfg.confusion]


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Static HTML report of a run (reports/).")
    parser.add_argument("--root", default=".", help="project folder (outputs and params.yaml)")
    parser.add_argument("--params", help="params file (default: ROOT/params.yaml)")
    args = parser.parse_args(argv)
    cfg = settings(args.root, args.params)
    try:
        written = write_report(cfg)
    except (OSError, ValueError, records.RecordsError) as exc:
        raise SystemExit(f"report: {exc} (run the pipeline up to the ensemble stage first)"
                         ) from None
    print(f"report: {len(written)} files -> {cfg.out / 'index.html'}, {cfg.confusion}")


if __name__ == "__main__":
    main()

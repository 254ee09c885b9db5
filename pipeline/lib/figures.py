"""Figures of a run's tables: what the report stage saves as PNGs and the notebooks display.

Every ``plot_*`` function takes tables of :mod:`pipeline.lib.results` (or images) and returns a
``matplotlib.figure.Figure``, or ``None`` when there is nothing to compare. Figures are made
without ``pyplot``: no global figure state to leak or close, and no display needed, so the
report renders headless and a notebook shows a figure by returning it. matplotlib is imported
inside the functions, so importing this module costs nothing for code that draws nothing.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

import numpy as np
import pandas as pd

from pipeline.lib.results import ENSEMBLE, with_activations

if TYPE_CHECKING:
    from matplotlib.figure import Figure


def _figure(width: float, height: float) -> "Figure":
    """An empty figure with constrained layout, outside pyplot's figure registry."""
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), layout="constrained")


def _colors(n: int) -> list:
    """``n`` distinct colours (tab10, or tab20 beyond ten)."""
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
    """Whole numbers only on the x axis (epochs)."""
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


def plot_time_to_logloss(curves: pd.DataFrame) -> "Figure":
    """Out-of-fold log loss against training images seen and against hours, per recipe.

    ``curves``: one row per (variant, run, epoch) with ``images`` and ``hours`` (per model,
    summed over the epochs so far) and ``oof`` (the log loss of the out-of-fold images after
    that epoch, no TTA), as :func:`pipeline.lib.results.time_curves` and
    :mod:`pipeline.tools.schedule_study` give them; a run is one (``seed``, ``net``, ``fold``)
    of those columns present. One colour per variant, one line per run; the x axes are
    logarithmic, so a recipe that needs a quarter of the images sits a fixed distance to the
    left of the one it is compared with.
    """
    fig = _figure(10, 3.8)
    axes = fig.subplots(1, 2, sharey=True)
    variants = list(dict.fromkeys(curves["variant"]))
    keys = [c for c in ("seed", "net", "fold") if c in curves]
    for variant, color in zip(variants, _colors(len(variants))):
        runs = curves[curves["variant"] == variant]
        groups = runs.groupby(keys, sort=True, dropna=False) if keys else [(None, runs)]
        for i, (_, run) in enumerate(groups):
            run = run.sort_values("epoch")
            for ax, x in zip(axes, ("images", "hours")):
                if run[x].notna().all():
                    ax.plot(run[x], run["oof"], color=color, lw=1.2, marker=".", ms=3,
                            label=variant if i == 0 else None)
    axes[0].set(xlabel="training images seen per model", ylabel="out-of-fold log loss "
                "(no TTA)", xscale="log")
    axes[1].set(xlabel="wall-clock hours per model", xscale="log")
    for ax in axes:
        ax.grid(True, which="both", lw=0.3, alpha=0.5)
    if variants:
        axes[0].legend(fontsize=7)
    return fig


def plot_activations(curves: pd.DataFrame, specs: pd.DataFrame) -> "Figure | None":
    """Validation log loss per epoch, one panel per activation (``act`` of the checkpoint),
    shared y axis; ``None`` when fewer than two activations were trained."""
    runs = with_activations(curves, specs).dropna(subset=["valid_logloss"])
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

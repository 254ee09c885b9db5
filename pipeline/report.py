"""Stage ``report``: a static HTML report of a run (``reports/index.html`` + PNGs), and the
out-of-fold ``actual,predicted`` pairs (``plots/confusion.csv``) for ``dvc plots show``.

The tables come from :mod:`pipeline.lib.results` and the figures from
:mod:`pipeline.lib.figures`, the same functions the notebooks in ``notebooks/`` call, so the
report and the notebooks show the same numbers computed the same way; this module only lays
them out as sections and writes them, so a run can be looked at without Jupyter. Every file is
written atomically (temporary name, then rename), the page after its images.

``python -m pipeline.report`` reads the ``report`` section of ``params.yaml`` (paths resolved
against ``--root``).
"""
from __future__ import annotations

import html
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np
import pandas as pd

from pipeline.lib import stage
from pipeline.lib.settings import PARAMS_FILE
from pipeline.lib.figures import (plot_activations, plot_confusion, plot_image_grid,
                                  plot_learning_curves, plot_mistakes, plot_per_class,
                                  plot_time_to_logloss, plot_tta, plot_weights)
from pipeline.lib.fsutil import atomic_path, sweep_stale, write_text
from pipeline.lib.results import (Oof, ReportSettings, activation_summary, class_counts,
                                  confident_mistakes, confusion_matrix, confusion_pairs,
                                  ensemble_summary, learning_curves, load_meta, load_oof,
                                  per_class_logloss, read_records, run_specs, sample_indices,
                                  from_settings, technique_summary, time_curves, train_metrics,
                                  tta_curves)

if TYPE_CHECKING:
    from matplotlib.figure import Figure


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


def build_sections(cfg: ReportSettings, meta: dict[str, Any], oof: Oof
                   ) -> tuple[list[Section], dict[str, "Figure"]]:
    """Every section of the report and the figures it refers to (by file name)."""
    figures: dict[str, Figure] = {}
    sections: list[Section] = []
    for part in (_ensemble_section, _training_sections, _tta_section):
        part(cfg, meta, sections, figures)
    _prediction_sections(cfg, oof, sections, figures)
    _thresholds_section(cfg, sections)
    _sample_section(cfg, meta, sections, figures)
    return sections, figures


def _ensemble_section(cfg: ReportSettings, meta: dict[str, Any], sections: list[Section],
                      figures: dict[str, "Figure"]) -> None:
    summary = ensemble_summary(cfg.ensemble_metrics)
    figures["ensemble_weights.png"] = plot_weights(summary)
    sections.append(Section("Ensemble", "Blend weights fitted on out-of-fold (OOF) log loss; "
                            "each net's OOF score beside the blend's.",
                            "ensemble_weights.png", summary))
    sections.append(Section("What each step bought", "Out-of-fold log loss after each step: "
                            "single seeds, seeds averaged per net, the weighted blend, the "
                            "calibrated blend (cross-fitted); gain = drop from the step before.",
                            None, technique_summary(cfg.ensemble_metrics)))


def _training_sections(cfg: ReportSettings, meta: dict[str, Any], sections: list[Section],
                       figures: dict[str, "Figure"]) -> None:
    curves, specs = learning_curves(cfg.plots), run_specs(cfg.checkpoints)
    figures["learning_curves.png"] = plot_learning_curves(curves, math.log(len(meta["classes"])))
    sections.append(Section("Learning curves", "Train loss (dashed) and validation log loss "
                            "(solid) per epoch, per net and fold; dotted: chance.",
                            "learning_curves.png", train_metrics(cfg.metrics)))
    timed = time_curves(curves, specs)
    if timed.groupby(["net", "seed", "fold"], dropna=False).ngroups > 1:  # several runs
        figures["time_to_logloss.png"] = plot_time_to_logloss(timed)
        last = timed.sort_values("epoch").groupby(["variant", "seed", "fold"], dropna=False,
                                                  sort=True).last().reset_index()
        sections.append(Section("Time to log loss", "Out-of-fold log loss (no TTA) after each "
                                "epoch against the training images seen and the wall-clock "
                                "hours of the run so far, per net and learning-rate schedule.",
                                "time_to_logloss.png",
                                last[["variant", "seed", "fold", "epoch", "images", "hours",
                                      "oof"]]))
    activations = plot_activations(curves, specs)
    if activations is not None:
        figures["activations.png"] = activations
        sections.append(Section("Activations", "Validation log loss grouped by the activation "
                                "the runs were built with.", "activations.png",
                                activation_summary(curves, specs)))


def _tta_section(cfg: ReportSettings, meta: dict[str, Any], sections: list[Section],
                 figures: dict[str, "Figure"]) -> None:
    tta = tta_curves(cfg.metrics)
    figures["tta_curve.png"] = plot_tta(tta)
    table = tta.pivot_table(index=["net", "fold"], columns="n", values="logloss")
    table.columns = ["no TTA" if n == 0 else f"n={n}" for n in table.columns]
    sections.append(Section("Test-time augmentation", "Validation log loss against the number "
                            "of TTA views averaged (dotted: the plain image).", "tta_curve.png",
                            table.reset_index()))


def _prediction_sections(cfg: ReportSettings, oof: Oof, sections: list[Section],
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


def _thresholds_section(cfg: ReportSettings, sections: list[Section]) -> None:
    """The bundle's per-class thresholds (``metrics/thresholds.csv``, written by the bundle
    stage), when there are any: what classify keeps and what it calls ``unclassified``."""
    from pipeline.lib.thresholds import METRICS_FILE, UNCLASSIFIED

    path = Path(cfg.metrics) / METRICS_FILE
    if not path.is_file():
        return
    table = pd.read_csv(path, keep_default_na=False, na_values=[""])
    reached = int(table["threshold"].notna().sum())
    predicted = int(table["predicted"].sum())
    kept = int(table["kept"].fillna(0).sum())
    share = f"{kept / predicted:.1%}" if predicted else "none"
    sections.append(Section(
        "Per-class thresholds (bundle)",
        f"The thresholds classify applies (fitted on the calibrated out-of-fold ensemble for "
        f"bundle.target_precision): {reached} of {len(table)} classes reach the target; out "
        f"of fold {share} of the images keep their top-1 class, the rest are "
        f"{UNCLASSIFIED!r}. Precision and recall are at each class's threshold (empty: the "
        "class never reaches the target, all its predictions are unclassified); "
        "precision_top1 is without a threshold.", None, table))


def _sample_section(cfg: ReportSettings, meta: dict[str, Any], sections: list[Section],
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


def report(cfg: ReportSettings) -> list[Path]:
    """Write ``index.html`` + PNGs to ``cfg.out`` and the OOF ``actual,predicted`` pairs to
    ``cfg.confusion``; return the paths written. PNGs of an earlier report that this one did
    not write (e.g. ``activations.png`` when only one activation is left) are removed."""
    meta = load_meta(cfg)
    oof = load_oof(cfg, meta)
    sections, figures = build_sections(cfg, meta, oof)
    cfg.out.mkdir(parents=True, exist_ok=True)
    sweep_stale("report", cfg.out, Path(cfg.confusion).parent)
    written = [save_figure(fig, cfg.out / name) for name, fig in figures.items()]
    for stale in set(cfg.out.glob("*.png")) - set(written):
        stale.unlink()
    index = cfg.out / "index.html"
    write_text(index, render_html(sections, f"NDSB run report: {len(meta['classes'])} classes, "
                                            f"{len(meta['train'])} labelled images"))
    write_text(cfg.confusion, confusion_pairs(oof).to_csv(index=False))
    return written + [index, cfg.confusion]


def _arguments(parser) -> None:
    parser.add_argument("--root", default=".", help="project folder whose outputs the paths "
                        "section points at (default: here)")


def _run(cfg, args) -> str:
    where = from_settings(cfg, Path(args.root).resolve())
    written = report(where)
    return f"report: {len(written)} files -> {where.out / 'index.html'}, {where.confusion}"


def main(argv: Sequence[str] | None = None) -> None:
    stage.run("report", ("report", "paths"), _run, argv, doc="Static HTML report of a run.",
              arguments=_arguments, params_optional=True,
              params_in=lambda args: os.path.normpath(os.path.join(args.root, PARAMS_FILE)))


if __name__ == "__main__":
    main()

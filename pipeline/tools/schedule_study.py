"""Time to log loss: how many training images, and hours, each learning-rate schedule needs.

``python -m pipeline.tools.schedule_study --records R --out DIR --runs steps:12 cosine:12
cosine:3 onecycle:3 --seeds 0 1 2`` trains one net on the chosen folds once per seed and per
*run* ``SCHEDULE:EPOCHS``, through the train stage's own command (``python -m pipeline.train``
with a params file per run), so what is measured is what ``dvc repro`` runs:

* ``steps:E``: the thesis' schedule scaled to E epochs: lr x ``lr_factor`` after 400/560 and
  480/560 of them (0.01 x 400, 0.001 x 80, 0.0001 x 80 in the thesis);
* ``cosine:E``, ``onecycle:E``: ``train.schedule`` over E epochs, with a warm-up of
  ``--warmup-fraction`` of them.

Each epoch's validation log loss of the train stage (the fold's out-of-fold images, no TTA),
its training images and its wall-clock seconds (``plots/train--*.tsv``) make one curve per
(run, seed): out-of-fold log loss against images seen and hours per model, the folds pooled
(log loss weighted by their validation images; images and hours averaged over the folds).

The *baseline* is the ``steps`` run with the most epochs. For every (run, seed) the tool
reports the final out-of-fold log loss, the images seen when the curve first reaches the
baseline's final log loss of the same seed (and that as a fraction of the baseline's images)
and the hours. A run meets the issue's rule when, for every seed, it ends at or below the
baseline's final log loss having seen at most a quarter of the baseline's images: its own
final figure counts, not a dip of its curve on the way (an epoch's log loss on a small
validation fold is noisy, and a run cannot be stopped at a dip nobody knows of in advance). Writes ``DIR/curves.csv``, ``DIR/results.jsonl`` (a rerun
skips the (run, seed) pairs there; a killed training resumes from its checkpoint),
``DIR/summary.md`` (also printed) and ``DIR/time_to_logloss.png``; ``--summary-only`` writes
those of the pairs already trained and trains nothing.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
from pathlib import Path
from typing import Any, Sequence

import yaml

from pipeline.lib.errors import stage_errors
from pipeline.lib.fsutil import write_text
from pipeline.lib.schedule import SCHEDULES
from pipeline.tools.studies import ROOT, StudyError, point_paths, sh

# The thesis' steps (§6.2): 0.01 for 400 epochs, 0.001 for 80, 0.0001 for 80, of 560.
THESIS_STEPS = (400 / 560, 480 / 560)
RULE = 0.25  # the issue's rule: at most a quarter of the baseline's training images


def parse_run(text: str) -> tuple[str, int]:
    """``SCHEDULE:EPOCHS`` -> ``(schedule, epochs)``."""
    schedule, _, epochs = text.partition(":")
    if schedule not in SCHEDULES or not epochs.isdigit() or int(epochs) < 1:
        raise StudyError(f"--runs: each SCHEDULE:EPOCHS with SCHEDULE one of "
                         f"{', '.join(SCHEDULES)} and EPOCHS >= 1, got {text!r}")
    return schedule, int(epochs)


def scaled_steps(epochs: int) -> list[int]:
    """The thesis' lr steps at the same fractions of ``epochs`` (560 -> [400, 480]; steps
    that round to the same epoch are one)."""
    return sorted({max(1, round(epochs * f)) for f in THESIS_STEPS})


def run_settings(schedule: str, epochs: int, args: argparse.Namespace) -> dict[str, Any]:
    """The ``train`` settings of one run beside the repository's params.yaml."""
    train: dict[str, Any] = dict(schedule=schedule, epochs=epochs, batch_size=args.batch_size,
                                 workers=1)
    if args.lr is not None:
        train["lr"] = args.lr
    if schedule == "steps":
        train["lr_steps"] = scaled_steps(epochs)
    else:
        train["warmup_epochs"] = round(args.warmup_fraction * epochs, 6)
    return train


def params_file(run_dir: Path, schedule: str, epochs: int, args: argparse.Namespace) -> Path:
    """The repository's params.yaml with the run's settings; its files under ``run_dir``."""
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["train"].update(run_settings(schedule, epochs, args))
    point_paths(params, args.records, run_dir)
    params["models"].update(nets=[args.net], folds=list(args.folds), pseudo_nets=[])
    path = run_dir / "params.yaml"
    write_text(path, yaml.safe_dump(params))
    return path


def read_curve(plots: Path, metrics: Path, member: str, folds: Sequence[int]
               ) -> list[dict[str, float]]:
    """One curve from the folds' ``train--MEMBER--foldK.tsv``: per epoch the pooled
    out-of-fold log loss and the images and hours per model, summed over the epochs so far."""
    import pandas as pd

    from pipeline.lib.fsutil import read_json
    from pipeline.lib.runs import artifact_name

    frames = []
    for fold in folds:
        name = artifact_name("train", member, fold)
        frame = pd.read_csv(plots / f"{name}.tsv", sep="\t").sort_values("epoch")
        frame["valid_images"] = read_json(metrics / f"{name}.json")["valid_images"]
        frame["images"], frame["hours"] = frame["images"].cumsum(), frame["seconds"].cumsum() / 3600
        frames.append(frame)
    rows = []
    for epoch, part in pd.concat(frames).groupby("epoch", sort=True):
        weights = part["valid_images"]
        rows.append({"epoch": int(epoch), "images": float(part["images"].mean()),
                     "hours": float(part["hours"].mean()),
                     "oof": float((part["valid_logloss"] * weights).sum() / weights.sum())})
    return rows


def study_run(args: argparse.Namespace, schedule: str, epochs: int, seed: int
              ) -> dict[str, Any]:
    """Train (or resume) one (run, seed) on every fold; its curve and final figures."""
    from pipeline.lib.runs import member_name

    run_dir = args.out / f"{schedule}-{epochs}"
    params = params_file(run_dir, schedule, epochs, args)
    for fold in args.folds:
        sh([sys.executable, "-m", "pipeline.train", "--net", args.net, "--fold", str(fold),
            "--seed", str(seed), "--params", str(params)], run_dir / "log.txt")
    curve = read_curve(run_dir / "plots", run_dir / "metrics", member_name(args.net, seed),
                       args.folds)
    return {"run": f"{schedule}:{epochs}", "schedule": schedule, "epochs": epochs, "seed": seed,
            "settings": run_settings(schedule, epochs, args), "curve": curve}


def images_to_reach(curve: Sequence[dict[str, float]], target: float) -> float | None:
    """Training images seen when ``curve`` first gets to ``target`` or below (None: never)."""
    return next((p["images"] for p in curve if p["oof"] <= target), None)


def baseline_of(rows: Sequence[dict[str, Any]]) -> str:
    """The ``steps`` run with the most epochs."""
    steps = [r for r in rows if r["schedule"] == "steps"]
    if not steps:
        raise StudyError("--runs: a steps:EPOCHS run is the baseline; add one (e.g. steps:12)")
    return max(steps, key=lambda r: r["epochs"])["run"]


def summarize(rows: Sequence[dict[str, Any]]) -> tuple[list[dict[str, Any]], list[str]]:
    """Per (run, seed) the figures of the tables, and the tables as Markdown lines."""
    base_run = baseline_of(rows)
    base = {r["seed"]: r for r in rows if r["run"] == base_run}
    table = []
    for r in sorted(rows, key=lambda r: (r["run"] != base_run, r["run"], r["seed"])):
        last, b = r["curve"][-1], base.get(r["seed"])
        target = b["curve"][-1]["oof"] if b else math.nan
        reach = images_to_reach(r["curve"], target) if b else None
        table.append({"run": r["run"], "seed": r["seed"], "oof": last["oof"],
                      "images": last["images"], "hours": last["hours"],
                      "baseline_oof": target, "images_to_baseline": reach,
                      "fraction": reach / b["curve"][-1]["images"] if reach and b else None,
                      "budget": last["images"] / b["curve"][-1]["images"] if b else None})
    lines = [f"Baseline: {base_run} (the thesis' schedule scaled). \"to baseline\": training "
             "images seen per model when the out-of-fold log loss first reaches the baseline's "
             "final one of the same seed (fraction of the baseline's images).", "",
             "| run | seed | final OOF log loss | baseline final | images to baseline | "
             "fraction | images | hours per model |", "|---|---|---|---|---|---|---|---|"]
    for t in table:
        reach = "not reached" if t["images_to_baseline"] is None else \
            f"{t['images_to_baseline']:,.0f}"
        frac = "" if t["fraction"] is None else f"{t['fraction']:.3f}"
        lines.append(f"| {t['run']} | {t['seed']} | {t['oof']:.4f} | {t['baseline_oof']:.4f} | "
                     f"{reach} | {frac} | {t['images']:,.0f} | {t['hours']:.4f} |")
    lines += ["", "| run | seeds | images vs baseline | mean final OOF | mean diff vs baseline | "
              f"seeds better | ends at or below it within {RULE:g} of the images, every seed |",
              "|---|---|---|---|---|---|---|"]
    for run in dict.fromkeys(t["run"] for t in table):
        mine = [t for t in table if t["run"] == run and t["seed"] in base]
        if not mine:  # no seed of it has a baseline run to pair with
            continue
        diffs = [t["oof"] - t["baseline_oof"] for t in mine]
        rule = all(t["budget"] <= RULE and t["oof"] <= t["baseline_oof"] for t in mine)
        budget = f"{mine[0]['budget']:.3g}"
        lines.append(f"| {run} | {len(mine)} | {budget} | "
                     f"{sum(t['oof'] for t in mine) / len(mine):.4f} | "
                     f"{sum(diffs) / len(diffs):+.4f} | {sum(d < 0 for d in diffs)}/{len(diffs)}"
                     f" | {'yes' if rule and run != base_run else 'no'} |")
    return table, lines


def curves_frame(rows: Sequence[dict[str, Any]]):
    """Every curve as one table (``variant`` = the run): what the plot draws."""
    import pandas as pd

    return pd.DataFrame([dict(variant=r["run"], seed=r["seed"], **p) for r in rows
                         for p in r["curve"]])


def study(args: argparse.Namespace) -> list[str]:
    runs = [parse_run(x) for x in args.runs]
    if not any(s == "steps" for s, _ in runs):
        baseline_of([])  # the one-line error, before anything trains
    args.out.mkdir(parents=True, exist_ok=True)
    results = args.out / "results.jsonl"
    rows = [json.loads(x) for x in results.read_text().splitlines()] if results.exists() else []
    done = {(r["run"], r["seed"]) for r in rows}
    for seed in args.seeds:
        for schedule, epochs in runs:
            if (f"{schedule}:{epochs}", seed) in done or args.summary_only:
                continue
            row = study_run(args, schedule, epochs, seed)
            rows.append(row)
            with open(results, "a") as fh:  # one line, appended whole: a rerun skips it
                fh.write(json.dumps(row) + "\n")
            print(f"schedule_study: {row['run']} seed {seed}: final OOF "
                  f"{row['curve'][-1]['oof']:.4f}", flush=True)
    wanted = {f"{s}:{e}" for s, e in runs}
    rows = [r for r in rows if r["run"] in wanted and r["seed"] in args.seeds]
    if not rows:
        raise StudyError(f"nothing trained yet in {results} for these --runs and --seeds")
    _, lines = summarize(rows)
    frame = curves_frame(rows)
    write_text(args.out / "curves.csv", frame.to_csv(index=False))
    write_text(args.out / "summary.md", "\n".join(lines) + "\n")
    from pipeline.lib.figures import plot_time_to_logloss
    from pipeline.report import save_figure

    save_figure(plot_time_to_logloss(frame), args.out / "time_to_logloss.png")
    return lines


def main(argv: Sequence[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m pipeline.tools.schedule_study",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("--records", type=Path, required=True, help="ingested records (paths.records)")
    p.add_argument("--out", type=Path, required=True, help="the study's folder")
    p.add_argument("--runs", nargs="+", required=True, metavar="SCHEDULE:EPOCHS",
                   help="e.g. steps:12 cosine:12 cosine:3; the longest steps run is the baseline")
    p.add_argument("--net", default="ndsb_net1")
    p.add_argument("--folds", type=int, nargs="+", default=[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--lr", type=float, help="peak lr of every run (default: params.yaml's)")
    p.add_argument("--summary-only", action="store_true",
                   help="train nothing: the tables and plot of the asked (run, seed) pairs "
                        "already in DIR/results.jsonl")
    p.add_argument("--warmup-fraction", type=float, default=0.2,
                   help="cosine, onecycle: warm-up as a fraction of the run's epochs")
    args = p.parse_args(argv)
    args.out, args.records = args.out.resolve(), args.records.resolve()
    with stage_errors("schedule_study"):
        if not 0 <= args.warmup_fraction < 1:
            raise StudyError(f"--warmup-fraction: a number in [0, 1), got {args.warmup_fraction}")
        print("\n".join(study(args)))


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    main()

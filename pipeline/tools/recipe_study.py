"""What each technique beyond the thesis' recipe buys, in out-of-fold log loss, over seeds.

``python -m pipeline.tools.recipe_study --records R --out DIR --seeds 0 1 2`` trains the
chosen nets on every fold once per seed and per *variant*, predicts with TTA and blends, all
through the stages' own commands (``python -m pipeline.train`` / ``predict`` / ``pseudo`` /
``ensemble`` with a params file per variant), so what is measured is what ``dvc repro`` runs:

* ``base``: the recipe as configured (``--epochs``, ``--lr-steps``, ...);
* ``ls``: ``train.label_smoothing`` = ``--label-smoothing``;
* ``ema``: ``train.ema_half_life`` = ``--ema-half-life`` epochs;
* ``pl``: a second round on pseudo-labels from the base variant's fold models of the same
  seed (``pseudo.fraction`` = ``--pseudo-fraction``), blended with the base nets;
* ``plft``: the same second round, but fine-tuning each base model over the schedule's last
  ``--pseudo-finetune`` x ``--epochs`` epochs (``pseudo.finetune``) instead of training anew;
* ``ft``: the control of ``plft``: the same fine-tuning without the pseudo-labelled images
  (``pseudo.fraction: 0``), blended the same way, so ``plft - ft`` is what the pseudo-labels
  add and ``ft - base`` what a second annealing cycle of the same weights adds;
* ``bf16``: ``train.precision: bfloat16`` (is bfloat16 training as good as float32 on this
  CPU? run the base with ``--base-precision float32``);

and, free on top of the base runs, ``seeds`` (the ensemble of all seeds, averaged per net)
and ``temperature`` (calibration, cross-fitted over folds). One line of JSON per (variant,
seed) goes to ``DIR/results.jsonl`` (a rerun skips what is there, and training resumes), and
a table of the paired differences against ``base`` (mean, standard deviation, how many seeds
improved) is printed at the end: a technique's gain counts only where it holds over seeds.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from pathlib import Path
from typing import Any, Sequence

import yaml

from pipeline.lib.runs import member_name, run_name
from pipeline.lib.settings import PseudoSection
from pipeline.tools import studies

ROOT = studies.ROOT
VARIANTS = ("base", "ls", "ema", "pl", "bf16", "plft", "ft")
SECOND_ROUND = ("pl", "plft", "ft")
FINE_TUNED = ("plft", "ft")  # second rounds that start from the base variant's models


def params_file(path: Path, args: argparse.Namespace, variant: str) -> Path:
    """The repository's params.yaml with the study's settings for ``variant``; every run's
    files go under ``path``'s folder (its ``paths`` section)."""
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    run = path.parent
    train = params["train"]
    train.update(epochs=args.epochs, lr_steps=args.lr_steps, batch_size=args.batch_size,
                 workers=1)
    if variant == "ls":
        train["label_smoothing"] = args.label_smoothing
    if variant == "ema":
        train["ema_half_life"] = args.ema_half_life
    if args.base_precision:
        train["precision"] = args.base_precision
    if variant == "bf16":
        train["precision"] = "bfloat16"
    studies.point_paths(params, args.records, run)
    params["tta"].update(n=args.tta_n, work=str(run / "work"))
    params["pseudo"].update(fraction=0.0 if variant == "ft" else args.pseudo_fraction,
                            finetune=args.pseudo_finetune if variant in FINE_TUNED else 0.0)
    params["models"].update(nets=list(args.nets), folds=list(args.folds), pseudo_nets=[])
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(params))
    return path


def sh(cmd: Sequence[str], log: Path) -> None:
    try:
        studies.sh(cmd, log)
    except studies.StudyError as err:
        sys.exit(f"recipe_study: {err}")


def train_and_predict(args: argparse.Namespace, variant: str, seed: int, params: Path) -> None:
    run = params.parent
    py = [sys.executable, "-m"]
    pseudo = ["--pseudo"] if variant in SECOND_ROUND else []
    for net in args.nets:
        for fold in args.folds:
            common = ["--fold", str(fold), "--seed", str(seed), "--params", str(params)]
            sh(py + ["pipeline.train", "--net", net, *common, *pseudo], run / "log.txt")
            member = f"{net}-pl" if variant in SECOND_ROUND else net
            sh(py + ["pipeline.predict", "--net", member, *common], run / "log.txt")


def _yaml_list(values: Sequence[Any]) -> str:
    return "[" + ", ".join(map(str, values)) + "]"


def blend(args: argparse.Namespace, run: Path, nets: Sequence[str], seeds: Sequence[int],
          tag: str, pseudo_nets: Sequence[str] = ()) -> dict[str, Any]:
    """Blend the run's models (both rounds' folders are searched) with temperature; the
    metrics go to ``run/blend-{tag}/ensemble.json``."""
    out = run / f"blend-{tag}"
    sh([sys.executable, "-m", "pipeline.ensemble", "--params", str(run / "params.yaml"),
        "--set", f"models.nets={_yaml_list(nets)}",
        "--set", f"models.folds={_yaml_list(args.folds)}",
        "--set", f"models.seeds={_yaml_list(seeds)}",
        "--set", f"models.pseudo_nets={_yaml_list(pseudo_nets)}",
        "--set", "ensemble.calibration=temperature", "--set", f"paths.metrics={out}"],
       run / "log.txt")
    return json.loads((out / "ensemble.json").read_text())


def study_seed(args: argparse.Namespace, variant: str, seed: int) -> dict[str, Any]:
    run = args.out / variant
    params = params_file(run / "params.yaml", args, variant)
    pseudo_nets: list[str] = []
    if variant in SECOND_ROUND:  # the targets come from the base runs of the same seed
        base = args.out / "base"
        links = [(run / "predictions" / "models" / "round1",
                  base / "predictions" / "models" / "round1")]
        if variant in FINE_TUNED:  # and the first-round models it fine-tunes
            names = [run_name(member_name(net, seed), fold)
                     for net in args.nets for fold in args.folds]
            links += [(run / "checkpoints" / n, base / "checkpoints" / n) for n in names]
        for link, target in links:
            if not link.exists():
                link.parent.mkdir(parents=True, exist_ok=True)
                link.symlink_to(target)
        if variant != "ft":  # the control reads no pseudo-labels
            sh([sys.executable, "-m", "pipeline.pseudo", "--params", str(params),
                "--set", f"models.seeds=[{seed}]"], run / "log.txt")
        pseudo_nets = list(args.nets)  # both rounds side by side, as the ensemble stage does
    train_and_predict(args, variant, seed, params)
    metrics = blend(args, run, args.nets, [seed], f"seed{seed}", pseudo_nets)
    return {"variant": variant, "seed": seed,
            "oof": metrics["uncalibrated"]["logloss"],
            "oof_calibrated": metrics["calibration"]["oof_logloss_after"],
            "temperature": metrics["calibration"]["temperature"],
            "models": {n: m["logloss"] for n, m in metrics["models"].items()},
            "weights": metrics["weights"]}


def summarize(rows: list[dict[str, Any]], args: argparse.Namespace) -> list[str]:
    base = {r["seed"]: r for r in rows if r["variant"] == "base"}
    lines = ["| technique | seeds | OOF log loss (mean) | base (mean) | paired diff mean | "
             "diff std | seeds better |", "|---|---|---|---|---|---|---|"]

    def line(name: str, pairs: list[tuple[float, float]]) -> None:
        if not pairs:
            return
        diffs = [v - b for v, b in pairs]
        sd = statistics.stdev(diffs) if len(diffs) > 1 else float("nan")
        lines.append(f"| {name} | {len(pairs)} | {statistics.mean(v for v, _ in pairs):.4f} | "
                     f"{statistics.mean(b for _, b in pairs):.4f} | "
                     f"{statistics.mean(diffs):+.4f} | {sd:.4f} | "
                     f"{sum(d < 0 for d in diffs)}/{len(diffs)} |")

    line("temperature (cross-fitted)", [(r["oof_calibrated"], r["oof"]) for r in base.values()])
    for variant in VARIANTS[1:]:
        line(variant, [(r["oof"], base[r["seed"]]["oof"]) for r in rows
                       if r["variant"] == variant and r["seed"] in base])
        line(f"{variant} + temperature", [(r["oof_calibrated"], base[r["seed"]]["oof"])
                                          for r in rows
                                          if r["variant"] == variant and r["seed"] in base])
    ft = {r["seed"]: r for r in rows if r["variant"] == "ft"}
    line("plft against ft: what the pseudo-labels add", [
        (r["oof"], ft[r["seed"]]["oof"]) for r in rows
        if r["variant"] == "plft" and r["seed"] in ft])
    seeds_row = next((r for r in rows if r["variant"] == "seeds"), None)
    if seeds_row:
        one = statistics.mean(r["oof"] for r in base.values())
        for k, value in sorted(seeds_row.get("curve", {}).items(), key=lambda kv: int(kv[0])):
            if int(k) > 1:  # the mean over every k-subset of the seeds: the gain per extra seed
                lines.append(f"| {k} seeds averaged (every {k}-subset) | {len(base)} | "
                             f"{value:.4f} | {one:.4f} | {value - one:+.4f} | | |")
    return lines


def seed_curve(args: argparse.Namespace, seeds: Sequence[int]) -> dict[str, float]:
    """Mean uncalibrated OOF log loss of blends of k seeds, over every k-subset, per k."""
    from itertools import combinations

    curve = {}
    for k in range(2, len(seeds) + 1):
        values = [blend(args, args.out / "base", args.nets, list(subset),
                        "seeds-" + "-".join(map(str, subset)))["uncalibrated"]["logloss"]
                  for subset in combinations(seeds, k)]
        curve[str(k)] = statistics.mean(values)
    return curve


def main(argv: Sequence[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m pipeline.tools.recipe_study",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("--records", type=Path, required=True)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--nets", nargs="+", default=["ndsb_net1"])
    p.add_argument("--folds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--variants", nargs="+", default=list(VARIANTS[:4]), choices=VARIANTS)
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--lr-steps", type=int, nargs="*", default=[20, 26])
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--tta-n", type=int, default=10)
    p.add_argument("--label-smoothing", type=float, default=0.1)
    p.add_argument("--ema-half-life", type=float, default=2.0)
    p.add_argument("--pseudo-fraction", type=float, default=PseudoSection.fraction)
    p.add_argument("--pseudo-finetune", type=float, default=PseudoSection.finetune,
                   help="plft and ft: the share of the schedule's epochs, at its end, that "
                        "the second round fine-tunes (pseudo.finetune)")
    p.add_argument("--base-precision", choices=["float32", "bfloat16", "auto"],
                   help="train.precision of every variant but bf16 (default: params.yaml's)")
    args = p.parse_args(argv)
    args.out, args.records = args.out.resolve(), args.records.resolve()
    if not 0 < args.pseudo_finetune <= 1:
        p.error(f"--pseudo-finetune must be in (0, 1], got {args.pseudo_finetune}")
    args.out.mkdir(parents=True, exist_ok=True)
    results = args.out / "results.jsonl"
    rows = [json.loads(x) for x in results.read_text().splitlines()] if results.exists() else []
    done = {(r["variant"], r["seed"]) for r in rows}
    order = ["base"] + [v for v in args.variants if v != "base"]  # the others pair with it
    for seed in args.seeds:
        for variant in order:
            if (variant, seed) in done:
                continue
            row = study_seed(args, variant, seed)
            rows.append(row)
            with open(results, "a") as fh:
                fh.write(json.dumps(row) + "\n")
            print(json.dumps(row), flush=True)
    base_seeds = sorted(r["seed"] for r in rows if r["variant"] == "base")
    if len(base_seeds) > 1:
        metrics = blend(args, args.out / "base", args.nets, base_seeds, "all-seeds")
        rows = [r for r in rows if r["variant"] != "seeds"] + [{
            "variant": "seeds", "seeds": base_seeds, "oof": metrics["uncalibrated"]["logloss"],
            "oof_calibrated": metrics["calibration"]["oof_logloss_after"],
            "per_net": metrics.get("seeds", {}), "curve": seed_curve(args, base_seeds)}]
    print("\n".join(summarize(rows, args)))
    (args.out / "summary.json").write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    main()

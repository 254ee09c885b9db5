"""Full-size rehearsal: the whole DVC pipeline on an NDSB-sized synthetic set, timed per stage.

``python -m pipeline.tools.rehearse DIR`` writes an NDSB-shaped synthetic folder (121 classes,
30,250 training and 130,400 test images: :mod:`pipeline.tools.synth`), copies this project's
stage code, ``dvc.yaml`` and ``params.yaml`` into ``DIR/repo`` (your workspace is not
touched), points ``data.root`` at the synthetic folder, shortens the expensive settings
(one small net, one epoch, two TTA views: ``--net --epochs --tta-n``) and runs every stage
with ``dvc repro --single-item`` in pipeline order. For each stage it prints, as JSON lines
and as a table, the wall time and the peak resident memory of its largest process
(``wait4``'s ``ru_maxrss`` over the stage's process tree).

Short settings keep the rehearsal to minutes; the real job's cost is then extrapolated per
stage from throughputs measured here: ``--bench`` (on by default) runs
:mod:`pipeline.tools.bench` for the thesis' net at the thesis' size (``ndsb_net1``, 128 px:
training img/s, and TTA views/s of the float path and of INT8), and the summary multiplies
them out for the thesis' settings (``--thesis-epochs``, 100 views, the rehearsal's folds).
Stages whose work does not depend on the net (ingest, ensemble, submit, score, report) ran at
full size already and are reported as measured.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Sequence

import yaml

ROOT = Path(__file__).resolve().parents[2]
COPY = ("pipeline", "nets", "dvc.yaml", ".dvc/config", "params.yaml")
NDSB = {"classes": 121, "per_class": 250, "test": 130_400}  # 30,250 train, 130,400 test


def run_measured(cmd: Sequence[str], cwd: Path, env: dict[str, str], log: Path
                 ) -> dict[str, Any]:
    """Run ``cmd``; return its wall time, exit code and the peak RSS (MiB) of its largest
    process (the child's own and its reaped descendants', as Linux's ``wait4`` reports)."""
    t0 = time.perf_counter()
    with open(log, "ab") as out:
        proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    return {"seconds": round(time.perf_counter() - t0, 1), "rc": proc.returncode,
            "peak_mib": round(usage.ru_maxrss / 1024, 1)}


def make_repo(repo: Path, data: Path, args: argparse.Namespace) -> dict[str, Any]:
    """Copy the project into ``repo`` with the rehearsal's settings; return its params."""
    if repo.exists():
        shutil.rmtree(repo)
    repo.mkdir(parents=True)
    for item in COPY:
        src = ROOT / item
        if src.exists():
            dest = repo / item
            dest.parent.mkdir(parents=True, exist_ok=True)
            (shutil.copytree if src.is_dir() else shutil.copy)(
                src, dest, **({"ignore": shutil.ignore_patterns("__pycache__")}
                              if src.is_dir() else {}))
    params = yaml.safe_load((repo / "params.yaml").read_text())
    folds = list(range(args.folds))
    params["data"].update(root=str(data), size=args.size, folds=args.folds)
    # The defaults' shape with the rehearsal's one net: its seeds, and a second round when the
    # defaults train one.
    params["models"].update(nets=[args.net], folds=folds,
                            pseudo_nets=[args.net] if params["models"].get("pseudo_nets") else [])
    params["train"].update(epochs=args.epochs, lr_steps=[], workers=args.workers)
    params["tta"].update(n=args.tta_n)
    params["score"].update(labels=str(data / "test_labels.csv"))
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    subprocess.run(["git", "init", "-q"], cwd=repo, check=True)
    return params


def stage_order(params: dict[str, Any]) -> list[str]:
    """``dvc repro --single-item`` targets in pipeline order (sample skipped: the data is
    synthetic). Matrix stages are named ``{stage}@{net}-{fold}-{seed}``, DVC's order of the
    matrix keys in dvc.yaml."""
    models = params["models"]

    def grid(nets: list[str]) -> list[str]:
        return [f"{net}-{fold}-{seed}" for net in nets for fold in models["folds"]
                for seed in models.get("seeds", [0])]

    first, second = grid(models["nets"]), grid(models.get("pseudo_nets") or [])
    return (["ingest"] + [f"train@{m}" for m in first] + [f"predict@{m}" for m in first]
            + ["pseudo"] + [f"train_pl@{m}" for m in second]
            + [f"predict_pl@{m}" for m in second] + ["ensemble", "bundle", "submit", "score", "report"])


def thesis_cost(bench: dict[str, dict[str, Any]], n_train: int, n_test: int, folds: int,
                epochs: int, views: int = 100) -> dict[str, Any]:
    """Hours per (net, fold) model of the thesis' settings from the bench's throughputs."""
    train_imgs = n_train * (folds - 1) / folds if folds > 1 else n_train
    valid_imgs = n_train / folds if folds > 1 else 0
    out: dict[str, Any] = {"epochs": epochs, "views": views, "train_images": round(train_imgs),
                           "predict_images": round(valid_imgs + n_test)}
    train = bench.get("main", {}).get("train_img_s")
    if train:
        out["train_hours"] = round(epochs * train_imgs / train / 3600, 1)
        out["train_img_s"] = train
    for key, label in (("tta_predict", "tta_float"), ("tta_int8", "tta_int8")):
        rate = bench.get(key, {}).get("views_s")
        if rate:
            out[f"{label}_views_s"] = rate
            out[f"{label}_hours"] = round((valid_imgs + n_test) * views / rate / 3600, 1)
    return out


def run_bench(env: dict[str, str], cwd: Path, log: Path, seconds: float
              ) -> dict[str, dict[str, Any]]:
    """The bench lines of the thesis' net at the thesis' size, keyed ``main`` (training and
    inference img/s), ``int8``, and ``tta_{variant}`` (views/s of each inference variant)."""
    cmd = [sys.executable, "-m", "pipeline.tools.bench", "--net", "ndsb_net1", "--size", "128",
           "--batch", "32", "--what", "train,infer,int8,tta", "--seconds", str(seconds)]
    out = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    with open(log, "a") as fh:
        fh.write(out.stdout + out.stderr)
    if out.returncode != 0:
        print(f"warning: bench failed (see {log}); no extrapolation", file=sys.stderr)
        return {}
    found: dict[str, dict[str, Any]] = {}
    for line in (json.loads(x) for x in out.stdout.splitlines() if x.startswith("{")):
        key = "tta_" + line["variant"] if line.get("what") == "tta" else line.get("what", "main")
        found[key] = line
    return found


def main(argv: Sequence[str] | None = None) -> None:
    p = argparse.ArgumentParser(description="Full-size rehearsal of the DVC pipeline.")
    p.add_argument("dir", type=Path, help="work folder (synthetic data, a copy of the repo)")
    p.add_argument("--classes", type=int, default=NDSB["classes"])
    p.add_argument("--per-class", type=int, default=NDSB["per_class"])
    p.add_argument("--test", type=int, default=NDSB["test"])
    p.add_argument("--size", type=int, default=64, help="data.size of the rehearsal")
    p.add_argument("--net", default="tinynet", help="the one net trained and predicted")
    p.add_argument("--folds", type=int, default=2)
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--tta-n", type=int, default=2)
    p.add_argument("--workers", type=int, default=1, help="train.workers")
    p.add_argument("--thesis-epochs", type=int, default=560)
    p.add_argument("--bench-seconds", type=float, default=10.0)
    p.add_argument("--no-bench", dest="bench", action="store_false")
    args = p.parse_args(argv)

    from pipeline.lib.runtime import available_cpus, cpu_kind
    from pipeline.tools.synth import generate

    base = args.dir.resolve()
    base.mkdir(parents=True, exist_ok=True)
    data, repo, log = base / "ndsb", base / "repo", base / "rehearsal.log"
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}:{os.environ['PATH']}",
               DVC_NO_ANALYTICS="1", DVC_NO_UPDATE_CHECK="1", PYTHONPATH=str(ROOT))
    rows: list[dict[str, Any]] = []
    stamp = data / ".synth.json"
    want = {"classes": args.classes, "per_class": args.per_class, "test": args.test}
    if not (stamp.exists() and json.loads(stamp.read_text()) == want):
        shutil.rmtree(data, ignore_errors=True)
        t0 = time.perf_counter()
        generate(data, args.classes, args.per_class, args.test, seed=0)
        stamp.write_text(json.dumps(want))
        rows.append({"stage": "synth (data generation)",
                     "seconds": round(time.perf_counter() - t0, 1), "rc": 0})
    params = make_repo(repo, data, args)
    for stage in stage_order(params):
        row = {"stage": stage, **run_measured(["dvc", "repro", "--single-item", stage], repo,
                                              env, log)}
        print(json.dumps(row), flush=True)
        rows.append(row)
        if row["rc"] != 0:
            sys.exit(f"rehearse failed: {stage} exited with {row['rc']}; see {log}")
    n_train = args.classes * args.per_class
    about = {"cpu": cpu_kind(), "cores": available_cpus(), "date": time.strftime("%Y-%m-%d"),
             "train_images": n_train, "test_images": args.test, "size": args.size,
             "net": args.net, "epochs": args.epochs, "tta_n": args.tta_n, "folds": args.folds}
    print(json.dumps({"rehearsal": about}))
    print("\n| stage | wall s | peak MiB |\n|---|---|---|")
    for row in rows:
        print(f"| {row['stage']} | {row['seconds']} | {row.get('peak_mib', '')} |")
    if args.bench:
        bench = run_bench(env, repo, log, args.bench_seconds)
        cost = thesis_cost(bench, n_train, args.test, args.folds, args.thesis_epochs)
        print(json.dumps({"thesis_cost_per_model": cost, "bench": bench}))


if __name__ == "__main__":
    main()

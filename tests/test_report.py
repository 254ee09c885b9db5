"""The report stage and the library it draws on (:mod:`pipeline.lib.results` for the tables,
:mod:`pipeline.lib.figures` for the figures): tables on constructed inputs, one-line errors, and
the static report of a tiny run.

The slow tests build a real (tiny) run with the stages' core functions — synthetic NDSB
folder, ingest, two nets with different activations on two folds, TTA predictions, ensemble —
once per session (:func:`build_run`, shared with ``test_notebooks.py``), then check what
``python -m pipeline.report`` writes against the prediction files themselves.
"""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from pipeline import report as R
from pipeline.lib import figures as F
from pipeline.lib import results
from pipeline.lib.fsutil import write_json
from tests.conftest import ROOT

# lenet (RReLU) and a slim vgg16 (ReLU): two nets with two activations, each trains in seconds.
NETS = {"lenet": {"act": "rrelu"}, "vgg16": {"act": "relu", "width": 0.0625}}
FOLDS = (0, 1)
BUILT = ".built"
EXPECTED_PNGS = {"ensemble_weights.png", "learning_curves.png", "activations.png",
                 "time_to_logloss.png", "tta_curve.png", "confusion.png", "per_class_logloss.png", "mistakes.png",
                 "samples.png"}


def build_run(base: Path) -> Path:
    """A project folder at ``base`` holding every output the report reads; built once.

    Laid out as the real project (``data/records``, ``checkpoints``, ``plots``, ``metrics``,
    ``predictions``) with the repository's ``params.yaml``, so notebooks and the report find
    it through their usual settings.
    """
    if (base / BUILT).exists():
        return base
    from pipeline import ensemble, predict, train
    from pipeline.ingest import Settings, ingest
    from pipeline.lib.settings import Paths, TrainSection, TTASection
    from pipeline.tools.synth import generate

    shutil.rmtree(base, ignore_errors=True)
    base.mkdir(parents=True)
    shutil.copy(ROOT / "params.yaml", base / "params.yaml")
    generate(base / "ndsb", classes=4, per_class=8, test=6, seed=3, max_size=80)
    records = base / "data" / "records"
    ingest(base / "ndsb", records, Settings(size=32), folds=len(FOLDS), workers=1)
    train_cfg = TrainSection.of(epochs=2, batch_size=8, lr_steps=[1], workers=0,
                                net_kwargs=NETS)
    tta_cfg = TTASection.of(n=4, work=str(base / "predictions" / "work"))
    paths = Paths.of(records=str(records), checkpoints=str(base / "checkpoints"),
                     metrics=str(base / "metrics"), plots=str(base / "plots"),
                     predictions=str(base / "predictions"))
    for net in NETS:
        for fold in FOLDS:
            train.train(train.Run(net, fold, train_cfg, paths))
            predict.predict(net, fold, tta_cfg, paths)
    ensemble.ensemble(list(NETS), None, base / "predictions" / "models", records,
                      base / "metrics" / "ensemble.json", base / "predictions")
    (base / BUILT).write_text("ok\n")
    return base


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory) -> Path:
    """The session's tiny run (see :func:`build_run`)."""
    return build_run(tmp_path_factory.getbasetemp() / "ndsb-tiny-run")


# ------------------------------------------------------------------- tables, no training


def _oof() -> results.Oof:
    probs = np.array([[0.8, 0.1, 0.1], [0.2, 0.7, 0.1], [0.9, 0.05, 0.05], [0.3, 0.3, 0.4]])
    return results.Oof(names=["a", "b", "c", "d"], y=np.array([0, 1, 1, 2]), probs=probs,
                 classes=["x", "y", "z"], index=np.arange(4))


def test_confusion_tables_follow_class_order():
    oof = _oof()
    pairs = results.confusion_pairs(oof)
    assert pairs.to_dict("records") == [{"actual": "x", "predicted": "x"},
                                        {"actual": "y", "predicted": "y"},
                                        {"actual": "y", "predicted": "x"},
                                        {"actual": "z", "predicted": "z"}]
    matrix = results.confusion_matrix(oof)
    assert list(matrix.index) == list(matrix.columns) == ["x", "y", "z"]
    assert matrix.loc["y", "x"] == 1 and matrix.to_numpy().sum() == 4


def test_confident_mistakes_and_per_class_use_the_metric():
    from pipeline.lib.metrics import ndsb_log_loss

    oof = _oof()
    mistakes = results.confident_mistakes(oof, 5)
    assert mistakes[["name", "actual", "predicted"]].values.tolist() == [["c", "y", "x"]]
    assert mistakes.loc[0, "confidence"] == pytest.approx(0.9)
    assert mistakes.loc[0, "logloss"] == pytest.approx(-np.log(0.05))
    per_class = results.per_class_logloss(oof).set_index("class")
    assert per_class.loc["y", "n"] == 2
    assert per_class.loc["y", "logloss"] == pytest.approx(
        ndsb_log_loss(np.array([1, 1]), oof.probs[[1, 2]]))
    assert per_class.index[0] == "y"  # worst first


def test_learning_curves_tta_and_activations_from_files(tmp_path):
    plots, metrics, ck = tmp_path / "plots", tmp_path / "metrics", tmp_path / "ck"
    plots.mkdir()
    for net, fold, act in (("a", 0, "relu"), ("a", 1, "relu"), ("b", 0, "rrelu")):
        rows = "".join(f"{e}\t0.01\t{2 / e}\t{3 / e}\t0.5\t10\n" for e in (1, 2, 3))
        (plots / f"train--{net}--fold{fold}.tsv").write_text(
            "epoch\tlr\ttrain_loss\tvalid_logloss\tvalid_accuracy\timg_s\n" + rows)
        write_json(ck / f"{net}--fold{fold}" / "model.json",
                   {"net": net, "kwargs": {"act": act, "bn": True, "classes": 3}, "epoch": 3})
        write_json(metrics / f"predict--{net}--fold{fold}.json",
                   {"valid_logloss_no_tta": 1.0, "valid_logloss_by_n": {"1": 1.2, "4": 0.9}})
    (plots / "confusion.csv").write_text("actual,predicted\nx,x\n")  # not a learning curve
    curves = results.learning_curves(plots)
    assert len(curves) == 9 and set(curves["net"]) == {"a", "b"}
    specs = results.run_specs(ck)
    assert dict(zip(specs["net"] + specs["fold"].astype(str), specs["act"])) == {
        "a0": "relu", "a1": "relu", "b0": "rrelu"}
    summary = results.activation_summary(curves, specs).set_index("act")
    assert summary.loc["relu", "folds"] == 2
    assert summary.loc["relu", "final_valid_logloss"] == pytest.approx(1.0)
    assert F.plot_activations(curves, specs) is not None
    assert F.plot_activations(curves[curves["net"] == "a"], specs) is None
    tta = results.tta_curves(metrics)
    assert sorted(tta.loc[tta["net"] == "b", "n"]) == [0, 1, 4]


def test_time_curves_sum_images_and_hours_per_run_and_name_the_schedule(tmp_path):
    plots, ck = tmp_path / "plots", tmp_path / "ck"
    plots.mkdir()
    header = "epoch\tlr\ttrain_loss\tvalid_logloss\tvalid_accuracy\timg_s\timages\tseconds\n"
    for member, fold, schedule in (("a-seed0", 0, "cosine"), ("a-seed1", 0, None),
                                   ("a", 1, None)):
        rows = "".join(f"{e}\t0.01\t1\t{3 / e}\t0.5\t10\t100\t{360 * e}\n" for e in (1, 2, 3))
        (plots / f"train--{member}--fold{fold}.tsv").write_text(header + rows)
        train = {"lr": 0.01} if schedule is None else {"schedule": schedule, "epochs": 3}
        write_json(ck / f"{member}--fold{fold}" / "model.json",
                   {"kwargs": {"act": "relu"}, "epoch": 3, "train": train})
    (plots / "train--old--fold0.tsv").write_text(  # before images/seconds were recorded
        "epoch\tlr\ttrain_loss\tvalid_logloss\tvalid_accuracy\timg_s\n1\t0.01\t1\t2\t0.5\t10\n")
    curves = results.learning_curves(plots)
    timed = results.time_curves(curves, results.run_specs(ck))
    assert "old" not in set(timed["net"])
    first = timed[(timed["seed"] == 0)].sort_values("epoch")
    assert first["variant"].iloc[0] == "a, cosine"
    assert first["images"].tolist() == [100, 200, 300]
    assert first["hours"].tolist() == pytest.approx([0.1, 0.3, 0.6])  # 360, 720, 1080 s
    assert first["oof"].tolist() == pytest.approx([3, 1.5, 1])
    assert set(timed.loc[timed["seed"] == 1, "variant"]) == {"a, steps"}
    assert timed.loc[timed["fold"] == 1, "seed"].isna().all()  # a member without a seed
    assert results.time_curves(curves[curves["net"] == "old"]).empty
    assert F.plot_time_to_logloss(timed) is not None


def test_settings_resolve_against_the_root(tmp_path):
    (tmp_path / "params.yaml").write_text("paths:\n  reports: elsewhere/html\n"
                                          "report:\n  mistakes: 3\n")
    cfg = results.settings(tmp_path)
    assert cfg.out == tmp_path.resolve() / "elsewhere" / "html" and cfg.mistakes == 3
    assert cfg.records == tmp_path.resolve() / "data" / "records"
    assert results.settings(tmp_path / "no-params").confusion.name == "confusion.csv"


def test_results_find_runs_by_their_names(tmp_path):
    """Runs are found through :mod:`pipeline.lib.runs`: what is not a run name is ignored,
    ``--fold-1`` is fold -1 (trained on every image)."""
    plots, metrics, ck = tmp_path / "plots", tmp_path / "metrics", tmp_path / "ck"
    header = "epoch\tlr\ttrain_loss\tvalid_logloss\tvalid_accuracy\timg_s\n"
    for name in ("train--net--fold-1.tsv", "train--a--b.tsv", "train--a--b--fold0.tsv",
                 "train--net.tsv", "predict--net--fold0.tsv"):
        (plots / name).parent.mkdir(parents=True, exist_ok=True)
        (plots / name).write_text(header + "1\t0.01\t2.0\t\t\t10\n")
    curves = results.learning_curves(plots)
    assert curves[["net", "fold"]].drop_duplicates().values.tolist() == [["net", -1]]
    for name in ("net--fold-1", "foo", "a--b", "net--fold1x"):
        write_json(ck / name / "model.json", {"kwargs": {"act": "relu"}, "epoch": 1})
    (ck / "other--fold2").mkdir()  # a run folder without a spec yet
    (ck / "file--fold3").write_text("not a folder")
    specs = results.run_specs(ck)
    assert specs[["net", "fold"]].values.tolist() == [["net", -1]]
    write_json(metrics / "train--net--fold-1.json", {"epochs": 1, "train_loss": 2.0})
    write_json(metrics / "train--a--b.json", {"epochs": 9})
    write_json(metrics / "predict--net--fold0.json", {"valid_logloss_no_tta": 1.0})
    write_json(metrics / "predict--net--fold-1.json", {"test_images": 3})  # no validation
    write_json(metrics / "predict--a--b.json", {"valid_logloss_no_tta": 5.0})
    final = results.train_metrics(metrics)
    assert final[["net", "fold", "epochs"]].values.tolist() == [["net", -1, 1]]
    tta = results.tta_curves(metrics)
    assert tta[["net", "fold", "n"]].values.tolist() == [["net", 0, 0]]


def test_missing_ensemble_outputs_are_results_errors(tmp_path):
    cfg = results.settings(tmp_path)
    with pytest.raises(results.ResultsError, match="run the pipeline up to the ensemble"):
        results.ensemble_summary(cfg.ensemble_metrics)
    meta = {"classes": ["x"], "train": [{"name": "a", "label": 0}]}
    with pytest.raises(results.ResultsError, match="valid--ensemble.npy"):
        results.load_oof(cfg, meta)


def _report_cli(root: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pipeline.report", "--root", str(root)],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("section, expected", [
    ("report:\n  bogus: 1\n", "params.yaml: report: unknown key(s) ['bogus']"),
    ("report:\n  mistakes: many\n", "params.yaml: report.mistakes: an integer >= 0, got 'many'"),
])
def test_broken_params_section_is_one_line_error(tmp_path, section, expected):
    (tmp_path / "params.yaml").write_text(section)
    done = _report_cli(tmp_path)
    assert done.returncode == 1, done.stderr[-3000:]
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("report failed: "), done.stderr
    assert expected in lines[0], done.stderr
    assert not done.stdout


def test_report_without_a_run_is_one_line_error(tmp_path):
    done = _report_cli(tmp_path)  # no params.yaml: defaults; no records: ingest first
    assert done.returncode == 1, done.stderr[-3000:]
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("report failed: ")
    assert "run the ingest stage first" in lines[0]


# ------------------------------------------------------------------------- on a tiny run


@pytest.mark.slow
def test_report_writes_every_file(tiny_run):
    out = tiny_run / "reports"
    out.mkdir(exist_ok=True)
    (out / "left-over.png").write_bytes(b"stale")
    R.main(["--root", str(tiny_run)])
    pngs = {p.name for p in out.glob("*.png")}
    assert pngs == EXPECTED_PNGS
    for name in pngs:
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    page = (out / "index.html").read_text()
    assert all(f"src='{name}'" in page for name in EXPECTED_PNGS)
    assert (tiny_run / "plots" / "confusion.csv").exists()


@pytest.mark.slow
def test_confusion_csv_rows_are_the_oof_predictions(tiny_run):
    cfg = results.settings(tiny_run)
    R.report(cfg)
    meta = json.loads((cfg.records / "meta.json").read_text())
    probs = np.load(tiny_run / "predictions" / "valid--ensemble.npy")
    names = (tiny_run / "predictions" / "valid--ensemble.names.txt").read_text().split()
    label = {r["name"]: meta["classes"][r["label"]] for r in meta["train"]}
    expected = pd.DataFrame({"actual": [label[n] for n in names],
                             "predicted": [meta["classes"][k] for k in probs.argmax(axis=1)]})
    written = pd.read_csv(cfg.confusion, dtype=str, keep_default_na=False)
    assert list(written.columns) == ["actual", "predicted"]
    assert len(written) == len(meta["train"])  # every train image is out of fold once
    pd.testing.assert_frame_equal(written, expected)


def test_technique_summary_shows_what_each_step_bought(tmp_path):
    from pipeline.lib.fsutil import write_json

    metrics = {"nets": ["a", "b"], "weights": {"a": 0.7, "b": 0.3},
               "models": {"a": {"logloss": 0.8, "accuracy": 0.7},
                          "b": {"logloss": 0.9, "accuracy": 0.6}},
               "seeds": {"a": {"members": {"a-seed0": 0.85, "a-seed1": 0.87},
                               "mean_single": 0.86, "averaged": 0.8, "gain": 0.06},
                         "b": {"members": {"b-seed0": 0.9}, "mean_single": 0.9,
                               "averaged": 0.9, "gain": 0.0}},
               "uncalibrated": {"logloss": 0.75, "accuracy": 0.7},
               "ensemble": {"logloss": 0.72, "accuracy": 0.7},
               "calibration": {"temperature": 1.2, "oof_logloss_before": 0.75,
                               "oof_logloss_after": 0.72}}
    write_json(tmp_path / "e.json", metrics)
    table = results.technique_summary(tmp_path / "e.json")
    assert list(table["step"]) == [
        "a-seed0 (one seed)", "a-seed1 (one seed)", "a: 2 seeds averaged", "b-seed0 (one seed)",
        "b: 1 seeds averaged", "blend of the nets (OOF-fitted weights)",
        "temperature 1.2 (cross-fitted)"]
    assert table["gain"].iloc[-2] == pytest.approx(0.05)
    assert table["gain"].iloc[-1] == pytest.approx(0.03)
    write_json(tmp_path / "bad.json", {"nets": ["a"]})
    with pytest.raises(results.ResultsError, match="not an ensemble metrics file"):
        results.technique_summary(tmp_path / "bad.json")

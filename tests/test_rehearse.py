"""The full-size rehearsal command, run at toy size: every stage through DVC, timed."""
from __future__ import annotations

import json

import pytest

from pipeline.tools import rehearse as R


def test_stage_order_and_thesis_cost_arithmetic():
    params = {"models": {"nets": ["a"], "folds": [0, 1], "seeds": [0], "pseudo_nets": []}}
    assert R.stage_order(params) == ["ingest", "train@a-0-0", "train@a-1-0", "predict@a-0-0",
                                     "predict@a-1-0", "pseudo", "ensemble", "bundle",
                                     "submit", "score", "report"]
    params["models"].update(seeds=[0, 3], pseudo_nets=["a"], folds=[1])
    assert R.stage_order(params) == ["ingest", "train@a-1-0", "train@a-1-3", "predict@a-1-0",
                                     "predict@a-1-3", "pseudo", "train_pl@a-1-0",
                                     "train_pl@a-1-3", "predict_pl@a-1-0", "predict_pl@a-1-3",
                                     "ensemble", "bundle", "submit", "score", "report"]
    bench = {"main": {"train_img_s": 20.0}, "tta_predict": {"views_s": 100.0},
             "tta_int8": {"views_s": 400.0}}
    cost = R.thesis_cost(bench, n_train=3600, n_test=7200, folds=2, epochs=10, views=100)
    assert cost["train_hours"] == pytest.approx(10 * 1800 / 20 / 3600, abs=0.05)
    assert cost["tta_float_hours"] == pytest.approx(9000 * 100 / 100 / 3600, abs=0.05)
    assert cost["tta_int8_hours"] == pytest.approx(9000 * 100 / 400 / 3600, abs=0.05)
    assert "train_hours" not in R.thesis_cost({}, 10, 10, 2, 10)


@pytest.mark.slow
def test_rehearsal_runs_every_stage_at_toy_size(tmp_path, capsys):
    R.main([str(tmp_path), "--classes", "3", "--per-class", "8", "--test", "6", "--size", "32",
            "--net", "lenet", "--tta-n", "2", "--no-bench"])
    out = capsys.readouterr().out
    rows = [json.loads(line) for line in out.splitlines() if line.startswith('{"stage"')]
    assert [r["stage"] for r in rows] == R.stage_order(
        {"models": {"nets": ["lenet"], "folds": [0, 1], "seeds": [0], "pseudo_nets": ["lenet"]}})
    assert all(r["rc"] == 0 and r["seconds"] > 0 and r["peak_mib"] > 50 for r in rows)
    assert "| ingest |" in out and (tmp_path / "repo" / "submissions").is_dir()
    about = json.loads(next(x for x in out.splitlines() if x.startswith('{"rehearsal"')))
    assert about["rehearsal"]["train_images"] == 24

"""The recipe study: every variant through the stages' own commands, paired over seeds."""
from __future__ import annotations

import argparse
import json

import pytest

from pipeline.ingest import Settings, ingest
from pipeline.tools import recipe_study as R
from pipeline.tools.synth import generate


def test_summary_pairs_each_variant_with_the_base_run_of_its_seed():
    rows = [{"variant": "base", "seed": 0, "oof": 1.0, "oof_calibrated": 0.9},
            {"variant": "base", "seed": 1, "oof": 2.0, "oof_calibrated": 1.7},
            {"variant": "ls", "seed": 0, "oof": 0.8, "oof_calibrated": 0.8},
            {"variant": "ls", "seed": 1, "oof": 2.1, "oof_calibrated": 1.9},
            {"variant": "seeds", "seeds": [0, 1], "oof": 1.2, "oof_calibrated": 1.1,
             "curve": {"2": 1.2}}]
    lines = R.summarize(rows, argparse.Namespace())
    temp = next(x for x in lines if x.startswith("| temperature"))
    assert "| 2 | 1.3000 | 1.5000 | -0.2000 | 0.1414 | 2/2 |" in temp
    ls = next(x for x in lines if x.startswith("| ls |"))
    assert "| 2 | 1.4500 | 1.5000 | -0.0500 | 0.2121 | 1/2 |" in ls
    assert any(x.startswith("| 2 seeds averaged") and "-0.3000" in x for x in lines)
    assert not any(x.startswith("| ema") for x in lines)  # not run: no row
    assert not any("against ft" in x for x in lines)
    rows += [{"variant": "plft", "seed": 0, "oof": 0.7, "oof_calibrated": 0.7},
             {"variant": "ft", "seed": 0, "oof": 0.75, "oof_calibrated": 0.75}]
    own = next(x for x in R.summarize(rows, argparse.Namespace()) if "against ft" in x)
    assert "| 1 | 0.7000 | 0.7500 | -0.0500 |" in own


@pytest.mark.slow
def test_study_runs_base_and_pseudo_labels_over_two_seeds(tmp_path, capsys):
    generate(tmp_path / "ndsb", classes=3, per_class=8, test=6, seed=3, max_size=60)
    ingest(tmp_path / "ndsb", tmp_path / "records", Settings(size=32), folds=2, workers=1)
    argv = ["--records", str(tmp_path / "records"), "--out", str(tmp_path / "study"),
            "--nets", "lenet", "--folds", "0", "--seeds", "0", "1", "--variants", "base",
            "pl", "--epochs", "1", "--lr-steps", "--batch-size", "8", "--tta-n", "2"]
    R.main(argv)
    rows = [json.loads(x) for x in (tmp_path / "study" / "results.jsonl").read_text()
            .splitlines()]
    assert {(r["variant"], r["seed"]) for r in rows} == {("base", 0), ("base", 1), ("pl", 0),
                                                         ("pl", 1)}
    pl = next(r for r in rows if r["variant"] == "pl")
    assert set(pl["models"]) == {"lenet", "lenet-pl"} and all(r["oof"] > 0 for r in rows)
    out = capsys.readouterr().out
    assert "| pl | 2 |" in out and "| 2 seeds averaged" in out
    # plft and its control ft, added later for one seed: both fine-tune that seed's base
    # model (the last epoch of the 1-epoch schedule), ft without pseudo-labels (no pseudo
    # stage run); the base run is reused.
    R.main(argv[:argv.index("--seeds")] + ["--seeds", "0", "--variants", "base", "plft", "ft",
                                           "--epochs", "1", "--lr-steps", "--batch-size", "8",
                                           "--tta-n", "2"])
    for variant in ("plft", "ft"):
        assert "fine-tuned from lenet-seed0--fold0" in (tmp_path / "study" / variant /
                                                        "log.txt").read_text()
    assert not (tmp_path / "study" / "ft" / "predictions" / "pseudo").exists()
    plft, ft = [json.loads(x) for x in (tmp_path / "study" / "results.jsonl").read_text()
                .splitlines()[-2:]]
    assert plft["variant"] == "plft" and set(plft["models"]) == {"lenet", "lenet-pl"}
    assert ft["variant"] == "ft" and set(ft["models"]) == {"lenet", "lenet-pl"}
    assert ft["oof"] != plft["oof"]
    out = capsys.readouterr().out
    assert "| plft | 1 |" in out and "| ft | 1 |" in out and "| plft against ft" in out
    summary = json.loads((tmp_path / "study" / "summary.json").read_text())
    assert summary[-1]["variant"] == "seeds" and summary[-1]["seeds"] == [0, 1]
    R.main(argv)  # a rerun trains nothing: every (variant, seed) is in results.jsonl
    assert len((tmp_path / "study" / "results.jsonl").read_text().splitlines()) == 6

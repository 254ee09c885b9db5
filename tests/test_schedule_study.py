"""The schedule study: time-to-log-loss curves per learning-rate schedule, over seeds."""
from __future__ import annotations

import json

import pytest

from pipeline.ingest import Settings, ingest
from pipeline.tools import schedule_study as S
from pipeline.tools.synth import generate


def test_runs_parse_and_the_thesis_steps_scale():
    assert S.parse_run("cosine:12") == ("cosine", 12)
    for bad in ("cosine", "linear:3", "steps:0", "steps:x"):
        with pytest.raises(S.StudyError, match="SCHEDULE:EPOCHS"):
            S.parse_run(bad)
    assert S.scaled_steps(560) == [400, 480]
    assert S.scaled_steps(12) == [9, 10]
    assert S.scaled_steps(1) == [1]


def _row(run, seed, points):
    schedule, epochs = S.parse_run(run)
    return {"run": run, "schedule": schedule, "epochs": epochs, "seed": seed,
            "curve": [{"epoch": i + 1, "images": 100.0 * (i + 1), "hours": 0.01 * (i + 1),
                       "oof": v} for i, v in enumerate(points)]}


def test_summary_measures_images_to_the_baselines_final_log_loss_per_seed():
    rows = [_row("steps:8", 0, [2.0, 1.8, 1.6, 1.5, 1.4, 1.3, 1.2, 1.0]),
            _row("steps:8", 1, [2.0, 1.8, 1.6, 1.5, 1.4, 1.3, 1.2, 1.1]),
            _row("steps:2", 0, [2.0, 1.5]),
            _row("cosine:2", 0, [1.2, 0.9]),    # reaches 1.0 after 200 of 800 images
            _row("cosine:2", 1, [1.2, 1.05]),   # reaches 1.1 after 200 of 800 images
            _row("onecycle:4", 0, [1.5, 1.2, 1.1, 0.95]),  # 400 of 800: not a quarter
            _row("onecycle:4", 1, [1.5, 1.2, 1.1, 1.0]),
            _row("onecycle:2", 0, [0.95, 1.05]),  # a dip below 1.0 on the way does not count
            _row("onecycle:2", 1, [1.2, 1.0])]
    table, lines = S.summarize(rows)
    got = {(t["run"], t["seed"]): t for t in table}
    assert got[("cosine:2", 0)]["images_to_baseline"] == 200
    assert got[("cosine:2", 1)]["fraction"] == pytest.approx(0.25)
    assert got[("onecycle:4", 0)]["fraction"] == pytest.approx(0.5)
    assert got[("steps:2", 0)]["images_to_baseline"] is None
    assert got[("steps:8", 1)]["fraction"] == 1.0
    assert got[("onecycle:2", 0)]["images_to_baseline"] == 100
    verdict = {x.split("|")[1].strip(): x.split("|")[-2].strip() for x in lines
               if x.count("|") == 8 and ":" in x.split("|")[1]}
    assert verdict == {"steps:8": "no", "cosine:2": "yes", "onecycle:4": "no", "steps:2": "no",
                       "onecycle:2": "no"}
    assert any(x.startswith("| cosine:2 | 2 | 0.25 | 0.9750 | -0.0750 | 2/2 |") for x in lines)
    assert "| steps:2 | 0 | 1.5000 | 1.0000 | not reached |" in "\n".join(lines)
    _, lines = S.summarize(rows + [_row("cosine:3", 7, [1.0, 1.0, 1.0])])  # seed 7: no baseline
    assert "| cosine:3 | 7 | 1.0000 | nan | not reached |" in "\n".join(lines)
    assert not any(x.startswith("| cosine:3 | 1 |") or x.startswith("| cosine:3 | 0 |")
                   for x in lines)  # nothing to pair it with: no summary line
    with pytest.raises(S.StudyError, match="baseline"):
        S.summarize([r for r in rows if r["schedule"] != "steps"])


def test_study_trains_each_schedule_and_plots_the_curves(tmp_path, capsys):
    generate(tmp_path / "ndsb", classes=3, per_class=8, test=3, seed=3, max_size=60)
    ingest(tmp_path / "ndsb", tmp_path / "records", Settings(size=32), folds=2, workers=1)
    out = tmp_path / "study"
    argv = ["--records", str(tmp_path / "records"), "--out", str(out), "--net", "lenet",
            "--runs", "steps:2", "cosine:1", "--seeds", "0", "--batch-size", "4"]
    S.main(argv)
    rows = [json.loads(x) for x in (out / "results.jsonl").read_text().splitlines()]
    assert [(r["run"], len(r["curve"])) for r in rows] == [("steps:2", 2), ("cosine:1", 1)]
    steps = rows[0]["curve"]
    # fold 0 of 24 images in 2 folds: 12 training images an epoch, summed over the epochs
    assert [p["images"] for p in steps] == [12, 24]
    assert 0 < steps[0]["hours"] < steps[1]["hours"] and all(p["oof"] > 0 for p in steps)
    params = (out / "cosine-1" / "params.yaml").read_text()
    assert "schedule: cosine" in params and "warmup_epochs: 0.2" in params
    assert "lr_steps:\n  - 1\n  - 2" in (out / "steps-2" / "params.yaml").read_text()
    assert (out / "time_to_logloss.png").stat().st_size > 0
    assert len((out / "curves.csv").read_text().splitlines()) == 1 + 3
    printed = capsys.readouterr().out
    assert "| cosine:1 | 0 |" in printed and "| steps:2 | 1 |" in printed
    S.main(argv)  # a rerun trains nothing: every (run, seed) is in results.jsonl
    assert len((out / "results.jsonl").read_text().splitlines()) == 2
    assert "log.txt" in {p.name for p in (out / "steps-2").iterdir()}
    S.main(argv[:6] + ["--runs", "steps:2", "onecycle:1", "--seeds", "0", "--summary-only"])
    assert not (out / "onecycle-1").exists()  # not trained: the summary has what is there
    assert len((out / "curves.csv").read_text().splitlines()) == 1 + 2


def test_study_without_a_baseline_is_a_one_line_error(tmp_path):
    with pytest.raises(SystemExit, match="schedule_study failed: --runs: a steps:EPOCHS run"):
        S.main(["--records", str(tmp_path), "--out", str(tmp_path / "o"), "--runs", "cosine:2"])
    with pytest.raises(SystemExit, match="--runs: each SCHEDULE:EPOCHS"):
        S.main(["--records", str(tmp_path), "--out", str(tmp_path / "o"), "--runs", "steps:-1"])

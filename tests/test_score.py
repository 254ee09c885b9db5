"""The NDSB metric against sklearn, the submission validator case by case, and the score CLI."""
from __future__ import annotations

import gzip
import json
import math
from pathlib import Path

import numpy as np
import pytest
from sklearn.metrics import log_loss

from pipeline.lib.metrics import evaluate, ndsb_log_loss, per_class_log_loss
from pipeline.lib.submission import SUM_TOLERANCE, check_submission, read_sample
from pipeline.score import main

CLASSES = ["copepod", "amphipod", "diatom"]  # deliberately not alphabetical
IMAGES = ["1.jpg", "2.jpg", "3.jpg"]


def kaggle_clip(probs: np.ndarray) -> np.ndarray:
    p = np.clip(probs, 1e-15, 1 - 1e-15)
    return p / p.sum(axis=1, keepdims=True)


# ---------------------------------------------------------------------------- metric


@pytest.mark.parametrize("seed,n_classes", [(0, 2), (1, 5), (2, 121), (3, 121)])
def test_log_loss_matches_sklearn_on_random_cases(seed: int, n_classes: int) -> None:
    rng = np.random.default_rng(seed)
    probs = rng.dirichlet(np.full(n_classes, 0.3), size=400)
    y = rng.integers(0, n_classes, size=400)  # with 121 classes some never occur: labels= needed
    expected = log_loss(y, probs, labels=np.arange(n_classes))
    assert ndsb_log_loss(y, probs) == pytest.approx(expected, rel=1e-9)


def test_log_loss_with_extreme_probabilities() -> None:
    # Exact 0 and 1 entries, including a true class predicted with probability 0.
    probs = np.array([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0], [0.5, 0.5, 0.0]])
    y = np.array([0, 0, 2, 2])
    # sklearn >= 1.5 clips to float64 eps, Kaggle to 1e-15; on Kaggle-clipped input the two
    # definitions coincide (the clipped values are inside sklearn's clip range).
    expected = log_loss(y, kaggle_clip(probs), labels=np.arange(3))
    assert ndsb_log_loss(y, probs) == pytest.approx(expected, rel=1e-12)
    # The cost of a confident miss is Kaggle's -log(1e-15 / row sum), about 34.54.
    miss = -math.log(1e-15 / (1 + 1e-15))
    assert ndsb_log_loss([1], [[1.0, 0.0, 0.0]]) == pytest.approx(miss, rel=1e-12)
    assert ndsb_log_loss([0], [[1.0, 0.0, 0.0]]) == pytest.approx(0.0, abs=1e-13)


def test_rows_are_renormalized_before_scoring() -> None:
    rng = np.random.default_rng(4)
    probs = rng.dirichlet(np.ones(4), size=50)
    y = rng.integers(0, 4, size=50)
    # Kaggle clips before normalizing, so only a scale keeping entries below 1 is neutral.
    assert ndsb_log_loss(y, 0.3 * probs) == pytest.approx(ndsb_log_loss(y, probs), rel=1e-12)


def test_accuracy_and_per_class_log_loss() -> None:
    probs = np.array([[0.7, 0.2, 0.1], [0.2, 0.5, 0.3], [0.6, 0.3, 0.1]])
    y = np.array([0, 1, 1])
    metrics = evaluate(y, probs, CLASSES)
    assert metrics["accuracy"] == pytest.approx(2 / 3)
    assert metrics["n"] == 3
    per_class = per_class_log_loss(y, probs, CLASSES)
    assert per_class["copepod"] == {"n": 1, "logloss": pytest.approx(-math.log(0.7)),
                                    "accuracy": 1.0}
    assert per_class["amphipod"]["logloss"] == pytest.approx(-(math.log(0.5) + math.log(0.3)) / 2)
    assert "diatom" not in per_class  # no labelled row: undefined, left out


# ------------------------------------------------------------------------- validator


def write_csv(path: Path, header: list[str], rows: list[list[object]]) -> Path:
    lines = [",".join(header)] + [",".join(str(x) for x in row) for row in rows]
    text = "\n".join(lines) + "\n"
    if path.name.endswith(".gz"):
        path.write_bytes(gzip.compress(text.encode()))
    else:
        path.write_text(text)
    return path


def good_rows() -> list[list[object]]:
    return [["1.jpg", 0.7, 0.2, 0.1], ["2.jpg", 0.1, 0.8, 0.1], ["3.jpg", 0.3, 0.3, 0.4]]


def check(tmp_path: Path, header: list[str], rows: list[list[object]],
          name: str = "sub.csv") -> list[str]:
    return check_submission(write_csv(tmp_path / name, header, rows), CLASSES, IMAGES)


def one_problem(problems: list[str], *words: str) -> str:
    assert len(problems) == 1, problems
    for word in words:
        assert word in problems[0], problems[0]
    return problems[0]


@pytest.mark.parametrize("name", ["sub.csv", "sub.csv.gz"])
def test_valid_submission_has_no_problems(tmp_path: Path, name: str) -> None:
    assert check(tmp_path, ["image", *CLASSES], good_rows(), name) == []


def test_missing_row(tmp_path: Path) -> None:
    one_problem(check(tmp_path, ["image", *CLASSES], good_rows()[:2]),
                "missing image row", "'3.jpg'")


def test_extra_row(tmp_path: Path) -> None:
    rows = good_rows() + [["4.jpg", 0.2, 0.2, 0.6]]
    one_problem(check(tmp_path, ["image", *CLASSES], rows), "extra image row", "'4.jpg'")


def test_duplicate_row(tmp_path: Path) -> None:
    rows = good_rows() + [["2.jpg", 0.1, 0.8, 0.1]]
    one_problem(check(tmp_path, ["image", *CLASSES], rows), "duplicate image row", "'2.jpg'")


def test_reordered_columns(tmp_path: Path) -> None:
    header = ["image", "amphipod", "copepod", "diatom"]  # alphabetical: the classic mistake
    one_problem(check(tmp_path, header, good_rows()), "reordered", "'copepod'", "'amphipod'")


def test_wrong_column(tmp_path: Path) -> None:
    header = ["image", "copepod", "amphipod", "radiolarian"]
    problems = check(tmp_path, header, good_rows())
    assert any("missing class column" in p and "'diatom'" in p for p in problems), problems
    assert any("unexpected column" in p and "'radiolarian'" in p for p in problems), problems


def test_duplicate_column(tmp_path: Path) -> None:
    header = ["image", "copepod", "amphipod", "copepod"]
    problems = check(tmp_path, header, good_rows())
    assert any("duplicate column" in p and "'copepod'" in p for p in problems), problems


def test_missing_image_column(tmp_path: Path) -> None:
    header = ["id", *CLASSES]
    problems = check(tmp_path, header, good_rows())
    assert any("missing 'image' column" in p for p in problems), problems


def test_nan_value(tmp_path: Path) -> None:
    rows = good_rows()
    rows[1][2] = ""
    one_problem(check(tmp_path, ["image", *CLASSES], rows),
                "NaN or empty", "'2.jpg'", "'amphipod'")


def test_non_numeric_value(tmp_path: Path) -> None:
    rows = good_rows()
    rows[2][3] = "high"
    one_problem(check(tmp_path, ["image", *CLASSES], rows),
                "non-numeric", "'3.jpg'", "'diatom'", "'high'")


def test_negative_value(tmp_path: Path) -> None:
    rows = good_rows()
    rows[0] = ["1.jpg", 1.1, -0.1, 0.0]
    one_problem(check(tmp_path, ["image", *CLASSES], rows), "negative", "'1.jpg'", "'amphipod'")


def test_row_not_summing_to_one(tmp_path: Path) -> None:
    rows = good_rows()
    rows[2] = ["3.jpg", 0.3, 0.3, 0.3]
    one_problem(check(tmp_path, ["image", *CLASSES], rows), "do not sum to 1", "'3.jpg'", "0.9")


def test_rounding_within_tolerance_is_accepted(tmp_path: Path) -> None:
    rows = good_rows()
    rows[0] = ["1.jpg", 0.7 + SUM_TOLERANCE / 2, 0.2, 0.1]
    assert check(tmp_path, ["image", *CLASSES], rows) == []


def test_missing_file(tmp_path: Path) -> None:
    one_problem(check_submission(tmp_path / "nope.csv"), "file not found")


def test_check_cli_reports_each_problem_and_exits_1(tmp_path: Path, capsys) -> None:
    sample = write_csv(tmp_path / "sample.csv", ["image", *CLASSES],
                       [[i, "0.333333", "0.333333", "0.333333"] for i in IMAGES])
    rows = good_rows()[:2] + [["2.jpg", 0.1, 0.8, 0.1]]
    sub = write_csv(tmp_path / "sub.csv", ["image", *CLASSES], rows)
    with pytest.raises(SystemExit) as exit_info:
        main(["--check", str(sub), "--sample", str(sample)])
    assert exit_info.value.code == 1
    err = capsys.readouterr().err
    assert "missing image row" in err and "duplicate image row" in err
    assert read_sample(sample) == (CLASSES, IMAGES)
    good = write_csv(tmp_path / "good.csv", ["image", *CLASSES], good_rows())
    main(["--check", str(good), "--sample", str(sample)])
    assert "OK" in capsys.readouterr().out


# ------------------------------------------------------------------------------ score


def test_score_cli_writes_metrics(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)  # no params.yaml here: arguments alone must do
    sub = write_csv(tmp_path / "sub.csv.gz", ["image", *CLASSES], good_rows())
    labels = tmp_path / "labels.csv"
    labels.write_text("image,class\n3.jpg,diatom\n1.jpg,copepod\n2.jpg,copepod\n")
    out = tmp_path / "metrics" / "score.json"
    main([str(sub), str(labels), "--out", str(out)])
    metrics = json.loads(out.read_text())
    probs = np.array([r[1:] for r in good_rows()], dtype=float)
    assert metrics["logloss"] == pytest.approx(ndsb_log_loss([0, 0, 2], probs))
    assert metrics["accuracy"] == pytest.approx(2 / 3)
    assert metrics["n"] == 3 and metrics["n_unscored"] == 0
    assert set(metrics["per_class"]) == {"copepod", "diatom"}


def test_score_cli_fails_on_unknown_label_class_and_missing_image(tmp_path: Path) -> None:
    sub = write_csv(tmp_path / "sub.csv", ["image", *CLASSES], good_rows())
    labels = tmp_path / "labels.csv"
    labels.write_text("image,class\n1.jpg,copepod\n9.jpg,diatom\n2.jpg,shrimp\n")
    with pytest.raises(SystemExit) as exit_info:
        main([str(sub), str(labels), "--out", str(tmp_path / "score.json")])
    message = str(exit_info.value.code)
    assert "'shrimp'" in message and "'9.jpg'" in message
    assert not (tmp_path / "score.json").exists()

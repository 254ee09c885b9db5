"""Submission building: columns matched by name to a non-alphabetical sample, rows, gzip output."""
from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from pipeline.lib.fsutil import write_json
from pipeline.lib.predictions import save_prediction_file
from pipeline.lib.submission import SubmissionError, check_submission
from pipeline.submit import build_submission, main, submit

META_CLASSES = ["copepod", "amphipod", "diatom", "radiolarian"]  # meta (ingest) order
SAMPLE_CLASSES = ["diatom", "copepod", "radiolarian", "amphipod"]  # not alphabetical, not meta
TEST = ["a.jpg", "b.jpg", "c.jpg"]


def probs_for(names: list[str]) -> np.ndarray:
    """Distinct, row-normalized values so any column or row mix-up changes the numbers."""
    rng = np.random.default_rng(0)
    return rng.dirichlet(np.ones(len(META_CLASSES)), size=len(names))


def write_sample(path: Path, classes: list[str], images: list[str]) -> Path:
    rows = [",".join([i] + ["0.25"] * len(classes)) for i in images]
    path.write_text("\n".join([",".join(["image", *classes]), *rows]) + "\n")
    return path


def test_columns_follow_non_alphabetical_sample_by_name(tmp_path: Path) -> None:
    names = ["c.jpg", "a.jpg", "b.jpg"]  # prediction rows in yet another order
    probs = probs_for(names)
    sample_images = ["b.jpg", "c.jpg", "a.jpg"]
    frame = build_submission(probs, names, META_CLASSES, TEST, SAMPLE_CLASSES, sample_images)
    assert list(frame.columns) == ["image", *SAMPLE_CLASSES]
    assert SAMPLE_CLASSES != sorted(SAMPLE_CLASSES)
    assert list(frame["image"]) == sample_images
    for i, image in enumerate(names):
        row = frame.set_index("image").loc[image]
        for k, cls in enumerate(META_CLASSES):
            assert row[cls] == pytest.approx(probs[i, k])


def test_written_file_matches_sample_and_validates(tmp_path: Path) -> None:
    sample = write_sample(tmp_path / "sampleSubmission.csv", SAMPLE_CLASSES, TEST)
    pred = tmp_path / "test--ensemble.npy"
    save_prediction_file(pred, probs_for(TEST), TEST)
    write_json(tmp_path / "meta.json", {"classes": META_CLASSES,
                                        "test": [{"name": n} for n in TEST]})
    out = tmp_path / "sub" / "submission.csv.gz"
    submit(pred, tmp_path, out, sample)
    with gzip.open(out, "rt") as fh:
        header = fh.readline().strip().split(",")
        first = fh.readline().strip().split(",")
    assert header == ["image", *SAMPLE_CLASSES]
    assert all(len(v) <= 12 for v in first[1:]), first  # compact '%.6g' numbers
    frame = pd.read_csv(out)
    k = META_CLASSES.index("diatom")
    assert frame.loc[0, "diatom"] == pytest.approx(probs_for(TEST)[0, k], rel=1e-5)
    assert check_submission(out, SAMPLE_CLASSES, TEST) == []
    before = out.read_bytes()
    submit(pred, tmp_path, out, sample)
    assert out.read_bytes() == before  # gzip header has no timestamp or temp name


def test_without_sample_uses_meta_order(tmp_path: Path) -> None:
    frame = build_submission(probs_for(TEST), TEST[::-1], META_CLASSES, TEST)
    assert list(frame.columns) == ["image", *META_CLASSES]
    assert list(frame["image"]) == TEST


def test_rows_follow_the_sample_ingest_found_and_a_skipped_image_is_named(tmp_path: Path
                                                                          ) -> None:
    """Without submit.sample_submission, the rows are those of data.root's sample that ingest
    recorded: a test image skipped at ingest fails here instead of a short submission."""
    pred = tmp_path / "test--ensemble.npy"
    save_prediction_file(pred, probs_for(TEST[:2]), TEST[:2])  # c.jpg was skipped at ingest
    write_json(tmp_path / "meta.json", {
        "classes": META_CLASSES, "test": [{"name": n} for n in TEST[:2]],
        "sample_submission": {"file": "sampleSubmission.csv", "images": TEST}})
    with pytest.raises(SubmissionError, match="c.jpg"):
        submit(pred, tmp_path, tmp_path / "s.csv.gz")
    assert not (tmp_path / "s.csv.gz").exists()
    save_prediction_file(pred, probs_for(TEST), TEST[::-1])
    frame = submit(pred, tmp_path, tmp_path / "s.csv.gz")
    assert list(frame["image"]) == TEST


def test_rows_are_normalized() -> None:
    frame = build_submission(3 * probs_for(TEST), TEST, META_CLASSES, TEST)
    assert np.allclose(frame[META_CLASSES].sum(axis=1), 1.0)


def test_sample_with_different_classes_fails_naming_them() -> None:
    sample = ["diatom", "copepod", "radiolarian", "shrimp"]
    with pytest.raises(SubmissionError) as err:
        build_submission(probs_for(TEST), TEST, META_CLASSES, TEST, sample, TEST)
    assert "'amphipod'" in str(err.value) and "'shrimp'" in str(err.value)


def test_sample_with_different_images_fails_naming_them() -> None:
    with pytest.raises(SubmissionError) as err:
        build_submission(probs_for(TEST), TEST, META_CLASSES, TEST, SAMPLE_CLASSES,
                         ["a.jpg", "b.jpg", "z.jpg"])
    message = str(err.value)
    assert "1 missing ['z.jpg']" in message and "1 extra ['c.jpg']" in message


def test_nan_predictions_are_refused() -> None:
    probs = probs_for(TEST)
    probs[1, 2] = np.nan
    with pytest.raises(SubmissionError, match="NaN"):
        build_submission(probs, TEST, META_CLASSES, TEST)


def test_failed_write_leaves_no_file(tmp_path: Path, monkeypatch) -> None:
    pred = tmp_path / "test--ensemble.npy"
    save_prediction_file(pred, probs_for(TEST), TEST)
    write_json(tmp_path / "meta.json", {"classes": META_CLASSES,
                                        "test": [{"name": n} for n in TEST]})

    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(pd.DataFrame, "to_csv", broken)
    out = tmp_path / "sub" / "submission.csv.gz"
    with pytest.raises(OSError, match="disk full"):
        submit(pred, tmp_path, out)
    assert list(out.parent.iterdir()) == []  # neither the final name nor a temporary file


def test_main_reads_params_and_cli_overrides(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    pred = Path("predictions/test--ensemble.npy")
    save_prediction_file(pred, probs_for(TEST), TEST)
    write_json("meta.json", {"classes": META_CLASSES, "test": [{"name": n} for n in TEST]})
    write_sample(tmp_path / "sample.csv", SAMPLE_CLASSES, TEST)
    Path("params.yaml").write_text("submit:\n  sample_submission: sample.csv\n"
                                   "paths:\n  records: .\n")
    main(["--set", "paths.submission=out.csv", "--set", "submit.plain_csv=true"])
    assert Path("out.csv").read_text().startswith("image," + ",".join(SAMPLE_CLASSES))
    with pytest.raises(SystemExit, match="plain_csv"):
        main(["--set", "paths.submission=out.csv"])  # gzip under a .csv name is refused
    Path("params.yaml").write_text("submit:\n  bogus: 1\n")
    with pytest.raises(SystemExit,
                       match=r"^submit failed: params.yaml: submit: unknown key.*bogus"):
        main([])

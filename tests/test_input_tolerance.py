"""CSV files as spreadsheet programs save them: a UTF-8 byte-order mark and CRLF line ends.

Excel and other Windows programs write sampleSubmission.csv, submissions and label files that
way. Every stage that reads them must see the same columns, rows and numbers as in the plain
LF file: no ``\\ufeffimage`` first column, no ``\\r`` stuck to the last class or value.
(Ingest's reading of the sample submission is tested in test_ingest.py.)
"""
from __future__ import annotations

import gzip
import json
from pathlib import Path

import numpy as np
import pytest

from pipeline import score, submit
from pipeline.lib.fsutil import write_json
from pipeline.lib.predictions import save_prediction_file
from pipeline.lib.submission import check_submission, read_csv, read_sample

CLASSES = ["diatom", "copepod", "radiolarian", "amphipod"]  # not alphabetical
IMAGES = ["b.jpg", "c.jpg", "a.jpg"]
BOM = "\ufeff"
VARIANTS = ["lf", "bom+crlf", "gzip+bom+crlf"]


def encode(text: str, variant: str) -> bytes:
    """``text`` (LF line ends) saved as ``variant``: lf, bom+crlf or gzip+bom+crlf."""
    if "crlf" in variant:
        text = text.replace("\n", "\r\n")
    if "bom" in variant:
        text = BOM + text
    data = text.encode("utf-8")
    return gzip.compress(data) if "gzip" in variant else data


def write(path: Path, rows: list[list[object]], variant: str) -> Path:
    text = "".join(",".join(str(x) for x in row) + "\n" for row in rows)
    path.write_bytes(encode(text, variant))
    if "bom" in variant and "gzip" not in variant:
        assert path.read_bytes().startswith(b"\xef\xbb\xbfimage,") and b"\r\n" in path.read_bytes()
    return path


def sample_rows(classes: list[str] = CLASSES) -> list[list[object]]:
    return [["image", *classes]] + [[i] + ["0.25"] * len(classes) for i in IMAGES]


def submission_rows(classes: list[str] = CLASSES) -> list[list[object]]:
    values = {"b.jpg": [0.7, 0.1, 0.1, 0.1], "c.jpg": [0.1, 0.6, 0.2, 0.1],
              "a.jpg": [0.05, 0.05, 0.1, 0.8]}
    order = [CLASSES.index(c) for c in classes]
    return [["image", *classes]] + [[i] + [values[i][k] for k in order] for i in IMAGES]


# ------------------------------------------------------------------------------ score stage


@pytest.mark.parametrize("variant", VARIANTS)
def test_read_sample_strips_bom_and_crlf(tmp_path: Path, variant: str) -> None:
    sample = write(tmp_path / f"sample-{variant}.csv", sample_rows(), variant)
    assert read_sample(sample) == (CLASSES, IMAGES)
    header, rows = read_csv(sample)
    assert header == ["image", *CLASSES]
    assert rows.shape == (3, 5) and rows[4].tolist() == [0.25] * 3  # numbers, not "0.25\r"


@pytest.mark.parametrize("variant", VARIANTS)
def test_score_check_accepts_bom_and_crlf_files(tmp_path: Path, variant: str, capsys) -> None:
    sample = write(tmp_path / "sample.csv", sample_rows(), variant)
    name = "sub.csv.gz" if "gzip" in variant else "sub.csv"
    sub = write(tmp_path / name, submission_rows(), variant)
    score.main(["--check", str(sub), "--sample", str(sample)])
    assert capsys.readouterr().out.strip() == f"{sub}: OK"


def test_score_check_still_finds_problems_in_bom_and_crlf_files(tmp_path: Path,
                                                                  capsys) -> None:
    sample = write(tmp_path / "sample.csv", sample_rows(), "bom+crlf")
    swapped = [CLASSES[1], CLASSES[0], *CLASSES[2:]]
    sub = write(tmp_path / "sub.csv", submission_rows(swapped), "bom+crlf")
    with pytest.raises(SystemExit) as exit_info:
        score.main(["--check", str(sub), "--sample", str(sample)])
    assert exit_info.value.code == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "class columns are reordered" in err[0], err  # not "no 'image'"


@pytest.mark.parametrize("variant", ["bom+crlf", "gzip+bom+crlf"])
def test_score_gives_the_same_metrics_for_bom_and_crlf_files(tmp_path: Path,
                                                             variant: str) -> None:
    labels = [["image", "class"], ["b.jpg", "diatom"], ["c.jpg", "copepod"],
              ["a.jpg", "diatom"]]
    metrics = {}
    for v in ("lf", variant):
        folder = tmp_path / v
        folder.mkdir()
        sub = write(folder / ("sub.csv.gz" if "gzip" in v else "sub.csv"), submission_rows(), v)
        truth = write(folder / "labels.csv", labels, v)
        out = folder / "score.json"
        score.main([str(sub), str(truth), "--out", str(out)])
        metrics[v] = json.loads(out.read_text())
    assert metrics[variant] == metrics["lf"]
    assert metrics["lf"]["n"] == 3 and metrics["lf"]["accuracy"] == pytest.approx(2 / 3)
    assert set(metrics["lf"]["per_class"]) == {"diatom", "copepod"}


# ----------------------------------------------------------------------------- submit stage


def _predictions(tmp_path: Path) -> tuple[Path, Path]:
    """A prediction file (rows in yet another order) and a records folder's meta.json."""
    meta_classes = ["copepod", "amphipod", "diatom", "radiolarian"]
    names = ["c.jpg", "a.jpg", "b.jpg"]
    probs = np.random.default_rng(0).dirichlet(np.ones(len(meta_classes)), size=len(names))
    pred = tmp_path / "predictions" / "test--ensemble.npy"
    save_prediction_file(pred, probs, names)
    records = tmp_path / "records"
    write_json(records / "meta.json", {"classes": meta_classes,
                                       "test": [{"name": n} for n in sorted(names)]})
    return pred, records


@pytest.mark.parametrize("variant", ["bom+crlf", "gzip+bom+crlf"])
@pytest.mark.parametrize("plain_csv", [True, False])
def test_submit_follows_a_bom_and_crlf_sample_submission(tmp_path: Path, variant: str,
                                                         plain_csv: bool) -> None:
    pred, records = _predictions(tmp_path)
    written = {}
    for v in ("lf", variant):
        sample = write(tmp_path / f"sample-{v}.csv", sample_rows(), v)
        out = tmp_path / f"sub-{v}.csv{'' if plain_csv else '.gz'}"
        frame = submit.submit(pred, records, out, sample_submission=sample,
                                       plain_csv=plain_csv)
        assert list(frame.columns) == ["image", *CLASSES]
        assert list(frame["image"]) == IMAGES
        assert check_submission(out, CLASSES, IMAGES) == []
        written[v] = out.read_bytes() if plain_csv else gzip.decompress(out.read_bytes())
    assert written[variant] == written["lf"]  # the sample's BOM and CRs do not leak through
    assert written["lf"].startswith(("image," + ",".join(CLASSES) + "\n").encode())
    assert b"\r" not in written["lf"] and not written["lf"].startswith(b"\xef\xbb\xbf")

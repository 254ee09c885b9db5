"""Hostile inputs (issue 26, items 4-6): names no submission can carry, hidden files, a sample
submission that disagrees with test/, decompression bombs, damaged records and meta.json,
damaged sample submissions given to ``score --check``.

Each case ends in ONE line naming the file(s) and the fix, exit code 1, no traceback, and
leaves the earlier output as it was; where skipping is asked for (``data.skip_bad``) the file
is skipped and listed instead.
"""
from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess
import sys
import zlib
from pathlib import Path
from typing import Callable

import numpy as np
import pytest

from pipeline import ingest as I
from pipeline.lib.images import decode
from pipeline.lib.predictions import load_prediction_file, save_prediction_file
from pipeline.lib.records import RecordReader, RecordsError, load_meta
from pipeline.lib.submission import (SubmissionError, check_submission, name_problem,
                                     read_sample, write_sample_submission)
from pipeline.submit import build_submission, write_submission
from tests.conftest import ROOT, organism, write_png

CLASSES = ["diatom", "copepod", "amphipod"]  # the sample's (non-alphabetical) order
TEST = ["1.png", "2.png", "3.png"]  # the test images of the ndsb_folder fixture


def bomb_png(path: Path, side: int = 20000) -> Path:
    """A ``side`` x ``side`` 1-bit PNG of zeros: a few dozen KB that decode to ``side**2``
    pixels (8 bits each in PIL, 400 MB at the default side)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return (struct.pack(">I", len(data)) + kind + data
                + struct.pack(">I", zlib.crc32(kind + data)))

    rows = b"\0" * ((1 + side // 8) * 1000)  # 1000 rows: filter byte + packed bits, all 0
    z = zlib.compressobj(9)
    body = b"".join(z.compress(rows) for _ in range(side // 1000)) + z.flush()
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", side, side,
                                                                      1, 0, 0, 0, 0))
                     + chunk(b"IDAT", body) + chunk(b"IEND", b""))
    return path


def snapshot(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


@pytest.fixture
def data(ndsb_folder: Path, tmp_path: Path) -> tuple[Path, Path]:
    """(root, records): the fixture folder with a sample submission listing its test images,
    ingested once: the earlier output that a failed run must leave alone."""
    write_sample_submission(ndsb_folder / "sampleSubmission.csv", TEST, CLASSES)
    records = tmp_path / "records"
    run_cli(ndsb_folder, records, tmp_path)
    return ndsb_folder, records


def run_cli(root: Path, records: Path, tmp_path: Path, **extra) -> str | None:
    """``python -m pipeline.ingest --params P`` in-process: its SystemExit message, or None
    when it succeeds."""
    params = {"root": str(root), "size": 16, "folds": 2, "workers": 1, **extra}
    path = tmp_path / "params.yaml"
    path.write_text(json.dumps({"data": params, "paths": {"records": str(records)},  # JSON is YAML
                                "models": {"folds": [0, 1]}}))
    try:
        I.main(["--params", str(path)])
    except SystemExit as exc:
        return str(exc.code)
    return None


# ------------------------------------------------------------------------ ingest: the table


def _copy_test(root: Path, name: str | bytes, into: str = "test") -> Path:
    folder = root / into
    folder.mkdir(parents=True, exist_ok=True)
    target = folder / (os.fsdecode(name) if isinstance(name, bytes) else name)
    shutil.copy(root / "test" / "1.png", target)
    return target


def _no_sample(root: Path) -> None:
    (root / "sampleSubmission.csv").unlink()


def _append_row(root: Path, row: str) -> None:
    with open(root / "sampleSubmission.csv", "a") as fh:
        fh.write(row + ",0.333333,0.333333,0.333333\n")


# (case, change to the good folder -> the bad file or None, words of the one line, skippable)
INGEST_CASES: list[tuple[str, Callable[[Path], Path | None], list[str], bool]] = [
    ("newline in a test name", lambda r: _copy_test(r, "new\nline.png"),
     ["'new\\nline.png'", "control character", "rename the file", "data.skip_bad"], True),
    ("carriage return in a train name", lambda r: _copy_test(r, "a\rb.png", "train/copepod"),
     ["a\\rb.png", "control character", "rename the file"], True),
    ("name that is not UTF-8", lambda r: _copy_test(r, b"caf\xe9.png", "train/diatom"),
     ["caf\\udce9.png", "not valid UTF-8", "rename the file"], True),
    ("test image named NA", lambda r: (_append_row(r, "NA"), _copy_test(r, "NA"))[1],
     ["test/NA", "missing value", "rename the file"], True),
    ("decompression bomb", lambda r: bomb_png(r / "train" / "copepod" / "bomb.png"),
     ["bomb.png", "20000 x 20000", "over the limit of 89,478,485", "data.max_pixels",
      "data.skip_bad"], True),
    ("class folder named image",
     lambda r: (_no_sample(r), _copy_test(r, "x.png", "train/image"))[1],
     ["train/image", "image column", "rename the folder"], False),
    ("sample image missing from test/", lambda r: (r / "test" / "2.png").unlink(),
     ["1 image(s) of sampleSubmission.csv missing from test/ ['2.png']"], False),
    ("test image not in the sample", lambda r: _copy_test(r, "4.png"),
     ["1 file(s) in test/ not in sampleSubmission.csv ['4.png']"], False),
    ("dot-named test image not in the sample", lambda r: _copy_test(r, "..000002.png"),
     ["not in sampleSubmission.csv ['..000002.png']"], False),
    ("sample lists an image twice", lambda r: _append_row(r, "2.png"),
     ["listed more than once", "'2.png'"], False),
]


@pytest.mark.parametrize("case, change, words, skippable", INGEST_CASES,
                         ids=[c[0] for c in INGEST_CASES])
def test_ingest_refuses_in_one_line_and_keeps_the_earlier_records(data, tmp_path, capsys, case,
                                                                   change, words, skippable):
    root, records = data
    before = snapshot(records)
    bad = change(root)
    message = run_cli(root, records, tmp_path)
    assert message is not None and message.startswith("ingest failed: "), message
    assert "\n" not in message and "\r" not in message
    for word in words:
        assert word in message, (word, message)
    assert snapshot(records) == before
    if not skippable:
        assert run_cli(root, records, tmp_path, skip_bad=True) == message
        assert snapshot(records) == before
        return
    capsys.readouterr()
    assert run_cli(root, records, tmp_path, skip_bad=True) is None
    assert "1 skipped (listed in" in capsys.readouterr().out
    listed = json.loads((records / "bad_files.json").read_text())["skipped"]
    assert [b["path"] for b in listed] == [str(bad)]
    meta = load_meta(records)
    assert bad.name not in {e["name"].split("/")[-1] for e in meta["train"] + meta["test"]}


def test_the_bomb_is_one_line_and_exit_code_1_from_the_real_command(data, tmp_path):
    root, records = data
    bomb_png(root / "test" / "bomb.png")
    _append_row(root, "bomb.png")
    params = tmp_path / "p.yaml"
    params.write_text(json.dumps({"data": {"root": str(root), "size": 16, "folds": 2,
                                           "workers": 2},
                                  "paths": {"records": str(records)},
                                  "models": {"folds": [0, 1]}}))
    done = subprocess.run([sys.executable, "-m", "pipeline.ingest", "--params", str(params)],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr[-3000:]
    last = done.stderr.replace("\r", "\n").strip().splitlines()[-1]
    assert last.startswith("ingest failed: 1 bad file(s)") and "bomb.png: too large" in last


def test_decode_refuses_a_bomb_from_its_header_without_decoding(tmp_path, monkeypatch):
    from PIL import Image

    bomb = bomb_png(tmp_path / "bomb.png")
    assert bomb.stat().st_size < 100_000
    limit = Image.MAX_IMAGE_PIXELS

    def no_decoding(self):
        raise AssertionError("pixels decoded")

    monkeypatch.setattr(Image.Image, "load", no_decoding)
    with pytest.raises(ValueError, match=r"too large: 20000 x 20000 = 400,000,000 pixels"):
        decode(str(bomb), 255)
    assert Image.MAX_IMAGE_PIXELS == limit  # PIL's own check is back for everyone else
    monkeypatch.undo()
    small = write_png(tmp_path / "small.png", organism(30, 20, 0))
    assert decode(str(small), 255, max_pixels=600).shape == (30, 20)
    with pytest.raises(ValueError, match=r"30 = 630 pixels, over the limit of 629"):
        decode(str(write_png(tmp_path / "wide.png", organism(30, 21, 0))), 255, max_pixels=629)


# ------------------------------------------------------------- ingest: what it lets through


def test_hidden_files_are_decided_and_counted_never_dropped_silently(data, tmp_path, capsys):
    root, records = data
    (root / "test" / "2.png").rename(root / "test" / "..2.png")  # an image, named oddly
    sample = root / "sampleSubmission.csv"
    sample.write_text(sample.read_text().replace("\n2.png,", "\n..2.png,"))
    real_fork = _copy_test(root, "._1.png", "train/diatom")  # a "._" name, a real PNG
    apple_double = b"\x00\x05\x16\x07\x00\x02\x00\x00Mac OS X        " + bytes(50)
    (root / "train" / "diatom" / "._diatom_0.png").write_bytes(apple_double)
    (root / "test" / ".gitkeep").write_bytes(b"")
    _copy_test(root, "1.png", "test/.thumbnails")
    (root / "train" / ".git").mkdir()
    (root / "train" / ".git" / "HEAD").write_text("ref: refs/heads/main\n")
    capsys.readouterr()
    assert run_cli(root, records, tmp_path) is None
    summary = capsys.readouterr().out
    meta = load_meta(records)
    assert sorted(e["name"] for e in meta["test"]) == ["..2.png", "1.png", "3.png"]
    assert f"diatom/{real_fork.name}" in {e["name"] for e in meta["train"]}
    assert "ignored 1 operating-system file (._*)" in summary, summary
    assert "ignored 2 files in hidden folders ('test/.thumbnails', 'train/.git')" in summary
    assert "ignored 1 file hidden and not named like an image ('test/.gitkeep')" in summary


def test_meta_records_the_sample_submission_and_what_skipping_leaves_out(data, tmp_path,
                                                                        capsys):
    root, records = data
    assert load_meta(records)["sample_submission"] == {"file": "sampleSubmission.csv",
                                                       "images": TEST}
    good = (root / "test" / "3.png").read_bytes()
    (root / "test" / "3.png").write_bytes(good[:len(good) // 2])
    assert run_cli(root, records, tmp_path, skip_bad=True) is None
    assert ("1 image(s) of sampleSubmission.csv skipped as bad ['3.png']: a submission will "
            "lack their rows") in capsys.readouterr().out
    meta = load_meta(records)
    assert meta["sample_submission"]["images"] == TEST
    assert [e["name"] for e in meta["test"]] == ["1.png", "2.png"]
    _no_sample(root)
    (root / "test" / "3.png").write_bytes(good)
    assert run_cli(root, records, tmp_path) is None
    assert load_meta(records)["sample_submission"] is None


# Names any of our formats (names.txt, the submission CSV read back) would change or refuse,
# and names that look odd but travel intact.
NAMES = [
    ("a\nb.jpg", "control character"), ("a\rb.jpg", "control character"),
    ("a\tb.jpg", "control character"), ("a\x1cb.jpg", "control character"),
    ("a\u2028b.jpg", "control character"), ("a\udcffb.jpg", "not valid UTF-8"),
    ("NA", "missing value"), ("nan", "missing value"), ("#N/A", "missing value"),
    ("a,b.jpg", None), ('a"b.jpg', None), ("..000002.jpg", None), (" 1.jpg", None),
    ("caf\xe9.jpg", None), ("1e5", None), ("=1+1", None),
]


@pytest.mark.parametrize("name, reason", NAMES, ids=[repr(n) for n, _ in NAMES])
def test_every_name_ingest_accepts_travels_intact(tmp_path, name, reason):
    problem = name_problem(name)
    if reason is not None:
        assert problem is not None and reason in problem
        return
    assert problem is None
    names = ["0.jpg", name]
    save_prediction_file(tmp_path / "p.npy", np.full((2, 2), 0.5), names)
    assert load_prediction_file(tmp_path / "p.npy")[1] == names
    frame = build_submission(np.full((2, 2), 0.5), names, ["c1", "c2"])
    write_submission(frame, tmp_path / "s.csv.gz")
    assert check_submission(tmp_path / "s.csv.gz", ["c1", "c2"], names) == []
    write_sample_submission(tmp_path / "sample.csv", names, ["c1", "c2"])
    assert read_sample(tmp_path / "sample.csv") == (["c1", "c2"], names)


# ------------------------------------------------------------------ damaged records and meta


def _flip(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0xFF
    path.write_bytes(bytes(data))


def _offset(records: Path, i: int) -> int:
    return int((records / "train.idx").read_text().splitlines()[i].split("\t")[1])


def _forget_checksums(records: Path) -> None:
    """Make ``records`` look written by an ingest that recorded no checksums."""
    meta = json.loads((records / "meta.json").read_text())
    del meta["sha256"]
    (records / "meta.json").write_text(json.dumps(meta))


# (case, file, byte to flip (from the records), words without checksums in meta.json)
DAMAGE = [
    ("RecordIO magic", "train.rec", lambda r: _offset(r, 1) + 1,
     "record 1 has no RecordIO magic number"),
    ("record length", "train.rec", lambda r: _offset(r, 1) + 5,
     "record 1 has a length that does not reach the next record"),
    ("image header label", "train.rec", lambda r: _offset(r, 1) + 15,
     "record 1 has an image header ingest does not write"),
    ("index line", "train.idx", lambda r: 0, "line 1 is not '<key><TAB><offset>'"),
]


@pytest.mark.parametrize("case, file, where, words", DAMAGE, ids=[d[0] for d in DAMAGE])
def test_damaged_records_stop_when_opened(data, case, file, where, words):
    _, records = data
    _flip(records / file, where(records))
    with pytest.raises(RecordsError) as err:
        RecordReader(records, "train")
    message = str(err.value)
    assert message.startswith(f"{records / file}: damaged") and "sha256" in message
    assert message.endswith("rerun ingest (dvc repro -f ingest)")
    _forget_checksums(records)  # records of an earlier ingest: the framing still tells
    with pytest.raises(RecordsError, match="rerun ingest") as err:
        RecordReader(records, "train")
    assert str(err.value).startswith(f"{records / file}: damaged: {words}"), str(err.value)


def test_a_damaged_image_is_reported_by_record_index_and_name(data):
    _, records = data
    name = load_meta(records)["train"][1]["name"]
    _flip(records / "train.rec", _offset(records, 1) + 8 + 24 + 60)  # inside the PNG data
    with pytest.raises(RecordsError, match="sha256"):
        RecordReader(records, "train")
    _forget_checksums(records)
    reader = RecordReader(records, "train")
    reader.read(0)
    with pytest.raises(RecordsError) as err:
        reader.read(1)
    assert str(err.value) == (f"{records / 'train.rec'}: record 1 ({name!r}) does not decode as "
                              "an image: the file is damaged; rerun ingest (dvc repro -f ingest)")


def test_a_record_damaged_after_opening_is_reported_when_read(data):
    _, records = data
    reader = RecordReader(records, "train")
    _flip(records / "train.rec", _offset(records, 2) + 1)  # the magic number of record 2
    with pytest.raises(RecordsError, match=r"train.rec: record 2 \('.+'\) is not a readable "
                                           r"RecordIO record: the file is damaged; rerun ingest"):
        reader.read(2)


META_DAMAGE = [
    ("truncated", lambda text: text[:len(text) // 2], "not readable as JSON"),
    ("empty", lambda text: "", "not readable as JSON"),
    ("a list", lambda text: "[]", "a JSON list instead of an object"),
    ("no train entries", lambda text: json.dumps({k: v for k, v in json.loads(text).items()
                                                  if k != "train"}), "no 'train'"),
    ("label outside the classes",
     lambda text: text.replace('"label": 0', '"label": 9', 1), "train entry"),
]


@pytest.mark.parametrize("case, damage, words", META_DAMAGE, ids=[d[0] for d in META_DAMAGE])
def test_damaged_meta_json_is_one_line_with_the_fix(data, case, damage, words):
    _, records = data
    meta = records / "meta.json"
    meta.write_text(damage(meta.read_text()))
    for opening in (load_meta, lambda r: RecordReader(r, "train")):
        with pytest.raises(RecordsError) as err:
            opening(records)
        message = str(err.value)
        assert message.startswith(f"{meta}: damaged") and words in message, message
        assert message.endswith(": rerun ingest (dvc repro -f ingest)") and "\n" not in message


def test_train_on_a_damaged_record_header_stops_in_one_line_before_training(data, tmp_path):
    _, records = data
    _forget_checksums(records)
    _flip(records / "train.rec", _offset(records, 1) + 1)
    params = tmp_path / "p.yaml"
    params.write_text(json.dumps({"train": {"epochs": 1, "batch_size": 4, "workers": 1,
                                            "lr_steps": []},
                                  "paths": {"records": str(records),
                                            "checkpoints": str(tmp_path / "ck"),
                                            "metrics": str(tmp_path / "m"),
                                            "plots": str(tmp_path / "pl")},
                                  "models": {"folds": [0, 1]}}))
    done = subprocess.run([sys.executable, "-m", "pipeline.train", "--net", "tinynet", "--fold",
                           "0", "--params", str(params)],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr[-3000:]
    assert done.stderr.strip().splitlines()[-1] == (
        f"train failed: {records / 'train.rec'}: damaged: record 1 has no RecordIO magic "
        "number at its start; rerun ingest (dvc repro -f ingest)")
    assert not list((tmp_path / "ck").rglob("model.params"))


# -------------------------------------------------------------------- score --check's sample


def _csv(path: Path, header: list[str], rows: list[list[str]]) -> Path:
    path.write_text("\n".join(",".join(r) for r in [header, *rows]) + "\n")
    return path


SAMPLES = [
    ("duplicated column", ["image", "a", "b", "a"], [["x.jpg", "0.3", "0.4", "0.3"]],
     "duplicate class column(s) 'a'"),
    ("duplicated row", ["image", "a", "b"], [["x.jpg", "0.5", "0.5"]] * 2,
     "1 image(s) listed more than once, e.g. 'x.jpg'"),
    ("empty image name", ["image", "a", "b"], [["x.jpg", "0.5", "0.5"], ["", "0.5", "0.5"]],
     "1 row(s) with an empty image name (CSV lines 3)"),
]


@pytest.mark.parametrize("case, header, rows, words", SAMPLES, ids=[s[0] for s in SAMPLES])
def test_score_check_refuses_a_damaged_sample_in_one_line(tmp_path, case, header, rows, words):
    from pipeline import score

    good = _csv(tmp_path / "good.csv", ["image", "a", "b"], [["x.jpg", "0.5", "0.5"]])
    sample = _csv(tmp_path / "sample.csv", header, rows)
    with pytest.raises(SystemExit) as err:
        score.main(["--check", str(good), "--sample", str(sample)])
    assert str(err.value.code) == (f"score failed: {sample}: not a usable sample submission: "
                                   f"{words}: use the competition's sampleSubmission.csv")
    with pytest.raises(SubmissionError):
        read_sample(sample)


def test_a_repeated_expected_column_is_a_problem_not_a_crash(tmp_path):
    good = _csv(tmp_path / "good.csv", ["image", "a", "b"], [["x.jpg", "0.5", "0.5"]])
    problems = check_submission(good, ["a", "b", "a"], ["x.jpg"])
    assert problems == ["the expected class columns repeat 'a'"]


def test_records_split_around_the_magic_number_pass_and_their_damaged_parts_do_not(tmp_path):
    """RecordIO splits a record whose data holds its magic number into parts (cflag 1, 2, 3);
    the check follows them: whole, they pass; a damaged part stops the reader."""
    import mxnet as mx

    from pipeline.lib.records import RECORDIO_MAGIC, check_records

    magic = struct.pack("<I", RECORDIO_MAGIC)
    writer = mx.recordio.MXIndexedRecordIO(str(tmp_path / "train.idx"),
                                           str(tmp_path / "train.rec"), "w")
    for i in range(3):
        body = b"abcd" * 3 + magic + b"efgh" * 2 + magic + b"xy" if i == 1 else b"plain"
        writer.write_idx(i, mx.recordio.pack(mx.recordio.IRHeader(0, float(i), i, 0), body))
    writer.close()
    assert check_records(tmp_path, "train") == [0, 1, 2]
    second_part = _offset(tmp_path, 1) + 8 + 24 + 12  # where the first part ends
    _flip(tmp_path / "train.rec", second_part)
    with pytest.raises(RecordsError, match="record 1 has a broken split record"):
        check_records(tmp_path, "train")

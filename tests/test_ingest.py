"""Ingest: round trips, class order, every bad-input case, determinism, folds, conversions,
sample submissions saved by spreadsheets, operating-system files, the CLI's one-line errors."""
from __future__ import annotations

import gzip
import json
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipeline.ingest import (IngestError, Settings, ingest, main, read_sample_header,
                             stratified_folds)
from pipeline.lib.images import fit_square, whiten
from pipeline.lib.records import RecordReader, fold_indices, load_meta
from pipeline.lib.submission import write_sample_submission
from tests.conftest import organism, write_png

SIZE = 32


def run(root: Path, out: Path, **kw):
    settings = Settings(size=kw.pop("size", SIZE), format=kw.pop("format", "png"))
    return ingest(root, out, settings, folds=kw.pop("folds", 2), workers=kw.pop("workers", 1),
                  **kw)


def test_round_trip_png_is_exact(ndsb_folder, tmp_path):
    meta = run(ndsb_folder, tmp_path / "rec")
    reader = RecordReader(tmp_path / "rec", "train")
    assert len(reader) == len(meta["train"]) == 12
    for i, entry in enumerate(meta["train"]):
        label, img = reader.read(i)
        cls, _ = entry["name"].split("/")
        assert meta["classes"][int(label)] == cls == meta["classes"][entry["label"]]
        original = np.asarray(Image.open(ndsb_folder / "train" / entry["name"]))
        assert (entry["height"], entry["width"]) == original.shape
        np.testing.assert_array_equal(img, fit_square(original, SIZE, 255))
    test = RecordReader(tmp_path / "rec", "test")
    assert [e["name"] for e in meta["test"]] == ["1.png", "2.png", "3.png"]
    assert all(test.read(i)[0] == -1 for i in range(len(test)))


def test_round_trip_jpeg_within_tolerance(ndsb_folder, tmp_path):
    meta = run(ndsb_folder, tmp_path / "rec", format="jpg")
    reader = RecordReader(tmp_path / "rec", "train")
    for i, entry in enumerate(meta["train"]):
        original = np.asarray(Image.open(ndsb_folder / "train" / entry["name"]))
        diff = np.abs(reader.read(i)[1].astype(int) - fit_square(original, SIZE, 255))
        assert diff.mean() < 3 and np.percentile(diff, 99) < 40


def test_fit_square_keeps_aspect_and_pads_with_background():
    img = np.zeros((20, 80), np.uint8)
    out = fit_square(img, 40, 255)
    assert out.shape == (40, 40)
    dark_rows = np.flatnonzero(out.min(axis=1) < 128)
    assert len(dark_rows) == 10 and out[:15].min() == 255 and out[25:].min() == 255


def assert_labels_follow(meta: dict, records: Path, order: list) -> None:
    """meta's classes are ``order`` and every record's label names its class folder."""
    assert meta["classes"] == order
    reader = RecordReader(records, "train")
    for i, entry in enumerate(meta["train"]):
        assert order[int(reader.read(i)[0])] == entry["name"].split("/")[0]


def test_class_order_sorted_without_sample(ndsb_folder, tmp_path):
    assert run(ndsb_folder, tmp_path / "rec")["classes"] == ["amphipod", "copepod", "diatom"]


def test_class_order_follows_non_alphabetical_sample_header(ndsb_folder, tmp_path):
    order = ["diatom", "copepod", "amphipod"]
    write_sample_submission(ndsb_folder / "sampleSubmission.csv", ["1.png", "2.png", "3.png"],
                            order)
    assert_labels_follow(run(ndsb_folder, tmp_path / "rec"), tmp_path / "rec", order)


def test_sample_header_disagreeing_with_folders_names_differences(ndsb_folder, tmp_path):
    write_sample_submission(ndsb_folder / "sampleSubmission.csv", ["1.png"],
                            ["diatom", "copepod", "shrimp"])
    with pytest.raises(IngestError) as err:
        run(ndsb_folder, tmp_path / "rec")
    assert "shrimp" in str(err.value) and "amphipod" in str(err.value)


SAMPLE_ORDER = ["diatom", "copepod", "amphipod"]  # neither sorted nor the folders' order


def _sample_text(classes: list[str]) -> str:
    """A sample submission as LF-terminated text (uniform probabilities)."""
    rows = [",".join(["image", *classes])]
    rows += [",".join([f"{j}.png"] + ["0.333333"] * len(classes)) for j in (1, 2, 3)]
    return "\n".join(rows) + "\n"


@pytest.mark.parametrize("variant", ["bom", "crlf", "bom+crlf", "gzip+bom+crlf"])
def test_sample_submission_saved_by_a_spreadsheet_gives_the_same_class_order(
        ndsb_folder, tmp_path, variant):
    clean_root = tmp_path / "clean"
    clean_root.mkdir()
    (clean_root / "sampleSubmission.csv").write_text(_sample_text(SAMPLE_ORDER))
    assert read_sample_header(clean_root / "sampleSubmission.csv") == SAMPLE_ORDER

    text = _sample_text(SAMPLE_ORDER)
    if "crlf" in variant:
        text = text.replace("\n", "\r\n")
    data = (("\ufeff" if "bom" in variant else "") + text).encode("utf-8")
    if "gzip" in variant:
        data = gzip.compress(data)
    assert data.startswith(b"\xef\xbb\xbf") == (variant in ("bom", "bom+crlf"))
    sample = ndsb_folder / "sampleSubmission.csv"
    sample.write_bytes(data)
    assert read_sample_header(sample) == SAMPLE_ORDER  # no "\ufeffimage", no "amphipod\r"
    assert_labels_follow(run(ndsb_folder, tmp_path / "rec"), tmp_path / "rec", SAMPLE_ORDER)


def test_sample_submission_problems_are_ingest_errors(ndsb_folder, tmp_path):
    sample = ndsb_folder / "sampleSubmission.csv"
    sample.write_text(_sample_text(["diatom", "copepod", "diatom", "amphipod"]))
    with pytest.raises(IngestError, match=r"duplicate class columns \['diatom'\]"):
        run(ndsb_folder, tmp_path / "rec")
    sample.write_text("")
    with pytest.raises(IngestError, match="first column must be 'image'"):
        run(ndsb_folder, tmp_path / "rec")
    sample.write_bytes("image,diatom,cop\xe9pod,amphipod\n".encode("latin-1"))
    with pytest.raises(IngestError, match="cannot read as CSV: not UTF-8 text"):
        run(ndsb_folder, tmp_path / "rec")


APPLE_DOUBLE = b"\x00\x05\x16\x07\x00\x02\x00\x00Mac OS X        " + bytes(50)


def _add_os_files(root: Path) -> int:
    """Leave the files Windows and macOS leave behind all over ``root``; return how many of
    them are inside train/ and test/ (those outside are never read, so never counted)."""
    train, test = root / "train", root / "test"
    good_png = (train / "copepod" / "copepod_0.png").read_bytes()
    files = {
        train / "copepod" / "Thumbs.db": os.urandom(300),
        test / "Thumbs.db": os.urandom(300),
        train / "desktop.ini": b"[.ShellClassInfo]\r\n",  # beside the class folders
        train / "diatom" / "Desktop.INI": b"[.ShellClassInfo]\r\n",
        train / ".DS_Store": os.urandom(64),
        train / "amphipod" / ".DS_Store": os.urandom(64),
        # A zip made on macOS: resource forks mirroring the tree, including a fork of the
        # class folder itself and an (odd) real image that must not become a test duplicate.
        train / "__MACOSX" / "copepod" / "._copepod_0.png": APPLE_DOUBLE,
        train / "__MACOSX" / "._copepod": APPLE_DOUBLE,
        train / "amphipod" / "__MACOSX" / "._amphipod_1.png": APPLE_DOUBLE,
        test / "__MACOSX" / "._1.png": APPLE_DOUBLE,
        test / "__MACOSX" / "1.png": good_png,
        root / "__MACOSX" / "train" / "diatom" / "._diatom_0.png": APPLE_DOUBLE,
    }
    for path, data in files.items():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    return sum(1 for path in files if root / "__MACOSX" not in path.parents)


def test_operating_system_files_are_ignored_and_counted(ndsb_folder, tmp_path, capsys):
    run(ndsb_folder, tmp_path / "clean")
    assert "operating-system" not in capsys.readouterr().out
    n = _add_os_files(ndsb_folder)
    assert n == 11
    meta = run(ndsb_folder, tmp_path / "junk")
    summary = capsys.readouterr().out
    assert (f"ignored {n} operating-system files (Thumbs.db, desktop.ini, .DS_Store, __MACOSX/)"
            in summary), summary
    assert meta["classes"] == ["amphipod", "copepod", "diatom"]  # no "__MACOSX" class
    assert len(meta["train"]) == 12 and len(meta["test"]) == 3
    # Records, meta.json and bad_files.json are byte for byte those of the run without them, so
    # the stages after ingest do not re-run when Windows or macOS touch the data folder.
    clean = {p.name: p.read_bytes() for p in (tmp_path / "clean").iterdir()}
    junk = {p.name: p.read_bytes() for p in (tmp_path / "junk").iterdir()}
    assert sorted(junk) == sorted(clean) and junk == clean
    assert json.loads(clean["bad_files.json"]) == {"skipped": [], "problems": []}


def test_main_reports_every_error_on_one_line(ndsb_folder, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as err:  # the params file itself is read inside
        main(["--params", "missing.yaml"])
    assert str(err.value.code).startswith("ingest failed: missing.yaml not found")
    out = tmp_path / "rec"
    params = tmp_path / "params.yaml"
    params.write_text(f"data:\n  root: {ndsb_folder}\n  size: 4\npaths:\n  records: {out}\n")
    with pytest.raises(SystemExit) as err:
        main(["--params", str(params)])
    assert err.value.code == f"ingest failed: {params}: data.size: an integer in [8, 1024], got 4"
    params.write_text(f"data:\n  root: {ndsb_folder}\n  size: 16\n  workers: 1\n  folds: 2\n"
                      f"paths:\n  records: {out}\nmodels:\n  folds: [0, 1]\n")
    _corrupt_cases(ndsb_folder)
    with pytest.raises(SystemExit) as err:
        main(["--params", str(params)])
    message = str(err.value.code)
    assert message.startswith("ingest failed: 6 bad file(s)") and "\n" not in message
    assert "zero.png: zero-byte file" in message and "dangling.png: unreadable" in message
    assert not (out / "meta.json").exists()


def _corrupt_cases(root: Path) -> dict[str, str]:
    """Write one bad file of every kind; return {file name: expected words in the reason}."""
    train = root / "train" / "copepod"
    (train / "zero.png").write_bytes(b"")
    (train / "notes.txt").write_text("not an image at all")
    (train / "garbage.jpg").write_bytes(os.urandom(2000))
    good = (train / "copepod_0.png").read_bytes()
    (train / "truncated.png").write_bytes(good[: len(good) // 2])
    jpeg = root / "full.jpg"
    Image.fromarray(organism(80, 80, 1)).save(jpeg, quality=90)
    (root / "test" / "truncated.jpg").write_bytes(jpeg.read_bytes()[:600])
    jpeg.unlink()
    os.symlink(root / "does-not-exist.png", root / "test" / "dangling.png")
    return {"zero.png": "zero-byte", "notes.txt": "not an image", "garbage.jpg": "not an image",
            "truncated.png": "truncated", "truncated.jpg": "truncated",
            "dangling.png": "unreadable"}


def test_every_bad_file_is_named_and_nothing_is_written(ndsb_folder, tmp_path):
    cases = _corrupt_cases(ndsb_folder)
    out = tmp_path / "rec"
    with pytest.raises(IngestError) as err:
        run(ndsb_folder, out)
    message = str(err.value)
    for name, reason in cases.items():
        line = next(l for l in message.splitlines() if name in l)
        assert reason in line, (name, line)
    assert not out.exists() or list(out.iterdir()) == []


def test_failed_ingest_leaves_previous_records_untouched(ndsb_folder, tmp_path):
    out = tmp_path / "rec"
    run(ndsb_folder, out)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    _corrupt_cases(ndsb_folder)
    with pytest.raises(IngestError):
        run(ndsb_folder, out)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    load_meta(out)  # still consistent


def test_skip_bad_skips_and_reports(ndsb_folder, tmp_path):
    cases = _corrupt_cases(ndsb_folder)
    out = tmp_path / "rec"
    meta = run(ndsb_folder, out, skip_bad=True)
    report = json.loads((out / "bad_files.json").read_text())
    assert sorted(Path(b["path"]).name for b in report["skipped"]) == sorted(cases)
    assert len(meta["train"]) == 12 and len(meta["test"]) == 3
    reader = RecordReader(out, "train")
    assert len(reader) == 12
    for i in range(len(reader)):  # record ids are contiguous after skipping
        assert reader.read(i)[1].shape == (SIZE, SIZE)


@pytest.mark.parametrize("layout_problem, expected", [
    ("no_train", "train: missing folder"),
    ("no_test", "test: missing folder"),
    ("empty_class", "empty class folder"),
    ("duplicate_test", "duplicate test name"),
    ("empty_test", "no images"),
])
def test_structural_problems(ndsb_folder, tmp_path, layout_problem, expected):
    import shutil

    if layout_problem == "no_train":
        shutil.rmtree(ndsb_folder / "train")
    elif layout_problem == "no_test":
        shutil.rmtree(ndsb_folder / "test")
    elif layout_problem == "empty_class":
        (ndsb_folder / "train" / "krill").mkdir()
    elif layout_problem == "duplicate_test":
        write_png(ndsb_folder / "test" / "batch2" / "1.png", organism(20, 20, 5))
    elif layout_problem == "empty_test":
        shutil.rmtree(ndsb_folder / "test")
        (ndsb_folder / "test").mkdir()
    with pytest.raises(IngestError) as err:
        run(ndsb_folder, tmp_path / "rec")
    assert expected in str(err.value)
    assert not (tmp_path / "rec" / "meta.json").exists()


@pytest.mark.parametrize("mode", ["RGB", "RGBA", "P", "I;16", "LA", "1"])
def test_color_palette_alpha_and_16bit_become_8bit_gray(ndsb_folder, tmp_path, mode):
    gray = organism(40, 40, 3)
    if mode == "I;16":
        image = Image.fromarray(gray.astype(np.uint16) * 257)
    elif mode == "RGBA":
        rgba = np.dstack([gray] * 3 + [np.full_like(gray, 255)])
        rgba[:5, :, 3] = 0  # transparent strip: must become background, not black
        image = Image.fromarray(rgba, "RGBA")
    else:
        image = Image.fromarray(gray).convert(mode)
    image.save(ndsb_folder / "train" / "diatom" / "odd.png")
    meta = run(ndsb_folder, tmp_path / "rec", size=40)
    i = next(i for i, e in enumerate(meta["train"]) if e["name"].endswith("odd.png"))
    img = RecordReader(tmp_path / "rec", "train").read(i)[1]
    assert img.dtype == np.uint8 and img.shape == (40, 40)
    if mode in ("RGB", "P", "I;16", "LA"):
        assert np.abs(img.astype(int) - gray).max() <= 2
    if mode == "RGBA":
        assert img[:5].min() == 255 and np.abs(img[5:].astype(int) - gray[5:]).max() <= 2


def test_deterministic_bytes(ndsb_folder, tmp_path):
    run(ndsb_folder, tmp_path / "a", workers=2)
    run(ndsb_folder, tmp_path / "b", workers=1)
    for name in ("train.rec", "train.idx", "test.rec", "test.idx", "meta.json"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()


def test_parallel_ingest_of_many_files_matches_serial(tmp_path):
    from pipeline.tools.synth import generate

    generate(tmp_path / "synth", classes=4, per_class=30, test=20, seed=1, max_size=60)
    serial = run(tmp_path / "synth", tmp_path / "s", workers=1)
    parallel = run(tmp_path / "synth", tmp_path / "p", workers=2)
    assert serial == parallel
    assert (tmp_path / "s" / "train.rec").read_bytes() == (tmp_path / "p" / "train.rec").read_bytes()


def test_stratified_folds_balance_every_class():
    labels = np.repeat(np.arange(5), [10, 7, 3, 1, 30])
    folds = stratified_folds(labels, 3, seed=0)
    for cls in range(5):
        counts = np.bincount(folds[labels == cls], minlength=3)
        assert counts.max() - counts.min() <= 1
    assert np.ptp(np.bincount(folds)) <= 1
    np.testing.assert_array_equal(folds, stratified_folds(labels, 3, seed=0))
    assert not np.array_equal(folds, stratified_folds(labels, 3, seed=1))


def test_fold_indices_partition(ndsb_folder, tmp_path):
    meta = run(ndsb_folder, tmp_path / "rec", folds=3)
    seen = []
    for k in range(3):
        tr, va = fold_indices(meta, k)
        assert not set(tr) & set(va)
        seen += list(va)
    assert sorted(seen) == list(range(12))


def test_load_meta_detects_mismatched_records(ndsb_folder, tmp_path):
    from pipeline.lib.records import RecordsError

    out = tmp_path / "rec"
    run(ndsb_folder, out)
    with open(out / "train.rec", "ab") as fh:
        fh.write(b"x")
    with pytest.raises(RecordsError, match="train.rec"):
        load_meta(out)


def test_whiten_background_makes_grey_borders_white(ndsb_folder, tmp_path):
    grey = organism(30, 60, 7)
    grey = (grey.astype(float) * 175 / 255).astype(np.uint8)  # a FlowCam-like grey field
    write_png(ndsb_folder / "train" / "diatom" / "grey.png", grey)
    settings = Settings(size=32, whiten_background=True)
    meta = ingest(ndsb_folder, tmp_path / "rec", settings, folds=2, workers=1)
    i = next(i for i, e in enumerate(meta["train"]) if e["name"].endswith("grey.png"))
    img = RecordReader(tmp_path / "rec", "train").read(i)[1]
    assert img[0].min() >= 250 and img[16, 0] >= 250  # padding and image border agree
    assert img.min() < 100  # the organism stays dark
    assert meta["whiten_background"] is True


def test_whiten_leaves_white_and_border_filling_images_alone():
    white = organism(30, 30, 1)
    np.testing.assert_array_equal(whiten(white, 255), white)  # NDSB-like: no-op
    filled = np.full((30, 30), 60, np.uint8)  # the organism fills the crop
    np.testing.assert_array_equal(whiten(filled, 255), filled)


def test_more_folds_than_images_is_refused_before_any_work(ndsb_folder, tmp_path):
    from pipeline.ingest import IngestError, Settings, ingest

    with pytest.raises(IngestError, match=r"data.folds = 50 but .* has 12 labelled images"):
        ingest(ndsb_folder, tmp_path / "rec", Settings(size=16), folds=50, workers=1,
               skip_bad=True)
    assert not (tmp_path / "rec").exists()

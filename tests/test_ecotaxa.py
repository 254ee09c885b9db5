"""EcoTaxa exports as training data (issue 27, item 4): an export written as EcoTaxa writes it
(a zip of per-sample ecotaxa_<sample>.tsv files with the [t]/[f] type row, images in sample
subfolders; pipeline.tools.synth.write_export) is ingested: validated objects train under their
category, the others are the test rows, named by object_id, through to the submission. Every
hostile export ends in one line, exit code 1."""
from __future__ import annotations

import csv
import io
import json
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import cv2
import numpy as np
import pytest

from pipeline import ingest as I
from pipeline.lib import ecotaxa
from pipeline.lib.records import RecordReader, load_meta
from pipeline.tools.synth import EXPORT_COLUMNS, generate_export, write_export
from tests.conftest import ROOT, organism

# EcoTaxa display names: spaces, '<parent' parts, non-ASCII letters.
CATEGORIES = ["Oithona similis", "Calanoida<Copepoda", "détritus"]


def png(seed: int, h: int = 30, w: int = 40) -> bytes:
    return cv2.imencode(".png", organism(h, w, seed))[1].tobytes()


def row(sample: str, n: int, status: str, category: str, **over) -> dict:
    """One export row: object ``<sample>_<n>``, its image ``<sample>/<sample>_<n>.png``."""
    object_id = f"{sample}_{n}"
    base = {"img_file_name": f"{sample}/{object_id}.png", "img_rank": 0,
            "object_id": object_id, "object_lat": 43.68, "object_lon": 7.31,
            "object_annotation_status": status, "object_annotation_person_name": "",
            "object_annotation_category": category,
            "object_annotation_hierarchy": f"living>{category}" if category else "",
            "sample_id": sample}
    return {**base, **over}


def good_rows() -> dict[str, list[dict]]:
    """Two samples: 4 validated objects per category, and to classify 2 predicted, 1 dubious,
    1 unannotated (status and category empty, as EcoTaxa exports them)."""
    rows: dict[str, list[dict]] = {"st01": [], "st02": []}
    n = 0
    for c, category in enumerate(CATEGORIES):
        for j in range(4):
            sample = "st01" if j % 2 else "st02"
            rows[sample].append(row(sample, n, "validated", category))
            n += 1
    rows["st01"] += [row("st01", 90, "predicted", CATEGORIES[0]),
                     row("st01", 91, "dubious", CATEGORIES[1])]
    rows["st02"] += [row("st02", 92, "predicted", CATEGORIES[2]), row("st02", 93, "", "")]
    return rows


def images_of(rows: dict[str, list[dict]]) -> dict[str, bytes]:
    return {r["img_file_name"]: png(i) for i, r in
            enumerate(r for sample in rows.values() for r in sample)}


def export(tmp_path: Path, rows: dict[str, list[dict]] | None = None,
           images: dict[str, bytes] | None = None, name: str = "export.zip", **kw) -> Path:
    rows = good_rows() if rows is None else rows
    return write_export(tmp_path / name, rows, images_of(rows) if images is None else images,
                        **kw)


def run_cli(root: Path, records: Path, tmp_path: Path, **extra) -> str | None:
    """``python -m pipeline.ingest --params P`` in-process: its SystemExit message or None."""
    params = {"root": str(root), "size": 16, "folds": 2, "workers": 1, **extra}
    path = tmp_path / "params.yaml"
    path.write_text(json.dumps({"data": params, "paths": {"records": str(records)},
                                "models": {"folds": [0, 1]}}))
    try:
        I.main(["--params", str(path)])
    except SystemExit as exc:
        return str(exc.code)
    return None


def ingest(root: Path, records: Path, **kw) -> dict:
    return I.ingest(root, records, I.Settings(size=16), folds=2, workers=1, **kw)


# --------------------------------------------------------------------------- what it reads


def test_an_export_zip_trains_on_validated_objects_and_classifies_the_rest(tmp_path, capsys):
    meta = ingest(export(tmp_path), tmp_path / "records")
    assert meta["classes"] == sorted(CATEGORIES)  # the names as EcoTaxa spells them
    rows = [r for sample in good_rows().values() for r in sample]
    by_id = {r["object_id"]: r for r in rows}
    assert len(meta["train"]) == 12 and len(meta["test"]) == 4
    for entry in meta["train"]:
        source = by_id[entry["name"]]
        assert source["object_annotation_status"] == "validated"
        assert meta["classes"][entry["label"]] == source["object_annotation_category"]
        assert entry["file"] == source["img_file_name"]
    to_classify = [r["object_id"] for r in rows if r["object_annotation_status"] != "validated"]
    assert [e["name"] for e in meta["test"]] == to_classify  # the export's order
    assert meta["sample_submission"]["images"] == to_classify
    assert meta["ecotaxa"]["statuses"] == {"dubious": 1, "predicted": 2, "unannotated": 1,
                                           "validated": 12}
    assert meta["ecotaxa"]["tsv"] == ["ecotaxa_st01.tsv", "ecotaxa_st02.tsv"]
    assert meta["ecotaxa"]["hierarchy"]["détritus"] == "living>détritus"
    assert sorted(np.bincount([e["fold"] for e in meta["train"]])) == [6, 6]
    loaded = load_meta(tmp_path / "records")
    assert loaded["classes"] == meta["classes"]
    reader = RecordReader(tmp_path / "records", "test")
    assert len(reader) == 4 and reader.read(0)[1].shape == (16, 16)
    reader.close()
    assert "EcoTaxa export: 1 dubious, 2 predicted, 1 unannotated, 12 validated" \
        in capsys.readouterr().out


@pytest.mark.parametrize("variant", ["folder", "no type row", "latin-1 without BOM"])
def test_a_folder_or_another_encoding_gives_the_same_records(tmp_path, variant):
    ingest(export(tmp_path), tmp_path / "zip-records")
    if variant == "no type row":
        root = export(tmp_path, name="plain.zip", types_row=False)
    else:
        root = tmp_path / "folder"
        with zipfile.ZipFile(export(tmp_path)) as zf:
            zf.extractall(root)
        if variant.startswith("latin-1"):  # EcoTaxa's use_latin1 export: no byte-order mark
            for tsv in root.glob("ecotaxa_*.tsv"):
                tsv.write_bytes(tsv.read_text(encoding="utf-8-sig").encode("latin-1"))
    assert ecotaxa.is_export(root)
    ingest(root, tmp_path / "records")
    a, b = load_meta(tmp_path / "zip-records"), load_meta(tmp_path / "records")
    assert a["classes"] == b["classes"] and a["train"] == b["train"] and a["test"] == b["test"]
    assert a["sha256"] == b["sha256"]  # the same record bytes


def test_several_images_of_an_object_train_on_the_first(tmp_path, capsys):
    rows = good_rows()
    first = rows["st01"][0]
    # A second image (rank 1.0: a float column) stored as EcoTaxa stores a same-named one.
    second = {**first, "img_rank": 1.0,
              "img_file_name": f"st01/1/{first['object_id']}.png"}
    rows["st01"].insert(0, second)  # the later image listed first: rank decides, not order
    meta = ingest(export(tmp_path, rows), tmp_path / "records")
    entry = next(e for e in meta["train"] if e["name"] == first["object_id"])
    assert entry["file"] == first["img_file_name"] and len(meta["train"]) == 12
    assert meta["ecotaxa"]["extra_images"] == 1
    assert "1 more image(s) of objects with several left out" in capsys.readouterr().out


def test_a_backup_layout_finds_images_beside_each_tsv(tmp_path):
    """A backup export keeps each sample's TSV in the sample's folder, img_file_name relative
    to it (ForProject.py, store_tsv_into_zip); the zip may sit under one more folder."""
    rows = good_rows()
    with zipfile.ZipFile(tmp_path / "backup.zip", "w") as zf:
        for sample, sample_rows in rows.items():
            text = io.StringIO()
            writer = csv.DictWriter(text, list(EXPORT_COLUMNS), delimiter="\t",
                                    quoting=csv.QUOTE_NONNUMERIC, lineterminator="\n")
            writer.writeheader()
            for r in sample_rows:
                name = r["img_file_name"].split("/", 1)[1]
                writer.writerow({**r, "img_file_name": name})
                zf.writestr(f"project/{sample}/{name}", png(len(name)))
            zf.writestr(f"project/{sample}/ecotaxa_{sample}.tsv", text.getvalue())
    meta = ingest(tmp_path / "backup.zip", tmp_path / "records")
    assert len(meta["train"]) == 12 and meta["train"][0]["file"].startswith("project/st0")


def test_few_validated_objects_are_trained_as_ingest_does_and_said(tmp_path, capsys):
    rows = good_rows()
    rows["st01"].append(row("st01", 80, "validated", "Noctiluca"))
    meta = ingest(export(tmp_path, rows), tmp_path / "records")
    assert "Noctiluca" in meta["classes"] and meta["ecotaxa"]["few"] == {"Noctiluca": 1}
    assert "1 class(es) with fewer validated objects than data.folds = 2 ('Noctiluca (1)')" \
        in capsys.readouterr().out


def test_synth_writes_an_export_that_ingests(tmp_path):
    names = generate_export(tmp_path / "s.zip", classes=3, per_class=4, test=3, max_size=50)
    meta = ingest(tmp_path / "s.zip", tmp_path / "records")
    assert meta["classes"] == sorted(names) and "<" in names[0] and " " in names[0]
    labels = (tmp_path / "s_test_labels.csv").read_text().splitlines()
    assert labels[0] == "image,class"
    assert sorted(line.split(",")[0] for line in labels[1:]) == sorted(
        e["name"] for e in meta["test"])


# ------------------------------------------------------------------------ hostile exports


def _drop_column(rows, column):
    return {s: [{k: v for k, v in r.items() if k != column} for r in rs]
            for s, rs in rows.items()}


def _set(rows, sample, i, **over):
    rows[sample][i] = {**rows[sample][i], **over}
    return rows


def _bad_export(tmp_path: Path, case: str) -> Path:
    rows = good_rows()
    if case == "missing column":
        cols = [c for c in EXPORT_COLUMNS if c != "object_annotation_status"]
        return export(tmp_path, _drop_column(rows, "object_annotation_status"), columns=cols)
    if case == "image missing from the archive":
        images = images_of(rows)
        del images[rows["st02"][0]["img_file_name"]]
        return export(tmp_path, rows, images)
    if case == "duplicate object_id":
        return export(tmp_path, _set(rows, "st02", 1, object_id=rows["st01"][0]["object_id"]),
                      images_of(rows))
    if case == "no validated objects":
        rows = {s: [{**r, "object_annotation_status": "predicted"} for r in rs]
                for s, rs in rows.items()}
        return export(tmp_path, rows)
    if case == "damaged zip":
        path = export(tmp_path)
        data = path.read_bytes()
        path.write_bytes(data[: len(data) // 2])  # a download cut short
        return path
    if case == "not a zip at all":
        path = tmp_path / "export.zip"
        path.write_text("<html>session expired</html>")
        return path
    if case in ("../ in img_file_name", "absolute img_file_name"):
        target = "../evil.png" if case.startswith("..") else "/etc/passwd"
        images = images_of(rows)
        rows = _set(rows, "st01", 0, img_file_name=target)
        return export(tmp_path, rows, images)
    if case == "../ in a folder export":
        root = tmp_path / "folder"
        with zipfile.ZipFile(export(tmp_path)) as zf:
            zf.extractall(root)
        (tmp_path / "evil.png").write_bytes(png(0))  # it exists, outside the export
        tsv = root / "ecotaxa_st01.tsv"
        first = good_rows()["st01"][0]["img_file_name"]
        tsv.write_text(tsv.read_text(encoding="utf-8-sig").replace(first, "../evil.png", 1),
                       encoding="utf-8-sig")
        return root
    if case == "row with too many fields":
        root = tmp_path / "folder"
        with zipfile.ZipFile(export(tmp_path)) as zf:
            zf.extractall(root)
        tsv = root / "ecotaxa_st02.tsv"
        lines = tsv.read_text(encoding="utf-8-sig").split("\n")
        lines[3] += '\t"stray"'
        tsv.write_text("\n".join(lines), encoding="utf-8-sig")
        return root
    if case == "unknown status":
        return export(tmp_path, _set(rows, "st01", 0, object_annotation_status="validaded"),
                      images_of(rows))
    if case == "category named image":
        return export(tmp_path, _set(rows, "st01", 0, object_annotation_category="image"),
                      images_of(rows))
    if case == "nothing to classify":
        rows = {s: [r for r in rs if r["object_annotation_status"] == "validated"]
                for s, rs in rows.items()}
        return export(tmp_path, rows)
    if case == "collection of exports":
        inner = export(tmp_path, name="inner.zip")
        with zipfile.ZipFile(tmp_path / "export.zip", "w") as zf:
            zf.write(inner, "inner.zip")
        return tmp_path / "export.zip"
    raise AssertionError(case)


# (case, words of the one line, skippable with data.skip_bad)
HOSTILE = [
    ("missing column", ["ecotaxa_st01.tsv: missing column(s) object_annotation_status"], False),
    ("image missing from the archive",
     ["1 bad file(s)", "export.zip/st02/st02_0.png: missing from the export (object_id "
      "'st02_0', ecotaxa_st02.tsv line 3)", "data.skip_bad"], True),
    ("duplicate object_id", ["1 object_id(s) on more than one row", "'st01_1'",
                             "ecotaxa_st01.tsv line 3", "ecotaxa_st02.tsv line 4"], False),
    ("no validated objects", ["no validated object", "16 predicted"], False),
    ("damaged zip", ["export.zip: not a readable zip archive", "download"], False),
    ("not a zip at all", ["export.zip: not a readable zip archive"], False),
    ("../ in img_file_name", ["pointing outside the export", "'../evil.png'", "line 3"], False),
    ("absolute img_file_name", ["pointing outside the export", "'/etc/passwd'",
                                "an absolute path"], False),
    ("../ in a folder export", ["pointing outside the export", "'../evil.png'"], False),
    ("row with too many fields", ["ecotaxa_st02.tsv: 1 row(s) with another number of fields "
                                  "than the 10 columns of the header: 'line 4 has 11'"], False),
    ("unknown status", ["unknown object_annotation_status", "'validaded'"], False),
    ("category named image", ["EcoTaxa category image", "image column"], False),
    ("nothing to classify", ["no object to classify", "12 validated"], False),
    ("collection of exports", ["no ecotaxa_*.tsv", "'inner.zip'", "collection"], False),
]


@pytest.mark.parametrize("case, words, skippable", HOSTILE, ids=[h[0] for h in HOSTILE])
def test_a_hostile_export_is_one_line_and_keeps_the_earlier_records(tmp_path, case, words,
                                                                    skippable):
    records = tmp_path / "records"
    good = tmp_path / "good"
    good.mkdir()
    assert run_cli(export(good), records, tmp_path) is None
    before = {p.name: p.read_bytes() for p in records.iterdir()}
    root = _bad_export(tmp_path, case)
    message = run_cli(root, records, tmp_path)
    assert message is not None and message.startswith("ingest failed: "), message
    assert "\n" not in message
    for word in words:
        assert word in message, (word, message)
    assert {p.name: p.read_bytes() for p in records.iterdir()} == before
    skipped = run_cli(root, records, tmp_path, skip_bad=True)
    if not skippable:
        assert skipped == message
        return
    assert skipped is None
    listed = json.loads((records / "bad_files.json").read_text())["skipped"]
    assert [b["path"] for b in listed] == [f"{root}/st02/st02_0.png"]
    assert "st02_0" not in {e["name"] for e in load_meta(records)["train"]}


def test_an_object_to_classify_skipped_as_bad_is_left_out_of_the_rows(tmp_path, capsys):
    rows = good_rows()
    images = images_of(rows)
    del images["st01/st01_91.png"]  # the dubious object's image
    meta = ingest(export(tmp_path, rows, images), tmp_path / "records", skip_bad=True)
    assert meta["sample_submission"]["images"] == ["st01_90", "st02_92", "st02_93"] == [
        e["name"] for e in meta["test"]]
    assert meta["ecotaxa"]["skipped_to_classify"] == ["st01_91"]
    assert "1 object(s) to classify skipped as bad ['st01_91']: the submission leaves them out" \
        in capsys.readouterr().out


def test_a_damaged_image_in_the_zip_is_a_bad_file(tmp_path):
    rows = good_rows()
    images = images_of(rows)
    images[rows["st01"][1]["img_file_name"]] = png(1)[:60]  # truncated
    root = export(tmp_path, rows, images)
    message = run_cli(root, tmp_path / "records", tmp_path)
    assert "1 bad file(s)" in message and "st01/st01_3.png: corrupt or truncated" in message
    assert run_cli(root, tmp_path / "records", tmp_path, skip_bad=True) is None
    assert len(load_meta(tmp_path / "records")["train"]) == 11


def test_a_member_claiming_more_bytes_than_an_image_can_take_is_refused_unread(tmp_path):
    """A zip bomb's member: a few KB in the zip, megabytes once inflated (here a PNG padded
    after its end, which decoders ignore, so only the claimed size can refuse it)."""
    rows = good_rows()
    images = images_of(rows)
    member = rows["st01"][0]["img_file_name"]
    images[member] += bytes(3 << 20)
    root = export(tmp_path, rows, images)
    assert root.stat().st_size < 100_000
    assert run_cli(root, tmp_path / "records", tmp_path) is None  # within the default limit
    message = run_cli(root, tmp_path / "records", tmp_path, max_pixels=200_000)
    assert message.startswith("ingest failed: 1 bad file(s)")
    assert f"{member}: claims 3,14" in message
    assert "more than an image within data.max_pixels takes" in message


def test_the_real_command_exits_1_with_one_line(tmp_path):
    root = _bad_export(tmp_path, "damaged zip")
    params = tmp_path / "p.yaml"
    params.write_text(json.dumps({"data": {"root": str(root), "size": 16, "folds": 2},
                                  "paths": {"records": str(tmp_path / "records")},
                                  "models": {"folds": [0, 1]}}))
    done = subprocess.run([sys.executable, "-m", "pipeline.ingest", "--params", str(params)],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr[-3000:]
    assert done.stderr.strip().splitlines()[-1].startswith(
        f"ingest failed: {root}: not a readable zip archive")


@pytest.mark.parametrize("kind", ["zip", "folder"])
def test_the_notebooks_find_the_originals_inside_the_export(tmp_path, kind):
    from types import SimpleNamespace

    from pipeline.lib.images import decode_bytes
    from pipeline.lib.results import read_original

    root = export(tmp_path)
    if kind == "folder":
        with zipfile.ZipFile(root) as zf:
            zf.extractall(tmp_path / "folder")
        root = tmp_path / "folder"
    meta = ingest(root, tmp_path / "records")
    cfg = SimpleNamespace(root=tmp_path)
    entry = meta["test"][1]
    expected = decode_bytes(images_of(good_rows())[entry["file"]], 255)
    assert np.array_equal(read_original(cfg, meta, entry["name"], "test"), expected)
    assert read_original(cfg, meta, "no such object", "test") is None


def test_read_member_reopens_an_archive_replaced_since(tmp_path):
    path = tmp_path / "a.zip"
    for content in (b"first", b"second, longer"):
        with zipfile.ZipFile(path, "w") as zf:
            zf.writestr("x.png", content)
        assert ecotaxa.read_member(str(path), "x.png") == content
    with pytest.raises(ValueError, match="missing from the archive"):
        ecotaxa.read_member(str(path), "y.png")
    ecotaxa.close_archives()


def test_path_problems():
    for name in ("../x.png", "a/../../x.png", "..\\x.png", "/x.png", "\\x.png", "C:x.png",
                 "C:\\x.png"):
        assert ecotaxa.path_problem(name), name
    for name in ("x.png", "st01/x.png", "st01/3/x.png", "..x.png", "a..b/x.png"):
        assert ecotaxa.path_problem(name) is None, name


def test_an_ndsb_folder_is_not_taken_for_an_export(ndsb_folder, tmp_path):
    (ndsb_folder / "ecotaxa_notes.tsv").write_text("x\n")
    assert not ecotaxa.is_export(ndsb_folder)
    empty = tmp_path / "empty"
    empty.mkdir()
    assert not ecotaxa.is_export(empty)
    message = run_cli(empty, tmp_path / "records", tmp_path)
    assert "or an EcoTaxa export" in message
    shutil.rmtree(empty)


# ----------------------------------------------------------------------------- end to end


def test_an_export_trains_predicts_and_submits_under_its_category_names(tmp_path):
    """ingest -> train -> predict -> submit through the stages' functions: the submission's
    columns are EcoTaxa's category names in meta's order, its rows the objects to classify,
    named by object_id, in the export's order."""
    from pipeline import predict as P
    from pipeline import train as T
    from pipeline.lib.checkpoint import load_spec, run_dir
    from pipeline.lib.predictions import prediction_files
    from pipeline.lib.settings import TrainSection, TTASection
    from pipeline.lib.submission import check_submission, read_csv
    from pipeline.submit import submit
    from tests.conftest import where

    root = export(tmp_path)
    records = tmp_path / "records"
    meta = I.ingest(root, records, I.Settings(size=32), folds=2, workers=1)
    paths = where(tmp_path, records)
    T.train(T.Run("lenet", 0, TrainSection.of(epochs=1, batch_size=8, workers=0, act="leaky",
                                              bn=False, lr_steps=[1]), paths))
    assert load_spec(run_dir(paths.checkpoints, "lenet", 0))["classes"] == meta["classes"]
    P.predict("lenet", 0, TTASection.of(n=2, precision="float32", int8=False,
                                        work=str(tmp_path / "work")), paths)
    npy, _ = prediction_files(paths.models(1), "test", "lenet", 0)
    out = tmp_path / "submission.csv"
    submit(npy, records, out, plain_csv=True)
    header, rows = read_csv(out)
    assert header == ["image", *sorted(CATEGORIES)]
    assert list(rows[0]) == meta["sample_submission"]["images"] == ["st01_90", "st01_91",
                                                                    "st02_92", "st02_93"]
    assert check_submission(out, sorted(CATEGORIES), meta["sample_submission"]["images"]) == []

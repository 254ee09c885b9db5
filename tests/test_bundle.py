"""The model bundle and classify (issue 27): the bundle reproduces the ensemble, is refused in
one line when damaged, and classify reads every kind of input, survives bad images, kill -9
and shards, and writes EcoTaxa's import format."""
from __future__ import annotations

import csv
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import time
import zipfile
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from pipeline.lib.bundle import BundleError, load_bundle, open_bundle
from pipeline.lib.fsutil import sha256
from pipeline.lib.thresholds import apply_thresholds, fit_thresholds, threshold_array
from pipeline.tools.classify import classify
from tests.conftest import ROOT, train_lenet, where

NET = "lenet"


def build(base: Path, out: Path, **tta_over) -> dict:
    """make_bundle of the lenet ensemble under ``base`` with TTA settings ``tta_over``."""
    from pipeline.bundle import make_bundle
    from pipeline.lib.settings import (DataSection, EnsembleSection, ModelsSection,
                                       TTASection)

    tta = TTASection.of(**dict(dict(n=3, batch_size=4, precision="float32", int8=True,
                                    calib_images=16, work=str(base / "work")), **tta_over))
    models = ModelsSection.of(nets=[NET], folds=[0], seeds=[0], pseudo_nets=[])
    return make_bundle(out, where(base, base / "records"), models, tta, EnsembleSection.of(),
                       DataSection.of(), 0.9, {"test": True})


@pytest.fixture(scope="module")
def made(tmp_path_factory) -> SimpleNamespace:
    """A lenet trained one epoch on fold 0, predicted in INT8 (the guard's path), blended and
    calibrated by the ensemble stage, and its bundle."""
    from pipeline import ensemble as E
    from pipeline import predict as P
    from pipeline.lib.settings import TTASection

    base = tmp_path_factory.mktemp("bundle")
    records, _ = train_lenet(base)
    paths = where(base, records)
    P.predict(NET, 0, TTASection.of(n=3, batch_size=4, precision="float32", int8=True,
                                    calib_images=16, work=str(base / "work")), paths)
    E.ensemble([NET], [0], paths.models(1).parent, records, paths.metrics_file("ensemble"),
               paths.ensemble, None, "temperature")
    metrics = build(base, base / "bundle")
    return SimpleNamespace(base=base, bundle=base / "bundle", tar=base / "bundle.tar",
                           paths=paths, metrics=metrics, test=base / "ndsb" / "test")


def read_csv(path: Path, delimiter: str = ",") -> list[dict[str, str]]:
    with open(path, newline="", encoding="utf-8-sig") as fh:
        return list(csv.DictReader(fh, delimiter=delimiter))


def probabilities(out: Path, classes: list[str]) -> dict[str, np.ndarray]:
    """{image name: every class's probability} of an --all-probs CSV."""
    return {r["image"]: np.array([float(r[c]) for c in classes]) for r in read_csv(out)}


def outputs(out: Path) -> dict[str, bytes]:
    from pipeline.lib.classified import OutputPaths

    return {p.name: p.read_bytes() for p in OutputPaths.of(out).all()}


# ------------------------------------------------------------------------------ bundle


def test_bundle_round_trip_reproduces_the_ensemble(made, tmp_path):
    """Folder and .tar load to the same verified bundle, which holds everything it claims;
    classifying the test images with it gives the ensemble stage's test probabilities."""
    from pipeline.lib.predictions import load_predictions
    from pipeline.lib.records import load_meta

    meta = load_meta(made.paths.records)
    folder = load_bundle(made.bundle)
    with open_bundle(made.tar) as packed:
        assert packed.id == folder.id == made.metrics["id"]
        assert packed.info == folder.info
    info = folder.info
    ens = json.loads(made.paths.metrics_file("ensemble").read_text())
    assert folder.classes == meta["classes"] and len(folder.models) == 1
    assert folder.models[0]["int8_used"] and (made.bundle / folder.models[0]["dir"] /
                                             "calib.npz").is_file()
    assert info["ensemble"]["temperature"] == ens["calibration"]["temperature"]
    assert info["provenance"]["oof_logloss"] == ens["ensemble"]["logloss"]
    assert {"git_commit", "created", "settings"} <= set(info["provenance"])
    assert info["preprocessing"]["size"] == meta["size"] == 32
    assert info["tta"]["n"] == 3 and folder.views(folder.models[0]).shape == (3, 2, 3)
    assert [r["class"] for r in folder.thresholds()] == meta["classes"]
    manifest = json.loads((made.bundle / "manifest.json").read_text())["files"]
    on_disk = sorted(p.relative_to(made.bundle).as_posix() for p in made.bundle.rglob("*")
                     if p.is_file() and p.name != "manifest.json")
    assert sorted(manifest) == on_disk
    assert all(sha256(made.bundle / f) == e["sha256"] for f, e in manifest.items())

    out = tmp_path / "res.csv"
    done = classify(made.tar, [str(made.test)], out, all_probs=True)
    assert done["images"] == 7 and done["unreadable"] == 0
    ensemble, names = load_predictions(made.paths.ensemble, "test", "ensemble")
    got = probabilities(out, folder.classes)
    assert len(got) == 7
    for name, row in got.items():  # the CSV holds 6 decimals
        np.testing.assert_allclose(row, ensemble[names.index(Path(name).name)], atol=6e-7)
    assert not (tmp_path / "res.csv.work").exists()


def test_the_report_shows_each_classs_threshold(made):
    """The bundle stage leaves its thresholds under paths.plots, and the report turns them
    into a section: each class with its threshold, precision and recall."""
    from types import SimpleNamespace

    from pipeline import report as R
    from pipeline.lib.thresholds import METRICS_FILE

    table = Path(made.paths.metrics) / METRICS_FILE
    assert table.read_bytes() == (made.bundle / "thresholds.csv").read_bytes()
    sections = []
    R._thresholds_section(SimpleNamespace(metrics=made.paths.metrics), sections)
    (section,) = sections
    records = load_bundle(made.bundle).thresholds()
    assert list(section.table["class"]) == [r["class"] for r in records]
    assert {"threshold", "precision", "recall"} <= set(section.table.columns)
    reached = sum(r["threshold"] is not None for r in records)
    assert f"{reached} of {len(records)} classes reach the target" in section.text
    html = R.render_html(sections, "t")
    assert all(r["class"] in html for r in records)
    sections = []
    R._thresholds_section(SimpleNamespace(metrics=made.paths.metrics + "-none"), sections)
    assert sections == []  # no bundle: no section


def test_ecotaxa_table_and_summary_follow_the_predictions(made, tmp_path):
    """The table passes the checks of EcoTaxa's importer (ecotaxa/ecotaxa_back,
    py/BO/TSVFile.py open / validate_structure / validate_content, py/BO/Mappings.py): a BOM
    makes it UTF-8, line 2 is always read as the types ([t] or [f] per column), every
    column is TABLE_FIELD with a known table prefix, the image is found relative to the
    table's folder, an (object_id, img_file_name) pair occurs once, a status is one EcoTaxa
    knows and comes with a category; the score travels as a free numeric object field."""
    out = tmp_path / "sample.csv"
    classify(made.bundle, [str(made.test)], out)
    rows = read_csv(out)
    lines = (tmp_path / "ecotaxa_sample.tsv").read_bytes()
    assert lines.startswith(b"\xef\xbb\xbf")  # UTF-8 BOM: EcoTaxa then reads UTF-8
    table = list(csv.reader(io.StringIO(lines.decode("utf-8-sig")), delimiter="\t"))
    header, types, body = table[0], table[1], table[2:]
    assert header[:4] == ["img_file_name", "object_id", "object_annotation_category",
                          "object_annotation_status"]
    assert all(t in ("[t]", "[f]") for t in types) and types[header.index("object_score")] \
        == "[f]"
    assert len(body) == len(rows) == 7
    assert all(h.split("_", 1)[0] in ("object", "img", "sample", "acq", "process")
               and "_" in h for h in header)
    assert len({(r[header.index("object_id")], r[0]) for r in body}) == len(body)
    cut = threshold_array(load_bundle(made.bundle).thresholds())
    classes = load_bundle(made.bundle).classes
    for row, line in zip(rows, body):
        record = dict(zip(header, line))
        assert (tmp_path / record["img_file_name"]).resolve() == Path(row["image"]).resolve()
        assert record["object_top1_category"] == row["class_1"]
        assert float(record["object_score"]) == float(row["probability_1"])
        kept = float(row["probability_1"]) >= cut[classes.index(row["class_1"])]
        assert row["assigned"] == (row["class_1"] if kept else "unclassified")
        assert record["object_annotation_category"] == (row["class_1"] if kept else "")
        assert record["object_annotation_status"] == ("predicted" if kept else "")
        assert bool(record["object_annotation_status"]) == bool(
            record["object_annotation_category"])
    summary = {r["class"]: r for r in read_csv(tmp_path / "sample.summary.csv")}
    for c in classes:
        assert int(summary[c]["top1"]) == sum(r["class_1"] == c for r in rows)
        assert int(summary[c]["assigned"]) == sum(r["assigned"] == c for r in rows)
    assert int(summary["unclassified"]["assigned"]) == sum(r["assigned"] == "unclassified"
                                                           for r in rows)
    assert int(summary["total_read"]["top1"]) == 7 and summary["unreadable"]["top1"] == "0"


def _rewrite_manifest(folder: Path) -> None:
    """Make the manifest agree with the files again (what a careful tamperer would do)."""
    path = folder / "manifest.json"
    manifest = json.loads(path.read_text())
    for rel in manifest["files"]:
        manifest["files"][rel] = {"sha256": sha256(folder / rel),
                                  "bytes": (folder / rel).stat().st_size}
    path.write_text(json.dumps(manifest))


def _edit_json(path: Path, change) -> None:
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data))


def _flip(path: Path, at: int = -20) -> None:
    raw = bytearray(path.read_bytes())
    raw[at] ^= 0xFF
    path.write_bytes(bytes(raw))


MODEL = "models/lenet--fold0"
DAMAGE = {
    "missing weights": (lambda d: (d / MODEL / "model.params").unlink(),
                        "models/lenet--fold0/model.params is missing"),
    "truncated weights": (lambda d: os.truncate(d / MODEL / "model.params", 1000),
                          "has 1000 bytes, the manifest says"),
    "altered views": (lambda d: _flip(d / MODEL / "views.npy"),
                      "views.npy: sha256 differs from the manifest"),
    "added file": (lambda d: (d / MODEL / "extra.params").write_bytes(b"x"),
                   "files not in the manifest: ['models/lenet--fold0/extra.params']"),
    "no manifest": (lambda d: (d / "manifest.json").unlink(), "no manifest.json"),
    "damaged manifest": (lambda d: (d / "manifest.json").write_text('{"files": {'),
                         "manifest.json: damaged"),
    "other format version": (lambda d: _edit_json(d / "manifest.json",
                                                  lambda m: m.update(version=99)),
                             "version 99, this code reads"),
    "altered blend, manifest rewritten": (
        lambda d: (_edit_json(d / "bundle.json",
                              lambda i: i["ensemble"]["nets"][0].update(weight=0.5)),
                   _rewrite_manifest(d)),
        "ensemble weights [0.5] are not positive with sum 1"),
    "other classes in a model, manifest rewritten": (
        lambda d: (_edit_json(d / MODEL / "model.json",
                              lambda s: s.update(classes=s["classes"][::-1])),
                   _rewrite_manifest(d)),
        "model.json's classes differ from bundle.json's"),
    "weights swapped, manifest rewritten": (
        lambda d: (_flip(d / MODEL / "model.params", 200), _rewrite_manifest(d)),
        "model.params does not match model.json's sha256"),
}


@pytest.mark.parametrize("kind", list(DAMAGE))
def test_a_damaged_bundle_is_refused_in_one_line(made, tmp_path, kind):
    damage, words = DAMAGE[kind]
    copy = tmp_path / "bundle"
    shutil.copytree(made.bundle, copy)
    damage(copy)
    with pytest.raises(BundleError) as err:
        with open_bundle(copy):
            pass
    assert words in str(err.value) and "\n" not in str(err.value)


def test_a_damaged_archive_is_refused_in_one_line(made, tmp_path):
    truncated = tmp_path / "truncated.tar"
    truncated.write_bytes(made.tar.read_bytes()[:made.tar.stat().st_size // 2])
    with pytest.raises(BundleError, match="truncated or damaged|is missing"):
        with open_bundle(truncated):
            pass
    unsafe = tmp_path / "unsafe.tar"
    with tarfile.open(unsafe, "w") as tar:
        tar.add(made.bundle, arcname="bundle")
        tar.add(made.bundle / "bundle.json", arcname="bundle/../../escape.json")
    with pytest.raises(BundleError, match="unsafe or special members"):
        with open_bundle(unsafe):
            pass
    assert not (tmp_path.parent / "escape.json").exists()


def test_the_command_refuses_a_damaged_bundle_with_exit_1_and_no_traceback(made, tmp_path):
    copy = tmp_path / "bundle"
    shutil.copytree(made.bundle, copy)
    _flip(copy / MODEL / "model.params", 200)
    done = subprocess.run([sys.executable, "-m", "pipeline.classify", str(copy),
                           str(made.test), "--out", str(tmp_path / "o.csv")], cwd=tmp_path,
                          capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, PYTHONPATH=str(ROOT)))
    assert done.returncode == 1 and "Traceback" not in done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("classify failed: ") \
        and "model.params: sha256 differs" in lines[0]
    assert not (tmp_path / "o.csv").exists()


# ------------------------------------------------------------------------------ classify


def corrupt_folder(source: Path, folder: Path, copies: int = 1) -> Path:
    """``copies`` of the images of ``source`` in ``folder`` (one level nested), plus a
    corrupt PNG, a zero-byte JPEG, a text file and a hidden image (the last two ignored)."""
    for k in range(copies):
        for img in sorted(source.iterdir()):
            target = folder / f"set{k:03d}" / img.name
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(img, target)
    (folder / "set000" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 40)
    (folder / "empty.jpg").write_bytes(b"")
    (folder / "notes.txt").write_text("not an image")
    shutil.copyfile(next(source.iterdir()), folder / ".hidden.jpg")
    return folder


def test_classify_lists_unreadable_images_and_reads_every_kind_of_input(made, tmp_path):
    folder = corrupt_folder(made.test, tmp_path / "sample")
    out = tmp_path / "run" / "folder.csv"
    done = classify(made.bundle, [str(folder)], out, all_probs=True)
    bad = read_csv(tmp_path / "run" / "folder.unreadable.csv")
    assert done["images"] == 9 and done["unreadable"] == 2
    reasons = {Path(r["image"]).name: r["reason"] for r in bad}
    assert reasons.keys() == {"broken.png", "empty.jpg"}
    assert reasons["empty.jpg"] == "zero-byte file"
    assert reasons["broken.png"].startswith(("corrupt or truncated image", "not an image"))
    classes = load_bundle(made.bundle).classes
    by_folder = {Path(k).name: v for k, v in probabilities(out, classes).items()}
    assert len(by_folder) == 7 and ".hidden.jpg" not in by_folder

    # The same images as an EcoTaxa export: a table (with its type row) in a folder, and
    # the same table and images zipped, plus a list of paths.
    export = tmp_path / "export"
    export.mkdir()
    names = sorted(by_folder)
    rows = ["img_file_name\timg_rank\tobject_id\tobject_annotation_status\t"
            "object_annotation_category", "[t]\t[f]\t[t]\t[t]\t[t]"]
    for i, name in enumerate(names):
        (export / "imgs").mkdir(exist_ok=True)
        shutil.copyfile(folder / "set000" / name, export / "imgs" / name)
        rows.append(f"imgs/{name}\t0\tobj_{i}\t" + ("validated\tCalanoida<Copepoda"
                                                     if i % 2 else "\t"))
    rows.append(f"imgs/{names[1]}\t1\tobj_0\t\t")  # a second image of obj_0: left out
    rows.append("imgs/missing.png\t0\tobj_missing\t\t")
    (export / "ecotaxa_export.tsv").write_text("\n".join(rows) + "\n")
    archive = tmp_path / "export.zip"
    with zipfile.ZipFile(archive, "w") as z:
        for p in sorted(export.rglob("*")):
            z.write(p, f"sample1/{p.relative_to(export).as_posix()}")
    listing = tmp_path / "list.txt"
    listing.write_text("# images\n" + "".join(f"sample/set000/{n}\n" for n in names[:2]))
    out2 = tmp_path / "run" / "kinds.csv"
    done = classify(made.bundle, [str(export / "ecotaxa_export.tsv"), str(archive),
                                  str(listing)], out2, all_probs=True)
    assert done["images"] == 2 * 8 + 2 and done["unreadable"] == 2
    got = probabilities(out2, classes)
    assert len(got) == 2 * 7 + 2
    for image, p in got.items():
        np.testing.assert_array_equal(p, by_folder[Path(image).name])
    table = list(csv.reader(io.StringIO(
        (tmp_path / "run" / "ecotaxa_kinds.tsv").read_text(encoding="utf-8-sig")),
        delimiter="\t"))[2:]
    assert [r[1] for r in table[:7]] == [f"obj_{i}" for i in range(7)] == \
        [r[1] for r in table[7:14]]
    assert [r[0] for r in table[:7]] == [f"imgs/{n}" for n in names]  # as the export had it
    missing = read_csv(tmp_path / "run" / "kinds.unreadable.csv")
    assert len(missing) == 2 and all("missing.png" in r["image"] for r in missing)
    assert missing[1]["reason"] == "missing from the archive"


def test_sharded_classify_equals_one_run(made, tmp_path):
    from pipeline.lib.chunks import ChunkError

    folder = corrupt_folder(made.test, tmp_path / "sample", copies=3)
    one = tmp_path / "one" / "r.csv"
    classify(made.bundle, [str(folder)], one, chunk_images=4)
    sharded = tmp_path / "sharded" / "r.csv"
    for s in (0, 2):
        assert classify(made.bundle, [str(folder)], sharded, (s, 3), chunk_images=4)[
            "computed"] > 0
    assert not sharded.exists()  # a shard writes chunks only
    with pytest.raises(ChunkError, match=r"shard 1/3 not finished"):
        classify(made.bundle, [str(folder)], sharded, merge_only=True, chunk_images=4)
    classify(made.bundle, [str(folder)], sharded, (1, 3), chunk_images=4)
    classify(made.bundle, [str(folder)], sharded, merge_only=True, chunk_images=4)
    assert outputs(sharded) == outputs(one)
    assert not (tmp_path / "sharded" / "r.csv.work").exists()


def test_kill_9_mid_run_then_rerun_resumes_and_equals_uninterrupted(made, tmp_path):
    """A folder with a corrupt image, classified by the command in chunks of 4 with a
    40-view bundle: killed (-9) once some chunks are saved, rerun, its outputs are those of
    an uninterrupted run, byte for byte."""
    slow = tmp_path / "slow-bundle"
    build(made.base, slow, n=40)
    folder = corrupt_folder(made.test, tmp_path / "sample", copies=6)
    out = tmp_path / "killed" / "r.csv"
    cmd = [sys.executable, "-m", "pipeline.classify", str(slow), str(folder), "--out",
           str(out), "--chunk-images", "4"]
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    log = open(tmp_path / "first-run.log", "wb")
    proc = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)
    work = tmp_path / "killed" / "r.csv.work" / "classify"

    def finished() -> int:
        return len([f for f in work.glob("*/*.npz") if not f.name.startswith(".")])

    deadline = time.time() + 300
    while finished() < 2:
        assert proc.poll() is None, (tmp_path / "first-run.log").read_text()
        assert time.time() < deadline
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    log.close()
    done = finished()
    total = -(-(7 * 6 + 2) // 4)
    assert 2 <= done < total and not out.exists()
    rerun = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True,
                           timeout=600)
    assert rerun.returncode == 0, rerun.stderr
    assert f"resuming: {done} of {total} chunks already done" in rerun.stdout
    reference = tmp_path / "uninterrupted" / "r.csv"
    classify(slow, [str(folder)], reference, chunk_images=4)
    assert outputs(out) == outputs(reference)
    assert len(read_csv(tmp_path / "killed" / "r.unreadable.csv")) == 2
    assert not work.exists()


# ------------------------------------------------------------------------------ units


def test_thresholds_on_constructed_predictions():
    classes = ["a", "b", "c"]
    # Class a: top-1 probabilities 0.9 .. 0.5, right, right, wrong, right, wrong.
    rows = [(0.9, 0), (0.8, 0), (0.7, 1), (0.6, 0), (0.5, 2)]
    # Class b: one right prediction at 0.95 and a tie at 0.6 (one right, one wrong).
    rows += [(0.95, 1), (0.6, 1), (0.6, 2)]
    # Class c: predicted twice, never right.
    rows += [(0.99, 0), (0.98, 1)]
    top = [0] * 5 + [1] * 3 + [2] * 2
    probs = np.zeros((len(rows), 3))
    for i, ((p, _), t) in enumerate(zip(rows, top)):
        probs[i] = (1 - p) / 2
        probs[i, t] = p
    y = np.array([label for _, label in rows])
    fitted = {r["class"]: r for r in fit_thresholds(probs, y, classes, target=0.75)}
    # a: precision at 0.9, 0.8, 0.7, 0.6, 0.5 is 1, 1, 2/3, 3/4, 3/5: lowest >= 0.75 is 0.6.
    assert fitted["a"]["threshold"] == 0.6 and fitted["a"]["kept"] == 4
    assert fitted["a"]["precision"] == 0.75 and fitted["a"]["recall"] == 3 / 4
    assert fitted["a"]["precision_top1"] == 3 / 5 and fitted["a"]["support"] == 4
    # b: 0.95 alone is right; the tie at 0.6 goes in or out together (2/3 < 0.75: out).
    assert fitted["b"]["threshold"] == 0.95 and fitted["b"]["kept"] == 1
    assert fitted["b"]["recall"] == 1 / 4  # b is the true class of 4 images
    # c never reaches the target: no threshold, nothing kept.
    assert fitted["c"]["threshold"] is None and fitted["c"]["kept"] == 0
    assert fitted["c"]["precision"] is None and fitted["c"]["recall"] == 0.0
    # A target of 0 keeps every prediction; 1 only runs without a mistake.
    loose = fit_thresholds(probs, y, classes, target=0.0)
    assert [r["threshold"] for r in loose] == [0.5, 0.6, 0.98]
    strict = fit_thresholds(probs, y, classes, target=1.0)
    assert [r["threshold"] for r in strict] == [0.8, 0.95, None]
    cut = threshold_array(list(fitted.values()))
    assert cut[2] == np.inf
    kept = apply_thresholds(np.array([0, 0, 1, 2]), np.array([0.6, 0.59, 0.96, 1.0]), cut)
    assert kept.tolist() == [True, False, True, False]
    with pytest.raises(ValueError, match="target precision"):
        fit_thresholds(probs, y, classes, target=1.5)


def test_the_bundle_blends_as_the_ensemble_stage_does():
    """combine() on constructed model probabilities equals the ensemble stage's own steps:
    fold mean per member, seed mean per net, weighted blend, temperature."""
    from pipeline import ensemble as E
    from pipeline.lib.classifier import combine
    from pipeline.lib.metrics import apply_temperature

    rng = np.random.default_rng(0)
    probs, members, spec = {}, {}, []
    for net, weight in (("a", 0.7), ("b", 0.3)):
        net_members = []
        for seed in (0, 1):
            folds = []
            for fold in (0, 1, 2):
                p = rng.dirichlet(np.ones(4), size=5).astype(np.float32)
                probs[f"{net}{seed}{fold}"] = p
                folds.append(p)
            total = np.zeros((5, 4))
            for p in folds:
                total += p
            net_members.append(E.Model(f"{net}-seed{seed}", total.astype(np.float32),
                                       (total / 3).astype(np.float32)))
        members[net] = net_members
        spec.append({"net": net, "weight": weight, "members": [
            {"member": f"{net}-seed{s}", "folds": [{"fold": k, "dir": f"{net}{s}{k}"}
                                                    for k in range(3)]} for s in (0, 1)]})
    nets = [E.average_seeds(n, members[n]) for n in ("a", "b")]
    expected = apply_temperature(E.blend([m.test for m in nets], [0.7, 0.3]), 1.3)
    got = combine({"nets": spec, "calibration": "temperature", "temperature": 1.3}, probs)
    np.testing.assert_array_equal(got, expected)


# ------------------------------------------------------------------------------ EcoTaxa


def test_an_ecotaxa_trained_bundle_classifies_the_export_under_its_category_names(tmp_path):
    """An EcoTaxa export (zip, per-sample TSVs with the type row, images in sample folders)
    through ingest, train, predict, ensemble and bundle: the bundle's classes are EcoTaxa's
    category names; classify reads the export zip itself (pipeline.lib.ecotaxa) and gives
    its objects to classify the ensemble's test probabilities, under their object_id, in an
    EcoTaxa table whose categories are those names."""
    from pipeline import ensemble as E
    from pipeline import ingest as I
    from pipeline import predict as P
    from pipeline import train as T
    from pipeline.lib.predictions import load_predictions
    from pipeline.lib.settings import TrainSection, TTASection
    from tests.test_ecotaxa import CATEGORIES, export

    root = export(tmp_path)
    records = tmp_path / "records"
    meta = I.ingest(root, records, I.Settings(size=32), folds=2, workers=1)
    paths = where(tmp_path, records)
    T.train(T.Run(NET, 0, TrainSection.of(epochs=1, batch_size=8, workers=0, act="leaky",
                                           bn=False, lr_steps=[1]), paths))
    P.predict(NET, 0, TTASection.of(n=2, precision="float32", int8=False,
                                    work=str(tmp_path / "work")), paths)
    E.ensemble([NET], [0], paths.models(1).parent, records, paths.metrics_file("ensemble"),
               paths.ensemble, None, "temperature")
    build(tmp_path, tmp_path / "bundle", n=2, int8=False)
    bundle = load_bundle(tmp_path / "bundle")
    assert bundle.classes == meta["classes"] == sorted(CATEGORIES)

    out = tmp_path / "run" / "export.csv"
    done = classify(tmp_path / "bundle.tar", [str(root)], out, all_probs=True)
    assert done["images"] == len(meta["train"]) + 4 and done["unreadable"] == 0
    table = list(csv.reader(io.StringIO((tmp_path / "run" / "ecotaxa_export.tsv").read_text(
        encoding="utf-8-sig")), delimiter="\t"))
    header, body = table[0], table[2:]
    records_tsv = [dict(zip(header, r)) for r in body]
    probs = {r["object_id"]: np.array([float(c[k]) for k in bundle.classes])
             for r, c in zip(records_tsv, read_csv(out))}
    test, names = load_predictions(paths.ensemble, "test", "ensemble")
    assert names == ["st01_90", "st01_91", "st02_92", "st02_93"]
    for name, row in zip(names, test):
        np.testing.assert_allclose(probs[name], row, atol=6e-7)
    assert {r["object_top1_category"] for r in records_tsv} <= set(CATEGORIES)
    assert {r["object_annotation_category"] for r in records_tsv} <= set(CATEGORIES) | {""}
    assert all(r["img_file_name"].startswith(("st01/", "st02/")) for r in records_tsv)


# ------------------------------------------------------------------------------ hostile


def _command(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pipeline.classify", *args], cwd=cwd,
                          capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, PYTHONPATH=str(ROOT)))


def test_hostile_inputs_end_in_one_line_and_exit_1(made, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "ecotaxa_x.tsv").write_text("img_file_name\tobject_id\n../../etc/passwd\to1\n")
    cases = {
        "missing bundle": ([str(tmp_path / "nope"), str(made.test)],
                           "bundle " + str(tmp_path / "nope") + " not found"),
        "bad shard": ([str(made.bundle), str(made.test), "--shard", "3/2"], "--shard"),
        "merge with shard": ([str(made.bundle), str(made.test), "--shard", "0/2", "--merge"],
                             "--merge writes the outputs of all shards"),
        "empty input": ([str(made.bundle), str(empty)], "no images found in"),
        "missing input": ([str(made.bundle), str(tmp_path / "absent")], "INPUT not found"),
        "table pointing outside": ([str(made.bundle), str(outside)],
                                   "pointing outside the export"),
        "chunk size": ([str(made.bundle), str(made.test), "--chunk-images", "0"],
                       "--chunk-images must be >= 1"),
    }
    for kind, (args, words) in cases.items():
        done = _command(*args, "--out", str(tmp_path / "o.csv"), cwd=tmp_path)
        lines = done.stderr.strip().splitlines()
        assert done.returncode == 1, (kind, done.stderr)
        assert len(lines) == 1 and lines[0].startswith("classify failed: ") \
            and words in lines[0], (kind, done.stderr)
        assert not (tmp_path / "o.csv").exists()


# ------------------------------------------------------------------------------ ONNX


def test_classify_runtime_onnx_matches_mxnet_float32(made, tmp_path):
    """Every model of the bundle carries MXNet's own ONNX export; classify --runtime onnx
    runs it in ONNX Runtime and gives the float32 MXNet probabilities within 1e-4."""
    import onnx

    from pipeline.lib.classifier import Classifier, run_decisions
    from pipeline.lib.inputs import Listing, load_images, write_listing

    bundle = load_bundle(made.bundle)
    for model in bundle.models:
        graph = onnx.load(str(bundle.onnx(model))).graph
        assert [i.name for i in graph.input] == ["data"]
        assert graph.input[0].type.tensor_type.shape.dim[2].dim_value == 32
    listed = tmp_path / "list.jsonl"
    n, _ = write_listing([str(made.test)], listed, tmp_path)
    images, reasons = load_images(Listing(listed, [(0, n)]).chunk(0), bundle.preprocessing)
    assert not any(reasons)
    said: list[str] = []
    used = run_decisions(bundle, runtime="onnx", say=said.append)
    assert set(used.values()) == {"onnx"} and "ONNX Runtime" in said[0]
    got = Classifier(bundle, used).predict(images)
    want = Classifier(bundle, {m["dir"]: "float32" for m in bundle.models}).predict(images)
    assert np.abs(got - want).max() <= 1e-4 and got.shape == (7, 3)

    by_onnx, by_mxnet = tmp_path / "onnx.csv", tmp_path / "mxnet.csv"
    classify(made.tar, [str(made.test)], by_onnx, all_probs=True, runtime="onnx")
    classify(made.bundle, [str(made.test)], by_mxnet, all_probs=True, int8=False)
    a, b = probabilities(by_onnx, bundle.classes), probabilities(by_mxnet, bundle.classes)
    assert a.keys() == b.keys() and max(np.abs(a[k] - b[k]).max() for k in a) <= 1e-4


@pytest.mark.parametrize("net", ["ndsb_net1", "tinynet"])
def test_the_sample_nets_export_to_onnx_with_rrelu_as_its_leaky_slope(net, tmp_path):
    """The nets the sample trains (params.yaml models.nets), built as train builds them
    (RReLU, batch norm), exported from predict's float32 inference net: only standard ONNX
    operators (RReLU is LeakyRelu with slope (l+u)/2, batch norm folded away), and ONNX
    Runtime's probabilities equal MXNet's within 1e-4."""
    import mxnet as mx
    import onnx

    import nets
    from pipeline.lib.inference import prepare_net
    from pipeline.lib.onnxmodel import OnnxNet, export_onnx
    from pipeline.lib.settings import DataSection, TrainSection
    from pipeline.lib.tta import average

    cfg, size = TrainSection.of(), DataSection.of().size
    model = nets.get_model(net, classes=121, act=cfg.act, bn=cfg.bn, in_channels=1)
    model.initialize(mx.init.Xavier(magnitude=2.0))
    x = mx.nd.random.uniform(shape=(6, 1, size, size))
    model(x)
    prepared = prepare_net(model, "float32")
    want = average(prepared(x).asnumpy()[:, None].astype(np.float64), "probs")
    path = export_onnx(prepared, size, tmp_path / "model.onnx")
    ops = {n.op_type for n in onnx.load(str(path)).graph.node}
    assert cfg.act == "rrelu" and "LeakyRelu" in ops
    assert not ops & {"BatchNormalization", "RandomUniform", "RandomNormal"}
    got = average(OnnxNet(path)(x).asnumpy()[:, None].astype(np.float64), "probs")
    assert np.abs(got - want).max() <= 1e-4

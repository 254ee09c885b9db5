"""Synthetic NDSB folders: layout, varied sizes, non-alphabetical sample submission, labels."""
from __future__ import annotations

import csv

import numpy as np
from PIL import Image

from pipeline.tools.synth import class_names, generate, main


def test_generate_writes_an_ndsb_layout(tmp_path):
    names = generate(tmp_path / "s", classes=12, per_class=5, test=9, seed=1)
    assert len(set(names)) == 12 == len(names)
    for cls in names:
        assert len(list((tmp_path / "s" / "train" / cls).glob("*.jpg"))) == 5
    header = (tmp_path / "s" / "sampleSubmission.csv").read_text().splitlines()[0].split(",")
    assert header[0] == "image" and sorted(header[1:]) == sorted(names)
    assert header[1:] != sorted(names)  # like NDSB: not alphabetical
    with open(tmp_path / "s" / "test_labels.csv") as fh:
        labels = list(csv.DictReader(fh))
    assert sorted(r["image"] for r in labels) == sorted(
        p.name for p in (tmp_path / "s" / "test").iterdir())
    assert {r["class"] for r in labels} <= set(names)


def test_images_are_dark_shapes_on_white_of_varied_size(tmp_path):
    generate(tmp_path / "s", classes=4, per_class=12, test=1, seed=2, min_size=20, max_size=200)
    sizes, corners, darkest = [], [], []
    for path in (tmp_path / "s" / "train").rglob("*.jpg"):
        img = np.asarray(Image.open(path))
        sizes.append(img.shape)
        corners.append(img[0, 0])
        darkest.append(img.min())
    heights, widths = zip(*sizes)
    assert max(heights) > 2 * min(heights) and max(widths) > 2 * min(widths)
    assert len({h / w for h, w in sizes}) > 10  # aspect ratios vary
    assert np.median(corners) > 220 and np.median(darkest) < 130


def test_seed_determinism_and_cli(tmp_path):
    generate(tmp_path / "a", classes=3, per_class=2, test=2, seed=5)
    generate(tmp_path / "b", classes=3, per_class=2, test=2, seed=5)
    a = sorted((tmp_path / "a").rglob("*.jpg"))
    assert [p.read_bytes() for p in a] == [
        (tmp_path / "b" / p.relative_to(tmp_path / "a")).read_bytes() for p in a]
    main([str(tmp_path / "c"), "--classes", "2", "--per-class", "1", "--test", "1",
          "--no-sample-submission"])
    assert not (tmp_path / "c" / "sampleSubmission.csv").exists()
    assert len(class_names(30)) == len(set(class_names(30)))

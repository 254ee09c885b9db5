"""The embedded real sample: obtained and laid out as NDSB, and a net learns on it.

Needs the network (pip download of the planktonclas wheel, ~3 MB) as ``make repro`` does.
"""
from __future__ import annotations

import csv
import math
import tempfile
from collections import Counter
from pathlib import Path

import pytest

from pipeline import sample as S
from pipeline import train as T
from pipeline.ingest import Settings, ingest
from pipeline.lib.settings import TrainSection
from tests.conftest import where

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def sample_root(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("sample") / "sample"
    with tempfile.TemporaryDirectory() as tmp:
        wheel = S.fetch_wheel(Path(tmp))
        counts = S.sample(out, wheel, train_fraction=0.7, seed=0)
    assert counts == {"classes": 6, "train": 73, "test": 32}
    return out / "ndsb"


def test_sample_is_an_ndsb_folder_with_hidden_labels(sample_root):
    classes = sorted(p.name for p in (sample_root / "train").iterdir())
    assert len(classes) == 6
    header = (sample_root / "sampleSubmission.csv").read_text().splitlines()[0].split(",")
    assert header[0] == "image" and sorted(header[1:]) == classes and header[1:] != classes
    with open(sample_root / "test_labels.csv") as fh:
        labels = list(csv.DictReader(fh))
    tests = sorted(p.name for p in (sample_root / "test").iterdir())
    assert sorted(r["image"] for r in labels) == tests
    assert all(not any(c in name for c in classes) for name in tests)  # names hide the class
    per_class = Counter(r["class"] for r in labels)
    assert set(per_class) == set(classes)  # stratified: every class in the test part


def test_wheel_with_wrong_hash_is_refused(tmp_path):
    fake = tmp_path / S.WHEEL
    fake.write_bytes(b"not the wheel")
    with pytest.raises(S.SampleError, match="sha256"):
        S.demo_images(fake)


def test_a_net_learns_on_the_real_sample(sample_root, tmp_path):
    ingest(sample_root, tmp_path / "records", Settings(size=64, whiten_background=True),
           folds=3, workers=1)
    cfg = TrainSection.of(epochs=30, batch_size=16, lr_steps=[20, 26], workers=1)
    metrics = T.train(T.Run("tinynet", 0, cfg, where(tmp_path, tmp_path / "records")))
    assert metrics["valid_logloss"] < 0.75 * math.log(6), metrics
    assert metrics["valid_accuracy"] > 0.5, metrics

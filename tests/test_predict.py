"""Prediction with TTA: identity TTA equals plain prediction, averaging modes, streaming."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from pipeline import params
from pipeline import predict as P
from pipeline import train as T
from pipeline.ingest import Settings, ingest
from pipeline.predictions import load_predictions
from pipeline.synth import generate

NET = "lenet"


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> tuple[Path, Path]:
    """(records, checkpoints) of a lenet trained for one epoch on tiny synthetic data."""
    base = tmp_path_factory.mktemp("predict")
    generate(base / "ndsb", classes=3, per_class=10, test=7, seed=4, max_size=80)
    ingest(base / "ndsb", base / "records", Settings(size=32), folds=2, workers=1)
    cfg = params.merge("train", T.DEFAULTS, {
        "epochs": 1, "batch_size": 8, "workers": 0, "act": "leaky", "bn": True,
        "checkpoints": str(base / "ck"), "metrics": str(base / "m"), "plots": str(base / "p")})
    T.train(T.Run(NET, 0, cfg, base / "records"))
    return base / "records", base / "ck"


def cfg(tmp: Path, ck: Path, **over) -> dict:
    return params.merge("tta", P.DEFAULTS, dict({"n": 5, "batch_size": 3, "checkpoints": str(ck),
                                                 "predictions": str(tmp / "pred")}, **over))


def test_identity_tta_equals_plain_prediction(trained, tmp_path):
    records, ck = trained
    identity = {"rotation": [0, 0], "translate": 0.0, "zoom": [1, 1], "shear": 0.0,
                "stretch": [1, 1], "flip_h": 0.0, "flip_v": 0.0}
    P.predict(NET, 0, records, cfg(tmp_path / "a", ck, n=0), tmp_path / "m")
    P.predict(NET, 0, records, cfg(tmp_path / "b", ck, n=6, ranges=identity), tmp_path / "m")
    for split in ("valid", "test"):
        plain, names_a = load_predictions(tmp_path / "a" / "pred", split, NET, 0)
        tta, names_b = load_predictions(tmp_path / "b" / "pred", split, NET, 0)
        assert names_a == names_b
        np.testing.assert_allclose(plain, tta, atol=2e-5)


def test_random_tta_changes_predictions_and_reports_curve(trained, tmp_path):
    records, ck = trained
    P.predict(NET, 0, records, cfg(tmp_path / "a", ck, n=0), tmp_path / "m0")
    metrics = P.predict(NET, 0, records, cfg(tmp_path / "b", ck, n=12), tmp_path / "m")
    plain, _ = load_predictions(tmp_path / "a" / "pred", "test", NET, 0)
    tta, names = load_predictions(tmp_path / "b" / "pred", "test", NET, 0)
    assert len(names) == 7 and np.allclose(tta.sum(1), 1, atol=1e-5)
    assert np.abs(plain - tta).max() > 1e-3
    assert list(metrics["valid_logloss_by_n"]) == ["1", "2", "5", "10", "12"]
    saved = json.loads((tmp_path / "m" / f"predict--{NET}--fold0.json").read_text())
    assert saved["valid_logloss"] == pytest.approx(saved["valid_logloss_by_n"]["12"], rel=1e-6)


def test_tta_is_deterministic_given_seed_and_batch_size_independent(trained, tmp_path):
    records, ck = trained
    P.predict(NET, 0, records, cfg(tmp_path / "a", ck, n=4, batch_size=2), tmp_path / "m")
    P.predict(NET, 0, records, cfg(tmp_path / "b", ck, n=4, batch_size=5), tmp_path / "m")
    a, _ = load_predictions(tmp_path / "a" / "pred", "test", NET, 0)
    b, _ = load_predictions(tmp_path / "b" / "pred", "test", NET, 0)
    np.testing.assert_allclose(a, b, atol=2e-5)


def test_averaging_modes_on_constructed_logits():
    logits = np.log(np.array([[[0.7, 0.2, 0.1], [0.1, 0.2, 0.7]]]))  # 1 image, 2 views
    probs = P.average(logits, "probs")
    np.testing.assert_allclose(probs, [[0.4, 0.2, 0.4]])
    geo = P.average(logits, "geometric")
    g = np.sqrt([0.07, 0.04, 0.07])
    np.testing.assert_allclose(geo, [g / g.sum()])
    shifted = logits + np.array([[[5.0], [-3.0]]])  # per-view constants: same softmax
    np.testing.assert_allclose(P.average(shifted, "geometric"), geo)
    lg = P.average(logits, "logits")
    np.testing.assert_allclose(lg, geo)  # log-softmax inputs: mean logit = geometric mean
    with pytest.raises(P.PredictError, match="tta.mean"):
        P.average(logits, "median")


def test_tta_matrices_halton_and_identity():
    m0 = P.tta_matrices({}, 0, 32, "random", 0)
    assert m0.shape == (1, 2, 3) and np.allclose(m0[0], [[1, 0, 0], [0, 1, 0]])
    h1 = P.tta_matrices({}, 16, 32, "halton", 3)
    h2 = P.tta_matrices({}, 16, 32, "halton", 3)
    assert h1.shape == (16, 2, 3) and np.array_equal(h1, h2)
    assert P.tta_curve_points(100) == [1, 2, 5, 10, 20, 50, 100]
    assert P.tta_curve_points(0) == []

"""Ensemble weights, name alignment, missing-file errors, and the prediction file helpers."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

import numpy as np
import pytest

from pipeline.ensemble import EnsembleError, MissingPredictionsError, ensemble, fit_weights, main
from pipeline.lib import predictions as preds_mod
from pipeline.lib.fsutil import write_json
from pipeline.lib.metrics import ndsb_log_loss
from pipeline.lib.predictions import (load_prediction_file, load_predictions, prediction_path,
                                      save_predictions)

CLASSES = ["copepod", "amphipod", "diatom", "radiolarian"]
FOLDS = 3
N_TRAIN, N_TEST = 240, 30

Predictor = Callable[[np.ndarray, np.random.Generator], np.ndarray]


def make_meta(path: Path, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, len(CLASSES), N_TRAIN)
    train = [{"name": f"{CLASSES[y]}/{i}.jpg", "label": int(y), "width": 9, "height": 9,
              "fold": int(i % FOLDS)} for i, y in enumerate(labels)]
    test = [{"name": f"{i}.jpg", "width": 9, "height": 9} for i in range(N_TEST)]
    meta = {"classes": CLASSES, "size": 64, "background": 255, "folds": FOLDS, "seed": seed,
            "train": train, "test": test}
    write_json(path, meta)
    return meta


def write_net(directory: Path, meta: dict, net: str, predict: Predictor, seed: int) -> None:
    """Write a net's valid and test predictions for every fold, rows in shuffled order."""
    rng = np.random.default_rng(seed)
    for k in range(FOLDS):
        part = [t for t in meta["train"] if t["fold"] == k]
        part = [part[i] for i in rng.permutation(len(part))]
        y = np.array([t["label"] for t in part])
        save_predictions(directory, "valid", net, k, predict(y, rng), [t["name"] for t in part])
        test_names = [t["name"] for t in meta["test"]][::-1]
        fake_y = rng.integers(0, len(CLASSES), len(test_names))
        save_predictions(directory, "test", net, k, predict(fake_y, rng), test_names)


def good(y: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Right most of the time, with moderate confidence."""
    probs = rng.dirichlet(np.ones(len(CLASSES)), len(y)) * 0.3
    probs[np.arange(len(y)), y] += 0.7
    return probs


def noisy(y: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Uninformative and overconfident: a confident random guess."""
    return rng.dirichlet(np.full(len(CLASSES), 0.2), len(y))


def expert(known: set[int]) -> Predictor:
    """Sharp on the classes in ``known``, uniform elsewhere: two experts complement each other."""
    def predict(y: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        probs = np.full((len(y), len(CLASSES)), 1.0 / len(CLASSES))
        for i, label in enumerate(y):
            if label in known:
                probs[i] = 0.02
                probs[i, label] = 1 - 0.02 * (len(CLASSES) - 1)
        return probs
    return predict


@pytest.fixture
def project(tmp_path: Path) -> tuple[Path, dict]:
    return tmp_path, make_meta(tmp_path / "meta.json")


def run_in(root: Path, nets: list[str], folds=None) -> dict:
    return ensemble(nets, folds, root / "predictions", root, root / "metrics.json")


# ------------------------------------------------------------------------------ weights


def test_good_model_among_noisy_ones_gets_all_weight(project) -> None:
    root, meta = project
    write_net(root / "predictions", meta, "noisy1", noisy, 1)
    write_net(root / "predictions", meta, "good", good, 2)
    write_net(root / "predictions", meta, "noisy2", noisy, 3)
    metrics = run_in(root, ["noisy1", "good", "noisy2"])
    assert metrics["weights"]["good"] > 0.99
    assert sum(metrics["weights"].values()) == pytest.approx(1.0)
    assert metrics["ensemble"]["logloss"] <= metrics["models"]["good"]["logloss"] + 1e-9
    assert json.loads((root / "metrics.json").read_text()) == metrics


def test_complementary_models_blend_beats_both(project) -> None:
    root, meta = project
    write_net(root / "predictions", meta, "low", expert({0, 1}), 1)
    write_net(root / "predictions", meta, "high", expert({2, 3}), 2)
    metrics = run_in(root, ["low", "high"])
    best_single = min(m["logloss"] for m in metrics["models"].values())
    assert metrics["ensemble"]["logloss"] < best_single - 0.1  # ~0.52 vs ~0.72
    assert 0.2 < metrics["weights"]["low"] < 0.8


def test_fit_weights_is_optimal_on_a_grid() -> None:
    rng = np.random.default_rng(5)
    y = rng.integers(0, 4, 300)
    models = [good(y, rng), noisy(y, rng), expert({0})(y, rng)]
    w = fit_weights(models, y)
    best = ndsb_log_loss(y, sum(wi * p for wi, p in zip(w, models)))
    grid = np.linspace(0, 1, 21)
    for a in grid:
        for b in grid[grid <= 1 - a + 1e-12]:
            blend = a * models[0] + b * models[1] + (1 - a - b) * models[2]
            assert best <= ndsb_log_loss(y, blend) + 1e-9


def test_single_model_gets_weight_one_and_outputs_are_aligned(project) -> None:
    root, meta = project
    write_net(root / "predictions", meta, "only", good, 1)
    metrics = run_in(root, ["only"])
    assert metrics["weights"] == {"only": 1.0}
    valid, names = load_predictions(root / "predictions", "valid", "ensemble")
    assert names == [t["name"] for t in meta["train"]]  # meta order, not file order
    y = np.array([t["label"] for t in meta["train"]])
    assert ndsb_log_loss(y, valid) == pytest.approx(metrics["models"]["only"]["logloss"], rel=1e-5)
    test, test_names = load_predictions(root / "predictions", "test", "ensemble")
    assert test_names == [t["name"] for t in meta["test"]]
    # The test prediction is the mean over folds, each aligned by name.
    folds = [load_predictions(root / "predictions", "test", "only", k) for k in range(FOLDS)]
    mean = np.mean([p[[n.index(x) for x in test_names]] for p, n in folds], axis=0)
    assert np.allclose(test, mean / mean.sum(axis=1, keepdims=True), atol=1e-6)


def test_subset_of_folds(project) -> None:
    root, meta = project
    write_net(root / "predictions", meta, "only", good, 1)
    metrics = run_in(root, ["only"], folds=2)
    assert metrics["folds"] == [0, 1]
    assert metrics["n_valid"] == sum(t["fold"] < 2 for t in meta["train"])


# ------------------------------------------------------------------------------- errors


def test_missing_predictions_are_all_listed_in_one_error(project) -> None:
    root, meta = project
    pdir = root / "predictions"
    write_net(pdir, meta, "a", good, 1)
    write_net(pdir, meta, "b", good, 2)
    gone = [prediction_path(pdir, "valid", "a", 1), prediction_path(pdir, "test", "b", 2),
            preds_mod.names_path(prediction_path(pdir, "test", "a", 0))]
    for path in gone:
        path.unlink()
    expected = gone + [p for fold in range(FOLDS) for split in ("valid", "test")
                       for p in preds_mod.prediction_files(pdir, split, "c", fold)]
    with pytest.raises(MissingPredictionsError) as err:
        run_in(root, ["a", "b", "c"])
    message = str(err.value)
    assert f"{len(expected)} prediction file(s) missing" in message
    for path in expected:
        assert str(path) in message


def test_stale_fold_assignment_is_reported(project) -> None:
    root, meta = project
    write_net(root / "predictions", meta, "only", good, 1)
    probs, names = load_predictions(root / "predictions", "valid", "only", 0)
    save_predictions(root / "predictions", "valid", "only", 0, probs[1:], names[1:])
    with pytest.raises(EnsembleError) as err:
        run_in(root, ["only"])
    assert "1 missing" in str(err.value) and repr(names[0]) in str(err.value)


def test_main_takes_nets_from_cli_or_params(project, monkeypatch) -> None:
    root, meta = project
    monkeypatch.chdir(root)
    write_net(root / "predictions" / "models", meta, "only-seed1", good, 1)
    Path("params.yaml").write_text("models:\n  nets: []\n  seeds: [0]\n  pseudo_nets: []\n"
                                   "paths:\n  records: .\n  metrics: m\n")
    with pytest.raises(SystemExit, match="^ensemble failed: params.yaml: models.nets: a "
                                         "non-empty list"):
        main([])
    with pytest.raises(SystemExit, match="test--only-seed0--fold0"):  # the grid names seeds
        main(["--set", "models.nets=[only]", "--set", "models.folds=[0, 1]"])
    main(["--set", "models.nets=[only]", "--set", "models.folds=[0, 1]", "--set",
          "models.seeds=[1]"])
    assert json.loads(Path("m/ensemble.json").read_text())["weights"] == {"only": 1.0}


# --------------------------------------------------------------------- prediction files


def test_prediction_files_round_trip(tmp_path: Path) -> None:
    probs = np.random.default_rng(0).dirichlet(np.ones(5), 7)
    names = [f"cls/{i}.jpg" for i in range(7)]
    path = save_predictions(tmp_path, "valid", "net-a", 2, probs, names)
    assert path == tmp_path / "valid--net-a--fold2.npy"
    assert preds_mod.names_path(path) == tmp_path / "valid--net-a--fold2.names.txt"
    loaded, loaded_names = load_predictions(tmp_path, "valid", "net-a", 2)
    assert loaded.dtype == np.float32 and loaded_names == names
    assert np.allclose(loaded, probs)
    assert prediction_path(tmp_path, "test", "ensemble") == tmp_path / "test--ensemble.npy"
    with pytest.raises(ValueError):
        prediction_path(tmp_path, "train", "net", 0)
    with pytest.raises(ValueError):
        prediction_path(tmp_path, "test", "bad--name", 0)
    with pytest.raises(ValueError):
        save_predictions(tmp_path, "test", "net", 0, probs, names[:-1])


def test_mismatched_pair_is_rejected(tmp_path: Path) -> None:
    path = save_predictions(tmp_path, "test", "net", 0, np.ones((3, 2)), ["a", "b", "c"])
    preds_mod.names_path(path).write_text("a\nb\n")
    with pytest.raises(ValueError, match="does not match"):
        load_prediction_file(path)


def test_failed_write_leaves_no_file(tmp_path: Path, monkeypatch) -> None:
    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(np, "save", broken)
    with pytest.raises(OSError, match="disk full"):
        save_predictions(tmp_path / "p", "test", "net", 0, np.ones((2, 2)), ["a", "b"])
    assert list((tmp_path / "p").iterdir()) == []  # no .npy, no .names.txt, no temp file


def overconfident(y: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Right 70 % of the time but 97 % sure of its guess (a calibrated one would say ~70 %)."""
    guess = np.where(rng.random(len(y)) < 0.7, y, rng.integers(0, len(CLASSES), len(y)))
    probs = np.full((len(y), len(CLASSES)), 0.01)
    probs[np.arange(len(y)), guess] = 0.97
    return probs


def test_seeds_are_averaged_per_net_before_weighting(project) -> None:
    root, meta = project
    for seed in (0, 1, 2):
        write_net(root / "predictions", meta, f"a-seed{seed}", good, seed=10 + seed)
        write_net(root / "predictions", meta, f"b-seed{seed}", noisy, seed=20 + seed)
    metrics = ensemble(["a", "b"], None, root / "predictions", root, root / "metrics.json",
                       seeds=[0, 1, 2])
    assert metrics["nets"] == ["a", "b"] and set(metrics["weights"]) == {"a", "b"}
    seeds = metrics["seeds"]["a"]
    assert set(seeds["members"]) == {"a-seed0", "a-seed1", "a-seed2"}
    # Averaging independent noise of three seeds beats the mean single seed.
    assert seeds["averaged"] < seeds["mean_single"] and seeds["gain"] > 0
    assert metrics["models"]["a"]["logloss"] == pytest.approx(seeds["averaged"])


def test_missing_seed_is_listed_and_bad_settings_are_refused(project) -> None:
    root, meta = project
    write_net(root / "predictions", meta, "a-seed0", good, seed=1)
    with pytest.raises(MissingPredictionsError, match="valid--a-seed1--fold0.npy"):
        ensemble(["a"], None, root / "predictions", root, root / "m.json", seeds=[0, 1])
    with pytest.raises(EnsembleError) as err:
        ensemble([], None, root / "predictions", root, root / "m.json", seeds=[],
                 calibration="platt")
    assert "distinct nets" in str(err.value) and "models.seeds" in str(err.value)
    assert "ensemble.calibration" in str(err.value)


def test_temperature_calibration_is_cross_fitted_and_fixes_overconfidence(project) -> None:
    from pipeline.ensemble import fit_temperature
    from pipeline.lib.metrics import apply_temperature

    root, meta = project
    write_net(root / "predictions", meta, "sure", overconfident, seed=4)
    plain = ensemble(["sure"], None, root / "predictions", root, root / "p.json")
    metrics = ensemble(["sure"], None, root / "predictions", root, root / "c.json",
                       calibration="temperature")
    cal = metrics["calibration"]
    assert cal["cross_fitted"] and set(cal["fold_temperatures"]) == {"0", "1", "2"}
    assert cal["temperature"] > 1.5  # softens
    assert cal["oof_logloss_before"] == pytest.approx(plain["ensemble"]["logloss"])
    assert cal["oof_logloss_after"] < cal["oof_logloss_before"] - 0.1
    assert metrics["ensemble"]["logloss"] == pytest.approx(cal["oof_logloss_after"])
    assert metrics["uncalibrated"] == plain["ensemble"]
    # The written OOF rows are the cross-fitted ones; the test rows use the overall T.
    valid, _ = load_predictions(root / "predictions", "valid", "ensemble")
    y = np.array([t["label"] for t in meta["train"]])
    assert ndsb_log_loss(y, valid) == pytest.approx(cal["oof_logloss_after"])
    test, _ = load_predictions(root / "predictions", "test", "ensemble")
    assert np.allclose(test.sum(axis=1), 1) and test.max() < 0.9
    # T = 1 changes nothing; a fitted T recovers a known one.
    probs = overconfident(y, np.random.default_rng(0))
    assert np.allclose(apply_temperature(probs, 1.0), probs / probs.sum(1, keepdims=True))
    assert fit_temperature(apply_temperature(probs, 0.5), y) == pytest.approx(
        2 * fit_temperature(probs, y), rel=1e-3)

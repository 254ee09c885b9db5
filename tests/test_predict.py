"""Prediction with TTA: identity TTA equals plain prediction, averaging modes, streaming, INT8."""
from __future__ import annotations

import json
from pathlib import Path

import mxnet as mx
import numpy as np
import pytest

from pipeline import predict as P
from pipeline.lib import tta
from pipeline.lib.settings import Paths, SettingsError, TTASection
from pipeline.lib.predictions import load_predictions
from tests.conftest import train_lenet, needs_bf16

NET = "lenet"


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> tuple[Path, Path]:
    """(records, checkpoints) of a lenet trained for one epoch on tiny synthetic data."""
    return train_lenet(tmp_path_factory.mktemp("predict"))


def cfg(tmp: Path, ck: Path, **over) -> TTASection:
    """Fast TTA settings; the chunks go to ``tmp``/work (``ck``: see :func:`at`)."""
    # float32 unless a test says otherwise: in bfloat16, oneDNN's results depend on the batch
    # shape at the 1e-4 level, which would blur the exact-equality checks of the TTA logic.
    base = {"n": 5, "batch_size": 3, "work": str(tmp / "work"), "precision": "float32",
            "int8": False}
    return TTASection.of(**dict(base, **over))


def at(tmp: Path, ck: Path, records: Path, metrics: Path) -> Paths:
    """The paths of a predict run: the model in ``ck``, predictions under ``tmp``/pred."""
    return Paths.of(records=str(records), checkpoints=str(ck), predictions=str(tmp / "pred"),
                    metrics=str(metrics))


def pred(tmp: Path) -> Path:
    """Where :func:`at`'s first-round predictions are."""
    return at(tmp, tmp, tmp, tmp).models(1)


def test_identity_tta_equals_plain_prediction(trained, tmp_path):
    records, ck = trained
    identity = {"rotation": [0, 0], "translate": 0.0, "zoom": [1, 1], "shear": 0.0,
                "stretch": [1, 1], "flip_h": 0.0, "flip_v": 0.0}
    P.predict(NET, 0, cfg(tmp_path / "a", ck, n=0), at(tmp_path / "a", ck, records, tmp_path / "m"))
    P.predict(NET, 0, cfg(tmp_path / "b", ck, n=6, ranges=identity), at(tmp_path / "b", ck, records, tmp_path / "m"))
    for split in ("valid", "test"):
        plain, names_a = load_predictions(pred(tmp_path / "a"), split, NET, 0)
        tta, names_b = load_predictions(pred(tmp_path / "b"), split, NET, 0)
        assert names_a == names_b
        np.testing.assert_allclose(plain, tta, atol=2e-5)


def test_random_tta_changes_predictions_and_reports_curve(trained, tmp_path):
    records, ck = trained
    P.predict(NET, 0, cfg(tmp_path / "a", ck, n=0), at(tmp_path / "a", ck, records, tmp_path / "m0"))
    metrics = P.predict(NET, 0, cfg(tmp_path / "b", ck, n=12), at(tmp_path / "b", ck, records, tmp_path / "m"))
    plain, _ = load_predictions(pred(tmp_path / "a"), "test", NET, 0)
    tta, names = load_predictions(pred(tmp_path / "b"), "test", NET, 0)
    assert len(names) == 7 and np.allclose(tta.sum(1), 1, atol=1e-5)
    assert np.abs(plain - tta).max() > 1e-3
    assert list(metrics["valid_logloss_by_n"]) == ["1", "2", "5", "10", "12"]
    saved = json.loads((tmp_path / "m" / f"predict--{NET}--fold0.json").read_text())
    assert saved["valid_logloss"] == pytest.approx(saved["valid_logloss_by_n"]["12"], rel=1e-6)


def test_tta_is_deterministic_given_seed_and_batch_size_independent(trained, tmp_path):
    records, ck = trained
    P.predict(NET, 0, cfg(tmp_path / "a", ck, n=4, batch_size=2), at(tmp_path / "a", ck, records, tmp_path / "m"))
    P.predict(NET, 0, cfg(tmp_path / "b", ck, n=4, batch_size=5), at(tmp_path / "b", ck, records, tmp_path / "m"))
    a, _ = load_predictions(pred(tmp_path / "a"), "test", NET, 0)
    b, _ = load_predictions(pred(tmp_path / "b"), "test", NET, 0)
    np.testing.assert_allclose(a, b, atol=2e-5)


def test_stratified_method_is_accepted_and_its_first_view_is_the_plain_image(trained, tmp_path):
    records, ck = trained
    plain = P.predict(NET, 0, cfg(tmp_path / "a", ck, n=0), at(tmp_path / "a", ck, records, tmp_path / "m0"))
    metrics = P.predict(NET, 0, cfg(tmp_path / "b", ck, n=6, method="stratified"), at(tmp_path / "b", ck, records, tmp_path / "m"))
    assert metrics["tta_method"] == "stratified"
    assert metrics["valid_logloss_by_n"]["1"] == pytest.approx(plain["valid_logloss"], abs=1e-5)
    with pytest.raises(SettingsError, match="tta.method"):
        cfg(tmp_path / "c", ck, method="sobol")


def test_averaging_modes_on_constructed_logits():
    logits = np.log(np.array([[[0.7, 0.2, 0.1], [0.1, 0.2, 0.7]]]))  # 1 image, 2 views
    probs = tta.average(logits, "probs")
    np.testing.assert_allclose(probs, [[0.4, 0.2, 0.4]])
    geo = tta.average(logits, "geometric")
    g = np.sqrt([0.07, 0.04, 0.07])
    np.testing.assert_allclose(geo, [g / g.sum()])
    shifted = logits + np.array([[[5.0], [-3.0]]])  # per-view constants: same softmax
    np.testing.assert_allclose(tta.average(shifted, "geometric"), geo)
    lg = tta.average(logits, "logits")
    np.testing.assert_allclose(lg, geo)  # log-softmax inputs: mean logit = geometric mean
    with pytest.raises(tta.TTAError, match="tta.mean"):
        tta.average(logits, "median")


def test_tta_matrices_halton_and_identity():
    m0 = tta.tta_matrices({}, 0, 32, "random", 0)
    assert m0.shape == (1, 2, 3) and np.allclose(m0[0], [[1, 0, 0], [0, 1, 0]])
    h1 = tta.tta_matrices({}, 16, 32, "halton", 3)
    h2 = tta.tta_matrices({}, 16, 32, "halton", 3)
    assert h1.shape == (16, 2, 3) and np.array_equal(h1, h2)
    assert tta.tta_curve_points(100) == [1, 2, 5, 10, 20, 50, 100]
    assert tta.tta_curve_points(0) == []


def test_int8_predictions_are_close_to_fp32_and_calibrate_on_training_records_only(
        trained, tmp_path, monkeypatch):
    from pipeline.lib import quantize as Q
    from pipeline.lib.records import fold_indices, load_meta

    records, ck = trained
    seen: list[np.ndarray] = []

    def spy(reader, rec, transforms, matrices):
        seen.append(np.asarray(rec))
        return calibration_inputs(reader, rec, transforms, matrices)

    calibration_inputs = Q.calibration_inputs
    monkeypatch.setattr(Q, "calibration_inputs", spy)
    P.predict(NET, 0, cfg(tmp_path / "a", ck), at(tmp_path / "a", ck, records, tmp_path / "m32"))
    metrics = P.predict(NET, 0, cfg(tmp_path / "b", ck, int8=True, calib_images=40,
                                             int8_keep_fp32=["classifier"]), at(tmp_path / "b", ck, records, tmp_path / "m8"))
    train_idx, valid_idx = fold_indices(load_meta(records), 0)
    assert len(seen) == 1 and len(seen[0]) == 40
    assert set(seen[0]) == set(train_idx) and not set(seen[0]) & set(valid_idx)
    saved = json.loads((tmp_path / "m8" / f"predict--{NET}--fold0.json").read_text())
    assert saved["int8"] is True and saved["int8_calibration"]["calib_views"] == 40
    assert saved["test_views_per_s"] > 0 and saved["valid_views_per_s"] > 0
    fp32_saved = json.loads((tmp_path / "m32" / f"predict--{NET}--fold0.json").read_text())
    assert fp32_saved["int8"] is False and fp32_saved["int8_used"] is False
    assert saved["int8_used"] is True and saved["precision"] == "int8"
    for split in ("valid", "test"):
        fp32, _ = load_predictions(pred(tmp_path / "a"), split, NET, 0)
        int8, _ = load_predictions(pred(tmp_path / "b"), split, NET, 0)
        assert np.all(int8 >= 0) and np.allclose(int8.sum(1), 1, atol=1e-5)
        assert np.abs(int8 - fp32).mean() < 0.05
        assert (int8.argmax(1) == fp32.argmax(1)).mean() >= 0.8
    assert metrics["valid_logloss"] == pytest.approx(saved["valid_logloss"])


def test_calibration_plan_is_deterministic_and_spreads_views():
    from pipeline.lib.quantize import QuantizeError, calibration_plan

    train = np.array([3, 5, 8, 13, 21])
    rec, tr = calibration_plan(train, 12, 4, seed=7)
    rec2, tr2 = calibration_plan(train, 12, 4, seed=7)
    assert np.array_equal(rec, rec2) and np.array_equal(tr, tr2)
    assert set(rec) == set(train) and len(rec) == 12
    assert sorted(np.bincount(rec)[train]) == [2, 2, 2, 3, 3]  # every record before repeats
    assert np.array_equal(np.bincount(tr, minlength=4), [3, 3, 3, 3])
    assert not np.array_equal(rec, calibration_plan(train, 12, 4, seed=8)[0])
    with pytest.raises(QuantizeError):
        calibration_plan(np.arange(0), 8, 4, seed=0)


def test_int8_settings_are_validated(trained):
    from pipeline.lib.checkpoint import load_model, run_dir
    from pipeline.lib.quantize import QuantizeError, layer_names, quantize

    net, _ = load_model(run_dir(trained[1], NET, 0))
    net.hybridize()
    names = layer_names(net, ["first_conv", "classifier"])
    assert len(names) == 2 and "conv" in names[0] and "dense" in names[1]
    with pytest.raises(QuantizeError, match="int8_keep_fp32"):
        layer_names(net, ["last_conv"])
    with pytest.raises(QuantizeError, match="calib_mode"):
        quantize(net, np.zeros((2, 1, 32, 32), np.float32), mode="kl")


def test_explicit_inference_precision_is_used_or_refused_in_one_line(tmp_path):
    from pipeline.lib.precision import bfloat16_supported

    spec = {"net": NET, "kwargs": {"classes": 3, "in_channels": 1}, "size": 32}
    d = P.inference_decision(NET, 0, TTASection.of(precision="float32", work=str(tmp_path)),
                             spec, tmp_path, tmp_path)
    assert (d.precision, d.source) == ("float32", "explicit")
    bf16 = TTASection.of(precision="bfloat16", work=str(tmp_path))
    if bfloat16_supported():
        assert P.inference_decision(NET, 0, bf16, spec, tmp_path, tmp_path).precision == \
            "bfloat16"
    else:
        with pytest.raises(P.PredictError, match="tta.precision: precision bfloat16 needs"):
            P.inference_decision(NET, 0, bf16, spec, tmp_path, tmp_path)


def test_tta_settings_are_validated_all_at_once():
    with pytest.raises(SettingsError) as err:
        TTASection.of(n=-1, chunk_images=0, method="sobol", mean="median")
    for word in ("tta.n", "tta.chunk_images", "tta.method", "tta.mean"):
        assert word in str(err.value)
    with pytest.raises(SettingsError, match="tta.int8: one of true, false, auto, got 'yes'"):
        TTASection.of(int8="yes")
    assert TTASection.of().int8 == "auto"
    assert TTASection.of(int8=False).int8 is False


@pytest.mark.skipif(not mx.runtime.Features().is_enabled("MKLDNN"), reason="needs oneDNN")
@needs_bf16
def test_bfloat16_tta_is_close_to_float32(trained, tmp_path):
    records, ck = trained
    P.predict(NET, 0, cfg(tmp_path / "a", ck, n=4), at(tmp_path / "a", ck, records, tmp_path / "ma"))
    metrics = P.predict(NET, 0, cfg(tmp_path / "b", ck, n=4, precision="bfloat16"), at(tmp_path / "b", ck, records, tmp_path / "mb"))
    assert metrics["precision"] == "bfloat16"
    a, _ = load_predictions(pred(tmp_path / "a"), "test", NET, 0)
    b, _ = load_predictions(pred(tmp_path / "b"), "test", NET, 0)
    assert 0 < np.abs(a - b).max() < 0.02  # bf16 rounding: close, not identical


def test_percentile_calibration_clips_rare_outliers(trained):
    from pipeline.lib.checkpoint import load_model, run_dir
    from pipeline.lib.quantize import PercentileCollector, quantize

    def owned_handle(array):  # MXNet's monitor hands the collector a handle it then owns
        copy = array.copy()
        handle, copy.handle = copy.handle, None
        return handle

    collector = PercentileCollector(percentile=99.9)
    values = mx.nd.array(np.concatenate([np.linspace(-1, 10, 100_000), [1e6]]))
    collector.collect(b"relu0_output", owned_handle(values))
    lo, hi = collector.min_max_dict["relu0_output"]
    assert lo == pytest.approx(-0.989, abs=0.01) and 9.9 < hi <= 10.0  # not 1e6
    collector.collect(b"relu0_output", owned_handle(values * 2))  # the widest batch wins
    assert collector.min_max_dict["relu0_output"][1] > 19.8

    net, _ = load_model(run_dir(trained[1], NET, 0))
    net.hybridize()
    x = np.random.default_rng(0).random((16, 1, 32, 32), dtype=np.float32)
    ref = net(mx.nd.array(x)).softmax().asnumpy()
    out = quantize(net, x, mode="percentile")(mx.nd.array(x)).softmax().asnumpy()
    assert np.abs(out - ref).mean() < 0.05


def test_predict_follows_a_moved_checkpoints_folder(trained, tmp_path):
    """The checkpoints folder is one setting (paths.checkpoints) that train writes and predict
    reads: moved, predict finds the model there (once, predict had a copy of its own and
    read the old folder)."""
    import shutil
    import subprocess
    import sys

    from tests.conftest import ROOT, write_params

    records, ck = trained
    moved = tmp_path / "models-elsewhere"
    shutil.copytree(ck, moved)
    paths = at(tmp_path, moved, records, tmp_path / "m")
    write_params(tmp_path / "params.yaml", paths, tta=cfg(tmp_path, moved, n=2))
    done = subprocess.run([sys.executable, "-m", "pipeline.predict", "--net", NET, "--fold",
                           "0", "--params", str(tmp_path / "params.yaml")], cwd=tmp_path,
                          capture_output=True, text=True, timeout=300,
                          env=dict(__import__("os").environ, PYTHONPATH=str(ROOT)))
    assert done.returncode == 0, done.stderr[-2000:]
    assert load_predictions(pred(tmp_path), "test", NET, 0)[0].shape[1] == 3
    shutil.rmtree(moved)
    done = subprocess.run([sys.executable, "-m", "pipeline.predict", "--net", NET, "--fold",
                           "0", "--params", str(tmp_path / "params.yaml")], cwd=tmp_path,
                          capture_output=True, text=True, timeout=300,
                          env=dict(__import__("os").environ, PYTHONPATH=str(ROOT)))
    assert done.returncode == 1 and str(moved) in done.stderr.strip().splitlines()[-1]


def test_int8_keys_do_not_touch_the_work_of_a_float_run(trained):
    """With tta.int8 false the INT8 keys change nothing, so they are outside the chunks'
    fingerprint and finished chunks survive a change to them."""
    records, ck = trained
    model = ck / f"{NET}--fold0"
    base = P.work_settings(NET, 0, cfg(Path("x"), ck), "float32", model, records)
    other = P.work_settings(NET, 0, cfg(Path("y"), ck, int8_tolerance=0.5, calib_images=9,
                                        int8_guard_views=3), "float32", model, records)
    assert base == other and "work" not in base
    int8 = P.work_settings(NET, 0, cfg(Path("x"), ck, int8="auto"), "float32", model, records)
    assert P.work_settings(NET, 0, cfg(Path("x"), ck, int8="auto", calib_images=9), "float32",
                           model, records) != int8

"""Tests for pipeline.lib.augment: sampled ranges, matrix convention, and train (cv2) == TTA (MXNet)."""
from __future__ import annotations

import dataclasses
import multiprocessing
import time

import cv2
import mxnet as mx
import numpy as np
import pytest
import yaml
from scipy import stats
from scipy.stats import qmc

from pipeline.lib import augment as au
from pipeline.lib import ranges as rg
from pipeline.lib import views as vw

N = 4000  # draws for the statistical tests; seeds are fixed, so these are deterministic


def _smooth_image(size: int = 64) -> np.ndarray:
    """Dark Gaussian blobs on white: smooth, so bilinear implementations agree closely."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64) * (64.0 / size)
    img = (255 - 200 * np.exp(-((xx - 25) ** 2 + (yy - 36) ** 2) / (2 * 8.0 ** 2))
           - 120 * np.exp(-((xx - 42) ** 2 + (yy - 20) ** 2) / (2 * 5.0 ** 2)))
    return np.clip(np.round(img), 0, 255).astype(np.uint8)


def _model_input(raw: np.ndarray) -> np.ndarray:
    """Raw uint8 (white background) -> model input (background 0)."""
    return (255.0 - raw.astype(np.float32)) / 255.0


def _params(**kw) -> dict:
    """One identity transform, with the given parameters overridden."""
    base = dict(rotation=0.0, zoom=1.0, stretch=1.0, shear=0.0, tx=0.0, ty=0.0,
                flip_h=False, flip_v=False)
    base.update(kw)
    return {k: np.array([v]) for k, v in base.items()}


def _homog(m: np.ndarray) -> np.ndarray:
    return np.vstack([m, [0.0, 0.0, 1.0]])


# ---------------------------------------------------------------- sampled parameter statistics

@pytest.fixture(scope="module")
def draws() -> dict:
    return vw.sample_params(rg.AffineRanges(), N, np.random.default_rng(1))


def test_rotation_covers_full_circle_uniformly(draws):
    rot = draws["rotation"]
    assert rot.min() >= 0.0 and rot.max() < 360.0
    assert stats.kstest(rot, "uniform", args=(0.0, 360.0)).pvalue > 1e-3


@pytest.mark.parametrize("name, bounds", [("zoom", (1 / 1.6, 1.6)), ("stretch", (1 / 1.3, 1.3))])
def test_zoom_and_stretch_are_log_uniform(draws, name, bounds):
    logs, (lo, hi) = np.log(draws[name]), np.log(bounds)
    assert logs.min() >= lo and logs.max() <= hi
    assert stats.kstest(logs, "uniform", args=(lo, hi - lo)).pvalue > 1e-3
    # Log-uniform, not uniform: the median is the geometric mean (1.0), not the midpoint.
    assert abs(np.median(draws[name]) - 1.0) < 0.03


def test_shear_and_translation_within_bounds_and_uniform(draws):
    r = rg.AffineRanges()
    for name, half in (("shear", r.shear), ("tx", r.translate), ("ty", r.translate)):
        x = draws[name]
        assert np.abs(x).max() <= half
        assert stats.kstest(x, "uniform", args=(-half, 2 * half)).pvalue > 1e-3


@pytest.mark.parametrize("method", vw.METHODS)
def test_flip_rates_match_probabilities(method):
    ranges = rg.AffineRanges(flip_h=0.5, flip_v=0.2)
    p = vw.sample_params(ranges, N, np.random.default_rng(2), method)
    for name, rate in (("flip_h", 0.5), ("flip_v", 0.2)):
        assert p[name].dtype == bool
        sigma = np.sqrt(rate * (1 - rate) / N)
        assert abs(p[name].mean() - rate) < 4 * sigma, (name, p[name].mean())


@pytest.mark.parametrize("method", vw.METHODS)
def test_sampling_is_deterministic_given_a_seed(method):
    r = rg.AffineRanges()
    a = vw.sample_params(r, 50, np.random.default_rng(7), method)
    b = vw.sample_params(r, 50, np.random.default_rng(7), method)
    c = vw.sample_params(r, 50, np.random.default_rng(8), method)
    assert set(a) == set(vw.PARAM_NAMES)
    for k in a:
        np.testing.assert_array_equal(a[k], b[k])
    assert not np.array_equal(a["rotation"], c["rotation"])


def _to_unit(p: dict, r: rg.AffineRanges) -> np.ndarray:
    """Invert the mapping of the six continuous parameters back to the unit cube."""
    def lin(x, lo, hi):
        return (x - lo) / (hi - lo)
    return np.stack([
        lin(p["rotation"], *r.rotation),
        lin(np.log(p["zoom"]), *np.log(r.zoom)),
        lin(p["tx"], -r.translate, r.translate),
        lin(p["ty"], -r.translate, r.translate),
        lin(p["shear"], -r.shear, r.shear),
        lin(np.log(p["stretch"]), *np.log(r.stretch)),
    ], axis=1)


def test_halton_is_more_uniform_than_random():
    r = rg.AffineRanges()
    for seed in range(3):
        halton = _to_unit(vw.sample_params(r, 256, np.random.default_rng(seed), "halton"), r)
        rand = _to_unit(vw.sample_params(r, 256, np.random.default_rng(seed), "random"), r)
        assert halton.min() >= 0 and halton.max() <= 1
        assert qmc.discrepancy(halton) < 0.5 * qmc.discrepancy(rand)


def test_unknown_method_rejected():
    with pytest.raises(ValueError, match="method"):
        vw.sample_params(rg.AffineRanges(), 3, np.random.default_rng(0), "sobol")


# ---------------------------------------------------------------- the stratified TTA design

TTA_RANGES = rg.AffineRanges(translate=0.05, zoom=(0.79, 1.265), shear=10.0,
                             stretch=(0.877, 1.14))


def _stratified(n: int, ranges: rg.AffineRanges = TTA_RANGES, seed: int = 0) -> dict:
    return vw.sample_params(ranges, n, np.random.default_rng(seed), "stratified")


@pytest.mark.parametrize("ranges", [TTA_RANGES, rg.AffineRanges(rotation=(-180.0, 180.0)),
                                    rg.AffineRanges(rotation=(-30.0, 30.0), zoom=(1.1, 1.6))])
def test_stratified_starts_with_the_identity_clamped_into_the_ranges(ranges):
    p = _stratified(20, ranges)
    first = {k: v[0] for k, v in p.items()}
    assert first["rotation"] == pytest.approx(0.0, abs=1e-9)
    assert first["zoom"] == pytest.approx(float(np.clip(1.0, *ranges.zoom)))
    for name in ("tx", "ty", "shear"):
        assert first[name] == pytest.approx(0.0, abs=1e-12)
    assert first["stretch"] == pytest.approx(1.0)
    assert not first["flip_h"] and not first["flip_v"]


def test_stratified_identity_rotation_is_the_centre_when_zero_is_outside():
    p = _stratified(5, rg.AffineRanges(rotation=(10.0, 50.0), flip_h=1.0))
    assert p["rotation"][0] == pytest.approx(30.0)
    assert p["flip_h"].all()                      # probability 1: the identity is clamped too


@pytest.mark.parametrize("n", [1, 2, 3, 7, 10, 100])
def test_stratified_rotations_are_evenly_spaced_over_the_circle(n):
    rot = np.sort(_stratified(n)["rotation"])
    np.testing.assert_allclose(rot, np.arange(n) * 360.0 / n, atol=1e-9)


def test_stratified_rotations_are_evenly_spaced_over_a_partial_range():
    rot = np.sort(_stratified(7, rg.AffineRanges(rotation=(-30.0, 30.0)))["rotation"])
    np.testing.assert_allclose(np.diff(rot), 60.0 / 7)
    np.testing.assert_allclose(rot, -rot[::-1], atol=1e-9)   # symmetric about the identity
    assert rot.min() >= -30.0 and rot.max() <= 30.0


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_stratified_prefixes_spread_the_orientations(seed):
    """Every view is a distinct orientation (flip_v = flip_h + 180 degrees, so a view is a mirror
    or not at angle rotation + 180 flip_v), and in every prefix each class's angles are spread:
    the largest gap is at most about twice the even spacing."""
    p = _stratified(100, seed=seed)
    mirror = p["flip_h"] ^ p["flip_v"]
    orientation = np.round((p["rotation"] + 180.0 * p["flip_v"]) % 360.0, 6)
    assert len(set(zip(orientation, mirror))) == 100
    for m in (4, 10, 20, 50, 100):
        for cls in (True, False):
            angles = np.sort(orientation[:m][mirror[:m] == cls])
            gaps = np.diff(np.append(angles, angles[0] + 360.0))
            assert gaps.max() <= 2 * 360.0 / len(angles) + 7.2, (m, cls, gaps.max())


@pytest.mark.parametrize("flip_h, flip_v", [(0.5, 0.5), (0.5, 0.2), (0.0, 0.3), (1.0, 0.5)])
def test_stratified_flips_are_balanced_in_every_prefix(flip_h, flip_v):
    n = 100
    p = _stratified(n, dataclasses.replace(TTA_RANGES, flip_h=flip_h, flip_v=flip_v))
    m = np.arange(1, n + 1)
    for name, rate in (("flip_h", flip_h), ("flip_v", flip_v)):
        assert p[name].dtype == bool
        assert np.all(np.abs(np.cumsum(p[name]) - rate * m) <= 1.0 + 1e-9), name
    both = np.cumsum(p["flip_h"] & p["flip_v"])
    assert np.all(np.abs(both - flip_h * flip_v * m) <= 1.0 + 1e-9)


def test_stratified_values_stay_inside_the_ranges_and_cover_them():
    r = TTA_RANGES
    p = _stratified(200)
    assert p["rotation"].min() >= r.rotation[0] and p["rotation"].max() < r.rotation[1]
    u = _to_unit(p, r)
    assert u.min() >= 0.0 and u.max() <= 1.0
    # every prefix of 10 views after the identity reaches both halves of every parameter
    for col in range(1, 6):
        assert (u[1:11, col] < 0.5).any() and (u[1:11, col] > 0.5).any()


def test_stratified_is_deterministic_given_the_rng():
    a, b, c = _stratified(50, seed=7), _stratified(50, seed=7), _stratified(50, seed=8)
    for k in a:
        np.testing.assert_array_equal(a[k], b[k])
    assert not np.array_equal(a["zoom"], c["zoom"])


def test_stratified_edge_cases():
    empty = _stratified(0)
    assert set(empty) == set(vw.PARAM_NAMES) and all(len(v) == 0 for v in empty.values())
    one = vw.params_to_matrices(_stratified(1), 32)
    np.testing.assert_allclose(one, [[[1, 0, 0], [0, 1, 0]]], atol=1e-12)
    ident = vw.sample_params(rg.AffineRanges.identity(), 4, np.random.default_rng(0),
                             "stratified")
    np.testing.assert_allclose(vw.params_to_matrices(ident, 16),
                               np.tile([[1, 0, 0], [0, 1, 0]], (4, 1, 1)), atol=1e-12)


# ---------------------------------------------------------------- ranges: dict round trip, errors

def test_to_dict_round_trips_through_yaml():
    r = rg.AffineRanges(rotation=(10, 20), shear=5)
    d = yaml.safe_load(yaml.safe_dump(r.to_dict()))
    assert rg.AffineRanges.from_dict(d) == r
    assert rg.AffineRanges.from_dict({}) == rg.AffineRanges()
    assert rg.AffineRanges().to_dict()["rotation"] == [0.0, 360.0]


@pytest.mark.parametrize("bad, message", [
    ({"rotaton": [0, 360]}, "unknown augmentation key"),
    ({"zoom": [1.6, 0.5]}, "low 1.6 > high 0.5"),
    ({"zoom": [0.0, 1.6]}, "must be > 0"),
    ({"stretch": [-1.0, 1.3]}, "must be > 0"),
    ({"zoom": [1.0]}, r"\(low, high\) pair"),
    ({"rotation": "0-360"}, r"\(low, high\) pair"),
    ({"shear": 90}, r"shear must be in \[0, 90\)"),
    ({"shear": "20"}, "must be a number"),
    ({"translate": -0.1}, "translate must be in"),
    ({"flip_h": 1.5}, "probability"),
    ({"flip_v": True}, "must be a number"),
    ({"zoom": [float("nan"), 1.0]}, "finite"),
])
def test_from_dict_rejects_bad_ranges(bad, message):
    with pytest.raises(rg.RangesError, match=message):
        rg.AffineRanges.from_dict(bad)


def test_narrowed_shrinks_distortions_only():
    r = rg.AffineRanges()
    assert r.narrowed(1.0) == r
    flat = r.narrowed(0.0)
    assert flat.zoom == (1.0, 1.0) and flat.stretch == (1.0, 1.0)
    assert flat.shear == 0.0 and flat.translate == 0.0
    assert flat.rotation == r.rotation and flat.flip_h == r.flip_h
    assert np.allclose(r.narrowed(0.5).zoom, (1.6 ** -0.5, 1.6 ** 0.5))
    with pytest.raises(rg.RangesError):
        r.narrowed(1.5)


# ---------------------------------------------------------------- matrix convention

def test_identity_ranges_give_identity_matrices_and_warps():
    p = vw.sample_params(rg.AffineRanges.identity(), 5, np.random.default_rng(0), "halton")
    m = vw.params_to_matrices(p, 64)
    np.testing.assert_allclose(m, np.broadcast_to([[1, 0, 0], [0, 1, 0]], (5, 2, 3)), atol=1e-12)
    np.testing.assert_allclose(vw.matrices_to_theta(m, 64), [[1, 0, 0, 0, 1, 0]] * 5, atol=1e-12)

    raw = _smooth_image()
    np.testing.assert_array_equal(au.warp_image(raw, m[0]), raw)
    x = mx.nd.array(_model_input(raw)[None, None])
    np.testing.assert_allclose(au.warp_batch(x, m[:1]).asnumpy()[0, 0], _model_input(raw), atol=1e-5)
    np.testing.assert_allclose(au.tta_batch(x, m).asnumpy()[:, 0],
                               np.broadcast_to(_model_input(raw), (5, 64, 64)), atol=1e-5)


def test_rotation_and_zoom_match_cv2_sign_convention():
    m = vw.params_to_matrices(_params(rotation=30.0, zoom=1.25), 64)[0]
    np.testing.assert_allclose(m, cv2.getRotationMatrix2D((31.5, 31.5), 30.0, 1.25), atol=1e-12)


def test_composition_order_flip_stretch_shear_zoom_rotation_translation():
    full = _params(rotation=40.0, zoom=1.3, stretch=1.2, shear=15.0, tx=0.05, ty=-0.08,
                   flip_h=True, flip_v=False)
    size = (48, 64)  # non-square, to check H/W are not swapped
    single = {k: vw.params_to_matrices(_params(**{k: full[k][0]}), size)[0]
              for k in ("flip_h", "stretch", "shear", "zoom", "rotation")}
    translate = vw.params_to_matrices(_params(tx=0.05, ty=-0.08), size)[0]
    expected = _homog(translate)
    for k in ("rotation", "zoom", "shear", "stretch", "flip_h"):  # rightmost applies first
        expected = expected @ _homog(single[k])
    np.testing.assert_allclose(vw.params_to_matrices(full, size)[0], expected[:2], atol=1e-12)
    np.testing.assert_allclose(translate[:, 2], [0.05 * 64, -0.08 * 48])


def test_translation_moves_content_right_and_down():
    raw = _smooth_image()
    m = vw.params_to_matrices(_params(tx=0.1, ty=0.05), 64)[0]
    out = _model_input(au.warp_image(raw, m))
    src = _model_input(raw)
    yy, xx = np.mgrid[0:64, 0:64]
    dx = (out * xx).sum() / out.sum() - (src * xx).sum() / src.sum()
    dy = (out * yy).sum() / out.sum() - (src * yy).sum() / src.sum()
    assert abs(dx - 6.4) < 0.3 and abs(dy - 3.2) < 0.3


def test_flips_equal_numpy_flips_in_both_paths():
    raw = np.random.default_rng(0).integers(0, 256, (32, 32), dtype=np.uint8)
    only_flip_h = rg.AffineRanges.from_dict({**rg.AffineRanges.identity().to_dict(), "flip_h": 1.0})
    flip_h = au.RandomAffineNDSB(only_flip_h, seed=0)
    np.testing.assert_array_equal(flip_h(image=raw)["image"], np.fliplr(raw))

    m_h = vw.params_to_matrices(_params(flip_h=True), 32)
    m_v = vw.params_to_matrices(_params(flip_v=True), 32)
    np.testing.assert_array_equal(au.warp_image(raw, m_v[0]), np.flipud(raw))
    x = mx.nd.array(_model_input(raw)[None, None])
    out = au.tta_batch(x, np.concatenate([m_h, m_v])).asnumpy()[:, 0]
    np.testing.assert_allclose(out[0], np.fliplr(_model_input(raw)), atol=1e-5)
    np.testing.assert_allclose(out[1], np.flipud(_model_input(raw)), atol=1e-5)


# ---------------------------------------------------------------- train (cv2) == TTA (MXNet)

def test_train_transform_and_tta_batch_give_the_same_images():
    """The SAME parameters mean the SAME transform in the albumentations and MXNet paths."""
    raw, seed, n = _smooth_image(), 123, 16
    train = au.build_train_transform(rg.AffineRanges(), size=64, seed=seed)
    train_views = np.stack([_model_input(train(image=raw)["image"]) for _ in range(n)])

    rng = np.random.default_rng(seed)  # the transform's stream, drawn one image at a time
    draws = [vw.sample_params(rg.AffineRanges(), 1, rng) for _ in range(n)]
    params = {k: np.concatenate([d[k] for d in draws]) for k in vw.PARAM_NAMES}
    matrices = vw.params_to_matrices(params, 64)
    tta_views = au.tta_batch(mx.nd.array(_model_input(raw)[None, None]), matrices).asnumpy()[:, 0]

    assert np.abs(train_views - _model_input(raw)).mean() > 0.02  # the views really do change
    diff = np.abs(train_views - tta_views)[:, 2:-2, 2:-2]
    assert diff.mean(axis=(1, 2)).max() < 2 / 255, diff.mean(axis=(1, 2)) * 255
    # cv2 quantizes sample positions to 1/32 px and rounds to uint8: measured max 0.76/255. A
    # half-pixel (align-corners) mistake in the theta conversion gives 2.6/255, so keep this tight.
    assert diff.max() < 1.5 / 255, diff.max() * 255


def test_train_transform_resizes_and_keeps_layout():
    big = cv2.resize(_smooth_image(), (100, 100), interpolation=cv2.INTER_LINEAR)
    t = au.build_train_transform(size=48, seed=0)
    out = t(image=big)["image"]
    assert out.shape == (48, 48) and out.dtype == np.uint8
    assert t(image=big[:, :, None])["image"].shape == (48, 48, 1)
    # Corners of a zoomed-out / shifted view are filled with the white background.
    zoomed_out = vw.params_to_matrices(_params(zoom=0.5), 48)[0]
    assert au.warp_image(np.zeros((48, 48), np.uint8), zoomed_out)[0, 0] == 255


def test_transform_probability_uses_its_own_generator():
    raw = _smooth_image(32)
    never = au.RandomAffineNDSB(p=0.0, seed=0)
    assert all(never(image=raw)["image"] is raw for _ in range(5))
    half = au.RandomAffineNDSB(p=0.5, seed=0)
    applied = [half.get_params()["affine"] is not None for _ in range(2000)]
    assert abs(np.mean(applied) - 0.5) < 4 * np.sqrt(0.25 / 2000)
    with pytest.raises(rg.RangesError):
        au.RandomAffineNDSB(p=1.5)


def test_reseed_restarts_the_stream():
    t = au.RandomAffineNDSB(seed=5)
    first = [t.get_params()["affine"]["rotation"][0] for _ in range(3)]
    t.reseed(5)
    assert [t.get_params()["affine"]["rotation"][0] for _ in range(3)] == first


_WORKER_TRANSFORM: au.RandomAffineNDSB | None = None


def _init_worker(transform: au.RandomAffineNDSB) -> None:
    # Like MXNet's DataLoader: the dataset (and its transform) is installed once per worker.
    global _WORKER_TRANSFORM
    _WORKER_TRANSFORM = transform


def _worker_rotation(_: int) -> float:
    time.sleep(0.05)  # let both workers pick up tasks
    return float(_WORKER_TRANSFORM.get_params()["affine"]["rotation"][0])


def test_forked_workers_do_not_repeat_the_parent_stream():
    t = au.RandomAffineNDSB(seed=11)
    t.get_params()
    ref = au.RandomAffineNDSB(seed=11)  # a copy that kept the parent's Generator draws this next
    ref.get_params()
    parent_next = float(ref.get_params()["affine"]["rotation"][0])
    with multiprocessing.get_context("fork").Pool(2, _init_worker, (t,)) as pool:
        got = pool.map(_worker_rotation, range(6), chunksize=1)
    assert len(set(got)) == 6
    assert parent_next not in got



def _reseeded_worker_rotation(seed: int) -> float:
    _WORKER_TRANSFORM.reseed(seed)
    return float(_WORKER_TRANSFORM.get_params()["affine"]["rotation"][0])


def test_reseed_in_a_worker_gives_the_same_stream_as_in_the_parent():
    """Per-batch reseeding (pipeline.lib.data) must not depend on which worker runs the batch."""
    t = au.RandomAffineNDSB(seed=11)
    expected = []
    for seed in range(4):
        t.reseed(seed)
        expected.append(float(t.get_params()["affine"]["rotation"][0]))
    with multiprocessing.get_context("fork").Pool(2, _init_worker, (t,)) as pool:
        assert pool.map(_reseeded_worker_rotation, range(4), chunksize=1) == expected
    assert au.build_train_transform(seed=0).transforms[-1].__class__ is au.RandomAffineNDSB


# ---------------------------------------------------------------- batched MXNet warps

def test_tta_batch_is_image_major_and_matches_per_image_warps():
    rng = np.random.default_rng(3)
    imgs = rng.random((2, 3, 20, 24)).astype(np.float32)  # B=2, C=3, non-square
    mats = vw.sample_matrices(rg.AffineRanges(), 4, (20, 24), rng)
    out = au.tta_batch(mx.nd.array(imgs), mats).asnumpy()
    assert out.shape == (8, 3, 20, 24)
    for b in range(2):
        per = au.warp_batch(mx.nd.array(np.repeat(imgs[b:b + 1], 4, 0)), mats).asnumpy()
        np.testing.assert_allclose(out[b * 4:(b + 1) * 4], per, atol=1e-6)
    shared = au.warp_batch(mx.nd.array(imgs), mats[0]).asnumpy()
    np.testing.assert_allclose(shared, out[[0, 4]], atol=1e-6)
    with pytest.raises(ValueError, match="matrices"):
        au.warp_batch(mx.nd.array(imgs), mats[:3])


def test_warp_batch_background_fill_matches_cv2_on_raw_values():
    raw = _smooth_image().astype(np.float32)
    m = vw.params_to_matrices(_params(zoom=0.6, rotation=20.0, tx=0.1), 64)
    mx_out = au.warp_batch(mx.nd.array(raw[None, None]), m, background=255.0).asnumpy()[0, 0]
    cv_out = au.warp_image(raw, m[0], background=255.0)
    assert mx_out[0, 0] == pytest.approx(255.0)
    assert np.abs(mx_out - cv_out)[2:-2, 2:-2].max() < 0.5

"""Random affine augmentation shared by training (cv2 / albumentations) and 100-fold TTA (MXNet).

Bing Xu's NDSB entry (thesis §6.2) trains on "rotation, translation, rescaling, flipping and
shearing" and predicts by averaging 100 random affine views of every test image. The two uses
must mean the same thing: a TTA view should be drawn from the distribution the net was trained
on. This module therefore has ONE parameterization and ONE matrix builder, and two warpers:

* :class:`AffineRanges` - the distribution (ranges), validated, round-trips through a dict
  (``params.yaml``);
* :func:`sample_params` - vectorized draws, pseudo-random, quasi-random (Halton) or a
  stratified TTA design (identity first, even rotations, balanced flips), all through the same
  unit-cube -> parameter mapping;
* :func:`params_to_matrices` - (n, 2, 3) pixel-space matrices;
* training: :func:`warp_image` (cv2.warpAffine), wrapped as the albumentations transform
  :class:`RandomAffineNDSB` and :func:`build_train_transform`;
* TTA: :func:`warp_batch` / :func:`tta_batch` - batched ``GridGenerator`` + ``BilinearSampler``
  on model-input tensors, one operator call for a whole batch times T transforms.

Matrix convention (identical to ``cv2.warpAffine`` without ``WARP_INVERSE_MAP``)
-------------------------------------------------------------------------------
A matrix ``M`` (2x3) is the FORWARD map, input pixel -> output pixel::

    [x_out, y_out] = M @ [x_in, y_in, 1],    i.e.  out(M p) = in(p),  out(q) = in(M^-1 q)

with x the column and y the row index, pixel centres at integer coordinates, origin at the
top-left pixel centre. About the image centre ``c = ((W-1)/2, (H-1)/2)`` the linear part is
composed, first applied first, as

    flip -> stretch -> shear -> zoom -> rotation, then translation:
    A = R(rotation) @ zoom @ Shear(shear) @ diag(sqrt(s), 1/sqrt(s)) @ diag(+-1, +-1)
    M = [A | c + t - A c],   t = (tx * W, ty * H)

* flip_h mirrors columns (x -> W-1-x, exactly ``np.fliplr``), flip_v mirrors rows;
* stretch ``s`` changes the aspect ratio by ``s`` keeping the area (Dieleman et al.'s NDSB
  "stretch": x scaled by sqrt(s), y by 1/sqrt(s));
* shear ``phi`` degrees: x += tan(phi) * y (area-preserving);
* zoom ``z`` > 1 enlarges the plankton (zoom in), < 1 shrinks it;
* rotation ``theta`` degrees is COUNTER-clockwise as displayed (y axis points down), the same
  sign as ``cv2.getRotationMatrix2D``;
* tx, ty are fractions of the width / height; positive moves the content right / down.

Background: raw images are dark plankton on white (255); the model input is inverted,
``(255 - pixel) / 255``, so background is 0 there. The cv2 path fills with 255 on raw uint8
images; the MXNet path fills with 0 on model-input tensors (``BilinearSampler`` pads with 0).
Both are the same picture, which ``tests/test_augment.py`` checks.
"""
from __future__ import annotations

import dataclasses
import math
import multiprocessing
import os
from typing import Any, Dict, Mapping, Optional, Tuple, Union

import albumentations as A
import cv2
import mxnet as mx
import numpy as np

from pipeline.lib.ranges import AffineRanges, RangesError, _interval, _number  # noqa: F401

Params = Dict[str, np.ndarray]
Size = Union[int, Tuple[int, int]]

# Order of the unit-cube coordinates. Halton's first dimensions (small prime bases) are the
# most uniform, so the most influential parameters come first; flips are thresholds on the last.
PARAM_NAMES = ("rotation", "zoom", "tx", "ty", "shear", "stretch", "flip_h", "flip_v")
_N_DIMS = len(PARAM_NAMES)
METHODS = ("random", "halton", "stratified")


# --------------------------------------------------------------------------------------------
# Sampling
# --------------------------------------------------------------------------------------------

def sample_params(ranges: AffineRanges, n: int, rng: np.random.Generator,
                  method: str = "random") -> Params:
    """Draw ``n`` transforms: a dict of length-``n`` arrays keyed by :data:`PARAM_NAMES`.

    rotation (deg), zoom, stretch, shear (deg), tx, ty (fractions of the side) are float64;
    flip_h, flip_v are bool. ``method='random'`` uses ``rng`` directly; ``method='halton'``
    uses a scrambled Halton sequence (scrambling seeded from ``rng``) - lower discrepancy, so
    100 TTA views cover the range more evenly; ``method='stratified'`` is the designed TTA view
    list of :func:`stratified_unit`. All go through the same unit-cube mapping.
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    if method == "random":
        u = rng.random((n, _N_DIMS))
    elif method == "halton":
        u = _halton(n, rng)
    else:
        u = stratified_unit(ranges, n, rng)
    return unit_to_params(ranges, u)


def _halton(n: int, rng: np.random.Generator, dims: int = _N_DIMS) -> np.ndarray:
    from scipy.stats import qmc  # scipy import is slow; only the Halton paths need it
    try:
        engine = qmc.Halton(d=dims, scramble=True, rng=rng)
    except TypeError:  # scipy < 1.15 names the argument `seed`
        engine = qmc.Halton(d=dims, scramble=True, seed=rng)
    return engine.random(n)


# Unit-cube columns of the continuous parameters (everything but rotation and the flips).
_CONTINUOUS = ("zoom", "tx", "ty", "shear", "stretch")


def stratified_unit(ranges: AffineRanges, n: int, rng: np.random.Generator) -> np.ndarray:
    """The ``stratified`` TTA design as unit-cube points, shape (n, 8) in :data:`PARAM_NAMES` order.

    What (view by view, deterministic given ``rng``):

    * view 0 is the identity transform, clamped into the ranges: rotation 0 (for a range
      spanning the full circle, the angle in the range equal to 0 modulo 360; otherwise the
      range's centre if 0 lies outside it), zoom 1, no shift, shear or stretch, no flip (a flip
      only where its probability is 1);
    * the n rotations are evenly spaced over the rotation range with spacing width / n, the grid
      placed so the identity angle is on it: ``k * 360 / n`` for a [0, 360] range, a grid
      symmetric about 0 for [-180, 180], the stratum midpoints (shifted by at most half a
      stratum) for a partial range. Their ORDER is a greedy farthest-point order starting from
      the identity (distance around the circle for a full circle), ties broken by ``rng``, so
      the first 2, 4, 8, ... views are already spread over the whole range;
    * the four flip combinations (none, h, v, both) are dealt with probabilities
      (1-ph)(1-pv), ph(1-pv), (1-ph)pv, ph pv by largest remaining quota, ties broken by
      ``rng``: in every prefix of m views each combination occurs within one view of its
      expected count, so about ``p * m`` views are flipped for every m, and the two flips are
      not tied to each other (h and v together equal a 180 degree turn, so always flipping both
      at once would never mirror);
    * zoom, tx, ty, shear and stretch of views 1..n-1 are the first n - 1 points of a scrambled
      Halton sequence (scrambling seeded from ``rng``) in the bases 3, 5, 7, 11, 13 - base 2
      is left out because the rotation order and the flip pattern already follow powers of 2,
      and sharing it would tie a parameter to them. Any prefix of a Halton sequence is evenly
      spread, unlike a Latin hypercube, which is stratified only as a whole.

    Why: predict averages over the first n views and reports the curve at n = 1, 2, 5, ... . An
    i.i.d. draw wastes views on near-duplicates and leaves gaps (its first view can be a strong
    distortion, which is why one random view scores worse than the plain image); the identity
    first makes n = 1 the plain prediction, and even rotations plus balanced flips cover the
    symmetries plankton actually have (no preferred orientation) with few views.
    """
    u = np.zeros((n, _N_DIMS))
    if n == 0:
        return u
    col = {name: i for i, name in enumerate(PARAM_NAMES)}
    flips = _balanced_flips(ranges.flip_h, ranges.flip_v, n, rng)
    u[:, col["rotation"]] = _rotation_slots(ranges.rotation, flips, rng)
    for i, (name, p) in enumerate((("flip_h", ranges.flip_h), ("flip_v", ranges.flip_v))):
        # u < p flips (unit_to_params): p / 2 flips, (1 + p) / 2 does not (for p < 1).
        u[:, col[name]] = np.where(flips[:, i], p / 2, (1 + p) / 2)
    identity = {"zoom": _unit_of(np.log(ranges.zoom), 0.0),
                "stretch": _unit_of(np.log(ranges.stretch), 0.0),
                "tx": 0.5, "ty": 0.5, "shear": 0.5}
    for name in _CONTINUOUS:
        u[0, col[name]] = identity[name]
    if n > 1:
        points = _halton(n - 1, rng, dims=len(_CONTINUOUS) + 1)[:, 1:]  # drop base 2
        for i, name in enumerate(_CONTINUOUS):
            u[1:, col[name]] = points[:, i]
    return u


def _unit_of(bounds: Tuple[float, float], value: float) -> float:
    """Unit coordinate of ``value`` clamped into ``bounds`` (0.5 for a degenerate range)."""
    lo, hi = bounds
    return 0.5 if hi <= lo else float((np.clip(value, lo, hi) - lo) / (hi - lo))


def _rotation_slots(bounds: Tuple[float, float], flips: np.ndarray, rng: np.random.Generator
                    ) -> np.ndarray:
    """Unit coordinates of n evenly spaced rotations, identity first, farthest-point order.

    On a full circle the order is chosen in the space of the views' resulting ORIENTATIONS:
    flip_v equals flip_h plus a 180 degree turn, so a view is a mirror (h xor v) at the angle
    rotation + 180 v. Each next view takes the unused angle whose orientation is farthest from
    the views of its own mirror class (then from all views), which keeps the first views from
    repeating an orientation.
    """
    n = len(flips)
    lo, hi = bounds
    width = hi - lo
    if width <= 0:
        return np.full(n, 0.5)
    full = width >= 360.0
    if full:
        identity = lo + (-lo) % 360.0
    else:
        identity = 0.0 if lo <= 0.0 <= hi else (lo + hi) / 2
    t0 = (identity - lo) / width                 # identity's unit coordinate
    grid = (np.arange(n) + 0.5) / n              # stratum midpoints
    first = int(np.argmin(np.abs(grid - t0)))
    grid = np.clip(grid + (t0 - grid[first]), 0.0, 1.0)  # shift (< half a stratum) onto it
    if full:
        angle = lo + grid * width
        turned = np.stack([angle, angle + 180.0])            # orientation if v = 0 / 1
        mirror = flips[:, 0] ^ flips[:, 1]
        turn = flips[:, 1].astype(int)
    else:
        turned = np.stack([grid, grid])
        mirror = np.zeros(n, dtype=bool)
        turn = np.zeros(n, dtype=int)
    # nearest[m][v, k]: distance from slot k (as a view with v flip) to the chosen views of
    # mirror class m.
    nearest = np.full((2, 2, n), np.inf)
    used = np.zeros(n, dtype=bool)
    order = np.empty(n, dtype=int)
    for j in range(n):
        if j == 0:
            pick = first
        else:
            m, v = int(mirror[j]), turn[j]
            own = np.round(nearest[m][v], 9)
            overall = np.round(np.minimum(nearest[0][v], nearest[1][v]), 9)
            own = np.where(np.isinf(own), np.inf, own)
            own[used], overall[used] = -1.0, -1.0
            best = np.flatnonzero(own == own.max())
            best = best[overall[best] == overall[best].max()]
            pick = int(best[rng.integers(len(best))]) if len(best) > 1 else int(best[0])
        order[j], used[pick] = pick, True
        orientation = turned[turn[j], pick]
        for v in (0, 1):
            d = np.abs(turned[v] - orientation)
            if full:
                d = np.mod(d, 360.0)
                d = np.minimum(d, 360.0 - d)
            nearest[int(mirror[j])][v] = np.minimum(nearest[int(mirror[j])][v], d)
    return grid[order]


def _balanced_flips(p_h: float, p_v: float, n: int, rng: np.random.Generator) -> np.ndarray:
    """(n, 2) bool flips: view 0 unflipped (unless p = 1), every prefix balanced by quota."""
    combos = np.array([[False, False], [True, False], [False, True], [True, True]])
    q = np.array([(1 - p_h) * (1 - p_v), p_h * (1 - p_v), (1 - p_h) * p_v, p_h * p_v])
    first = 2 * int(p_v >= 1.0) + int(p_h >= 1.0)  # the identity, clamped
    counts = np.zeros(4)
    picks = np.empty(n, dtype=int)
    picks[0] = first
    counts[first] += 1
    for j in range(1, n):
        deficit = np.where(q > 0, np.round(q * (j + 1) - counts, 9), -np.inf)
        best = np.flatnonzero(deficit == deficit.max())
        pick = int(best[rng.integers(len(best))]) if len(best) > 1 else int(best[0])
        picks[j] = pick
        counts[pick] += 1
    return combos[picks]


def unit_to_params(ranges: AffineRanges, u: np.ndarray) -> Params:
    """Map points of the unit cube, shape (n, 8) in :data:`PARAM_NAMES` order, to parameters.

    Uniform ``u`` gives: uniform rotation / shear / translation, log-uniform zoom / stretch,
    Bernoulli(flip_*) flips (``u < p``).
    """
    u = np.asarray(u, dtype=np.float64)
    if u.ndim != 2 or u.shape[1] != _N_DIMS:
        raise ValueError(f"unit samples must have shape (n, {_N_DIMS}), got {u.shape}")
    col = dict(zip(PARAM_NAMES, u.T))
    return {
        "rotation": _lerp(ranges.rotation, col["rotation"]),
        "zoom": np.exp(_lerp(np.log(ranges.zoom), col["zoom"])),
        "tx": _lerp((-ranges.translate, ranges.translate), col["tx"]),
        "ty": _lerp((-ranges.translate, ranges.translate), col["ty"]),
        "shear": _lerp((-ranges.shear, ranges.shear), col["shear"]),
        "stretch": np.exp(_lerp(np.log(ranges.stretch), col["stretch"])),
        "flip_h": col["flip_h"] < ranges.flip_h,
        "flip_v": col["flip_v"] < ranges.flip_v,
    }


def _lerp(bounds: Any, t: np.ndarray) -> np.ndarray:
    lo, hi = bounds
    return lo + (hi - lo) * t


# --------------------------------------------------------------------------------------------
# Matrices
# --------------------------------------------------------------------------------------------

def params_to_matrices(params: Mapping[str, np.ndarray], size: Size) -> np.ndarray:
    """Forward pixel matrices, shape (n, 2, 3) float64, for images of ``size`` (side or (H, W)).

    See the module docstring for the convention; feed them to ``cv2.warpAffine`` as-is.
    """
    h, w = _hw(size)
    rot = np.deg2rad(np.asarray(params["rotation"], dtype=np.float64))
    n = rot.shape[0]
    cos, sin = np.cos(rot), np.sin(rot)
    zoom = np.asarray(params["zoom"], dtype=np.float64)
    sqrt_s = np.sqrt(np.asarray(params["stretch"], dtype=np.float64))
    tan_sh = np.tan(np.deg2rad(np.asarray(params["shear"], dtype=np.float64)))
    fx = np.where(np.asarray(params["flip_h"], dtype=bool), -1.0, 1.0)
    fy = np.where(np.asarray(params["flip_v"], dtype=bool), -1.0, 1.0)

    # Linear part, built factor by factor (each (n, 2, 2)) so the order is explicit.
    flip = _diag(fx, fy)
    stretch = _diag(sqrt_s, 1.0 / sqrt_s)
    shear = _stack2(np.ones(n), tan_sh, np.zeros(n), np.ones(n))
    scale = _diag(zoom, zoom)
    rotation = _stack2(cos, sin, -sin, cos)  # CCW as displayed with y down (cv2 sign)
    lin = rotation @ scale @ shear @ stretch @ flip

    centre = np.array([(w - 1) / 2.0, (h - 1) / 2.0])
    shift = np.stack([np.asarray(params["tx"], dtype=np.float64) * w,
                      np.asarray(params["ty"], dtype=np.float64) * h], axis=-1)
    offset = centre + shift - lin @ centre
    return np.concatenate([lin, offset[:, :, None]], axis=2)


def sample_matrices(ranges: AffineRanges, n: int, size: Size, rng: np.random.Generator,
                    method: str = "random") -> np.ndarray:
    """``params_to_matrices(sample_params(...), size)`` - e.g. the T matrices of a TTA run."""
    return params_to_matrices(sample_params(ranges, n, rng, method), size)


def _diag(a: Any, b: Any) -> np.ndarray:
    a, b = np.broadcast_arrays(np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64))
    z = np.zeros_like(a)
    return _stack2(a, z, z, b)


def _stack2(a: np.ndarray, b: np.ndarray, c: np.ndarray, d: np.ndarray) -> np.ndarray:
    return np.stack([np.stack([a, b], -1), np.stack([c, d], -1)], -2)


def _hw(size: Size) -> Tuple[int, int]:
    h, w = (size, size) if np.isscalar(size) else size
    return int(h), int(w)


def invert_matrices(matrices: np.ndarray) -> np.ndarray:
    """Inverse affine maps, (n, 2, 3) -> (n, 2, 3) (forward <-> ``WARP_INVERSE_MAP`` form)."""
    m = np.asarray(matrices, dtype=np.float64).reshape(-1, 2, 3)
    lin_inv = np.linalg.inv(m[:, :, :2])
    return np.concatenate([lin_inv, -lin_inv @ m[:, :, 2:]], axis=2)


def matrices_to_theta(matrices: np.ndarray, size: Size) -> np.ndarray:
    """Forward pixel matrices -> ``GridGenerator(transform_type='affine')`` thetas, (n, 6).

    GridGenerator maps each OUTPUT position to the INPUT position to sample, both in normalized
    coordinates where -1 / +1 are the centres of the first / last pixel (align-corners;
    ``x_pix = (x_norm + 1) (W - 1) / 2``, checked against MXNet 1.9.1). So theta is
    N @ M^-1 @ N^-1, with N the pixel -> normalized map.
    """
    h, w = _hw(size)
    if h < 2 or w < 2:
        raise ValueError(f"images must be at least 2x2 to warp, got {(h, w)}")
    inv = _homogeneous(invert_matrices(matrices))
    norm = np.array([[2.0 / (w - 1), 0.0, -1.0], [0.0, 2.0 / (h - 1), -1.0], [0.0, 0.0, 1.0]])
    theta = norm @ inv @ np.linalg.inv(norm)
    return theta[:, :2, :].reshape(-1, 6)


def _homogeneous(m: np.ndarray) -> np.ndarray:
    bottom = np.broadcast_to(np.array([0.0, 0.0, 1.0]), (m.shape[0], 1, 3))
    return np.concatenate([m, bottom], axis=1)


# --------------------------------------------------------------------------------------------
# Training path: cv2 + albumentations
# --------------------------------------------------------------------------------------------

def warp_image(image: np.ndarray, matrix: np.ndarray, background: float = 255) -> np.ndarray:
    """Warp one HxW or HxWxC image by a forward pixel matrix (bilinear, constant ``background``)."""
    h, w = image.shape[:2]
    out = cv2.warpAffine(image, np.asarray(matrix, dtype=np.float64).reshape(2, 3), (w, h),
                         flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT,
                         borderValue=background)
    # cv2 drops a trailing channel axis of length 1; keep the caller's layout.
    return out.reshape(image.shape)


class RandomAffineNDSB(A.ImageOnlyTransform):
    """albumentations transform: one random affine from :func:`sample_params`, warped by cv2.

    Randomness and seeding: parameters (and the apply-or-not decision when ``p < 1``) come from
    this object's own ``numpy.random.Generator``, never from python ``random`` (which
    albumentations 1.3.1 uses for its own ``p``; we pass ``p=1`` to the base class so that draw
    is always "apply"). With ``seed`` set, a single process is fully reproducible; ``reseed``
    restarts the stream (e.g. per epoch).

    ``reseed(seed)`` makes the stream exactly ``default_rng(seed)`` in whichever process calls
    it, so re-seeding per batch from (seed, epoch, batch) - as :mod:`pipeline.lib.data` does inside
    its workers - gives the same augmented batches for any number of workers.

    A stream that was NOT re-seeded in the current process is inherited (fork, or unpickled in
    a spawned worker); kept as is, every worker would repeat the parent's draws. On its first
    draw in the new process it is therefore re-derived as ``SeedSequence(seed entropy,
    spawn_key=worker identity)``: multiprocessing's process identity (a creation counter, the
    same in every run of the same program), or the pid for processes it did not create.
    """

    def __init__(self, ranges: Optional[AffineRanges] = None, background: float = 255,
                 p: float = 1.0, seed: Optional[int] = None, always_apply: bool = False):
        super().__init__(always_apply=always_apply, p=1.0)
        self.ranges = ranges if ranges is not None else AffineRanges()
        self.background = background
        self.apply_p = _number("p", p)
        if not 0.0 <= self.apply_p <= 1.0:
            raise RangesError(f"p must be in [0, 1], got {p}")
        self.always = always_apply
        self.reseed(seed)

    def reseed(self, seed: Optional[int] = None) -> None:
        """Restart the stream in this process as ``default_rng(seed)`` (None: fresh entropy)."""
        self._seedseq = np.random.SeedSequence(seed)
        self._rng = np.random.default_rng(self._seedseq)
        self._pid = os.getpid()

    def _generator(self) -> np.random.Generator:
        pid = os.getpid()
        if pid != self._pid:  # inherited by a forked/spawned worker: derive a distinct stream
            key = tuple(multiprocessing.current_process()._identity) or (pid,)
            self._rng = np.random.default_rng(
                np.random.SeedSequence(self._seedseq.entropy, spawn_key=key))
            self._pid = pid
        return self._rng

    def get_params(self) -> Dict[str, Any]:
        rng = self._generator()
        if self.apply_p < 1.0 and not self.always and rng.random() >= self.apply_p:
            return {"affine": None}
        return {"affine": sample_params(self.ranges, 1, rng)}

    def apply(self, img: np.ndarray, affine: Optional[Params] = None, **params: Any) -> np.ndarray:
        if affine is None:
            return img
        matrix = params_to_matrices(affine, img.shape[:2])[0]
        return warp_image(img, matrix, self.background)

    def get_transform_init_args(self) -> Dict[str, Any]:
        return {"ranges": self.ranges.to_dict(), "background": self.background,
                "p": self.apply_p}


def build_train_transform(ranges: Optional[AffineRanges] = None, size: int = 64,
                          background: float = 255, seed: Optional[int] = None) -> A.Compose:
    """Training pipeline for raw uint8 images: area-resize to ``size`` if needed, random affine.

    The resize comes first (INTER_AREA, anti-aliased; a no-op when the record is already
    ``size`` x ``size``) so the affine acts at the net's resolution - the same resolution the
    TTA path warps at - and ``translate`` means the same number of net-input pixels in both.
    The affine is the LAST transform: :mod:`pipeline.lib.data` reseeds ``transforms[-1]`` per batch.
    Call as ``build_train_transform(...)(image=img)["image"]``.
    """
    return A.Compose([
        A.Resize(size, size, interpolation=cv2.INTER_AREA, p=1.0),
        RandomAffineNDSB(ranges, background=background, seed=seed),
    ])


# --------------------------------------------------------------------------------------------
# TTA path: batched MXNet warps on model-input tensors (background 0)
# --------------------------------------------------------------------------------------------

def warp_batch(images: mx.nd.NDArray, matrices: np.ndarray,
               background: float = 0.0) -> mx.nd.NDArray:
    """Warp a (B, C, H, W) float batch by forward pixel matrices (B, 2, 3), or one shared (2, 3).

    Meant for model-input tensors, whose background is 0, so ``BilinearSampler``'s zero padding
    is already the right fill; for another ``background`` the warp runs on ``images -
    background``. One GridGenerator + one BilinearSampler call for the whole batch.
    """
    b, c, h, w = images.shape
    m = np.asarray(matrices, dtype=np.float64).reshape(-1, 2, 3)
    if m.shape[0] == 1 and b > 1:
        # One transform for all: fold the batch into channels and build a single grid.
        return tta_batch(images, m, background)
    if m.shape[0] != b:
        raise ValueError(f"need {b} matrices (or 1) for a batch of {b}, got {m.shape[0]}")
    theta = mx.nd.array(matrices_to_theta(m, (h, w)), ctx=images.context, dtype="float32")
    grid = mx.nd.GridGenerator(data=theta, transform_type="affine", target_shape=(h, w))
    return _sample(images, grid, background)


def tta_batch(images_nchw: mx.nd.NDArray, matrices_t: np.ndarray,
              background: float = 0.0) -> mx.nd.NDArray:
    """Every image under every one of T transforms: (B, C, H, W) -> (B*T, C, H, W).

    Row ``b * T + t`` is image ``b`` warped by ``matrices_t[t]``, so class probabilities average
    as ``probs.reshape(B, T, K).mean(axis=1)``. The T grids are built once and shared by all
    images: the batch is folded into the channel axis (``BilinearSampler`` samples every channel
    at the same grid), which keeps the grid at (T, 2, H, W) instead of (B*T, 2, H, W), faster than
    per-image grids (BENCHMARKS.md). The output holds B*T*C*H*W floats (210 MB for
    B=32, T=100, 128x128), so callers choose B to fit memory.
    """
    b, c, h, w = images_nchw.shape
    m = np.asarray(matrices_t, dtype=np.float64).reshape(-1, 2, 3)
    t = m.shape[0]
    theta = mx.nd.array(matrices_to_theta(m, (h, w)), ctx=images_nchw.context, dtype="float32")
    grid = mx.nd.GridGenerator(data=theta, transform_type="affine", target_shape=(h, w))
    folded = images_nchw.reshape((1, b * c, h, w)).broadcast_to((t, b * c, h, w))
    out = _sample(folded, grid, background)                      # (T, B*C, H, W)
    return out.reshape((t, b, c, h, w)).transpose((1, 0, 2, 3, 4)).reshape((b * t, c, h, w))


def _sample(data: mx.nd.NDArray, grid: mx.nd.NDArray, background: float) -> mx.nd.NDArray:
    if background == 0:
        return mx.nd.BilinearSampler(data=data, grid=grid)
    return mx.nd.BilinearSampler(data=data - background, grid=grid) + background

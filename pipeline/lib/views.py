"""One affine parameterization: random draws, view designs and their pixel matrices.

What a transform *is*, shared by training (:mod:`pipeline.lib.augment`'s cv2 warp) and
100-fold TTA (its MXNet warp), with neither library needed here:

* :func:`sample_params` - vectorized draws, pseudo-random, quasi-random (Halton) or a
  stratified TTA design (identity first, even rotations, balanced flips), all through the same
  unit-cube -> parameter mapping (:data:`METHODS`);
* :func:`params_to_matrices` / :func:`sample_matrices` - (n, 2, 3) pixel-space matrices;
* :func:`matrices_to_theta` - the normalized form MXNet's ``GridGenerator`` takes.

The distribution itself is :class:`pipeline.lib.ranges.AffineRanges`.

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

from typing import Any, Dict, Mapping, Tuple, Union

import numpy as np

from pipeline.lib.ranges import AffineRanges

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

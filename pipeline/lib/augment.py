"""Random affine augmentation: the two warpers of one parameterization.

Bing Xu's NDSB entry (thesis §6.2) trains on "rotation, translation, rescaling, flipping and
shearing" and predicts by averaging 100 random affine views of every test image. The two uses
must mean the same thing: a TTA view should be drawn from the distribution the net was trained
on. So the distribution (:class:`pipeline.lib.ranges.AffineRanges`) and the draws and matrices
(:mod:`pipeline.lib.views`, where the matrix convention is documented) exist once, and this
module holds the two ways of applying a matrix:

* training: :func:`warp_image` (cv2.warpAffine), wrapped as the albumentations transform
  :class:`RandomAffineNDSB` and :func:`build_train_transform`;
* TTA: :func:`warp_batch` / :func:`tta_batch` - batched ``GridGenerator`` + ``BilinearSampler``
  on model-input tensors, one operator call for a whole batch times T transforms.

Background: raw images are dark plankton on white (255); the model input is inverted,
``(255 - pixel) / 255``, so background is 0 there. The cv2 path fills with 255 on raw uint8
images; the MXNet path fills with 0 on model-input tensors (``BilinearSampler`` pads with 0).
Both are the same picture, which ``tests/test_augment.py`` checks.
"""
from __future__ import annotations

import multiprocessing
import os
from typing import Any, Dict, Optional

import albumentations as A
import cv2
import mxnet as mx
import numpy as np

from pipeline.lib.ranges import AffineRanges, RangesError, _number
from pipeline.lib.views import Params, matrices_to_theta, params_to_matrices, sample_params

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

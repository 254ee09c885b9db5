"""The distribution of one random affine transform: :class:`AffineRanges`.

Apart from the warps (:mod:`pipeline.lib.augment`) because the settings check
(:mod:`pipeline.lib.settings`) validates ``train.augment`` and ``tta.ranges`` with it, and
that check runs in every stage: this module needs neither MXNet nor OpenCV. The ranges use
the parameterization documented in :mod:`pipeline.lib.augment`.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Dict, Mapping, Tuple

import numpy as np

from pipeline.lib.errors import PipelineError


class RangesError(PipelineError, ValueError):
    """An augmentation range is unknown, malformed or out of its valid domain."""


@dataclasses.dataclass(frozen=True)
class AffineRanges:
    """Distribution of one random affine transform (defaults: thesis §6.2 / NDSB winners).

    rotation: (lo, hi) degrees, uniform.        translate: max |tx|, |ty| as a fraction of side.
    zoom:     (lo, hi), log-uniform, > 0.       shear: max |angle| in degrees, uniform, < 90.
    stretch:  (lo, hi) aspect ratio, log-uniform, > 0.
    flip_h, flip_v: probability of a horizontal / vertical mirror.
    """

    rotation: Tuple[float, float] = (0.0, 360.0)
    translate: float = 0.1
    zoom: Tuple[float, float] = (1 / 1.6, 1.6)
    shear: float = 20.0
    stretch: Tuple[float, float] = (1 / 1.3, 1.3)
    flip_h: float = 0.5
    flip_v: float = 0.5

    def __post_init__(self) -> None:
        # Normalize to plain floats/tuples (YAML gives lists, numpy scalars sneak in) and validate,
        # so a bad range fails here with its name, not later inside a warp.
        for name in ("rotation", "zoom", "stretch"):
            object.__setattr__(self, name, _interval(name, getattr(self, name)))
        for name in ("translate", "shear", "flip_h", "flip_v"):
            object.__setattr__(self, name, _number(name, getattr(self, name)))
        if self.zoom[0] <= 0 or self.stretch[0] <= 0:
            raise RangesError(f"zoom and stretch must be > 0, got zoom={self.zoom}, "
                              f"stretch={self.stretch}")
        if not 0.0 <= self.translate <= 1.0:
            raise RangesError(f"translate must be in [0, 1] (fraction of the side), "
                              f"got {self.translate}")
        if not 0.0 <= self.shear < 90.0:
            raise RangesError(f"shear must be in [0, 90) degrees, got {self.shear}")
        for name in ("flip_h", "flip_v"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise RangesError(f"{name} is a probability in [0, 1], got {getattr(self, name)}")

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "AffineRanges":
        """Build from a mapping (e.g. a ``params.yaml`` section); missing keys keep defaults."""
        if not isinstance(d, Mapping):
            raise RangesError(f"augmentation ranges must be a mapping, got {type(d).__name__}")
        valid = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(d) - set(valid))
        if unknown:
            raise RangesError(f"unknown augmentation key(s) {unknown}; valid keys: {valid}")
        return cls(**dict(d))

    def to_dict(self) -> Dict[str, Any]:
        """Plain floats and lists (YAML/JSON safe); ``from_dict(to_dict())`` round-trips."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}

    @classmethod
    def identity(cls) -> "AffineRanges":
        """All ranges degenerate: every sample is the identity transform."""
        return cls(rotation=(0.0, 0.0), translate=0.0, zoom=(1.0, 1.0), shear=0.0,
                   stretch=(1.0, 1.0), flip_h=0.0, flip_v=0.0)

    def narrowed(self, factor: float) -> "AffineRanges":
        """Shrink the DISTORTIONS (translate, zoom, stretch, shear) towards identity by ``factor``.

        ``factor`` = 1 keeps the ranges, 0 removes the distortions. Zoom and stretch shrink in
        log space (so 1/1.6..1.6 becomes 1/1.6**f..1.6**f). Rotation and flips are kept: plankton
        have no preferred orientation, so they are label-preserving symmetries, not distortions.
        Useful for milder test-time views than training views.
        """
        factor = _number("factor", factor)
        if not 0.0 <= factor <= 1.0:
            raise RangesError(f"narrowed factor must be in [0, 1], got {factor}")
        return dataclasses.replace(
            self, translate=self.translate * factor, shear=self.shear * factor,
            zoom=(self.zoom[0] ** factor, self.zoom[1] ** factor),
            stretch=(self.stretch[0] ** factor, self.stretch[1] ** factor))


def _number(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise RangesError(f"{name} must be a number, got {value!r}")
    if not math.isfinite(value):
        raise RangesError(f"{name} must be finite, got {value!r}")
    return float(value)


def _interval(name: str, value: Any) -> Tuple[float, float]:
    if isinstance(value, (str, bytes)) or not hasattr(value, "__len__") or len(value) != 2:
        raise RangesError(f"{name} must be a (low, high) pair, got {value!r}")
    lo, hi = (_number(name, v) for v in value)
    if lo > hi:
        raise RangesError(f"{name}: low {lo} > high {hi}")
    return lo, hi

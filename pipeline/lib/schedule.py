"""Learning-rate schedules (``train.schedule``): the lr (and momentum) of every training step.

* ``steps`` (the thesis, §6.2): ``lr`` multiplied by ``lr_factor`` at each epoch of
  ``lr_steps``; constant within an epoch. It does not depend on ``epochs``: epoch e of a
  30-epoch run is epoch e of a 3-epoch run, so a run can be extended.
* ``cosine``: linear warm-up from 0 to ``lr`` over ``warmup_epochs``, then half a cosine from
  ``lr`` down to ``min_lr`` at the end of the last epoch.
* ``onecycle`` (Smith & Topin 2019, as PyTorch's ``OneCycleLR``): from ``lr / cycle_div`` up
  to ``lr`` over ``warmup_epochs`` and down to ``min_lr`` at the end, both halves cosine;
  the momentum moves the other way, from ``momentum`` down to ``cycle_momentum`` at the peak
  and back (a high rate with a lower momentum keeps the effective step in bounds).

The last two change every batch (a warm-up of one epoch would otherwise be one step) and end
where ``epochs`` says, so for them ``epochs`` shapes the weights: it is part of the run's
fingerprint (:func:`fingerprint_keys`), and a run trained for another number of epochs starts
afresh instead of being extended. The position of a step is ``epoch + batch / batches``: a
function of where the step is, never of how the run got there, so a run resumed after an
epoch or in the middle of one (a graceful stop) takes the very same steps.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

SCHEDULES = ("steps", "cosine", "onecycle")
# The train keys each schedule reads (besides lr and momentum, which every one reads).
KEYS = {"steps": ("lr_steps", "lr_factor"),
        "cosine": ("epochs", "warmup_epochs", "min_lr"),
        "onecycle": ("epochs", "warmup_epochs", "min_lr", "cycle_div", "cycle_momentum")}
SCHEDULE_KEYS = ("schedule",) + tuple(sorted({k for keys in KEYS.values() for k in keys}
                                             - {"epochs"}))


def unused_keys(schedule: str) -> set[str]:
    """The schedule keys ``schedule`` does not read: they do not shape its weights, so a
    change to them keeps a run (the ``steps`` fingerprint is the one from before schedules
    existed)."""
    used = set(KEYS[schedule]) | ({"schedule"} if schedule != "steps" else set())
    return {k for k in SCHEDULE_KEYS if k not in used}


def needs_epochs(schedule: str) -> bool:
    """Whether the lr of an epoch depends on the total number of epochs."""
    return "epochs" in KEYS[schedule]


@dataclass(frozen=True)
class Schedule:
    """The lr and momentum of every step of one run (built once from the train settings)."""

    kind: str = "steps"
    lr: float = 0.01
    momentum: float = 0.9
    epochs: int = 1
    lr_steps: Sequence[int] = ()
    lr_factor: float = 0.1
    warmup_epochs: float = 0.0
    min_lr: float = 0.0
    cycle_div: float = 25.0
    cycle_momentum: float = 0.85

    def __post_init__(self) -> None:
        if self.kind not in SCHEDULES:
            raise ValueError(f"schedule must be one of {', '.join(SCHEDULES)}, got {self.kind!r}")

    @property
    def per_batch(self) -> bool:
        """Whether the lr changes within an epoch (``steps``: never)."""
        return self.kind != "steps"

    def lr_at(self, epoch: int, batch: int = 0, batches: int = 1) -> float:
        """The lr of step ``batch`` (0-based) of ``batches`` in ``epoch`` (0-based)."""
        if self.kind == "steps":
            return self.lr * self.lr_factor ** sum(1 for s in self.lr_steps if epoch >= s)
        t = epoch + batch / max(1, batches)  # where the step starts, in epochs
        warm = min(self.warmup_epochs, self.epochs)
        if self.kind == "cosine":
            if t < warm:
                # the end of the step: the first step is not taken with a rate of 0
                return self.lr * min(1.0, (t + 1 / max(1, batches)) / warm)
            return self._anneal(t, warm)
        start = self.lr / self.cycle_div
        if t < warm:
            return start + (self.lr - start) * _rise(t / warm)
        return self._anneal(t, warm)

    def momentum_at(self, epoch: int, batch: int = 0, batches: int = 1) -> float:
        """The momentum of a step: ``momentum`` except in ``onecycle``."""
        if self.kind != "onecycle":
            return self.momentum
        t = epoch + batch / max(1, batches)
        warm = min(self.warmup_epochs, self.epochs)
        low, high = self.cycle_momentum, self.momentum
        if t < warm:
            return high - (high - low) * _rise(t / warm)
        return low + (high - low) * _rise(self._progress(t, warm))

    def _progress(self, t: float, warm: float) -> float:
        return min(1.0, (t - warm) / max(1e-12, self.epochs - warm))

    def _anneal(self, t: float, warm: float) -> float:
        return self.min_lr + (self.lr - self.min_lr) * (1 - _rise(self._progress(t, warm)))


def _rise(q: float) -> float:
    """0 -> 1 along half a cosine as q goes 0 -> 1."""
    return (1 - math.cos(math.pi * q)) / 2

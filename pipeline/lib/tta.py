"""Test-time augmentation: the views, their batched forward passes and their average.

Shared by the predict stage and the benchmarks, so both measure the same code. The T
transforms are drawn once per model from affine ranges (:mod:`pipeline.lib.augment`, the same
parameterization training uses); the warps run batched on tensors: one ``GridGenerator`` +
``BilinearSampler`` call turns a batch of B images into B*T views
(:func:`pipeline.lib.augment.tta_batch`), and the network sees at most ``max_views`` of them at
a time.

Averaging over the views (``mean``): ``probs`` (arithmetic mean of probabilities), ``logits``
(softmax of the mean logit) or ``geometric`` (normalized geometric mean of probabilities).
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Iterator, Mapping, Sequence

import numpy as np

from pipeline.lib.errors import PipelineError

MEANS = ("probs", "logits", "geometric")


class TTAError(PipelineError, ValueError):
    """Invalid TTA settings."""


_IDENTITY = np.array([[[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]]])


@dataclass(frozen=True)
class TTAPlan:
    """Everything a TTA pass needs, built once per model (:func:`plan`): the views' forward
    pixel matrices, how their outputs are averaged, images warped together and views per
    forward pass. ``views`` is 1 for the plain image (``tta.n: 0``)."""

    matrices: np.ndarray
    mean: str
    batch_size: int
    max_views: int

    @property
    def views(self) -> int:
        return len(self.matrices)

    def first(self, n: int) -> "TTAPlan":
        """The same plan with the first ``n`` views only (0: the plain image)."""
        matrices = self.matrices[:n] if n > 0 else _IDENTITY.copy()
        return TTAPlan(matrices, self.mean, self.batch_size, self.max_views)


def plan(ranges: Mapping[str, Any], n: int, size: int, method: str, seed: int, mean: str,
         batch_size: int, max_views: int) -> TTAPlan:
    """The plan of ``n`` views drawn by ``method`` from ``ranges`` (a model's training ranges
    when TTA has none of its own) for ``size`` px inputs."""
    if mean not in MEANS:
        raise TTAError(f"tta.mean must be one of {MEANS}, got {mean!r}")
    return TTAPlan(tta_matrices(ranges, n, size, method, seed), mean, batch_size, max_views)


def tta_matrices(ranges: dict[str, Any], n: int, size: int, method: str, seed: int
                 ) -> np.ndarray:
    """(n, 2, 3) forward pixel matrices; n = 0 gives the single identity transform."""
    from pipeline.lib.ranges import AffineRanges
    from pipeline.lib.views import sample_matrices

    if n == 0:
        return _IDENTITY.copy()
    rng = np.random.default_rng(seed)
    return sample_matrices(AffineRanges.from_dict(ranges), n, size, rng, method=method)


def average(outputs: np.ndarray, mean: str) -> np.ndarray:
    """Reduce logits (B, T, K) over the T views to probabilities (B, K) by ``mean``."""
    if mean not in MEANS:
        raise TTAError(f"tta.mean must be one of {MEANS}, got {mean!r}")
    if mean == "logits":
        return _softmax(outputs.mean(axis=1))
    log_p = _log_softmax(outputs)
    if mean == "geometric":
        return _softmax(log_p.mean(axis=1))
    return np.exp(log_p).mean(axis=1)


def _log_softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(axis=-1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=-1, keepdims=True))


def _softmax(z: np.ndarray) -> np.ndarray:
    return np.exp(_log_softmax(z))


def predict_batches(net, batches: Iterator[np.ndarray], matrices: np.ndarray, mean: str,
                    prefixes: Sequence[int] = (), ctx=None, max_views: int = 128
                    ) -> Iterator[tuple[np.ndarray, dict[int, np.ndarray]]]:
    """For each (B, 1, H, W) model-input batch, yield (B, K) TTA-averaged probabilities and,
    for every n in ``prefixes``, the average over the first n views only (the TTA curve);
    n = 0 there is the plain image without TTA (one extra forward of the B images)."""
    import mxnet as mx

    from pipeline.lib.augment import tta_batch

    ctx = ctx or mx.cpu()
    t = len(matrices)
    identity = t == 1 and np.allclose(matrices[0], [[1, 0, 0], [0, 1, 0]])
    for x in batches:
        data = mx.nd.array(x, ctx=ctx)
        views = data if identity else tta_batch(data, matrices)
        logits = _forward(net, views, max_views).reshape(len(x), t, -1)
        partial = {n: average(logits[:, :n], mean) for n in prefixes if n > 0}
        if 0 in prefixes:
            plain = logits[:, :1] if identity else _forward(net, data, max_views)[:, None]
            partial[0] = average(plain, mean)
        yield average(logits, mean), partial


def _forward(net, views, max_views: int) -> np.ndarray:
    """Float64 logits of ``views``: the warped views are cheap to hold; the activations of a
    forward over all of them are not (megabytes per view at 128 px), so the net sees at most
    ``max_views`` at a time."""
    return np.concatenate([net(views[i:i + max_views]).asnumpy()
                           for i in range(0, views.shape[0], max_views)]).astype(np.float64)


def predict_chunks(net, plan: TTAPlan, reader, indices: Sequence[int],
                   bounds: Sequence[tuple[int, int]], prefixes: Sequence[int] = (),
                   progress=None, stop=None
                   ) -> Iterator[tuple[np.ndarray, dict[int, np.ndarray], float]]:
    """TTA over the chunks ``bounds`` (ascending ``[start, stop)`` positions in ``indices``,
    batch-aligned as :func:`pipeline.lib.chunks.chunk_bounds` makes them): for each chunk
    yield its (m, K) probabilities, its curve ``{n: (m, K)}`` for n in ``prefixes`` and the
    wall time it took. One loader streams all the chunks' records, so the batches are those of
    a single pass. ``progress``, if given, is called with the number of images done.

    ``stop``, if given, is polled after every batch; once it returns true, the chunk in
    progress is yielded with the rows done so far (fewer than its length, a whole number of
    batches) and the iteration ends."""
    from pipeline.lib.data import BatchLoader

    indices = np.asarray(indices, dtype=np.int64)
    if not bounds:
        return
    positions = np.concatenate([np.arange(a, b) for a, b in bounds])
    # Records are decoded in this process: next to the views' forward passes decoding costs
    # little, and without a worker process a signal can never strand a pending batch.
    with BatchLoader(reader, indices[positions], plan.batch_size, workers=0) as loader:
        batches = predict_batches(net, (x for x, _ in loader.epoch(0)), plan.matrices,
                                  plan.mean, prefixes, max_views=plan.max_views)
        for start, end in bounds:
            if stop is not None and stop():
                return
            t0, rows = time.perf_counter(), 0
            probs: list[np.ndarray] = []
            curve: dict[int, list[np.ndarray]] = {n: [] for n in prefixes}
            while rows < end - start:
                p, partial = next(batches)
                probs.append(p)
                for n, q in partial.items():
                    curve[n].append(q)
                rows += len(p)
                if progress is not None:
                    progress(len(p))
                if stop is not None and rows < end - start and stop():
                    break
            if stop is not None and rows < end - start and stop():
                yield _chunk(probs, curve, t0)
                return
            if rows != end - start:
                raise TTAError(f"chunk [{start}, {end}) is not aligned to tta.batch_size "
                               f"{plan.batch_size}")
            yield _chunk(probs, curve, t0)


def _chunk(probs: list[np.ndarray], curve: dict[int, list[np.ndarray]], t0: float
           ) -> tuple[np.ndarray, dict[int, np.ndarray], float]:
    return (np.concatenate(probs).astype(np.float32),
            {n: np.concatenate(q).astype(np.float32) for n, q in curve.items()},
            time.perf_counter() - t0)


def predict_split(net, plan: TTAPlan, reader, indices: Sequence[int], classes: int,
                  desc: str, prefixes: Sequence[int] = (), stats: dict[str, float] | None = None
                  ) -> tuple[np.ndarray, dict[int, np.ndarray]]:
    """TTA probabilities (N, ``classes``) of the records ``indices`` in one pass, and the
    probabilities with only the first n views for each n in ``prefixes``. ``stats``, if given,
    receives the wall time and the views/s of the pass."""
    from tqdm import tqdm

    bar = tqdm(total=len(indices), unit="img", desc=desc, mininterval=2)
    t0 = time.perf_counter()
    out, curve = np.zeros((0, classes), np.float32), {n: np.zeros((0, classes), np.float32)
                                                        for n in prefixes}
    for out, curve, _ in predict_chunks(net, plan, reader, indices, [(0, len(indices))]
                                        if len(indices) else [], prefixes, bar.update):
        pass
    bar.close()
    seconds = time.perf_counter() - t0
    views_s = len(indices) * plan.views / max(seconds, 1e-9)
    print(f"{desc}: {len(indices)} images x {plan.views} views in {seconds:.1f} s "
          f"({len(indices) / max(seconds, 1e-9):.1f} img/s, {views_s:.0f} views/s)")
    if stats is not None:
        stats.update(seconds=round(seconds, 3), views_per_s=round(views_s, 1))
    return out, curve


def tta_curve_points(n: int) -> list[int]:
    """The view counts at which the validation TTA curve is reported (1, 2, 5, 10, ... n)."""
    points = [p for p in (1, 2, 5, 10, 20, 50, 100, 200, 500) if p < n]
    return points + [n] if n > 0 else []

"""The float inference net and the precision it runs in: shared by predict and classify.

A trained model (:func:`pipeline.lib.checkpoint.load_model`) is turned into the net that TTA
runs by :func:`prepare_net`: RReLU's deterministic inference graph, batch norm folded into the
layer before it, the resolved precision, hybridized. Predict (on the records) and classify (on
new images, from a bundle) both go through here, so a bundle's probabilities are computed by
exactly the net the out-of-fold and test predictions were.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

from pipeline.lib.errors import PipelineError


class InferenceError(PipelineError, ValueError):
    """Invalid inference settings or inputs (TTA, precision, INT8)."""


def decide_precision(spec: dict[str, Any], *, precision: str, int8: Any, n: int,
                     batch_size: int, max_views: int, keep_fp32: Sequence[str],
                     granularity: str, kept: str | None = None):
    """The :class:`pipeline.lib.precision.Decision` of one model's inference: ``precision``
    (``tta.precision``; ``auto`` decided by measurement on this machine, on the model's net,
    input size and view batch: ``batch_size`` images x ``n`` views, at most ``max_views``)
    and, with ``int8`` ``auto``, whether INT8 (``keep_fp32``, ``granularity``) measured fast
    enough to try. ``spec``: the model's checkpoint spec; ``kept``: the precision of the
    work being resumed. Predict and classify both decide here, so they take the same
    decisions."""
    from pipeline.lib.precision import INFERENCE, choose

    try:
        return choose(INFERENCE, precision, spec["net"], spec["kwargs"], spec["size"],
                      min(int(batch_size) * max(1, int(n)), int(max_views)),
                      int8=int8 == "auto",
                      int8_options={"keep_fp32": list(keep_fp32), "granularity": granularity},
                      kept=kept)
    except ValueError as err:
        raise InferenceError(f"tta.precision: {err}") from err


def kept_precision(started: dict[str, Path]) -> str | None:
    """Of the chunk folders per float precision (``started``), the precision with the most
    chunks already computed: what a resumed run keeps (None: nothing to resume)."""
    counts = {p: sum(1 for _ in d.glob("*.npz")) for p, d in started.items() if d.is_dir()}
    return max(counts, key=counts.get) if counts and max(counts.values()) else None


def prepare_net(net, precision: str):
    """The float inference net: deterministic RReLU, batch norm folded into the layer before
    it, ``precision`` casts, hybridized (``net`` has its parameters loaded)."""
    import nets

    # RReLU's inference output is fixed, (l+u)/2; the deterministic graph skips drawing the
    # unused noise: identical outputs, much faster TTA (BENCHMARKS.md).
    nets.set_deterministic(net)
    # Same outputs up to float rounding, one operator and one pass per layer less.
    nets.fold_batchnorm(net)
    nets.set_precision(net, precision)
    net.hybridize(static_alloc=True)
    return net

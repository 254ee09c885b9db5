"""The float inference net and the precision it runs in: shared by predict and classify.

A trained model (:func:`pipeline.lib.checkpoint.load_model`) is turned into the net that TTA
runs by :func:`prepare_net`: RReLU's deterministic inference graph, batch norm folded into the
layer before it, the resolved precision, hybridized. Predict (on the records) and classify (on
new images, from a bundle) both go through here, so a bundle's probabilities are computed by
exactly the net the out-of-fold and test predictions were.
"""
from __future__ import annotations

from pipeline.lib.errors import PipelineError


class InferenceError(PipelineError, ValueError):
    """Invalid inference settings or inputs (TTA, precision, INT8)."""


def inference_precision(requested: str) -> str:
    """``tta.precision`` resolved for this machine: the float path, used unless INT8 is."""
    from pipeline.lib.precision import resolve_precision

    try:
        return resolve_precision(requested)
    except ValueError as err:
        raise InferenceError(f"tta.precision: {err}") from err


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

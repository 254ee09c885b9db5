"""How fast each candidate path runs a network here: the measurement behind ``auto`` precision.

:mod:`pipeline.lib.precision` asks this module to time the paths it may choose between, on the
network and input shape the stage is about to run, with random weights and random inputs (speed
does not depend on the values, only on the shapes and the kernels oneDNN picks):

* ``train``: one SGD step (:func:`pipeline.lib.sgd.step`: forward, backward, Nesterov update)
  of the network built and hybridized as :func:`pipeline.train.build` does, per precision;
* ``infer``: one forward pass of the inference net as :mod:`pipeline.predict` runs it
  (deterministic activations, batch norm folded, hybridized), per float precision, and of its
  INT8 version (:func:`pipeline.lib.quantize.quantize`, calibrated on random inputs: the
  calibration changes the ranges, not the kernels).

The candidates are timed in turns (A, B, A, B, ...) after one untimed call each, so a load that
comes and goes on a shared machine slows them alike; the rate is the median of the turns.
"""
from __future__ import annotations

import time
from typing import Any, Callable, Sequence

import numpy as np

# Images per timed call at most: per-image speed barely changes above this, and a few seconds
# must be enough for every candidate even on a slow CPU.
MAX_TIMING_BATCH = {"train": 32, "infer": 16}
# Untimed calls per candidate (oneDNN creates its primitives on the first), then turns.
WARMUP = 1
MIN_TURNS = 2
MAX_TURNS = 8


class Stopped(Exception):
    """A stop signal arrived while timing (:func:`time_in_turns`'s ``stopped``)."""


def time_in_turns(steps: dict[str, Callable[[], int]], budget: float, min_turns: int = MIN_TURNS,
                  max_turns: int = MAX_TURNS, stopped: Callable[[], Any] = lambda: None
                  ) -> tuple[dict[str, float], dict[str, str]]:
    """(rates, errors): items per second of each callable (which returns the items it
    processed), timed in turns until ``budget`` seconds have passed (at least ``min_turns``,
    at most ``max_turns`` turns), each the median over the turns. A callable that raises in
    its untimed call is left out with rate 0 and the error (a path oneDNN cannot build).
    ``stopped`` is asked after every call; when it answers, :class:`Stopped` is raised."""
    errors: dict[str, str] = {}

    def check() -> None:
        if stopped():
            raise Stopped()

    for name, step in list(steps.items()):
        try:
            for _ in range(WARMUP):
                step()
        except Exception as err:  # noqa: BLE001 - any failure disqualifies the path
            errors[name] = f"{type(err).__name__}: {str(err).strip().splitlines()[0][:200]}"
            del steps[name]
        check()
    rates: dict[str, list[float]] = {name: [] for name in steps}
    start = time.perf_counter()
    for turn in range(max_turns):
        for name, step in steps.items():
            t0 = time.perf_counter()
            items = step()
            rates[name].append(items / max(time.perf_counter() - t0, 1e-9))
            check()
        if turn + 1 >= min_turns and time.perf_counter() - start >= budget:
            break
    out = {name: float(np.median(r)) for name, r in rates.items()}
    return {**out, **{name: 0.0 for name in errors}}, errors


def _inputs(batch: int, size: int, classes: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    x = rng.random((batch, 1, size, size), dtype=np.float32)
    return x, (np.arange(batch) % classes).astype(np.float32)


def _build(net_name: str, kwargs: dict[str, Any], precision: str, deterministic: bool = False):
    import mxnet as mx

    import nets

    net = nets.get_model(net_name, **kwargs)
    nets.set_precision(net, "float32" if precision == "int8" else precision)
    mx.random.seed(0)
    nets.initialize(net, ctx=mx.cpu())
    if deterministic:
        nets.set_deterministic(net)
        nets.fold_batchnorm(net)
    return net


def training_rates(net_name: str, kwargs: dict[str, Any], size: int, batch: int,
                   precisions: Sequence[str], budget: float,
                   stopped: Callable[[], Any] = lambda: None) -> tuple[dict[str, float], dict[str, str]]:
    """(rates, errors) of :func:`time_in_turns`: training images/s of ``net_name``
    (``get_model`` ``kwargs``) at ``size`` px and ``batch`` images per step, per precision."""
    import mxnet as mx

    from pipeline.lib import sgd

    batch = min(batch, MAX_TIMING_BATCH["train"])
    x, y = _inputs(batch, size, int(kwargs.get("classes", 121)))
    ctxs = [mx.cpu()]
    steps = {}
    for precision in precisions:
        def step(precision=precision, state={}) -> int:
            if not state:  # built on the untimed first call, where failures are caught
                net = _build(net_name, kwargs, precision)
                net.hybridize(static_alloc=True, static_shape=False)  # as pipeline.train
                state.update(net=net, loss_fn=sgd.loss_function(),
                             trainer=sgd.make_trainer(net, lr=0.001, momentum=0.9, wd=0.0005))
            loss = sgd.step(state["net"], state["trainer"], state["loss_fn"], x, y, ctxs)
            if not np.isfinite(loss):
                raise FloatingPointError(f"the timing step's loss became {loss}")
            return batch

        steps[precision] = step
    return time_in_turns(steps, budget, stopped=stopped)


def inference_rates(net_name: str, kwargs: dict[str, Any], size: int, batch: int,
                    precisions: Sequence[str], budget: float,
                    keep_fp32: Sequence[str] = ("first_conv",),
                    granularity: str = "tensor-wise",
                    stopped: Callable[[], Any] = lambda: None) -> tuple[dict[str, float], dict[str, str]]:
    """(rates, errors) of :func:`time_in_turns`: inference images/s (one forward of ``batch``
    images, result on the host) of the net predict runs, per precision (``float32``,
    ``bfloat16``, ``int8``)."""
    import mxnet as mx

    from pipeline.lib.quantize import quantize

    batch = min(batch, MAX_TIMING_BATCH["infer"])
    x = mx.nd.array(_inputs(batch, size, 2)[0])
    steps = {}
    for precision in precisions:
        def step(precision=precision, state={}) -> int:
            if not state:  # built on the untimed first call, where failures are caught
                net = _build(net_name, kwargs, precision, deterministic=True)
                net.hybridize(static_alloc=True)
                if precision == "int8":
                    calib = np.random.default_rng(1).random((min(batch, 16), 1, size, size),
                                                            dtype=np.float32)
                    net = quantize(net, calib, "naive", keep_fp32, granularity)
                state["net"] = net
            return len(state["net"](x).asnumpy())

        steps[precision] = step
    return time_in_turns(steps, budget, stopped=stopped)

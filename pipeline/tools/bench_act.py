"""Cost of RReLU against leaky ReLU in a real network (a benchmark, not a test).

``python -m pipeline.tools.bench_act [--net ndsb_net1] [--batch 32] [--size 128] [--steps 3]``

Times one SGD training step (forward, backward, update) and one inference forward pass of
the network built with ``rrelu``, with ``leaky`` (same mid slope, so the only difference is
the per-element noise), and with RReLU switched to its inference-only graph
(:func:`nets.activations.set_deterministic`). Steps alternate between the variants in a
rotating order; the median and the fastest step are reported. On a machine shared with
other jobs contention only adds time, so the fastest step is the steadier estimate.
"""
from __future__ import annotations

import argparse
import os
import statistics
import time
from typing import Callable

import mxnet as mx
from mxnet import gluon

from nets import get_model, initialize
from nets.activations import RRELU_LOWER, RRELU_UPPER, set_deterministic
from pipeline.lib import sgd


def _make(net_name: str, act: str, act_kw: dict, classes: int, deterministic: bool = False
          ) -> tuple[gluon.HybridBlock, gluon.Trainer]:
    net = get_model(net_name, classes=classes, act=act, act_kw=act_kw)
    initialize(net)
    if deterministic:
        set_deterministic(net)
    net.hybridize(static_alloc=True, static_shape=True)
    return net, sgd.make_trainer(net, lr=0.01, momentum=0.9)


def _train_step(net, trainer, x, y, loss_fn) -> None:
    sgd.step(net, trainer, loss_fn, x, y, [mx.cpu()])


def _infer(net, x) -> None:
    net(x).wait_to_read()


def _time(fn: Callable[[], None]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def run(net_name: str = "ndsb_net1", batch: int = 32, size: int = 128, steps: int = 3,
        classes: int = 121) -> dict[str, dict[str, float]]:
    """Median seconds per training step and per inference batch for each variant."""
    mx.random.seed(0)
    x = mx.nd.random.uniform(shape=(batch, 1, size, size))
    y = mx.nd.random.randint(0, classes, shape=(batch,)).astype("float32")
    loss_fn = sgd.loss_function()
    mid_a = 2.0 / (RRELU_LOWER + RRELU_UPPER)  # leaky's a with slope (l+u)/2
    variants = {
        "rrelu": _make(net_name, "rrelu", {"impl": "native"}, classes),
        "rrelu_ops": _make(net_name, "rrelu", {"impl": "ops"}, classes),
        "leaky": _make(net_name, "leaky", {"a": mid_a}, classes),
        "rrelu_deterministic": _make(net_name, "rrelu", {}, classes, deterministic=True),
    }
    times: dict[str, dict[str, list[float]]] = {k: {"train": [], "infer": []} for k in variants}
    names = list(variants)
    # Training steps first, then inference: switching a static_alloc graph between the two
    # modes re-plans its memory, which would be timed as well if they alternated.
    for mode in ("train", "infer"):
        for step in range(steps + 1):  # step 0 warms up (graph building, memory allocation)
            order = names[step % len(names):] + names[:step % len(names)]  # rotate the order
            for name in order:
                net, trainer = variants[name]
                if mode == "train":
                    elapsed = _time(lambda: _train_step(net, trainer, x, y, loss_fn))
                else:
                    elapsed = _time(lambda: _infer(net, x))
                if step:
                    times[name][mode].append(elapsed)
    return {k: {**{m: statistics.median(v) for m, v in d.items()},
                **{f"{m}_min": min(v) for m, v in d.items()}} for k, d in times.items()}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m pipeline.tools.bench_act",
                                description=__doc__.split("\n")[0])
    p.add_argument("--net", default="ndsb_net1")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--size", type=int, default=128)
    p.add_argument("--steps", type=int, default=3)
    a = p.parse_args(argv)
    r = run(a.net, a.batch, a.size, a.steps)
    print(f"{a.net}, batch {a.batch}, {a.size}x{a.size}, median (fastest) of {a.steps} steps "
          f"(OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')})")
    for name, t in r.items():
        print(f"  {name:<20} train step {t['train']:.3f} s ({t['train_min']:.3f})   "
              f"inference {t['infer']:.3f} s ({t['infer_min']:.3f})")
    for stat in ("", "_min"):
        ratio = {m: r["rrelu"][m + stat] / r["leaky"][m + stat] for m in ("train", "infer")}
        ops = r["rrelu_ops"]["train" + stat] / r["leaky"]["train" + stat]
        det = r["rrelu_deterministic"]["infer" + stat] / r["leaky"]["infer" + stat]
        print(f"  rrelu / leaky ({'median' if not stat else 'fastest'}): train "
              f"{ratio['train']:.2f}x (operator graph {ops:.2f}x), inference "
              f"{ratio['infer']:.2f}x, deterministic rrelu inference {det:.2f}x")


if __name__ == "__main__":
    main()

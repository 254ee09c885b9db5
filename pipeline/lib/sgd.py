"""The training step: Nesterov SGD on the softmax cross-entropy, as the thesis trains (§6.2).

One implementation for the train stage and the benchmarks, so what is timed is what trains.
"""
from __future__ import annotations

from typing import Any, Callable, Sequence


def make_trainer(net, lr: float, momentum: float = 0.9, wd: float = 0.0005,
                 kvstore: Any = "device"):
    """Gluon Trainer for ``net``: Nesterov momentum, weight decay, updates on the workers.

    ``update_on_kvstore=False`` keeps the optimizer (and its state, which checkpoints save) on
    every worker; with ``dist_sync`` the servers then only sum gradients.
    """
    from mxnet import gluon

    return gluon.Trainer(net.collect_params(), "nag",
                         {"learning_rate": lr, "momentum": momentum, "wd": wd},
                         kvstore=kvstore, update_on_kvstore=False)


def loss_function():
    """The training loss: softmax cross-entropy on integer labels."""
    from mxnet import gluon

    return gluon.loss.SoftmaxCrossEntropyLoss()


def step(net, trainer, loss_fn, x, y, ctxs: Sequence[Any], scale: int | None = None,
         before_update: Callable[[], None] | None = None) -> float:
    """One SGD step on the batch ``(x, y)`` split over ``ctxs``; returns the summed loss.

    ``scale`` is the number of images the gradients are averaged over (the global batch with
    several workers; ``len(x)`` by default). ``before_update`` runs between backward and the
    update (dist_sync's first step needs it, see ``pipeline.train``).
    """
    from mxnet import autograd, gluon

    xs = gluon.utils.split_and_load(x, ctxs, even_split=False)
    ys = gluon.utils.split_and_load(y, ctxs, even_split=False)
    with autograd.record():
        losses = [loss_fn(net(xi), yi) for xi, yi in zip(xs, ys)]
    autograd.backward(losses)
    if before_update is not None:
        before_update()
    trainer.step(scale or len(x))
    return float(sum(l.sum().asscalar() for l in losses))

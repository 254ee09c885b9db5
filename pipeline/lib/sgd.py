"""The training step: Nesterov SGD on the softmax cross-entropy, as the thesis trains (§6.2).

One implementation for the train stage and the benchmarks, so what is timed is what trains.
Two options from current practice sit here too: label smoothing (the loss) and a moving
average of the weights (:class:`WeightAverage`).
"""
from __future__ import annotations

import contextlib
from typing import Any, Callable, Iterator, Sequence


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


def loss_function(label_smoothing: float = 0.0) -> Callable:
    """The training loss: softmax cross-entropy, per image.

    Labels are class indices (one per image) or soft targets (one row per image summing to 1,
    e.g. pseudo-labels). With ``label_smoothing`` = eps the target is ``(1 - eps) * target +
    eps / classes``: the net is not pushed towards certainty, which log loss punishes when it
    is wrong.
    """
    import mxnet as mx
    from mxnet import gluon

    if not 0.0 <= label_smoothing < 1.0:
        raise ValueError(f"label_smoothing must be in [0, 1), got {label_smoothing!r}")
    sparse = gluon.loss.SoftmaxCrossEntropyLoss()
    dense = gluon.loss.SoftmaxCrossEntropyLoss(sparse_label=False)

    def loss(out, y):
        if y.ndim == 1 and not label_smoothing:
            return sparse(out, y)
        classes = out.shape[1]
        target = mx.nd.one_hot(y, classes) if y.ndim == 1 else y
        if label_smoothing:
            target = target * (1.0 - label_smoothing) + label_smoothing / classes
        return dense(out, target)

    return loss


class WeightAverage:
    """Exponential moving average of a network's weights (and BatchNorm statistics).

    The average of the last epochs' weights generalizes better than the last weights: it
    smooths over SGD's noise, most of all late in training. The decay per step follows from a
    half-life in epochs, so one setting suits a 73-image sample and the 30k NDSB images alike;
    the average starts at zero and is divided by ``1 - decay ** steps`` (bias correction, as
    Adam does), so early epochs are an average of what exists rather than mostly zeros.

    Kept on the first context in float32. :meth:`swapped_in` puts the average into the net
    (to validate or save it) and restores the training weights afterwards.
    """

    def __init__(self, net, half_life_steps: float):
        if half_life_steps <= 0:
            raise ValueError(f"half-life must be > 0 steps, got {half_life_steps!r}")
        self.net = net
        self.decay = 0.5 ** (1.0 / half_life_steps)
        self.steps = 0
        self._shadow: dict[str, Any] = {}

    def _params(self):
        return [(name, p) for name, p in self.net.collect_params().items()
                if p._data is not None]

    def update(self) -> None:
        """Fold the net's current weights into the average (after each optimizer step)."""
        self.steps += 1
        for name, param in self._params():
            data = param.list_data()[0].astype("float32")
            shadow = self._shadow.get(name)
            if shadow is None:
                self._shadow[name] = data * (1.0 - self.decay)
            else:
                shadow *= self.decay
                shadow += data * (1.0 - self.decay)

    def averaged(self) -> dict[str, Any]:
        correction = 1.0 - self.decay ** max(1, self.steps)
        return {name: shadow / correction for name, shadow in self._shadow.items()}

    @contextlib.contextmanager
    def swapped_in(self) -> Iterator[None]:
        """The averaged weights in the net inside the block, the training ones after it."""
        if not self.steps:
            yield
            return
        params = dict(self._params())
        saved = {name: param.list_data()[0].copy() for name, param in params.items()}
        for name, value in self.averaged().items():
            params[name].set_data(value.astype(params[name].dtype))
        try:
            yield
        finally:
            for name, value in saved.items():
                params[name].set_data(value)

    def load_from_net(self, steps: int) -> None:
        """Take the net's current weights as the average after ``steps`` steps (resuming)."""
        self.steps = int(steps)
        correction = 1.0 - self.decay ** max(1, self.steps)
        self._shadow = {name: param.list_data()[0].astype("float32") * correction
                        for name, param in self._params()}


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

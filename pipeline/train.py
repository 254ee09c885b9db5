"""Train one network on one fold from RecordIO: thesis §6.2 augmentation, Nesterov SGD.

``python -m pipeline.train --net NET --fold K`` (DVC runs it for every net in ``models.nets``
and every fold in ``models.folds``; ``--fold -1`` trains on all labelled images).

* Data: the fold's train records, augmented on the fly by the one affine parameterization of
  :mod:`pipeline.lib.augment` (rotation, translation, zoom, shear, stretch, flips; background fill),
  decoded in worker processes with bounded prefetch (:mod:`pipeline.lib.data`).
* Optimization (thesis §2.1.8-2.1.10): SGD with Nesterov momentum (MXNet ``nag``), weight
  decay, learning rate multiplied by ``lr_factor`` at each of ``lr_steps`` epochs (the thesis
  ran 0.01 x 400 -> 0.001 x 80 -> 0.0001 x 80 epochs).
* Devices: ``ctx`` = ``cpu`` | ``cpu:0,1`` | ``gpu:0,1,..``: data parallel via
  ``split_and_load`` and a kvstore (``device``; ``nccl`` where the build has it). Several
  machines: ``kvstore: dist_sync`` under :mod:`pipeline.tools.launch`; each worker trains on its own
  shard of the records and the gradients are summed by MXNet's parameter server.
* Precision (``precision``, default ``auto``): ``bfloat16`` runs the convolutions in bfloat16
  with float32 master weights (:mod:`nets.precision`); ``auto`` picks it where it is fast and
  its accuracy was validated on this kind of CPU, float32 elsewhere
  (:mod:`pipeline.lib.precision`; the measurements are in BENCHMARKS.md). The requested
  precision is part of the checkpoint's fingerprint; the one used is recorded in it.
* Every epoch: train loss, validation log loss and accuracy go to ``plots/train--{run}.tsv``
  (``dvc plots``) and a crash-safe checkpoint (:mod:`pipeline.lib.checkpoint`); a rerun resumes from
  the newest intact one. A NaN/inf loss stops the run with a clear error; the last good
  checkpoint stays. At the end: ``metrics/train--{run}.json``, the final model and its plain
  (no TTA) out-of-fold predictions.
"""
from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import math
import os
import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn, Sequence

import numpy as np

from pipeline.lib import checkpoint
from pipeline.lib import params as params_mod
from pipeline.lib.errors import PipelineError, stage_errors
from pipeline.lib.fsutil import sha256, write_json, write_text
from pipeline.lib.predictions import prediction_files
from pipeline.lib.runs import artifact_name, member_name, pseudo_name, run_name
from pipeline.lib.runtime import configure_threads

DEFAULTS: dict[str, Any] = {
    "net_kwargs": {},          # {net name: {kwarg: value}} passed to nets.get_model
    "act": "rrelu",
    "bn": True,
    "epochs": 10,
    "batch_size": 32,
    "lr": 0.01,
    "momentum": 0.9,
    "wd": 0.0001,
    "lr_steps": [7, 9],
    "lr_factor": 0.1,
    "label_smoothing": 0.0,    # eps in [0, 1): targets (1 - eps) one-hot + eps / classes
    "ema_half_life": 0.0,      # epochs; > 0: validate and publish a moving average of weights
    "seed": 0,
    "ctx": "cpu",
    "precision": "auto",       # float32 | bfloat16 | auto (bf16 where validated and fast)
    "kvstore": "device",
    "workers": 1,
    "prefetch": 4,
    "augment": {},             # pipeline.lib.augment.AffineRanges fields; {} = defaults
    "checkpoints": "checkpoints",
    "metrics": "metrics",
    "plots": "plots",
}

# Keys that may change without invalidating a checkpoint (a run can be extended or moved).
RESUMABLE_KEYS = ("epochs", "workers", "prefetch", "checkpoints", "metrics", "plots", "ctx",
                  "kvstore")


class TrainingError(PipelineError, RuntimeError):
    """Training cannot go on (diverged, or the configuration is invalid)."""


def lr_at(epoch: int, lr: float, steps: Sequence[int], factor: float) -> float:
    """Learning rate of ``epoch`` (0-based): ``lr * factor ** (steps passed)``."""
    return lr * factor ** sum(1 for s in steps if epoch >= s)


def parse_ctx(spec: str) -> list:
    """``cpu`` | ``cpu:0,1`` | ``gpu`` | ``gpu:0,1`` -> list of MXNet contexts."""
    import mxnet as mx

    kind, _, ids = spec.strip().partition(":")
    if kind not in ("cpu", "gpu"):
        raise TrainingError(f"train.ctx must be cpu[:i,j] or gpu[:i,j], got {spec!r}")
    devices = [int(i) for i in ids.split(",")] if ids else [0]
    if kind == "gpu":
        available = mx.context.num_gpus()
        missing = [d for d in devices if d >= available]
        if missing:
            raise TrainingError(f"train.ctx={spec!r}: GPU(s) {missing} not available "
                                f"({available} visible to this MXNet build)")
    return [mx.Context(kind, d) for d in devices]


def fingerprint(net: str, fold: int, cfg: dict[str, Any], meta: dict[str, Any],
                architecture: str = "") -> str:
    """Hash of everything that makes a checkpoint's state meaningful for this run.

    ``architecture`` (the built network's ``repr``: every layer and its settings) makes an
    edited network table start afresh instead of loading parameters of another shape.
    """
    relevant = {k: v for k, v in cfg.items() if k not in RESUMABLE_KEYS}
    data = {k: meta[k] for k in ("classes", "size", "background", "folds", "seed", "files")}
    blob = json.dumps([net, fold, relevant, data, architecture], sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


@dataclass
class Run:
    """Everything one (net, fold) training run reads and writes."""

    net: str
    fold: int
    cfg: dict[str, Any]
    records: Path
    # A seed of the models grid: replaces train.seed and names the run {net}-seed{s}--fold{k}.
    seed: int | None = None
    # Second round: the pseudo stage's folder of soft test targets, and the fraction of every
    # batch they fill. The run is then the net {net}-pl (pipeline.lib.runs.pseudo_name).
    pseudo: Path | None = None
    pseudo_fraction: float = 0.25
    member: str = field(init=False)
    name: str = field(init=False)

    def __post_init__(self) -> None:
        self.member = member_name(pseudo_name(self.net) if self.pseudo else self.net, self.seed)
        if self.seed is not None:
            self.cfg = dict(self.cfg, seed=int(self.seed))
        if self.pseudo is not None:
            f = self.pseudo_fraction
            if not isinstance(f, (int, float)) or isinstance(f, bool) or not 0 < f < 1:
                raise TrainingError(f"--pseudo-fraction (pseudo.fraction) must be in (0, 1) "
                                    f"for a second round, got {f!r}")
            npy, _ = prediction_files(self.pseudo, "test", "pseudo", self.fold)
            if not npy.is_file():
                raise TrainingError(f"{npy} not found: run the pseudo stage first "
                                    "(python -m pipeline.pseudo)")
            # The targets' hash is part of the fingerprint: new targets, a new second round.
            self.cfg = dict(self.cfg, pseudo={"fraction": float(f), "targets": sha256(npy)})
        self.name = run_name(self.member, self.fold)

    @property
    def ckpt_dir(self) -> Path:
        return checkpoint.run_dir(self.cfg["checkpoints"], self.member, self.fold)

    @property
    def metrics_path(self) -> Path:
        return Path(self.cfg["metrics"]) / f"{artifact_name('train', self.member, self.fold)}.json"

    @property
    def plots_path(self) -> Path:
        return Path(self.cfg["plots"]) / f"{artifact_name('train', self.member, self.fold)}.tsv"


def model_kwargs(run: Run, classes: int) -> dict[str, Any]:
    kw = dict(classes=classes, act=run.cfg["act"], bn=run.cfg["bn"], in_channels=1)
    kw.update(run.cfg["net_kwargs"].get(run.net, {}))
    return kw


def build(run: Run, classes: int, ctxs: list):
    """Network with initialized parameters on ``ctxs`` (MSRA/Xavier gain per activation).

    Returns ``(net, get_model kwargs, precision actually used)``.
    """
    import mxnet as mx

    import nets
    from nets.precision import set_precision
    from pipeline.lib.precision import resolve_precision

    kwargs = model_kwargs(run, classes)
    try:
        net = nets.get_model(run.net, **kwargs)
    except ValueError as err:  # unknown net or keyword: the registry lists the valid ones
        raise TrainingError(f"--net / train.net_kwargs: {err}") from None
    try:
        precision = resolve_precision(run.cfg["precision"], ctxs, training=True)
    except ValueError as err:
        raise TrainingError(f"train.precision: {err}") from err
    set_precision(net, precision)
    if any(c.device_type == "gpu" for c in ctxs):
        from nets.activations import set_rrelu_impl

        set_rrelu_impl(net, "ops")  # the native RReLU operator is CPU-only
    mx.random.seed(run.cfg["seed"])
    nets.initialize(net, ctx=ctxs)  # MSRA with the activation's own slope (thesis §5.5)
    net.hybridize(static_alloc=True, static_shape=True)
    return net, kwargs, precision


def shard(indices: np.ndarray, rank: int, n_workers: int) -> np.ndarray:
    """Worker ``rank``'s share of ``indices``; every share has the same length.

    dist_sync needs every worker to take the same number of steps (a worker with one batch
    more would wait forever for the others' gradients), so the list is first padded by
    repeating it from the start up to a multiple of ``n_workers`` (< n_workers extra images).
    """
    return np.resize(indices, len(indices) + -len(indices) % n_workers)[rank::n_workers]


def finish_initial_broadcast(trainer) -> None:
    """Complete the Trainer's pull of the initial weights before any gradient is pushed.

    With ``dist_sync`` and ``update_on_kvstore=False`` (MXNet 1.9.1) the server keeps the
    gradient sum of the last step under each key, and the Trainer pulls the initial weights
    and pushes the first gradients of a key in the same ``step`` with no order between the
    two. On a busy machine both workers' first gradients can be summed before one worker's
    pull arrives; that worker then starts from the gradient sum instead of the weights and the
    run diverges (seen on busy machines). Initializing the store here (after the first
    backward, so deferred parameters have shapes) and waiting removes the race.
    """
    import mxnet as mx

    if not trainer._kv_initialized:
        trainer._init_kvstore()
    if trainer._params_to_init:
        trainer._init_params()
    mx.nd.waitall()


def make_kvstore(kind: str, ctxs: list):
    """A kvstore object, or the name Gluon understands; nccl only where it exists."""
    import mxnet as mx

    if kind in ("horovod", "byteps"):
        raise TrainingError(f"kvstore {kind!r} silently falls back to a local store in MXNet "
                            "1.9.1; use device, nccl or dist_sync")
    if kind == "dist_async":
        raise TrainingError("kvstore dist_async needs updates on the servers; this trainer "
                            "updates locally (resumable optimizer state): use dist_sync")
    if kind == "nccl" and not all(c.device_type == "gpu" for c in ctxs):
        raise TrainingError("kvstore nccl needs gpu contexts")
    if kind.startswith("dist"):
        return mx.kv.create(kind)
    return kind


def evaluate(net, loader, ctx) -> tuple[np.ndarray, np.ndarray]:
    """(probabilities, labels) of every batch, inference mode."""
    import mxnet as mx

    probs, labels = [], []
    for x, y in loader.epoch(0):
        out = net(mx.nd.array(x, ctx=ctx))
        probs.append(mx.nd.softmax(out).asnumpy())
        labels.append(y)
    if not probs:
        return np.zeros((0, 0), np.float32), np.zeros(0, np.int64)
    return np.concatenate(probs), np.concatenate(labels).astype(np.int64)


def _write_plot(path: Path, history: list[dict[str, Any]]) -> None:
    cols = ["epoch", "lr", "train_loss", "valid_logloss", "valid_accuracy", "img_s"]
    lines = ["\t".join(cols)]
    lines += ["\t".join(_fmt(h.get(c)) for c in cols) for h in history]
    write_text(path, "\n".join(lines) + "\n")


def _fmt(v: Any) -> str:
    if v is None:
        return ""
    return f"{v:.6g}" if isinstance(v, float) else str(v)


@dataclass
class Session:
    """The live objects of one run: data, network, optimizer, and where it stands."""

    run: Run
    meta: dict[str, Any]
    ctxs: list
    rank: int
    n_workers: int
    train_idx: np.ndarray
    valid_idx: np.ndarray
    train_loader: Any
    valid_loader: Any
    net: Any
    trainer: Any
    spec: dict[str, Any]
    average: Any = None  # sgd.WeightAverage when train.ema_half_life > 0
    targets: np.ndarray | None = None  # second round: soft targets of the test images
    history: list[dict[str, Any]] = field(default_factory=list)
    start: int = 0
    origin: str = "trained from scratch"  # how this run's weights came about (metrics)


def check_settings(cfg: dict[str, Any]) -> None:
    """Raise one :class:`TrainingError` naming every out-of-range training option."""
    problems = []
    eps = cfg["label_smoothing"]
    if not isinstance(eps, (int, float)) or isinstance(eps, bool) or not 0 <= eps < 1:
        problems.append(f"train.label_smoothing must be in [0, 1), got {eps!r}")
    half = cfg["ema_half_life"]
    if not isinstance(half, (int, float)) or isinstance(half, bool) or half < 0:
        problems.append(f"train.ema_half_life must be >= 0 epochs (0: off), got {half!r}")
    if not isinstance(cfg["epochs"], int) or cfg["epochs"] < 1:
        problems.append(f"train.epochs must be an integer >= 1, got {cfg['epochs']!r}")
    if problems:
        raise TrainingError("; ".join(problems))


def pseudo_targets(run: Run, meta: dict[str, Any]) -> np.ndarray:
    """The fold's soft targets, rows in the order of the test records (``meta.json``)."""
    from pipeline.lib.predictions import align_rows, load_predictions

    probs, names = load_predictions(run.pseudo, "test", "pseudo", run.fold)
    if probs.shape[1] != len(meta["classes"]):
        raise TrainingError(f"pseudo-labels of fold {run.fold}: {probs.shape[1]} columns, "
                            f"meta.json has {len(meta['classes'])} classes: rerun pseudo")
    try:
        targets = align_rows(probs, names, [t["name"] for t in meta["test"]],
                             f"pseudo-labels of fold {run.fold}", "the meta.json test images")
    except ValueError as exc:
        raise TrainingError(f"{exc}: rerun the pseudo stage on these records") from None
    return (targets / targets.sum(axis=1, keepdims=True)).astype(np.float32)


def open_session(run: Run) -> Session:
    """Load the fold's data, build the network and optimizer, resume if a checkpoint fits."""
    from pipeline.lib import sgd
    from pipeline.lib.augment import AffineRanges, build_train_transform
    from pipeline.lib.data import BatchLoader, MixedBatchLoader, MixedReader
    from pipeline.lib.records import RecordReader, fold_indices, load_meta

    cfg = run.cfg
    check_settings(cfg)
    meta = load_meta(run.records)
    ctxs = parse_ctx(cfg["ctx"])
    kv = make_kvstore(cfg["kvstore"], ctxs)
    rank, n_workers = (kv.rank, kv.num_workers) if not isinstance(kv, str) else (0, 1)
    ranges = AffineRanges.from_dict(cfg["augment"])

    train_idx, valid_idx = fold_indices(meta, run.fold)
    train_idx = shard(train_idx, rank, n_workers)
    reader = RecordReader(run.records, "train")
    transform = build_train_transform(ranges, meta["size"], background=meta["background"])
    batch = max(1, cfg["batch_size"] // len(ctxs)) * len(ctxs)
    targets = None
    if run.pseudo is None:
        train_loader = BatchLoader(reader, train_idx, batch, transform, shuffle=True,
                                   seed=cfg["seed"] + rank, workers=cfg["workers"],
                                   prefetch=cfg["prefetch"], drop_last=len(train_idx) >= batch)
    else:
        targets = pseudo_targets(run, meta)
        per_batch = round(batch * run.pseudo_fraction)
        if not 0 < per_batch < batch:
            raise TrainingError(f"pseudo.fraction {run.pseudo_fraction} of a batch of {batch} "
                                f"is {per_batch} images: it must leave room for both kinds "
                                "(raise train.batch_size or change the fraction)")
        train_loader = MixedBatchLoader(MixedReader(reader, RecordReader(run.records, "test")),
                                        train_idx, batch, per_batch, transform,
                                        seed=cfg["seed"] + rank, workers=cfg["workers"],
                                        prefetch=cfg["prefetch"])
    valid_loader = BatchLoader(reader, valid_idx, 2 * batch, None, workers=0)

    net, kwargs, precision = build(run, len(meta["classes"]), ctxs)
    trainer = sgd.make_trainer(net, cfg["lr"], cfg["momentum"], cfg["wd"], kvstore=kv)
    spec = {"net": run.net, "kwargs": kwargs, "classes": meta["classes"], "size": meta["size"],
            "input": {"invert": True, "scale": 1 / 255, "background": meta["background"]},
            "augment": ranges.to_dict(), "fold": run.fold,
            "fingerprint": fingerprint(run.net, run.fold, cfg, meta,
                                       f"{repr(net)}\nprecision={precision}"),
            "precision": precision,
            # Randomness is derived, not stored: this is all it takes to replay any epoch.
            "rng": {"seed": cfg["seed"],
                    "shuffle": "numpy default_rng([seed + rank, epoch])",
                    "augment": "numpy SeedSequence([seed + rank, epoch, batch])",
                    "mxnet": "mx.random.seed(seed * 100003 + epoch)"},
            "train": {k: v for k, v in cfg.items() if k not in RESUMABLE_KEYS}}
    average = None
    if cfg["ema_half_life"]:
        average = sgd.WeightAverage(net, cfg["ema_half_life"] * max(1, len(train_loader)))
    session = Session(run, meta, ctxs, rank, n_workers, train_idx, valid_idx, train_loader,
                      valid_loader, net, trainer, spec, average, targets)
    _resume(session)
    return session


def _resume(s: Session) -> None:
    """Continue from the newest intact checkpoint of the same settings, else start clean.

    Only ``epochs`` (and the other :data:`RESUMABLE_KEYS`) may differ from the checkpoint's
    settings. More epochs extend the run: the learning rate of an epoch does not depend on
    ``epochs``, so epoch ``e`` of a longer run equals epoch ``e`` of a shorter one. Fewer
    epochs than the checkpoint holds never keep the longer run: the asked epoch is used when
    its checkpoint is still kept (the later ones are removed), else the run starts afresh.
    ``s.origin`` says which, for the log and the metrics.
    """
    name, wanted = s.run.name, s.run.cfg["epochs"]
    resumed = checkpoint.latest(s.run.ckpt_dir)
    if resumed is not None and resumed.get("fingerprint") != s.spec["fingerprint"]:
        print(f"train {name}: settings changed since the checkpoint; starting afresh")
        resumed = None
    elif resumed is not None and resumed["epoch"] > wanted:
        held = resumed["epoch"]
        resumed = checkpoint.at(s.run.ckpt_dir, wanted)
        if resumed is not None and resumed.get("fingerprint") == s.spec["fingerprint"]:
            print(f"train {name}: train.epochs = {wanted} but the checkpoint holds {held} "
                  f"epochs: using its epoch {wanted} (the same weights as a {wanted}-epoch "
                  "run) and removing the later ones")
            if s.rank == 0:
                checkpoint.truncate(s.run.ckpt_dir, wanted)
            s.origin = f"epoch {wanted} of an earlier {held}-epoch run"
        else:
            print(f"train {name}: train.epochs = {wanted} but the checkpoint holds {held} "
                  f"epochs and epoch {wanted} is no longer kept; starting afresh")
            resumed = None
    if resumed is None:
        if s.rank == 0:
            checkpoint.clear(s.run.ckpt_dir)
        return
    if s.average is not None:  # the average first: loading it goes through the net
        s.net.load_parameters(resumed["_stem"] + ".ema.params", ctx=s.ctxs)
        s.average.load_from_net(resumed["average_steps"])
    s.net.load_parameters(resumed["_stem"] + ".params", ctx=s.ctxs)
    s.trainer.load_states(resumed["_stem"] + ".states")
    s.history, s.start = resumed["history"], resumed["epoch"]
    if resumed["epoch"] < wanted:
        s.origin = f"resumed after epoch {s.start}"
        print(f"train {name}: resuming after epoch {s.start}")
    elif not s.origin:
        s.origin = f"already trained ({s.start} epochs)"
        print(f"train {name}: already trained for {s.start} epochs")


def run_epoch(s: Session, epoch: int, sync_first: bool) -> dict[str, Any]:
    """One pass over the training shard, then validation; returns the epoch's row."""
    import mxnet as mx
    from tqdm import tqdm

    from pipeline.lib import sgd
    from pipeline.lib.data import soft_targets
    from pipeline.lib.metrics import accuracy, ndsb_log_loss

    cfg, run = s.run.cfg, s.run
    lr = lr_at(epoch, cfg["lr"], cfg["lr_steps"], cfg["lr_factor"])
    s.trainer.set_learning_rate(lr)
    mx.random.seed(cfg["seed"] * 100003 + epoch)  # RReLU/dropout noise per epoch
    loss_fn = sgd.loss_function(cfg["label_smoothing"])
    t0, seen, total = time.perf_counter(), 0, 0.0
    bar = tqdm(s.train_loader.epoch(epoch), total=len(s.train_loader), unit="batch",
               desc=f"{run.name} epoch {epoch + 1}/{cfg['epochs']}", mininterval=2,
               disable=s.rank != 0)
    for x, y in bar:
        if s.targets is not None:  # second round: one-hot and pseudo-label rows
            y = soft_targets(y, s.targets)
        # dist: the initial weights must arrive before the first gradient leaves.
        first = (lambda: finish_initial_broadcast(s.trainer)) if sync_first else None
        batch_loss = sgd.step(s.net, s.trainer, loss_fn, x, y, s.ctxs,
                              scale=len(x) * s.n_workers, before_update=first)
        sync_first = False
        if s.average is not None:
            s.average.update()
        if not math.isfinite(batch_loss):
            raise TrainingError(
                f"{run.name}: loss became {batch_loss} in epoch {epoch + 1} (lr {lr:g}); "
                f"lower train.lr or check the data. The last good checkpoint is kept in "
                f"{run.ckpt_dir}")
        seen += len(x)
        total += batch_loss
        bar.set_postfix(loss=f"{total / seen:.3f}",
                        img_s=f"{seen / (time.perf_counter() - t0):.0f}")
    row = {"epoch": epoch + 1, "lr": lr, "train_loss": total / max(1, seen),
           "img_s": round(seen / (time.perf_counter() - t0), 1)}
    with s.average.swapped_in() if s.average is not None else contextlib.nullcontext():
        probs, labels = evaluate(s.net, s.valid_loader, s.ctxs[0])
    if len(labels):
        row.update(valid_logloss=ndsb_log_loss(labels, probs),
                   valid_accuracy=accuracy(labels, probs))
    return row


def finish(s: Session) -> dict[str, Any]:
    """Publish the final model, its out-of-fold predictions and the run's metrics."""
    from pipeline.lib.predictions import save_prediction_file

    run, cfg = s.run, s.run.cfg
    final = checkpoint.latest(run.ckpt_dir)
    if final is None:
        raise TrainingError(f"{run.name}: no checkpoint written (train.epochs = {cfg['epochs']})")
    checkpoint.finalize(run.ckpt_dir, final)
    # The published weights (the average, with one): what validation scored, what predict uses.
    s.net.load_parameters(str(run.ckpt_dir / "model.params"), ctx=s.ctxs)
    history = final["history"]
    _write_plot(run.plots_path, history)
    probs, labels = evaluate(s.net, s.valid_loader, s.ctxs[0])
    if len(labels):
        names = [s.meta["train"][i]["name"] for i in s.valid_idx]
        save_prediction_file(run.ckpt_dir / "valid.npy", probs.astype(np.float32), names)
    metrics = dict(history[-1])
    # The settings the weights were trained with (DVC shows params as asked; these are as used).
    metrics.update(net=run.net, member=run.member, fold=run.fold, epochs=len(history),
                   precision=s.spec["precision"], seed=cfg["seed"], origin=s.origin,
                   train_images=int(len(s.train_idx)), valid_images=int(len(s.valid_idx)),
                   chance_logloss=math.log(len(s.meta["classes"])))
    write_json(run.metrics_path, metrics)
    return metrics


def train(run: Run) -> dict[str, Any]:
    """Train (or resume) ``run``; return the final metrics."""
    s = open_session(run)
    try:
        sync_first = run.cfg["kvstore"].startswith("dist")  # see finish_initial_broadcast
        for epoch in range(s.start, run.cfg["epochs"]):
            row = run_epoch(s, epoch, sync_first)
            sync_first = False
            s.history.append(row)
            print(f"{run.name} epoch {epoch + 1}: " + ", ".join(
                f"{k} {_fmt(v)}" for k, v in row.items() if k != "epoch"))
            if s.rank == 0:
                checkpoint.save(run.ckpt_dir, epoch + 1, s.net, s.trainer,
                                dict(s.spec, history=s.history), s.average)
                _write_plot(run.plots_path, s.history)
    finally:
        s.train_loader.close()
    if s.rank != 0:  # only rank 0 writes; its files may not exist yet, or not on this machine
        return s.history[-1] if s.history else {}
    return finish(s)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Train one network on one fold.")
    parser.add_argument("--net", required=True)
    parser.add_argument("--fold", type=int, required=True, help="-1: all labelled images")
    parser.add_argument("--seed", type=int, help="a seed of the models grid: replaces "
                        "train.seed and names the run NET-seedS--foldK")
    parser.add_argument("--pseudo", type=Path, metavar="DIR",
                        help="second round: mix the pseudo stage's soft test targets in DIR "
                             "into every batch; the run is NET-pl")
    parser.add_argument("--pseudo-fraction", type=float, default=0.25,
                        help="share of every batch that is pseudo-labelled (pseudo.fraction)")
    parser.add_argument("--records", default="data/records")
    parser.add_argument("--params", default=params_mod.PARAMS_FILE)
    args = parser.parse_args(argv)
    configure_threads()
    try:
        with stage_errors("train"):
            cfg = params_mod.section("train", DEFAULTS, args.params)
            metrics = train(Run(args.net, args.fold, cfg, Path(args.records), args.seed,
                                args.pseudo, args.pseudo_fraction))
    except BaseException as exc:
        if os.environ.get("DMLC_ROLE") == "worker":
            _abort_worker(exc)
        raise
    print(json.dumps(metrics))


def _abort_worker(exc: BaseException) -> NoReturn:
    """Report ``exc`` and end this dist worker at once, skipping interpreter shutdown.

    At exit MXNet's dist kvstore waits for every worker, while the healthy workers wait for
    this one's gradients: a normal exit would hang the whole job instead of failing it. With
    an immediate exit the launcher (or srun -K / mpirun) sees the code and stops the others.
    """
    if isinstance(exc, SystemExit):  # the one-line message of stage_errors
        print(exc.code, file=sys.stderr)
    else:
        traceback.print_exception(type(exc), exc, exc.__traceback__)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(130 if isinstance(exc, KeyboardInterrupt) else 1)


if __name__ == "__main__":
    main()

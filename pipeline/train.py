"""Train one network on one fold from RecordIO: thesis §6.2 augmentation, Nesterov SGD.

``python -m pipeline.train --net NET --fold K`` (DVC runs it for every net in ``models.nets``
and every fold in ``models.folds``; ``--fold -1`` trains on all labelled images).

* Data: the fold's train records, augmented on the fly by the one affine parameterization of
  :mod:`pipeline.lib.augment` (rotation, translation, zoom, shear, stretch, flips; background fill),
  decoded in worker processes with bounded prefetch (:mod:`pipeline.lib.data`).
* Optimization (thesis §2.1.8-2.1.10): SGD with Nesterov momentum (MXNet ``nag``), weight
  decay, learning rate multiplied by ``lr_factor`` at each of ``lr_steps`` epochs (the thesis
  ran 0.01 x 400 -> 0.001 x 80 -> 0.0001 x 80 epochs), or another ``schedule`` (cosine with
  warm-up, one-cycle: :mod:`pipeline.lib.schedule`), set before every batch.
* Devices: ``ctx`` and ``kvstore`` (:mod:`pipeline.lib.devices`): one or several devices, or
  several machines under :mod:`pipeline.tools.launch` with ``dist_sync``.
* Precision (``precision``, default ``auto``): ``bfloat16`` runs the convolutions in bfloat16
  with float32 master weights (:mod:`nets.precision`); ``auto`` takes the faster of the paths
  this machine runs, timed on this network's real shape on first use and cached
  (:mod:`pipeline.lib.precision`). The precision used is part of the checkpoint's fingerprint
  and recorded in it; a resumed run keeps it, whatever a new timing would pick.
* Every epoch: train loss, validation log loss and accuracy go to ``plots/train--{run}.tsv``
  (``dvc plots``) and a crash-safe checkpoint (:mod:`pipeline.lib.checkpoint`); a rerun resumes from
  the newest intact one. A NaN/inf loss, validation output or weight stops the run with a
  clear error; the last good checkpoint stays. At the end: ``metrics/train--{run}.json``, the
  final model and its plain (no TTA) out-of-fold predictions.
* One run, one trainer: a lock beside the run's checkpoint folder refuses a second start.
"""
from __future__ import annotations

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
from typing import Any, Callable, NoReturn, Sequence

import numpy as np

from pipeline.lib import checkpoint
from pipeline.lib import stage
from pipeline.lib.errors import PipelineError, Stopped
from pipeline.lib.devices import finish_initial_broadcast, make_kvstore, parse_ctx, shard
from pipeline.lib.fsutil import hold_lock, sha256, sweep_stale, write_json, write_text
from pipeline.lib.predictions import prediction_files
from pipeline.lib.runs import PSEUDO_TARGETS, artifact_name, member_name, pseudo_name, run_name
from pipeline.lib.schedule import Schedule, needs_epochs, unused_keys
from pipeline.lib.settings import PSEUDO_CONTROL_PROBLEM, Paths, TrainSection
from pipeline.lib.signals import graceful_stop


# Keys that may change without invalidating a checkpoint (a run can be extended or moved).
# ``epochs`` only under a schedule whose lr does not depend on it (``steps``): see
# :func:`shaping`.
RESUMABLE_KEYS = ("epochs", "workers", "prefetch", "ctx", "kvstore")


class TrainingError(PipelineError, RuntimeError):
    """Training cannot go on (diverged, or the configuration is invalid)."""


def lr_at(epoch: int, lr: float, steps: Sequence[int], factor: float) -> float:
    """Learning rate of ``epoch`` (0-based) under ``steps``: ``lr * factor ** (steps passed)``."""
    return Schedule("steps", lr, lr_steps=tuple(steps), lr_factor=factor).lr_at(epoch)


def schedule_of(cfg: TrainSection) -> Schedule:
    """The run's learning-rate (and momentum) schedule."""
    return Schedule(cfg.schedule, cfg.lr, cfg.momentum, cfg.epochs, tuple(cfg.lr_steps),
                    cfg.lr_factor, cfg.warmup_epochs, cfg.min_lr, cfg.cycle_div,
                    cfg.cycle_momentum)


def shaping(settings: dict[str, Any]) -> dict[str, Any]:
    """The settings that shape a run's weights: all but :data:`RESUMABLE_KEYS` and the keys
    of schedules other than the run's, plus ``epochs`` when the schedule's lr depends on it
    (cosine, one-cycle: epoch e of a 10-epoch run is not epoch e of a 20-epoch run). Under
    ``steps`` this is what it was before schedules existed, so those checkpoints still fit.
    """
    schedule = settings.get("schedule", "steps")
    keep = {"epochs"} if needs_epochs(schedule) else set()
    drop = (set(RESUMABLE_KEYS) - keep) | unused_keys(schedule)
    return {k: v for k, v in settings.items() if k not in drop}


def fingerprint(net: str, fold: int, settings: dict[str, Any], meta: dict[str, Any],
                architecture: str = "") -> str:
    """Hash of everything that makes a checkpoint's state meaningful for this run.

    ``architecture`` (the built network's ``repr``: every layer and its settings) makes an
    edited network table start afresh instead of loading parameters of another shape.
    """
    relevant = shaping(settings)
    data = {k: meta[k] for k in ("classes", "size", "background", "folds", "seed", "files")}
    blob = json.dumps([net, fold, relevant, data, architecture], sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


@dataclass
class Run:
    """Everything one (net, fold) training run reads and writes."""

    net: str
    fold: int
    cfg: TrainSection
    paths: Paths
    # A seed of the models grid: replaces train.seed and names the run {net}-seed{s}--fold{k}.
    seed: int | None = None
    # Second round: the pseudo stage's folder of soft test targets, and the fraction of every
    # batch they fill. The run is then the net {net}-pl (pipeline.lib.runs.pseudo_name).
    # Fraction 0 with finetune > 0 is the control: the same fine-tuning on the training images
    # alone (no targets read), so what the pseudo-labels add can be measured.
    pseudo: Path | None = None
    pseudo_fraction: float = 0.25
    # > 0 (second round only): start from the first round's final weights of the same
    # (net, seed, fold) and train only the schedule's last ceil(finetune x epochs) epochs.
    finetune: float = 0.0
    member: str = field(init=False)
    name: str = field(init=False)
    # What the second round's weights depend on beyond train (its fingerprint): the fraction
    # and the targets' hash, so new targets start a new second round; when fine-tuning, the
    # first epoch and the first-round weights' hash too.
    pseudo_info: dict[str, Any] | None = field(init=False, default=None)
    # Fine-tuning: the first-round run folder the weights come from (None: from scratch).
    init_dir: Path | None = field(init=False, default=None)

    def __post_init__(self) -> None:
        self.member = member_name(pseudo_name(self.net) if self.pseudo else self.net, self.seed)
        if self.seed is not None:
            self.cfg = self.cfg.replace(seed=int(self.seed))
        if self.pseudo is not None:
            f = self.pseudo_fraction
            if not isinstance(f, (int, float)) or isinstance(f, bool) or not 0 <= f < 1:
                raise TrainingError(f"pseudo.fraction must be in [0, 1) for a second round, "
                                    f"got {f!r}")
            if f == 0 and not self.finetune:
                raise TrainingError(PSEUDO_CONTROL_PROBLEM)
            self.pseudo_info = {"fraction": float(f)}
            if self.mixes_pseudo_labels:
                npy, _ = prediction_files(self.pseudo, "test", PSEUDO_TARGETS, self.fold)
                if not npy.is_file():
                    raise TrainingError(f"{npy} not found: run the pseudo stage first "
                                        "(python -m pipeline.pseudo)")
                self.pseudo_info["targets"] = sha256(npy)
            if self.finetune:
                self._finetune_from_first_round()
        elif self.finetune:
            raise TrainingError("pseudo.finetune applies to a second round only (--pseudo)")
        self.name = run_name(self.member, self.fold)

    def _finetune_from_first_round(self) -> None:
        f, epochs = self.finetune, self.cfg.epochs
        if isinstance(f, bool) or not isinstance(f, (int, float)) or not 0 < f <= 1:
            raise TrainingError(f"pseudo.finetune must be a number in [0, 1], got {f!r}")
        # the last ceil(f x epochs) epochs (rounded first: 0.1 x 30 is 3, not 4)
        n = max(1, math.ceil(round(f * epochs, 6)))
        first = member_name(self.net, self.seed)
        self.init_dir = checkpoint.run_dir(self.paths.checkpoints, first, self.fold)
        spec = self.init_dir / "model.json"
        if not spec.is_file() or not (self.init_dir / "model.params").is_file():
            seed = f" --seed {self.seed}" if self.seed is not None else ""
            raise TrainingError(
                f"pseudo.finetune = {f:g} fine-tunes the first-round model "
                f"{run_name(first, self.fold)}, but {self.init_dir} holds no finished model: "
                f"train it first (python -m pipeline.train --net {self.net} --fold "
                f"{self.fold}{seed}){self.or_from_scratch}")
        self.pseudo_info["finetune"] = {"epochs": n, "from_epoch": epochs - n,
                                        "init": sha256(self.init_dir / "model.params")}

    @property
    def mixes_pseudo_labels(self) -> bool:
        """Whether the batches hold pseudo-labelled test images (a second round, not the
        control)."""
        return self.pseudo is not None and self.pseudo_fraction > 0

    @property
    def or_from_scratch(self) -> str:
        """The other way out of a missing or unusable first-round model, for error messages:
        none for the control, which only exists as a fine-tuning."""
        return "" if self.pseudo_fraction == 0 else " or set pseudo.finetune: 0"

    @property
    def first_epoch(self) -> int:
        """The 0-based epoch of the schedule the run starts at (> 0 only when fine-tuning)."""
        return self.pseudo_info["finetune"]["from_epoch"] if self.init_dir else 0

    @property
    def settings(self) -> dict[str, Any]:
        """The settings the weights depend on, as recorded in the checkpoint and hashed."""
        out = self.cfg.as_dict()
        if self.pseudo_info is not None:
            out["pseudo"] = self.pseudo_info
        return out

    @property
    def records(self) -> Path:
        return Path(self.paths.records)

    @property
    def ckpt_dir(self) -> Path:
        return checkpoint.run_dir(self.paths.checkpoints, self.member, self.fold)

    @property
    def lock_path(self) -> Path:
        """The run lock: beside the run's folder, not in it (the folder is a DVC output, and a
        lock file inside would be cached with it); removed when the run ends."""
        return self.ckpt_dir.parent / f".{self.ckpt_dir.name}.lock"

    @property
    def metrics_path(self) -> Path:
        return Path(self.paths.metrics) / f"{artifact_name('train', self.member, self.fold)}.json"

    @property
    def plots_path(self) -> Path:
        return Path(self.paths.plots) / f"{artifact_name('train', self.member, self.fold)}.tsv"


def model_kwargs(run: Run, classes: int) -> dict[str, Any]:
    kw = dict(classes=classes, act=run.cfg.act, bn=run.cfg.bn, in_channels=1)
    kw.update(run.cfg.net_kwargs.get(run.net, {}))
    return kw


def build(run: Run, meta: dict[str, Any], ctxs: list):
    """Network with initialized parameters on ``ctxs`` (MSRA/Xavier gain per activation).

    Returns ``(net, get_model kwargs, precision decision)``: ``train.precision: auto`` is
    measured (:func:`pipeline.lib.precision.choose`), except that a run being resumed keeps
    the precision its checkpoint was trained with (:func:`kept_precision`).
    """
    import mxnet as mx

    import nets
    from nets.precision import set_precision
    from pipeline.lib.precision import TRAINING, choose

    kwargs = model_kwargs(run, len(meta["classes"]))
    try:
        net = nets.get_model(run.net, **kwargs)
    except ValueError as err:  # unknown net or keyword: the registry lists the valid ones
        raise TrainingError(f"--net / train.net_kwargs: {err}") from None
    try:
        decision = choose(TRAINING, run.cfg.precision, run.net, kwargs, meta["size"],
                          run.cfg.batch_size // max(1, len(ctxs)), ctxs,
                          kept=kept_precision(run, meta, repr(net)))
    except ValueError as err:
        raise TrainingError(f"train.precision: {err}") from err
    precision = decision.precision
    set_precision(net, precision)
    if any(c.device_type == "gpu" for c in ctxs):
        from nets.activations import set_rrelu_impl

        set_rrelu_impl(net, "ops")  # the native RReLU operator is CPU-only
    mx.random.seed(run.cfg.seed)
    nets.initialize(net, ctx=ctxs)  # MSRA with the activation's own slope (thesis §5.5)
    # static_shape stays off: with it and more than one MXNet engine thread (what the stages
    # configure), a net's first training step does not update the BatchNorm running
    # statistics, so every resumed run (after kill -9, a graceful stop or at an epoch
    # boundary) would differ from an uninterrupted one. Training speed is the same without.
    net.hybridize(static_alloc=True, static_shape=False)
    return net, kwargs, decision


def architecture(net_repr: str, precision: str) -> str:
    """What of the built network enters the fingerprint: its layers and the precision used."""
    return f"{net_repr}\nprecision={precision}"


def kept_precision(run: Run, meta: dict[str, Any], net_repr: str) -> str | None:
    """The precision of the checkpoint this run would resume (the mid-epoch one or the newest
    epoch), if its fingerprint matches this run's settings in that precision; else None.
    ``auto`` keeps it, so timing noise never restarts a run."""
    from pipeline.lib import checkpoint

    for record in (checkpoint.partial(run.ckpt_dir), checkpoint.latest(run.ckpt_dir)):
        used = record.get("precision") if record else None
        if used and record.get("fingerprint") == fingerprint(
                run.net, run.fold, run.settings, meta, architecture(net_repr, used)):
            return used
    return None


def evaluate(net, loader, ctx, stop: Callable[[], int | None] = lambda: None
             ) -> tuple[np.ndarray | None, np.ndarray]:
    """(probabilities, labels) of every batch, inference mode; probabilities None when
    ``stop()`` reported a stop signal after some batch."""
    import mxnet as mx

    probs, labels = [], []
    for x, y in loader.epoch(0):
        out = net(mx.nd.array(x, ctx=ctx))
        probs.append(mx.nd.softmax(out).asnumpy())
        labels.append(y)
        if stop() is not None:
            return None, np.zeros(0, np.int64)
    if not probs:
        return np.zeros((0, 0), np.float32), np.zeros(0, np.int64)
    return np.concatenate(probs), np.concatenate(labels).astype(np.int64)


def _write_plot(path: Path, history: list[dict[str, Any]]) -> None:
    cols = ["epoch", "lr", "train_loss", "valid_logloss", "valid_accuracy", "img_s", "images",
            "seconds"]
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
    start_batch: int = 0  # > 0: resuming epoch `start` mid-way (a graceful stop)
    partial_sums: tuple[int, float] = (0, 0.0)  # images seen and loss summed before it
    origin: str = "trained from scratch"  # how this run's weights came about (metrics)


def pseudo_targets(run: Run, meta: dict[str, Any]) -> np.ndarray:
    """The fold's soft targets, rows in the order of the test records (``meta.json``)."""
    from pipeline.lib.predictions import align_rows, load_predictions

    probs, names = load_predictions(run.pseudo, "test", PSEUDO_TARGETS, run.fold)
    if probs.shape[1] != len(meta["classes"]):
        raise TrainingError(f"pseudo-labels of fold {run.fold}: {probs.shape[1]} columns, "
                            f"meta.json has {len(meta['classes'])} classes: rerun pseudo")
    try:
        targets = align_rows(probs, names, [t["name"] for t in meta["test"]],
                             f"pseudo-labels of fold {run.fold}", "the meta.json test images")
    except ValueError as exc:
        raise TrainingError(f"{exc}: rerun the pseudo stage on these records") from None
    return (targets / targets.sum(axis=1, keepdims=True)).astype(np.float32)


def open_session(run: Run, held: contextlib.ExitStack | None = None) -> Session:
    """Load the fold's data, build the network and optimizer, resume if a checkpoint fits.

    ``held`` receives the run lock (rank 0, the one rank that writes the run's files): a
    second trainer of the same run stops here, before it writes anything.
    """
    from pipeline.lib import sgd
    from pipeline.lib.augment import build_train_transform
    from pipeline.lib.ranges import AffineRanges
    from pipeline.lib.data import BatchLoader, MixedBatchLoader, MixedReader
    from pipeline.lib.records import RecordReader, fold_indices, load_meta

    cfg = run.cfg
    meta = load_meta(run.records)
    ctxs = parse_ctx(cfg.ctx)
    kv = make_kvstore(cfg.kvstore, ctxs)
    rank, n_workers = (kv.rank, kv.num_workers) if not isinstance(kv, str) else (0, 1)
    if held is not None and rank == 0:
        held.enter_context(hold_lock(run.lock_path, f"training of {run.name} (into "
                                     f"{run.ckpt_dir})", remove=True))
    ranges = AffineRanges.from_dict(cfg.augment)

    train_idx, valid_idx = fold_indices(meta, run.fold)
    train_idx = shard(train_idx, rank, n_workers)
    reader = RecordReader(run.records, "train")
    transform = build_train_transform(ranges, meta["size"], background=meta["background"])
    batch = cfg.batch_size  # a multiple of the devices (TrainSection.problems)
    targets = None
    if not run.mixes_pseudo_labels:
        train_loader = BatchLoader(reader, train_idx, batch, transform, shuffle=True,
                                   seed=cfg.seed + rank, workers=cfg.workers,
                                   prefetch=cfg.prefetch, drop_last=len(train_idx) >= batch)
    else:
        targets = pseudo_targets(run, meta)
        per_batch = round(batch * run.pseudo_fraction)
        if not 0 < per_batch < batch:
            raise TrainingError(f"pseudo.fraction {run.pseudo_fraction} of a batch of {batch} "
                                f"is {per_batch} images: it must leave room for both kinds "
                                "(raise train.batch_size or change the fraction)")
        train_loader = MixedBatchLoader(MixedReader(reader, RecordReader(run.records, "test")),
                                        train_idx, batch, per_batch, transform,
                                        seed=cfg.seed + rank, workers=cfg.workers,
                                        prefetch=cfg.prefetch)
    valid_loader = BatchLoader(reader, valid_idx, 2 * batch, None, workers=0)

    net, kwargs, decision = build(run, meta, ctxs)
    precision = decision.precision
    if rank == 0:
        print(f"train {run.name}: {decision.line()}")
    trainer = sgd.make_trainer(net, cfg.lr, cfg.momentum, cfg.wd, kvstore=kv)
    spec = {"net": run.net, "kwargs": kwargs, "classes": meta["classes"], "size": meta["size"],
            "input": {"invert": True, "scale": 1 / 255, "background": meta["background"]},
            "augment": ranges.to_dict(), "fold": run.fold,
            "fingerprint": fingerprint(run.net, run.fold, run.settings, meta,
                                       architecture(repr(net), precision)),
            "precision": precision, "precision_decision": decision.as_dict(),
            # Randomness is derived, not stored: this is all it takes to replay any epoch.
            "rng": {"seed": cfg.seed,
                    "shuffle": "numpy default_rng([seed + rank, epoch])",
                    "augment": "numpy SeedSequence([seed + rank, epoch, batch])",
                    "mxnet": "mx.random.seed(SeedSequence([seed * 100003 + rank, epoch, "
                             "batch]))"},
            "train": shaping(run.settings)}
    average = None
    if cfg.ema_half_life:
        average = sgd.WeightAverage(net, cfg.ema_half_life * max(1, len(train_loader)))
    session = Session(run, meta, ctxs, rank, n_workers, train_idx, valid_idx, train_loader,
                      valid_loader, net, trainer, spec, average, targets)
    if rank == 0:
        sweep_stale(f"train {run.name}", run.ckpt_dir, run.metrics_path.parent,
                    run.plots_path.parent)
    _resume(session)
    return session


def _resume(s: Session) -> None:
    """Continue from the newest intact checkpoint of the same settings, else start clean.

    Only ``epochs`` (and the other :data:`RESUMABLE_KEYS`) may differ from the checkpoint's
    settings, and ``epochs`` only under the ``steps`` schedule (:func:`shaping`). More epochs
    extend the run: the learning rate of an epoch does not depend on ``epochs`` there, so
    epoch ``e`` of a longer run equals epoch ``e`` of a shorter one. Fewer
    epochs than the checkpoint holds never keep the longer run: the asked epoch is used when
    its checkpoint is still kept (the later ones are removed), else the run starts afresh.
    A mid-epoch checkpoint (a graceful stop) of the epoch that comes next continues it.
    ``s.origin`` says what happened, for the log and the metrics.
    """
    name, wanted = s.run.name, s.run.cfg.epochs
    resumed = checkpoint.latest(s.run.ckpt_dir)
    if resumed is not None and resumed.get("fingerprint") != s.spec["fingerprint"]:
        theirs = resumed.get("precision")
        why = _why_afresh(resumed.get("train"), s.spec["train"])
        if theirs and theirs != s.spec["precision"] and resumed.get("fingerprint") == \
                fingerprint(s.run.net, s.run.fold, s.run.settings, s.meta,
                            architecture(repr(s.net), theirs)):
            why = (f"the checkpoint was trained in {theirs}, this run is in "
                   f"{s.spec['precision']} ({s.run.cfg.precision} here)")
        print(f"train {name}: {why}; starting afresh")
        resumed = None
        if s.rank == 0:
            checkpoint.clear(s.run.ckpt_dir)
    elif resumed is not None and resumed["epoch"] > wanted:
        held = resumed["epoch"]
        resumed = checkpoint.at(s.run.ckpt_dir, wanted)
        if resumed is not None and resumed.get("fingerprint") == s.spec["fingerprint"]:
            print(f"train {name}: train.epochs = {wanted} but the checkpoint holds {held} "
                  f"epochs: using its epoch {wanted} (the same weights as a {wanted}-epoch "
                  "run) and removing the later ones")
            if s.rank == 0:
                checkpoint.truncate(s.run.ckpt_dir, wanted)
            _load(s, resumed)
            s.origin = f"epoch {wanted} of an earlier {held}-epoch run"
            return
        print(f"train {name}: train.epochs = {wanted} but the checkpoint holds {held} "
              f"epochs and epoch {wanted} is no longer kept; starting afresh")
        resumed = None
        if s.rank == 0:
            checkpoint.clear(s.run.ckpt_dir)
    done = resumed["epoch"] if resumed is not None else s.run.first_epoch
    part = checkpoint.partial(s.run.ckpt_dir) if s.n_workers == 1 else None
    if part is not None and part.get("fingerprint") == s.spec["fingerprint"] \
            and part["epoch"] == done and done < wanted:
        _load(s, part)
        s.start_batch, s.partial_sums = int(part["batch"]), (int(part["seen"]),
                                                             float(part["loss_sum"]))
        s.origin = f"resumed in epoch {done + 1} after batch {s.start_batch}"
        print(f"train {name}: {s.origin}")
        return
    if part is not None and s.rank == 0:
        checkpoint.clear_partial(s.run.ckpt_dir)  # of other settings, or already passed
    if resumed is None:
        _start_fresh(s)
        return
    _load(s, resumed)
    if done < wanted:
        s.origin = f"resumed after epoch {done}"
        print(f"train {name}: resuming after epoch {done}")
    else:
        s.origin = f"already trained ({done} epochs)"
        print(f"train {name}: already trained for {done} epochs")


def _start_fresh(s: Session) -> None:
    """No checkpoint of these settings: the initialized weights at epoch 0, or, for a second
    round that fine-tunes (``pseudo.finetune``), the first round's final weights at
    the schedule's epoch ``first_epoch``, with a fresh optimizer state."""
    run = s.run
    if s.rank == 0:
        checkpoint.clear(run.ckpt_dir)
    if run.init_dir is None:
        return
    spec = checkpoint.load_spec(run.init_dir)
    mine = json.loads(json.dumps({k: s.spec[k] for k in ("net", "kwargs", "classes", "size")}))
    differ = [k for k, v in mine.items() if spec.get(k) != v]
    if differ:
        raise TrainingError(f"{run.name}: the first-round model in {run.init_dir} differs from "
                            f"this run in {', '.join(differ)}: retrain the first round on "
                            f"these records and settings{run.or_from_scratch}")
    params = run.init_dir / "model.params"
    if spec.get("sha256", {}).get("params") != run.pseudo_info["finetune"]["init"]:
        raise TrainingError(f"{params} does not match its model.json (damaged or replaced): "
                            f"retrain the first round{run.or_from_scratch}")
    s.net.load_parameters(str(params), ctx=s.ctxs)
    if s.average is not None:
        s.average.load_from_net(0)
    s.start = run.first_epoch
    s.origin = (f"fine-tuned from {run.init_dir.name} (epochs {run.first_epoch + 1}-"
                f"{run.cfg.epochs} of the schedule)")
    print(f"train {run.name}: {s.origin}")


def _why_afresh(old: dict[str, Any] | None, new: dict[str, Any]) -> str:
    """Why a checkpoint does not fit: the one case worth naming is a new ``epochs`` under a
    schedule that depends on it (cosine, one-cycle), which cannot extend a run."""
    if old is not None and "epochs" in new and "epochs" in old and old["epochs"] != \
            new["epochs"] and {k: v for k, v in old.items() if k != "epochs"} == \
            {k: v for k, v in new.items() if k != "epochs"}:
        return (f"train.epochs changed from {old['epochs']} to {new['epochs']}, and under "
                f"schedule {new.get('schedule')} the learning rate of every epoch depends on "
                "the total, so the checkpoint cannot be extended or cut")
    return "settings changed since the checkpoint"


def _load(s: Session, record: dict[str, Any]) -> None:
    """Weights, optimizer state, weight average and history of a checkpoint record."""
    if s.average is not None:  # the average first: loading it goes through the net
        s.net.load_parameters(record["_stem"] + ".ema.params", ctx=s.ctxs)
        s.average.load_from_net(record["average_steps"])
    s.net.load_parameters(record["_stem"] + ".params", ctx=s.ctxs)
    s.trainer.load_states(record["_stem"] + ".states")
    s.history, s.start = list(record["history"]), int(record["epoch"])


def run_epoch(s: Session, epoch: int, sync_first: bool,
              stop: Callable[[], int | None] = lambda: None) -> dict[str, Any]:
    """One pass over the training shard, then validation; returns the epoch's row.

    Resumes at ``s.start_batch`` with the running sums of a mid-epoch checkpoint. After every
    batch ``stop()`` is asked whether a stop signal came (:func:`pipeline.lib.signals
    .graceful_stop`); if so the mid-epoch state is saved and :class:`Stopped` raised.
    """
    import mxnet as mx
    from tqdm import tqdm

    from pipeline.lib import sgd
    from pipeline.lib.data import batch_seed, soft_targets
    from pipeline.lib.metrics import accuracy, ndsb_log_loss

    cfg, run = s.run.cfg, s.run
    schedule, batches = schedule_of(cfg), len(s.train_loader)
    # The step's place alone sets lr and momentum: a run resumed mid-epoch takes the same.
    lr = schedule.lr_at(epoch, 0, batches)
    s.trainer.set_learning_rate(lr)
    loss_fn = sgd.loss_function(cfg.label_smoothing)
    first_batch, (seen, total) = s.start_batch, s.partial_sums
    s.start_batch, s.partial_sums = 0, (0, 0.0)
    t0, seen_before = time.perf_counter(), seen
    bar = tqdm(s.train_loader.epoch(epoch, start=first_batch), total=len(s.train_loader),
               initial=first_batch, unit="batch", mininterval=2, disable=s.rank != 0,
               desc=f"{run.name} epoch {epoch + 1}/{cfg.epochs}")
    for b, (x, y) in enumerate(bar, start=first_batch):
        if schedule.per_batch:
            s.trainer.set_learning_rate(schedule.lr_at(epoch, b, batches))
            s.trainer.optimizer.momentum = schedule.momentum_at(epoch, b, batches)
        if s.targets is not None:  # second round: one-hot and pseudo-label rows
            y = soft_targets(y, s.targets)
        # RReLU/dropout noise per batch, so a run resumed mid-epoch draws the same noise.
        mx.random.seed(batch_seed(cfg.seed * 100003 + s.rank, epoch, b) % (1 << 31))
        # dist: the initial weights must arrive before the first gradient leaves.
        first = (lambda: finish_initial_broadcast(s.trainer)) if sync_first else None
        batch_loss = sgd.step(s.net, s.trainer, loss_fn, x, y, s.ctxs,
                              scale=len(x) * s.n_workers, before_update=first)
        sync_first = False
        if s.average is not None:
            s.average.update()
        if not math.isfinite(batch_loss):
            raise diverged(s, epoch, s.trainer.learning_rate, f"loss became {batch_loss}")
        seen += len(x)
        total += batch_loss
        bar.set_postfix(loss=f"{total / seen:.3f}",
                        img_s=f"{(seen - seen_before) / (time.perf_counter() - t0):.0f}")
        signum = stop()
        if signum is not None:
            bar.close()
            _stop_mid_epoch(s, epoch, b + 1, seen, total, signum)
    ran = seen - seen_before
    row = {"epoch": epoch + 1, "lr": lr, "train_loss": total / max(1, seen),
           "img_s": round(ran / (time.perf_counter() - t0), 1) if ran else None}
    # A stop during validation saves the trained epoch as "every batch done": the rerun only
    # validates, so the stop never waits for a whole validation pass.
    with s.average.swapped_in() if s.average is not None else contextlib.nullcontext():
        probs, labels = evaluate(s.net, s.valid_loader, s.ctxs[0], stop)
    if probs is None:
        _stop_mid_epoch(s, epoch, len(s.train_loader), seen, total, stop())
    if len(labels) and not np.isfinite(probs).all():
        raise diverged(s, epoch, lr, "validation outputs became NaN or infinite")
    if not all(np.isfinite(p.data().asnumpy()).all() for p in s.net.collect_params().values()):
        raise diverged(s, epoch, lr, "weights became NaN or infinite")
    if len(labels):
        row.update(valid_logloss=ndsb_log_loss(labels, probs),
                   valid_accuracy=accuracy(labels, probs))
    # Training images of the epoch (all of it, also after a mid-epoch resume) and its
    # wall-clock, training and validation (of the part this process ran): what a
    # time-to-log-loss curve adds up (pipeline.lib.results.time_curves).
    row["images"] = int(seen)
    row["seconds"] = round(time.perf_counter() - t0, 2)
    return row


def diverged(s: Session, epoch: int, lr: float, what: str) -> TrainingError:
    """The error of a run whose numbers stopped being finite: where, the fix, and the last
    checkpoint of the run that is still good (never one that does not exist)."""
    last = checkpoint.latest(s.run.ckpt_dir)
    kept = (f"the last good checkpoint (epoch {last['epoch']}) is kept in {s.run.ckpt_dir}"
            if last is not None else "no checkpoint yet")
    return TrainingError(f"{s.run.name}: {what} in epoch {epoch + 1} (lr {lr:g}): lower "
                         f"train.lr or check the data; {kept}")


def _stop_mid_epoch(s: Session, epoch: int, batches: int, seen: int, total: float,
                    signum: int) -> NoReturn:
    """Save the state after ``batches`` batches of ``epoch`` and stop (:class:`Stopped`)."""
    t0 = time.perf_counter()
    checkpoint.save_partial(s.run.ckpt_dir, s.net, s.trainer,
                            dict(s.spec, history=s.history, epoch=epoch, batch=batches,
                                 seen=seen, loss_sum=total), s.average)
    raise Stopped(f"{s.run.name} saved epoch {epoch + 1} after batch {batches} of "
                  f"{len(s.train_loader)} in {time.perf_counter() - t0:.1f} s "
                  f"({s.run.ckpt_dir}/{checkpoint.PARTIAL}.*); rerun to continue from there",
                  signum)


def finish(s: Session, stop: Callable[[], int | None] = lambda: None) -> dict[str, Any]:
    """Publish the final model, its out-of-fold predictions and the run's metrics; a stop
    signal during the predictions ends it with :class:`Stopped` (the rerun publishes)."""
    from pipeline.lib.predictions import save_prediction_file

    run, cfg = s.run, s.run.cfg
    final = checkpoint.latest(run.ckpt_dir)
    if final is None:
        raise TrainingError(f"{run.name}: no checkpoint written (train.epochs = {cfg.epochs})")
    checkpoint.finalize(run.ckpt_dir, final)
    # The published weights (the average, with one): what validation scored, what predict uses.
    s.net.load_parameters(str(run.ckpt_dir / "model.params"), ctx=s.ctxs)
    history = final["history"]
    _write_plot(run.plots_path, history)
    probs, labels = evaluate(s.net, s.valid_loader, s.ctxs[0], stop)
    if probs is None:
        raise Stopped(f"{run.name}: all {len(history)} epochs are saved in {run.ckpt_dir}; "
                      "stopped while writing the out-of-fold predictions; rerun to finish",
                      stop())
    if len(labels):
        names = [s.meta["train"][i]["name"] for i in s.valid_idx]
        save_prediction_file(run.ckpt_dir / "valid.npy", probs.astype(np.float32), names)
    metrics = dict(history[-1])
    # The settings the weights were trained with (DVC shows params as asked; these are as used).
    metrics.update(net=run.net, member=run.member, fold=run.fold, epochs=len(history),
                   precision=s.spec["precision"],
                   precision_decision=s.spec["precision_decision"], seed=cfg.seed, origin=s.origin,
                   train_images=int(len(s.train_idx)), valid_images=int(len(s.valid_idx)),
                   chance_logloss=math.log(len(s.meta["classes"])))
    write_json(run.metrics_path, metrics)
    return metrics


def train(run: Run) -> dict[str, Any]:
    """Train (or resume) ``run``; return the final metrics.

    The first SIGTERM/SIGINT stops the run after the current batch with its mid-epoch state
    saved (:class:`Stopped`; the rerun continues the epoch exactly); a second one at once. One
    while the run starts stops it before its first batch; one while it publishes the model,
    with every epoch saved. The run lock (:attr:`Run.lock_path`) is held until the run's
    files are written.
    """
    with contextlib.ExitStack() as held:
        return _train(run, held)


def _train(run: Run, held: contextlib.ExitStack) -> dict[str, Any]:
    dist = run.cfg.kvstore.startswith("dist")
    # dist workers keep the signals' default (an immediate stop; they resume from the last
    # epoch): a worker that finished its batch alone would hang the others at the next sum.
    # The others stop gracefully from before the session opens until the model is published.
    stop = held.enter_context(contextlib.nullcontext(lambda: None) if dist else
                              graceful_stop(f"train {run.name}"))
    s = open_session(run, held)
    if stop() is not None:
        raise Stopped(f"{run.name} stopped while starting, before its first batch (nothing "
                      "new to save); rerun to continue", stop())
    stopping = contextlib.nullcontext(stop)
    try:
        with stopping as stop:
            sync_first = dist  # see finish_initial_broadcast
            for epoch in range(s.start, run.cfg.epochs):
                row = run_epoch(s, epoch, sync_first, stop)
                sync_first = False
                s.history.append(row)
                print(f"{run.name} epoch {epoch + 1}: " + ", ".join(
                    f"{k} {_fmt(v)}" for k, v in row.items() if k != "epoch"))
                if s.rank == 0:
                    checkpoint.save(run.ckpt_dir, epoch + 1, s.net, s.trainer,
                                    dict(s.spec, history=s.history), s.average)
                    _write_plot(run.plots_path, s.history)
                if stop() is not None and epoch + 1 < run.cfg.epochs:
                    raise Stopped(f"{run.name} stopped after epoch {epoch + 1} (saved in "
                                  f"{run.ckpt_dir}); rerun to continue", stop())
    finally:
        s.train_loader.close()
    if s.rank != 0:  # only rank 0 writes; its files may not exist yet, or not on this machine
        return s.history[-1] if s.history else {}
    return finish(s, stop)


def _arguments(parser) -> None:
    parser.add_argument("--net", required=True)
    parser.add_argument("--fold", type=int, required=True, help="-1: all labelled images")
    parser.add_argument("--seed", type=int, help="a seed of the models grid: replaces "
                        "train.seed and names the run NET-seedS--foldK")
    parser.add_argument("--pseudo", action="store_true",
                        help="second round: mix the pseudo stage's soft test targets into "
                             "pseudo.fraction of every batch; the run is NET-pl")


def _run(cfg, args) -> str:
    if args.seed is not None and args.seed < 0:
        raise TrainingError(f"--seed must be >= 0, got {args.seed}")
    run = Run(args.net, args.fold, cfg.train, cfg.paths, args.seed,
              cfg.paths.pseudo if args.pseudo else None, cfg.pseudo.fraction,
              cfg.pseudo.finetune if args.pseudo else 0.0)
    return json.dumps(train(run))


def main(argv: Sequence[str] | None = None) -> None:
    try:
        stage.run("train", ("train", "paths", "pseudo"), _run, argv, doc=__doc__,
                  arguments=_arguments, threads=True)
    except BaseException as exc:
        if os.environ.get("DMLC_ROLE") == "worker":
            _abort_worker(exc)
        raise


def _abort_worker(exc: BaseException) -> NoReturn:
    """Report ``exc`` and end this dist worker at once, skipping interpreter shutdown.

    At exit MXNet's dist kvstore waits for every worker, while the healthy workers wait for
    this one's gradients: a normal exit would hang the whole job instead of failing it. With
    an immediate exit the launcher (or srun -K / mpirun) sees the code and stops the others.
    """
    if isinstance(exc, SystemExit) and isinstance(exc.code, int):  # a stop: its code
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(exc.code)
    if isinstance(exc, SystemExit):  # the one-line message of stage_errors
        print(exc.code, file=sys.stderr)
    else:
        traceback.print_exception(type(exc), exc, exc.__traceback__)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(130 if isinstance(exc, KeyboardInterrupt) else 1)


if __name__ == "__main__":
    main()

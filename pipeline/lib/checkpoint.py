"""Self-describing, crash-safe checkpoints: enough to predict without training code.

A run directory ``checkpoints/{net}--fold{k}/`` holds, after ``e`` finished epochs::

    epoch-000e.params   network parameters (``save_parameters``)
    epoch-000e.states   optimizer state (``Trainer.save_states``: momentum buffers)
    epoch-000e.ema.params  the moving average of the weights, when training keeps one
    epoch-000e.json     the spec (net name + kwargs, classes, input size and normalization,
                        augmentation ranges), epoch, history, config fingerprint, and the
                        sha256 of the two files above

Every file is written to a temporary name and renamed; the ``.json`` is written last, so its
presence means a complete epoch. On load the hashes are checked: a corrupt or truncated latest
checkpoint is reported with a warning and the previous one is used. The newest two epochs are
kept. ``model.json`` + ``model.params`` are the final model, for prediction (the weight
average when there is one: it is what validation scored).

Randomness needs no saved generator state: shuffling, augmentation and MXNet's RNG (the
RReLU noise) are seeded from (seed, epoch[, batch]), so resuming at epoch e, or at batch b of
epoch e from a mid-epoch checkpoint (``partial.*``, written when a run is asked to stop),
reproduces exactly what a run without the interruption would have done from there.
"""
from __future__ import annotations

import re
import shutil
import warnings
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.lib.errors import PipelineError
from pipeline.lib.fsutil import atomic_path, read_json, sha256, write_json
from pipeline.lib.runs import run_name

KEEP = 2
_EPOCH = re.compile(r"epoch-(\d+)\.json$")


class CheckpointError(PipelineError, RuntimeError):
    """No usable checkpoint where one was required."""


def run_dir(root: str | Path, net: str, fold: int) -> Path:
    return Path(root) / run_name(net, fold)


def _stem(directory: Path, epoch: int) -> Path:
    return directory / f"epoch-{epoch:04d}"


def _ema_path(stem: Path) -> Path:
    return stem.with_name(stem.name + ".ema.params")


SUFFIXES = (".json", ".params", ".states", ".ema.params")


def save(directory: str | Path, epoch: int, net, trainer, record: dict[str, Any],
         average=None) -> Path:
    """Write epoch ``epoch`` of a run; ``record`` holds spec, history, fingerprint.

    ``average``: a :class:`pipeline.lib.sgd.WeightAverage` of ``net``, saved beside the
    weights (its step count in the record) so a resumed run continues the same average.
    """
    directory = Path(directory)
    path = _write(_stem(directory, epoch), net, trainer, dict(record, epoch=epoch), average)
    _prune(directory)
    clear_partial(directory)  # the epoch it belonged to is complete now
    return path


PARTIAL = "partial"  # the stem of a mid-epoch checkpoint (a graceful stop)


def save_partial(directory: str | Path, net, trainer, record: dict[str, Any],
                 average=None) -> Path:
    """Write the mid-epoch state of a run that was asked to stop: ``partial.*``.

    ``record`` holds the epoch in progress (0-based), the batches done and the running loss
    sums; with the weights, the optimizer state and the weight average that is all a resumed
    run needs to continue the epoch exactly (data order and randomness are derived from
    (seed, epoch, batch)). Replaced by the next one, removed when the epoch completes.
    """
    stem = Path(directory) / PARTIAL
    stem.with_suffix(".json").unlink(missing_ok=True)  # invalid until rewritten
    return _write(stem, net, trainer, record, average)


def _write(stem: Path, net, trainer, record: dict[str, Any], average) -> Path:
    """Weights, optimizer state and weight average at ``stem``, then the ``.json`` record with
    their hashes (last: its presence means complete). On any failure (e.g. a full disk) every
    file of ``stem`` is removed, so no half-written checkpoint stays behind."""
    needed = _param_bytes(net)
    try:
        with atomic_path(stem.with_suffix(".params"), needed=needed) as tmp:
            net.save_parameters(str(tmp))
        with atomic_path(stem.with_suffix(".states"), needed=needed) as tmp:
            trainer.save_states(str(tmp))
        digests = {"params": sha256(stem.with_suffix(".params")),
                   "states": sha256(stem.with_suffix(".states"))}
        if average is not None:
            with atomic_path(_ema_path(stem), needed=needed) as tmp, average.swapped_in():
                net.save_parameters(str(tmp))
            digests["ema.params"] = sha256(_ema_path(stem))
            record = dict(record, average_steps=average.steps)
        write_json(stem.with_suffix(".json"), dict(record, sha256=digests))
    except BaseException:
        for suffix in SUFFIXES:
            stem.with_suffix(suffix).unlink(missing_ok=True)
        raise
    return stem.with_suffix(".json")


def _param_bytes(net) -> int:
    """About the size of one parameter file (and of the optimizer state, one buffer each)."""
    return sum(int(np.prod(p.shape)) * 4 for p in net.collect_params().values())


def partial(directory: str | Path) -> dict[str, Any] | None:
    """The verified mid-epoch record (with ``_stem``), or None (none, or not intact)."""
    stem = Path(directory) / PARTIAL
    if not stem.with_suffix(".json").exists():
        return None
    try:
        record = _verified(stem)
    except CheckpointError as exc:
        warnings.warn(f"ignoring the mid-epoch checkpoint in {directory}: {exc}")
        return None
    record["_stem"] = str(stem)
    return record


def clear_partial(directory: str | Path) -> None:
    for suffix in SUFFIXES:
        (Path(directory) / PARTIAL).with_suffix(suffix).unlink(missing_ok=True)


def _epochs(directory: Path) -> list[int]:
    if not directory.is_dir():
        return []
    found = (_EPOCH.search(p.name) for p in directory.iterdir())
    return sorted((int(m.group(1)) for m in found if m), reverse=True)


def _prune(directory: Path) -> None:
    for epoch in _epochs(directory)[KEEP:]:
        for suffix in SUFFIXES:
            _stem(directory, epoch).with_suffix(suffix).unlink(missing_ok=True)


def clear(directory: str | Path) -> None:
    """Remove every epoch and the final model of a run that is starting afresh.

    Stale epochs of other settings must go: they would outrank the new run's (higher epoch
    numbers) both when pruning and when resuming.
    """
    truncate(directory, 0)


def verify(directory: Path, epoch: int) -> dict[str, Any]:
    """The record of ``epoch`` if its files exist and match their hashes; else raise."""
    return _verified(_stem(directory, epoch))


def _verified(stem: Path) -> dict[str, Any]:
    """The record at ``stem`` if its files exist and match their hashes; else CheckpointError."""
    try:
        record = read_json(stem.with_suffix(".json"))
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{stem}.json unreadable: {exc}") from None
    for kind, digest in record.get("sha256", {}).items():
        path = stem.with_name(f"{stem.name}.{kind}")
        if not path.exists() or sha256(path) != digest:
            raise CheckpointError(f"{path} is missing or corrupt (sha256 mismatch)")
    return record


def at(directory: str | Path, epoch: int) -> dict[str, Any] | None:
    """The verified record (with ``_stem``) of exactly ``epoch``, or None if not kept intact."""
    directory = Path(directory)
    if epoch not in _epochs(directory):
        return None
    try:
        record = verify(directory, epoch)
    except CheckpointError:
        return None
    record["_stem"] = str(_stem(directory, epoch))
    return record


def truncate(directory: str | Path, epoch: int) -> None:
    """Remove the epochs after ``epoch`` and the final model: the run ends at ``epoch`` now."""
    directory = Path(directory)
    for later in _epochs(directory):
        if later > epoch:
            for suffix in SUFFIXES:
                _stem(directory, later).with_suffix(suffix).unlink(missing_ok=True)
    for name in ("model.json", "model.params", "valid.npy", "valid.names.txt"):
        (directory / name).unlink(missing_ok=True)
    clear_partial(directory)


def latest(directory: str | Path) -> dict[str, Any] | None:
    """The newest verified epoch record (with ``_stem``), warning about any skipped."""
    directory = Path(directory)
    for epoch in _epochs(directory):
        try:
            record = verify(directory, epoch)
        except CheckpointError as exc:
            warnings.warn(f"skipping checkpoint: {exc}; falling back to an earlier epoch")
            continue
        record["_stem"] = str(_stem(directory, epoch))
        return record
    return None


def finalize(directory: str | Path, record: dict[str, Any]) -> None:
    """Publish the verified epoch ``record`` as ``model.params`` + ``model.json``."""
    directory = Path(directory)
    stem = Path(record["_stem"])
    source = _ema_path(stem) if "ema.params" in record.get("sha256", {}) else \
        stem.with_suffix(".params")
    with atomic_path(directory / "model.params") as tmp:
        shutil.copyfile(source, tmp)
    spec = {k: v for k, v in record.items() if k not in ("_stem", "sha256")}
    spec["sha256"] = {"params": sha256(directory / "model.params")}
    write_json(directory / "model.json", spec)


def load_spec(directory: str | Path) -> dict[str, Any]:
    """The spec (``model.json``) of a finished run, without loading its parameters."""
    spec_path = Path(directory) / "model.json"
    if not spec_path.exists():
        raise CheckpointError(f"{spec_path} not found: train this model first")
    return read_json(spec_path)


def load_model(directory: str | Path, ctx=None):
    """(network with parameters, spec) of a finished run; needs only ``nets`` and MXNet."""
    import mxnet as mx

    import nets

    directory = Path(directory)
    spec_path = directory / "model.json"
    spec = load_spec(directory)
    params = directory / "model.params"
    if not params.exists() or sha256(params) != spec["sha256"]["params"]:
        raise CheckpointError(f"{params} is missing or does not match {spec_path}")
    net = nets.get_model(spec["net"], **spec["kwargs"])
    net.load_parameters(str(params), ctx=ctx or mx.cpu())
    return net, spec

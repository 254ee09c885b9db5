"""Where training runs: device contexts, the kvstore, and each dist worker's share.

``train.ctx`` = ``cpu`` | ``cpu:0,1`` | ``gpu:0,1,..``: data parallel via ``split_and_load``
and a kvstore (``device``; ``nccl`` where the build has it). Several machines: ``kvstore:
dist_sync`` under :mod:`pipeline.tools.launch`; each worker trains on its own shard of the
records and MXNet's parameter server sums the gradients. The train stage
(:mod:`pipeline.train`) asks this module; the epoch loop does not care which it got.
"""
from __future__ import annotations

import numpy as np

from pipeline.lib.errors import PipelineError


class DeviceError(PipelineError, ValueError):
    """The devices or the kvstore asked for cannot be used here."""


def parse_ctx(spec: str) -> list:
    """``cpu`` | ``cpu:0,1`` | ``gpu`` | ``gpu:0,1`` -> list of MXNet contexts."""
    import mxnet as mx

    kind, _, ids = spec.strip().partition(":")
    if kind not in ("cpu", "gpu"):
        raise DeviceError(f"train.ctx must be cpu[:i,j] or gpu[:i,j], got {spec!r}")
    devices = [int(i) for i in ids.split(",")] if ids else [0]
    if kind == "gpu":
        available = mx.context.num_gpus()
        missing = [d for d in devices if d >= available]
        if missing:
            raise DeviceError(f"train.ctx={spec!r}: GPU(s) {missing} not available "
                                f"({available} visible to this MXNet build)")
    return [mx.Context(kind, d) for d in devices]


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
        raise DeviceError(f"kvstore {kind!r} silently falls back to a local store in MXNet "
                            "1.9.1; use device, nccl or dist_sync")
    if kind == "dist_async":
        raise DeviceError("kvstore dist_async needs updates on the servers; this trainer "
                            "updates locally (resumable optimizer state): use dist_sync")
    if kind == "nccl" and not all(c.device_type == "gpu" for c in ctxs):
        raise DeviceError("kvstore nccl needs gpu contexts")
    if kind.startswith("dist"):
        return mx.kv.create(kind)
    return kind

"""INT8 inference for TTA: quantize a trained fp32 net for CPU/oneDNN, calibrated on TTA views.

INT8 (``mxnet.contrib.quantization.quantize_net_v2``) is the largest inference speed-up
of this pipeline (BENCHMARKS.md), at some cost in log loss, so predict uses it
only behind ``tta.int8``. Calibration (``naive``: per-tensor min/max; ``entropy``: KL-optimal
thresholds; ``percentile``: min/max clipped at the 0.01 % tails, :class:`PercentileCollector`;
``mean``: per-batch min/max averaged over the batches, :class:`MeanRangeCollector`)
records the range of every quantized layer's output on sample inputs, and those
inputs decide the INT8 scales. ``naive``'s extremes depend on which views are drawn (and widen
with more views), which moves the log loss from draw to draw; ``mean`` is steadier
(:data:`DEFAULT_CALIB_MODE`). Two choices keep it honest and representative:

* the calibration images are training records of the fold's *training part*
  (:func:`calibration_plan` takes those indices only), never its validation images: scales
  fitted on the images the out-of-fold log loss is measured on would flatter that estimate;
* each calibration image is warped by one of the *TTA transforms predict uses*, so the
  activation ranges are those of the views the INT8 net will actually see.

``keep_fp32`` names layers left in fp32 (``first_conv``, ``classifier``). The first conv is
where INT8 loses most here (BENCHMARKS.md, "INT8: where the loss comes from"), most likely
because it has one input channel: each output sums few int8-rounded products, whose rounding
does not average out as in the wide layers after it. It is also among the cheapest layers, so
keeping it in fp32 (:data:`DEFAULT_KEEP_FP32`) costs little speed. Keeping the classifier in
fp32 makes no measurable difference.

``granularity`` (``tta.int8_granularity``) sets the classifier's weight scales per tensor or per
output unit; the convolutions always get per-channel weight scales from oneDNN.
"""
from __future__ import annotations

import contextlib
import json
import sys
import warnings
from typing import Any, Sequence

import numpy as np

from pipeline.lib.errors import PipelineError

CALIB_MODES = ("naive", "entropy", "percentile", "mean")
PERCENTILE = 99.99        # percentile calibration: share of each layer's values kept in range
KEEP_FP32 = ("first_conv", "classifier")
DEFAULT_KEEP_FP32 = ("first_conv",)  # proposed default of tta.int8_keep_fp32 (see above)
DEFAULT_CALIB_MODE = "mean"           # proposed default of tta.calib_mode (see above)
# Weight scales of the quantized classifier (FullyConnected): one per tensor or one per output
# unit. oneDNN's fused convolutions always use one scale per output channel once calibrated
# (``weight_channelwise_scale``), whatever this says; only FullyConnected layers follow it.
GRANULARITIES = ("tensor-wise", "channel-wise")
# Integer type of the quantize nodes MXNet inserts: ``auto`` picks uint8 for a calibrated
# range without negatives (the input) and int8 otherwise. A bench_int8 study, not a setting.
QUANTIZED_DTYPES = ("auto", "int8", "uint8")
CALIB_BATCH = 64          # calibration forward batch: bounds memory, any size gives same ranges


class QuantizeError(PipelineError, ValueError):
    """Invalid INT8 settings."""


def calibration_plan(train_idx: Sequence[int], count: int, n_transforms: int, seed: int
                     ) -> tuple[np.ndarray, np.ndarray]:
    """(record index, transform index) of each of ``count`` calibration views.

    Records come from ``train_idx`` only, in a seeded random order, each used once before any
    repeats (a small fold gets several warps per image); transforms are spread evenly over the
    ``n_transforms`` TTA warps in a seeded order. Deterministic given the arguments.
    """
    train_idx = np.asarray(train_idx, dtype=np.int64)
    if count < 1 or len(train_idx) == 0 or n_transforms < 1:
        raise QuantizeError(f"calibration needs count >= 1 ({count}), training records "
                            f"({len(train_idx)}) and transforms ({n_transforms})")
    # A stream apart from the TTA matrices' default_rng(seed), so the two stay independent.
    rng = np.random.default_rng([seed, 1])
    laps = -(-count // len(train_idx))
    records = np.concatenate([rng.permutation(train_idx) for _ in range(laps)])[:count]
    transforms = rng.permutation(np.resize(np.arange(n_transforms), count))
    return records, transforms


def calibration_inputs(reader, records: np.ndarray, transforms: np.ndarray,
                       matrices: np.ndarray) -> np.ndarray:
    """Model inputs (N, 1, H, W): record ``records[i]`` warped by ``matrices[transforms[i]]``,
    the same batched warp predict applies (:func:`pipeline.lib.augment.warp_batch`)."""
    images, inverse = calibration_images(reader, records)
    return warped_inputs(images, inverse, transforms, matrices)


def calibration_images(reader, records: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(uint8 images (U, H, W) of the distinct ``records``, index into them of each record):
    what calibration needs from the records, small enough to travel in a model bundle."""
    unique, inverse = np.unique(records, return_inverse=True)
    return np.stack([reader.read(int(i))[1] for i in unique]), inverse


def warped_inputs(images: np.ndarray, inverse: np.ndarray, transforms: np.ndarray,
                  matrices: np.ndarray) -> np.ndarray:
    """Calibration inputs (N, 1, H, W): ``images[inverse[i]]`` warped by
    ``matrices[transforms[i]]`` (see :func:`calibration_inputs`)."""
    import mxnet as mx

    from pipeline.lib.augment import warp_batch
    from pipeline.lib.data import to_input

    return warp_batch(mx.nd.array(to_input(images)[inverse]), matrices[transforms]).asnumpy()


def layer_names(net, keep_fp32: Sequence[str]) -> list[str]:
    """Graph node names of the ``keep_fp32`` layers of the hybridizable ``net``."""
    import mxnet as mx

    unknown = sorted(set(keep_fp32) - set(KEEP_FP32))
    if unknown:
        raise QuantizeError(f"tta.int8_keep_fp32 takes {list(KEEP_FP32)}, got {unknown}")
    nodes = json.loads(net(mx.sym.var("data")).tojson())["nodes"]
    convs = [n["name"] for n in nodes if n["op"] == "Convolution"]
    dense = [n["name"] for n in nodes if n["op"] == "FullyConnected"]
    picked = {"first_conv": convs[:1], "classifier": dense[-1:]}
    return [name for key in keep_fp32 for name in picked[key]]


class PercentileCollector:
    """Calibration that clips each layer's range at a percentile of its outputs.

    ``naive`` takes the extreme min/max over all calibration views, so one outlier stretches
    a layer's INT8 step for every input; clipping the rare tail (``PERCENTILE`` of the values
    inside) keeps the resolution where the values are. Per calibration batch the percentiles
    are computed exactly (``np.percentile``, linear time), and the widest over the batches is
    kept. MXNet calls :meth:`collect` for every node output (``calib_mode='customize'``);
    only the names it later looks up are used.
    """

    def __init__(self, percentile: float = PERCENTILE) -> None:
        self.percentile = percentile
        self.ranges: dict[str, tuple[float, float]] = {}

    def collect(self, name, arr) -> None:
        import ctypes

        from mxnet.base import NDArrayHandle, py_str
        from mxnet.ndarray import NDArray

        name = py_str(name)
        values = NDArray(ctypes.cast(arr, NDArrayHandle), writable=False).asnumpy().ravel()
        if values.size == 0 or not np.issubdtype(values.dtype, np.floating):
            return
        lo, hi = np.percentile(values, [100 - self.percentile, self.percentile])
        lo, hi = min(float(lo), 0.0), max(float(hi), 0.0)  # ranges always contain 0
        old = self.ranges.get(name)
        self.ranges[name] = (lo, hi) if old is None else (min(old[0], lo), max(old[1], hi))

    @property
    def min_max_dict(self) -> dict[str, tuple[float, float]]:
        return self.ranges


class MeanRangeCollector(PercentileCollector):
    """Calibration that averages each layer's per-batch min and max over the batches.

    ``naive`` keeps the extreme min/max over all views, a statistic that only grows with the
    number of calibration views and varies with which views are drawn; the mean of the
    per-batch extremes (batches of ``CALIB_BATCH`` views) is steadier and a little narrower,
    and values beyond it saturate.
    """

    def __init__(self) -> None:
        super().__init__(percentile=100.0)
        self.sums: dict[str, list[float]] = {}

    def collect(self, name, arr) -> None:
        import ctypes

        from mxnet.base import NDArrayHandle, py_str
        from mxnet.ndarray import NDArray

        name = py_str(name)
        values = NDArray(ctypes.cast(arr, NDArrayHandle), writable=False).asnumpy()
        if values.size == 0 or not np.issubdtype(values.dtype, np.floating):
            return
        lo, hi = min(float(values.min()), 0.0), max(float(values.max()), 0.0)
        acc = self.sums.setdefault(name, [0.0, 0.0, 0])
        acc[0], acc[1], acc[2] = acc[0] + lo, acc[1] + hi, acc[2] + 1
        self.ranges[name] = (acc[0] / acc[2], acc[1] / acc[2])


def quantized_layers(net) -> list[str]:
    """Graph node names of the layers INT8 quantizes (Convolution and FullyConnected), in
    graph order: the names ``quantize(exclude=...)`` takes."""
    import mxnet as mx

    nodes = json.loads(net(mx.sym.var("data")).tojson())["nodes"]
    return [n["name"] for n in nodes if n["op"] in ("Convolution", "FullyConnected")]


def check_options(mode: str, granularity: str, dtype: str = "auto") -> None:
    """:class:`QuantizeError` naming the ``tta`` key of an unknown calibration mode or
    weight-scale granularity (or an unknown activation type, an argument only)."""
    for key, value, valid in (("tta.calib_mode", mode, CALIB_MODES),
                              ("tta.int8_granularity", granularity, GRANULARITIES),
                              ("quantized dtype", dtype, QUANTIZED_DTYPES)):
        if value not in valid:
            raise QuantizeError(f"{key} must be one of {valid}, got {value!r}")


def quantize(net, calib: np.ndarray, mode: str = "naive", keep_fp32: Sequence[str] = (),
             granularity: str = "tensor-wise", dtype: str = "auto",
             exclude: Sequence[str] = ()):
    """INT8 ``SymbolBlock`` of the hybridized fp32 ``net`` (CPU/oneDNN), calibrated on
    ``calib`` (N, C, H, W model inputs), hybridized for repeated inference.

    ``granularity`` and ``dtype`` are :data:`GRANULARITIES` and :data:`QUANTIZED_DTYPES`
    (``dtype`` only changes how the input and the inputs of quantized layers after fp32 ones
    are quantized: the fused conv + leaky outputs are signed, hence int8, whatever it says);
    ``exclude`` names further layers (:func:`quantized_layers`) to leave in fp32, for the
    per-layer studies of ``pipeline.tools.bench_int8``.
    """
    import mxnet as mx
    from mxnet.contrib.quantization import quantize_net_v2

    check_options(mode, granularity, dtype)
    excluded = layer_names(net, keep_fp32) + [name for name in exclude]
    # A padded last batch repeats early views: min/max ranges are unchanged by that.
    calib_iter = mx.io.NDArrayIter(data=calib, batch_size=min(CALIB_BATCH, len(calib)),
                                   last_batch_handle="pad")
    # quantize_net_v2 prints its progress to stdout; keep stdout for the stage's own report.
    # Its SymbolBlock warns that the input's dtype is unknown: it is float32, set on first call.
    with contextlib.redirect_stdout(sys.stderr), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Cannot decide type")
        collector = {"percentile": PercentileCollector, "mean": MeanRangeCollector}.get(mode)
        collector = collector() if collector else None
        qnet = quantize_net_v2(net, quantized_dtype=dtype, quantize_mode="full",
                               quantize_granularity=granularity,
                               exclude_layers=excluded, calib_data=calib_iter,
                               calib_mode="customize" if collector else mode,
                               LayerOutputCollector=collector,
                               num_calib_examples=len(calib), ctx=mx.cpu())
    qnet.hybridize(static_alloc=True)
    return qnet


def int8_net(net, reader, train_idx: Sequence[int], matrices: np.ndarray, calib_images: int,
             calib_mode: str, keep_fp32: Sequence[str], granularity: str, seed: int
             ) -> tuple[Any, dict[str, Any]]:
    """(INT8 net, calibration summary for the metrics) of ``net``, calibrated on
    ``calib_images`` TTA views (``matrices``) of the training records ``train_idx``, chosen
    with ``seed``; the ``keep_fp32`` layers stay float32 (:data:`KEEP_FP32`)."""
    check_int8(calib_mode, keep_fp32, granularity)
    records, transforms = calibration_plan(train_idx, calib_images, len(matrices), seed)
    calib = calibration_inputs(reader, records, transforms, matrices)
    qnet = quantize(net, calib, calib_mode, keep_fp32, granularity)
    return qnet, {"calib_views": len(calib), "calib_records": int(len(np.unique(records))),
                  "calib_mode": calib_mode, "keep_fp32": list(keep_fp32),
                  "int8_granularity": granularity}


def check_int8(calib_mode: str, keep_fp32: Sequence[str], granularity: str) -> None:
    """Raise :class:`QuantizeError` for INT8 settings :func:`quantize` cannot use."""
    if isinstance(keep_fp32, str) or not isinstance(keep_fp32, (list, tuple)):
        raise QuantizeError(f"tta.int8_keep_fp32 must be a list (e.g. [first_conv]), "
                            f"got {keep_fp32!r}")
    check_options(calib_mode, granularity)

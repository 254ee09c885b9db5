"""Predict with test-time augmentation: every image under ``tta.n`` random affine views.

``python -m pipeline.predict --net NET --fold K`` loads ``checkpoints/NET--foldK/model.*``
(self-describing: no training code needed), then predicts

* ``valid``: the fold's out-of-fold training images (for fitting ensemble weights), and
* ``test``: every test image, streamed batch by batch (memory does not grow with the set),

and writes ``predictions/models/{split}--NET--foldK.npy`` + ``.names.txt``
(:mod:`pipeline.lib.predictions`) and ``metrics/predict--NET--foldK.json``: the validation
log loss without TTA and with the first n views (n = 1, 2, 5, 10, ..., T), so every run
reports what TTA bought.

The thesis averages 100 random augmentations per image (§6.2). The T transforms are drawn once
per model from the training ranges stored in the checkpoint, or from narrower ``tta.ranges``;
``tta.method: halton`` draws them quasi-randomly (more even coverage for small T);
``tta.method: stratified`` is a designed view list (the identity first, evenly spaced
rotations, balanced flips, the distortions from a scrambled Halton sequence:
:func:`pipeline.lib.augment.stratified_unit`), so every prefix of the views is balanced;
``tta.mean`` says how views are averaged and ``tta.n: 0`` predicts the plain images. The
views, their batched forward passes and the averaging are :mod:`pipeline.lib.tta`.

INT8 (``tta.int8``, default off): the fp32 net is quantized for CPU/oneDNN
(:mod:`pipeline.lib.quantize`), calibrated on ``tta.calib_images`` TTA-warped views of the
fold's *training* records (never its validation images), and every prediction runs through the
INT8 net. The metrics record whether INT8 was used and the views/s of each pass, so the speed
and the log-loss cost can be read off the same file.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from pipeline.lib import params as params_mod
from pipeline.lib.errors import PipelineError, stage_errors
from pipeline.lib.runs import artifact_name, run_name
from pipeline.lib.runtime import configure_threads
from pipeline.lib.tta import predict_split, tta_curve_points, tta_matrices

DEFAULTS: dict[str, Any] = {
    "n": 100,
    "method": "random",      # random | halton | stratified (augment.METHODS)
    "mean": "probs",         # probs | logits | geometric
    "seed": 0,
    "ranges": {},            # narrower augment ranges for TTA; {} = the training ranges
    "batch_size": 4,         # images warped together (batch_size * n views)
    "max_views": 128,        # views per forward pass: bounds the activation memory
    "precision": "auto",     # float32 | bfloat16 | auto (pipeline.lib.runtime.resolve_precision)
    "int8": False,           # predict with an INT8-quantized net (pipeline.lib.quantize)
    "calib_images": 256,     # INT8 calibration views, from the fold's training records
    "calib_mode": "naive",   # naive | entropy | percentile (pipeline.lib.quantize.CALIB_MODES)
    "int8_keep_fp32": [],    # layers left in fp32 (pipeline.lib.quantize.KEEP_FP32)
    "checkpoints": "checkpoints",
    "predictions": "predictions/models",
}


class PredictError(PipelineError, ValueError):
    """Invalid TTA settings or inputs."""


def inference_net(net, spec: dict[str, Any], records: Path, train_idx: np.ndarray,
                  cfg: dict[str, Any]) -> tuple[Any, dict[str, Any]]:
    """The net predict runs (the fp32 ``net``, or its INT8 version if ``tta.int8``) and the
    metrics that describe it. INT8 calibrates on TTA views of ``train_idx`` only."""
    if not cfg["int8"]:
        return net, {"int8": False}
    from pipeline.lib.quantize import int8_net
    from pipeline.lib.records import RecordReader

    if len(train_idx) == 0:
        raise PredictError("tta.int8 needs training records to calibrate on")
    ranges = cfg["ranges"] or spec["augment"]
    matrices = tta_matrices(ranges, cfg["n"], spec["size"], cfg["method"], cfg["seed"])
    t0 = time.perf_counter()
    qnet, calib = int8_net(net, RecordReader(records, "train"), train_idx, matrices, cfg)
    return qnet, {"int8": True, "int8_calibration": calib,
                  "quantize_seconds": round(time.perf_counter() - t0, 2)}


def inference_precision(cfg: dict[str, Any]) -> str:
    """``tta.precision`` resolved for this machine; INT8 quantizes the float32 graph."""
    from pipeline.lib.precision import resolve_precision

    try:
        precision = resolve_precision(cfg["precision"])
    except ValueError as err:
        raise PredictError(f"tta.precision: {err}") from err
    if cfg["int8"] and precision != "float32":
        if cfg["precision"] == "auto":
            return "float32"
        raise PredictError("tta.int8 quantizes the float32 network: set tta.precision to "
                           "float32 (or auto) together with tta.int8")
    return precision


def predict(net_name: str, fold: int, records: Path, cfg: dict[str, Any],
            metrics_dir: str | Path = "metrics") -> dict[str, Any]:
    """Write the valid and test predictions of one trained model; return validation metrics.

    The validation images have labels, so their log loss is measured without TTA and with the
    first n of the T views (n = 1, 2, 5, 10, ..., T): the effect of TTA, per model, every run.
    """
    from pipeline.lib.checkpoint import load_model, run_dir
    from pipeline.lib.fsutil import write_json
    from pipeline.lib.metrics import accuracy, ndsb_log_loss
    from pipeline.lib.predictions import save_predictions
    from pipeline.lib.records import RecordReader, fold_indices, labels, load_meta

    from pipeline.lib.augment import METHODS

    if cfg["n"] < 0:
        raise PredictError(f"tta.n must be >= 0, got {cfg['n']}")
    if cfg["method"] not in METHODS:  # fail before loading the model, naming the setting
        raise PredictError(f"tta.method must be one of {METHODS}, got {cfg['method']!r}")
    meta = load_meta(records)
    net, spec = load_model(run_dir(cfg["checkpoints"], net_name, fold))
    if spec["classes"] != meta["classes"] or spec["size"] != meta["size"]:
        raise PredictError(f"{run_name(net_name, fold)} was trained on other records "
                           "(classes or size differ from meta.json); retrain it")
    import nets

    # RReLU's inference output is fixed, (l+u)/2; the deterministic graph skips drawing the
    # unused noise: identical outputs, much faster TTA (BENCHMARKS.md).
    nets.set_deterministic(net)
    precision = inference_precision(cfg)
    nets.set_precision(net, precision)
    net.hybridize(static_alloc=True)
    name = run_name(net_name, fold)
    metrics: dict[str, Any] = {"net": net_name, "fold": fold, "tta_n": cfg["n"],
                               "tta_mean": cfg["mean"], "tta_method": cfg["method"],
                               "precision": precision}
    train_idx, valid_idx = fold_indices(meta, fold)
    net, about = inference_net(net, spec, records, train_idx, cfg)
    metrics.update(about)
    if len(valid_idx):
        reader = RecordReader(records, "train")
        names = [meta["train"][i]["name"] for i in valid_idx]
        y = labels(meta)[valid_idx]
        plain, _ = predict_split(net, spec, reader, valid_idx, dict(cfg, n=0),
                                 f"valid {name} (no TTA)")
        speed: dict[str, float] = {}
        probs, curve = predict_split(net, spec, reader, valid_idx, cfg, f"valid {name}",
                                     tta_curve_points(cfg["n"]), speed)
        metrics["valid_views_per_s"] = speed["views_per_s"]
        save_predictions(cfg["predictions"], "valid", net_name, fold, probs, names)
        metrics.update(valid_images=len(y), valid_logloss=ndsb_log_loss(y, probs),
                       valid_accuracy=accuracy(y, probs),
                       valid_logloss_no_tta=ndsb_log_loss(y, plain),
                       valid_logloss_by_n={str(n): ndsb_log_loss(y, p) for n, p in curve.items()})
    test_reader = RecordReader(records, "test")
    test_speed: dict[str, float] = {}
    probs, _ = predict_split(net, spec, test_reader, np.arange(len(test_reader)), cfg,
                             f"test {name}", stats=test_speed)
    save_predictions(cfg["predictions"], "test", net_name, fold, probs,
                     [r["name"] for r in meta["test"]])
    metrics.update(test_images=len(probs), test_views_per_s=test_speed["views_per_s"])
    write_json(Path(metrics_dir) / f"{artifact_name('predict', net_name, fold)}.json", metrics)
    return metrics


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="TTA predictions of one trained model.")
    parser.add_argument("--net", required=True)
    parser.add_argument("--fold", type=int, required=True)
    parser.add_argument("--records", default="data/records")
    parser.add_argument("--metrics", default="metrics", help="folder for predict--*.json")
    parser.add_argument("--params", default=params_mod.PARAMS_FILE)
    args = parser.parse_args(argv)
    configure_threads()
    with stage_errors("predict"):
        cfg = params_mod.section("tta", DEFAULTS, args.params)
        metrics = predict(args.net, args.fold, Path(args.records), cfg, args.metrics)
    if "valid_logloss" in metrics:
        curve = ", ".join(f"n={n} {v:.4f}" for n, v in metrics["valid_logloss_by_n"].items())
        print(f"valid log loss: no TTA {metrics['valid_logloss_no_tta']:.4f}, {curve}")


if __name__ == "__main__":
    main()

"""Run a bundle's ensemble on model-input images: TTA per model, then the ensemble's blend.

Each model runs as predict ran it (:mod:`pipeline.lib.inference`, :mod:`pipeline.lib.tta`):
the same TTA views (stored in the bundle), averaging, batch and view-pass sizes, and the
precision predict's INT8 decision gave it: a model that predicted in INT8 is quantized again
from the calibration data the bundle carries (the same inputs, hence the same INT8 net), the
others run in ``tta.precision`` resolved on this machine. The models' probabilities are then
combined exactly as the ensemble stage combined the test predictions (fold mean per member,
seed mean per net, weighted blend, temperature), so a bundle classifying the test images
reproduces ``test--ensemble.npy``.
"""
from __future__ import annotations

from typing import Any, Callable

import numpy as np

from pipeline.lib.bundle import Bundle


class ArrayReader:
    """The record-reader interface (:class:`pipeline.lib.records.RecordReader`) over images
    already decoded in memory, for :func:`pipeline.lib.tta.predict_chunks`."""

    def __init__(self, images: np.ndarray):
        self.images = images

    def __len__(self) -> int:
        return len(self.images)

    def read(self, i: int) -> tuple[float, np.ndarray]:
        return 0.0, self.images[i]


RUNTIMES = ("mxnet", "onnx")
ONNX = "onnx"


def run_decisions(bundle: Bundle, int8: bool = True, kept: dict[str, str] | None = None,
                  say=print, runtime: str = "mxnet") -> dict[str, str]:
    """What each model of ``bundle`` runs in here (``dir`` -> ``int8``, ``float32``,
    ``bfloat16`` or ``onnx``), decided as predict decides
    (:func:`pipeline.lib.inference.decide_precision`):

    * the float path: the bundle's ``tta.precision``, ``auto`` measured on this machine for the
      model's net, input size and view batch (cached), or ``kept[dir]``, the float precision
      of the work being resumed;
    * INT8 where predict's guard chose it for this model (``int8_used``; the guard needs the
      labelled validation images, which a bundle does not carry, so its verdict is kept), the
      bundle's ``tta.int8`` is not ``false``, and, with ``tta.int8: auto``, INT8 was not
      measured slower here than the float path; ``int8`` False (``--no-int8``): never.

    ``runtime="onnx"``: every model's float32 ``model.onnx`` in ONNX Runtime
    (:mod:`pipeline.lib.onnxmodel`). Each model's decision line is passed to ``say``."""
    from pipeline.lib.inference import decide_precision

    tta = bundle.tta
    used: dict[str, str] = {}
    if runtime == ONNX:
        from pipeline.lib.onnxmodel import runtime_version

        version = runtime_version()
        for model in bundle.models:
            used[model["dir"]] = ONNX
            say(f"{model['dir']}: ONNX Runtime {version}: the float32 graph (model.onnx)")
        return used
    for model in bundle.models:
        kept_float = (kept or {}).get(model["dir"])
        decision = decide_precision(
            bundle.spec(model), precision=tta["precision"], int8=tta["int8"], n=tta["n"],
            batch_size=tta["batch_size"], max_views=tta["max_views"],
            keep_fp32=tta["int8_keep_fp32"], granularity=tta["int8_granularity"],
            kept=kept_float if kept_float != "int8" else None)
        line = decision.line()
        run = decision.precision
        if int8 and model["int8_used"] and tta.get("int8") is not False:
            if tta.get("int8") == "auto" and decision.int8_faster is False:
                line += "; INT8 measured no faster here: the float path"
            else:
                run = "int8"
                line += "; INT8 (predict's guard chose it for this model)"
        used[model["dir"]] = run
        say(f"{model['dir']}: {line}")
    return used


class Classifier:
    """The loaded nets of a verified bundle and how to blend them.

    ``used``: what each model runs in (:func:`run_decisions`): ``int8`` (quantized again
    from the calibration data the bundle carries), else the float precision.
    """

    def __init__(self, bundle: Bundle, used: dict[str, str]):
        from pipeline.lib.checkpoint import load_model
        from pipeline.lib.inference import prepare_net
        from pipeline.lib.quantize import check_int8, quantize, warped_inputs
        from pipeline.lib.tta import TTAPlan

        self.bundle = bundle
        tta = bundle.tta
        self.nets: dict[str, Any] = {}
        self.plans: dict[str, TTAPlan] = {}
        self.used = dict(used)
        for model in bundle.models:
            views = bundle.views(model)
            net = None if used[model["dir"]] == ONNX else load_model(bundle.model_dir(model))[0]
            if used[model["dir"]] == ONNX:
                from pipeline.lib.onnxmodel import OnnxNet

                net = OnnxNet(bundle.onnx(model), _threads())
            elif used[model["dir"]] == "int8":
                check_int8(tta["calib_mode"], tta["int8_keep_fp32"], tta["int8_granularity"])
                c = bundle.calibration(model)
                calib = warped_inputs(c["images"], c["inverse"], c["transforms"], views)
                net = quantize(prepare_net(net, "float32"), calib, tta["calib_mode"],
                               tta["int8_keep_fp32"], tta["int8_granularity"])
            else:
                net = prepare_net(net, used[model["dir"]])
            self.nets[model["dir"]] = net
            self.plans[model["dir"]] = TTAPlan(views, tta["mean"], tta["batch_size"],
                                               tta["max_views"])

    def predict(self, images: np.ndarray, progress: Callable[[float], Any] | None = None,
                stop: Callable[[], Any] | None = None) -> np.ndarray | None:
        """Calibrated ensemble probabilities (m, classes) of uint8 model-size images
        (m, size, size); None if ``stop()`` became true part-way (nothing is kept).
        ``progress`` receives the share of an image done, batch by batch."""
        from pipeline.lib.tta import predict_chunks

        m = len(images)
        share = 1.0 / len(self.nets)
        reader = ArrayReader(images)
        probs: dict[str, np.ndarray] = {}
        for name, net in self.nets.items():
            done = list(predict_chunks(
                net, self.plans[name], reader, np.arange(m), [(0, m)], (),
                None if progress is None else (lambda n: progress(n * share)), stop))
            if not done or len(done[0][0]) < m:
                return None
            probs[name] = done[0][0]
        return combine(self.bundle.info["ensemble"], probs)


def _threads() -> int | None:
    """ONNX Runtime's threads: those MXNet was given (``OMP_NUM_THREADS``), else its own
    default (one per core)."""
    import os

    value = os.environ.get("OMP_NUM_THREADS", "")
    return int(value) if value.isdigit() and int(value) > 0 else None


def combine(ensemble: dict[str, Any], probs: dict[str, np.ndarray]) -> np.ndarray:
    """The ensemble's probabilities from each model's (``dir`` -> (m, K) float32), in the
    ensemble stage's order of operations and dtypes (:mod:`pipeline.ensemble`)."""
    from pipeline.lib.metrics import apply_temperature, clip_normalize

    blend = None
    for net in ensemble["nets"]:
        members = []
        for member in net["members"]:
            total = None
            for fold in member["folds"]:
                p = probs[fold["dir"]].astype(np.float64)
                total = p if total is None else total + p
            members.append((total / len(member["folds"])).astype(np.float32))
        if len(members) == 1:
            net_probs = members[0]
        else:
            net_probs = np.mean([clip_normalize(p) for p in members], axis=0).astype(np.float32)
        part = net["weight"] * clip_normalize(net_probs)
        blend = part if blend is None else blend + part
    if ensemble["calibration"] == "temperature":
        blend = apply_temperature(blend, ensemble["temperature"])
    return blend

"""ONNX export of a trained model, and running it with ONNX Runtime instead of MXNet.

MXNet 1.9.1 is the last MXNet (Python <= 3.11, numpy 1.23.5); a model trained here also needs a
way to run without it. The bundle stage therefore writes, beside each model's MXNet weights, a
``model.onnx`` made by MXNet's own exporter (``mx.onnx.export_model``, in the 1.9.1 wheel), and
``python -m pipeline.classify --runtime onnx`` runs those graphs with ONNX Runtime.

What is exported is the float inference net predict runs (:func:`pipeline.lib.inference.
prepare_net` in float32): RReLU's deterministic inference graph, which is MXNet's
``LeakyReLU(act_type='leaky', slope=(l+u)/2)`` (ONNX ``LeakyRelu``: the custom training op never
appears in it), batch norm folded into the convolution before it, so the graph holds only
Convolution, Pooling, LeakyReLU, Flatten, FullyConnected and the like, in ONNX opset 13 (the
newest the 1.9.1 exporter writes).
The input is ``data`` (N, 1, size, size) float32 with any N; the output is the (N, classes)
logits, as the MXNet net's: TTA's averaging is the same code either way. INT8 nets are not
exported (oneDNN's quantized graph is MXNet's own); ONNX runs the float32 graph.

The exporter lists each weight as a graph input too; those inputs are dropped, so ONNX Runtime
treats the weights as constants (folding, fusion) and the only input is the image batch.
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.lib.errors import PipelineError

INPUT = "data"


class OnnxError(PipelineError, RuntimeError):
    """ONNX or ONNX Runtime missing, or an export that is not the graph expected."""


def _require(module: str):
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as err:
        raise OnnxError(f"{module} is not installed ({err}): it comes with the project's "
                        "environment (make venv)") from None


def export_onnx(net, size: int, path: str | os.PathLike, doc: str = "") -> Path:
    """Write the prepared float32 inference net ``net`` (hybridized, parameters loaded) as
    ONNX to ``path`` (atomically) and return it; ``doc``: the graph's description."""
    import mxnet as mx

    from pipeline.lib.fsutil import atomic_path

    onnx = _require("onnx")

    path = Path(path)
    with tempfile.TemporaryDirectory(prefix="onnx-") as tmp:
        prefix = os.path.join(tmp, "net")
        net(mx.nd.zeros((1, 1, size, size)))  # builds the cached graph export() writes
        net.export(prefix)
        raw = os.path.join(tmp, "raw.onnx")
        mx.onnx.export_model(f"{prefix}-symbol.json", f"{prefix}-0000.params",
                             in_shapes=[(1, 1, size, size)], in_types=[np.float32],
                             onnx_file_path=raw, dynamic=True,
                             dynamic_input_shapes=[(None, 1, size, size)])
        model = onnx.load(raw)
    weights = {i.name for i in model.graph.initializer}
    inputs = [i for i in model.graph.input if i.name not in weights]
    del model.graph.input[:]
    model.graph.input.extend(inputs)
    if [i.name for i in model.graph.input] != [INPUT]:
        raise OnnxError(f"the exported graph's inputs are {[i.name for i in inputs]}, "
                         f"expected [{INPUT!r}]")
    model.doc_string = doc
    onnx.checker.check_model(model)
    with atomic_path(path, suffix=".onnx") as tmp_path:
        onnx.save(model, str(tmp_path))
    return path


class _Logits:
    """The array ONNX Runtime returned, with the ``asnumpy()`` an MXNet output has."""

    def __init__(self, array: np.ndarray):
        self.array = array

    def asnumpy(self) -> np.ndarray:
        return self.array


class OnnxNet:
    """An exported model in an ONNX Runtime session, called like the MXNet net it replaces
    (a batch of model inputs in, logits out), so :mod:`pipeline.lib.tta` runs it unchanged."""

    def __init__(self, path: str | os.PathLike, threads: int | None = None):
        ort = _require("onnxruntime")

        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
        options.log_severity_level = 3  # errors only
        self.session = ort.InferenceSession(str(path), sess_options=options,
                                            providers=["CPUExecutionProvider"])
        self.input = self.session.get_inputs()[0].name

    def __call__(self, x: Any) -> _Logits:
        batch = x.asnumpy() if hasattr(x, "asnumpy") else np.asarray(x)
        out = self.session.run(None, {self.input: np.ascontiguousarray(batch,
                                                                       dtype=np.float32)})
        return _Logits(out[0])


def runtime_version() -> str:
    """ONNX Runtime's version, for the decision line and the metrics."""
    return _require("onnxruntime").__version__

"""Throughput and memory of the pipeline on this machine, as JSON lines.

``python -m pipeline.tools.bench`` takes the flags of the PyTorch reference
(``/work/shared/bench/torch_reference.py``: ``--net --act --batch --size --threads --seconds
--bn``) and prints, first, one line with the same fields (``train_img_s``, ``infer_img_s``,
``net``, ``act``, ``batch``, ``size``, ``threads``), so that the two engines compare line by
line when run back to back. ``--what`` adds further lines (``--what all`` = every mode):

* ``train``  one SGD step (forward, backward, Nesterov update), hybridized with
  ``static_alloc``/``static_shape``, initialized and stepped exactly as :mod:`pipeline.train`
  does; a fixed random batch, so the data path is not measured here.
* ``infer``  forward only of the net as :mod:`pipeline.predict` runs it (RReLU's deterministic
  graph, hybridized, in ``--infer-precision``: predict's default ``auto``).
* ``int8``   inference variants: the RReLU net switched to its deterministic inference graph
  (:func:`nets.activations.set_deterministic`), that graph fused by oneDNN
  (``optimize_for(backend='MKLDNN')``, not used by predict), and INT8 quantized as predict's
  default ``tta.int8`` path does (``quantize_net_v2`` with the default calibration mode and
  layers kept in fp32, calibrated on synthetic training records); speed ratios and the logit
  error against fp32.
* ``tta``    100-fold TTA through :func:`pipeline.lib.tta.predict_batches` (warps + net +
  averaging), in views/s, for every inference variant built in this run.
* ``data``   record decode + training augmentation (:class:`pipeline.lib.data.BatchLoader` with
  :func:`pipeline.lib.augment.build_train_transform`) in ONE process, i.e. per loader worker,
  against the training step.
* ``ingest`` :func:`pipeline.ingest.ingest` of NDSB-sized synthetic images (24..300 px) on all
  cores, at 64 px and at ``--size``.
* ``cost``   multiply-adds per image (:func:`nets.summary.summarize`) and the GFLOP/s achieved.
* ``auto``   (always, last) the training and inference precision ``auto`` resolves to here, as
  train and predict decide it (:func:`pipeline.lib.precision.choose`): the cached measurement,
  or one made now, with each candidate's images/s.
* ``memory`` peak RSS of training at ``--memory-batch`` and of 100-fold TTA (the real
  :func:`pipeline.lib.tta.predict_split`) over two numbers of test images, each in its own
  subprocess so every peak is separate.

Why a module and not a notebook: the figures in BENCHMARKS.md must be reproducible with one
command, and ratios between engines are only meaningful when measured in the same minute on a
shared machine. Every line carries the MXNet/OpenMP environment variables that were set, so
engine and thread experiments (``MXNET_ENGINE_TYPE=NaiveEngine python -m pipeline.tools.bench``)
describe themselves.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np

from pipeline.lib.runtime import available_cpus, cpu_kind

CLASSES = 121
MODES = ("train", "infer", "int8", "tta", "data", "ingest", "cost", "memory")
DEFAULT_WHAT = "train,infer"
TABLE_SIZES = {"ndsb_net2": 144}  # the thesis' input side where it is not 128
HYBRIDIZE = {
    "static": {"static_alloc": True, "static_shape": True},
    "alloc": {"static_alloc": True},                           # pipeline.train, predict
    "plain": {},
    "none": None,
}
# A training step counted as three forward passes: the forward, and a backward that computes
# gradients for both the inputs and the weights (the usual FLOP accounting convention).
TRAIN_FLOP_FACTOR = 3
ENV_PREFIXES = ("MXNET_", "OMP_", "KMP_", "DNNL_", "MKLDNN_")
MiB = 2 ** 20


# ------------------------------------------------------------------------------ measuring

def rate(step: Callable[[], int], seconds: float, warmup: int = 2, min_steps: int = 3) -> float:
    """Items per second of ``step`` (which returns the items it processed).

    Same protocol as the PyTorch reference: ``warmup`` untimed calls, then calls until at
    least ``seconds`` have passed and at least ``min_steps`` calls were made.
    """
    for _ in range(warmup):
        step()
    items, calls, start = 0, 0, time.perf_counter()
    while True:
        items += step()
        calls += 1
        elapsed = time.perf_counter() - start
        if elapsed >= seconds and calls >= min_steps:
            return items / elapsed


def env_settings() -> dict[str, str]:
    """The thread / engine / oneDNN variables in effect (they change the figures)."""
    return {k: v for k, v in sorted(os.environ.items()) if k.startswith(ENV_PREFIXES)}


def peak_rss_mib() -> dict[str, float]:
    """Peak resident set, MiB: this process (``VmHWM``) and its finished children (rusage).

    ``VmHWM`` belongs to the address space, so it starts afresh at ``exec``; ``ru_maxrss`` of
    RUSAGE_SELF would not (Linux keeps the parent's high-water mark across fork + exec). The
    children's figure counts pages shared with this process at fork (data loader workers).
    """
    with open("/proc/self/status") as fh:
        hwm_kib = next(int(l.split()[1]) for l in fh if l.startswith("VmHWM:"))
    children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return {"peak_rss_mib": round(hwm_kib / 1024, 1),
            "children_peak_rss_mib": round(children / 1024, 1)}


def random_batch(batch: int, size: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(inputs in [0, 1), labels) like the reference's ``torch.rand`` batch."""
    rng = np.random.default_rng(seed)
    x = rng.random((batch, 1, size, size), dtype=np.float32)
    return x, (np.arange(batch) % CLASSES).astype(np.float32)


# ------------------------------------------------------------------------------ networks

def build_net(name: str, act: str, bn: bool, seed: int = 0, deterministic: bool = False,
              precision: str = "float32", rrelu_impl: str = "auto"):
    """Initialized network as :func:`pipeline.train.build` makes it (not yet hybridized)."""
    import mxnet as mx

    import nets
    from nets.activations import set_deterministic
    from nets.precision import set_precision

    act_kw = {"impl": rrelu_impl} if act == "rrelu" else {}
    net = nets.get_model(name, classes=CLASSES, act=act, bn=bn, in_channels=1, act_kw=act_kw)
    set_precision(net, precision)
    if deterministic:
        set_deterministic(net)
    mx.random.seed(seed)
    net.initialize(nets.default_initializer(act), ctx=mx.cpu())
    return net


def hybridize(net, mode: str):
    if HYBRIDIZE[mode] is not None:
        net.hybridize(**HYBRIDIZE[mode])
    return net


def train_rate(name: str, act: str, bn: bool, batch: int, size: int, seconds: float,
               hybrid: str = "alloc", min_steps: int = 3, precision: str = "float32",
               rrelu_impl: str = "auto") -> float:
    """Training img/s: the training step of :mod:`pipeline.lib.sgd` on one fixed batch."""
    import mxnet as mx

    from pipeline.lib import sgd

    net = hybridize(build_net(name, act, bn, precision=precision, rrelu_impl=rrelu_impl),
                    hybrid)
    trainer = sgd.make_trainer(net, lr=0.01, momentum=0.9, wd=0.0001)
    loss_fn = sgd.loss_function()
    x, y = random_batch(batch, size)
    ctxs = [mx.cpu()]

    def step() -> int:
        loss = sgd.step(net, trainer, loss_fn, x, y, ctxs)
        if not np.isfinite(loss):
            raise RuntimeError(f"benchmark loss became {loss}")
        return len(x)

    return rate(step, seconds, min_steps=min_steps)


def infer_rate(net, batch: int, size: int, seconds: float) -> float:
    """Forward-only img/s (outside ``autograd.record``: inference mode), result on the host."""
    import mxnet as mx

    x = mx.nd.array(random_batch(batch, size)[0])
    return rate(lambda: len(net(x).asnumpy()), seconds)


def copy_params(src, dst, workdir: Path) -> None:
    """Give ``dst`` (same architecture) the parameters of ``src``."""
    path = workdir / "bench-copy.params"
    src.save_parameters(str(path))
    dst.load_parameters(str(path))


def inference_copy(ref, args: argparse.Namespace, precision: str, workdir: Path):
    """``ref``'s weights in the net :mod:`pipeline.predict` runs (not yet hybridized):
    deterministic activations, batch norm folded, ``precision``."""
    import nets

    net = build_net(args.net, args.act, args.bn, deterministic=True)
    copy_params(ref, net, workdir)
    nets.fold_batchnorm(net)
    nets.set_precision(net, precision)
    return net


def fused_net(name: str, act: str, bn: bool, ref, batch: int, size: int, workdir: Path):
    """Deterministic-activation net with ``ref``'s weights, partitioned for oneDNN fusion."""
    import mxnet as mx

    net = build_net(name, act, bn, deterministic=True)
    copy_params(ref, net, workdir)
    x = mx.nd.array(random_batch(batch, size)[0])
    net.optimize_for(x, backend="MKLDNN", static_alloc=True, static_shape=True)
    return net


def logit_error(ref, other, images: np.ndarray) -> dict[str, float]:
    """Relative L2 error of ``other``'s logits against ``ref``'s and top-1 agreement."""
    import mxnet as mx

    x = mx.nd.array(images)
    a, b = ref(x).asnumpy(), other(x).asnumpy()
    return {"logit_rel_err": round(float(np.linalg.norm(a - b) / np.linalg.norm(a)), 4),
            "top1_agree": round(float((a.argmax(1) == b.argmax(1)).mean()), 3)}


def tta_rate(net, images: np.ndarray, n_views: int, tta_batch: int, seconds: float) -> float:
    """Views/s of :func:`pipeline.lib.tta.predict_batches` (warps + net + averaging)."""
    from pipeline.lib.tta import predict_batches, tta_matrices

    size = images.shape[-1]
    matrices = tta_matrices({}, n_views, size, "random", 0)
    batch = images[:tta_batch]

    def step() -> int:
        for probs, _ in predict_batches(net, iter([batch]), matrices, "probs"):
            assert probs.shape == (len(batch), CLASSES)
        return len(batch) * len(matrices)

    return rate(step, seconds, warmup=1, min_steps=2)


# ------------------------------------------------------------------------------ data

def synthetic_folder(root: Path, images: int, test: int = 8, classes: int = 10,
                     seed: int = 0) -> Path:
    """An NDSB-shaped folder of ``images`` training images, 24..300 px (cached in ``root``)."""
    from pipeline.tools.synth import generate

    per_class = max(1, images // classes)
    folder = root / f"synth-{classes}x{per_class}-{test}"
    if not (folder / "sampleSubmission.csv").exists():
        generate(folder, classes=classes, per_class=per_class, test=test, seed=seed,
                 min_size=24, max_size=300)
    return folder


def ingest_records(folder: Path, out: Path, size: int, workers: int, reuse: bool = True
                   ) -> tuple[Path, float, int]:
    """(records dir, seconds, images) of ingesting ``folder`` at ``size``.

    With ``reuse`` an earlier ingest in ``out`` is kept (seconds is then NaN).
    """
    from pipeline.ingest import Settings, ingest
    from pipeline.lib.records import META

    if reuse and (out / META).exists():
        meta = json.loads((out / META).read_text())
        return out, float("nan"), len(meta["train"]) + len(meta["test"])
    start = time.perf_counter()
    with contextlib.redirect_stdout(sys.stderr):  # keep stdout for JSON lines
        meta = ingest(folder, out, Settings(size=size), workers=workers)
    return out, time.perf_counter() - start, len(meta["train"]) + len(meta["test"])


def data_rate(records: Path, size: int, batch: int, seconds: float) -> float:
    """Decode + training augmentation img/s of one loader worker (in this process)."""
    from pipeline.lib.augment import build_train_transform
    from pipeline.lib.ranges import AffineRanges
    from pipeline.lib.data import BatchLoader
    from pipeline.lib.records import RecordReader, load_meta

    meta = load_meta(records)
    reader = RecordReader(records, "train")
    transform = build_train_transform(AffineRanges(), size, background=meta["background"])
    loader = BatchLoader(reader, np.arange(len(reader)), batch, transform, shuffle=True,
                         workers=0, drop_last=True)
    epochs = iter(range(1 << 30))
    batches: Iterator = iter(())

    def step() -> int:
        nonlocal batches
        x = next(batches, None)
        if x is None:
            batches = loader.epoch(next(epochs))
            x = next(batches)
        return len(x[0])

    return rate(step, seconds, warmup=1)


def calibration_images(records: Path, count: int) -> np.ndarray:
    """Model inputs of the first ``count`` training records (no augmentation)."""
    from pipeline.lib.data import to_input
    from pipeline.lib.records import RecordReader

    reader = RecordReader(records, "train")
    count = min(count, len(reader))
    return to_input(np.stack([reader.read(i)[1] for i in range(count)]))


# ------------------------------------------------------------------------------ memory probes

def probe_train(args: argparse.Namespace) -> dict[str, Any]:
    """Peak RSS of a few training steps at ``args.batch`` (run in a fresh process)."""
    img_s = train_rate(args.net, args.act, args.bn, args.batch, args.size, 0.0, min_steps=3,
                       precision=args.precision, rrelu_impl=args.rrelu_impl)
    return {"what": "memory", "kind": "train", "precision": args.precision, "size": args.size,
            "batch": args.batch, "steps": 5,
            "img_s": round(img_s, 2), **peak_rss_mib()}


def probe_tta(args: argparse.Namespace) -> dict[str, Any]:
    """Peak RSS of 100-fold TTA over the first ``args.images`` test records, as predict runs."""
    from pipeline.lib.records import RecordReader
    from pipeline.lib.settings import TTASection
    from pipeline.lib.tta import plan, predict_split

    net = hybridize(build_net(args.net, args.act, args.bn, deterministic=True,
                              precision=args.precision), "alloc")
    reader = RecordReader(args.records, "test")
    n = min(args.images, len(reader))
    tta = TTASection()  # predict's defaults but the views and batch asked for
    views = plan({}, args.tta_views, args.size, tta.method, tta.seed, tta.mean, args.tta_batch,
                 tta.max_views)
    start = time.perf_counter()
    with contextlib.redirect_stdout(sys.stderr):
        probs, _ = predict_split(net, views, reader, np.arange(n), CLASSES, "bench tta")
    seconds = time.perf_counter() - start
    assert probs.shape == (n, CLASSES)
    return {"what": "memory", "kind": "tta", "precision": args.precision, "images": n,
            "views": args.tta_views, "size": args.size,
            "tta_batch": args.tta_batch, "views_s": round(n * args.tta_views / seconds, 1),
            **peak_rss_mib()}


def run_probe(argv: list[str]) -> dict[str, Any]:
    """Run ``python -m pipeline.tools.bench --probe ...`` in a subprocess; return its JSON line."""
    done = subprocess.run([sys.executable, "-m", "pipeline.tools.bench", *argv], check=True,
                          stdout=subprocess.PIPE, text=True, cwd=Path(__file__).parents[1])
    lines = [l for l in done.stdout.splitlines() if l.startswith("{")]
    return json.loads(lines[-1])


# ------------------------------------------------------------------------------ the run

# The precision of each TTA variant's network; "predict" runs in --infer-precision.
VARIANT_PRECISION = {"fused": "float32", "int8": "int8", "bfloat16": "bfloat16",
                     "onnx": "float32"}


def run(args: argparse.Namespace, workdir: Path) -> Iterator[dict[str, Any]]:
    """Yield the JSON records of every mode in ``args.what``."""
    import mxnet as mx

    from nets import native

    what = set(args.what)
    common = {"net": args.net, "act": args.act, "batch": args.batch, "size": args.size,
              "threads": args.threads, "bn": args.bn, "precision": args.precision,
              "amx": args.amx, "cpu": cpu_kind()}
    env = env_settings()
    results: dict[str, Any] = {}

    if what & {"train", "infer", "tta", "int8", "data"}:
        line = {"engine": "mxnet", "version": mx.__version__, **common,
                "hybridize": args.hybridize}
        if "train" in what or "data" in what:
            results["train"] = train_rate(args.net, args.act, args.bn, args.batch, args.size,
                                          args.seconds, args.hybrid_mode,
                                          precision=args.precision, rrelu_impl=args.rrelu_impl)
            line["train_img_s"] = round(results["train"], 2)
            if args.act == "rrelu":
                native_used = args.rrelu_impl != "ops" and native.status()["native_ops"]
                line["rrelu_impl"] = "native" if native_used else "ops"
        # Inference as pipeline.predict runs it: RReLU's deterministic graph, batch norm
        # folded, in the precision of tta.precision (--infer-precision); the int8 line
        # compares every variant to this fp32 net. `plain` (not folded) holds the weights.
        plain = hybridize(build_net(args.net, args.act, args.bn, deterministic=True), "alloc")
        plain(mx.nd.zeros((1, 1, args.size, args.size)))  # every shape known: all BN fold
        predict32 = hybridize(inference_copy(plain, args, "float32", workdir), "alloc")
        if "infer" in what:
            served = predict32
            if args.infer_precision != "float32":
                served = hybridize(inference_copy(plain, args, "bfloat16", workdir), "alloc")
            results["infer"] = infer_rate(served, args.batch, args.size, args.seconds)
            line["infer_img_s"] = round(results["infer"], 2)
            line["infer_precision"] = args.infer_precision
            if served is predict32:
                results["infer32"] = results["infer"]
        if "int8" in what and "infer32" not in results:
            results["infer32"] = infer_rate(predict32, args.batch, args.size, args.seconds)
        yield dict(line, env=env)

    variants = {"predict": predict32} if what & {"tta", "int8"} else {}
    records = None
    if what & {"int8", "data", "ingest"}:
        folder = synthetic_folder(workdir, args.ingest_images)
        for size in sorted({64, args.size}) if "ingest" in what else [args.size]:
            out, seconds, n = ingest_records(folder, workdir / f"records-{size}", size,
                                             args.threads, reuse="ingest" not in what)
            if size == args.size:
                records = out
            if "ingest" in what:
                yield {"what": "ingest", "size": size, "images": n, "workers": args.threads,
                       "source_px": [24, 300], "img_s": round(n / seconds, 1),
                       "seconds": round(seconds, 2)}

    if "int8" in what:
        det = hybridize(build_net(args.net, args.act, args.bn, deterministic=True), "static")
        copy_params(plain, det, workdir)
        det_rate = infer_rate(det, args.batch, args.size, args.seconds)
        fused = fused_net(args.net, args.act, args.bn, plain, args.batch, args.size, workdir)
        fused_rate = infer_rate(fused, args.batch, args.size, args.seconds)
        calib = calibration_images(records, args.calib_images)
        from pipeline.lib.quantize import DEFAULT_CALIB_MODE, DEFAULT_KEEP_FP32, quantize

        # predict's default INT8 net (tta.calib_mode, tta.int8_keep_fp32 defaults), quantized
        # from predict's fp32 net as predict does
        quantized = quantize(predict32, calib, DEFAULT_CALIB_MODE, DEFAULT_KEEP_FP32)
        quantized.hybridize(static_alloc=True, static_shape=True)
        int8_rate = infer_rate(quantized, args.batch, args.size, args.seconds)
        variants.update(fused=fused, int8=quantized)
        bf16 = None
        from pipeline.lib.precision import native_bfloat16

        if native_bfloat16():  # tta.precision: auto on this CPU
            bf16 = hybridize(inference_copy(plain, args, "bfloat16", workdir), "static")
            bf16_rate = infer_rate(bf16, args.batch, args.size, args.seconds)
            variants["bfloat16"] = bf16
        # classify --runtime onnx: predict's fp32 net exported by MXNet's ONNX exporter, in
        # ONNX Runtime with the same threads, timed right after the MXNet paths
        from pipeline.lib.onnxmodel import OnnxNet, export_onnx

        onnx_net = OnnxNet(export_onnx(predict32, args.size, workdir / "bench-net.onnx"),
                           args.threads or None)
        onnx_rate = infer_rate(onnx_net, args.batch, args.size, args.seconds)
        variants["onnx"] = onnx_net
        yield {"what": "int8", **common, "precision": "int8",
               # each rate's own precision (the line compares them)
               "precisions": {"infer_img_s": "float32", "deterministic_img_s": "float32",
                              "fused_img_s": "float32", "int8_img_s": "int8",
                              "onnx_img_s": "float32 (ONNX Runtime)",
                              **({"bf16_img_s": "bfloat16"} if bf16 else {})},
               "calib_mode": DEFAULT_CALIB_MODE,
               "keep_fp32": list(DEFAULT_KEEP_FP32), "calib_images": len(calib),
               "infer_img_s": round(results["infer32"], 2),
               "deterministic_img_s": round(det_rate, 2),
               "fused_img_s": round(fused_rate, 2), "int8_img_s": round(int8_rate, 2),
               "fused_over_fp32": round(fused_rate / results["infer32"], 2),
               "int8_over_fp32": round(int8_rate / results["infer32"], 2),
               "int8_over_fused": round(int8_rate / fused_rate, 2),
               "fused_vs_fp32": logit_error(plain, fused, calib),
               "int8_vs_fp32": logit_error(plain, quantized, calib),
               "onnx_img_s": round(onnx_rate, 2),
               "onnx_over_fp32": round(onnx_rate / results["infer32"], 2),
               "onnx_over_int8": round(onnx_rate / int8_rate, 2),
               "onnx_vs_fp32": logit_error(plain, onnx_net, calib),
               **({"bf16_img_s": round(bf16_rate, 2),
                   "bf16_over_fp32": round(bf16_rate / results["infer32"], 2),
                   "bf16_vs_fp32": logit_error(plain, bf16, calib)} if bf16 else {}),
               "env": env}

    if "tta" in what:
        images = random_batch(args.tta_batch, args.size, seed=1)[0]
        for variant, net in variants.items():
            views_s = tta_rate(net, images, args.tta_views, args.tta_batch, args.seconds)
            yield {"what": "tta", "variant": variant, **common,
                   "precision": VARIANT_PRECISION.get(variant, args.infer_precision),
                   "views": args.tta_views,
                   "tta_batch": args.tta_batch, "views_s": round(views_s, 1),
                   "img_s": round(views_s / args.tta_views, 3)}

    if "data" in what:
        per_worker = data_rate(records, args.size, args.batch, args.seconds)
        yield {"what": "data", "size": args.size, "batch": args.batch,
               "img_s_per_worker": round(per_worker, 1), "train_img_s": round(results["train"], 2),
               "per_worker_over_train": round(per_worker / results["train"], 1)}

    if "cost" in what:
        from nets.summary import summarize

        summary = summarize(args.net, args.size, classes=CLASSES, act=args.act, bn=args.bn,
                            in_channels=1)
        line = {"what": "cost", **common, "macs": summary["macs"], "params": summary["params"],
                "gflop_per_img": round(2 * summary["macs"] / 1e9, 3)}
        if "train" in results:
            line["train_gflop_s"] = round(TRAIN_FLOP_FACTOR * 2 * summary["macs"]
                                          * results["train"] / 1e9, 1)
        if "infer" in results:  # in the infer line's precision
            line["infer_gflop_s"] = round(2 * summary["macs"] * results["infer"] / 1e9, 1)
        yield line

    if "memory" in what:
        base = ["--net", args.net, "--act", args.act, "--size", str(args.size),
                "--threads", str(args.threads), "--precision", args.precision,
                "--rrelu-impl", args.rrelu_impl] + (["--bn"] if args.bn else [])
        yield run_probe(base + ["--probe", "train", "--batch", str(args.memory_batch)])
        n_max = max(args.tta_images)
        folder = synthetic_folder(workdir, 10, test=n_max)
        tta_records, _, _ = ingest_records(folder, workdir / f"tta-records-{args.size}-{n_max}",
                                           args.size, args.threads)
        for n in args.tta_images:
            yield run_probe(base + ["--probe", "tta", "--records", str(tta_records),
                                    "--images", str(n), "--tta-views", str(args.tta_views),
                                    "--tta-batch", str(args.tta_batch)])


def _csv(kind: Callable[[str], Any]) -> Callable[[str], list]:
    return lambda text: [kind(t) for t in text.split(",") if t]


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--net", default="ndsb_net1")
    p.add_argument("--act", default="rrelu")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--size", type=int, default=0, help="input side; 0 = the table's own")
    p.add_argument("--threads", type=int, default=0, help="OpenMP threads; 0 = all CPUs")
    p.add_argument("--seconds", type=float, default=10.0, help="per measurement")
    p.add_argument("--bn", action="store_true", help="batch norm after every convolution")
    p.add_argument("--what", type=_csv(str), default=_csv(str)(DEFAULT_WHAT),
                   help=f"comma list of {','.join(MODES)} or 'all' (default {DEFAULT_WHAT})")
    p.add_argument("--precision", default="auto", choices=["auto", "float32", "bfloat16"],
                   help="training precision (as train.precision; auto = the faster path measured "
                        "on this machine, cached); pass float32 to compare with the fp32 "
                        "reference")
    p.add_argument("--infer-precision", default="auto",
                   choices=["auto", "float32", "bfloat16"],
                   help="the infer line's precision (as tta.precision, predict's default auto)")
    p.add_argument("--rrelu-impl", default="auto", choices=["auto", "native", "ops"],
                   help="RReLU's random graph: the native fused operator or MXNet operators")
    p.add_argument("--hybridize", dest="hybrid_mode", default="alloc", choices=list(HYBRIDIZE),
                   help="training graph: alloc (as pipeline.train), static, plain, none")
    p.add_argument("--tta-views", type=int, default=100)
    p.add_argument("--tta-batch", type=int, default=2,
                   help="images per TTA forward (x views); predict's is tta.batch_size")
    p.add_argument("--tta-images", type=_csv(int), default=[4, 16],
                   help="memory mode: numbers of test images for the TTA peaks")
    p.add_argument("--memory-batch", type=int, default=64)
    p.add_argument("--calib-images", type=int, default=64)
    p.add_argument("--ingest-images", type=int, default=2000)
    p.add_argument("--workdir", help="keep synthetic data here (default: a temporary folder)")
    p.add_argument("--probe", choices=["train", "tta"], help=argparse.SUPPRESS)
    p.add_argument("--records", help=argparse.SUPPRESS)
    p.add_argument("--images", type=int, default=0, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.what = list(MODES) if args.what == ["all"] else args.what
    unknown = sorted(set(args.what) - set(MODES))
    if unknown:
        p.error(f"unknown --what {unknown}; choose from {','.join(MODES)} or all")
    args.size = args.size or TABLE_SIZES.get(args.net, 128)
    args.threads = args.threads or available_cpus()
    args.hybridize = args.hybrid_mode
    return args


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    # Before mxnet is imported (pipeline.lib.runtime.configure_threads, but --threads wins).
    os.environ["OMP_NUM_THREADS"] = str(args.threads)
    os.environ.setdefault("MXNET_CPU_WORKER_NTHREADS", str(args.threads))
    from pipeline.lib.runtime import enable_amx

    args.amx = enable_amx()
    if args.probe:  # a subprocess of this bench: its precisions are already decided
        probe = probe_train if args.probe == "train" else probe_tta
        print(json.dumps(probe(args)), flush=True)
        return
    decisions = decide_precisions(args)
    with contextlib.ExitStack() as stack:
        workdir = Path(args.workdir) if args.workdir else Path(
            stack.enter_context(tempfile.TemporaryDirectory(prefix="ndsb-bench-")))
        workdir.mkdir(parents=True, exist_ok=True)
        cpu, day = cpu_kind(), time.strftime("%Y-%m-%d", time.gmtime())
        for record in run(args, workdir):
            print(json.dumps(stamp(record, cpu, day)), flush=True)
        for decision in decisions:
            print(json.dumps(stamp({"what": "auto", "kind": decision.kind, "net": args.net,
                                    "act": args.act, "batch": args.batch, "size": args.size,
                                    "precision": decision.precision, **decision.as_dict()},
                                   cpu, day)), flush=True)


def decide_precisions(args: argparse.Namespace) -> list:
    """``--precision`` and ``--infer-precision`` as train and predict decide them
    (:func:`pipeline.lib.precision.choose`): ``auto`` is the decision cached for this machine
    and network shape, measured now if there is none. The decisions are printed (one line
    each) and, at the end, as ``"what": "auto"`` JSON lines."""
    from pipeline.lib.precision import INFERENCE, TRAINING, choose

    kwargs: dict[str, Any] = dict(classes=CLASSES, act=args.act, bn=args.bn, in_channels=1)
    if args.act == "rrelu" and args.rrelu_impl != "auto":
        kwargs["act_kw"] = {"impl": args.rrelu_impl}
    try:
        train = choose(TRAINING, args.precision, args.net, kwargs, args.size, args.batch)
        infer = choose(INFERENCE, args.infer_precision, args.net, kwargs, args.size,
                       args.batch)
    except ValueError as err:
        raise SystemExit(f"bench: {err}") from None
    for decision in (train, infer):
        print(decision.line(), file=sys.stderr, flush=True)
    args.precision, args.infer_precision = train.precision, infer.precision
    return [train, infer]


def stamp(record: dict[str, Any], cpu: str, day: str) -> dict[str, Any]:
    """Every line says which CPU and which precision it ran in, and when, so the figures of
    different machines and sessions can be told apart. Lines without a network (ingest, data
    loading) have precision None."""
    return {**record, "cpu": record.get("cpu", cpu), "precision": record.get("precision"),
            "date": day}


if __name__ == "__main__":
    main()

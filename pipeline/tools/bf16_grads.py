"""Where bfloat16 training departs from float32: per-layer gradient error (a study tool).

``python -m pipeline.tools.bf16_grads [--net tinynet] [--records DIR] [--params FILE]``

The same weights and the same batches go through one forward/backward pass in float32 and
in bfloat16 (:mod:`nets.precision`: bf16 compute, float32 master weights), and every
parameter's gradient, the logits and the batch norm running statistics are compared. As a
yardstick for how sensitive the network itself is, a third pass runs in float32 with only
the *input* rounded to bfloat16: a gradient error of that size comes from the network's
sensitivity to tiny input changes, not from bf16 arithmetic.

One JSON line per parameter: ``rel`` (``|g_bf16 - g_fp32| / |g_fp32|``), ``cos`` (cosine),
``proj`` (the bf16 gradient's component along the fp32 one, relative: below 1 means a
shrunken step) and ``input_rel`` (the yardstick); then one summary line per kind of
parameter. ``--params`` loads trained weights (a ``model.params`` of the train stage; the
net's kwargs must match the records' class count), otherwise the weights are freshly
initialized as the train stage does. ``--noise`` keeps RReLU's training noise, seeded alike
in every pass; by default RReLU runs its deterministic graph, so the passes differ only in
arithmetic.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Sequence

import numpy as np


def bf16_round(a: np.ndarray) -> np.ndarray:
    """``a`` (float32) rounded to the nearest bfloat16 (ties to even), kept as float32."""
    bits = np.ascontiguousarray(a, np.float32).view(np.uint32).astype(np.uint64)
    bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
    return bits.astype(np.uint32).view(np.float32)


def batches_from(records: Path | None, n: int, batch: int, size: int, classes: int, seed: int
                 ) -> tuple[list[tuple[np.ndarray, np.ndarray]], int, int]:
    """``n`` batches (inputs, labels), the image side and the class count: real training
    records (no augmentation) when ``records`` is given, else uniform noise images."""
    if records is None:
        rng = np.random.default_rng(seed)
        return ([(rng.random((batch, 1, size, size), dtype=np.float32),
                  rng.integers(0, classes, batch).astype(np.float32)) for _ in range(n)],
                size, classes)
    from pipeline.lib.data import BatchLoader
    from pipeline.lib.records import RecordReader, load_meta

    meta = load_meta(records)
    reader = RecordReader(records, "train")
    loader = BatchLoader(reader, np.arange(len(reader)), batch, None, shuffle=True, seed=seed,
                         workers=0)
    out = [b for _, b in zip(range(n), loader.epoch(0))]
    return out, meta["size"], len(meta["classes"])


def gradients(net_name: str, kwargs: dict, params: Path, precision: str, batches, noise: bool,
              round_input: bool = False) -> dict[str, np.ndarray]:
    """Every parameter's gradient summed over ``batches``, plus ``logits`` and the running
    statistics after the passes, for one precision."""
    import mxnet as mx
    from mxnet import autograd

    import nets
    from pipeline.lib import sgd

    net = nets.get_model(net_name, **kwargs)
    nets.set_precision(net, precision)
    nets.set_deterministic(net, not noise)
    net.load_parameters(str(params), ctx=mx.cpu())
    net.hybridize(static_alloc=True)
    loss_fn = sgd.loss_function()
    out: dict[str, list[np.ndarray]] = {"logits": []}
    for b, (x, y) in enumerate(batches):
        mx.random.seed(1000 + b)  # the same RReLU noise in every pass
        with autograd.record():
            logits = net(mx.nd.array(bf16_round(x) if round_input else x))
            loss = loss_fn(logits, mx.nd.array(y))
        loss.backward()
        out["logits"].append(logits.asnumpy().ravel())
        for name, p in net.collect_params().items():
            if p.grad_req != "null":
                out.setdefault(name, []).append(p.grad().asnumpy().ravel())
    for name, p in net.collect_params().items():
        if "running" in name:
            out[name] = [p.data().asnumpy().ravel()]
    return {k: np.concatenate(v).astype(np.float64) for k, v in out.items()}


def compare(ref: np.ndarray, other: np.ndarray) -> dict[str, float]:
    norm = float(np.linalg.norm(ref))
    if norm == 0.0:
        return {"rel": 0.0, "cos": 1.0, "proj": 1.0}
    return {"rel": round(float(np.linalg.norm(other - ref)) / norm, 4),
            "cos": round(float(ref @ other) / (norm * float(np.linalg.norm(other)) + 1e-300), 5),
            "proj": round(float(ref @ other) / norm ** 2, 4)}


def kind(name: str) -> str:
    """The parameter's kind: the last part of its name (weight, bias, gamma, running_var...)."""
    tail = name.rsplit("_", 2)
    return "_".join(tail[-2:]) if tail[-2] == "running" else tail[-1]


def run(args: argparse.Namespace) -> list[dict]:
    import tempfile

    import mxnet as mx

    import nets
    from pipeline.lib.runtime import configure_threads

    configure_threads()
    batches, size, classes = batches_from(args.records, args.batches, args.batch, args.size,
                                          args.classes, args.seed)
    kwargs = dict(classes=classes, act="rrelu", bn=True, in_channels=1)
    with tempfile.TemporaryDirectory() as tmp:
        params = args.params
        if params is None:  # fresh weights, initialized as pipeline.train does
            net = nets.get_model(args.net, **kwargs)
            mx.random.seed(args.seed)
            nets.initialize(net, ctx=mx.cpu())
            net(mx.nd.zeros((1, 1, size, size)))
            params = Path(tmp) / "init.params"
            net.save_parameters(str(params))
        fp32 = gradients(args.net, kwargs, params, "float32", batches, args.noise)
        bf16 = gradients(args.net, kwargs, params, "bfloat16", batches, args.noise)
        rounded = gradients(args.net, kwargs, params, "float32", batches, args.noise,
                            round_input=True)
    rows = []
    for name in fp32:
        row = {"param": name, **compare(fp32[name], bf16[name]),
               "input_rel": compare(fp32[name], rounded[name])["rel"]}
        rows.append(row)
    kinds: dict[str, list[dict]] = {}
    for row in rows:
        if row["param"] != "logits":
            kinds.setdefault(kind(row["param"]), []).append(row)
    for k, group in kinds.items():
        rows.append({"kind": k, "params": len(group),
                     **{f"mean_{m}": round(float(np.mean([r[m] for r in group])), 4)
                        for m in ("rel", "cos", "proj", "input_rel")}})
    return rows


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m pipeline.tools.bf16_grads",
                                description=__doc__.split("\n")[0])
    p.add_argument("--net", default="tinynet")
    p.add_argument("--records", type=Path, help="ingested records (default: noise images)")
    p.add_argument("--params", type=Path, help="trained weights (default: fresh init)")
    p.add_argument("--size", type=int, default=48, help="image side without --records")
    p.add_argument("--classes", type=int, default=121, help="classes without --records")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--batches", type=int, default=4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--noise", action="store_true", help="RReLU's training noise (seeded)")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> None:
    for row in run(parse_args(argv)):
        print(json.dumps(row))


if __name__ == "__main__":
    main()

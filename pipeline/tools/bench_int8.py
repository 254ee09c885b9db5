"""Where INT8 loses log loss: fp32 against INT8 variants on trained checkpoints (a benchmark).

``python -m pipeline.tools.bench_int8 --records data/records --checkpoints checkpoints
[--nets ndsb_net1,tinynet] [--folds 0,1,2] [--views 0,10] [--variants naive256,entropy,...]
[--layers] [--flips 5] [--tsv out.tsv]``

For every model ``{checkpoints}/{net}--fold{k}`` (loaded as predict loads it: deterministic
RReLU, float32, hybridized) the fold's validation images are predicted with TTA
(``params.yaml``'s ``tta.ranges``, random views, seed 0; n = 0 is the plain image) by the
fp32 net and by INT8 nets quantized with :func:`pipeline.lib.quantize.quantize`. Each variant
changes one thing against the ``naive256`` reference (naive calibration on 256 TTA views of
the fold's training records, tensor-wise classifier scales, ``auto`` activation types), so
its delta isolates one cause:

* calibration size (``calib64``, ``calib1024``, ``calib_all``: each training record once) and
  calibration draw (``cseed1``, ``cseed2``: other records and warps, same size);
* calibration mode (``entropy``, ``percentile``, ``mean``);
* per-channel classifier weight scales (``channel``);
* activation types (``dtype_int8``, ``dtype_uint8``);
* layers kept in fp32 (``keep_first``, ``keep_cls``, ``keep_both``); ``--layers`` adds, per
  Convolution/FullyConnected layer L, ``-L`` (all but L quantized) and ``+L`` (only L);
* ``proposed``: the defaults :mod:`pipeline.lib.quantize` proposes for predict.

One table: model, variant, n, log loss, delta to fp32, views/s (fp32 and its variants run back
to back in one process, so their speeds compare). ``--flips K`` lists, per variant, the K
validation images whose loss INT8 changed most. Figures only: nothing is asserted.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from pipeline.lib import settings as params_mod
from pipeline.lib import quantize as Q
from pipeline.lib.runs import run_name

# Every variant is the reference's settings with some of them replaced.
REFERENCE: dict[str, Any] = {"calib_images": 256, "calib_mode": "naive", "calib_seed": 0,
                             "int8_keep_fp32": [], "int8_granularity": "tensor-wise",
                             "quantized_dtype": "auto", "exclude": [], "only": None}
VARIANTS: dict[str, dict[str, Any]] = {
    "naive256": {},
    "calib64": {"calib_images": 64},
    "calib1024": {"calib_images": 1024},
    "calib_all": {"calib_images": "all"},
    "cseed1": {"calib_seed": 1},
    "cseed2": {"calib_seed": 2},
    "entropy": {"calib_mode": "entropy"},
    "percentile": {"calib_mode": "percentile"},
    "mean": {"calib_mode": "mean"},
    "channel": {"int8_granularity": "channel-wise"},
    "dtype_int8": {"quantized_dtype": "int8"},
    "dtype_uint8": {"quantized_dtype": "uint8"},
    "keep_first": {"int8_keep_fp32": ["first_conv"]},
    "keep_cls": {"int8_keep_fp32": ["classifier"]},
    "keep_both": {"int8_keep_fp32": ["first_conv", "classifier"]},
    # the proposed defaults (pipeline.lib.quantize.DEFAULT_CALIB_MODE / DEFAULT_KEEP_FP32)
    "proposed": {"calib_mode": Q.DEFAULT_CALIB_MODE, "int8_keep_fp32": list(Q.DEFAULT_KEEP_FP32)},
}
WARM_IMAGES = 8  # untimed images before a timed pass: the static graph is built for them
DEFAULT_VARIANTS = ("naive256", "calib64", "calib1024", "calib_all", "cseed1", "cseed2",
                    "entropy", "percentile", "mean", "channel", "dtype_int8", "dtype_uint8",
                    "keep_first", "keep_cls", "keep_both", "proposed")


def parse_variant(name: str) -> dict[str, Any]:
    """Settings of a named variant; ``name`` may join several with ``+`` (``channel+calib1024``)
    and set keys directly (``calib_images=512``, ``calib_mode=entropy``)."""
    out = dict(REFERENCE)
    for part in name.split("+"):
        if "=" in part:
            key, value = part.split("=", 1)
            if key not in REFERENCE:
                raise SystemExit(f"unknown setting {key!r}; known: {sorted(REFERENCE)}")
            out[key] = int(value) if value.isdigit() else value.split(",") if key in (
                "int8_keep_fp32", "exclude") else value
        elif part in VARIANTS:
            out.update(VARIANTS[part])
        else:
            raise SystemExit(f"unknown variant {part!r}; known: {sorted(VARIANTS)}")
    return out


def load(checkpoints: str, net_name: str, fold: int):
    """The fp32 net as predict runs it, and its spec."""
    import nets
    from pipeline.lib.checkpoint import load_model, run_dir

    net, spec = load_model(run_dir(checkpoints, net_name, fold))
    nets.set_deterministic(net)
    nets.set_precision(net, "float32")
    net.hybridize(static_alloc=True)
    return net, spec


class Model:
    """One trained model, its validation split and cached calibration inputs."""

    def __init__(self, records: Path, checkpoints: str, net_name: str, fold: int,
                 tta_cfg: dict[str, Any]) -> None:
        from pipeline.lib.records import RecordReader, fold_indices, labels, load_meta
        from pipeline.lib.tta import tta_matrices

        meta = load_meta(records)
        self.name = run_name(net_name, fold)
        self.net, self.spec = load(checkpoints, net_name, fold)
        self.reader = RecordReader(records, "train")
        self.train_idx, self.valid_idx = fold_indices(meta, fold)
        self.y = labels(meta)[self.valid_idx]
        self.names = [meta["train"][i]["name"] for i in self.valid_idx]
        self.tta_cfg = tta_cfg
        # The calibration views are warped by the TTA transforms predict would use (tta.n).
        ranges = tta_cfg["ranges"] or self.spec["augment"]
        self.calib_matrices = tta_matrices(ranges, tta_cfg["calib_n"], self.spec["size"],
                                           tta_cfg["method"], tta_cfg["seed"])
        self._calib: dict[tuple[int, int], np.ndarray] = {}

    def calibration(self, count: int | str, seed: int) -> np.ndarray:
        count = len(self.train_idx) if count == "all" else int(count)
        if (count, seed) not in self._calib:
            records, transforms = Q.calibration_plan(self.train_idx, count,
                                                     len(self.calib_matrices), seed)
            self._calib[count, seed] = Q.calibration_inputs(self.reader, records, transforms,
                                                            self.calib_matrices)
        return self._calib[count, seed]

    def predict(self, net, n: int, warm: bool = False) -> tuple[np.ndarray, float]:
        """(validation probabilities, views/s) with n TTA views (0: the plain images).
        ``warm``: predict a few images untimed first, so graph building is not timed."""
        import contextlib

        from pipeline.lib.tta import plan as tta_plan
        from pipeline.lib.tta import predict_split

        stats: dict[str, float] = {}
        with contextlib.redirect_stdout(sys.stderr):
            c = self.tta_cfg
            plan = tta_plan(c["ranges"] or self.spec["augment"], n, self.spec["size"],
                            c["method"], c["seed"], c["mean"], c["batch_size"], c["max_views"])
            classes = len(self.spec["classes"])
            if warm:
                predict_split(net, plan, self.reader, self.valid_idx[:WARM_IMAGES], classes,
                              self.name)
            probs, _ = predict_split(net, plan, self.reader, self.valid_idx, classes,
                                     self.name, stats=stats)
        return probs, stats["views_per_s"]

    def quantize(self, v: dict[str, Any]):
        layers = Q.quantized_layers(self.net)
        exclude = list(v["exclude"])
        if v["only"] is not None:
            exclude += [name for name in layers if name != v["only"]]
        return Q.quantize(self.net, self.calibration(v["calib_images"], v["calib_seed"]),
                          v["calib_mode"], v["int8_keep_fp32"], v["int8_granularity"],
                          v["quantized_dtype"], exclude)


def short(layer: str) -> str:
    """``ndsb_net1_features_conv3_fwd`` -> ``conv3``; ``..._output_dense0_fwd`` -> ``dense0``."""
    parts = layer.split("_")
    return parts[-2] if parts[-1] == "fwd" else layer


def run(model: Model, variants: Sequence[str], views: Sequence[int], layers: bool,
        flips: int) -> list[dict[str, Any]]:
    """Rows (model, variant, n, log loss, delta, views/s) for one model; prints flips."""
    from pipeline.lib.metrics import ndsb_log_loss

    rows: list[dict[str, Any]] = []
    fp32 = {n: model.predict(model.net, n, warm=n == max(views)) for n in views}
    ref = {n: ndsb_log_loss(model.y, p) for n, (p, _) in fp32.items()}
    for n, (probs, speed) in fp32.items():
        rows.append(dict(model=model.name, variant="fp32", n=n, logloss=ref[n], delta=0.0,
                         views_s=speed))
    named = [(name, parse_variant(name)) for name in variants]
    if layers:
        for layer in Q.quantized_layers(model.net):
            named.append((f"-{short(layer)}", dict(REFERENCE, exclude=[layer])))
            named.append((f"+{short(layer)}", dict(REFERENCE, only=layer)))
    for name, v in named:
        t0 = time.perf_counter()
        try:
            qnet = model.quantize(v)
        except Exception as err:  # a variant MXNet rejects is a finding, not a crash
            print(f"{model.name} {name}: quantization failed: {str(err).splitlines()[0]}",
                  file=sys.stderr)
            rows.append(dict(model=model.name, variant=name, n=None, logloss=float("nan"),
                             delta=float("nan"), views_s=float("nan")))
            continue
        seconds = time.perf_counter() - t0
        for n in views:
            probs, speed = model.predict(qnet, n, warm=n == max(views))
            loss = ndsb_log_loss(model.y, probs)
            rows.append(dict(model=model.name, variant=name, n=n, logloss=loss,
                             delta=loss - ref[n], views_s=speed, quantize_s=seconds))
            if flips and n == max(views):
                print_flips(model, name, n, fp32[n][0], probs, flips)
    return rows


def print_flips(model: Model, variant: str, n: int, fp32: np.ndarray, int8: np.ndarray,
                k: int) -> None:
    """The k validation images whose loss the INT8 ``variant`` changed most, and their share
    of the total change: is the loss a few confident images flipping, or spread out?"""
    from pipeline.lib.metrics import sample_losses

    before, after = sample_losses(model.y, fp32), sample_losses(model.y, int8)
    change = after - before
    worst = np.argsort(-np.abs(change))[:k]
    share = change[worst].sum() / max(abs(change.sum()), 1e-12)
    print(f"  flips {model.name} {variant} n={n}: total Δ {change.mean():+.4f}; "
          f"top {k} images carry {share:.0%} of the summed change")
    for i in worst:
        print(f"    {model.names[i]:<28} label {model.y[i]} p(true) "
              f"{np.exp(-before[i]):.3f} -> {np.exp(-after[i]):.3f}  "
              f"loss {before[i]:.3f} -> {after[i]:.3f}  Δ/N {change[i] / len(change):+.4f}")


def print_table(rows: list[dict[str, Any]]) -> None:
    print(f"{'model':<20} {'variant':<26} {'n':>4} {'log loss':>9} {'Δ fp32':>8} {'views/s':>8}")
    for r in rows:
        n = "-" if r["n"] is None else str(r["n"])
        print(f"{r['model']:<20} {r['variant']:<26} {n:>4} {r['logloss']:>9.4f} "
              f"{r['delta']:>+8.4f} {r['views_s']:>8.0f}")


def write_tsv(path: Path, rows: list[dict[str, Any]]) -> None:
    """The rows as a tab-separated table (one column per key any row has)."""
    keys = list(dict.fromkeys(k for r in rows for k in r))
    lines = ["\t".join(keys)] + ["\t".join(str(r.get(k, "")) for k in keys) for r in rows]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


def main(argv: Sequence[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m pipeline.tools.bench_int8",
                                description=__doc__.split("\n")[0])
    p.add_argument("--records", default="data/records")
    p.add_argument("--checkpoints", default="checkpoints")
    p.add_argument("--params", default=params_mod.PARAMS_FILE,
                   help="params.yaml whose tta.ranges the views use")
    p.add_argument("--nets", default="ndsb_net1,tinynet")
    p.add_argument("--folds", default="0,1,2")
    p.add_argument("--views", default="0,10", help="TTA view counts (0 = plain image)")
    p.add_argument("--calib-n", type=int, default=100,
                   help="TTA transforms the calibration views are drawn from (predict: tta.n)")
    p.add_argument("--variants", default=",".join(DEFAULT_VARIANTS))
    p.add_argument("--layers", action="store_true",
                   help="also each Convolution/FullyConnected layer alone in fp32 / in INT8")
    p.add_argument("--flips", type=int, default=0, help="images with the largest loss change")
    p.add_argument("--tsv", help="also write the rows here")
    a = p.parse_args(argv)
    from pipeline.lib.runtime import configure_threads

    configure_threads()
    tta = params_mod.read_file(a.params).get("tta") or {}
    tta_cfg = {"method": "random", "mean": "probs", "seed": 0, "ranges": tta.get("ranges") or {},
               "batch_size": 4, "max_views": 128, "calib_n": a.calib_n}
    variants = [v for v in a.variants.split(",") if v]
    for v in variants:
        parse_variant(v)
    views = [int(n) for n in a.views.split(",")]
    rows: list[dict[str, Any]] = []
    for net_name in a.nets.split(","):
        for fold in (int(k) for k in a.folds.split(",")):
            if not (Path(a.checkpoints) / run_name(net_name, fold) / "model.json").exists():
                print(f"{run_name(net_name, fold)}: no checkpoint in {a.checkpoints}, skipped")
                continue
            model = Model(Path(a.records), a.checkpoints, net_name, fold, tta_cfg)
            rows += run(model, variants, views, a.layers, a.flips)
            print_table([r for r in rows if r["model"] == model.name])
            sys.stdout.flush()
            if a.tsv:
                write_tsv(Path(a.tsv), rows)
    print("\nall models")
    print_table(rows)


if __name__ == "__main__":
    main()

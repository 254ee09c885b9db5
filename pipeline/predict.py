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
:func:`pipeline.lib.views.stratified_unit`), so every prefix of the views is balanced;
``tta.mean`` says how views are averaged and ``tta.n: 0`` predicts the plain images. The
views, their batched forward passes and the averaging are :mod:`pipeline.lib.tta`.

**Long runs** (:mod:`pipeline.lib.chunks`): the images are predicted in chunks of
``tta.chunk_images``, each written atomically under ``tta.work`` as soon as it is done, with a
fingerprint of the checkpoint, the records and the settings. A rerun after ``kill -9``
continues from the intact chunks (changed settings start afresh); the predictions equal an
uninterrupted run's. ``--shard s/K`` computes only a 1/K share of the chunks (a cluster array
job, or K processes on one machine); the plain run (or ``--merge``, which refuses to compute)
then assembles all chunks, naming any shard whose chunks are missing. The work directory is
removed once the predictions are written.

**INT8** (``tta.int8``; :mod:`pipeline.lib.quantize`): the fp32 net is quantized for
CPU/oneDNN, calibrated on ``tta.calib_images`` TTA-warped views of the fold's *training*
records (never its validation images). ``true`` always uses it; ``auto`` (the default) first
compares INT8 with fp32 on the fold's validation images under the first
``tta.int8_guard_views`` views and falls back to the float net (``tta.precision``) when INT8's
log loss is more than ``tta.int8_tolerance`` higher; the metrics record the comparison and the
decision, so the speed and the log-loss cost can be read off the same file.
"""
from __future__ import annotations

import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from pipeline.lib import stage
from pipeline.lib.errors import Stopped
from pipeline.lib.inference import (
    InferenceError, decide_precision, kept_precision, prepare_net)
from pipeline.lib.runs import artifact_name, member_name, run_name, training_round
from pipeline.lib.settings import Paths, TTASection
from pipeline.lib.signals import graceful_stop

INFERENCE = "inference.json"   # the INT8 decision, kept beside the chunks it applies to


# Invalid TTA settings or inputs; the float net and its precision are shared with classify.
PredictError = InferenceError


def inference_decision(net_name: str, fold: int, cfg: TTASection, spec: dict[str, Any],
                       model_dir: Path, records: Path):
    """``tta.precision`` (and, with ``tta.int8: auto``, whether INT8 is fast enough to try)
    for this model on this machine (:func:`pipeline.lib.inference.decide_precision`). A
    prediction being resumed keeps the float precision its chunks were computed in."""
    from pipeline.lib.chunks import ChunkStore
    from pipeline.lib.precision import float_candidates

    kept = None
    if cfg.precision == "auto":
        started = {p: ChunkStore(cfg.work, net_name, fold,
                                 work_settings(net_name, fold, cfg, p, model_dir, records)).dir
                   for p in float_candidates()}
        kept = kept_precision(started)
    return decide_precision(spec, precision=cfg.precision, int8=cfg.int8, n=cfg.n,
                            batch_size=cfg.batch_size, max_views=cfg.max_views,
                            keep_fp32=cfg.int8_keep_fp32, granularity=cfg.int8_granularity,
                            kept=kept)


@dataclass
class Split:
    """One split to predict: its records, the rows (record indices) and their names."""

    name: str
    reader: Any
    indices: np.ndarray
    names: list[str]
    prefixes: list[int]           # TTA curve points stored per chunk (0 = no TTA)
    bounds: list[tuple[int, int]]


def splits(meta: dict[str, Any], records: Path, fold: int, cfg: TTASection) -> list[Split]:
    from pipeline.lib.chunks import chunk_bounds
    from pipeline.lib.records import RecordReader, fold_indices
    from pipeline.lib.tta import tta_curve_points

    _, valid_idx = fold_indices(meta, fold)
    out = []
    if len(valid_idx):
        out.append(Split("valid", RecordReader(records, "train"), valid_idx,
                         [meta["train"][i]["name"] for i in valid_idx],
                         [0] + tta_curve_points(cfg.n), []))
    test = RecordReader(records, "test")
    out.append(Split("test", test, np.arange(len(test)), [r["name"] for r in meta["test"]],
                     [], []))
    for s in out:
        s.bounds = chunk_bounds(len(s.indices), cfg.chunk_images, cfg.batch_size)
    return out


def work_settings(net_name: str, fold: int, cfg: TTASection, precision: str,
                  model_dir: Path, records: Path) -> dict[str, Any]:
    """What the chunks' numbers depend on (their fingerprint): the checkpoint and the records
    by content, the TTA settings, and the float precision as resolved on this machine.

    Not the scratch folder, and not the INT8 keys when INT8 is off (changing them then
    changes nothing, so finished chunks are kept). ``chunk_images`` is in: it sets where the
    chunks begin and end."""
    from pipeline.lib.fsutil import sha256
    from pipeline.lib.records import META

    skip = {"work"} | (set(TTASection.INT8_KEYS) if cfg.int8 is False else set())
    settings = {k: v for k, v in cfg.as_dict().items() if k not in skip}
    settings.update(net=net_name, fold=fold, precision=precision,
                    model=sha256(model_dir / "model.json"), records=sha256(records / META))
    return settings


def inference_net(net_name: str, fold: int, model_dir: Path, spec: dict[str, Any],
                  records: Path, meta: dict[str, Any], cfg: TTASection, plan, precision: str,
                  store, int8_faster: bool | None = None) -> tuple[Any, dict[str, Any]]:
    """The net predict runs and the metrics that describe it.

    ``int8: false``: the float net. ``true``: the INT8 net, calibrated on TTA views of the
    fold's training records only. ``auto``: the INT8 net if, on the fold's validation images
    under the first ``int8_guard_views`` views, its log loss is at most ``int8_tolerance``
    above fp32's; the float net otherwise. The decision is stored beside the chunks, so a
    resumed run or another shard reuses it instead of measuring again.
    """
    from pipeline.lib.checkpoint import load_model
    from pipeline.lib.fsutil import read_json, write_json
    from pipeline.lib.quantize import int8_net
    from pipeline.lib.records import RecordReader, fold_indices, labels
    mode = cfg.int8
    if mode is False:
        return prepare_net(load_model(model_dir)[0], precision), {"int8": False,
                                                                  "int8_used": False}
    decided = store.dir / INFERENCE
    about = read_json(decided) if decided.exists() else None
    if about is not None and not about["int8_used"]:
        return prepare_net(load_model(model_dir)[0], precision), about
    if about is None and mode == "auto" and int8_faster is False:
        about = {"int8": mode, "int8_used": False,
                 "int8_skipped": "INT8 was measured no faster than the float path here"}
        print(f"{run_name(net_name, fold)}: {about['int8_skipped']}: predicting in {precision}")
        write_json(decided, about)
        return prepare_net(load_model(model_dir)[0], precision), about
    train_idx, valid_idx = fold_indices(meta, fold)
    if len(train_idx) == 0:
        raise PredictError(f"tta.int8 needs training records to calibrate on; "
                           f"{run_name(net_name, fold)} has none (set tta.int8: false)")
    fp32 = prepare_net(load_model(model_dir)[0], "float32")
    t0 = time.perf_counter()
    qnet, calib = int8_net(fp32, RecordReader(records, "train"), train_idx, plan.matrices,
                           cfg.calib_images, cfg.calib_mode, cfg.int8_keep_fp32,
                           cfg.int8_granularity, cfg.seed)
    quantize_seconds = round(time.perf_counter() - t0, 2)
    if about is not None:
        return qnet, about
    about = {"int8": mode, "int8_used": True, "int8_calibration": calib,
             "quantize_seconds": quantize_seconds}
    if mode == "auto":
        guard = int8_guard(fp32, qnet, plan, len(spec["classes"]),
                           RecordReader(records, "train"), valid_idx, labels(meta)[valid_idx],
                           min(cfg.int8_guard_views, cfg.n), cfg.int8_tolerance)
        about["int8_guard"] = guard
        if guard["decision"] != "int8":
            print(f"{run_name(net_name, fold)}: {guard['reason']}")
            about["int8_used"] = False
    write_json(decided, about)
    if about["int8_used"]:
        return qnet, about
    return prepare_net(load_model(model_dir)[0], precision), about


def int8_guard(fp32, qnet, plan, classes: int, reader, valid_idx: np.ndarray, y: np.ndarray,
               views: int, tol: float) -> dict[str, Any]:
    """Compare INT8 with fp32 on the validation images under the first ``views`` views of
    ``plan`` (the very views predict uses; 0 = the plain images): log loss of each and the
    decision with its reason."""
    from pipeline.lib.metrics import ndsb_log_loss
    from pipeline.lib.tta import predict_split

    if len(valid_idx) == 0:
        return {"views": views, "images": 0, "decision": "float",
                "reason": "no validation images to check INT8 on: predicting without it"}
    guard = plan.first(views)
    loss = {}
    for name, net in (("fp32", fp32), ("int8", qnet)):
        probs, _ = predict_split(net, guard, reader, valid_idx, classes, f"int8 guard ({name})")
        loss[name] = ndsb_log_loss(y, probs)
    delta = loss["int8"] - loss["fp32"]
    ok = delta <= tol
    reason = (f"INT8 validation log loss {loss['int8']:.4f} is {delta:+.4f} from fp32's "
              f"{loss['fp32']:.4f} (tolerance {tol}, {views} views, {len(y)} images): "
              + ("predicting in INT8" if ok else "INT8 off, predicting in the float net"))
    return {"views": views, "images": int(len(y)), "fp32_logloss": loss["fp32"],
            "int8_logloss": loss["int8"], "delta": round(delta, 6), "tolerance": tol,
            "decision": "int8" if ok else "float", "reason": reason}


def compute_chunks(net, plan, split: Split, todo: list[int], store, desc: str, stop=None
                   ) -> tuple[int, int] | None:
    """Predict the chunks ``todo`` of ``split`` and write each as soon as it is done.

    A chunk stopped part-way (``stop()`` became true) is saved as a partial chunk, completed
    by the next run from where it ended; returns (chunk, rows done) of it, or None."""
    from tqdm import tqdm

    from pipeline.lib.tta import predict_chunks

    parts = {i: store.load(split.name, i, split.bounds[i][0], None, part=True) for i in todo}
    bounds = [(split.bounds[i][0] + (len(parts[i][0]["probs"]) if parts[i] else 0),
               split.bounds[i][1]) for i in todo]
    bar = tqdm(total=sum(b - a for a, b in bounds), unit="img", desc=desc, mininterval=2)
    chunks = predict_chunks(net, plan, split.reader, split.indices, bounds, split.prefixes,
                            bar.update, stop)
    stopped = None
    for i, (probs, curve, seconds) in zip(todo, chunks):
        start, end = split.bounds[i]
        arrays = {"probs": probs, **{f"curve{n}": c for n, c in curve.items()}}
        info = {"seconds": round(seconds, 4), "views": len(probs) * plan.views}
        if parts[i]:  # the rows an earlier, stopped run saved come first
            before, was = parts[i]
            arrays = {k: np.concatenate([before[k], a]) for k, a in arrays.items()}
            info = {k: info[k] + was[k] for k in info}
        rows = len(arrays["probs"])
        if rows < end - start:
            store.save(split.name, i, start, start + rows, arrays, info, part=True)
            stopped = (i, rows)
            break
        store.save(split.name, i, start, end, arrays, info)
        store.path(split.name, i, part=True).unlink(missing_ok=True)
    bar.close()
    return stopped


def assemble(split: Split, store) -> tuple[np.ndarray, dict[int, np.ndarray], dict[str, float]]:
    """The split's probabilities, curve and speed, from its chunks (all must be intact)."""
    from pipeline.lib.chunks import ChunkError

    probs, curve, seconds, views = [], {n: [] for n in split.prefixes}, 0.0, 0
    for i, (start, stop) in enumerate(split.bounds):
        chunk = store.load(split.name, i, start, stop)
        if chunk is None:
            raise ChunkError(f"{split.name} chunk {i} vanished or was corrupt while merging; "
                             "run predict again to recompute it")
        arrays, info = chunk
        probs.append(arrays["probs"])
        for n in split.prefixes:
            curve[n].append(arrays[f"curve{n}"])
        seconds += info["seconds"]
        views += info["views"]
    speed = {"seconds": round(seconds, 2), "views_per_s": round(views / max(seconds, 1e-9), 1)}
    return (np.concatenate(probs), {n: np.concatenate(c) for n, c in curve.items()}, speed)


def predict(net_name: str, fold: int, cfg: TTASection, paths: Paths,
            shard: tuple[int, int] = (0, 1), merge_only: bool = False) -> dict[str, Any]:
    """Write the valid and test predictions of one trained model; return validation metrics.

    The validation images have labels, so their log loss is measured without TTA and with the
    first n of the T views (n = 1, 2, 5, 10, ..., T): the effect of TTA, per model, every run.
    With ``shard=(s, K)``, K > 1, only that shard's chunks are computed and nothing else is
    written; ``merge_only`` computes nothing and fails if any chunk is missing. The model
    comes from ``paths.checkpoints``, the predictions go to its training round's folder
    (``paths.models(round)``).
    """
    from pipeline.lib.checkpoint import load_spec, run_dir
    from pipeline.lib.chunks import (
        ChunkError, ChunkStore, describe_difference, missing_report, shard_chunks)
    from pipeline.lib.fsutil import read_json, sweep_stale, write_json
    from pipeline.lib.metrics import accuracy, ndsb_log_loss
    from pipeline.lib.predictions import save_predictions
    from pipeline.lib.records import labels, load_meta
    from pipeline.lib.tta import plan as tta_plan

    records, metrics_dir = Path(paths.records), Path(paths.metrics)
    predictions = paths.models(training_round(net_name))
    meta = load_meta(records)
    model_dir = run_dir(paths.checkpoints, net_name, fold)
    spec = load_spec(model_dir)  # the net is loaded only if there are chunks to compute
    name = run_name(net_name, fold)
    if spec["classes"] != meta["classes"] or spec["size"] != meta["size"]:
        raise PredictError(f"{name} was trained on other records "
                           "(classes or size differ from meta.json); retrain it")
    decision = inference_decision(net_name, fold, cfg, spec, model_dir, records)
    precision = decision.precision
    print(f"{name}: {decision.line()}")
    plan = tta_plan(cfg.ranges or spec["augment"], cfg.n, spec["size"], cfg.method, cfg.seed,
                    cfg.mean, cfg.batch_size, cfg.max_views)
    store = ChunkStore(cfg.work, net_name, fold,
                       work_settings(net_name, fold, cfg, precision, model_dir, records))
    s, k = shard
    parts = splits(meta, records, fold, cfg)
    with store.lock(s, k):
        sweep_stale(f"predict {name}", store.model_dir, recursive=True)
        sweep_stale(f"predict {name}", predictions, metrics_dir)
        if k == 1 and not merge_only:
            removed = store.remove_others()
            if removed:
                print(f"{name}: settings changed: removed {removed} chunks of earlier settings")
        mine = {p.name: list(range(len(p.bounds))) if k == 1 else
                list(shard_chunks(len(p.bounds), s, k)) for p in parts}
        todo = {p.name: [i for i in mine[p.name]
                         if store.load(p.name, i, *p.bounds[i]) is None] for p in parts}
        done = sum(len(v) for v in mine.values()) - sum(len(v) for v in todo.values())
        if merge_only and any(todo.values()):
            others = store.others()
            hint = "".join(f"; chunks of other settings exist ({fp}: "
                           f"{describe_difference(store.settings, theirs)})"
                           for fp, theirs in others)
            missing = missing_report(todo, {p.name: len(p.bounds) for p in parts},
                                     store.shards())
            raise ChunkError(f"{name}: {missing}{hint}; run the missing shards, or predict "
                             "without --merge")
        if done:
            print(f"{name}: resuming: {done} of {sum(len(v) for v in mine.values())} chunks "
                  "already done")
        about = None
        if any(todo.values()):
            net, about = inference_net(net_name, fold, model_dir, spec, records, meta, cfg,
                                       plan, precision, store, decision.int8_faster)
            with graceful_stop(f"predict {name}") as stop:
                for p in parts:
                    stopped = todo[p.name] and compute_chunks(
                        net, plan, p, todo[p.name], store, f"{p.name} {name}", stop)
                    if stop():
                        where = (f"chunk {stopped[0]} of {p.name} saved after {stopped[1]} "
                                 "images" if stopped else
                                 f"stopped between {p.name} chunks, the finished ones kept")
                        raise Stopped(f"{name}: {signal.Signals(stop()).name}: {where}; "
                                      f"the work so far is in {store.dir}; rerun the same "
                                      "command to resume", stop())
        elif cfg.int8 is not False and (store.dir / INFERENCE).exists():
            about = read_json(store.dir / INFERENCE)
        if k > 1:
            print(f"{name}: shard {s}/{k} done ({sum(len(v) for v in mine.values())} chunks); "
                  "merge with `python -m pipeline.predict --net ... --fold ... --merge` "
                  "(or dvc repro) once every shard is done")
            return {"shard": f"{s}/{k}", "chunks": sum(len(v) for v in mine.values()),
                    "computed": sum(len(v) for v in todo.values())}
        if about is None:
            about = {"int8": cfg.int8, "int8_used": False}
        metrics: dict[str, Any] = {"net": net_name, "fold": fold, "tta_n": cfg.n,
                                   "tta_mean": cfg.mean, "tta_method": cfg.method,
                                   "precision": "int8" if about["int8_used"] else precision,
                                   "precision_decision": decision.as_dict()}
        metrics.update(about)
        metrics["chunks"] = {"total": sum(len(p.bounds) for p in parts), "resumed": done}
        for p in parts:
            probs, curve, speed = assemble(p, store)
            save_predictions(predictions, p.name, net_name, fold, probs, p.names)
            if p.name == "valid":
                y = labels(meta)[p.indices]
                metrics.update(valid_images=len(y), valid_logloss=ndsb_log_loss(y, probs),
                               valid_accuracy=accuracy(y, probs),
                               valid_logloss_no_tta=ndsb_log_loss(y, curve[0]),
                               valid_logloss_by_n={str(n): ndsb_log_loss(y, c)
                                                   for n, c in curve.items() if n > 0},
                               valid_views_per_s=speed["views_per_s"])
            else:
                metrics.update(test_images=len(probs), test_views_per_s=speed["views_per_s"])
        write_json(Path(metrics_dir) / f"{artifact_name('predict', net_name, fold)}.json",
                   metrics)
    store.remove()
    return metrics


def _arguments(parser) -> None:
    parser.add_argument("--net", required=True, help="a net, or NET-pl for its second round")
    parser.add_argument("--fold", type=int, required=True)
    parser.add_argument("--seed", type=int,
                        help="the model trained with this seed of the models grid (NET-seedS)")
    parser.add_argument("--shard", metavar="S/K",
                        help="compute only shard S of K (0 <= S < K) and stop; e.g. "
                             "$SLURM_ARRAY_TASK_ID/8")
    parser.add_argument("--merge", action="store_true",
                        help="compute nothing: assemble the shards' chunks, fail if any is "
                             "missing")


def _run(cfg, args) -> str | None:
    from pipeline.lib.chunks import parse_shard

    shard = parse_shard(args.shard) if args.shard else (0, 1)
    if args.merge and shard[1] > 1:
        raise PredictError("--merge assembles all shards: use it without --shard")
    if args.seed is not None and args.seed < 0:
        raise PredictError(f"--seed must be >= 0, got {args.seed}")
    metrics = predict(member_name(args.net, args.seed), args.fold, cfg.tta, cfg.paths, shard,
                      args.merge)
    if "valid_logloss" not in metrics:
        return None
    curve = ", ".join(f"n={n} {v:.4f}" for n, v in metrics["valid_logloss_by_n"].items())
    return f"valid log loss: no TTA {metrics['valid_logloss_no_tta']:.4f}, {curve}"


def main(argv: Sequence[str] | None = None) -> None:
    stage.run("predict", ("tta", "paths"), _run, argv, doc=__doc__, arguments=_arguments,
              threads=True)


if __name__ == "__main__":
    main()

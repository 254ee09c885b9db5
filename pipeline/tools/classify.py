"""Classify new images with a model bundle: ``python -m pipeline.classify BUNDLE INPUT... --out FILE``.

BUNDLE is a bundle folder or its ``.tar`` (the bundle stage, :mod:`pipeline.lib.bundle`); it
is verified before any image is read. INPUT is any number of folders (searched recursively),
EcoTaxa tables (``.tsv`` with ``img_file_name``), ``.zip`` archives (EcoTaxa exports, or
plain archives of images), lists of image paths, or image files (:mod:`pipeline.lib.inputs`).
Every image goes through the bundle's preprocessing, every model's TTA and the ensemble's
blend and calibration (:mod:`pipeline.lib.classifier`, the same code predict runs); the
outputs (:mod:`pipeline.lib.classified`) are FILE (top-3 probabilities, the thresholded
class; ``--all-probs``: every class's probability), ``ecotaxa_NAME.tsv`` beside it (an
EcoTaxa import table), ``NAME.summary.csv`` (counts per class with and without the
thresholds) and ``NAME.unreadable.csv`` (each image that could not be read, and why: such
an image never stops the run).

**Any number of images.** The images are listed once into a file and classified in chunks
of ``--chunk-images``; memory holds one chunk, whatever the number of images. Each chunk is
written to the work folder (``--work``, default ``FILE.work``) as soon as it is done, with a
fingerprint of the bundle, the listing and the settings (:mod:`pipeline.lib.chunks`, as
predict does): after ``kill -9``, the same command continues from the finished chunks and
writes the same outputs an uninterrupted run would. ``--shard S/K`` classifies only a 1/K
share of the chunks (a cluster array job, or K processes here); the plain command (or
``--merge``, which refuses to compute) then writes the outputs from all of them. A progress
bar shows images/s and the time left. The work folder is removed once the outputs are
written.

**Precision.** Each model's precision is decided as predict decides it
(:func:`pipeline.lib.classifier.run_decisions`), and its decision line printed: the
bundle's ``tta.precision`` (``auto``: measured on this machine, cached), and INT8 where
predict's guard chose it for that model (quantized again from the calibration data in the
bundle) unless, with ``tta.int8: auto``, INT8 measured no faster here. A resumed run keeps
the precisions its chunks were computed in. ``--no-int8`` runs every model in the float path.
``--runtime onnx`` runs every model's float32 ``model.onnx`` (MXNet's own ONNX export, in the
bundle) in ONNX Runtime instead (:mod:`pipeline.lib.onnxmodel`); the TTA views and the blend
are the same code.
"""
from __future__ import annotations

import os
import signal
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from pipeline.lib import stage
from pipeline.lib.errors import PipelineError, Stopped

SPLIT = "images"           # the one split of classify's chunk store
STORE = "classify"         # the chunk store's folder under the work folder
LISTING = "images.jsonl"   # the listing, kept beside the chunks it indexes


class ClassifyError(PipelineError, ValueError):
    """Invalid classify options."""


def _sweep_listings(work: Path) -> None:
    """Remove listings left by runs that were killed before storing theirs."""
    for path in work.glob(".listing.*.jsonl"):
        try:
            pid = int(path.name.split(".")[2])
            os.kill(pid, 0)
        except (ValueError, IndexError, ProcessLookupError):
            path.unlink(missing_ok=True)
        except PermissionError:  # alive, another user's
            pass


def resumed_runs(work: Path, base: dict[str, Any]) -> dict[str, str] | None:
    """What each model ran in (``runs``) in the chunk store of the same bundle, inputs and
    chunks that holds the most finished chunks, or None: a resumed run keeps its models'
    precisions whatever a new ``auto`` measurement would say, as predict does."""
    from pipeline.lib.fsutil import read_json

    best, most = None, 0
    for settings in sorted((work / STORE).glob("*/settings.json")):
        try:
            theirs = read_json(settings)
        except (OSError, ValueError):
            continue
        done = sum(1 for _ in settings.parent.glob(f"{SPLIT}-*.npz"))
        if {k: theirs.get(k) for k in base} == base and isinstance(theirs.get("runs"), dict) \
                and done > most:
            best, most = theirs["runs"], done
    return best


def classify(bundle_path: str | os.PathLike, inputs: Sequence[str], out: str | os.PathLike,
             shard: tuple[int, int] = (0, 1), merge_only: bool = False,
             all_probs: bool = False, work: str | os.PathLike | None = None,
             chunk_images: int = 256, int8: bool = True, runtime: str = "mxnet"
             ) -> dict[str, Any]:
    """Classify ``inputs`` with the bundle at ``bundle_path`` into the outputs of ``out``
    (module docstring); return what was done. With ``shard=(s, K)``, K > 1, only that
    shard's chunks are computed and no output is written."""
    from pipeline.lib.bundle import open_bundle
    from pipeline.lib.chunks import (ChunkError, ChunkStore, chunk_bounds, describe_difference,
                                     missing_report, shard_chunks)
    from pipeline.lib.classified import OutputPaths, Writers
    from pipeline.lib.classifier import run_decisions
    from pipeline.lib.ecotaxa import close_archives
    from pipeline.lib.inputs import Listing, write_listing

    from pipeline.lib.classifier import RUNTIMES

    if runtime not in RUNTIMES:
        raise ClassifyError(f"--runtime must be one of {RUNTIMES}, got {runtime!r}")
    if chunk_images < 1:
        raise ClassifyError(f"--chunk-images must be >= 1, got {chunk_images}")
    outputs = OutputPaths.of(out)
    work = Path(work) if work is not None else outputs.csv.with_name(outputs.csv.name + ".work")
    t0 = time.perf_counter()
    with open_bundle(bundle_path) as bundle:
        work.mkdir(parents=True, exist_ok=True)
        _sweep_listings(work)
        listed = work / f".listing.{os.getpid()}.jsonl"
        try:
            n, digest = write_listing(inputs, listed, outputs.ecotaxa.parent.resolve())
            bounds = chunk_bounds(n, chunk_images, bundle.tta["batch_size"])
            base = {"bundle": bundle.id, "listing": digest, "images": n,
                    "chunk_images": chunk_images}
            used = run_decisions(bundle, int8, resumed_runs(work, base), print, runtime)
            store = ChunkStore(work, "", 0, {**base, "runs": used}, name=STORE)
            s, k = shard
            with store.lock(s, k):
                if (store.dir / LISTING).exists():
                    listed.unlink()
                else:
                    os.replace(listed, store.dir / LISTING)
                if k == 1 and not merge_only:
                    removed = store.remove_others()
                    if removed:
                        print(f"classify: inputs or settings changed: removed {removed} chunks "
                              "of the earlier ones")
                listing = Listing(store.dir / LISTING, bounds)
                mine = list(range(len(bounds)) if k == 1 else
                            shard_chunks(len(bounds), s, k))
                todo = [i for i in mine if store.load(SPLIT, i, *bounds[i]) is None]
                if merge_only and todo:
                    hint = "".join(f"; chunks of other inputs or settings exist ({fp}: "
                                   f"{describe_difference(store.settings, theirs)})"
                                   for fp, theirs in store.others())
                    raise ChunkError(f"classify: {missing_report({SPLIT: todo}, {SPLIT: len(bounds)}, store.shards())}{hint}; "
                                     "run the missing shards, or classify without --merge")
                if len(mine) > len(todo):
                    print(f"classify: resuming: {len(mine) - len(todo)} of {len(mine)} chunks "
                          "already done")
                if todo:
                    compute(bundle, used, listing, todo, store)
                if k > 1:
                    print(f"classify: shard {s}/{k} done ({len(mine)} chunks); write the outputs "
                          "with the same command without --shard (or with --merge) once every "
                          "shard is done")
                    return {"shard": f"{s}/{k}", "chunks": len(mine), "computed": len(todo)}
                with Writers(outputs, bundle.classes, bundle.thresholds(), all_probs) as w:
                    for i, (a, b) in enumerate(bounds):
                        chunk = store.load(SPLIT, i, a, b)
                        if chunk is None:
                            raise ChunkError(f"chunk {i} vanished or was corrupt while "
                                             "writing the outputs; run classify again to "
                                             "recompute it")
                        arrays, _ = chunk
                        w.add(listing.chunk(i), arrays["probs"], list(arrays["error"]))
        finally:
            listed.unlink(missing_ok=True)
            close_archives()
        store.remove()
    summary = w.summary()
    return {"images": n, "read": n - w.unreadable, "unreadable": w.unreadable,
            "unclassified": w.unclassified, "outputs": [str(p) for p in outputs.all()],
            "counts": {row[0]: row[2] for row in summary[1:len(bundle.classes) + 1]},
            "seconds": round(time.perf_counter() - t0, 1)}


def compute(bundle, used: dict[str, str], listing, todo: list[int], store) -> None:
    """Classify the chunks ``todo`` and save each as soon as it is done; a stop request ends
    the run after the chunk in progress is dropped (the saved ones are kept)."""
    from tqdm import tqdm

    from pipeline.lib.classifier import Classifier
    from pipeline.lib.inputs import load_images
    from pipeline.lib.signals import graceful_stop

    classifier = Classifier(bundle, used)
    total = sum(listing.bounds[i][1] - listing.bounds[i][0] for i in todo)
    bar = tqdm(total=total, unit="img", desc="classify", mininterval=2, dynamic_ncols=True)
    shown = [0.0, 0]  # images done (fractional: model by model), images shown

    def progress(share: float) -> None:
        shown[0] += share
        step = int(shown[0] + 1e-6) - shown[1]
        if step > 0:
            bar.update(step)
            shown[1] += step

    try:
        with graceful_stop("classify") as stop:
            for done, i in enumerate(todo):
                a, b = listing.bounds[i]
                entries = listing.chunk(i)
                t0 = time.perf_counter()
                images, reasons = load_images(entries, bundle.preprocessing)
                probs = classifier.predict(images, progress, stop)
                if probs is not None:
                    store.save(SPLIT, i, a, b, {"probs": probs.astype(np.float32),
                                                "error": np.array(reasons, dtype=str)},
                               {"seconds": round(time.perf_counter() - t0, 4),
                                "unreadable": sum(1 for r in reasons if r)})
                if stop():
                    where = (f"{done + (probs is not None)} of {len(todo)} chunks saved, the "
                             "chunk in progress dropped")
                    raise Stopped(f"{signal.Signals(stop()).name}: {where}; the work so far "
                                  f"is in {store.dir}; rerun the same command to resume",
                                  stop())
    finally:
        bar.close()


def _arguments(parser) -> None:
    parser.add_argument("bundle", help="a bundle folder or its .tar (dvc repro bundle)")
    parser.add_argument("inputs", nargs="+", metavar="INPUT",
                        help="folders (recursive), EcoTaxa tables (.tsv) or archives (.zip), "
                             "lists of image paths, image files")
    parser.add_argument("--out", required=True, metavar="FILE",
                        help="the CSV to write; ecotaxa_NAME.tsv, NAME.summary.csv and "
                             "NAME.unreadable.csv go beside it")
    parser.add_argument("--all-probs", action="store_true",
                        help="one column per class with its calibrated probability")
    parser.add_argument("--shard", metavar="S/K",
                        help="classify only shard S of K (0 <= S < K) and stop")
    parser.add_argument("--merge", action="store_true",
                        help="compute nothing: write the outputs from the shards' chunks, "
                             "fail if any is missing")
    parser.add_argument("--work", metavar="DIR",
                        help="folder of the resumable chunks (default: FILE.work)")
    parser.add_argument("--chunk-images", type=int, default=256, metavar="N",
                        help="images per resumable chunk (default 256); memory holds one")
    parser.add_argument("--no-int8", action="store_true",
                        help="run every model in the float path, also those predict ran "
                             "in INT8")
    parser.add_argument("--runtime", choices=("mxnet", "onnx"), default="mxnet",
                        help="mxnet (default): each model as predict ran it; onnx: each "
                             "model's float32 model.onnx in ONNX Runtime")


def _run(cfg, args) -> str:
    from pipeline.lib.chunks import parse_shard

    shard = parse_shard(args.shard) if args.shard else (0, 1)
    if args.merge and shard[1] > 1:
        raise ClassifyError("--merge writes the outputs of all shards: use it without "
                            "--shard")
    done = classify(args.bundle, args.inputs, args.out, shard, args.merge, args.all_probs,
                    args.work, args.chunk_images, not args.no_int8, args.runtime)
    if "shard" in done:
        return None
    return (f"classify: {done['images']} images ({done['unreadable']} unreadable) in "
            f"{done['seconds']} s; {done['unclassified']} below their class's threshold "
            f"(unclassified); wrote {', '.join(done['outputs'])}")


def main(argv: Sequence[str] | None = None) -> None:
    stage.run("classify", (), _run, argv, doc=__doc__, arguments=_arguments, threads=True,
              params_optional=True)


if __name__ == "__main__":
    main()

"""How many TTA views each view design needs (a benchmark, not a test).

``python -m pipeline.tools.tta_designs --records R --checkpoints C [--nets A B] [--folds 0 1]
[--n 100] [--designs random,halton,stratified] [--random-seeds 3] [--ranges tta|train]``

For every trained model ``C/{net}--fold{k}`` it predicts the fold's validation images under the
first ``--n`` views of each design (:data:`pipeline.lib.views.METHODS`), prepared the way
the predict stage prepares the net (deterministic RReLU graph, float32, hybridized). Each view's
logits are computed once; the log loss of the average over the first n views (probabilities,
predict's default ``tta.mean``) then costs nothing more for every n = 1..N.

The reference is ``random`` at n = N averaged over ``--random-seeds`` draws (seeds 0, 1, ...;
one random draw is noisy). The other designs are drawn with ``--design-seeds`` seeds (default
1: seed 0, what predict uses with ``tta.seed: 0``). For every model and design the table gives
the log loss at n = 1, 2, 5, 10, 20, 50, N (means over the design's seeds), and the fewest
views from which the mean curve stays within ``--tolerance`` of the reference (``fewest``) and
the same for the worst single seed (``worst``); ``-`` means never within N views.

Ranges: ``tta.ranges`` of ``--params`` (the project default; empty means the training ranges)
unless ``--ranges train`` (the training ranges stored in each checkpoint).
"""
from __future__ import annotations

import argparse
import re
import sys
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from pipeline.lib import settings as params_mod
from pipeline.lib.metrics import clip_normalize

POINTS = (1, 2, 5, 10, 20, 50, 100)


def discover(checkpoints: Path) -> list[tuple[str, int]]:
    """Every ``(net, fold)`` with a finished model under ``checkpoints``, sorted."""
    found = []
    for d in sorted(Path(checkpoints).glob("*--fold*")):
        m = re.fullmatch(r"(.+)--fold(-?\d+)", d.name)
        if m and any(d.glob("model*")):
            found.append((m.group(1), int(m.group(2))))
    return found


def prefix_losses(probs: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Per-image ``-log p(true class)`` of the mean of the first n views, shape (B, T).

    ``probs`` (B, T, K) are per-view probabilities; every prefix mean is scored as the
    competition scores (clip, renormalize: :func:`pipeline.lib.metrics.clip_normalize`).
    """
    b, t, k = probs.shape
    means = np.cumsum(probs, axis=1) / np.arange(1, t + 1)[None, :, None]
    p = clip_normalize(means.reshape(b * t, k)).reshape(b, t, k)
    return -np.log(p[np.arange(b), :, y])


def view_losses(net, reader, indices: np.ndarray, y: np.ndarray, matrices: np.ndarray,
                batch_size: int, max_views: int) -> np.ndarray:
    """(N_images, T): loss of each image under the mean of its first n views, n = 1..T."""
    import mxnet as mx

    from pipeline.lib.augment import tta_batch
    from pipeline.lib.data import BatchLoader
    from pipeline.lib.tta import _log_softmax

    t = len(matrices)
    out = np.zeros((len(indices), t))
    row = 0
    with BatchLoader(reader, indices, batch_size, workers=0) as loader:
        for x, _ in loader.epoch(0):
            views = tta_batch(mx.nd.array(x), matrices)
            logits = np.concatenate([net(views[i:i + max_views]).asnumpy()
                                     for i in range(0, views.shape[0], max_views)])
            probs = np.exp(_log_softmax(logits.astype(np.float64).reshape(len(x), t, -1)))
            out[row:row + len(x)] = prefix_losses(probs, y[row:row + len(x)])
            row += len(x)
    return out


def fewest_within(curve: np.ndarray, target: float, tolerance: float) -> int | None:
    """Smallest n (1-based) from which ``curve`` stays within ``tolerance`` of ``target``."""
    ok = curve <= target + tolerance
    if not ok[-1]:
        return None
    bad = np.flatnonzero(~ok)
    return int(bad[-1]) + 2 if len(bad) else 1


def prepare(directory: Path):
    """The trained net as predict runs it, and its spec."""
    import nets
    from pipeline.lib.checkpoint import load_model

    net, spec = load_model(directory)
    nets.set_deterministic(net)
    nets.set_precision(net, "float32")
    net.hybridize(static_alloc=True)
    return net, spec


def evaluate_model(directory: Path, records: Path, fold: int, designs: Sequence[str],
                   seeds: dict[str, int], n: int, ranges: dict[str, Any] | None,
                   batch_size: int, max_views: int, max_images: int | None
                   ) -> dict[str, Any]:
    """Curves (seed x n) of every design for one model, plus the plain (no TTA) loss."""
    from pipeline.lib.records import RecordReader, fold_indices, labels, load_meta
    from pipeline.lib.tta import tta_matrices

    meta = load_meta(records)
    net, spec = prepare(directory)
    _, valid_idx = fold_indices(meta, fold)
    if max_images and len(valid_idx) > max_images:
        pick = np.sort(np.random.default_rng(0).choice(len(valid_idx), max_images,
                                                       replace=False))
        valid_idx = valid_idx[pick]
    y = labels(meta)[valid_idx]
    reader = RecordReader(records, "train")
    view_ranges = ranges or spec["augment"]
    identity = np.array([[[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]]])
    plain = view_losses(net, reader, valid_idx, y, identity, batch_size, max_views)[:, 0]
    curves: dict[str, np.ndarray] = {}
    started = time.perf_counter()
    for design in designs:
        rows = []
        for seed in range(seeds[design]):
            matrices = tta_matrices(view_ranges, n, spec["size"], design, seed)
            rows.append(view_losses(net, reader, valid_idx, y, matrices, batch_size,
                                    max_views).mean(axis=0))
        curves[design] = np.array(rows)
    seconds = time.perf_counter() - started
    views = len(valid_idx) * n * sum(seeds[d] for d in designs)
    return {"images": len(valid_idx), "plain": float(plain.mean()), "curves": curves,
            "views_per_s": views / max(seconds, 1e-9)}


def table(results: dict[str, dict[str, Any]], n: int, tolerance: float) -> list[str]:
    """The printed table: one line per model and design."""
    points = [p for p in POINTS if p < n] + [n]
    head = (f"{'model':<22} {'design':<10} {'seeds':>5} "
            + " ".join(f"{'n=' + str(p):>7}" for p in points)
            + f" {'fewest':>6} {'worst':>5}")
    lines = [head, "-" * len(head)]
    for model, r in results.items():
        target = r["curves"]["random"][:, -1].mean() if "random" in r["curves"] else None
        lines.append(f"{model:<22} {'no TTA':<10} {'':>5} {r['plain']:>7.4f}"
                     f"   ({r['images']} images; reference random n={n} = "
                     + (f"{target:.4f})" if target is not None else "n/a)"))
        for design, curves in r["curves"].items():
            mean = curves.mean(axis=0)
            cells = " ".join(f"{mean[p - 1]:>7.4f}" for p in points)
            if target is None:
                fewest = worst = "n/a"
            else:
                best = fewest_within(mean, target, tolerance)
                each = [fewest_within(c, target, tolerance) for c in curves]
                fewest = "-" if best is None else str(best)
                worst = "-" if None in each else str(max(each))
            lines.append(f"{model:<22} {design:<10} {len(curves):>5} {cells} "
                         f"{fewest:>6} {worst:>5}")
    return lines


def main(argv: Sequence[str] | None = None) -> None:
    from pipeline.lib.views import METHODS
    from pipeline.lib.checkpoint import run_dir
    from pipeline.lib.runtime import configure_threads

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--records", type=Path, required=True)
    parser.add_argument("--checkpoints", type=Path, required=True)
    parser.add_argument("--nets", nargs="*", help="default: every net under --checkpoints")
    parser.add_argument("--folds", nargs="*", type=int, help="default: every fold found")
    parser.add_argument("--n", type=int, default=100, help="views per design (the maximum)")
    parser.add_argument("--designs", default="random,halton,stratified")
    parser.add_argument("--random-seeds", type=int, default=3,
                        help="draws of the random design; their mean at n is the reference")
    parser.add_argument("--design-seeds", type=int, default=1,
                        help="draws of every other design (seeds 0, 1, ...)")
    parser.add_argument("--ranges", choices=("tta", "train"), default="tta")
    parser.add_argument("--params", default=params_mod.PARAMS_FILE)
    parser.add_argument("--tolerance", type=float, default=0.005)
    parser.add_argument("--batch-size", type=int, default=4, help="images warped together")
    parser.add_argument("--max-views", type=int, default=128, help="views per forward pass")
    parser.add_argument("--max-images", type=int, default=None,
                        help="score a fixed random subset of each fold's validation images")
    args = parser.parse_args(argv)
    designs = [d.strip() for d in args.designs.split(",") if d.strip()]
    unknown = [d for d in designs if d not in METHODS]
    if unknown or args.n < 1:
        parser.error(f"--designs must be among {METHODS} (got {unknown}); --n must be >= 1")
    configure_threads()
    ranges = None
    if args.ranges == "tta":
        ranges = (params_mod.read_file(args.params).get("tta") or {}).get("ranges") or None
    models = [(net, fold) for net, fold in discover(args.checkpoints)
              if (not args.nets or net in args.nets) and (not args.folds or fold in args.folds)]
    if not models:
        sys.exit(f"tta_designs: no trained model under {args.checkpoints} matches")
    seeds = {d: args.random_seeds if d == "random" else args.design_seeds for d in designs}
    results = {}
    for net, fold in models:
        name = f"{net}--fold{fold}"
        r = evaluate_model(run_dir(args.checkpoints, net, fold), args.records, fold, designs,
                           seeds, args.n, ranges, args.batch_size, args.max_views,
                           args.max_images)
        print(f"{name}: {r['images']} images, {r['views_per_s']:.0f} views/s", flush=True)
        results[name] = r
    print(f"\nvalidation log loss by number of views; ranges: {args.ranges}; fewest = views "
          f"from which the mean curve stays within {args.tolerance} of random n={args.n} "
          f"(mean of {args.random_seeds} seeds); worst = the same for the worst single seed")
    print("\n".join(table(results, args.n, args.tolerance)))


if __name__ == "__main__":
    main()

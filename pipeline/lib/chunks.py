"""Long predictions in chunks: resumable after ``kill -9``, spread over shards, merged safely.

Full-size TTA (130,400 test images x 100 views per model) runs for hours on a CPU, so predict
works in *chunks*: consecutive runs of ``chunk_images`` images of one split, each written
atomically to its own file as soon as it is done. A rerun with the same settings skips every
intact chunk; a ``kill -9`` loses at most the chunk in progress.

**Store.** The chunks of one model live in ``{work}/{net}--fold{k}/{fingerprint}/``. The
fingerprint hashes everything a chunk's numbers depend on (checkpoint, records, TTA settings,
the precision actually used, chunk and batch size), so changed settings never mix with old
chunks: they get their own directory, and the old one is removed by the next full run.
``settings.json`` beside the chunks says what the fingerprint stands for, so a run that finds
chunks of other settings can name the difference (e.g. shards on machines that resolved
``precision: auto`` differently).

**Chunks.** ``{split}-{i:05d}.npz`` holds the rows ``[start, stop)`` of the split's image
list, the arrays (probabilities, and for the validation split the TTA curve), the wall time
and the views computed, the fingerprint, and a sha256 digest of all of that. A chunk is used
only if it opens, its digest matches and its fingerprint and bounds are the expected ones;
otherwise it is reported, deleted and computed again: a corrupt chunk is never merged.
Chunk bounds are multiples of the batch size, so a chunked, resumed or sharded run feeds the
network exactly the batches an uninterrupted run does and ends with identical predictions.

**Shards.** ``shard s/K`` (0 <= s < K) takes a contiguous 1/K of every split's chunks
(:func:`shard_chunks`). Shards are independent processes, on one machine or several sharing
the store (or whose stores are copied together); a lock file per shard refuses a second copy
of a running shard. The final (unsharded) run then finds every chunk done and only merges:
:func:`missing_report` names the shards whose chunks are missing.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np

from pipeline.lib.errors import PipelineError
from pipeline.lib.fsutil import (LockHeld, atomic_path, hold_lock, lock_held, read_json,
                                 write_json)
from pipeline.lib.runs import run_name

SETTINGS = "settings.json"


class ChunkError(PipelineError, ValueError):
    """Invalid shard or chunk settings, a shard already running, or chunks missing."""


def fingerprint(settings: dict[str, Any]) -> str:
    """Short hash of the JSON-serialisable ``settings`` (key order does not matter)."""
    blob = json.dumps(settings, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def chunk_bounds(n_images: int, chunk_images: int, batch_size: int) -> list[tuple[int, int]]:
    """``[start, stop)`` of each chunk of a split of ``n_images`` images.

    The chunk length is ``chunk_images`` rounded up to a multiple of ``batch_size``, so no
    batch straddles two chunks (the batches are those of an unchunked run).
    """
    if chunk_images < 1 or batch_size < 1:
        raise ChunkError(f"tta.chunk_images and tta.batch_size must be >= 1, got "
                         f"{chunk_images} and {batch_size}")
    step = -(-chunk_images // batch_size) * batch_size
    return [(a, min(a + step, n_images)) for a in range(0, n_images, step)]


def parse_shard(text: str) -> tuple[int, int]:
    """``"s/K"`` -> ``(s, K)`` with 0 <= s < K (SLURM's ``--array=0-{K-1}`` numbering)."""
    try:
        s, k = (int(part) for part in text.split("/"))
    except ValueError:
        raise ChunkError(f"--shard takes s/K with integers 0 <= s < K (e.g. 0/8), got "
                         f"{text!r}") from None
    if not 0 <= s < k:
        raise ChunkError(f"--shard {text}: shard index must satisfy 0 <= s < K "
                         f"(shards are numbered 0..{max(k, 1) - 1})")
    return s, k


def shard_chunks(n_chunks: int, shard: int, shards: int) -> range:
    """The chunks of shard ``shard`` of ``shards``: a contiguous, balanced slice."""
    return range(n_chunks * shard // shards, n_chunks * (shard + 1) // shards)


def shard_of(chunk: int, n_chunks: int, shards: int) -> int:
    """Which of ``shards`` shards computes ``chunk`` (inverse of :func:`shard_chunks`)."""
    return next(s for s in range(shards) if chunk in shard_chunks(n_chunks, s, shards))


def _write_npz(fh, arrays: dict[str, np.ndarray]) -> None:
    """``np.savez`` with the archive closed inside a ``with``: when a write fails (a full
    disk), ``np.savez`` leaves its ZipFile to the garbage collector, whose second attempt at
    the central directory prints an extra "Exception ignored" traceback after our one line."""
    import zipfile

    with zipfile.ZipFile(fh, mode="w", compression=zipfile.ZIP_STORED, allowZip64=True) as zf:
        for name, value in arrays.items():
            with zf.open(f"{name}.npy", "w", force_zip64=True) as member:
                np.lib.format.write_array(member, np.asanyarray(value), allow_pickle=False)


def _digest(fp: str, split: str, start: int, stop: int, arrays: dict[str, np.ndarray],
            info: dict[str, Any]) -> str:
    h = hashlib.sha256(json.dumps([fp, split, start, stop, info], sort_keys=True).encode())
    for name in sorted(arrays):
        a = np.ascontiguousarray(arrays[name])
        h.update(f"{name}|{a.dtype.str}|{a.shape}".encode())
        h.update(a.tobytes())
    return h.hexdigest()


class ChunkStore:
    """The chunk files of one model's prediction under one fingerprint of its settings."""

    def __init__(self, work: str | os.PathLike, net: str, fold: int,
                 settings: dict[str, Any], name: str | None = None) -> None:
        """``name``: the folder of the store under ``work`` when it is not one model's
        (``{net}--fold{k}``), e.g. classify's."""
        self.settings = settings
        self.fingerprint = fingerprint(settings)
        self.model_dir = Path(work) / (name or run_name(net, fold))
        self.dir = self.model_dir / self.fingerprint

    def open(self) -> None:
        """Create the store and record its settings (idempotent)."""
        self.dir.mkdir(parents=True, exist_ok=True)
        if not (self.dir / SETTINGS).exists():
            write_json(self.dir / SETTINGS, self.settings)

    def others(self) -> list[tuple[str, dict[str, Any]]]:
        """(fingerprint, settings) of stores of this model under other settings."""
        found = []
        if self.model_dir.is_dir():
            for d in sorted(self.model_dir.iterdir()):
                if d.is_dir() and d.name != self.fingerprint:
                    try:
                        found.append((d.name, read_json(d / SETTINGS)))
                    except (OSError, ValueError):
                        found.append((d.name, {}))
        return found

    def remove_others(self) -> int:
        """Delete the stores of other settings that no running shard holds; return how many
        chunk files they held."""
        count = 0
        for fp, _ in self.others():
            d = self.model_dir / fp
            if any(lock_held(lock) for lock in d.glob("shard-*.lock")):
                print(f"note: keeping {d}: a shard with those settings is still running")
                continue
            count += sum(1 for _ in d.glob("*.npz"))
            shutil.rmtree(d, ignore_errors=True)
        return count

    def remove(self) -> None:
        """Delete this model's work directory (after its predictions are written), except
        the store of any settings a running shard still holds: its work is not ours to drop."""
        kept = []
        for d in sorted(p for p in self.model_dir.glob("*") if p.is_dir()):
            if any(lock_held(lock) for lock in d.glob("shard-*.lock")):
                kept.append(d)
                continue
            shutil.rmtree(d, ignore_errors=True)
        for d in kept:
            print(f"note: keeping {d}: a shard with those settings is still running")
        if not kept:
            shutil.rmtree(self.model_dir, ignore_errors=True)
        with contextlib.suppress(OSError):  # the work root too, once no model uses it
            self.model_dir.parent.rmdir()

    def shards(self) -> int | None:
        """K of the newest ``shard s/K`` run (K > 1) seen in this store, if any."""
        locks = [(f.stat().st_mtime, f.name) for f in self.dir.glob("shard-*of*.lock")]
        ks = [int(n.rsplit("of", 1)[1][:-len(".lock")]) for _, n in sorted(locks)]
        ks = [k for k in ks if k > 1]
        return ks[-1] if ks else None

    def path(self, split: str, i: int, part: bool = False) -> Path:
        return self.dir / f"{split}-{i:05d}{'.part' if part else ''}.npz"

    def save(self, split: str, i: int, start: int, stop: int, arrays: dict[str, np.ndarray],
             info: dict[str, Any], part: bool = False) -> None:
        """Atomically write chunk ``i`` of ``split`` (rows ``[start, stop)``); ``part``: the
        first rows of a chunk whose run was stopped, saved to be completed later."""
        arrays = {k: np.ascontiguousarray(v) for k, v in arrays.items()}
        digest = _digest(self.fingerprint, split, start, stop, arrays, info)
        header = json.dumps({"fingerprint": self.fingerprint, "split": split, "start": start,
                             "stop": stop, "info": info, "sha256": digest}, sort_keys=True)
        with atomic_path(self.path(split, i, part), suffix=".npz") as tmp:
            with open(tmp, "wb") as fh:
                _write_npz(fh, {"header": np.array(header), **arrays})

    def load(self, split: str, i: int, start: int, stop: int | None, part: bool = False
             ) -> tuple[dict[str, np.ndarray], dict[str, Any]] | None:
        """(arrays, info) of an intact chunk ``i``; None if it is absent. A chunk that does
        not verify is reported, deleted and reported absent, so it is computed again.
        ``part``: the partial chunk starting at ``start`` (``stop`` = None: any length)."""
        path = self.path(split, i, part)
        if not path.exists():
            return None
        problem = None
        try:
            with np.load(path, allow_pickle=False) as z:
                head = json.loads(str(z["header"]))
                arrays = {k: z[k] for k in z.files if k != "header"}
            stop = head.get("stop") if part and stop is None else stop
            expected = {"fingerprint": self.fingerprint, "split": split, "start": start,
                        "stop": stop}
            if any(head.get(k) != v for k, v in expected.items()):
                problem = "it belongs to other settings or bounds"
            elif _digest(self.fingerprint, split, start, stop, arrays,
                         head["info"]) != head["sha256"]:
                problem = "its sha256 does not match its contents"
            elif any(a.shape[:1] != (stop - start,) for a in arrays.values()):
                problem = "its arrays do not have the chunk's rows"
        except Exception as err:  # noqa: BLE001 - any unreadable chunk is recomputed
            problem = f"it cannot be read ({type(err).__name__}: {err})"
        if problem:
            print(f"warning: chunk {path} is corrupt ({problem}); computing it again")
            path.unlink(missing_ok=True)
            return None
        return arrays, head["info"]

    @contextlib.contextmanager
    def lock(self, shard: int, shards: int) -> Iterator[None]:
        """Hold the lock of ``shard s/K`` (``0/1`` = the whole run) while the block runs; a
        second process asking for the same shard fails at once, naming the holder."""
        self.open()
        what = (f"the work of {self.model_dir.name}" if shards == 1
                else f"shard {shard}/{shards}")
        try:
            # Kept after the run: shards() reads the shard count from the lock files' names.
            with hold_lock(self.dir / f"shard-{shard}of{shards}.lock", what):
                yield
        except LockHeld as err:
            raise ChunkError(str(err)) from None


def missing_report(missing: dict[str, list[int]], n_chunks: dict[str, int],
                   shards: int | None) -> str:
    """One line naming the missing chunks of each split and, if the run was sharded into
    ``shards``, the shards that own them."""
    parts = []
    owners: set[int] = set()
    for split, chunks in missing.items():
        if not chunks:
            continue
        parts.append(f"{split} chunks {_ranges(chunks)} of {n_chunks[split]}")
        if shards:
            owners.update(shard_of(c, n_chunks[split], shards) for c in chunks)
    text = "missing " + ", ".join(parts)
    if shards:
        text += (f" (shard{'s' if len(owners) > 1 else ''} "
                 f"{', '.join(f'{s}/{shards}' for s in sorted(owners))} not finished)")
    return text


def _ranges(values: Sequence[int]) -> str:
    """[0, 1, 2, 5, 7, 8] -> '0-2, 5, 7-8'."""
    out, values = [], sorted(values)
    start = prev = values[0]
    for v in values[1:] + [None]:
        if v is not None and v == prev + 1:
            prev = v
            continue
        out.append(f"{start}" if start == prev else f"{start}-{prev}")
        if v is not None:
            start = prev = v
    return ", ".join(out)


def describe_difference(ours: dict[str, Any], theirs: dict[str, Any]) -> str:
    """The settings that differ between two stores, e.g. ``precision: bfloat16 vs float32``."""
    keys = sorted(set(ours) | set(theirs))
    diff = [f"{k}: {theirs.get(k)!r} vs {ours.get(k)!r}" for k in keys
            if ours.get(k) != theirs.get(k)]
    return "; ".join(diff) or "unknown settings"


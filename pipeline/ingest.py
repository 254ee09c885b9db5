"""Ingest an NDSB-layout folder into MXNet RecordIO: decoded once, read many times.

Input (``data.root``)::

    train/<class>/*     labelled images, one folder per class
    test/*              unlabelled images (names must be unique)
    sampleSubmission.csv (optional) its header fixes the class order of the submission

Hidden files (``.*``) and the files operating systems leave behind (``Thumbs.db``,
``desktop.ini``, ``.DS_Store``, macOS zip resource forks under ``__MACOSX/``) are not images:
they are left out wherever they are, so copying or unzipping the data on another system gives
the same records. The ones left out of ``train/`` and ``test/`` are counted in the summary line.

Output (``data/records/``, see :mod:`pipeline.lib.records`): single-channel images whose longer
side is resized to ``data.size`` keeping the aspect ratio, centred on a square of the
background value (white for NDSB: dark plankton on white), plus ``meta.json`` with the class
order, the original width/height of every image and a stratified K-fold assignment.

Bad input never produces half a data set. Every file is decoded first (in parallel, streaming
into temporary record files); if any is bad, ingest fails with ONE message naming every bad file
and why, and the temporary files are removed. With ``data.skip_bad: true`` bad files are skipped
and listed in ``bad_files.json`` instead. The same input always gives byte-identical records.
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass
from multiprocessing import get_context
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np

from pipeline.lib import stage
from pipeline.lib.errors import PipelineError
from pipeline.lib.fsutil import (OutOfSpaceError, free_bytes, out_of_space,
                                 sweep_stale, temp_prefix, write_json)
from pipeline.lib.images import decode, fit_square, whiten
from pipeline.lib.names import duplicates
from pipeline.lib.records import BAD_FILES, META, META_VERSION, rec_paths
from pipeline.lib.runtime import available_cpus
from pipeline.lib.submission import (IMAGE_COLUMN, SAMPLE_SUBMISSION, SubmissionError,
                                     read_header)


# Files that operating systems write next to the images (lower-cased name -> how the summary
# calls it); they are skipped like dotfiles. Everything under a __MACOSX folder is a macOS zip
# resource fork ("._name"), never an image, and such a folder is never a class.
OS_FILES = {"thumbs.db": "Thumbs.db", "desktop.ini": "desktop.ini", ".ds_store": ".DS_Store"}
MACOS_FORKS = "__MACOSX"
OS_KINDS = (*OS_FILES.values(), f"{MACOS_FORKS}/")  # summary order


class IngestError(PipelineError, ValueError):
    """The input folder cannot be ingested; the message lists every reason."""


@dataclass(frozen=True)
class Item:
    """One image to ingest: where it is, the name it is known by, its label (-1 for test)."""

    path: str
    name: str
    label: int


@dataclass(frozen=True)
class Settings:
    size: int = 64
    background: int = 255
    format: str = "png"
    jpeg_quality: int = 95
    # Scale each image so the median of its border becomes ``background`` before padding.
    # NDSB images are already white around the organism; FlowCam crops (the sample) sit on a
    # grey of ~175, which padding with 255 would frame in white (a shape the net could learn).
    whiten_background: bool = False

    def __post_init__(self) -> None:
        if self.size < 8:
            raise IngestError(f"data.size must be >= 8, got {self.size}")
        if not 0 <= self.background <= 255:
            raise IngestError(f"data.background must be in 0..255, got {self.background}")
        if self.format not in ("png", "jpg"):
            raise IngestError(f"data.format must be 'png' or 'jpg', got {self.format!r}")


# ---------------------------------------------------------------- discovery and class order

def read_sample_header(path: Path) -> list[str]:
    """Class columns of a sample submission, in order; its first column must be ``image``.

    Only the header is read: ingest needs the class order, not the rows. The file may be
    gzipped, carry a UTF-8 byte-order mark or have CRLF line ends (as spreadsheet programs
    save it), see :func:`pipeline.lib.submission.open_text`.
    """
    try:
        header = read_header(path)
    except SubmissionError as exc:
        raise IngestError(str(exc)) from None
    if not header or header[0].strip().lower() != IMAGE_COLUMN:
        raise IngestError(f"{path}: first column must be '{IMAGE_COLUMN}', got {header[:1]}")
    classes = [c.strip() for c in header[1:]]
    dupes = duplicates(classes)
    if dupes:
        raise IngestError(f"{path}: duplicate class columns {dupes}")
    return classes


def class_order(root: Path, folders: Sequence[str]) -> list[str]:
    """Submission order: the sample submission's header when present, else sorted folders."""
    sample = root / SAMPLE_SUBMISSION
    if not sample.exists():
        return sorted(folders)
    classes = read_sample_header(sample)
    missing = sorted(set(classes) - set(folders))
    extra = sorted(set(folders) - set(classes))
    if missing or extra:
        parts = []
        if missing:
            parts.append(f"in {SAMPLE_SUBMISSION} but no train/ folder: {missing}")
        if extra:
            parts.append(f"train/ folders not in {SAMPLE_SUBMISSION}: {extra}")
        raise IngestError(f"class lists disagree ({root}): " + "; ".join(parts))
    return classes


def os_file_kind(relative: Path) -> str | None:
    """The kind of operating-system file ``relative`` (a path below train/ or test/) is, or
    ``None`` for a candidate image: ``Thumbs.db``, ``desktop.ini``, ``.DS_Store`` (any case)
    or ``__MACOSX/`` (anything inside such a folder, at any depth)."""
    if any(part.upper() == MACOS_FORKS for part in relative.parts[:-1]):
        return f"{MACOS_FORKS}/"
    return OS_FILES.get(relative.name.lower())


def _listing(folder: Path, base: Path, ignored: dict[str, int]) -> list[Path]:
    """Every non-folder entry below ``folder`` except dotfiles and operating-system files
    (broken links included: they are reported, not dropped). Operating-system files are
    counted by kind into ``ignored``; their paths are taken relative to ``base``."""
    return sorted(p for p in folder.rglob("*")
                  if not p.is_dir() and not _skipped(p, base, ignored))


def _skipped(path: Path, base: Path, ignored: dict[str, int]) -> bool:
    """Whether file ``path`` is a dotfile or an operating-system file (counted into
    ``ignored`` by kind, its path taken relative to ``base``)."""
    kind = os_file_kind(path.relative_to(base))
    if kind is not None:
        ignored[kind] = ignored.get(kind, 0) + 1
        return True
    return path.name.startswith(".")


def discover(root: str | os.PathLike
             ) -> tuple[list[str], list[Item], list[Item], list[str], dict[str, int]]:
    """Classes, train items, test items, structural problems (missing folders, ...) and the
    number of operating-system files left out, by kind (see :func:`os_file_kind`)."""
    root = Path(root)
    problems: list[str] = []
    train_dir, test_dir = root / "train", root / "test"
    if not root.is_dir():
        raise IngestError(f"data.root {root} is not a folder")
    for folder in (train_dir, test_dir):
        if not folder.is_dir():
            problems.append(f"{folder}: missing folder (expected the NDSB layout train/<class>/*,"
                            " test/*)")
    if problems:
        raise IngestError("\n".join(problems))

    ignored: dict[str, int] = {}
    entries = []
    for p in sorted(train_dir.iterdir()):
        if p.is_dir() and p.name.upper() == MACOS_FORKS:
            _listing(p, train_dir, ignored)  # counted, never a class
        elif not (p.name.startswith(".") if p.is_dir() else _skipped(p, train_dir, ignored)):
            entries.append(p)
    folders = sorted(p.name for p in entries if p.is_dir())
    strays = sorted(p.name for p in entries if p.is_file())
    if strays:
        problems.append(f"{train_dir}: files outside class folders: {strays[:10]}"
                        + (" ..." if len(strays) > 10 else ""))
    if not folders:
        problems.append(f"{train_dir}: no class folders")
    classes = class_order(root, folders)
    index = {c: i for i, c in enumerate(classes)}

    train: list[Item] = []
    for cls in classes:
        files = _listing(train_dir / cls, train_dir, ignored)
        if not files:
            problems.append(f"{train_dir / cls}: empty class folder")
        train += [Item(str(f), f.relative_to(train_dir).as_posix(), index[cls]) for f in files]

    test = [Item(str(f), f.name, -1) for f in _listing(test_dir, test_dir, ignored)]
    if not test:
        problems.append(f"{test_dir}: no images")
    for name in duplicates(i.name for i in test):
        where = [i.path for i in test if i.name == name]
        problems.append(f"duplicate test name {name!r} ({len(where)}x): {where}")
    return classes, train, test, problems, {k: ignored[k] for k in OS_KINDS if k in ignored}


def describe_ignored(ignored: dict[str, int]) -> str:
    """``ignored 3 operating-system files (Thumbs.db, __MACOSX/)``, or ``""`` for none."""
    n = sum(ignored.values())
    if not n:
        return ""
    return f"ignored {n} operating-system file{'s' if n != 1 else ''} ({', '.join(ignored)})"


# ---------------------------------------------------------------- decoding and conversion

def encode_record(index: int, label: int, img: np.ndarray, settings: Settings) -> bytes:
    import mxnet as mx

    header = mx.recordio.IRHeader(flag=0, label=float(label), id=index, id2=0)
    fmt = ".png" if settings.format == "png" else ".jpg"
    # pack_img's quality is the PNG compression level for .png (max 9) or JPEG quality.
    quality = 3 if fmt == ".png" else settings.jpeg_quality
    return mx.recordio.pack_img(header, img, quality=quality, img_fmt=fmt)


def _process(job: tuple[int, Item, Settings]) -> tuple[int, bytes | None, int, int, str]:
    """Worker: (index, record payload or None, width, height, error)."""
    index, item, settings = job
    try:
        gray = decode(item.path, settings.background)
    except ValueError as exc:
        return index, None, 0, 0, str(exc)
    h, w = gray.shape
    if settings.whiten_background:
        gray = whiten(gray, settings.background)
    square = fit_square(gray, settings.size, settings.background)
    return index, encode_record(index, item.label, square, settings), w, h, ""


# ---------------------------------------------------------------- folds

def stratified_folds(labels: Sequence[int], k: int, seed: int) -> np.ndarray:
    """Stratified K-fold assignment that also works for classes smaller than ``k``.

    Each class is shuffled and dealt round-robin; the dealing continues across classes so
    that small classes do not all land in fold 0 and the fold sizes stay within one.
    """
    if k < 2:
        raise IngestError(f"data.folds must be >= 2, got {k}")
    labels = np.asarray(labels)
    rng = np.random.default_rng(seed)
    out = np.empty(len(labels), dtype=np.int64)
    offset = 0
    for cls in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == cls))
        out[members] = (offset + np.arange(len(members))) % k
        offset += len(members)
    return out


# ---------------------------------------------------------------- writing

class _SplitWriter:
    """Writes one split's .rec/.idx under temporary names; ``commit`` renames both."""

    def __init__(self, records_dir: Path, split: str):
        import mxnet as mx

        self.final = rec_paths(records_dir, split)
        self.tmp = tuple(p.with_name(f"{temp_prefix(p)}w") for p in self.final)
        self.writer = mx.recordio.MXIndexedRecordIO(str(self.tmp[1]), str(self.tmp[0]), "w")
        self.count = 0

    def write(self, payload: bytes) -> int:
        self.writer.write_idx(self.count, payload)
        self.count += 1
        return self.count - 1

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None

    def commit(self) -> dict[str, int]:
        self.close()
        for tmp, final in zip(self.tmp, self.final):
            os.replace(tmp, final)
        return {"rec": self.final[0].stat().st_size, "idx": self.final[1].stat().st_size}

    def discard(self) -> None:
        """Remove the temporary files, also after a failed write (a full disk)."""
        try:
            self.close()
        except Exception:  # closing flushes, which fails again on a full disk: files go anyway
            self.writer = None
        for tmp in self.tmp:
            tmp.unlink(missing_ok=True)

    def written(self) -> int:
        return sum(t.stat().st_size for t in self.tmp if t.exists())


def _convert(items: Sequence[Item], settings: Settings, writer: _SplitWriter, workers: int,
             desc: str, skip_bad: bool) -> tuple[list[dict[str, Any]], list[dict[str, str]]]:
    """Decode, resize and write ``items`` in order; return (entries written, bad files).

    Without ``skip_bad`` the first bad file dooms the run: later files are still decoded, so
    the error can list every bad file, but no longer written.
    """
    from tqdm import tqdm

    entries: list[dict[str, Any]] = []
    bad: list[dict[str, str]] = []
    jobs = [(i, item, settings) for i, item in enumerate(items)]
    bar = tqdm(total=len(jobs), desc=desc, unit="img", mininterval=1.0, smoothing=0.1)
    results: Iterable = (_process(job) for job in jobs)
    pool = None
    if workers > 1 and len(jobs) > 64:
        pool = get_context("fork").Pool(workers)
        results = pool.imap(_process, jobs, chunksize=32)  # imap keeps order: determinism
    try:
        for index, payload, w, h, error in results:
            item = items[index]
            bar.update()
            if payload is None:
                bad.append({"path": item.path, "reason": error})
                continue
            if bad and not skip_bad:
                continue
            entry: dict[str, Any] = {"name": item.name, "width": w, "height": h}
            if item.label >= 0:
                entry["label"] = item.label
            # Record ids are positions among the written records (skipped files leave no gap).
            writer.write(_reindex(payload, len(entries)) if len(entries) != index else payload)
            entries.append(entry)
    finally:
        bar.close()
        if pool is not None:
            pool.terminate()
    return entries, bad


def estimate_bytes(items: Sequence[Item], settings: Settings, sample: int = 32
                   ) -> int | None:
    """About how many bytes the records of ``items`` will take, from encoding a sample.

    Encodes up to ``sample`` images spread over the list with the run's settings and scales
    their mean size up, plus a margin for the index and meta.json. None when no sampled
    image decodes (the run will report the bad files itself).
    """
    if not items:
        return None
    picks = np.linspace(0, len(items) - 1, min(sample, len(items))).astype(int)
    sizes = [len(payload) for _, payload, *_ in
             (_process((int(i), items[int(i)], settings)) for i in picks) if payload]
    if not sizes:
        return None
    # + the .idx line and record header, and the image's entry in meta.json
    per_item = float(np.mean(sizes)) + 24 + 160
    return int(per_item * len(items) * 1.1 + 64 * 1024)


def _reindex(payload: bytes, index: int) -> bytes:
    import mxnet as mx

    header, body = mx.recordio.unpack(payload)
    return mx.recordio.pack(header._replace(id=index), body)


def ingest(root: str | os.PathLike, records_dir: str | os.PathLike, settings: Settings,
           folds: int = 3, seed: int = 0, skip_bad: bool = False, workers: int = 0
           ) -> dict[str, Any]:
    """Convert ``root`` (NDSB layout) into ``records_dir``; return the meta dict written."""
    root, records_dir = Path(root), Path(records_dir)
    classes, train, test, problems, ignored = discover(root)
    if problems and not (skip_bad and _only_skippable(problems)):
        raise IngestError(f"cannot ingest {root}:\n  " + "\n  ".join(problems))
    records_dir.mkdir(parents=True, exist_ok=True)
    sweep_stale("ingest", records_dir)
    workers = workers or available_cpus()
    needed = estimate_bytes(train + test, settings)
    if needed is not None and needed > free_bytes(records_dir):
        raise OutOfSpaceError(records_dir, needed)
    started = time.perf_counter()

    writers = {split: _SplitWriter(records_dir, split) for split in ("train", "test")}
    try:
        with out_of_space(records_dir, needed,
                          lambda: sum(w.written() for w in writers.values())):
            train_entries, bad_train = _convert(train, settings, writers["train"], workers,
                                                "train", skip_bad)
            test_entries, bad_test = _convert(test, settings, writers["test"], workers, "test",
                                              skip_bad)
        bad = bad_train + bad_test
        if bad and not skip_bad:
            raise IngestError(_bad_message(bad))
        if not train_entries or not test_entries:
            raise IngestError(f"nothing left to ingest in {root} after skipping bad files")
        fold_of = stratified_folds([e["label"] for e in train_entries], folds, seed)
        for entry, fold in zip(train_entries, fold_of):
            entry["fold"] = int(fold)
        with out_of_space(records_dir, needed):
            files = {split: writer.commit() for split, writer in writers.items()}
    except BaseException:
        for writer in writers.values():
            writer.discard()
        raise

    seconds = time.perf_counter() - started
    n = len(train) + len(test)
    meta = {
        "version": META_VERSION,
        "root": str(root),
        "classes": classes,
        "size": settings.size,
        "background": settings.background,
        "format": settings.format,
        "whiten_background": settings.whiten_background,
        "folds": folds,
        "seed": seed,
        "files": files,
        "train": train_entries,
        "test": test_entries,
    }
    write_json(records_dir / BAD_FILES, {"skipped": bad, "problems": problems})
    write_json(records_dir / META, meta)  # last: its presence means the pair above is whole
    print(f"ingest: {len(train_entries)} train + {len(test_entries)} test images, "
          f"{len(classes)} classes, {len(bad)} skipped, {n / seconds:.0f} img/s "
          f"on {workers} worker(s)" + (f"; {describe_ignored(ignored)}" if ignored else ""))
    return meta


def _only_skippable(problems: list[str]) -> bool:
    """Structural problems that skipping can absorb (an empty class folder)."""
    return all(p.endswith("empty class folder") for p in problems)


def _bad_message(bad: list[dict[str, str]]) -> str:
    lines = [f"{len(bad)} bad file(s); fix or remove them, or set data.skip_bad: true:"]
    lines += [f"  {b['path']}: {b['reason']}" for b in bad]
    return "\n".join(lines)


# ---------------------------------------------------------------- CLI

def _run(cfg, args) -> None:
    d = cfg.data
    settings = Settings(size=d.size, background=d.background, format=d.format,
                        jpeg_quality=d.jpeg_quality, whiten_background=d.whiten_background)
    ingest(d.root, cfg.paths.records, settings, folds=d.folds, seed=d.seed,
           skip_bad=d.skip_bad, workers=d.workers)


def main(argv: Sequence[str] | None = None) -> None:
    stage.run("ingest", ("data", "paths"), _run, argv, doc=__doc__)


if __name__ == "__main__":
    main()

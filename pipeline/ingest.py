"""Ingest an NDSB-layout folder into MXNet RecordIO: decoded once, read many times.

Input (``data.root``)::

    train/<class>/*     labelled images, one folder per class
    test/*              unlabelled images (names must be unique)
    sampleSubmission.csv (optional) its header fixes the class order of the submission

or an EcoTaxa export (a ``.zip``, or a folder holding ``ecotaxa_*.tsv`` files and their
images; see :mod:`pipeline.lib.ecotaxa` and :func:`discover_export`): validated objects train
under their ``object_annotation_category``, the other objects are the test images, each known
by its ``object_id``.

The files operating systems leave behind (``Thumbs.db``, ``desktop.ini``, ``.DS_Store``,
macOS resource forks: ``._*`` files and anything under ``__MACOSX/``) are not images: they are
left out wherever they are, so copying or unzipping the data on another system gives the same
records. So are hidden folders (``.git/``, ...) and hidden files without an image extension
(``.gitkeep``); a hidden file with one (``..000002.jpg``) is an image like any other. Every file
left out of ``train/`` and ``test/`` is counted, by why, in the summary line.

Every name must be able to travel through a submission and the ``.names.txt`` prediction
files (see :func:`pipeline.lib.submission.name_problem`): a file named otherwise is a bad file.
With a ``sampleSubmission.csv``, its rows and the files in ``test/`` must be the same images;
``meta.json`` records its rows (``sample_submission``) so later stages can hold the
submission to them even when bad test files were skipped.

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

import functools
import os
import signal
import time
from collections import Counter
from dataclasses import dataclass, field
from multiprocessing import get_context
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np

from pipeline.lib import ecotaxa, stage
from pipeline.lib.errors import PipelineError
from pipeline.lib.fsutil import (OutOfSpaceError, free_bytes, out_of_space, sha256,
                                 sweep_stale, temp_prefix, write_json)
from pipeline.lib.images import MAX_PIXELS, decode, decode_bytes, fit_square, whiten
from pipeline.lib.names import duplicates, examples
from pipeline.lib.records import BAD_FILES, META, META_VERSION, rec_paths
from pipeline.lib.runtime import available_cpus
from pipeline.lib.submission import (IMAGE_COLUMN, SAMPLE_SUBMISSION, SubmissionError,
                                     name_problem, read_header, read_sample_images)


# Files that operating systems write next to the images (lower-cased name -> how the summary
# calls it); they are left out and counted. Everything under a __MACOSX folder is a macOS zip
# resource fork ("._name"), never an image, and such a folder is never a class.
OS_FILES = {"thumbs.db": "Thumbs.db", "desktop.ini": "desktop.ini", ".ds_store": ".DS_Store"}
MACOS_FORKS = "__MACOSX"
# A macOS resource fork beside its file ("._name", written on volumes without forks) is an
# AppleDouble file: known by its first four bytes, not by its name alone.
APPLE_DOUBLE = "._*"
APPLE_DOUBLE_MAGIC = b"\x00\x05\x16\x07"
OS_KINDS = (*OS_FILES.values(), f"{MACOS_FORKS}/", APPLE_DOUBLE)  # summary order
# Hidden entries that are not images: files in hidden folders, and hidden files without an
# image extension. Counted and named in the summary, never read.
HIDDEN_FOLDER = "hidden folder"
HIDDEN_FILE = "hidden file"


class IngestError(PipelineError, ValueError):
    """The input folder cannot be ingested; the message lists every reason."""


@dataclass(frozen=True)
class Item:
    """One image to ingest: where it is, the name it is known by, its label (-1 for test).

    An image inside an EcoTaxa export also has ``file``, its path inside the export; when
    the export is a zip, ``archive`` is the zip, the image is its member ``file`` and
    ``path`` is only what messages show."""

    path: str
    name: str
    label: int
    file: str = ""
    archive: str = ""


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
    # Images with more pixels are bad files, refused from their header before decoding.
    max_pixels: int = MAX_PIXELS

    def __post_init__(self) -> None:
        if self.size < 8:
            raise IngestError(f"data.size must be >= 8, got {self.size}")
        if not 0 <= self.background <= 255:
            raise IngestError(f"data.background must be in 0..255, got {self.background}")
        if self.format not in ("png", "jpg"):
            raise IngestError(f"data.format must be 'png' or 'jpg', got {self.format!r}")
        if self.max_pixels < 1:
            raise IngestError(f"data.max_pixels must be >= 1, got {self.max_pixels}")


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


def os_file_kind(relative: Path, path: Path | None = None) -> str | None:
    """The kind of operating-system file ``relative`` (a path below train/ or test/) is, or
    ``None`` for a candidate image: ``Thumbs.db``, ``desktop.ini``, ``.DS_Store`` (any case),
    ``__MACOSX/`` (anything inside such a folder, at any depth) or, when ``path`` (the file
    itself) is given, ``._*``: an AppleDouble resource fork."""
    if any(part.upper() == MACOS_FORKS for part in relative.parts[:-1]):
        return f"{MACOS_FORKS}/"
    kind = OS_FILES.get(relative.name.lower())
    if kind is None and relative.name.startswith("._") and path is not None \
            and _starts_with(path, APPLE_DOUBLE_MAGIC):
        kind = APPLE_DOUBLE
    return kind


def hidden_kind(relative: Path) -> str | None:
    """:data:`HIDDEN_FOLDER` for a file below a hidden folder, :data:`HIDDEN_FILE` for a hidden
    file without an image extension (``.gitkeep``), else ``None``: a hidden file named like an
    image (``..000002.jpg``) is a candidate image."""
    if any(part.startswith(".") for part in relative.parts[:-1]):
        return HIDDEN_FOLDER
    if relative.name.startswith(".") and relative.suffix.lower() not in image_extensions():
        return HIDDEN_FILE
    return None


@functools.lru_cache(maxsize=None)
def image_extensions() -> frozenset[str]:
    """File extensions of the formats PIL can open (``.jpg``, ``.png``, ``.tif``, ...)."""
    from PIL import Image

    Image.init()
    return frozenset(ext for ext, fmt in Image.registered_extensions().items()
                     if fmt in Image.OPEN)


def _starts_with(path: Path, magic: bytes) -> bool:
    try:
        with open(path, "rb") as fh:
            return fh.read(len(magic)) == magic
    except OSError:  # unreadable: not a fork we can recognise, so reported as a bad image
        return False


def _listing(folder: Path, base: Path, ignored: dict[str, list[str]]) -> list[Path]:
    """Every non-folder entry below ``folder`` except operating-system files and hidden
    entries that are not images (broken links included: they are reported, not dropped).
    The files left out are noted by kind into ``ignored``; their paths are taken relative to
    ``base``."""
    return sorted(p for p in folder.rglob("*")
                  if not p.is_dir() and not _skipped(p, base, ignored))


def _skipped(path: Path, base: Path, ignored: dict[str, list[str]]) -> bool:
    """Whether file ``path`` is left out (see :func:`os_file_kind`, :func:`hidden_kind`);
    if so it is noted in ``ignored`` under its kind as ``<base name>/<path below base>``, or
    for a hidden folder's content as that folder."""
    relative = path.relative_to(base)
    kind = os_file_kind(relative, path) or hidden_kind(relative)
    if kind is None:
        return False
    where = relative
    if kind == HIDDEN_FOLDER:
        first = next(i for i, part in enumerate(relative.parts) if part.startswith("."))
        where = Path(*relative.parts[:first + 1])
    ignored.setdefault(kind, []).append(f"{base.name}/{where.as_posix()}")
    return True


def class_name_problem(cls: str) -> str | None:
    """Why ``cls`` cannot head a submission column (None if it can)."""
    return "it is the image column's name" if cls == IMAGE_COLUMN else \
        name_problem(cls, image=False)


def discover(root: str | os.PathLike
             ) -> tuple[list[str], list[Item], list[Item], list[str], dict[str, list[str]]]:
    """Classes, train items, test items, structural problems (missing folders, ...) and the
    files left out, by kind (see :func:`_skipped`), in summary order."""
    root = Path(root)
    problems: list[str] = []
    train_dir, test_dir = root / "train", root / "test"
    if not root.is_dir():
        raise IngestError(f"data.root {root} is not a folder" + (
            " (nor a zip file: an EcoTaxa export is a .zip, or a folder holding its "
            "ecotaxa_*.tsv files)" if root.is_file() else ""))
    for folder in (train_dir, test_dir):
        if not folder.is_dir():
            problems.append(f"{folder}: missing folder (expected the NDSB layout train/<class>/*,"
                            " test/*, or an EcoTaxa export: ecotaxa_*.tsv files and their images)")
    if problems:
        raise IngestError("\n".join(problems))

    ignored: dict[str, list[str]] = {}
    entries = []
    for p in sorted(train_dir.iterdir()):
        if p.is_dir() and (p.name.upper() == MACOS_FORKS or p.name.startswith(".")):
            _listing(p, train_dir, ignored)  # counted, never a class
        elif p.is_dir() or not _skipped(p, train_dir, ignored):
            entries.append(p)
    folders = sorted(p.name for p in entries if p.is_dir())
    strays = sorted(p.name for p in entries if p.is_file())
    if strays:
        problems.append(f"{train_dir}: files outside class folders: {strays[:10]}"
                        + (" ..." if len(strays) > 10 else ""))
    if not folders:
        problems.append(f"{train_dir}: no class folders")
    classes = class_order(root, folders)
    for cls in classes:
        if why := class_name_problem(cls):
            problems.append(f"{shown(train_dir / cls)}: a class folder's name heads a submission "
                            f"column, this one cannot ({why}): rename the folder")
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
    order = (*OS_KINDS, HIDDEN_FOLDER, HIDDEN_FILE)
    return classes, train, test, problems, {k: ignored[k] for k in order if k in ignored}


def describe_ignored(ignored: dict[str, list[str]]) -> str:
    """``ignored 3 operating-system files (Thumbs.db, __MACOSX/); ignored 2 files in hidden
    folders ('train/.git'); ignored 1 file hidden and not named like an image
    ('test/.gitkeep')``, or ``""`` for none."""
    parts = []
    kinds = [k for k in OS_KINDS if ignored.get(k)]
    n = sum(len(ignored[k]) for k in kinds)
    if n:
        parts.append(f"ignored {n} operating-system file{'s' if n != 1 else ''} "
                     f"({', '.join(kinds)})")
    folders = ignored.get(HIDDEN_FOLDER, [])
    if folders:
        parts.append(f"ignored {_files(len(folders))} in hidden folders "
                     f"({examples(sorted(set(folders)), 3)})")
    files = ignored.get(HIDDEN_FILE, [])
    if files:
        parts.append(f"ignored {_files(len(files))} hidden and not named like an image "
                     f"({examples(files, 3)})")
    return "; ".join(parts)


def _files(n: int) -> str:
    return f"{n} file{'s' if n != 1 else ''}"


def shown(path: str | os.PathLike) -> str:
    """``path`` for a message: as it is, or quoted with escapes when it holds characters that
    would break the one-line message or not print (a newline, a non-UTF-8 byte)."""
    text = str(path)
    return text if text.isprintable() else repr(text)


def sample_rows(root: Path, test: Sequence[Item], bad_names: Iterable[Item] = ()
                ) -> tuple[dict[str, Any] | None, list[str]]:
    """(``meta.json``'s record of the sample submission, problems): the record is ``None``
    without a ``sampleSubmission.csv``, else its file name and image rows in order (``None``
    when it has only a header). Its rows and the files in ``test/`` must be the same images,
    each once: a sample of another test set, or a test folder missing files (say, dropped by
    a copy), would give a submission of the wrong rows. Files in ``bad_names`` (names no
    submission can carry, reported as bad files) may be missing from the sample."""
    sample = root / SAMPLE_SUBMISSION
    if not sample.exists():
        return None, []
    try:
        images = read_sample_images(sample)
    except SubmissionError as exc:
        return None, [str(exc)]
    record = {"file": SAMPLE_SUBMISSION, "images": images}
    if images is None:
        return record, []
    problems = []
    repeated = duplicates(images)
    if repeated:
        problems.append(f"{sample}: {len(repeated)} image(s) listed more than once "
                        f"[{examples(repeated, 3)}]: use the competition's {SAMPLE_SUBMISSION}")
    names = {item.name for item in test}
    listed = set(images) | {item.name for item in bad_names}
    missing = [n for n in images if n not in names]
    extra = sorted(n for n in names if n not in listed)
    if missing or extra:
        parts = []
        if missing:
            parts.append(f"{len(missing)} image(s) of {SAMPLE_SUBMISSION} missing from test/ "
                         f"[{examples(missing, 3)}]")
        if extra:
            parts.append(f"{len(extra)} file(s) in test/ not in {SAMPLE_SUBMISSION} "
                         f"[{examples(extra, 3)}]")
        problems.append(f"test/ and {SAMPLE_SUBMISSION} of {root} disagree: "
                        + "; ".join(parts) + ": complete test/ (or remove what does not "
                        f"belong), or use the {SAMPLE_SUBMISSION} of this test set")
    return record, problems


# ---------------------------------------------------------------- EcoTaxa exports

@dataclass
class Found:
    """What discovery found in ``data.root``: classes, items, problems (structural: nothing is
    ingested), files left out (by kind), the record of the rows a submission must have, images
    known bad before decoding (item -> reason, skippable) and, for an EcoTaxa export, what
    ``meta.json`` records of it."""

    classes: list[str]
    train: list[Item]
    test: list[Item]
    problems: list[str]
    ignored: dict[str, list[str]]
    sample: dict[str, Any] | None = None
    bad: dict[Item, str] = field(default_factory=dict)
    ecotaxa: dict[str, Any] | None = None


def discover_export(root: Path, folds: int, max_pixels: int | None = None) -> Found:
    """An EcoTaxa export (see :mod:`pipeline.lib.ecotaxa`) as ingest's classes and items.

    Validated objects are the labelled images, under their ``object_annotation_category``
    (the names kept as EcoTaxa spells them; classes sorted); every other object (predicted,
    dubious, discarded, unannotated) is a test image, to classify. Each image is known by its
    ``object_id``, the key EcoTaxa matches an imported row by, so the submission's rows and
    a TSV written from them name the objects; the test rows, in the export's order, are
    recorded as a sample submission's rows are (``sample_submission``). An image missing from
    the export is a bad file (``data.skip_bad`` skips it, and an object to classify skipped so
    is left out of those rows: it stays unclassified in EcoTaxa)."""
    try:
        export = ecotaxa.read_export(root, max_pixels)
    except ecotaxa.EcoTaxaError as exc:
        raise IngestError(str(exc)) from None
    validated = [o for o in export.objects if o.status == ecotaxa.VALIDATED]
    others = [o for o in export.objects if o.status != ecotaxa.VALIDATED]
    statuses = export.statuses()
    shown_statuses = ", ".join(f"{n} {s}" for s, n in statuses.items()) or "no objects"
    if not validated:
        raise IngestError(f"EcoTaxa export {root} has no validated object ({shown_statuses}): "
                          "only validated objects can train a model; validate some in EcoTaxa "
                          "and export again")
    classes = sorted({o.category for o in validated})
    problems = []
    for cls in classes:
        if why := class_name_problem(cls):
            problems.append(f"EcoTaxa category {shown(cls)} of {root} heads a submission column, "
                            f"this one cannot ({why}): rename the category in EcoTaxa")
    if not others:
        problems.append(f"EcoTaxa export {root} has no object to classify ({shown_statuses}): "
                        "the pipeline predicts the objects that are not validated; export the "
                        "project with them too")
    index = {c: i for i, c in enumerate(classes)}

    def item(obj: ecotaxa.EcoObject, label: int) -> Item:
        path, archive, _ = export.location(obj)
        return Item(path, obj.object_id, label, obj.image, archive)

    train = [item(o, index[o.category]) for o in validated]
    test = [item(o, -1) for o in others]
    bad = {i: export.missing[i.name] for i in train + test if i.name in export.missing}
    counts = Counter(o.category for o in validated)
    lineage = {}
    for o in validated:
        lineage.setdefault(o.category, o.hierarchy)
    record = {
        "export": str(root), "tsv": export.tsvs, "statuses": statuses,
        "test": "every object not validated", "hierarchy": lineage,
        "extra_images": export.extra_images,
        "few": {c: counts[c] for c in classes if counts[c] < folds},
    }
    sample = {"file": f"EcoTaxa export {root.name}", "images": [o.object_id for o in others]}
    return Found(classes, train, test, problems, {}, sample, bad, record)


def describe_export(record: dict[str, Any], folds: int) -> str:
    """``EcoTaxa export: 40 validated, 12 predicted; ...`` for the summary line."""
    parts = ["EcoTaxa export: " + ", ".join(f"{n} {s}" for s, n in record["statuses"].items())]
    if record["extra_images"]:
        parts.append(f"{record['extra_images']} more image(s) of objects with several left "
                     "out (the first, lowest img_rank, is used)")
    few = record["few"]
    if few:
        parts.append(f"{len(few)} class(es) with fewer validated objects than data.folds = "
                     f"{folds} ({examples([f'{c} ({n})' for c, n in few.items()], 3)}): some "
                     "folds train without them")
    return "; ".join(parts)


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
        if item.archive:
            gray = decode_bytes(ecotaxa.read_member(item.archive, item.file),
                                settings.background, settings.max_pixels)
        else:
            gray = decode(item.path, settings.background, settings.max_pixels)
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

    def commit(self) -> tuple[dict[str, int], dict[str, str]]:
        """Rename both files into place; return their sizes and sha256 checksums."""
        self.close()
        checksums = {final.name: sha256(tmp) for tmp, final in zip(self.tmp, self.final)}
        for tmp, final in zip(self.tmp, self.final):
            os.replace(tmp, final)
        return ({"rec": self.final[0].stat().st_size, "idx": self.final[1].stat().st_size},
                checksums)

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
        # Workers ignore a terminal's Ctrl-C to the process group: the parent stops them
        # (terminate() below) and reports the stop in one line, not one traceback each.
        # A SIGINT landing while the workers are forked is held back until they are: in the
        # parent it would be lost in an at-fork handler, in a child it would be a traceback.
        held: list[int] = []
        previous = signal.signal(signal.SIGINT, lambda signum, _frame: held.append(signum))
        try:
            pool = get_context("fork").Pool(workers, initializer=_ignore_sigint)
        finally:
            signal.signal(signal.SIGINT, previous)
        if held:
            pool.terminate()
            bar.close()
            raise KeyboardInterrupt
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
            if item.file:
                entry["file"] = item.file
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


def _ignore_sigint() -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)


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
    """Convert ``root`` (NDSB layout or EcoTaxa export) into ``records_dir``; return the meta
    dict written."""
    root, records_dir = Path(root), Path(records_dir)
    if ecotaxa.is_export(root):
        found = discover_export(root, folds, settings.max_pixels)
    else:
        found = Found(*discover(root))
    classes, train, test, problems, ignored = (found.classes, found.train, found.test,
                                               found.problems, found.ignored)
    # Names no submission can carry are bad files, found before anything is decoded.
    bad_names = {item: why for item in train + test
                 if (why := name_problem(item.name, image=item.label < 0))}
    if found.ecotaxa is None:
        sample, sample_problems = sample_rows(root, test, bad_names)
        problems += sample_problems
    else:
        sample = found.sample
    early = {item: why for item, why in found.bad.items() if item not in bad_names}
    if train and folds > len(train):
        problems.append(f"data.folds = {folds} but {root} has {len(train)} labelled images: "
                        "every fold needs validation images; lower data.folds")
    if problems and not (skip_bad and _only_skippable(problems)):
        raise IngestError(f"cannot ingest {root}:\n  " + "\n  ".join(problems))
    train = [item for item in train if item not in bad_names and item not in early]
    test = [item for item in test if item not in bad_names and item not in early]
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
        bad = [{"path": item.path, "reason": f"its name {item.name!r} cannot go into a "
                 f"submission ({why}): rename the file"} for item, why in bad_names.items()]
        bad += [{"path": item.path, "reason": why} for item, why in early.items()]
        bad += bad_train + bad_test
        if bad and not skip_bad:
            raise IngestError(_bad_message(bad))
        if not train_entries or not test_entries:
            raise IngestError(f"nothing left to ingest in {root} after skipping bad files")
        fold_of = stratified_folds([e["label"] for e in train_entries], folds, seed)
        for entry, fold in zip(train_entries, fold_of):
            entry["fold"] = int(fold)
        with out_of_space(records_dir, needed):
            committed = {split: writer.commit() for split, writer in writers.items()}
        files = {split: sizes for split, (sizes, _) in committed.items()}
        checksums = {name: digest for _, sums in committed.values()
                     for name, digest in sums.items()}
    except BaseException:
        for writer in writers.values():
            writer.discard()
        raise
    finally:
        ecotaxa.close_archives()

    seconds = time.perf_counter() - started
    n = len(train) + len(test) + len(bad_names) + len(early)
    skipped_objects: list[str] = []
    if found.ecotaxa is not None:
        # The rows are the objects classified: one skipped as bad (data.skip_bad) stays as it
        # is in EcoTaxa, so the submission leaves it out rather than failing for it.
        written = {e["name"] for e in test_entries}
        skipped_objects = [name for name in sample["images"] if name not in written]
        sample = dict(sample, images=[e["name"] for e in test_entries])
        found.ecotaxa["skipped_to_classify"] = skipped_objects
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
        "sha256": checksums,  # checked when the records are opened (RecordReader)
        "sample_submission": sample,
        # For an EcoTaxa export: its TSVs, the objects by status, each class's lineage
        # (object_annotation_hierarchy), the classes with fewer validated objects than folds.
        "ecotaxa": found.ecotaxa,
        "train": train_entries,
        "test": test_entries,
    }
    write_json(records_dir / BAD_FILES, {"skipped": bad, "problems": problems})
    write_json(records_dir / META, meta)  # last: its presence means the pair above is whole
    unsubmitted = _not_ingested(sample, test_entries)
    print(f"ingest: {len(train_entries)} train + {len(test_entries)} test images, "
          f"{len(classes)} classes, {len(bad)} skipped"
          + (f" (listed in {records_dir / BAD_FILES})" if bad else "")
          + f", {n / seconds:.0f} img/s on {workers} worker(s)"
          + (f"; {describe_ignored(ignored)}" if ignored else "")
          + (f"; {describe_export(found.ecotaxa, folds)}" if found.ecotaxa else "")
          + (f"; {len(skipped_objects)} object(s) to classify skipped as bad "
             f"[{examples(skipped_objects, 3)}]: the submission leaves them out"
             if skipped_objects else "")
          + (f"; {len(unsubmitted)} image(s) of {SAMPLE_SUBMISSION} skipped as bad "
             f"[{examples(unsubmitted, 3)}]: a submission will lack their rows"
             if unsubmitted else ""))
    return meta


def _not_ingested(sample: dict[str, Any] | None, test_entries: list[dict[str, Any]]
                  ) -> list[str]:
    """The sample submission's images that have no test record (bad files skipped)."""
    if not sample or not sample["images"]:
        return []
    names = {e["name"] for e in test_entries}
    return [n for n in sample["images"] if n not in names]


def _only_skippable(problems: list[str]) -> bool:
    """Structural problems that skipping can absorb (an empty class folder)."""
    return all(p.endswith("empty class folder") for p in problems)


def _bad_message(bad: list[dict[str, str]]) -> str:
    fix = "fix or remove them, or set data.skip_bad: true"
    if any("(data.max_pixels)" in b["reason"] for b in bad):
        fix += " (or raise data.max_pixels for images that large)"
    lines = [f"{len(bad)} bad file(s); {fix}:"]
    lines += [f"  {shown(b['path'])}: {b['reason']}" for b in bad]
    return "\n".join(lines)


# ---------------------------------------------------------------- CLI

def _run(cfg, args) -> None:
    d = cfg.data
    settings = Settings(size=d.size, background=d.background, format=d.format,
                        jpeg_quality=d.jpeg_quality, whiten_background=d.whiten_background,
                        max_pixels=d.max_pixels)
    ingest(d.root, cfg.paths.records, settings, folds=d.folds, seed=d.seed,
           skip_bad=d.skip_bad, workers=d.workers)


def main(argv: Sequence[str] | None = None) -> None:
    stage.run("ingest", ("data", "paths"), _run, argv, doc=__doc__)


if __name__ == "__main__":
    main()

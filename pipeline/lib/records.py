"""RecordIO storage of the ingested images, and ``meta.json`` that describes it.

Images are decoded, converted to 8-bit grayscale, resized and padded once by ingest, then
read many times by training and prediction. Layout of ``data/records/``::

    train.rec / train.idx   record i = meta["train"][i]; header.label = class index
    test.rec  / test.idx    record i = meta["test"][i];  header.label = -1
    meta.json               classes (submission order), ingest settings, per-record entries,
                            checksums, the sample submission's rows (``sample_submission``)
    bad_files.json          files ingest skipped (``data.skip_bad``) and why

Each record is an ``mx.recordio.pack_img`` payload (PNG by default: lossless and byte-for-byte
deterministic; JPEG optional). ``meta.json`` is written last and records the byte size and the
sha256 of every ``.rec``/``.idx``, so a reader can tell a stale, foreign or damaged pair from
the one meta describes.

Damage stops a stage in one line naming the file and the fix (rerun ingest) before any image
is used: :func:`load_meta` checks that ``meta.json`` is whole and shaped as ingest writes it,
and :class:`RecordReader` checks its pair when opened (checksums, the index, every record's
header and length); a record that still does not decode is reported by index and name.
"""
from __future__ import annotations

import os
import struct
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np

from pipeline.lib.errors import PipelineError
from pipeline.lib.fsutil import read_json, sha256

SPLITS = ("train", "test")
META = "meta.json"
BAD_FILES = "bad_files.json"
META_VERSION = 1
RERUN = "rerun ingest (dvc repro -f ingest)"
# What ingest writes into meta.json, with its type. A meta.json with a "version" (written by
# ingest) must have all of these; one without (a test's or a tool's) needs "classes" and
# "test", and the others it has must be of these types. "sha256", "sample_submission" and
# "ecotaxa" (what ingest read of an EcoTaxa export) came later: optional, so records ingested
# before still load.
META_KEYS: dict[str, type | tuple[type, ...]] = {
    "version": int, "root": str, "classes": list, "size": int, "background": int,
    "format": str, "whiten_background": bool, "folds": int, "seed": int, "files": dict,
    "train": list, "test": list}
OPTIONAL_KEYS: dict[str, type | tuple[type, ...]] = {
    "sha256": dict, "sample_submission": (dict, type(None)), "ecotaxa": (dict, type(None))}
# RecordIO framing (dmlc-core recordio.h): a record is uint32 magic, uint32 (cflag << 29 |
# length), the data padded to 4 bytes; cflag 0 is a whole record, 1/2/3 the first, middle and
# last part of one split where its data held the magic number. Ingest's data starts with
# mx.recordio's 24-byte image header: uint32 flag, float32 label, uint64 id, uint64 id2.
RECORDIO_MAGIC = 0xCED7230A
IR_SIZE = 24


class RecordsError(PipelineError, RuntimeError):
    """The records directory is missing, incomplete or inconsistent with meta.json."""


def rec_paths(records_dir: str | os.PathLike, split: str) -> tuple[Path, Path]:
    records_dir = Path(records_dir)
    return records_dir / f"{split}.rec", records_dir / f"{split}.idx"


def load_meta(records_dir: str | os.PathLike) -> dict[str, Any]:
    """Read and sanity-check ``meta.json`` against the record files beside it.

    A file that is not JSON (truncated), not shaped as ingest writes it (``[]``, a missing
    key, a label outside the classes) or describing other record files than those beside it
    is a :class:`RecordsError` naming the file and the fix.
    """
    path = Path(records_dir) / META
    if not path.exists():
        raise RecordsError(f"{path} not found: run the ingest stage first (dvc repro ingest)")
    try:
        meta = read_json(path)
    except ValueError as exc:  # JSONDecodeError, UnicodeDecodeError
        raise RecordsError(f"{path}: damaged, not readable as JSON ({exc}): {RERUN}") from None
    problem = meta_problem(meta)
    if problem:
        raise RecordsError(f"{path}: damaged or not written by ingest ({problem}): {RERUN}")
    for split, info in meta.get("files", {}).items():
        for kind, size in info.items():
            file = Path(records_dir) / f"{split}.{kind}"
            if not file.exists() or file.stat().st_size != size:
                raise RecordsError(f"{file} does not match {path} (missing or of another size);"
                                   f" {RERUN}")
    return meta


def meta_problem(meta: Any) -> str | None:
    """What makes ``meta`` (a parsed meta.json) unusable, or None; see :data:`META_KEYS`."""
    if not isinstance(meta, dict):
        return f"a JSON {type(meta).__name__} instead of an object"
    required = META_KEYS if "version" in meta else {k: META_KEYS[k] for k in ("classes", "test")}
    missing = [k for k in required if k not in meta]
    if missing:
        return f"no {', '.join(repr(k) for k in missing)}"
    for key, kind in {**META_KEYS, **OPTIONAL_KEYS}.items():
        value = meta.get(key)
        if key in meta and (not isinstance(value, kind) or isinstance(value, bool)
                            and kind is int):
            return f"{key!r} is a {type(value).__name__}"
    classes = meta["classes"]
    if not classes or not all(isinstance(c, str) for c in classes):
        return "'classes' is not a list of class names"
    folds = meta.get("folds")
    for split, labelled in (("train", True), ("test", False)):
        bad = next((i for i, e in enumerate(meta.get(split, []))
                    if not _entry_ok(e, len(classes) if labelled else None, folds)), None)
        if bad is not None:
            return f"{split} entry {bad} is not a name" + (" with a class and a fold"
                                                            if labelled else "")
    for split, info in meta.get("files", {}).items():
        if not isinstance(info, dict) or not all(type(v) is int for v in info.values()):
            return f"'files' of {split!r} are not byte sizes"
    return None


def _entry_ok(entry: Any, n_classes: int | None, folds: Any) -> bool:
    if not isinstance(entry, dict) or not isinstance(entry.get("name"), str):
        return False
    if n_classes is None:
        return True
    label, fold = entry.get("label"), entry.get("fold")
    return (type(label) is int and 0 <= label < n_classes
            and (type(folds) is not int or type(fold) is int and 0 <= fold < folds))


def labels(meta: dict[str, Any]) -> np.ndarray:
    return np.array([r["label"] for r in meta["train"]], dtype=np.int64)


def folds(meta: dict[str, Any]) -> np.ndarray:
    return np.array([r["fold"] for r in meta["train"]], dtype=np.int64)


def fold_indices(meta: dict[str, Any], fold: int) -> tuple[np.ndarray, np.ndarray]:
    """(train indices, validation indices) of ``fold``; fold < 0 means train on everything."""
    assignment = folds(meta)
    if fold < 0:
        return np.arange(len(assignment)), np.arange(0)
    if fold >= meta["folds"]:
        raise RecordsError(f"fold {fold} out of range: meta.json has {meta['folds']} folds")
    return np.flatnonzero(assignment != fold), np.flatnonzero(assignment == fold)


def unpack(payload: bytes) -> tuple[float, np.ndarray]:
    """(label, HxW uint8 image) of one record payload."""
    import cv2
    import mxnet as mx

    header, encoded = mx.recordio.unpack(payload)
    img = cv2.imdecode(np.frombuffer(encoded, dtype=np.uint8), cv2.IMREAD_GRAYSCALE)
    if img is None:
        raise RecordsError(f"record {header.id} does not decode as an image")
    label = header.label if np.isscalar(header.label) else header.label[0]
    return float(label), img


class RecordReader:
    """Random access to one split's records; re-opens itself after ``fork``/pickling.

    MXNet's reader holds a C file handle that must not be shared across processes, so
    worker processes each open their own (the handle is dropped on pickling).

    Opening checks the pair (see :func:`check_records`), so a damaged file stops a stage
    before its first batch rather than in the middle of an epoch.
    """

    def __init__(self, records_dir: str | os.PathLike, split: str):
        self.rec, self.idx = rec_paths(records_dir, split)
        if not self.rec.exists() or not self.idx.exists():
            raise RecordsError(f"{self.rec} / {self.idx} not found: run ingest first")
        self.split = split
        self._reader = None
        self._pid = None
        self._keys = check_records(records_dir, split)

    def __len__(self) -> int:
        return len(self._keys)

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_reader"] = None
        return state

    def _handle(self):
        if self._reader is None or self._pid != os.getpid():
            import mxnet as mx

            self._reader = mx.recordio.MXIndexedRecordIO(str(self.idx), str(self.rec), "r")
            self._pid = os.getpid()
        return self._reader

    def read(self, i: int) -> tuple[float, np.ndarray]:
        key = self._keys[i]
        try:
            return unpack(self._handle().read_idx(key))
        except Exception as exc:  # MXNet's own error type is only importable with mxnet
            if not isinstance(exc, (RecordsError, ValueError, struct.error)) \
                    and type(exc).__name__ != "MXNetError":
                raise
            why = ("does not decode as an image" if isinstance(exc, RecordsError)
                   else "is not a readable RecordIO record")
            raise RecordsError(f"{self.rec}: record {i}{self._name(i)} {why}: the file is "
                               f"damaged; {RERUN}") from None

    def _name(self, i: int) -> str:
        """`` ('copepod/1.jpg')``: the image record ``i`` holds, from meta.json, if known."""
        try:
            return f" ({read_json(self.rec.parent / META)[self.split][i]['name']!r})"
        except Exception:  # only decorates a message about a damaged file
            return ""

    def __iter__(self) -> Iterator[tuple[float, np.ndarray]]:
        for i in range(len(self)):
            yield self.read(i)

    def close(self) -> None:
        if self._reader is not None:
            self._reader.close()
            self._reader = None


def check_records(records_dir: str | os.PathLike, split: str) -> list[int]:
    """Check one split's ``.rec``/``.idx`` before use; return the index's keys.

    With meta.json beside them (see :func:`load_meta`): their sha256 and record count must
    be those ingest recorded. Always: every ``.idx`` line is ``key<TAB>offset`` with keys 0,
    1, 2, ... and rising offsets; every record at its offset starts with RecordIO's magic
    number, ends where the next begins, and carries ingest's image header (flag 0, id = its
    key, an integral label >= -1). Any failure is a :class:`RecordsError` naming the file.
    """
    records_dir = Path(records_dir)
    rec, idx = rec_paths(records_dir, split)
    meta = load_meta(records_dir) if (records_dir / META).exists() else None
    for file in (rec, idx):
        expected = (meta or {}).get("sha256", {}).get(file.name)
        if expected is not None and sha256(file) != expected:
            raise RecordsError(f"{file}: damaged: its content is not what ingest wrote (sha256 "
                               f"differs from {records_dir / META}); {RERUN}")
    keys, offsets = _read_index(idx)
    if meta is not None and isinstance(meta.get(split), list) and len(meta[split]) != len(keys):
        raise RecordsError(f"{idx}: {len(keys)} records but {records_dir / META} lists "
                           f"{len(meta[split])} {split} images; {RERUN}")
    problem = _frame_problem(rec, keys, offsets)
    if problem:
        raise RecordsError(f"{rec}: damaged: {problem}; {RERUN}")
    return keys


def _read_index(idx: Path) -> tuple[list[int], np.ndarray]:
    keys, offsets = [], []
    for n, line in enumerate(idx.read_bytes().split(b"\n"), 1):
        if not line.strip():
            continue
        try:
            key, offset = (int(x) for x in line.split(b"\t"))
        except ValueError:
            raise RecordsError(f"{idx}: damaged: line {n} is not '<key><TAB><offset>'; "
                               f"{RERUN}") from None
        keys.append(key)
        offsets.append(offset)
    if keys != list(range(len(keys))):
        first = next(i for i, k in enumerate(keys) if k != i)
        raise RecordsError(f"{idx}: damaged: record keys are not 0, 1, 2, ... (entry {first} "
                           f"has key {keys[first]}); {RERUN}")
    return keys, np.asarray(offsets, dtype=np.int64)


def _frame_problem(rec: Path, keys: Sequence[int], offsets: np.ndarray) -> str | None:
    """What is wrong with the framing of the records at ``offsets`` in ``rec``, or None."""
    size = rec.stat().st_size
    if not len(offsets):
        return None if size == 0 else "it holds data but its index lists no record"
    if offsets[0] != 0 or (np.diff(offsets) <= 0).any() or offsets[-1] + 8 + IR_SIZE > size:
        return "its index points outside the file or out of order"
    data = np.memmap(rec, dtype=np.uint8, mode="r")
    head = np.ascontiguousarray(data[offsets[:, None] + np.arange(8 + IR_SIZE)])
    magic, lrec, flag = (head[:, k:k + 4].view("<u4")[:, 0].astype(np.int64) for k in (0, 4, 8))
    label = head[:, 12:16].view("<f4")[:, 0].astype(np.float64)
    ids = head[:, 16:24].view("<u8")[:, 0]
    cflag, length = lrec >> 29, lrec & ((1 << 29) - 1)
    ends = np.append(offsets[1:], size)
    checks = [
        ("no RecordIO magic number at its start", magic != RECORDIO_MAGIC),
        ("a length shorter than its image header", length < IR_SIZE),
        ("a length that does not reach the next record",
         (cflag == 0) & (offsets + 8 + (length + 3) // 4 * 4 != ends)),
        ("a broken split record", ~np.isin(cflag, (0, 1))),
        ("an image header ingest does not write",
         (flag != 0) | (ids != np.asarray(keys, dtype=np.uint64)) | ~np.isfinite(label)
         | (label < -1) | (np.round(label) != label)),
    ]
    for what, bad in checks:
        if bad.any():
            return f"record {int(np.flatnonzero(bad)[0])} has {what}"
    for i in np.flatnonzero(cflag == 1):  # rare: data that held the magic number
        if not _parts_end_at(data, int(offsets[i]), int(ends[i])):
            return f"record {int(i)} has a broken split record"
    return None


def _parts_end_at(data: np.ndarray, pos: int, end: int) -> bool:
    """Whether the parts of a split record starting at ``pos`` (cflag 1, 2..., 3) end at
    ``end``."""
    expected = 1
    while pos + 8 <= end:
        magic, lrec = (int(x) for x in np.asarray(data[pos:pos + 8]).view("<u4"))
        cflag = lrec >> 29
        if magic != RECORDIO_MAGIC or cflag not in ((1,) if expected == 1 else (2, 3)):
            return False
        pos += 8 + ((lrec & ((1 << 29) - 1)) + 3) // 4 * 4
        if cflag == 3:
            return pos == end
        expected = 2
    return False

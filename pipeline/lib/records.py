"""RecordIO storage of the ingested images, and ``meta.json`` that describes it.

Images are decoded, converted to 8-bit grayscale, resized and padded once by ingest, then
read many times by training and prediction. Layout of ``data/records/``::

    train.rec / train.idx   record i = meta["train"][i]; header.label = class index
    test.rec  / test.idx    record i = meta["test"][i];  header.label = -1
    meta.json               classes (submission order), ingest settings, per-record entries
    bad_files.json          files ingest skipped (``data.skip_bad``) and why

Each record is an ``mx.recordio.pack_img`` payload (PNG by default: lossless and byte-for-byte
deterministic; JPEG optional). ``meta.json`` is written last and records the byte size of every
``.rec``/``.idx``, so a reader can tell a stale or foreign pair from the one meta describes.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from pipeline.lib.errors import PipelineError
from pipeline.lib.fsutil import read_json

SPLITS = ("train", "test")
META = "meta.json"
BAD_FILES = "bad_files.json"
META_VERSION = 1


class RecordsError(PipelineError, RuntimeError):
    """The records directory is missing, incomplete or inconsistent with meta.json."""


def rec_paths(records_dir: str | os.PathLike, split: str) -> tuple[Path, Path]:
    records_dir = Path(records_dir)
    return records_dir / f"{split}.rec", records_dir / f"{split}.idx"


def load_meta(records_dir: str | os.PathLike) -> dict[str, Any]:
    """Read and sanity-check ``meta.json`` against the record files beside it."""
    path = Path(records_dir) / META
    if not path.exists():
        raise RecordsError(f"{path} not found: run the ingest stage first (dvc repro ingest)")
    meta = read_json(path)
    for split, info in meta.get("files", {}).items():
        for kind, size in info.items():
            file = Path(records_dir) / f"{split}.{kind}"
            if not file.exists() or file.stat().st_size != size:
                raise RecordsError(f"{file} does not match {path} (missing or of another size);"
                                   " re-run ingest")
    return meta


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
        raise RecordsError(f"record {header.id} does not decode")
    label = header.label if np.isscalar(header.label) else header.label[0]
    return float(label), img


class RecordReader:
    """Random access to one split's records; re-opens itself after ``fork``/pickling.

    MXNet's reader holds a C file handle that must not be shared across processes, so
    worker processes each open their own (the handle is dropped on pickling).
    """

    def __init__(self, records_dir: str | os.PathLike, split: str):
        self.rec, self.idx = rec_paths(records_dir, split)
        if not self.rec.exists() or not self.idx.exists():
            raise RecordsError(f"{self.rec} / {self.idx} not found: run ingest first")
        self._reader = None
        self._pid = None
        self._keys = [int(line.split("\t", 1)[0]) for line in
                      self.idx.read_text().splitlines() if line.strip()]

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
        return unpack(self._handle().read_idx(self._keys[i]))

    def __iter__(self) -> Iterator[tuple[float, np.ndarray]]:
        for i in range(len(self)):
            yield self.read(i)

    def close(self) -> None:
        if self._reader is not None:
            self._reader.close()
            self._reader = None

"""The images classify reads: folders, file lists, EcoTaxa tables and archives, as one listing.

Each INPUT of ``python -m pipeline.classify`` is

* a folder: every image file below it (recursively, in sorted order; hidden folders and
  files, ``__MACOSX`` and AppleDouble ``._*`` files are left out; an image is a file with an
  extension PIL opens);
* an EcoTaxa table (a ``.tsv`` whose first row has an ``img_file_name`` column), or a
  folder or ``.zip`` that is an EcoTaxa export (``ecotaxa_*.tsv`` files and their images):
  one image per object, its path relative to its table's folder (as EcoTaxa's import reads
  it), its ``object_id`` kept. These are read by :mod:`pipeline.lib.ecotaxa`, the reader
  ingest trains from, streamed (:func:`pipeline.lib.ecotaxa.stream_objects`): the same
  encodings, type row, statuses and paths kept inside the export; a table it refuses is
  refused here in one line; images are read from the archive, nothing is extracted;
* any other ``.zip`` archive: every image inside it;
* any other text file: a list of image paths, one per line (relative ones to the list's
  folder; blank lines and ``#`` comments skipped);
* an image file: itself.

The images are enumerated once into a *listing* file (one JSON array per line: where the
bytes are, the archive member, the name shown in the outputs, the object id, the
``img_file_name`` for the EcoTaxa table), streamed: a million images take a million lines on
disk and a few kilobytes of memory (:class:`Listing` keeps only the byte offset of each
chunk's first line). A zip archive's directory is held in memory while it is listed, as
Python's ``zipfile`` reads it whole: unpack very large archives first.

:func:`load_images` turns a chunk's entries into model inputs exactly as ingest made the
records (:mod:`pipeline.lib.images`: gray 8-bit, border whitening, longer side to the input
size on a background square, the records' JPEG round trip when they were JPEG); a file that
cannot be read or decoded becomes a blank image and a reason, and the run goes on.
"""
from __future__ import annotations

import functools
import hashlib
import json
import os
import posixpath
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np

from pipeline.lib.errors import PipelineError

ECOTAXA_IMAGE = "img_file_name"  # the column that makes a .tsv an EcoTaxa table


class InputError(PipelineError, ValueError):
    """An INPUT that does not exist or cannot be listed."""


@dataclass(frozen=True)
class Entry:
    """One image to classify: ``source`` (a file, or the archive holding ``member``; None for
    a table row without an image), its ``name`` in the outputs, ``object_id`` and ``img``
    (its ``img_file_name`` in the EcoTaxa table classify writes)."""

    source: str | None
    member: str | None
    name: str
    object_id: str
    img: str

    def line(self) -> str:
        return json.dumps([self.source, self.member, self.name, self.object_id, self.img],
                          ensure_ascii=False) + "\n"

    @classmethod
    def parse(cls, line: str) -> "Entry":
        return cls(*json.loads(line))


@functools.lru_cache(maxsize=None)
def image_extensions() -> frozenset[str]:
    """File extensions of the formats PIL can open (``.jpg``, ``.png``, ``.tif``, ...)."""
    from PIL import Image

    Image.init()
    return frozenset(ext for ext, fmt in Image.registered_extensions().items()
                     if fmt in Image.OPEN)


def _is_image_name(name: str) -> bool:
    base = posixpath.basename(name)
    return (not base.startswith(".") and os.path.splitext(base)[1].lower()
            in image_extensions())


def _object_id(name: str) -> str:
    return name.replace("\\", "/").strip("/").replace("/", "_")


def _relative_img(path: str, tsv_dir: Path) -> str:
    """``path`` as EcoTaxa's import finds it from a table in ``tsv_dir``."""
    try:
        return Path(os.path.relpath(path, tsv_dir)).as_posix()
    except ValueError:  # another drive (Windows): only an absolute path reaches it
        return Path(path).as_posix()


def entries(inputs: Sequence[str], tsv_dir: Path) -> Iterator[Entry]:
    """Every image of ``inputs`` in order (module docstring); ``tsv_dir``: the folder of the
    EcoTaxa table being written (image paths of folders and lists are made relative to it).
    An INPUT that does not exist is an :class:`InputError` naming all such at once."""
    from pipeline.lib import ecotaxa

    missing = [i for i in inputs if not os.path.exists(i)]
    if missing:
        raise InputError(f"INPUT not found: {missing[:5]}"
                         + (f" and {len(missing) - 5} more" if len(missing) > 5 else ""))
    for given in inputs:
        path = Path(given)
        if path.is_dir():
            if ecotaxa.is_export(path):
                yield from _export(given, path, None)
            else:
                yield from _folder(given, tsv_dir)
        elif path.suffix.lower() == ".zip":
            if not zipfile.is_zipfile(path):
                raise InputError(f"{given}: not a readable zip archive")
            if _zip_has_tables(path):
                yield from _export(given, path, None)
            else:
                yield from _archive(given)
        elif _is_image_name(path.name):
            yield Entry(str(path.resolve()), None, given, _object_id(given),
                        _relative_img(str(path.resolve()), tsv_dir))
        elif _ecotaxa_header(path):
            yield from _export(given, path.parent, path.name)
        else:
            yield from _file_list(given, tsv_dir)


def _folder(given: str, tsv_dir: Path) -> Iterator[Entry]:
    top = Path(given).resolve()
    for root, dirs, files in os.walk(top):
        dirs[:] = sorted(d for d in dirs if not d.startswith(".") and d.upper() != "__MACOSX")
        for f in sorted(files):
            if _is_image_name(f):
                full = os.path.join(root, f)
                name = os.path.join(given, os.path.relpath(full, top))
                yield Entry(full, None, name, _object_id(os.path.relpath(full, top)),
                            _relative_img(full, tsv_dir))


def _file_list(given: str, tsv_dir: Path) -> Iterator[Entry]:
    base = Path(given).resolve().parent
    try:
        with open(given, encoding="utf-8-sig", newline="") as fh:
            for line in fh:
                line = line.rstrip("\r\n")
                if not line.strip() or line.lstrip().startswith("#"):
                    continue
                full = str(base / line) if not os.path.isabs(line) else line
                yield Entry(full, None, line, _object_id(line), _relative_img(full, tsv_dir))
    except UnicodeDecodeError as err:
        raise InputError(f"{given}: neither an image, an EcoTaxa table nor a UTF-8 list of "
                         f"image paths ({err.reason} at byte {err.start})") from None


def _zip_has_tables(path: Path) -> bool:
    from pipeline.lib import ecotaxa

    try:
        with zipfile.ZipFile(path) as z:
            return any(ecotaxa.is_tsv_name(n) for n in z.namelist())
    except (zipfile.BadZipFile, zipfile.LargeZipFile, EOFError, OSError) as err:
        raise InputError(f"{path}: not a readable zip archive ({err})") from None


def _archive(given: str) -> Iterator[Entry]:
    """Every image of a zip that is not an EcoTaxa export."""
    try:
        with zipfile.ZipFile(given) as z:
            names = sorted(n for n in z.namelist() if not n.endswith("/")
                           and "__MACOSX" not in n.split("/"))
    except (zipfile.BadZipFile, zipfile.LargeZipFile, EOFError) as err:
        raise InputError(f"{given}: not a readable zip archive ({err})") from None
    source = str(Path(given).resolve())
    for n in names:
        if _is_image_name(n):
            yield Entry(source, n, f"{given}/{n}", _object_id(n), n)


def _export(given: str, root: Path, table: str | None) -> Iterator[Entry]:
    """The objects of an EcoTaxa export (``root``: a folder or a zip) or of one ``table`` in
    the folder ``root``, read by :func:`pipeline.lib.ecotaxa.stream_objects`; the input is
    refused in one line, naming every problem, once its tables are read."""
    from pipeline.lib import ecotaxa

    problems: list[str] = []
    shown = os.path.dirname(given) if table else given
    for obj in ecotaxa.stream_objects(root.resolve(), problems, table):
        name = f"{shown}/{obj.image}" if shown else obj.image
        if obj.archive:
            yield Entry(obj.archive, obj.image, name, obj.object_id, obj.img_file_name)
        else:
            yield Entry(obj.file, None, name, obj.object_id, obj.img_file_name)
    if problems:
        raise InputError(f"{given}: not a usable EcoTaxa table: " + "; ".join(problems))


def _ecotaxa_header(path: Path) -> bool:
    """Whether ``path`` is a ``.tsv`` whose first row has an ``img_file_name`` column."""
    if path.suffix.lower() != ".tsv":
        return False
    try:
        with open(path, "rb") as fh:
            first = fh.readline(1 << 20).decode("utf-8-sig", errors="replace")
    except OSError:
        return False
    return ECOTAXA_IMAGE in [f.strip(" \t\r\n").lower() for f in first.split("\t")]


# ------------------------------------------------------------------------------ listing


def write_listing(inputs: Sequence[str], path: Path, tsv_dir: Path) -> tuple[int, str]:
    """Write the listing of ``inputs`` to ``path`` (atomically); return (images, sha256)."""
    from pipeline.lib.fsutil import atomic_path

    digest, count = hashlib.sha256(), 0
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8", newline="\n") as fh:
        for entry in entries(inputs, tsv_dir):
            line = entry.line()
            fh.write(line)
            digest.update(line.encode("utf-8"))
            count += 1
    if not count:
        path.unlink(missing_ok=True)
        raise InputError(f"no images found in {list(inputs)[:5]} (folders are searched "
                         "recursively for image files; see `--help` for the kinds of INPUT)")
    return count, digest.hexdigest()


class Listing:
    """Random access by chunk to a listing file: only each chunk's byte offset is kept."""

    def __init__(self, path: Path, bounds: Sequence[tuple[int, int]]):
        self.path, self.bounds = Path(path), list(bounds)
        starts = {a: i for i, (a, _) in enumerate(self.bounds)}
        self.offsets = [0] * len(self.bounds)
        with open(self.path, "rb") as fh:
            offset, line = 0, 0
            for raw in fh:
                if line in starts:
                    self.offsets[starts[line]] = offset
                offset += len(raw)
                line += 1
        if self.bounds and line != self.bounds[-1][1]:
            raise InputError(f"{self.path}: {line} images listed, expected "
                             f"{self.bounds[-1][1]}; remove it and run again")

    def chunk(self, i: int) -> list[Entry]:
        a, b = self.bounds[i]
        with open(self.path, "rb") as fh:
            fh.seek(self.offsets[i])
            return [Entry.parse(fh.readline().decode("utf-8")) for _ in range(b - a)]


# ------------------------------------------------------------------------------ images


def model_image(data: bytes, prep: dict[str, Any]) -> np.ndarray:
    """The (size, size) uint8 image ingest would have stored for a file's bytes; ValueError
    saying why when they are not a usable image."""
    import cv2

    from pipeline.lib.images import decode_bytes, fit_square, whiten

    background = prep["background"]
    gray = decode_bytes(data, background, prep["max_pixels"])
    if prep["whiten_background"]:
        gray = whiten(gray, background)
    square = fit_square(gray, prep["size"], background)
    if prep["format"] == "jpg":  # the records held JPEGs: their loss is part of the input
        ok, encoded = cv2.imencode(".jpg", square,
                                   [int(cv2.IMWRITE_JPEG_QUALITY), prep["jpeg_quality"]])
        square = cv2.imdecode(encoded, cv2.IMREAD_GRAYSCALE)
    return square


def load_images(chunk: Sequence[Entry], prep: dict[str, Any]
                ) -> tuple[np.ndarray, list[str]]:
    """(model images (m, size, size) uint8, reason per entry: "" if it was read). An
    unreadable entry gets a blank (background) image, which is computed and then dropped."""
    size = prep["size"]
    images = np.full((len(chunk), size, size), prep["background"], dtype=np.uint8)
    reasons = [""] * len(chunk)
    for i, entry in enumerate(chunk):
        try:
            images[i] = model_image(_read(entry), prep)
        except ValueError as err:
            reasons[i] = str(err)
    return images, reasons


def _read(entry: Entry) -> bytes:
    """The bytes of ``entry``'s image; ValueError saying why they cannot be read. Archive
    members are read in place through :func:`pipeline.lib.ecotaxa.read_member` (one open
    handle per archive and process)."""
    from pipeline.lib import ecotaxa

    if entry.source is None:
        raise ValueError(f"no {ECOTAXA_IMAGE} in this row")
    if entry.member is None:
        try:
            return Path(entry.source).read_bytes()
        except OSError as exc:
            raise ValueError(f"unreadable ({exc.strerror or exc})") from None
    return ecotaxa.read_member(entry.source, entry.member)

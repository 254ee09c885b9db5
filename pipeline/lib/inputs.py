"""The images classify reads: folders, file lists, EcoTaxa tables and archives, as one listing.

Each INPUT of ``python -m pipeline.classify`` is

* a folder: every image file below it (recursively, in sorted order; hidden folders and
  files, ``__MACOSX`` and AppleDouble ``._*`` files are left out; an image is a file with an
  extension PIL opens);
* an EcoTaxa table (``.tsv``/``.txt`` whose first row has an ``img_file_name`` column):
  one image per row, its path relative to the table's folder (as EcoTaxa's import reads
  it), its ``object_id`` kept; the second row of ``[t]``/``[f]`` type markers is skipped;
* a ``.zip`` archive: its EcoTaxa tables (``ecotaxa*.tsv``/``.txt``, EcoTaxa's own rule;
  images relative to each table's folder inside the archive), or, without any, every image
  inside it; images are read from the archive, nothing is extracted;
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

import codecs
import csv
import functools
import hashlib
import io
import json
import os
import posixpath
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np

from pipeline.lib.errors import PipelineError

ECOTAXA_IMAGE = "img_file_name"
ECOTAXA_ID = "object_id"
TYPE_MARKERS = ("[t]", "[f]")


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
    missing = [i for i in inputs if not os.path.exists(i)]
    if missing:
        raise InputError(f"INPUT not found: {missing[:5]}"
                         + (f" and {len(missing) - 5} more" if len(missing) > 5 else ""))
    for given in inputs:
        path = Path(given)
        if path.is_dir():
            yield from _folder(given, tsv_dir)
        elif zipfile.is_zipfile(path) and path.suffix.lower() == ".zip":
            yield from _archive(given)
        elif _is_image_name(path.name):
            yield Entry(str(path.resolve()), None, given, _object_id(given),
                        _relative_img(str(path.resolve()), tsv_dir))
        elif _ecotaxa_header(path) is not None:
            with _open_text(path) as fh:
                yield from _table(fh, given, str(path.parent.resolve()), None)
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
    with _open_text(Path(given)) as fh:
        for line in fh:
            line = line.rstrip("\r\n")
            if not line.strip() or line.lstrip().startswith("#"):
                continue
            full = str(base / line) if not os.path.isabs(line) else line
            yield Entry(full, None, line, _object_id(line), _relative_img(full, tsv_dir))


def _archive(given: str) -> Iterator[Entry]:
    try:
        with zipfile.ZipFile(given) as z:
            names = sorted(n for n in z.namelist() if not n.endswith("/")
                           and "__MACOSX" not in n.split("/"))
            tables = [n for n in names if posixpath.basename(n).lower().startswith("ecotaxa")
                      and n.lower().endswith((".tsv", ".txt"))]
            source = str(Path(given).resolve())
            if not tables:
                for n in names:
                    if _is_image_name(n):
                        yield Entry(source, n, f"{given}/{n}", _object_id(n), n)
                return
            for t in tables:
                with z.open(t) as raw:
                    encoding = _encoding(raw)
                with z.open(t) as raw, io.TextIOWrapper(raw, encoding=encoding,
                                                        newline="") as fh:
                    yield from _table(fh, f"{given}/{t}", source, posixpath.dirname(t))
    except (zipfile.BadZipFile, zipfile.LargeZipFile, EOFError) as err:
        raise InputError(f"{given}: not a readable zip archive ({err})") from None


def _table(fh, given: str, base: str, member_dir: str | None) -> Iterator[Entry]:
    """The rows of an EcoTaxa table read from ``fh``; images relative to ``base`` (a folder)
    or, with ``member_dir`` not None, to that folder inside the archive ``base``."""
    reader = csv.reader(fh, delimiter="\t", quotechar='"')
    header = [h.strip(" \t").lower() for h in next(reader, [])]
    if ECOTAXA_IMAGE not in header:
        raise InputError(f"{given}: no {ECOTAXA_IMAGE} column in the first row: not an "
                         "EcoTaxa table")
    image, ident = header.index(ECOTAXA_IMAGE), (header.index(ECOTAXA_ID)
                                                  if ECOTAXA_ID in header else None)
    shown = posixpath.dirname(given) if member_dir is not None else os.path.dirname(given)
    for number, row in enumerate(reader, start=2):
        values = [v.strip() for v in row]
        if number == 2 and values and all(v.lower() in TYPE_MARKERS for v in values if v):
            continue
        if not any(values):
            continue
        img = values[image] if image < len(values) else ""
        object_id = (values[ident] if ident is not None and ident < len(values) else "") \
            or _object_id(img or f"row{number}")
        name = f"{shown}/{img}" if shown else img
        if not img:
            yield Entry(None, None, f"{given} row {number}", object_id, "")
        elif member_dir is not None:
            member = posixpath.normpath(posixpath.join(member_dir, img))
            yield Entry(base, member, name, object_id, img)
        else:
            yield Entry(os.path.join(base, img), None, name, object_id, img)


def _ecotaxa_header(path: Path) -> list[str] | None:
    """The fields of ``path``'s first row if it is an EcoTaxa table, else None."""
    try:
        with _open_text(path) as fh:
            first = fh.readline()
    except (OSError, UnicodeDecodeError):
        return None
    fields = [f.strip(" \t\r\n").lower() for f in first.split("\t")]
    return fields if ECOTAXA_IMAGE in fields else None


def _encoding(raw) -> str:
    """``utf-8-sig`` if the binary stream decodes as UTF-8 (a BOM or not), else ``latin-1``
    (what EcoTaxa's import assumes without a BOM). Reads the stream through once."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    try:
        for block in iter(lambda: raw.read(1 << 20), b""):
            decoder.decode(block)
        decoder.decode(b"", final=True)
    except UnicodeDecodeError:
        return "latin-1"
    return "utf-8-sig"


def _open_text(path: Path):
    with open(path, "rb") as raw:
        encoding = _encoding(raw)
    return open(path, encoding=encoding, newline="")


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
    archives: dict[str, zipfile.ZipFile] = {}
    try:
        for i, entry in enumerate(chunk):
            try:
                images[i] = model_image(_read(entry, archives), prep)
            except ValueError as err:
                reasons[i] = str(err)
    finally:
        for z in archives.values():
            z.close()
    return images, reasons


def _read(entry: Entry, archives: dict[str, zipfile.ZipFile]) -> bytes:
    """The bytes of ``entry``'s image; ValueError saying why they cannot be read."""
    import zlib

    if entry.source is None:
        raise ValueError(f"no {ECOTAXA_IMAGE} in this row")
    if entry.member is None:
        try:
            return Path(entry.source).read_bytes()
        except OSError as exc:
            raise ValueError(f"unreadable ({exc.strerror or exc})") from None
    try:
        if entry.source not in archives:
            archives[entry.source] = zipfile.ZipFile(entry.source)
        return archives[entry.source].read(entry.member)
    except KeyError:
        raise ValueError(f"not in the archive {entry.source}") from None
    except (zipfile.BadZipFile, zlib.error, EOFError, OSError) as err:
        raise ValueError(f"damaged archive member ({err})") from None

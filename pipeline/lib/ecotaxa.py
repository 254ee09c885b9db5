"""EcoTaxa exports as a data source: their TSVs, their images, zipped or not.

EcoTaxa (https://ecotaxa.obs-vlfr.fr) is where plankton imaging teams validate the
categories of their objects. What this reader relies on was read in EcoTaxa's own code,
repository ``ecotaxa/ecotaxa_back``:

* ``py/API_operations/exports/ForProject.py`` (``create_tsv``, ``store_tsv_into_zip``): an
  export is a zip (``allowZip64``, deflated) holding one TSV per split value, named
  ``ecotaxa_<value>.tsv`` (per sample, per acquisition, per taxon, or one for the whole
  project), at the zip's root, or in a ``<sample>/`` folder beside its images for a backup
  export. Tab-separated, ``"`` quotes, every text cell quoted (``csv.QUOTE_NONNUMERIC``),
  ``\\n`` line ends, UTF-8 with a byte-order mark (or Latin-1 with ``use_latin1``). The
  second row of ``[t]``/``[f]`` type markers is written only with ``with_types_row``
  (backups, or when asked): an export may have it or not. Columns: ``img_file_name`` (only
  when images are exported; relative to the TSV's folder: ``<split value>/<original name>``,
  ``<split value>/<img_rank>/<original name>`` when two images share a name), ``img_rank``,
  ``object_id``, ..., ``object_annotation_status`` (``validated``, ``predicted``,
  ``dubious``; the raw code otherwise, ``X`` for discarded, empty when unannotated),
  ``object_annotation_category`` (the taxon's *display name*, unique in EcoTaxa's taxonomy,
  ``name<parent`` where a name alone is ambiguous, so ``<`` and spaces occur) and
  ``object_annotation_hierarchy`` (the lineage, ``>``-separated). With all images exported
  (``with_images: all``) an object has one row per image, the same ``object_id`` and
  increasing ``img_rank``.
* ``py/BO/TSVFile.py`` (``open``, ``validate_content``, ``path_for_image``) and
  ``py/DB/Object.py`` (``classif_qual_labels``): how EcoTaxa reads such a TSV back. Header
  names are compared after stripping spaces and lower-casing; a file starting with a
  byte-order mark is UTF-8, else Latin-1; images are found relative to the TSV's folder; a
  (``object_id``, ``img_file_name``) pair may occur once; a status (case-insensitive) is
  ``validated``, ``predicted``, ``dubious``, ``discarded`` or ``noid``; a category needs a
  status and a status a category.

Where this reader is stricter than EcoTaxa, it is for safety: an ``img_file_name`` must stay
inside the export (EcoTaxa's import joins any path, absolute ones included), and a file
without a byte-order mark is read as UTF-8 first, Latin-1 only if it is not UTF-8 (EcoTaxa
reads it as Latin-1 at once, which garbles UTF-8 written without the mark). An object with
several images contributes its first (lowest ``img_rank``); the others are counted.

Reading never extracts the zip: members are read in place (:func:`read_member`), each
refused when it claims more bytes than any image within ``data.max_pixels`` could take.
Nothing here imports MXNet.
"""
from __future__ import annotations

import codecs
import csv
import io
import os
import posixpath
import re
import zipfile
import zlib
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, Callable, Iterator

from pipeline.lib.errors import PipelineError
from pipeline.lib.names import examples

TSV_PATTERN = re.compile(r"ecotaxa_.*\.tsv", re.IGNORECASE)
OBJECT_ID = "object_id"
IMAGE = "img_file_name"
RANK = "img_rank"
CATEGORY = "object_annotation_category"
STATUS = "object_annotation_status"
HIERARCHY = "object_annotation_hierarchy"
REQUIRED = (OBJECT_ID, IMAGE, CATEGORY, STATUS)
TYPE_MARKERS = frozenset({"[t]", "[f]"})
VALIDATED = "validated"
# object_annotation_status values (lower-cased) -> the status recorded; ForProject.py writes
# the raw code "X" for a discarded object, TSVFile.py accepts "discarded" and "noid".
STATUSES = {"validated": VALIDATED, "predicted": "predicted", "dubious": "dubious",
            "discarded": "discarded", "x": "discarded", "noid": "unannotated",
            "": "unannotated"}
# An image file needs at most this many bytes per pixel (16-bit RGBA, uncompressed) plus
# headers: a member claiming more is refused before it is read (a zip bomb's claim is all
# zipfile decompresses, so the check bounds the memory a member can take).
BYTES_PER_PIXEL = 8
HEADER_BYTES = 1 << 20
EXAMPLES = 3


class EcoTaxaError(PipelineError, ValueError):
    """An EcoTaxa export cannot be read; the message names every problem and the fix."""


@dataclass(frozen=True)
class EcoObject:
    """One object of an export: its id, its image inside the export (a path relative to the
    export's root, ``/``-separated), its category and status, and where it was read."""

    object_id: str
    image: str
    category: str
    status: str          # a value of STATUSES
    hierarchy: str
    where: str           # "<tsv> line <n>"


@dataclass
class Export:
    """An EcoTaxa export read and checked: its objects (one per object id), the images that
    are missing from it (by object id), and counts for the summary."""

    root: Path
    archive: bool
    tsvs: list[str]
    objects: list[EcoObject]
    missing: dict[str, str] = field(default_factory=dict)
    extra_images: int = 0

    def location(self, obj: EcoObject) -> tuple[str, str, str]:
        """(path shown in messages and bad_files.json, zip archive or "", member or "")."""
        if self.archive:
            return f"{self.root}/{obj.image}", str(self.root), obj.image
        return str(self.root / obj.image), "", ""

    def statuses(self) -> dict[str, int]:
        return dict(sorted(Counter(o.status for o in self.objects).items()))


# ------------------------------------------------------------------------------ detection


def is_export(root: str | os.PathLike) -> bool:
    """Whether ``root`` is meant as an EcoTaxa export: a ``.zip`` or any zip file, or a folder
    without the NDSB ``train/`` folder that holds an ``ecotaxa_*.tsv`` at some depth."""
    root = Path(root)
    if root.is_file():
        return root.suffix.lower() == ".zip" or zipfile.is_zipfile(root)
    if not root.is_dir() or (root / "train").is_dir():
        return False
    return any(is_tsv_name(p.relative_to(root).as_posix()) for p in root.rglob("*")
               if p.is_file())


def is_tsv_name(relative: str) -> bool:
    """An ``ecotaxa_*.tsv`` that is not an operating system's copy of one (``__MACOSX/``,
    ``._*`` forks) nor inside a hidden folder."""
    parts = relative.split("/")
    if any(p.upper() == "__MACOSX" or p.startswith(".") for p in parts[:-1]):
        return False
    return not parts[-1].startswith("._") and TSV_PATTERN.fullmatch(parts[-1]) is not None


def path_problem(name: str) -> str | None:
    """Why ``img_file_name`` (or a member name) could point outside the export, or None:
    absolute paths (``/x``, ``\\\\x``, ``C:x``) and ``..`` parts, with ``\\`` taken as a
    separator too (TSVs written on Windows)."""
    if name.startswith(("/", "\\")) or re.match(r"[A-Za-z]:", name):
        return "an absolute path"
    if ".." in re.split(r"[/\\]", name):
        return "a path with '..'"
    return None


# -------------------------------------------------------------------------------- reading


def read_export(root: str | os.PathLike, max_pixels: int | None = None) -> Export:
    """Read every ``ecotaxa_*.tsv`` of the export at ``root`` (a folder or a zip) and check
    them against each other and against the images; :class:`EcoTaxaError` naming every
    problem. Images missing from the export are not an error here: they are returned in
    ``Export.missing`` (ingest reports them as bad files, which ``data.skip_bad`` skips)."""
    root = Path(root)
    if root.is_dir():
        return _read(root, False, _FolderSource(root), max_pixels)
    try:
        with zipfile.ZipFile(root) as zf:
            return _read(root, True, _ZipSource(root, zf), max_pixels)
    except (zipfile.BadZipFile, zipfile.LargeZipFile, EOFError, zlib.error, OSError) as exc:
        if isinstance(exc, FileNotFoundError):
            raise
        raise EcoTaxaError(f"{root}: not a readable zip archive ({_why(exc)}): download the "
                           "EcoTaxa export again") from None


class _FolderSource:
    def __init__(self, root: Path):
        self.root = root

    def tsvs(self) -> list[str]:
        return sorted(p.relative_to(self.root).as_posix() for p in self.root.rglob("*")
                      if p.is_file() and is_tsv_name(p.relative_to(self.root).as_posix()))

    def open(self, name: str) -> IO[bytes]:
        return open(self.root / name, "rb")

    def has(self, name: str) -> bool:
        return (self.root / name).is_file()

    def nested_zips(self) -> list[str]:
        return []


class _ZipSource:
    def __init__(self, root: Path, zf: zipfile.ZipFile):
        self.root, self.zf = root, zf
        self.names = {i.filename for i in zf.infolist() if not i.is_dir()}

    def tsvs(self) -> list[str]:
        return sorted(n for n in self.names if is_tsv_name(n))

    def open(self, name: str) -> IO[bytes]:
        return self.zf.open(name)

    def has(self, name: str) -> bool:
        return name in self.names

    def nested_zips(self) -> list[str]:
        return sorted(n for n in self.names if n.lower().endswith(".zip"))


def _read(root: Path, archive: bool, source, max_pixels: int | None) -> Export:
    tsvs = source.tsvs()
    if not tsvs:
        nested = source.nested_zips()
        hint = (f"; it holds zip files ({examples(nested, EXAMPLES)}), as a collection export "
                "does: point data.root at one of them" if nested else
                "; export the project from EcoTaxa with its images (a general export, images: "
                "first) and point data.root at the zip")
        raise EcoTaxaError(f"{root}: no ecotaxa_*.tsv file{hint}")
    problems: list[str] = []
    unsafe = [t for t in tsvs if path_problem(t)]
    if unsafe:
        raise EcoTaxaError(f"{root}: TSV member(s) named outside the archive "
                           f"({examples(unsafe, EXAMPLES)}): not a genuine EcoTaxa export")
    rows: list[_Row] = []
    for tsv in tsvs:
        rows += _read_tsv(source, tsv, problems)
    objects, extra = _one_per_object(rows, problems)
    if problems:
        raise EcoTaxaError(f"cannot read the EcoTaxa export {root}:\n  " + "\n  ".join(problems))
    missing = {o.object_id: f"missing from the export (object_id {o.object_id!r}, {o.where})"
               for o in objects if not source.has(o.image)}
    if archive and max_pixels is not None:
        limit = BYTES_PER_PIXEL * max_pixels + HEADER_BYTES
        for o in objects:
            info = source.zf.getinfo(o.image) if o.object_id not in missing else None
            if info is not None and info.file_size > limit:
                missing[o.object_id] = (f"claims {info.file_size:,} bytes, more than an "
                                        "image within data.max_pixels takes (object_id "
                                        f"{o.object_id!r}, {o.where})")
    return Export(root, archive, tsvs, objects, missing, extra)


@dataclass(frozen=True)
class _Row:
    obj: EcoObject
    rank: str


def _read_tsv(source, tsv: str, problems: list[str]) -> list[_Row]:
    """The rows of one TSV (read in one pass, so memory holds only the columns used); its
    problems are appended, aggregated by kind with examples."""
    folder = posixpath.dirname(tsv)
    try:
        with source.open(tsv) as raw:
            encoding = "utf-8-sig" if raw.read(3) == codecs.BOM_UTF8 else "utf-8"
        try:
            return _parse(lambda: source.open(tsv), encoding, tsv, folder, problems)
        except UnicodeDecodeError:
            if encoding != "utf-8":
                raise
            # Not UTF-8: Latin-1, as EcoTaxa writes with use_latin1 (every byte decodes).
            return _parse(lambda: source.open(tsv), "latin-1", tsv, folder, problems)
    except (UnicodeDecodeError, csv.Error, zipfile.BadZipFile, EOFError, zlib.error,
            OSError) as exc:
        if isinstance(exc, FileNotFoundError):
            raise
        problems.append(f"{tsv}: cannot read as an EcoTaxa TSV ({_why(exc)})")
        return []


def _parse(opener: Callable[[], IO[bytes]], encoding: str, tsv: str, folder: str,
           problems: list[str]) -> list[_Row]:
    return list(_rows(opener, encoding, tsv, folder, problems, REQUIRED))


def _rows(opener: Callable[[], IO[bytes]], encoding: str, tsv: str, folder: str,
          problems: list[str], required: tuple[str, ...]) -> Iterator[_Row]:
    """The usable rows of one TSV, streamed; its problems are appended once it is read,
    aggregated by kind with examples. ``required``: the columns it must have
    (``object_annotation_status`` and ``_category`` are checked where present)."""
    found: dict[str, list] = {}   # kind of problem -> examples ("line 5: ...")

    def note(kind: str, example: str) -> None:
        found.setdefault(kind, []).append(example)

    with opener() as raw:
        text = io.TextIOWrapper(raw, encoding=encoding, newline="")
        reader = csv.reader(text, delimiter="\t", quotechar='"')
        header = next(reader, None)
        if not header:
            problems.append(f"{tsv}: empty file, no header row")
            return
        names = [h.strip(" \t").lower() for h in header]
        missing = [c for c in required if c not in names]
        if missing:
            problems.append(f"{tsv}: missing column(s) {', '.join(missing)} (an EcoTaxa export "
                            "has them when exported with its images)")
            return
        repeated = sorted({n for n in names if names.count(n) > 1 and n})
        if repeated:
            problems.append(f"{tsv}: repeated column(s) {', '.join(repeated)}")
            return
        col = {n: i for i, n in enumerate(names)}
        first = True
        for row in reader:
            line = reader.line_num
            if first and row and all(c.strip().lower() in TYPE_MARKERS for c in row):
                first = False
                continue  # the [t]/[f] type row
            first = False
            if not any(c.strip() for c in row):
                continue  # blank line
            if len(row) != len(names):
                note(f"row(s) with another number of fields than the {len(names)} columns "
                     "of the header", f"line {line} has {len(row)}")
                continue
            value = {n: row[col[n]].strip() for n in (*REQUIRED, HIERARCHY, RANK) if n in col}
            where = f"{tsv} line {line}"
            object_id, image = value.get(OBJECT_ID, ""), value[IMAGE]
            category, raw_status = value.get(CATEGORY, ""), value.get(STATUS, "")
            status = STATUSES.get(raw_status.lower())
            if not object_id:
                note("row(s) without an object_id", f"line {line}")
                continue
            if not image:
                note("row(s) without an img_file_name", f"line {line}")
                continue
            why = path_problem(image)
            if why:
                note("img_file_name(s) pointing outside the export (absolute or '..'): "
                     "not allowed", f"line {line} {image!r} is {why}")
                continue
            if status is None:
                note(f"unknown {STATUS} value(s) (valid: validated, predicted, dubious, "
                     "discarded, noid or empty)", f"line {line} {raw_status!r}")
                continue
            if status == VALIDATED and not category:
                note(f"validated object(s) without an {CATEGORY}", f"line {line}")
                continue
            image = image.replace("\\", "/")
            path = f"{folder}/{image}" if folder else image
            yield _Row(EcoObject(object_id, path, category, status,
                                 value.get(HIERARCHY, ""), where), value.get(RANK, ""))
    for kind, where in found.items():
        problems.append(f"{tsv}: {len(where)} {kind}: {examples(where, EXAMPLES)}")


# ------------------------------------------------------------------ streaming (to classify)


@dataclass(frozen=True)
class Streamed:
    """One object of a table being streamed: where its image is (``archive`` and member, or
    a file), its id, and ``img_file_name`` as the table has it."""

    object_id: str
    image: str          # a path relative to the export's root, "/"-separated
    img_file_name: str
    file: str           # the image file ("" in an archive)
    archive: str        # the zip holding it ("" for a folder or a table)


def stream_objects(root: str | os.PathLike, problems: list[str],
                   table: str | None = None) -> Iterator[Streamed]:
    """The objects of the export at ``root`` (a folder or a zip; with ``table``, only that
    TSV file of the folder ``root``), read row by row, so memory does not grow with the
    number of objects: what classify reads from an EcoTaxa table or archive.

    Read with ingest's rules (:func:`_rows`: encodings, type row, paths kept inside the
    export, statuses) but only ``object_id`` and ``img_file_name`` are required: a table to
    classify need not be annotated. An object exported with all its images contributes its
    first (``img_rank`` 0 or empty); rows of a later rank are left out (keeping the lowest rank
    of any object, as ingest does, would hold every object in memory). Problems are appended
    to ``problems`` as each TSV is finished (the caller refuses the input then)."""
    root = Path(root)
    if root.is_dir():
        source: Any = _FolderSource(root)
        yield from _stream(root, source, [table] if table else source.tsvs(), problems)
        return
    try:
        with zipfile.ZipFile(root) as zf:
            source = _ZipSource(root, zf)
            yield from _stream(root, source, source.tsvs(), problems)
    except (zipfile.BadZipFile, zipfile.LargeZipFile, EOFError, zlib.error) as exc:
        problems.append(f"{root}: not a readable zip archive ({_why(exc)})")


def _stream(root: Path, source, tsvs: list[str], problems: list[str]) -> Iterator[Streamed]:
    for tsv in tsvs:
        if path_problem(tsv):
            problems.append(f"{root}: TSV member named outside the archive ({tsv!r})")
            continue
        try:
            encoding = _encoding(lambda: source.open(tsv))
            for r in _rows(lambda: source.open(tsv), encoding, tsv, posixpath.dirname(tsv),
                           problems, (OBJECT_ID, IMAGE)):
                rank = _rank(r.rank) if r.rank else 0
                if rank:
                    continue  # another image of an object listed before
                img = r.obj.image[len(posixpath.dirname(tsv)) + 1:] if posixpath.dirname(tsv) \
                    else r.obj.image
                if isinstance(source, _ZipSource):
                    yield Streamed(r.obj.object_id, r.obj.image, img, "", str(root))
                else:
                    yield Streamed(r.obj.object_id, r.obj.image, img,
                                   str(source.root / r.obj.image), "")
        except (UnicodeDecodeError, csv.Error, zipfile.BadZipFile, EOFError, zlib.error,
                OSError) as exc:
            problems.append(f"{tsv}: cannot read as an EcoTaxa TSV ({_why(exc)})")


def _encoding(opener: Callable[[], IO[bytes]]) -> str:
    """A TSV's encoding, as :func:`_read_tsv` decides it, found before any row is used:
    ``utf-8-sig`` with a byte-order mark, else ``utf-8`` if the whole file decodes, else
    ``latin-1``. Reads the file through once."""
    with opener() as raw:
        head = raw.read(3)
        if head == codecs.BOM_UTF8:
            return "utf-8-sig"
        decoder = codecs.getincrementaldecoder("utf-8")()
        try:
            decoder.decode(head)
            for block in iter(lambda: raw.read(1 << 20), b""):
                decoder.decode(block)
            decoder.decode(b"", final=True)
        except UnicodeDecodeError:
            return "latin-1"
    return "utf-8"


def _one_per_object(rows: list[_Row], problems: list[str]) -> tuple[list[EcoObject], int]:
    """One object per object_id: of the rows of an object exported with all its images
    (distinct numeric ``img_rank``), the lowest rank; any other repeat is a problem."""
    by_id: dict[str, list[_Row]] = {}
    for r in rows:
        by_id.setdefault(r.obj.object_id, []).append(r)
    objects, extra, repeated = [], 0, []
    for object_id, group in by_id.items():
        if len(group) == 1:
            objects.append(group[0].obj)
            continue
        ranks = [_rank(r.rank) for r in group]
        if None not in ranks and len(set(ranks)) == len(ranks):
            first = min(range(len(group)), key=lambda i: ranks[i])
            objects.append(group[first].obj)
            extra += len(group) - 1
            continue
        repeated.append(f"{object_id!r} ({', '.join(r.obj.where for r in group[:3])})")
    if repeated:
        problems.append(f"{len(repeated)} object_id(s) on more than one row (not several images "
                        f"of one object: no distinct img_rank): {examples(repeated, EXAMPLES)}: "
                        "an object_id must name one object")
    return objects, extra


def _rank(text: str) -> int | None:
    """An ``img_rank`` cell as an integer (``2``, or ``2.0`` from a float column), else None."""
    try:
        value = float(text)
    except ValueError:
        return None
    return int(value) if value.is_integer() and value >= 0 else None


# ------------------------------------------------------------------------ reading members

_ARCHIVES: dict[tuple[int, str], tuple[tuple[int, int, int], zipfile.ZipFile]] = {}


def read_member(archive: str, member: str) -> bytes:
    """The bytes of ``member`` of the zip ``archive``; ValueError saying why it cannot be read.

    Each process keeps its own open handle per archive (a handle inherited over fork would
    share its file offset with the parent's), so decoding workers read members in parallel;
    an archive replaced since it was opened (another inode, size or time) is opened again.
    """
    key = (os.getpid(), archive)
    try:
        st = os.stat(archive)
        stamp = (st.st_ino, st.st_size, st.st_mtime_ns)
        cached = _ARCHIVES.get(key)
        if cached is None or cached[0] != stamp:
            if cached is not None:
                cached[1].close()
            cached = _ARCHIVES[key] = (stamp, zipfile.ZipFile(archive))
        return cached[1].read(member)
    except KeyError:
        raise ValueError("missing from the archive") from None
    except (zipfile.BadZipFile, EOFError, zlib.error, OSError, NotImplementedError) as exc:
        raise ValueError(f"unreadable from the archive ({_why(exc)})") from None


def close_archives() -> None:
    """Close this process's handles of :func:`read_member` (ingest's end)."""
    for key in [k for k in _ARCHIVES if k[0] == os.getpid()]:
        _ARCHIVES.pop(key)[1].close()


def _why(exc: BaseException) -> str:
    return str(exc).strip().replace("\n", " ") or type(exc).__name__


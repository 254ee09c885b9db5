"""Kaggle submission files: reading them as Kaggle does, and every check Kaggle would fail.

Read by the submit stage (to verify what it wrote and to follow the sample submission), the
score stage (to validate and score) and ingest (the class order of ``sampleSubmission.csv``).
Files are read by content, not name (gzip or plain), with or without a UTF-8 byte-order mark,
with LF or CRLF line ends.

The validator (:func:`check_submission`) catches what makes Kaggle reject a file or silently
mis-score it: missing, extra or duplicate image rows, missing or reordered class columns, empty
or non-numeric cells, negative values and rows not summing to 1. Column order matters because
the sample submission's class order is not alphabetical.
"""
from __future__ import annotations

import csv
import gzip
import math
import os
import unicodedata
import zlib
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pandas as pd

from pipeline.lib.errors import PipelineError
from pipeline.lib.names import duplicates, examples

IMAGE_COLUMN = "image"
SAMPLE_SUBMISSION = "sampleSubmission.csv"
# Rows must sum to 1 within this. Kaggle renormalizes rows itself, so this only has to catch
# real mistakes (dropped or doubled columns, unnormalized scores), not rounding: a file written
# with 6 significant digits ("%.6g") is off by at most ~5e-7 per row, 1e-4 leaves a wide margin
# for coarser formats while any missing class with p >= 1e-4 is still caught.
SUM_TOLERANCE = 1e-4
EXAMPLES = 3
# Cells that CSV readers take for a missing value rather than text: pandas' default
# ``na_values`` (Kaggle's scorer reads submissions with pandas). A test image with one of these
# names would come back from its submission row as an empty name.
NA_CELLS = frozenset({"", "#N/A", "#N/A N/A", "#NA", "-1.#IND", "-1.#QNAN", "-NaN", "-nan",
                      "1.#IND", "1.#QNAN", "<NA>", "N/A", "NA", "NULL", "NaN", "None", "n/a",
                      "nan", "null"})


class SubmissionError(PipelineError, ValueError):
    """A submission, sample submission or label file cannot be used; the message lists every
    problem."""


# ------------------------------------------------------------------------------ reading CSV


def open_text(path: Path):
    # Decide by content, not name: gzip files start with the magic bytes 1f 8b.
    # utf-8-sig: spreadsheet programs on Windows save CSVs with a byte-order mark, which
    # would otherwise become part of the first column's name. newline="" lets the csv module
    # and pandas read CRLF line ends as line ends.
    with open(path, "rb") as fh:
        gzipped = fh.read(2) == b"\x1f\x8b"
    if gzipped:
        return gzip.open(path, "rt", encoding="utf-8-sig", newline="")
    return open(path, encoding="utf-8-sig", newline="")


# What a file that is not a readable CSV raises while being read: a damaged gzip body (zlib,
# EOF), another text encoding, a row with more fields than the first (pandas), a malformed
# quote (csv). A damaged gzip header is an OSError (gzip.BadGzipFile).
UNREADABLE = (OSError, EOFError, zlib.error, UnicodeDecodeError, csv.Error,
              pd.errors.ParserError)


def unreadable(path: str | os.PathLike, exc: BaseException) -> SubmissionError:
    """The one-line error for a file that cannot be read as CSV (see :data:`UNREADABLE`)."""
    if isinstance(exc, UnicodeDecodeError):
        why = f"not UTF-8 text ({exc.reason} at byte {exc.start}); save it as UTF-8"
    elif isinstance(exc, (zlib.error, EOFError, OSError)):
        why = f"damaged or truncated file ({exc})"
    else:
        why = str(exc).strip().replace("\n", " ")
    return SubmissionError(f"{path}: cannot read as CSV: {why}")


def read_header(path: str | os.PathLike) -> list[str]:
    """The first CSV row of ``path`` (.csv or .csv.gz), unmodified (duplicates kept).

    Raises :class:`SubmissionError` if it cannot be read as CSV."""
    try:
        with open_text(Path(path)) as fh:
            return next(csv.reader(fh), None) or []
    except FileNotFoundError:
        raise
    except UNREADABLE as exc:
        raise unreadable(path, exc) from None


def read_table(path: str | os.PathLike, **kwargs: Any) -> pd.DataFrame:
    """``pandas.read_csv`` of ``path`` (.csv or .csv.gz, see :func:`open_text`); an empty
    file gives an empty frame. Raises :class:`SubmissionError` if it cannot be read as CSV."""
    try:
        with open_text(Path(path)) as fh:
            return pd.read_csv(fh, **kwargs)
    except pd.errors.EmptyDataError:
        return pd.DataFrame()
    except FileNotFoundError:
        raise
    except UNREADABLE as exc:
        raise unreadable(path, exc) from None


def read_csv(path: str | os.PathLike) -> tuple[list[str], pd.DataFrame]:
    """``(header, rows)``: raw header plus data rows with integer column labels.

    The header is read separately because pandas renames duplicate columns (``a`` -> ``a.1``),
    which would hide exactly the mistakes the validator must report. The first column is read
    as text; the others are parsed as numbers where possible and left as text otherwise, so
    non-numeric cells can be reported.
    """
    header = read_header(path)
    if not header:
        return [], pd.DataFrame()
    return header, read_table(path, header=None, skiprows=1, dtype={0: str}, low_memory=False)


def read_sample(path: str | os.PathLike) -> tuple[list[str], list[str] | None]:
    """Class columns and image names (``None`` if it has no rows) of a sample submission."""
    header, rows = read_csv(path)
    if not header or header[0] != IMAGE_COLUMN:
        raise SubmissionError(f"{path}: sample submission must start with an "
                              f"'{IMAGE_COLUMN}' column, header is {header[:3]!r}...")
    images = None if rows.empty else rows[0].fillna("").astype(str).tolist()
    problems = sample_problems(header[1:], images)
    if problems:
        raise SubmissionError(f"{path}: not a usable sample submission: " + "; ".join(problems)
                              + ": use the competition's sampleSubmission.csv")
    return header[1:], images


def read_sample_images(path: str | os.PathLike) -> list[str] | None:
    """The image names of a sample submission's rows, exactly as written (``NA`` stays
    ``NA``), in order; ``None`` if it has no rows. Only the first column is converted."""
    rows = read_table(path, usecols=[0], dtype=str, keep_default_na=False, na_filter=False)
    return None if rows.empty else rows.iloc[:, 0].tolist()


def sample_problems(classes: Sequence[str], images: Sequence[str] | None) -> list[str]:
    """What makes a sample submission unusable as the reference for columns and rows:
    repeated class columns, repeated or empty image names."""
    problems = []
    repeated = duplicates(classes)
    if repeated:
        problems.append(f"duplicate class column(s) {examples(repeated, 10)}")
    if images is not None:
        problems += _empty_rows(images)
        repeated = _repeated(images)
        if repeated:
            problems.append(f"{len(repeated)} image(s) listed more than once, e.g. "
                            f"{examples(repeated, EXAMPLES)}")
    return problems


def _empty_rows(names: Sequence[str]) -> list[str]:
    """The problem of rows without an image name (CSV line numbers, after the header)."""
    empty = [i + 2 for i, n in enumerate(names) if not n.strip()]
    return [f"{len(empty)} row(s) with an empty image name (CSV lines "
            f"{examples(empty, EXAMPLES)})"] if empty else []


def _repeated(names: Sequence[str]) -> list[str]:
    """The non-empty image names that occur more than once."""
    return [n for n in duplicates(names) if n.strip()]


def name_problem(name: str, image: bool = True) -> str | None:
    """Why ``name`` cannot travel through a submission and the ``.names.txt`` files, or None.

    Refused everywhere: names that are not UTF-8 (the file system holds bytes of another
    encoding, which no UTF-8 file can carry) and control or line-break characters
    (``.names.txt`` holds one name a line, CSV readers end a row at a bare ``\\r``, and they
    are invisible in listings). For an image row (``image=True``) also the cells CSV readers
    take for a missing value (:data:`NA_CELLS`).
    """
    if any(0xD800 <= ord(c) <= 0xDFFF for c in name):
        return "not valid UTF-8"
    odd = sorted({c for c in name if unicodedata.category(c) in ("Cc", "Zl", "Zp")})
    if odd:
        return f"contains the control character(s) {', '.join(repr(c) for c in odd)}"
    if image and name in NA_CELLS:
        return f"CSV readers take a cell {name!r} for a missing value"
    return None


# ------------------------------------------------------------------------------- validator


def check_submission(path: str | os.PathLike, classes: Sequence[str] | None = None,
                     images: Sequence[str] | None = None) -> list[str]:
    """Problems that make ``path`` an invalid submission; an empty list means valid.

    ``classes`` (expected class columns, in order) and ``images`` (expected rows, any order)
    are checked when given, typically taken from the sample submission.
    """
    path = Path(path)
    if not path.is_file():
        return [f"file not found: {path}"]
    try:
        header, rows = read_csv(path)
    except SubmissionError as exc:
        return [str(exc).removeprefix(f"{path}: ")]
    return check_frame(header, rows, classes, images)


def check_frame(header: Sequence[str], rows: pd.DataFrame,
                classes: Sequence[str] | None = None,
                images: Sequence[str] | None = None) -> list[str]:
    """The checks of :func:`check_submission` on an already parsed file (see :func:`read_csv`)."""
    if not header:
        return ["empty file: no header row"]
    problems = _check_columns(list(header), classes)
    if rows.empty:
        return problems + ["no data rows"]
    if rows.shape[1] != len(header):
        return problems + [f"data rows have {rows.shape[1]} fields but the header has "
                           f"{len(header)} columns"]
    image_col = _image_column(header, rows)
    labels = _row_labels(rows, image_col)
    if image_col is not None:
        problems += _check_images(rows[image_col].fillna("").astype(str).tolist(), images)
    value_cols = [j for j in range(len(header)) if j != image_col]
    problems += _check_values(rows, value_cols, [header[j] for j in value_cols], labels)
    return problems


def _image_column(header: Sequence[str], rows: pd.DataFrame) -> int | None:
    """Position of the image-name column, or ``None``.

    Without an ``image`` header, a text first column is still taken as the names (the header
    was merely misnamed, which is reported separately); numbers in it would otherwise drown
    the report in one "non-numeric" complaint per row.
    """
    if IMAGE_COLUMN in header:
        return list(header).index(IMAGE_COLUMN)
    if pd.api.types.is_object_dtype(rows[0]):
        return 0
    return None


def _check_columns(header: list[str], classes: Sequence[str] | None) -> list[str]:
    problems = []
    repeated = duplicates(header)
    if repeated:
        problems.append(f"duplicate column(s): {repeated}")
    if IMAGE_COLUMN not in header:
        problems.append(f"missing '{IMAGE_COLUMN}' column (must be the first column)")
    elif header[0] != IMAGE_COLUMN:
        problems.append(f"'{IMAGE_COLUMN}' must be the first column, found it at column "
                        f"{header.index(IMAGE_COLUMN) + 1}")
    value_cols = [c for c in header if c != IMAGE_COLUMN]
    if not value_cols:
        problems.append("no class columns")
    if classes is None:
        return problems
    expected = list(classes)
    missing = [c for c in expected if c not in value_cols]
    extra = [c for c in value_cols if c not in set(expected)]
    if missing:
        problems.append(f"missing class column(s): {examples(missing, 10)}")
    if extra:
        problems.append(f"unexpected column(s): {examples(extra, 10)}")
    if duplicates(expected):  # the reference itself is damaged: no order to compare with
        problems.append(f"the expected class columns repeat {examples(duplicates(expected), 10)}")
    elif not (missing or extra or repeated) and value_cols != expected:
        pos = next(i for i, (e, f) in enumerate(zip(expected, value_cols)) if e != f)
        problems.append(f"class columns are reordered: at class column {pos + 1} expected "
                        f"{expected[pos]!r}, found {value_cols[pos]!r} "
                        f"(columns must follow the sample submission's order)")
    return problems


def _check_images(names: list[str], images: Sequence[str] | None) -> list[str]:
    problems = _empty_rows(names)
    repeated = _repeated(names)
    if repeated:
        problems.append(f"duplicate image row(s): {len(repeated)} image(s) appear more than "
                        f"once, e.g. {examples(repeated, EXAMPLES)}")
    if images is not None:
        present, expected = set(names), set(images)
        missing = [n for n in images if n not in present]
        extra = [n for n in names if n not in expected and n.strip()]
        if missing:
            problems.append(f"missing image row(s): {len(missing)}, e.g. "
                            f"{examples(missing, EXAMPLES)}")
        if extra:
            problems.append(f"extra image row(s) not in the sample: {len(extra)}, e.g. "
                            f"{examples(extra, EXAMPLES)}")
    return problems


def _check_values(rows: pd.DataFrame, cols: list[int], names: list[str],
                  labels: list[str]) -> list[str]:
    values, text = _numeric_matrix(rows, cols)
    problems = []
    non_numeric = np.zeros(values.shape, dtype=bool)
    for k, raw in text.items():
        non_numeric[:, k] = np.isnan(values[:, k]) & raw.notna().to_numpy()
    nan = np.isnan(values) & ~non_numeric
    checks = [("non-numeric", non_numeric), ("NaN or empty", nan),
              ("infinite", np.isinf(values))]
    with np.errstate(invalid="ignore"):
        checks.append(("negative", values < 0))
    for what, mask in checks:
        if mask.any():
            problems.append(f"{what} value(s) in {int(mask.sum())} cell(s), e.g. "
                            + _cellexamples(mask, rows, cols, names, labels))
    problems += _check_row_sums(values, labels)
    return problems


def _numeric_matrix(rows: pd.DataFrame, cols: list[int]
                    ) -> tuple[np.ndarray, dict[int, pd.Series]]:
    """Float matrix of ``cols`` (unparseable cells -> NaN) and the text columns by position."""
    values = np.empty((len(rows), len(cols)), dtype=np.float64)
    text = {}
    for k, j in enumerate(cols):
        col = rows[j]
        if pd.api.types.is_bool_dtype(col):  # "True"/"False" cells are not probabilities
            text[k] = col
            values[:, k] = np.nan
        elif pd.api.types.is_numeric_dtype(col):
            values[:, k] = col.to_numpy(dtype=np.float64)
        else:
            text[k] = col
            values[:, k] = pd.to_numeric(col, errors="coerce").to_numpy(dtype=np.float64)
    return values, text


def _check_row_sums(values: np.ndarray, labels: list[str]) -> list[str]:
    usable = np.isfinite(values).all(axis=1)
    sums = values.sum(axis=1)
    bad = np.flatnonzero(usable & (np.abs(sums - 1.0) > SUM_TOLERANCE))
    if not len(bad):
        return []
    shown = ", ".join(f"{labels[i]!r} sums to {sums[i]:.6g}" for i in bad[:EXAMPLES])
    return [f"{len(bad)} row(s) do not sum to 1 (tolerance {SUM_TOLERANCE:g}), e.g. {shown}"]


def _row_labels(rows: pd.DataFrame, image_col: int | None) -> list[str]:
    # Name rows by image where possible, else by CSV line number (header is line 1).
    if image_col is None:
        return [f"line {i + 2}" for i in range(len(rows))]
    names = rows[image_col].fillna("").astype(str).tolist()
    return [n if n.strip() else f"line {i + 2}" for i, n in enumerate(names)]


def _cellexamples(mask: np.ndarray, rows: pd.DataFrame, cols: list[int], names: list[str],
                   labels: list[str]) -> str:
    shown = []
    for i, k in np.argwhere(mask)[:EXAMPLES]:
        raw = rows.iat[i, cols[k]]
        shown.append(f"row {labels[i]!r} column {names[k]!r} = {_raw(raw)}")
    return "; ".join(shown)


def _raw(value: Any) -> str:
    if isinstance(value, float) and math.isnan(value):
        return "<empty>"
    return repr(value)


# --------------------------------------------------------------------------------- writing


def non_alphabetical(names: Sequence[str], rng: np.random.Generator) -> list[str]:
    """A shuffled order that is guaranteed not to be sorted (as in the real NDSB file)."""
    order = list(rng.permutation(list(names)))
    if len(order) > 1 and order == sorted(order):
        order[0], order[1] = order[1], order[0]
    return order


def write_sample_submission(path: str | os.PathLike, images: Sequence[str],
                            classes: Sequence[str]) -> None:
    """A Kaggle-style sample submission: uniform probabilities, the given column order."""
    uniform = f"{1 / len(classes):.6g}"
    with open(path, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow([IMAGE_COLUMN, *classes])
        for image in images:
            writer.writerow([image] + [uniform] * len(classes))

"""Score and validate NDSB submissions the way Kaggle did.

The competition metric is multi-class log loss with Kaggle's conventions: probabilities are
clipped to ``[1e-15, 1 - 1e-15]``, each row is then divided by its sum, and the score is the mean
of ``-log p(true class)``. :func:`ndsb_log_loss` implements exactly that (sklearn's ``log_loss``
clips to the float's machine epsilon instead, so the two differ only on 0/1 entries).

The validator (:func:`check_submission`) catches what makes Kaggle reject a file or silently
mis-score it: missing, extra or duplicate image rows, missing or reordered class columns, empty
or non-numeric cells, negative values and rows not summing to 1. Column order matters because
the sample submission's class order is not alphabetical.

CLI::

    python -m pipeline.score [SUBMISSION LABELS] [--out metrics/score.json]
    python -m pipeline.score --check FILE [--sample SAMPLE.csv]

Scoring mode falls back to the ``score`` section of ``params.yaml`` for any argument not given;
LABELS is a CSV with columns ``image,class`` (class = name). Check mode exits 1 after printing
one line per problem.
"""
from __future__ import annotations

import argparse
import csv
import gzip
import math
import os
import sys
from collections import Counter
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import pandas as pd

from pipeline import params
from pipeline.fsutil import write_json

EPS = 1e-15
# Rows must sum to 1 within this. Kaggle renormalizes rows itself, so this only has to catch
# real mistakes (dropped or doubled columns, unnormalized scores), not rounding: a file written
# with 6 significant digits ("%.6g") is off by at most ~5e-7 per row, 1e-4 leaves a wide margin
# for coarser formats while any missing class with p >= 1e-4 is still caught.
SUM_TOLERANCE = 1e-4
IMAGE_COLUMN = "image"
EXAMPLES = 3

DEFAULTS: dict[str, Any] = {
    "submission": "submissions/submission.csv.gz",
    "labels": "data/sample/ndsb/test_labels.csv",
    "out": "metrics/score.json",
}


class SubmissionError(ValueError):
    """A submission or label file cannot be scored; the message lists every problem."""


# --------------------------------------------------------------------------------- metric


def ndsb_log_loss(y_true_idx: Sequence[int] | np.ndarray, probs: np.ndarray) -> float:
    """Kaggle NDSB multi-class log loss: clip to [1e-15, 1-1e-15], renormalize rows, mean -log p."""
    return float(np.mean(_sample_losses(y_true_idx, probs)))


def _sample_losses(y_true_idx: Sequence[int] | np.ndarray, probs: np.ndarray) -> np.ndarray:
    y, p = _check_inputs(y_true_idx, probs)
    p = np.clip(p, EPS, 1 - EPS)
    p = p / p.sum(axis=1, keepdims=True)
    return -np.log(p[np.arange(len(y)), y])


def _check_inputs(y_true_idx: Sequence[int] | np.ndarray, probs: np.ndarray
                  ) -> tuple[np.ndarray, np.ndarray]:
    y = np.asarray(y_true_idx)
    p = np.asarray(probs, dtype=np.float64)
    if p.ndim != 2 or y.ndim != 1 or len(y) != len(p) or len(y) == 0:
        raise ValueError(f"need labels (N,) and probs (N, C) with N > 0, "
                         f"got {y.shape} and {p.shape}")
    if not np.issubdtype(y.dtype, np.integer) or y.min() < 0 or y.max() >= p.shape[1]:
        raise ValueError(f"labels must be integer class indices in [0, {p.shape[1]})")
    if not np.isfinite(p).all():
        raise ValueError("probs contain NaN or infinite values")
    return y, p


def accuracy(y_true_idx: Sequence[int] | np.ndarray, probs: np.ndarray) -> float:
    """Fraction of rows whose arg-max class is the true class."""
    y, p = _check_inputs(y_true_idx, probs)
    return float(np.mean(p.argmax(axis=1) == y))


def per_class_log_loss(y_true_idx: Sequence[int] | np.ndarray, probs: np.ndarray,
                       classes: Sequence[str]) -> dict[str, dict[str, Any]]:
    """``{class: {"n", "logloss", "accuracy"}}`` over the rows of each true class.

    Classes without any labelled row are left out (their loss is undefined, and JSON has no NaN).
    """
    y, p = _check_inputs(y_true_idx, probs)
    if len(classes) != p.shape[1]:
        raise ValueError(f"{len(classes)} class names for {p.shape[1]} probability columns")
    losses = _sample_losses(y, p)
    hits = p.argmax(axis=1) == y
    out = {}
    for k, name in enumerate(classes):
        rows = y == k
        if rows.any():
            out[name] = {"n": int(rows.sum()), "logloss": float(losses[rows].mean()),
                         "accuracy": float(hits[rows].mean())}
    return out


def evaluate(y_true_idx: Sequence[int] | np.ndarray, probs: np.ndarray,
             classes: Sequence[str]) -> dict[str, Any]:
    """Metrics dict: ``logloss`` (Kaggle's), ``accuracy``, ``n`` and ``per_class``."""
    return {"logloss": ndsb_log_loss(y_true_idx, probs), "accuracy": accuracy(y_true_idx, probs),
            "n": int(len(probs)), "per_class": per_class_log_loss(y_true_idx, probs, classes)}


# ------------------------------------------------------------------------------ reading CSV


def _open_text(path: Path):
    # Decide by content, not name: gzip files start with the magic bytes 1f 8b.
    with open(path, "rb") as fh:
        gzipped = fh.read(2) == b"\x1f\x8b"
    if gzipped:
        return gzip.open(path, "rt", encoding="utf-8", newline="")
    return open(path, encoding="utf-8", newline="")


def read_header(path: str | os.PathLike) -> list[str]:
    """The first CSV row of ``path`` (.csv or .csv.gz), unmodified (duplicates kept)."""
    with _open_text(Path(path)) as fh:
        return next(csv.reader(fh), None) or []


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
    with _open_text(Path(path)) as fh:
        try:
            rows = pd.read_csv(fh, header=None, skiprows=1, dtype={0: str}, low_memory=False)
        except pd.errors.EmptyDataError:
            rows = pd.DataFrame()
    return header, rows


def read_sample(path: str | os.PathLike) -> tuple[list[str], list[str] | None]:
    """Class columns and image names (``None`` if it has no rows) of a sample submission."""
    header, rows = read_csv(path)
    if not header or header[0] != IMAGE_COLUMN:
        raise SubmissionError(f"{path}: sample submission must start with an "
                              f"'{IMAGE_COLUMN}' column, header is {header[:3]!r}...")
    images = None if rows.empty else rows[0].fillna("").astype(str).tolist()
    return header[1:], images


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
    except (OSError, EOFError, UnicodeDecodeError, csv.Error, pd.errors.ParserError) as exc:
        return [f"cannot read as CSV: {exc}"]
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
    duplicates = sorted(c for c, n in Counter(header).items() if n > 1)
    if duplicates:
        problems.append(f"duplicate column(s): {duplicates}")
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
        problems.append(f"missing class column(s): {_examples(missing, 10)}")
    if extra:
        problems.append(f"unexpected column(s): {_examples(extra, 10)}")
    if not (missing or extra or duplicates) and value_cols != expected:
        pos = next(i for i, (e, f) in enumerate(zip(expected, value_cols)) if e != f)
        problems.append(f"class columns are reordered: at class column {pos + 1} expected "
                        f"{expected[pos]!r}, found {value_cols[pos]!r} "
                        f"(columns must follow the sample submission's order)")
    return problems


def _check_images(names: list[str], images: Sequence[str] | None) -> list[str]:
    problems = []
    empty = [i + 2 for i, n in enumerate(names) if not n.strip()]
    if empty:
        problems.append(f"{len(empty)} row(s) with an empty image name (CSV lines "
                        f"{_examples(empty, EXAMPLES)})")
    duplicates = sorted(n for n, k in Counter(names).items() if k > 1 and n.strip())
    if duplicates:
        problems.append(f"duplicate image row(s): {len(duplicates)} image(s) appear more than "
                        f"once, e.g. {_examples(duplicates, EXAMPLES)}")
    if images is not None:
        present, expected = set(names), set(images)
        missing = [n for n in images if n not in present]
        extra = [n for n in names if n not in expected and n.strip()]
        if missing:
            problems.append(f"missing image row(s): {len(missing)}, e.g. "
                            f"{_examples(missing, EXAMPLES)}")
        if extra:
            problems.append(f"extra image row(s) not in the sample: {len(extra)}, e.g. "
                            f"{_examples(extra, EXAMPLES)}")
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
                            + _cell_examples(mask, rows, cols, names, labels))
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


def _cell_examples(mask: np.ndarray, rows: pd.DataFrame, cols: list[int], names: list[str],
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


def _examples(items: Sequence[Any], limit: int) -> str:
    shown = ", ".join(repr(x) for x in list(items)[:limit])
    return shown + (f" and {len(items) - limit} more" if len(items) > limit else "")


# --------------------------------------------------------------------------------- scoring


def score_submission(submission: str | os.PathLike, labels: str | os.PathLike
                     ) -> dict[str, Any]:
    """Validate ``submission`` and score it on the ``image,class`` CSV ``labels``.

    Every labelled image must have a row; submission rows without a label are not scored
    (Kaggle scored a hidden subset too) and are counted in ``n_unscored``.
    """
    problems = check_submission(submission)
    if problems:
        raise SubmissionError(f"{submission}: invalid submission:\n  " + "\n  ".join(problems))
    header, rows = read_csv(submission)
    image_col = header.index(IMAGE_COLUMN)
    classes = [c for c in header if c != IMAGE_COLUMN]
    value_cols = [j for j in range(len(header)) if j != image_col]
    probs = rows[value_cols].to_numpy(dtype=np.float64)
    row_of = {name: i for i, name in enumerate(rows[image_col].astype(str))}
    images, y = _read_labels(labels, classes, row_of)
    metrics = evaluate(y, probs[[row_of[n] for n in images]], classes)
    metrics["n_unscored"] = len(row_of) - len(images)
    return metrics


def _read_labels(path: str | os.PathLike, classes: list[str], row_of: Mapping[str, int]
                 ) -> tuple[list[str], np.ndarray]:
    table = pd.read_csv(path, dtype=str, keep_default_na=False)
    if list(table.columns[:2]) != [IMAGE_COLUMN, "class"]:
        raise SubmissionError(f"{path}: labels need columns 'image,class', "
                              f"got {list(table.columns)}")
    images, names = table[IMAGE_COLUMN].tolist(), table["class"].tolist()
    class_idx = {c: k for k, c in enumerate(classes)}
    problems = []
    duplicates = sorted(n for n, k in Counter(images).items() if k > 1)
    if duplicates:
        problems.append(f"duplicate labelled image(s): {_examples(duplicates, EXAMPLES)}")
    unknown = sorted(set(names) - set(class_idx))
    if unknown:
        problems.append(f"label class(es) not among the submission's columns: "
                        f"{_examples(unknown, 10)}")
    missing = [n for n in images if n not in row_of]
    if missing:
        problems.append(f"{len(missing)} labelled image(s) missing from the submission, e.g. "
                        f"{_examples(missing, EXAMPLES)}")
    if problems:
        raise SubmissionError(f"cannot score against {path}:\n  " + "\n  ".join(problems))
    return images, np.array([class_idx[c] for c in names], dtype=np.int64)


# ------------------------------------------------------------------------------------- CLI


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m pipeline.score", description=__doc__.split(
        "\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("submission", nargs="?", help="submission CSV(.gz) to score")
    parser.add_argument("labels", nargs="?", help="labels CSV with columns image,class")
    parser.add_argument("--out", help="metrics JSON to write (default: params score.out)")
    parser.add_argument("--check", metavar="FILE", help="only validate FILE and exit")
    parser.add_argument("--sample", metavar="SAMPLE.csv",
                        help="with --check: expect this sample submission's columns and rows")
    parser.add_argument("--params", default=params.PARAMS_FILE,
                        help="params file for defaults (optional unless given explicitly)")
    return parser


def main(argv: Sequence[str] | None = None) -> None:
    args = _parser().parse_args(argv)
    if args.check:
        _run_check(args.check, args.sample)
        return
    if args.sample:
        raise SystemExit("score: --sample is only used with --check")
    # The default params.yaml is optional here so the scorer also works outside the project.
    use_params = args.params != params.PARAMS_FILE or Path(args.params).exists()
    cfg = params.section("score", DEFAULTS, args.params) if use_params else DEFAULTS
    submission = args.submission or cfg["submission"]
    labels = args.labels or cfg["labels"]
    out = args.out or cfg["out"]
    try:
        metrics = score_submission(submission, labels)
    except (SubmissionError, OSError) as exc:
        raise SystemExit(f"score: {exc}") from None
    write_json(out, metrics)
    print(f"{submission}: logloss {metrics['logloss']:.5f} accuracy {metrics['accuracy']:.4f} "
          f"on {metrics['n']} images -> {out}")


def _run_check(path: str, sample: str | None) -> None:
    classes = images = None
    if sample:
        classes, images = read_sample(sample)
    problems = check_submission(path, classes, images)
    for problem in problems:
        print(f"{path}: {problem}", file=sys.stderr)
    if problems:
        raise SystemExit(1)
    print(f"{path}: OK")


if __name__ == "__main__":
    main()

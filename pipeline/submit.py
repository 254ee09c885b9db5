"""Turn the ensemble's test probabilities into a Kaggle submission file.

The header is ``image`` followed by the class names in the sample submission's order, which is
NOT alphabetical (nor necessarily meta's order): columns are matched by class NAME, never by
position, so a permuted class list cannot silently shift probabilities onto the wrong class.
Without a sample submission the ``meta.json`` class order is used. Rows are renormalized to sum
to 1 and written with 6 significant digits (Kaggle's 1e-15 clipping makes more digits useless),
gzip-compressed with a fixed timestamp so identical predictions give identical bytes (stable
DVC hashes). The written file is re-read and checked with
:func:`pipeline.lib.submission.check_submission`.

Run as ``python -m pipeline.submit``; options default to the ``submit`` section of params.yaml.
"""
from __future__ import annotations

import gzip
import io
import os
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd

from pipeline.lib import stage
from pipeline.lib.fsutil import atomic_path, sweep_stale
from pipeline.lib.names import describe_mismatch, duplicates
from pipeline.lib.predictions import load_prediction_file, row_indices
from pipeline.lib.records import load_meta
from pipeline.lib.runs import ENSEMBLE, artifact_name
from pipeline.lib.submission import IMAGE_COLUMN, SubmissionError, check_submission, read_sample

FLOAT_FORMAT = "%.6g"



def build_submission(probs: np.ndarray, names: Sequence[str], classes: Sequence[str],
                     test_images: Sequence[str] | None = None,
                     sample_classes: Sequence[str] | None = None,
                     sample_images: Sequence[str] | None = None) -> pd.DataFrame:
    """Submission table: ``image`` + one column per class, one normalized row per image.

    ``probs`` has rows ``names`` and columns ``classes`` (meta order). Columns follow
    ``sample_classes`` when given (matched by name; the two class sets must be equal), else
    ``classes``. Rows follow ``sample_images`` when given, else ``test_images``, else ``names``;
    the predicted images must be exactly those rows.
    """
    probs = np.asarray(probs, dtype=np.float64)
    if probs.ndim != 2 or probs.shape != (len(names), len(classes)):
        raise SubmissionError(f"predictions have shape {probs.shape}, expected "
                          f"({len(names)} names, {len(classes)} classes)")
    columns = _column_order(classes, sample_classes)
    rows = list(sample_images if sample_images is not None
                else test_images if test_images is not None else names)
    source = ("the sample submission" if sample_images is not None
              else "meta.json test images" if test_images is not None else "the names")
    try:
        order = row_indices(names, rows, "the predicted images", source)
    except ValueError as exc:
        raise SubmissionError(str(exc)) from None
    col_index = {c: k for k, c in enumerate(classes)}
    values = normalize_rows(probs[np.ix_(order, [col_index[c] for c in columns])])
    frame = pd.DataFrame(values, columns=columns)
    frame.insert(0, IMAGE_COLUMN, rows)
    return frame


def normalize_rows(probs: np.ndarray) -> np.ndarray:
    """Divide each row by its sum; NaN, infinite, negative or all-zero rows are an error.

    Bad values are refused rather than repaired: they mean a bug upstream, and a "fixed"
    uniform row would hide it while costing log loss.
    """
    problems = []
    if not np.isfinite(probs).all():
        problems.append(f"{int((~np.isfinite(probs)).sum())} NaN or infinite value(s)")
    elif (probs < 0).any():
        problems.append(f"{int((probs < 0).sum())} negative value(s)")
    elif (probs.sum(axis=1) <= 0).any():
        problems.append(f"{int((probs.sum(axis=1) <= 0).sum())} all-zero row(s)")
    if problems:
        raise SubmissionError("predictions contain " + ", ".join(problems))
    return probs / probs.sum(axis=1, keepdims=True)


def _column_order(classes: Sequence[str], sample_classes: Sequence[str] | None) -> list[str]:
    if duplicates(classes):
        raise SubmissionError(f"meta.json classes contain duplicates: {duplicates(classes)}")
    if sample_classes is None:
        return list(classes)
    repeated = duplicates(sample_classes)
    in_sample, in_meta = set(sample_classes), set(classes)
    missing = [c for c in classes if c not in in_sample]
    extra = [c for c in sample_classes if c not in in_meta]
    if missing or extra or repeated:
        raise SubmissionError("sample submission classes differ from meta.json classes: "
                          + describe_mismatch(missing, extra, repeated, limit=10)
                          + " (missing = in meta.json but not in the sample; extra = in the "
                          "sample but not in meta.json)")
    return list(sample_classes)


def write_submission(frame: pd.DataFrame, out: str | os.PathLike, plain_csv: bool = False
                     ) -> Path:
    """Atomically write ``frame`` as CSV to ``out``: gzip unless ``plain_csv``; return the path.

    ``out`` must end in ``.gz`` exactly when the file is gzipped, so the name never lies.
    """
    out = Path(out)
    if plain_csv == out.name.endswith(".gz"):
        raise SubmissionError(f"out={out} but plain_csv={plain_csv}: use a .csv.gz name for gzip "
                          f"output and a .csv name with plain_csv: true")
    with atomic_path(out) as tmp, open(tmp, "wb") as raw:
        if plain_csv:
            _write_csv(frame, raw)
        else:
            # filename="" and mtime=0 keep the gzip header free of the temporary name and the
            # clock, so the same predictions always produce the same bytes. Level 6 instead of
            # 9: much faster for a slightly larger file on '%.6g' rows.
            with gzip.GzipFile(filename="", mode="wb", fileobj=raw, mtime=0,
                               compresslevel=6) as gz:
                _write_csv(frame, gz)
    return out


def _write_csv(frame: pd.DataFrame, binary) -> None:
    text = io.TextIOWrapper(binary, encoding="utf-8", newline="")
    frame.to_csv(text, index=False, float_format=FLOAT_FORMAT, lineterminator="\n")
    text.flush()
    text.detach()  # leave closing the binary stream to its owner


def submit(predictions: str | os.PathLike, records: str | os.PathLike,
                    out: str | os.PathLike, sample_submission: str | os.PathLike | None = None,
                    plain_csv: bool = False) -> pd.DataFrame:
    """Read predictions, the records' meta.json and the optional sample; write and verify the
    submission.

    Without ``sample_submission``, the rows are those of the ``sampleSubmission.csv`` that
    ingest found in ``data.root`` (``meta.json``), when there was one: a test image skipped at
    ingest (``data.skip_bad``) then fails here, naming it, instead of leaving a submission
    with fewer rows than Kaggle expects.
    """
    probs, names = load_prediction_file(predictions)
    info = load_meta(records)
    sample_classes = sample_images = None
    if sample_submission:
        sample_classes, sample_images = read_sample(sample_submission)
    elif isinstance(info.get("sample_submission"), dict) \
            and info["sample_submission"].get("images") is not None:
        sample_images = list(info["sample_submission"]["images"])
    test_images = [t["name"] for t in info["test"]]
    frame = build_submission(probs, names, info["classes"], test_images,
                             sample_classes, sample_images)
    sweep_stale("submit", Path(out).parent)
    write_submission(frame, out, plain_csv)
    problems = check_submission(out, list(frame.columns[1:]), list(frame[IMAGE_COLUMN]))
    if problems:
        raise SubmissionError(f"{out}: written file failed validation: " + "; ".join(problems))
    return frame


def _run(cfg, args) -> str:
    out = cfg.paths.submission
    frame = submit(cfg.paths.ensemble / f"{artifact_name('test', ENSEMBLE, None)}.npy",
                   cfg.paths.records, out, cfg.submit.sample_submission, cfg.submit.plain_csv)
    return f"wrote {out}: {len(frame)} images x {frame.shape[1] - 1} classes"


def main(argv: Sequence[str] | None = None) -> None:
    stage.run("submit", ("submit", "paths"), _run, argv, doc=__doc__)


if __name__ == "__main__":
    main()

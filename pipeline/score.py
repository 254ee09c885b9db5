"""The score stage: validate a submission the way Kaggle did and score it on known labels.

The metric (:func:`pipeline.lib.metrics.ndsb_log_loss`, Kaggle's clipped and renormalized log
loss) and the validator (:func:`pipeline.lib.submission.check_submission`) live in the library,
shared with the stages that write what is scored here.

CLI::

    python -m pipeline.score [SUBMISSION LABELS] [--out metrics/score.json]
    python -m pipeline.score --check FILE [--sample SAMPLE.csv]

Scoring mode falls back to the ``score`` section of ``params.yaml`` for any argument not given;
LABELS is a CSV with columns ``image,class`` (class = name). Check mode exits 1 after printing
one line per problem.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from pipeline.lib import stage
from pipeline.lib.errors import PipelineError
from pipeline.lib.fsutil import sweep_stale, write_json
from pipeline.lib.metrics import evaluate
from pipeline.lib.names import duplicates, examples
from pipeline.lib.submission import (EXAMPLES, IMAGE_COLUMN, SubmissionError, check_submission,
                                     read_csv, read_sample, read_table)



# --------------------------------------------------------------------------------- scoring


def score(submission: str | os.PathLike, labels: str | os.PathLike
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
    table = read_table(path, dtype=str, keep_default_na=False)
    if list(table.columns[:2]) != [IMAGE_COLUMN, "class"]:
        raise SubmissionError(f"{path}: labels need columns 'image,class', "
                              f"got {list(table.columns)}")
    if table.empty:
        raise SubmissionError(f"{path}: no labelled images below the 'image,class' header")
    images, names = table[IMAGE_COLUMN].tolist(), table["class"].tolist()
    class_idx = {c: k for k, c in enumerate(classes)}
    problems = []
    repeated = duplicates(images)
    if repeated:
        problems.append(f"duplicate labelled image(s): {examples(repeated, EXAMPLES)}")
    unknown = sorted(set(names) - set(class_idx))
    if unknown:
        problems.append(f"label class(es) not among the submission's columns: "
                        f"{examples(unknown, 10)}")
    missing = [n for n in images if n not in row_of]
    if missing:
        problems.append(f"{len(missing)} labelled image(s) missing from the submission, e.g. "
                        f"{examples(missing, EXAMPLES)}")
    if problems:
        raise SubmissionError(f"cannot score against {path}:\n  " + "\n  ".join(problems))
    return images, np.array([class_idx[c] for c in names], dtype=np.int64)


# ------------------------------------------------------------------------------------- CLI


class ScoreError(PipelineError):
    """The command line asks for something the scorer cannot do."""


def _arguments(parser) -> None:
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.add_argument("submission", nargs="?", help="submission CSV(.gz) to score "
                        "(default: paths.submission)")
    parser.add_argument("labels", nargs="?", help="labels CSV with columns image,class "
                        "(default: score.labels)")
    parser.add_argument("--out", help="metrics JSON to write (default: score.json in "
                        "paths.metrics)")
    parser.add_argument("--check", metavar="FILE", help="only validate FILE and exit")
    parser.add_argument("--sample", metavar="SAMPLE.csv",
                        help="with --check: expect this sample submission's columns and rows")


def _run(cfg, args) -> str | None:
    if args.check:
        _run_check(args.check, args.sample)
        return None
    if args.sample:
        raise ScoreError("--sample is only used with --check")
    submission = args.submission or cfg.paths.submission
    labels = args.labels or cfg.score.labels
    out = args.out or cfg.paths.metrics_file("score")
    metrics = score(submission, labels)
    sweep_stale("score", Path(out).parent)
    write_json(out, metrics)
    return (f"{submission}: logloss {metrics['logloss']:.5f} accuracy {metrics['accuracy']:.4f} "
            f"on {metrics['n']} images -> {out}")


def main(argv: Sequence[str] | None = None) -> None:
    # The default params.yaml is optional here, so the scorer also works outside the project.
    stage.run("score", ("score", "paths"), _run, argv, doc=__doc__, arguments=_arguments,
              params_optional=True)


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

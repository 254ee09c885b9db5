"""What the study tools share (:mod:`pipeline.tools.recipe_study`,
:mod:`pipeline.tools.schedule_study`): each run's outputs in a folder of its own, and the
stage commands it runs logged there."""
from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any, Sequence

from pipeline.lib.errors import PipelineError

ROOT = Path(__file__).resolve().parents[2]


class StudyError(PipelineError, ValueError):
    """A study that cannot run as asked (bad arguments, no baseline, a failed stage)."""


def point_paths(params: dict[str, Any], records: Path, run_dir: Path) -> None:
    """Make ``params`` (a params.yaml as a dict) read ``records`` and write every output of
    the run under ``run_dir``, so runs never share checkpoints or metrics."""
    params["paths"].update(records=str(records), checkpoints=str(run_dir / "checkpoints"),
                           metrics=str(run_dir / "metrics"), plots=str(run_dir / "plots"),
                           predictions=str(run_dir / "predictions"))


def sh(cmd: Sequence[str], log: Path) -> None:
    """Run ``cmd`` from the repository, its output appended to ``log``; a failure is a
    :class:`StudyError` naming the log."""
    with open(log, "a") as out:
        out.write("$ " + " ".join(cmd) + "\n")
        out.flush()
        code = subprocess.call(cmd, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT)
    if code:
        raise StudyError(f"{' '.join(cmd)} failed (exit {code}); see {log}")

"""End to end: ``dvc repro`` of the real dvc.yaml on a tiny synthetic NDSB folder.

The project's stage code, dvc.yaml and params.yaml are copied into a fresh git + DVC repo;
only ``data.root`` (and settings that make it fast) change, as a user would change them. The
run must end with everything up to date on a second ``dvc repro``.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.conftest import ROOT

pytestmark = pytest.mark.slow


def _sh(cmd: list[str], cwd: Path, env: dict[str, str]) -> str:
    result = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=1200)
    assert result.returncode == 0, f"{cmd} failed:\n{result.stdout}\n{result.stderr}"
    return result.stdout + result.stderr


def tiny_params(params: dict, root: Path) -> dict:
    """The repository's params with data.root at ``root`` and fast settings for 2 cores."""
    params["data"].update(root=str(root), size=32, folds=2)
    overrides = {
        "models": {"nets": ["lenet"], "folds": [0, 1]},
        "train": {"epochs": 2, "batch_size": 8, "lr_steps": [1], "workers": 1},
        "tta": {"n": 4},
        "score": {"labels": str(root / "test_labels.csv")},
    }
    for section, values in overrides.items():
        if section in params:
            params[section].update({k: v for k, v in values.items() if k in params[section]})
    return params


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> tuple[Path, dict, dict[str, str], Path]:
    """(repo, params, env, data): the project in a fresh git + DVC repo after ``dvc repro``.

    The run's results (dvc.lock, metrics, plots) are committed, as a user commits a baseline
    before experimenting.
    """
    from pipeline.tools.synth import generate

    tmp_path = tmp_path_factory.mktemp("dvc")
    data = tmp_path / "ndsb"
    generate(data, classes=3, per_class=8, test=6, seed=3, max_size=80)
    repo = tmp_path / "repo"
    repo.mkdir()
    for item in ("pipeline", "nets", "dvc.yaml", ".dvc/config", ".gitignore"):
        src = ROOT / item
        if not src.exists():
            continue
        dest = repo / item
        dest.parent.mkdir(parents=True, exist_ok=True)
        (shutil.copytree if src.is_dir() else shutil.copy)(
            src, dest, **({"ignore": shutil.ignore_patterns("__pycache__")}
                          if src.is_dir() else {}))
    params = tiny_params(yaml.safe_load((ROOT / "params.yaml").read_text()), data)
    (repo / "params.yaml").write_text(yaml.safe_dump(params))

    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}:{os.environ['PATH']}",
               DVC_NO_ANALYTICS="1", OMP_NUM_THREADS="2", GIT_AUTHOR_NAME="test",
               GIT_AUTHOR_EMAIL="test@example.com", GIT_COMMITTER_NAME="test",
               GIT_COMMITTER_EMAIL="test@example.com")
    _sh(["git", "init", "-q", "-b", "main"], repo, env)
    _sh(["git", "config", "user.name", "test"], repo, env)
    _sh(["git", "config", "user.email", "test@example.com"], repo, env)
    _sh(["dvc", "repro", *_finals()], repo, env)
    _sh(["git", "add", "-A"], repo, env)
    _sh(["git", "commit", "-qm", "baseline"], repo, env)
    return repo, params, env, data


def _finals() -> list[str]:
    stages = list(yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"])
    # Every stage downstream of ingest (the sample stage fetches the real sample instead).
    return [s for s in ("score", "report") if s in stages] or [stages[-1]]


def test_dvc_repro_on_tiny_synthetic_folder(project):
    repo, params, env, data = project
    stages = list(yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"])
    second = _sh(["dvc", "status", *_finals()], repo, env)
    assert "up to date" in second, second

    meta = json.loads((repo / params["data"]["records"] / "meta.json").read_text())
    assert len(meta["train"]) == 24 and len(meta["test"]) == 6
    sample_header = (data / "sampleSubmission.csv").read_text().splitlines()[0].split(",")[1:]
    assert meta["classes"] == sample_header

    if "score" in stages:  # the whole chain: records -> ... -> a scored, valid submission
        from pipeline.score import check_submission

        submission = repo / params["submit"]["out"]
        assert check_submission(submission, classes=sample_header,
                                images=[t["name"] for t in meta["test"]]) == []
        score = json.loads((repo / params["score"]["out"]).read_text())
        assert score["n"] == 6 and 0 < score["logloss"] < 10
        ensemble = json.loads((repo / params["ensemble"]["metrics"]).read_text())
        assert ensemble["weights"] == {"lenet": 1.0}

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
import time
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
        "models": {"nets": ["lenet"], "folds": [0, 1], "seeds": [0, 1],
                   "pseudo_nets": ["lenet"]},
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

    paths = params["paths"]
    meta = json.loads((repo / paths["records"] / "meta.json").read_text())
    assert len(meta["train"]) == 24 and len(meta["test"]) == 6
    sample_header = (data / "sampleSubmission.csv").read_text().splitlines()[0].split(",")[1:]
    assert meta["classes"] == sample_header

    if "score" in stages:  # the whole chain: records -> ... -> a scored, valid submission
        from pipeline.score import check_submission

        submission = repo / paths["submission"]
        assert check_submission(submission, classes=sample_header,
                                images=[t["name"] for t in meta["test"]]) == []
        score = json.loads((repo / paths["metrics"] / "score.json").read_text())
        assert score["n"] == 6 and 0 < score["logloss"] < 10
        ensemble = json.loads((repo / paths["metrics"] / "ensemble.json").read_text())
        # Two seeds per net, averaged before weighting; the second round blended as a net.
        assert set(ensemble["weights"]) == {"lenet", "lenet-pl"}
        assert set(ensemble["seeds"]["lenet"]["members"]) == {"lenet-seed0", "lenet-seed1"}
        assert set(ensemble["seeds"]["lenet-pl"]["members"]) == {"lenet-pl-seed0",
                                                                "lenet-pl-seed1"}
        pseudo = json.loads((repo / paths["metrics"] / "pseudo.json").read_text())
        assert pseudo["members"] == ["lenet-seed0", "lenet-seed1"] and pseudo["folds"] == [0, 1]


def _stale(repo: Path, env: dict[str, str]) -> set[str]:
    """The stages ``dvc status`` reports as changed."""
    status = json.loads(_sh(["dvc", "status", "--json", "--with-deps", *_finals()], repo, env))
    return {name.split("@")[0] for name in status}


def test_how_and_where_keys_leave_every_stage_up_to_date(project):
    """Loader workers and the TTA scratch folder change no result: no stage is stale after
    changing them. pseudo.fraction changes the second round: train_pl is stale, train not."""
    repo, params, env, _ = project
    original = (repo / "params.yaml").read_text()
    try:
        changed = yaml.safe_load(original)
        changed["train"]["workers"] = 0
        changed["tta"]["work"] = "elsewhere/work"
        changed["tta"]["chunk_images"] = 3
        changed["data"]["workers"] = 1
        (repo / "params.yaml").write_text(yaml.safe_dump(changed))
        assert _stale(repo, env) == set()
        changed["pseudo"]["fraction"] = 0.5
        (repo / "params.yaml").write_text(yaml.safe_dump(changed))
        stale = _stale(repo, env)
        assert "train_pl" in stale and "train" not in stale and "predict" not in stale, stale
    finally:
        (repo / "params.yaml").write_text(original)
    assert _stale(repo, env) == set()


def _experiments(show: list[dict]) -> dict[str, dict]:
    """``{name: data}`` of the baseline (``main``) and every experiment in ``dvc exp show``."""
    found = {}
    for entry in show:
        if entry.get("name"):
            found[entry["name"]] = entry["data"]
        for group in entry.get("experiments") or []:
            for rev in group["revs"]:
                found[rev["name"]] = rev["data"]
    return found


def _train_metrics(data: dict, fold: int = 0) -> dict:
    return data["metrics"][f"metrics/train--lenet-seed0--fold{fold}.json"]["data"]


def test_experiments_show_their_own_params_and_metrics(project):
    """What a user does to tune: an experiment in the workspace, one queued (temp workspace).

    Each must be trained with its own settings (fewer epochs than the baseline's checkpoint:
    its epoch is used; more: the checkpoint restored in the queue's temporary workspace is
    extended) and ``dvc exp show``/``exp diff``/``plots diff`` must show its metrics and
    curves beside the baseline's.
    """
    repo, _, env, _ = project
    small = ["-S", "models.seeds=[0]", "-S", "models.pseudo_nets=[]"]  # one model per fold
    # Up to the ensemble, the stage whose metrics a tuning run compares (the stages after it
    # ran in the baseline; the whole chain is test_dvc_repro_on_tiny_synthetic_folder's).
    _sh(["dvc", "exp", "run", "-n", "fewer", *small, "-S", "train.epochs=1", "-S", "tta.n=2",
         "ensemble"], repo, env)
    # A queued experiment starts from the workspace, where the last one's results were applied.
    _sh(["dvc", "exp", "run", "--queue", "-n", "queued", *small, "-S", "train.epochs=3",
         "ensemble"], repo, env)
    _sh(["dvc", "queue", "start"], repo, env)
    deadline = time.monotonic() + 900
    while True:
        status = _sh(["dvc", "queue", "status"], repo, env)
        row = next((line for line in status.splitlines() if " queued " in f" {line} "), "")
        if "Success" in row or "Failed" in row or time.monotonic() > deadline:
            break
        time.sleep(2)
    assert "Success" in row, status + _sh(["dvc", "queue", "logs", "queued"], repo, env)

    runs = _experiments(json.loads(_sh(["dvc", "exp", "show", "--json"], repo, env)))
    assert {"main", "fewer", "queued"} <= set(runs), sorted(runs)
    for name, epochs, tta_n, lr in (("main", 2, 4, 0.01), ("fewer", 1, 2, 0.01),
                                    ("queued", 3, 2, 0.01)):  # tta.n of the workspace
        params = runs[name]["params"]["params.yaml"]["data"]
        assert (params["train"]["epochs"], params["tta"]["n"], params["train"]["lr"]) == (
            epochs, tta_n, lr), name
        for fold in (0, 1):  # the metrics say what was trained, fold by fold
            assert _train_metrics(runs[name], fold)["epochs"] == epochs, (name, fold)
        predict = runs[name]["metrics"]["metrics/predict--lenet-seed0--fold0.json"]["data"]
        assert predict["tta_n"] == tta_n, name
        assert "logloss" in runs[name]["metrics"]["metrics/ensemble.json"]["data"]["ensemble"]
    # The 1-epoch run used epoch 1 of the baseline's checkpoint (the same weights); the
    # queued 3-epoch run extended the checkpoint of the workspace it was queued from.
    assert _train_metrics(runs["fewer"])["origin"] == "epoch 1 of an earlier 2-epoch run"
    assert _train_metrics(runs["queued"])["origin"] == "resumed after epoch 1"

    diff = json.loads(_sh(["dvc", "exp", "diff", "main", "fewer", "--json"], repo, env))
    assert diff["metrics"]["metrics/train--lenet-seed0--fold0.json"]["epochs"] == {
        "old": 2, "new": 1, "diff": -1}
    plots = json.loads(_sh(["dvc", "plots", "diff", "main", "queued", "--json"], repo, env))
    curve = plots["data"]["plots/train--lenet-seed0--fold0.tsv"][0]["content"]["data"]["values"]
    epochs = {(row["rev"], int(row["epoch"])) for row in curve}
    assert {("main", 2), ("queued", 3)} <= epochs and ("main", 3) not in epochs

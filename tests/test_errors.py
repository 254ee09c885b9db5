"""One convention for every stage: an error the user caused ends in ONE line
``<stage> failed: ...`` on stderr and exit code 1, never a traceback."""
from __future__ import annotations

import errno
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.lib.errors import PipelineError, describe_os_error, one_line, stage_errors

ROOT = Path(__file__).resolve().parents[1]


def test_one_line_joins_a_listed_message():
    assert one_line("3 files missing:\n  a\n  b\n  c") == "3 files missing: a; b; c"
    assert one_line("first problem\nsecond problem") == "first problem; second problem"
    assert one_line("plain") == "plain"


def test_stage_errors_turns_project_and_os_errors_into_one_line():
    with pytest.raises(SystemExit, match=r"^train failed: bad: x; y$"):
        with stage_errors("train"):
            raise PipelineError("bad:\n  x\n  y")
    with pytest.raises(SystemExit, match=r"^ingest failed: No such file or directory: /nope$"):
        with stage_errors("ingest"):
            open("/nope")
    full = OSError(errno.ENOSPC, "No space left on device", "/data/x.rec")
    assert describe_os_error(full) == "no space left on the device of /data/x.rec"
    with pytest.raises(KeyError):  # a bug keeps its traceback
        with stage_errors("train"):
            raise KeyError("bug")


@pytest.fixture()
def project(tmp_path: Path) -> Path:
    shutil.copy(ROOT / "params.yaml", tmp_path / "params.yaml")
    return tmp_path


@pytest.mark.parametrize("stage,args,expected", [
    ("ingest", [], "data.root data/sample/ndsb is not a folder"),
    ("train", ["--net", "tinynet", "--fold", "0"], "run the ingest stage first"),
    ("predict", ["--net", "tinynet", "--fold", "0"], "run the ingest stage first"),
    ("ensemble", ["--set", "models.nets=[tinynet]", "--set", "models.pseudo_nets=[]"],
     "run the ingest stage first"),
    ("submit", [], "predictions/test--ensemble.npy"),
    ("score", [], "submissions/submission.csv.gz"),
])
def test_each_stage_reports_missing_inputs_in_one_line(project, stage, args, expected):
    done = subprocess.run([sys.executable, "-m", f"pipeline.{stage}", *args], cwd=project,
                          capture_output=True, text=True, timeout=300)
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert done.returncode == 1, done.stderr[-3000:]
    assert lines[-1].startswith(f"{stage} failed: ") and expected in lines[-1], done.stderr
    assert "Traceback" not in done.stderr


def test_unknown_net_and_bad_params_are_one_line_errors(project):
    text = (project / "params.yaml").read_text().replace("  bn: true\n", "  bn: true\n  bogus: 1\n")
    (project / "params.yaml").write_text(text)
    done = subprocess.run([sys.executable, "-m", "pipeline.train", "--net", "tinynet", "--fold",
                           "0"], cwd=project, capture_output=True, text=True, timeout=300)
    assert done.returncode == 1 and "Traceback" not in done.stderr
    assert done.stderr.strip().splitlines()[-1].startswith(
        "train failed: params.yaml: train: unknown key(s) ['bogus']; valid keys: ")


def test_ctrl_c_to_a_stage_outside_its_graceful_stop_is_one_line_and_130(tmp_path):
    """ingest (whose worker pool gets the group's SIGINT too) stops in one line, exit 130,
    with no traceback from the parent or any worker."""
    import os
    import signal
    import time

    from pipeline.tools.synth import generate

    generate(tmp_path / "ndsb", classes=3, per_class=400, test=100, seed=1, max_size=300)
    (tmp_path / "params.yaml").write_text(
        f"data:\n  root: {tmp_path / 'ndsb'}\n  workers: 2\n  folds: 2\n"
        f"paths:\n  records: {tmp_path / 'records'}\nmodels:\n  folds: [0, 1]\n")
    proc = subprocess.Popen([sys.executable, "-m", "pipeline.ingest"], cwd=tmp_path,
                            env=dict(os.environ, PYTHONPATH=str(ROOT)), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    deadline = time.time() + 120
    while not list((tmp_path / "records").glob(".train.rec.tmp*")) and time.time() < deadline:
        assert proc.poll() is None
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err[-2000:]
    assert "Traceback" not in err and "KeyboardInterrupt" not in err, err[-2000:]
    assert err.strip().splitlines()[-1].startswith("ingest stopped: interrupted (SIGINT)"), repr(err[-600:])
    assert not (tmp_path / "records" / "meta.json").exists()

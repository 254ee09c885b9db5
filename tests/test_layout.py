"""The layout keeps its promises: every file a stage's imports reach is in its dvc.yaml deps,
stages never import each other, the library never imports a stage or a tool, nets never import
the pipeline, and ``pipeline/`` holds the stages (plus command aliases of moved tools) only."""
from __future__ import annotations

import ast
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import yaml

from pipeline.tools import stagedeps

ROOT = Path(__file__).resolve().parents[1]
ALIASES = {"bench", "classify", "launch", "synth"}  # `python -m pipeline.X` of tools


def test_every_file_a_stage_reaches_is_in_its_deps_and_no_code_dep_is_stale():
    results, layering = stagedeps.check(ROOT)
    assert {r.stage for r in results} >= {"sample", "ingest", "train", "predict", "ensemble",
                                          "submit", "score", "report"}
    missing = [(r.stage, f) for r in results for f in r.missing]
    stale = [(r.stage, d) for r in results for d in r.stale]
    assert not missing, f"add to dvc.yaml deps: {missing}"
    assert not stale, f"remove from dvc.yaml deps (not imported): {stale}"
    assert not layering, layering


def test_pipeline_folder_holds_the_dvc_stages_and_command_aliases_only():
    dvc = yaml.safe_load((ROOT / "dvc.yaml").read_text())
    stages = {m.split(".")[-1] for m in stagedeps.stage_modules(dvc).values()}
    modules = {p.stem for p in (ROOT / "pipeline").glob("*.py")} - {"__init__"}
    assert modules == stages | ALIASES
    for alias in ALIASES:
        body = ast.parse((ROOT / "pipeline" / f"{alias}.py").read_text()).body
        # a docstring and one `if __name__ == "__main__":` that runs the tool: nothing else
        assert len(body) == 2 and isinstance(body[1], ast.If), alias
        assert f"pipeline.tools.{alias}" in ast.unparse(body[1])


@pytest.mark.parametrize("alias", sorted(ALIASES))
def test_old_tool_commands_still_run(alias):
    done = subprocess.run([sys.executable, "-m", f"pipeline.{alias}", "--help"], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "usage:" in done.stdout


def _project(tmp_path: Path, files: dict[str, str], deps: list[str]) -> Path:
    for name, text in files.items():
        path = tmp_path / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text))
    stages = {"one": {"cmd": "python -m pipeline.one --x ${item.net}", "deps": deps},
              "two": {"cmd": "python -m pipeline.two", "deps": ["pipeline/two.py"]}}
    (tmp_path / "dvc.yaml").write_text(yaml.safe_dump({"stages": stages}))
    (tmp_path / "params.yaml").write_text(yaml.safe_dump({"code": {"lib": "pipeline/lib"}}))
    return tmp_path


def test_checker_finds_drift_deferred_and_relative_imports_and_layering(tmp_path):
    root = _project(tmp_path, {
        "pipeline/__init__.py": '"""Docs only: runs nothing, so no dep is needed."""\n',
        "pipeline/lib/__init__.py": "VERSION = 1  # runs code: stages that import lib need it\n",
        "pipeline/lib/a.py": "from . import b\n",
        "pipeline/lib/b.py": "def f():\n    from pipeline.two import main  # library -> stage\n",
        "pipeline/lib/unused.py": "",
        "pipeline/one.py": "def main():\n    from pipeline.lib import a\n",
        "pipeline/two.py": "import pipeline.one\n",
        "nets/__init__.py": "from pipeline.lib import a\n",
    }, deps=["pipeline/one.py", "pipeline/lib/a.py", "pipeline/lib/unused.py", "nets"])
    results, layering = stagedeps.check(root)
    one = next(r for r in results if r.stage == "one")
    assert one.missing == ["pipeline/lib/__init__.py", "pipeline/lib/b.py", "pipeline/two.py"]
    assert one.stale == ["pipeline/lib/unused.py", "nets"]
    two = next(r for r in results if r.stage == "two")
    assert "pipeline/one.py" in two.reached
    assert "stage pipeline.two imports stage pipeline.one" in layering
    assert "library module pipeline.lib.b imports pipeline.two" in layering
    assert "nets module nets imports pipeline.lib" in layering


def test_checker_interpolates_params_in_deps(tmp_path):
    root = _project(tmp_path, {"pipeline/one.py": "import pipeline.lib.a\n",
                               "pipeline/two.py": "", "pipeline/lib/a.py": ""},
                    deps=["pipeline/one.py", "${code.lib}"])
    results, _ = stagedeps.check(root)
    assert all(not r.missing and not r.stale for r in results)


def test_checker_cli_exits_1_naming_each_problem(tmp_path):
    root = _project(tmp_path, {"pipeline/one.py": "import pipeline.lib.a\n",
                               "pipeline/two.py": "", "pipeline/lib/a.py": ""},
                    deps=["pipeline/one.py"])
    done = subprocess.run([sys.executable, "-m", "pipeline.tools.stagedeps", "--root",
                           str(root)], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 1
    assert "stage one: pipeline/lib/a.py is reached but not in deps" in done.stderr

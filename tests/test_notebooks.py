"""The notebooks run top to bottom on a real (tiny) run, share one setup cell, import only the
library, and are committed without outputs.

Each notebook is executed by nbclient in a kernel of *this* interpreter (a kernelspec written to
a temporary ``JUPYTER_PATH``, so neither a user-level ``python3`` kernel nor ``python`` on PATH
can substitute another environment), with ``NDSB_ROOT`` pointing at the session's tiny run
(:func:`tests.test_report.build_run`: CI starts from a clone without outputs).
"""
from __future__ import annotations

import ast
import json
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import ROOT
from tests.test_report import tiny_run  # noqa: F401  (session fixture shared with the report)

NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))
KERNEL = "ndsb-test"
CELL_TIMEOUT = 120   # seconds per cell
NOTEBOOK_BUDGET = 120  # seconds per notebook, kernel start included
# Figures each notebook shows on a run with originals, two nets and two activations.
FIGURES = {"01_data": 6, "02_training": 2, "03_predictions": 6}


def test_the_three_notebooks_exist():
    assert [p.name for p in NOTEBOOKS] == ["01_data.ipynb", "02_training.ipynb",
                                           "03_predictions.ipynb"]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_is_committed_without_outputs(path: Path):
    nb = json.loads(path.read_text(encoding="utf-8"))
    code = [c for c in nb["cells"] if c["cell_type"] == "code"]
    assert code, f"{path.name} has no code cells"
    dirty = [i for i, c in enumerate(code) if c.get("outputs") or c.get("execution_count")]
    assert not dirty, f"{path.name}: code cells {dirty} hold outputs; clear them before committing"


def _code(path: Path) -> list[str]:
    nb = json.loads(path.read_text(encoding="utf-8"))
    return ["".join(c["source"]) for c in nb["cells"] if c["cell_type"] == "code"]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_starts_with_the_shared_setup_and_imports_the_library_only(path: Path):
    code = _code(path)
    assert "cfg, meta = setup()" in code[0].splitlines()
    assert "from pipeline.lib.notebook import setup" in code[0]
    assert len(code[0].splitlines()) <= 12, "the setup belongs in pipeline.lib.notebook"
    imported = set()
    for cell in code:
        tree = ast.parse("\n".join(line for line in cell.splitlines()
                                    if not line.lstrip().startswith(("%", "!"))))
        imported |= {node.module for node in ast.walk(tree)
                     if isinstance(node, ast.ImportFrom) and node.module}
        imported |= {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import)
                     for alias in node.names}
    project = {m for m in imported if m.split(".")[0] in ("pipeline", "nets")}
    assert project and all(m.startswith("pipeline.lib") for m in project), project


@pytest.mark.slow
def test_setup_finds_the_project_from_the_notebook_folder(tiny_run: Path,  # noqa: F811
                                                          monkeypatch, capsys):
    from pipeline.lib import notebook

    monkeypatch.delenv(notebook.ROOT_VARIABLE, raising=False)
    assert notebook.enclosing_project(ROOT / "notebooks") == ROOT
    assert notebook.project_root(ROOT / "notebooks") == ROOT
    assert notebook.enclosing_project(tiny_run) is None  # a run folder holds no code
    monkeypatch.setenv(notebook.ROOT_VARIABLE, str(tiny_run))
    assert notebook.project_root(ROOT / "notebooks") == tiny_run.resolve()
    monkeypatch.chdir(ROOT / "notebooks")
    cfg, meta = notebook.setup()
    assert cfg.root == tiny_run.resolve() and cfg.records == tiny_run.resolve() / "data/records"
    assert len(meta["classes"]) == 4
    assert str(tiny_run.resolve()) in capsys.readouterr().out


@pytest.fixture(scope="module")
def kernel_dir(tmp_path_factory) -> Path:
    """A ``JUPYTER_PATH`` whose only kernel runs ``sys.executable -m ipykernel_launcher``."""
    base = tmp_path_factory.mktemp("jupyter")
    spec = base / "kernels" / KERNEL
    spec.mkdir(parents=True)
    (spec / "kernel.json").write_text(json.dumps({
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "ndsb tests", "language": "python"}))
    return base


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_runs_on_a_tiny_run(path: Path, tiny_run: Path,  # noqa: F811
                                     kernel_dir: Path, monkeypatch):
    import nbformat
    from nbclient import NotebookClient

    monkeypatch.setenv("JUPYTER_PATH", str(kernel_dir))
    monkeypatch.setenv("NDSB_ROOT", str(tiny_run))
    nb = nbformat.read(path, as_version=4)
    client = NotebookClient(nb, kernel_name=KERNEL, timeout=CELL_TIMEOUT,
                            startup_timeout=60, allow_errors=False,
                            resources={"metadata": {"path": str(path.parent)}})
    started = time.perf_counter()
    client.execute()  # raises CellExecutionError on the first failing cell
    seconds = time.perf_counter() - started
    assert seconds < NOTEBOOK_BUDGET, f"{path.name} took {seconds:.0f} s"

    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    figures = sum("image/png" in o.get("data", {}) for o in outputs)
    assert figures == FIGURES[path.stem], f"{path.name} displayed {figures} figures"
    text = "".join(o.get("text", "") for o in outputs)
    assert str(tiny_run.resolve()) in text  # it read the run NDSB_ROOT points at
    assert "not found" not in text  # the originals under data.root were found

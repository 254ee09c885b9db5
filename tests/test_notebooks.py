"""The notebooks run top to bottom on a real (tiny) run, and are committed without outputs.

Each notebook is executed by nbclient in a kernel of *this* interpreter (a kernelspec written to
a temporary ``JUPYTER_PATH``, so neither a user-level ``python3`` kernel nor ``python`` on PATH
can substitute another environment), with ``NDSB_ROOT`` pointing at the session's tiny run
(:func:`tests.test_report.build_run`: CI starts from a clone without outputs).
"""
from __future__ import annotations

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

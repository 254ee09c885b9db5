"""The first cell of every notebook in ``notebooks/``: find the run, load its settings and meta.

Each notebook starts with ``cfg, meta = setup()``. Keeping that in one function means the
notebooks cannot drift apart in where they read a run from or how they check it:

* the project whose outputs are read is ``NDSB_ROOT`` when set (a run made elsewhere, with its
  own ``params.yaml``), else the project the notebook is in: Jupyter starts a notebook's
  kernel in the notebook's folder, and the project is the nearest folder above it that holds
  ``params.yaml`` and ``pipeline/``;
* the settings are the ``report`` section of that project's ``params.yaml``
  (:func:`pipeline.lib.results.settings`), ``meta.json`` is read and checked against the
  records by :func:`pipeline.lib.records.load_meta`;
* figures (``matplotlib.figure.Figure`` objects from :mod:`pipeline.lib.figures`) are shown
  inline when a cell returns or ``display``\\ s them.

The code is the ``pipeline`` package the kernel imports (``pip install -e .`` of the project,
as ``make venv`` does); :func:`setup` warns when that is another checkout than the notebook's.
"""
from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Any

from pipeline.lib import settings as params_mod
from pipeline.lib import results

ROOT_VARIABLE = "NDSB_ROOT"
# The project folder of this code: pipeline/lib/notebook.py -> the folder holding pipeline/.
CODE_ROOT = Path(__file__).resolve().parents[2]


def _is_project(folder: Path) -> bool:
    return (folder / params_mod.PARAMS_FILE).is_file() and (folder / "pipeline").is_dir()


def enclosing_project(start: str | os.PathLike | None = None) -> Path | None:
    """The nearest folder at or above ``start`` (default: the current folder) that holds
    ``params.yaml`` and ``pipeline/``, or ``None``."""
    here = Path(start if start is not None else Path.cwd()).resolve()
    return next((folder for folder in (here, *here.parents) if _is_project(folder)), None)


def project_root(start: str | os.PathLike | None = None) -> Path:
    """The folder whose outputs a notebook reads: ``NDSB_ROOT`` if set, else
    :func:`enclosing_project` of ``start`` (the notebook's folder), else this code's project."""
    given = os.environ.get(ROOT_VARIABLE)
    if given:
        return Path(given).expanduser().resolve()
    return enclosing_project(start) or CODE_ROOT


def inline_figures() -> None:
    """Show figures inline in the running IPython kernel (``%matplotlib inline``); outside
    IPython, nothing."""
    try:
        from IPython import get_ipython
    except ImportError:
        return
    shell = get_ipython()
    if shell is not None:
        shell.run_line_magic("matplotlib", "inline")


def setup(root: str | os.PathLike | None = None, *, quiet: bool = False
          ) -> tuple[results.ReportSettings, dict[str, Any]]:
    """``(cfg, meta)`` of the run at ``root`` (default: :func:`project_root`), figures inline.

    ``cfg`` holds the run's output paths (:class:`pipeline.lib.results.ReportSettings`), ``meta``
    its ``meta.json``; prints one line naming the project and its data unless ``quiet``.
    A missing or stale ``meta.json`` raises :class:`pipeline.lib.records.RecordsError` saying
    which stage to run.
    """
    notebook_project = enclosing_project()
    if notebook_project is not None and notebook_project != CODE_ROOT:
        warnings.warn(f"this kernel imports the pipeline code of {CODE_ROOT}, not of "
                      f"{notebook_project} (the notebook's project): install that one "
                      "(pip install -e .) to run its code", stacklevel=2)
    cfg = results.settings(project_root() if root is None else root)
    meta = results.load_meta(cfg)
    inline_figures()
    if not quiet:
        print(f"project {cfg.root}: {len(meta['train'])} labelled + {len(meta['test'])} test "
              f"images, {len(meta['classes'])} classes, records {meta['size']}x{meta['size']} "
              "px")
    return cfg, meta

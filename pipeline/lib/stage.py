"""The one shape of every stage's ``main()``: parse, check all settings, run, report.

::

    def main(argv=None):
        stage.run("ensemble", ("ensemble", "models", "paths"), _run, argv, doc=__doc__)

:func:`run` gives every stage the same command line (``--params FILE``, ``--set
section.key=value`` as often as needed, like ``dvc exp run -S``, plus the stage's own
arguments), sets the thread counts before MXNet is imported, loads and checks the whole
params file (:mod:`pipeline.lib.settings`: every problem in one line, exit 1, before any
work), and runs the stage's core inside :func:`pipeline.lib.errors.stage_errors`. The core
gets the declared sections only and returns the line to print (or None).
"""
from __future__ import annotations

import argparse
import os
from typing import Any, Callable, Sequence

import yaml

from pipeline.lib import settings as settings_mod
from pipeline.lib.errors import stage_errors
from pipeline.lib.settings import PARAMS_FILE, Settings, SettingsError

Core = Callable[[Settings, argparse.Namespace], "str | None"]


def parser(stage: str, doc: str | None = None,
           arguments: Callable[[argparse.ArgumentParser], None] | None = None
           ) -> argparse.ArgumentParser:
    """The stage's argument parser: its own ``arguments`` plus ``--params`` and ``--set``."""
    p = argparse.ArgumentParser(prog=f"python -m pipeline.{stage}",
                                description=(doc or "").strip().split("\n\n")[0] or None)
    if arguments is not None:
        arguments(p)
    p.add_argument("--params", default=PARAMS_FILE, help="params file (default: params.yaml)")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   dest="overrides", help="change one setting for this run (VALUE is YAML, "
                   "e.g. --set train.epochs=2 --set models.nets=[tinynet]); repeatable")
    return p


def parse_overrides(items: Sequence[str]) -> dict[str, Any]:
    """``["train.epochs=2"]`` -> ``{"train.epochs": 2}``; SettingsError for a malformed one."""
    out: dict[str, Any] = {}
    bad = []
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or "." not in key or not key.split(".", 1)[1]:
            bad.append(item)
            continue
        try:
            out[key.strip()] = yaml.safe_load(value) if value.strip() else None
        except yaml.YAMLError:
            bad.append(item)
    if bad:
        raise SettingsError(f"--set {bad}: expected SECTION.KEY=VALUE, e.g. "
                            "--set train.epochs=2")
    return out


def run(stage: str, reads: Sequence[str], core: Core, argv: Sequence[str] | None = None,
        doc: str | None = None, arguments: Callable[[argparse.ArgumentParser], None] | None
        = None, threads: bool = False, params_optional: bool = False,
        params_in: Callable[[argparse.Namespace], str] | None = None) -> None:
    """Run one stage (see the module docstring). ``threads``: the stage runs MXNet.
    ``params_optional``: without a params file (the default one absent), use the defaults.
    ``params_in``: where the default params file is, from the arguments (report's --root)."""
    args = parser(stage, doc, arguments).parse_args(argv)
    if threads:
        from pipeline.lib.runtime import configure_threads

        configure_threads()
    with stage_errors(stage):
        default = args.params == PARAMS_FILE
        if params_in is not None and default:
            args.params = params_in(args)
        missing = params_optional and default and not os.path.exists(args.params)
        cfg = settings_mod.load(reads, None if missing else args.params,
                                parse_overrides(args.overrides))
        message = core(cfg, args)
    if message:
        print(message)

"""Load one section of ``params.yaml`` with defaults and clear errors.

Stages call :func:`section` with the name of their own section and a dict of defaults; an
unknown key is an error (a typo in ``params.yaml`` must not be silently ignored).
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import yaml

from pipeline.lib.errors import PipelineError

PARAMS_FILE = "params.yaml"


class ParamsError(PipelineError, ValueError):
    """params.yaml is missing a section, or has an unknown or ill-typed key."""


def load(path: str | os.PathLike = PARAMS_FILE) -> dict[str, Any]:
    path = Path(path)
    if not path.exists():
        raise ParamsError(f"{path} not found (run from the project root)")
    with open(path, encoding="utf-8") as fh:
        data = yaml.safe_load(fh) or {}
    if not isinstance(data, dict):
        raise ParamsError(f"{path}: top level must be a mapping of sections")
    return data


def section(name: str, defaults: Mapping[str, Any], path: str | os.PathLike = PARAMS_FILE
            ) -> dict[str, Any]:
    """Return ``defaults`` updated with ``params.yaml[name]``; unknown keys are an error."""
    given = load(path).get(name) or {}
    return merge(name, defaults, given)


@dataclass(frozen=True)
class Choice:
    """A default whose valid values are a fixed list of any types, e.g. ``True``, ``False``
    and ``'auto'`` (YAML's ``on``/``off`` also read as booleans)."""

    default: Any
    values: tuple


def merge(name: str, defaults: Mapping[str, Any], given: Mapping[str, Any]) -> dict[str, Any]:
    unknown = sorted(set(given) - set(defaults))
    if unknown:
        raise ParamsError(
            f"params.yaml [{name}]: unknown key(s) {unknown}; valid keys: {sorted(defaults)}")
    out = {k: v.default if isinstance(v, Choice) else v for k, v in defaults.items()}
    for key, value in given.items():
        default = defaults[key]
        if isinstance(default, Choice):
            if not any(value is v or (type(value) is type(v) and value == v)
                       for v in default.values):
                raise ParamsError(f"params.yaml [{name}].{key}: expected one of "
                                  f"{list(default.values)}, got {value!r}")
            out[key] = value
            continue
        if default is not None and value is not None and not _compatible(default, value):
            raise ParamsError(f"params.yaml [{name}].{key}: expected {type(default).__name__}, "
                              f"got {value!r}")
        out[key] = value
    return out


def _compatible(default: Any, value: Any) -> bool:
    if isinstance(default, bool):
        return isinstance(value, bool)
    if isinstance(default, (int, float)):
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if isinstance(default, (list, tuple)):
        return isinstance(value, (list, tuple))
    return isinstance(value, type(default))

"""Which project files each DVC stage reaches through its imports, against its ``deps``.

``dvc repro`` reruns a stage only when one of its declared ``deps`` changed. A stage's code is
its module plus every project module it imports, directly or through other modules (imports
inside functions count: they run when the stage does). This tool follows those imports
statically (``ast``, nothing is imported) from each stage's ``python -m`` command and reports,
per stage, the reached files that no dep covers (missing: a change there would not rerun the
stage) and the code deps that the stage does not reach (stale: they rerun it for nothing).
A package ``__init__.py`` that holds only a docstring runs no code and is not counted.

It also checks the layering: a stage module never reaches another stage module, the library
(``pipeline/lib``) never reaches a stage or a tool, and ``nets`` never reaches ``pipeline``.

``python -m pipeline.tools.stagedeps`` prints the problems (exit 1) or the reached files per
stage (exit 0); ``tests/test_layout.py`` runs it on every ``make test``.
"""
from __future__ import annotations

import argparse
import ast
import re
import shlex
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping

import yaml

PACKAGES = ("pipeline", "nets")
_VAR = re.compile(r"\$\{([^}]+)\}")


@dataclass
class StageDeps:
    """One stage's module, the project files it reaches, and what its deps miss or waste."""

    stage: str
    module: str
    reached: list[str]
    missing: list[str] = field(default_factory=list)
    stale: list[str] = field(default_factory=list)
    layering: list[str] = field(default_factory=list)


def module_file(root: Path, module: str) -> Path | None:
    """The file of project module ``module`` (``a.b`` -> ``a/b.py`` or ``a/b/__init__.py``)."""
    if module.split(".")[0] not in PACKAGES:
        return None
    base = root.joinpath(*module.split("."))
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def _is_package(path: Path) -> bool:
    return path.name == "__init__.py"


def imported_modules(path: Path, module: str) -> set[str]:
    """Names of the modules ``path`` (module ``module``) imports anywhere in its code.

    ``from a import b`` yields ``a`` and ``a.b`` (``b`` may be a submodule); relative imports
    are resolved against ``module``'s package.
    """
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    package = module if _is_package(path) else module.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[:len(parts) - node.level + 1])
                target = f"{base}.{node.module}" if node.module else base
            else:
                target = node.module or ""
            found.add(target)
            found.update(f"{target}.{alias.name}" for alias in node.names)
    return found


def _parents(module: str) -> list[str]:
    parts = module.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts))]


def runs_code(path: Path) -> bool:
    """False for a module whose whole body is a docstring (a documentation-only package)."""
    body = ast.parse(path.read_text(encoding="utf-8")).body
    return not (len(body) <= 1 and all(isinstance(n, ast.Expr) and isinstance(
        getattr(n, "value", None), ast.Constant) for n in body))


def reach(root: Path, module: str) -> dict[str, Path]:
    """Every project module ``module`` reaches (itself, its imports, their parent packages)."""
    seen: dict[str, Path] = {}
    todo = [module]
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        path = module_file(root, name)
        if path is None:
            continue
        seen[name] = path
        todo.extend(_parents(name))
        todo.extend(imported_modules(path, name))
    return seen


def interpolate(value: str, params: Mapping[str, Any]) -> str:
    """``${a.b}`` replaced by ``params['a']['b']``; ``${item.*}`` (matrix keys) left as is."""
    def lookup(match: re.Match) -> str:
        key = match.group(1)
        if key.startswith("item."):
            return match.group(0)
        value: Any = params
        for part in key.split("."):
            value = value[part]
        return str(value)
    return _VAR.sub(lookup, value)


def stage_module(cmd: str) -> str | None:
    """The module of a ``python -m <module> ...`` command."""
    words = shlex.split(cmd)
    if "-m" in words[:-1]:
        return words[words.index("-m") + 1]
    return None


def _dep_paths(deps: Iterable[Any], params: Mapping[str, Any]) -> list[str]:
    paths = []
    for dep in deps:
        name = next(iter(dep)) if isinstance(dep, dict) else dep
        paths.append(interpolate(str(name), params).rstrip("/"))
    return paths


def _covers(dep: str, file: str) -> bool:
    return file == dep or file.startswith(dep + "/")


def stage_modules(dvc: Mapping[str, Any]) -> dict[str, str]:
    """``{stage: module}`` for every stage of ``dvc.yaml`` run as ``python -m``."""
    out = {}
    for stage, spec in dvc.get("stages", {}).items():
        module = stage_module(spec.get("cmd", ""))
        if module:
            out[stage] = module
    return out


def _layering(name: str, modules: Iterable[str], stages: set[str]) -> list[str]:
    problems = []
    for other in sorted(modules):
        if other in stages and other != name and name in stages:
            problems.append(f"stage {name} imports stage {other}")
        if name.startswith("pipeline.lib") and (other in stages
                                                or other.startswith("pipeline.tools")):
            problems.append(f"library module {name} imports {other}")
        if name.startswith("nets") and other.startswith("pipeline"):
            problems.append(f"nets module {name} imports {other}")
    return problems


def check(root: str | Path = ".") -> tuple[list[StageDeps], list[str]]:
    """Each stage's reached files and deps problems, and the layering problems of the code."""
    root = Path(root).resolve()
    dvc = yaml.safe_load((root / "dvc.yaml").read_text())
    params = yaml.safe_load((root / "params.yaml").read_text()) or {}
    modules = stage_modules(dvc)
    stages = set(modules.values())
    results = []
    for stage, module in modules.items():
        reached = reach(root, module)
        files = sorted(p.relative_to(root).as_posix() for p in reached.values()
                       if not _is_package(p) or runs_code(p))
        deps = _dep_paths(dvc["stages"][stage].get("deps", []), params)
        result = StageDeps(stage, module, files)
        result.missing = [f for f in files if not any(_covers(d, f) for d in deps)]
        code_deps = [d for d in deps if d.split("/")[0] in PACKAGES]
        result.stale = [d for d in code_deps if not any(_covers(d, f) for f in files)]
        results.append(result)
    layering: list[str] = []
    for path in sorted(p for pkg in PACKAGES for p in (root / pkg).rglob("*.py")):
        rel = path.relative_to(root).with_suffix("")
        name = ".".join(rel.parts[:-1] if rel.name == "__init__" else rel.parts)
        layering += _layering(name, (m for m in imported_modules(path, name)
                                     if module_file(root, m) is not None), stages)
    return results, sorted(set(layering))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m pipeline.tools.stagedeps",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", default=".", help="project root (dvc.yaml, params.yaml)")
    args = parser.parse_args(argv)
    results, layering = check(args.root)
    problems = layering + [f"stage {r.stage}: {f} is reached but not in deps" for r in results
                           for f in r.missing]
    problems += [f"stage {r.stage}: dep {d} is not reached by {r.module}" for r in results
                 for d in r.stale]
    for r in results:
        print(f"{r.stage} ({r.module}): " + " ".join(r.reached))
    for problem in problems:
        print(problem, file=sys.stderr)
    if problems:
        raise SystemExit(1)


if __name__ == "__main__":
    main()

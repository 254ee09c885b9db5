"""Run and artifact names: ``{net}--fold{k}`` and ``{kind}--{net}--fold{k}``, built and parsed here.

Every file a (net, fold) run leaves carries its provenance in its name: the checkpoint folder
``checkpoints/{net}--fold{k}/``, the predictions ``{split}--{net}--fold{k}.npy``, the metrics
``train--{net}--fold{k}.json`` and ``predict--{net}--fold{k}.json``, the learning curve
``train--{net}--fold{k}.tsv``. Files of no single fold (the ensemble's) drop the fold part:
``{split}--{net}.npy``. ``--`` separates the fields, so it may not occur in a net name; fold
``-1`` means "trained on every labelled image".

Seeds: the ``models`` grid may train a net several times with different ``train.seed``s. Such
a run's *member* name, ``{net}-seed{s}``, takes the net's place in every name above
(``checkpoints/ndsb_net1-seed1--fold0/``, ``valid--ndsb_net1-seed1--fold0.npy``), so every
other stage handles seeds as it handles nets; :func:`parse_member` gives back ``(net, seed)``
where the net and its seed are needed apart (the ensemble averages the seeds of a net).
A net's second round on pseudo-labels is a net of its own, ``{net}-pl`` (members
``{net}-pl-seed{s}``), so its predictions go through TTA and the ensemble like any net's.
"""
from __future__ import annotations

import os
import re
from pathlib import Path
from typing import NamedTuple

from pipeline.lib.errors import PipelineError

SEP = "--"
_RUN = re.compile(r"^(?P<net>.+?)--fold(?P<fold>-?\d+)$")
_MEMBER = re.compile(r"^(?P<net>.+)-seed(?P<seed>\d+)$")


class RunNameError(PipelineError, ValueError):
    """A net or kind name that cannot be part of an artifact name."""


class Artifact(NamedTuple):
    """What an artifact's name says: its kind (split, stage), net and fold (None: no fold)."""

    kind: str
    net: str
    fold: int | None


def check_part(what: str, value: str) -> str:
    """``value`` if it can be a field of a name: non-empty, no ``--``, no path separator."""
    if not value or SEP in value or "/" in value or os.sep in value:
        raise RunNameError(f"invalid {what} name {value!r}: must be non-empty, without '--' "
                         "or '/'")
    return value


def member_name(net: str, seed: int | None = None) -> str:
    """``{net}-seed{s}``: one seed of a net in the models grid; ``net`` itself for no seed."""
    check_part("net", net)
    if _MEMBER.match(net):
        raise RunNameError(f"invalid net name {net!r}: '-seed<N>' at the end is reserved for "
                           "the seed of a models grid")
    if seed is None:
        return net
    if int(seed) < 0:
        raise RunNameError(f"invalid seed {seed!r}: must be >= 0")
    return f"{net}-seed{int(seed)}"


PSEUDO_SUFFIX = "-pl"
# The stems of the pseudo-label targets (test--pseudo--fold{k}) and of the blend
# ({split}--ensemble), which the ensemble, pseudo, train and submit stages share.
PSEUDO_TARGETS = "pseudo"
ENSEMBLE = "ensemble"


def pseudo_name(net: str) -> str:
    """``{net}-pl``: the net trained a second round on pseudo-labels, as a net of its own."""
    return f"{check_part('net', net)}{PSEUDO_SUFFIX}"


def training_round(member: str) -> int:
    """1 for a first-round member, 2 for a second round on pseudo-labels (``{net}-pl``)."""
    net, _ = parse_member(member)
    return 2 if net.endswith(PSEUDO_SUFFIX) else 1


def parse_member(member: str) -> tuple[str, int | None]:
    """``(net, seed)`` of a member name; ``(member, None)`` for a plain net name."""
    match = _MEMBER.match(member)
    return (match["net"], int(match["seed"])) if match else (member, None)


def run_name(net: str, fold: int) -> str:
    """``{net}--fold{k}``: the name of one training run (its checkpoint folder)."""
    return f"{check_part('net', net)}{SEP}fold{int(fold)}"


def parse_run_name(name: str) -> tuple[str, int] | None:
    """``(net, fold)`` of a run name, or ``None`` when ``name`` is not one."""
    match = _RUN.match(name)
    if not match or SEP in match["net"]:
        return None
    return match["net"], int(match["fold"])


def artifact_name(kind: str, net: str, fold: int | None = None) -> str:
    """``{kind}--{net}--fold{k}``, or ``{kind}--{net}`` for ``fold=None`` (no suffix)."""
    check_part("kind", kind)
    return f"{kind}{SEP}{run_name(net, fold) if fold is not None else check_part('net', net)}"


def parse_artifact_name(stem: str) -> Artifact | None:
    """What :func:`artifact_name` built, from the name without its suffix; ``None`` if other."""
    kind, sep, rest = stem.partition(SEP)
    if not sep or not kind or not rest:
        return None
    run = parse_run_name(rest)
    if run is not None:
        return Artifact(kind, *run)
    return None if SEP in rest else Artifact(kind, rest, None)


def find(folder: str | os.PathLike, kind: str, suffix: str) -> list[tuple[str, int, Path]]:
    """``(net, fold, path)`` of every ``{kind}--{net}--fold{k}{suffix}`` in ``folder``, sorted."""
    found = []
    for path in sorted(Path(folder).glob(f"{kind}{SEP}*{suffix}")):
        parsed = parse_artifact_name(path.name[:-len(suffix)] if suffix else path.name)
        if parsed is not None and parsed.kind == kind and parsed.fold is not None:
            found.append((parsed.net, parsed.fold, path))
    return found


def find_runs(folder: str | os.PathLike) -> list[tuple[str, int, Path]]:
    """``(net, fold, path)`` of every run folder ``{net}--fold{k}`` in ``folder``, sorted."""
    found = []
    for path in sorted(Path(folder).glob(f"*{SEP}fold*")):
        parsed = parse_run_name(path.name)
        if parsed is not None and path.is_dir():
            found.append((*parsed, path))
    return found

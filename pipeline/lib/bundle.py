"""A model bundle: the trained ensemble as one self-describing, verifiable folder (or .tar).

The bundle stage writes it; ``python -m pipeline.classify`` reads it, on any machine with the
project's environment, without the records, the checkpoints or params.yaml. Layout::

    bundle/
      manifest.json            sha256 and byte size of every other file (the bundle's id is
                               the sha256 of this file)
      bundle.json              what the models are and how to run them (below)
      thresholds.csv           per-class thresholds with their out-of-fold precision and recall
      models/{member}--fold{k}/
        model.json             the checkpoint's spec (net, kwargs, classes, input, training)
        model.params           its weights (the file predict loaded)
        model.onnx             the same float32 inference net exported by MXNet's ONNX exporter
                               (classify --runtime onnx; :mod:`pipeline.lib.onnxmodel`)
        views.npy              the (T, 2, 3) TTA matrices predict used for this model
        calib.npz              INT8 only: the calibration images, their views (see below)

``bundle.json``:

* ``classes`` (the probability columns' order) and ``preprocessing``: how an image file
  becomes a model input as ingest made the records (gray 8-bit, ``whiten_background``,
  longer side to ``size`` on a ``background`` square, ``format``/``jpeg_quality`` of the
  records, ``max_pixels``), then ``(255 - pixel) / 255``;
* ``tta``: the tta section predict ran with (views, averaging, batch sizes, precision, INT8);
* ``ensemble``: per blended net its weight and its members (seeds) and folds, how the blend
  is formed (fold mean, seed mean, weights, ``temperature``), exactly as the ensemble stage
  formed the test predictions; nets of weight 0 are listed and left out;
* ``models``: one entry per (member, fold), with predict's INT8 decision (``int8_used``, the
  guard's log losses) so classify runs each model in the precision its predictions had;
* ``thresholds``: per class the threshold for ``target_precision`` and its out-of-fold
  precision and recall (:mod:`pipeline.lib.thresholds`);
* ``provenance``: the creation time, the git commit, the out-of-fold log loss and accuracy
  of the ensemble, the settings of the stages that made it and the records' description.

INT8 models carry their calibration data (``calib.npz``: the distinct training images as
uint8, which image and which TTA view each calibration input is): quantizing from it gives
the INT8 net predict used, without the records.

:func:`open_bundle` checks everything before any image is classified: the manifest (every
file present, of its size and sha256, nothing else), ``bundle.json``'s structure, each
model's spec against the bundle's classes and input size. A damaged, incomplete or altered
bundle is refused with one :class:`BundleError` line naming the problem.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np

from pipeline.lib.errors import PipelineError
from pipeline.lib.fsutil import atomic_path, sha256, temp_prefix, write_json, write_text

FORMAT = "ndsb-plankton-bundle"
VERSION = 1
MANIFEST = "manifest.json"
INFO = "bundle.json"
THRESHOLDS = "thresholds.csv"
MODELS = "models"
MODEL_FILES = ("model.json", "model.params", "model.onnx", "views.npy")
CALIB = "calib.npz"
TAR_SUFFIX = ".tar"


class BundleError(PipelineError, ValueError):
    """A bundle that cannot be made, or one that is damaged, incomplete or altered."""


@dataclass(frozen=True)
class Bundle:
    """A verified bundle: its folder, its ``bundle.json`` and its id (manifest sha256)."""

    root: Path
    info: dict[str, Any]
    id: str

    @property
    def classes(self) -> list[str]:
        return list(self.info["classes"])

    @property
    def preprocessing(self) -> dict[str, Any]:
        return self.info["preprocessing"]

    @property
    def tta(self) -> dict[str, Any]:
        return self.info["tta"]

    @property
    def models(self) -> list[dict[str, Any]]:
        return self.info["models"]

    def model_dir(self, model: dict[str, Any]) -> Path:
        return self.root / model["dir"]

    def spec(self, model: dict[str, Any]) -> dict[str, Any]:
        """The model's checkpoint spec (``model.json``: net, kwargs, classes, size)."""
        return json.loads((self.root / model["dir"] / "model.json").read_text(encoding="utf-8"))

    def views(self, model: dict[str, Any]) -> np.ndarray:
        return np.load(self.root / model["dir"] / "views.npy", allow_pickle=False)

    def onnx(self, model: dict[str, Any]) -> Path:
        """The model's ONNX export (``model.onnx``)."""
        return self.root / model["dir"] / "model.onnx"

    def calibration(self, model: dict[str, Any]) -> dict[str, np.ndarray]:
        with np.load(self.root / model["dir"] / CALIB, allow_pickle=False) as z:
            return {k: z[k] for k in z.files}

    def thresholds(self) -> list[dict[str, Any]]:
        return self.info["thresholds"]["classes"]


# ------------------------------------------------------------------------------ writing


def model_dir_name(member: str, fold: int) -> str:
    """``models/{member}--fold{k}``: where one model's files go inside the bundle."""
    from pipeline.lib.runs import run_name

    return f"{MODELS}/{run_name(member, fold)}"


def thresholds_csv(records: Sequence[dict[str, Any]]) -> str:
    """The thresholds as CSV text: class, threshold, precision, recall, kept, support."""
    def show(v: Any) -> str:
        return "" if v is None else (f"{v:.6f}" if isinstance(v, float) else str(v))

    keys = ("class", "threshold", "precision", "recall", "kept", "predicted", "support",
            "precision_top1")
    rows = [",".join(keys)] + [",".join(_csv_field(show(r[k])) for k in keys) for r in records]
    return "\n".join(rows) + "\n"


def _csv_field(text: str) -> str:
    return '"' + text.replace('"', '""') + '"' if any(c in text for c in ',"\n') else text


def write_bundle(out: str | os.PathLike, info: dict[str, Any],
                 models: Sequence[tuple[str, Path, np.ndarray, dict[str, np.ndarray] | None,
                                        Path]],
                 archive: bool = True) -> str:
    """Write the bundle folder ``out`` (replacing an older one only once the new one is
    complete) and, with ``archive``, ``out`` + ``.tar``; return the bundle's id.

    ``models``: per entry of ``info["models"]`` (same order), its ``dir`` inside the bundle,
    the checkpoint folder to copy ``model.json`` and ``model.params`` from, its TTA matrices,
    its INT8 calibration arrays (None: float only) and its ONNX export.
    """
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    build = Path(tempfile.mkdtemp(prefix=temp_prefix(out), dir=out.parent))
    try:
        for rel, source, views, calib, onnx_file in models:
            target = build / rel
            target.mkdir(parents=True)
            for name in ("model.json", "model.params"):
                shutil.copyfile(source / name, target / name)
            shutil.copyfile(onnx_file, target / "model.onnx")
            np.save(target / "views.npy", np.asarray(views, dtype=np.float64))
            if calib is not None:
                np.savez(target / CALIB, **calib)
        write_json(build / INFO, info)
        write_text(build / THRESHOLDS, thresholds_csv(info["thresholds"]["classes"]))
        files = sorted(p for p in build.rglob("*") if p.is_file())
        manifest = {"format": FORMAT, "version": VERSION,
                    "files": {p.relative_to(build).as_posix(): {"sha256": sha256(p),
                                                                "bytes": p.stat().st_size}
                              for p in files}}
        write_json(build / MANIFEST, manifest)
        old = out.with_name(f".{out.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        if out.exists():
            out.rename(old)
        build.rename(out)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(build, ignore_errors=True)
    if archive:
        write_archive(out, archive_path(out))
    return sha256(out / MANIFEST)


def archive_path(folder: str | os.PathLike) -> Path:
    folder = Path(folder)
    return folder.with_name(folder.name + TAR_SUFFIX)


def write_archive(folder: Path, tar_path: Path) -> None:
    """``folder`` as one uncompressed tar (the weights do not compress), its files under the
    folder's name, in sorted order with neutral owners and times: the same folder always
    gives the same bytes."""
    def neutral(ti: tarfile.TarInfo) -> tarfile.TarInfo:
        ti.uid = ti.gid = 0
        ti.uname = ti.gname = ""
        ti.mtime = 0
        ti.mode = 0o755 if ti.isdir() else 0o644
        return ti

    with atomic_path(tar_path, suffix=TAR_SUFFIX) as tmp:
        with tarfile.open(tmp, "w", format=tarfile.PAX_FORMAT) as tar:
            tar.add(folder, arcname=folder.name, recursive=False, filter=neutral)
            for p in sorted(folder.rglob("*")):
                tar.add(p, arcname=f"{folder.name}/{p.relative_to(folder).as_posix()}",
                        recursive=False, filter=neutral)


# ------------------------------------------------------------------------------ reading


@contextlib.contextmanager
def open_bundle(path: str | os.PathLike) -> Iterator[Bundle]:
    """The verified bundle at ``path`` (a bundle folder or its ``.tar``) while the block runs;
    a ``.tar`` is unpacked into a temporary folder, removed afterwards."""
    path = Path(path)
    if not path.exists():
        raise BundleError(f"bundle {path} not found (make one with `dvc repro bundle`)")
    if path.is_dir():
        yield load_bundle(path)
        return
    with tempfile.TemporaryDirectory(prefix="bundle-") as tmp:
        yield load_bundle(unpack(path, Path(tmp)))


def unpack(tar_path: Path, into: Path) -> Path:
    """Extract a bundle archive's one top folder into ``into``; return that folder.

    Only plain files and folders below one top folder are accepted (no links, devices,
    absolute paths or ``..``), so unpacking cannot write outside ``into``."""
    try:
        with tarfile.open(tar_path, "r:*") as tar:
            members = tar.getmembers()
            tops = {m.name.split("/", 1)[0] for m in members}
            bad = [m.name for m in members
                   if not (m.isfile() or m.isdir()) or m.name.startswith("/")
                   or ".." in m.name.split("/")]
            if bad or len(tops) != 1:
                raise BundleError(f"{tar_path}: not a bundle archive ("
                                  + (f"unsafe or special members: {bad[:3]}" if bad else
                                     f"{len(tops)} top-level entries, expected one folder")
                                  + "); use the .tar the bundle stage wrote")
            for m in members:
                target = into / m.name
                if m.isdir():
                    target.mkdir(parents=True, exist_ok=True)
                    continue
                target.parent.mkdir(parents=True, exist_ok=True)
                source = tar.extractfile(m)
                with open(target, "wb") as fh:
                    shutil.copyfileobj(source, fh)
    except (tarfile.TarError, EOFError) as err:
        raise BundleError(f"{tar_path}: not a readable bundle archive ({type(err).__name__}: "
                          f"{err}); it is truncated or damaged: copy it again") from None
    return into / tops.pop()


def load_bundle(folder: str | os.PathLike) -> Bundle:
    """The bundle in ``folder`` after every check (module docstring); else BundleError."""
    folder = Path(folder)
    manifest_path = folder / MANIFEST
    if not manifest_path.is_file():
        raise BundleError(f"{folder}: no {MANIFEST}: not a bundle, or an incomplete copy of "
                          "one (copy the whole folder, or the .tar)")
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
        files = manifest["files"]
        if not isinstance(files, dict) or not all(
                isinstance(v, dict) and isinstance(v.get("sha256"), str)
                and type(v.get("bytes")) is int for v in files.values()):
            raise ValueError("'files' is not {path: {sha256, bytes}}")
    except (ValueError, KeyError, TypeError, UnicodeDecodeError) as err:
        raise BundleError(f"{manifest_path}: damaged ({type(err).__name__}: {err}); copy the "
                          "bundle again") from None
    if manifest.get("format") != FORMAT or manifest.get("version") != VERSION:
        raise BundleError(f"{folder}: format {manifest.get('format')!r} version "
                          f"{manifest.get('version')!r}, this code reads {FORMAT!r} version "
                          f"{VERSION}: use the project version that made it")
    problems = _file_problems(folder, files)
    if problems:
        raise BundleError(f"{folder}: {'; '.join(problems[:5])}"
                          + (f" (and {len(problems) - 5} more)" if len(problems) > 5 else "")
                          + ": the bundle is damaged, incomplete or was changed; copy it "
                          "again or rebuild it (dvc repro bundle)")
    try:
        info = json.loads((folder / INFO).read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise BundleError(f"{folder / INFO}: unreadable ({err})") from None
    problem = info_problem(info, files)
    if problem:
        raise BundleError(f"{folder / INFO}: {problem}; rebuild the bundle (dvc repro bundle)")
    for model in info["models"]:
        problem = _model_problem(folder, model, info)
        if problem:
            raise BundleError(f"{folder / model['dir']}: {problem}; rebuild the bundle "
                              "(dvc repro bundle)")
    return Bundle(folder, info, hashlib.sha256(manifest_path.read_bytes()).hexdigest())


def _file_problems(folder: Path, files: dict[str, dict[str, Any]]) -> list[str]:
    """Each listed file missing, of another size or content, and each unlisted file."""
    problems = []
    for rel, entry in sorted(files.items()):
        path = folder / rel
        if rel.startswith("/") or ".." in rel.split("/"):
            problems.append(f"manifest lists a path outside the bundle: {rel!r}")
        elif not path.is_file():
            problems.append(f"{rel} is missing")
        elif path.stat().st_size != entry["bytes"]:
            problems.append(f"{rel} has {path.stat().st_size} bytes, the manifest says "
                            f"{entry['bytes']} (truncated or replaced)")
        elif sha256(path) != entry["sha256"]:
            problems.append(f"{rel}: sha256 differs from the manifest (altered or damaged)")
    present = {p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()}
    extra = sorted(present - set(files) - {MANIFEST})
    if extra:
        problems.append(f"files not in the manifest: {extra[:5]}")
    for name in (INFO,):
        if name not in files:
            problems.append(f"the manifest does not list {name}")
    return problems


_SECTIONS = {"classes": list, "preprocessing": dict, "tta": dict, "ensemble": dict,
             "models": list, "thresholds": dict, "provenance": dict}
_PREPROCESSING = {"size": int, "background": int, "whiten_background": bool, "format": str,
                  "jpeg_quality": int, "max_pixels": int, "input": dict}
_TTA = {"mean": str, "batch_size": int, "max_views": int, "n": int, "precision": str,
        "int8_keep_fp32": list, "int8_granularity": str, "calib_mode": str}


def info_problem(info: Any, files: dict[str, Any]) -> str | None:
    """What makes ``bundle.json`` unusable, or None."""
    if not isinstance(info, dict):
        return "not a JSON object"
    for section, specs in (("", _SECTIONS), ("preprocessing", _PREPROCESSING), ("tta", _TTA)):
        where = info.get(section, {}) if section else info
        if not isinstance(where, dict):
            return f"{section!r} is not an object"
        for key, kind in specs.items():
            value = where.get(key)
            if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
                return f"{(section + '.') if section else ''}{key} missing or not a {kind.__name__}"
    if info["tta"].get("int8") not in (True, False, "auto"):
        return "tta.int8 is not true, false or auto"
    classes = info["classes"]
    if not classes or not all(isinstance(c, str) and c for c in classes) \
            or len(set(classes)) != len(classes):
        return "classes is not a list of distinct names"
    models = info["models"]
    if not models or not all(isinstance(m, dict) and isinstance(m.get("dir"), str)
                             and isinstance(m.get("member"), str) and type(m.get("fold")) is int
                             and isinstance(m.get("int8_used"), bool) for m in models):
        return "models is not a non-empty list of {dir, member, fold, int8_used}"
    for m in models:
        needed = MODEL_FILES + ((CALIB,) if m["int8_used"] else ())
        absent = [f"{m['dir']}/{f}" for f in needed if f"{m['dir']}/{f}" not in files]
        if absent:
            return f"model files not in the manifest: {absent}"
    ens = info["ensemble"]
    nets = ens.get("nets")
    if not isinstance(nets, list) or not nets:
        return "ensemble.nets is not a non-empty list"
    dirs = {m["dir"] for m in models}
    weights = []
    for net in nets:
        try:
            weights.append(float(net["weight"]))
            listed = [f["dir"] for member in net["members"] for f in member["folds"]]
        except (KeyError, TypeError, ValueError):
            return "ensemble.nets entries are not {net, weight, members: [{member, folds}]}"
        if not listed or set(listed) - dirs:
            return f"ensemble net {net.get('net')!r} names models the bundle does not hold"
    if any(w <= 0 for w in weights) or abs(sum(weights) - 1) > 1e-6:
        return f"ensemble weights {weights} are not positive with sum 1"
    temperature = ens.get("temperature")
    if ens.get("calibration") not in ("temperature", "none") or (
            ens.get("calibration") == "temperature"
            and not (isinstance(temperature, (int, float)) and temperature > 0)):
        return "ensemble.calibration/temperature invalid"
    records = info["thresholds"].get("classes")
    if not isinstance(records, list) or [r.get("class") for r in records
                                         if isinstance(r, dict)] != classes:
        return "thresholds.classes does not list every class in order"
    if not all(r.get("threshold") is None or isinstance(r.get("threshold"), (int, float))
               for r in records):
        return "a threshold is neither a number nor null"
    return None


def _model_problem(folder: Path, model: dict[str, Any], info: dict[str, Any]) -> str | None:
    """What is wrong with one model's files against the bundle, or None."""
    try:
        spec = json.loads((folder / model["dir"] / "model.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        return f"model.json unreadable ({err})"
    if spec.get("classes") != info["classes"]:
        return "model.json's classes differ from bundle.json's"
    if spec.get("size") != info["preprocessing"]["size"]:
        return "model.json's input size differs from bundle.json's"
    if spec.get("sha256", {}).get("params") != sha256(folder / model["dir"] / "model.params"):
        return "model.params does not match model.json's sha256"
    try:
        views = np.load(folder / model["dir"] / "views.npy", allow_pickle=False)
    except (OSError, ValueError) as err:
        return f"views.npy unreadable ({err})"
    n = max(int(info["tta"]["n"]), 1)
    if views.shape != (n, 2, 3) or not np.isfinite(views).all():
        return f"views.npy has shape {views.shape}, expected ({n}, 2, 3)"
    return None

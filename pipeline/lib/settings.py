"""The one definition of every ``params.yaml`` setting: type, range, default, meaning.

Each section of ``params.yaml`` is a frozen dataclass below; each key is a field made by one of
the key constructors (:func:`integer`, :func:`number`, :func:`choice`, ...), which record its
rule and a one-line meaning. :func:`load` reads the whole file, checks every key of every
section against its rule and the cross-section rules (``models.folds`` within ``data.folds``,
``lr_steps`` within ``epochs``, ...), and raises one :class:`SettingsError` naming every problem
with its key path and valid form, before a stage does any work::

    train.batch_size: an integer >= 1, got 4.5; models.seeds: a non-empty list ...

Why frozen dataclasses and not a schema library: the rules are few and simple, the messages
must follow the project's one-line form, YAML 1.1 quirks (``1e6`` read as a string) need a
project decision, and the stages' pinned environment (MXNet 1.9.1, numpy 1.23.5) is better
without one more compiled dependency. A field's rule also says whether the key changes what
a stage computes (``dvc_param=False``: loader workers, scratch folders); ``dvc.yaml`` lists only
the keys that do (``tests/test_settings.py`` checks both against each other).

Stages call :func:`load` with the sections they read; the object it returns refuses any other
section, so what a stage reads is what its ``dvc.yaml`` entry declares.
"""
from __future__ import annotations

import dataclasses
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, ClassVar, Mapping, Sequence

import yaml

from pipeline.lib.errors import PipelineError

PARAMS_FILE = "params.yaml"


class SettingsError(PipelineError, ValueError):
    """params.yaml (or an override) has a missing section, an unknown key or a bad value."""


# ------------------------------------------------------------------------------------ rules


@dataclass(frozen=True)
class Rule:
    """How one key is checked and what it means."""

    kind: str                       # int | float | bool | str | choice | path | list | map
    doc: str
    lo: float | None = None
    hi: float | None = None
    lo_open: bool = False           # lo excluded
    hi_open: bool = False           # hi excluded
    choices: tuple = ()
    optional: bool = False          # null allowed (``None``)
    item: "Rule | None" = None      # list items
    min_len: int = 0
    unique: bool = False
    increasing: bool = False
    pattern: str | None = None      # str: a regular expression the value must match
    form: str = ""                  # how the valid form is described, if not derived
    # False: not listed under a stage's params in dvc.yaml, because the key says how or where
    # work runs (loader workers, scratch folders) rather than what it computes, or it is a
    # path DVC already follows as a dep or an out.
    dvc_param: bool = True
    check: Callable[[Any], str | None] | None = None  # extra check: problem or None

    def describe(self) -> str:
        """The valid form in words: ``an integer >= 1``, ``one of float32, bfloat16, auto``."""
        if self.form:
            text = self.form
        elif self.kind == "choice":
            text = "one of " + ", ".join(_show(c) for c in self.choices)
        elif self.kind in ("int", "float"):
            text = ("an integer" if self.kind == "int" else "a number") + self._range()
        elif self.kind == "bool":
            text = "true or false"
        elif self.kind == "path":
            text = "a path"
        elif self.kind == "str":
            text = "a string"
        elif self.kind == "list":
            item = self.item.describe() if self.item else "values"
            item = re.sub(r"^(an?|one of) ", "", item)
            item = re.sub(r"^(integer|number|string|path)\b", r"\1s", item)
            text = ("a non-empty list" if self.min_len else "a list") + f" of {item}"
            if self.unique:
                text += ", no repeats"
            if self.increasing:
                text += ", increasing"
        else:
            text = "a mapping"
        return text + (" or null" if self.optional else "")

    def _range(self) -> str:
        lo = None if self.lo is None else f"{'>' if self.lo_open else '>='} {_num(self.lo)}"
        hi = None if self.hi is None else f"{'<' if self.hi_open else '<='} {_num(self.hi)}"
        if lo and hi:
            a, b = ("(" if self.lo_open else "["), (")" if self.hi_open else "]")
            return f" in {a}{_num(self.lo)}, {_num(self.hi)}{b}"
        return f" {lo or hi}" if (lo or hi) else ""

    def coerce(self, value: Any) -> tuple[Any, bool]:
        """(value in its typed form, ok). Lists become tuples, numbers floats, paths str."""
        if value is None:
            return None, self.optional
        kind = self.kind
        if kind == "choice":
            for c in self.choices:  # True must not match 1, nor "true" True
                if value is c or (type(value) is type(c) and value == c):
                    return c, True
            return value, False
        if kind == "bool":
            return value, isinstance(value, bool)
        if kind == "int":
            if isinstance(value, bool) or not isinstance(value, int):
                return value, False
            return value, self._in_range(value)
        if kind == "float":
            # YAML 1.1 reads 1e6 and 5e-4 (no dot) as strings: accept what float() accepts.
            if isinstance(value, str):
                try:
                    value = float(value)
                except ValueError:
                    return value, False
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                return value, False
            value = float(value)
            return value, math.isfinite(value) and self._in_range(value)
        if kind in ("str", "path"):
            if not isinstance(value, str) or not value.strip():
                return value, False
            return value, self.pattern is None or re.fullmatch(self.pattern, value) is not None
        if kind == "list":
            if not isinstance(value, (list, tuple)) or len(value) < self.min_len:
                return value, False
            items = []
            for v in value:
                typed, ok = self.item.coerce(v) if self.item else (v, True)
                if not ok:
                    return value, False
                items.append(typed)
            if self.unique and len(set(map(repr, items))) < len(items):
                return value, False
            if self.increasing and any(b <= a for a, b in zip(items, items[1:])):
                return value, False
            return tuple(items), True
        if kind == "map":
            return value, isinstance(value, Mapping)
        raise AssertionError(kind)

    def _in_range(self, v: float) -> bool:
        if self.lo is not None and (v < self.lo or (self.lo_open and v == self.lo)):
            return False
        if self.hi is not None and (v > self.hi or (self.hi_open and v == self.hi)):
            return False
        return True


def _num(x: float) -> str:
    return str(int(x)) if float(x).is_integer() and abs(x) < 1e15 else f"{x:g}"


def _show(v: Any) -> str:
    return {True: "true", False: "false", None: "null"}.get(v, str(v)) \
        if isinstance(v, (bool, type(None))) else str(v)


def _key(default: Any, rule: Rule):
    if isinstance(default, list):
        default = tuple(default)
    if isinstance(default, dict):
        return field(default_factory=lambda: _copy(default), metadata={"rule": rule})
    return field(default=default, metadata={"rule": rule})


def _copy(d: Mapping[str, Any]) -> dict[str, Any]:
    return {k: list(v) if isinstance(v, list) else v for k, v in d.items()}


def integer(default: int, doc: str, lo: int | None = None, hi: int | None = None, **kw):
    return _key(default, Rule("int", doc, lo=lo, hi=hi, **kw))


def number(default: float, doc: str, lo: float | None = None, hi: float | None = None, **kw):
    return _key(default, Rule("float", doc, lo=lo, hi=hi, **kw))


def boolean(default: bool, doc: str, **kw):
    return _key(default, Rule("bool", doc, **kw))


def choice(default: Any, choices: Sequence[Any], doc: str, **kw):
    return _key(default, Rule("choice", doc, choices=tuple(choices), **kw))


def text(default: str, doc: str, **kw):
    return _key(default, Rule("str", doc, **kw))


def path(default: str | None, doc: str, **kw):
    return _key(default, Rule("path", doc, **kw))


def listing(default: Sequence[Any], item: Rule, doc: str, **kw):
    return _key(list(default), Rule("list", doc, item=item, **kw))


def mapping(default: Mapping[str, Any], doc: str, **kw):
    return _key(dict(default), Rule("map", doc, **kw))


SEED = Rule("int", "", lo=0, hi=2 ** 31 - 1)
# The thesis' training distortions (§6.2), and for TTA half of them (rotation and flips whole).
THESIS_RANGES = {"rotation": [0.0, 360.0], "translate": 0.1, "zoom": [0.625, 1.6], "shear": 20.0,
                 "stretch": [0.77, 1.3], "flip_h": 0.5, "flip_v": 0.5}
TTA_RANGES = {"rotation": [0.0, 360.0], "translate": 0.05, "zoom": [0.79, 1.265], "shear": 10.0,
              "stretch": [0.877, 1.14], "flip_h": 0.5, "flip_v": 0.5}
NET_NAME = Rule("str", "", form="a registered network name")
FOLD = Rule("int", "", lo=0)


def _ranges_problem(value: Mapping[str, Any]) -> str | None:
    """An augmentation-ranges mapping's first problem ({} = the defaults), or None."""
    from pipeline.lib.ranges import AffineRanges, RangesError

    try:
        AffineRanges.from_dict(value)
    except RangesError as exc:
        return str(exc)
    return None


def _net_kwargs_problem(value: Mapping[str, Any]) -> str | None:
    bad = [k for k, v in value.items() if not isinstance(v, Mapping)]
    return f"{{net: {{keyword: value}}}}, got {bad[0]}: {value[bad[0]]!r}" if bad else None


# ------------------------------------------------------------------------------- the schema


@dataclass(frozen=True)
class Section:
    """Base of the sections: ``of(**values)`` builds and checks one from keyword values."""

    NAME: ClassVar[str] = ""

    @classmethod
    def keys(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls)]

    @classmethod
    def of(cls, **values: Any) -> "Section":
        """The section with these values (the rest defaults), checked; SettingsError if not."""
        problems: list[str] = []
        made = _build(cls, values, problems)
        if problems:
            raise SettingsError("; ".join(problems))
        return made

    def replace(self, **values: Any) -> "Section":
        """A copy with ``values`` changed, checked like :meth:`of`."""
        return type(self).of(**dict(self.as_dict(), **values))

    def as_dict(self) -> dict[str, Any]:
        """Plain YAML/JSON values (tuples as lists): what metrics and fingerprints record."""
        return {k: _plain(getattr(self, k)) for k in self.keys()}

    def problems(self) -> list[str]:
        """Rules between keys of this section (key rules are checked when it is built)."""
        return []


def _plain(v: Any) -> Any:
    if isinstance(v, tuple):
        return [_plain(x) for x in v]
    if isinstance(v, dict):
        return {k: _plain(x) for k, x in v.items()}
    return v


@dataclass(frozen=True)
class Paths(Section):
    """Where the stages' files go. Each folder is named here only; the file names inside are
    built in one place (:mod:`pipeline.lib.runs`, the methods below) and in ``dvc.yaml``."""

    NAME: ClassVar[str] = "paths"
    records: str = path("data/records", "RecordIO records and meta.json (ingest)")
    checkpoints: str = path("checkpoints", "one folder per trained model (train)")
    predictions: str = path("predictions", "per-model, pseudo-label and ensemble predictions")
    metrics: str = path("metrics", "JSON metrics of every stage")
    plots: str = path("plots", "learning curves and the confusion pairs")
    reports: str = path("reports", "the static HTML report")
    submission: str = path("submissions/submission.csv.gz", "the Kaggle submission (submit)")

    def models(self, round: int = 1) -> Path:
        """Per-model TTA predictions of training round 1 or 2 (pseudo-labels)."""
        return Path(self.predictions) / "models" / f"round{round}"

    @property
    def pseudo(self) -> Path:
        return Path(self.predictions) / "pseudo"

    @property
    def ensemble(self) -> Path:
        return Path(self.predictions)

    def metrics_file(self, name: str) -> Path:
        return Path(self.metrics) / f"{name}.json"

    @property
    def confusion(self) -> Path:
        return Path(self.plots) / "confusion.csv"


@dataclass(frozen=True)
class SampleSection(Section):
    NAME: ClassVar[str] = "sample"
    out: str = path("data/sample", "folder of the sample NDSB layout (sample stage)",
                    dvc_param=False)
    train_fraction: float = number(0.7, "share of each class kept as labelled training images",
                                   lo=0, hi=1, lo_open=True, hi_open=True)
    seed: int = _key(0, dataclasses.replace(SEED, doc="seed of the train/test split"))
    wheel: str | None = path(None, "local planktonclas 0.2.4 wheel; null: download with pip",
                             optional=True, dvc_param=False)


@dataclass(frozen=True)
class DataSection(Section):
    NAME: ClassVar[str] = "data"
    root: str = path("data/sample/ndsb", "NDSB folder: train/<class>/*, test/*, "
                     "sampleSubmission.csv; or an EcoTaxa export: its .zip, or a folder of "
                     "ecotaxa_*.tsv + images", dvc_param=False)
    size: int = integer(64, "side of the square model input in pixels", lo=8, hi=1024)
    background: int = integer(255, "grey level of the padding (255: white)", lo=0, hi=255)
    format: str = choice("png", ("png", "jpg"), "image encoding inside the records")
    jpeg_quality: int = integer(95, "JPEG quality when format is jpg", lo=1, hi=100)
    folds: int = integer(3, "stratified cross-validation folds", lo=2, hi=100)
    seed: int = _key(0, dataclasses.replace(SEED, doc="seed of the fold assignment"))
    skip_bad: bool = boolean(False, "skip (and list) unreadable images instead of failing")
    max_pixels: int = integer(89_478_485, "largest image (width x height) decoded; larger "
                              "ones are bad files (decompression bombs)", lo=1)
    whiten_background: bool = boolean(True, "scale each image so its border is white")
    workers: int = integer(0, "decoding processes (0: every CPU)", lo=0, dvc_param=False)


@dataclass(frozen=True)
class ModelsSection(Section):
    NAME: ClassVar[str] = "models"
    nets: tuple = listing(["ndsb_net1", "tinynet"], NET_NAME, "networks to train and blend",
                          min_len=1, unique=True)
    folds: tuple = listing([0, 1, 2], FOLD, "folds trained per net (each < data.folds)",
                           min_len=1, unique=True)
    seeds: tuple = listing([0], SEED, "training seeds per (net, fold); each trains again",
                           min_len=1, unique=True)
    pseudo_nets: tuple = listing(["ndsb_net1"], NET_NAME, "nets trained a second round with "
                                 "pseudo-labelled test images ([] : none)", unique=True)

    def problems(self) -> list[str]:
        # Names are checked against the registry by the stages that build nets (train fails
        # with the list of valid names before any work); importing the registry here would
        # make every stage depend on MXNet and on the network tables.
        out = []
        extra = sorted(set(self.pseudo_nets) - set(self.nets))
        if extra:
            out.append(f"models.pseudo_nets: {extra} not in models.nets (a second round "
                       "needs the first round's predictions)")
        return out


@dataclass(frozen=True)
class TrainSection(Section):
    NAME: ClassVar[str] = "train"
    net_kwargs: dict = mapping({}, "{net: {keyword: value}} passed to nets.get_model",
                               check=_net_kwargs_problem, form="a mapping {net: {keyword: value}}")
    act: str = choice("rrelu", ("relu", "leaky", "prelu", "rrelu", "tanh", "sigmoid",
                                "sigmoid_star"), "activation of every hidden layer")
    bn: bool = boolean(True, "batch normalization after every convolution")
    epochs: int = integer(30, "training epochs", lo=1)
    batch_size: int = integer(16, "images per step (over all devices)", lo=1)
    lr: float = number(0.01, "learning rate", lo=0, lo_open=True)
    momentum: float = number(0.9, "Nesterov momentum", lo=0, hi=1, hi_open=True)
    wd: float = number(0.0005, "weight decay", lo=0)
    lr_steps: tuple = listing([20, 26], Rule("int", "", lo=1),
                              "epochs at which lr is multiplied by lr_factor (within epochs)",
                              unique=True, increasing=True)
    lr_factor: float = number(0.1, "lr multiplier at each step", lo=0, lo_open=True)
    schedule: str = choice("steps", ("steps", "cosine", "onecycle"),
                           "learning-rate schedule: steps (lr_steps, lr_factor; the lr of an "
                           "epoch does not depend on epochs), cosine (warm-up, then down to "
                           "min_lr at the last epoch) or onecycle (up from lr / cycle_div, "
                           "down to min_lr); cosine and onecycle change it every batch and "
                           "make epochs part of the run (another value trains afresh)")
    warmup_epochs: float = number(2.0, "cosine: epochs of linear warm-up from 0 to lr; "
                                  "onecycle: epochs of the rise to lr (< epochs)", lo=0)
    min_lr: float = number(0.0, "cosine, onecycle: the lr at the end of the last epoch "
                           "(< lr)", lo=0)
    cycle_div: float = number(25.0, "onecycle: starts at lr / cycle_div", lo=1)
    cycle_momentum: float = number(0.85, "onecycle: the momentum at the peak lr, from and "
                                   "back to momentum (<= momentum)", lo=0, hi=1, hi_open=True)
    label_smoothing: float = number(0.0, "targets (1 - eps) one-hot + eps / classes",
                                    lo=0, hi=1, hi_open=True)
    ema_half_life: float = number(0.0, "half-life in epochs of the weight average that "
                                  "validation scores and the model publishes (0: off)", lo=0)
    seed: int = _key(0, dataclasses.replace(
        SEED, doc="seed of a run without --seed (DVC's runs take models.seeds)",
        dvc_param=False))
    ctx: str = text("cpu", "devices: cpu | cpu:0,1 | gpu | gpu:0,1",
                    pattern=r"(cpu|gpu)(:\d+(,\d+)*)?", form="cpu, gpu, cpu:I,J or gpu:I,J")
    precision: str = choice("auto", ("float32", "bfloat16", "auto"),
                            "auto: the faster of float32 and bfloat16 as measured on this "
                            "machine for this net and input (cached); float32 where only it runs")
    kvstore: str = choice("device", ("device", "local", "nccl", "dist_sync",
                                     "dist_device_sync"), "gradient aggregation")
    workers: int = integer(1, "data-loader processes (0: decode in the trainer)", lo=0,
                           dvc_param=False)
    prefetch: int = integer(4, "batches decoded ahead", lo=1, dvc_param=False)
    augment: dict = mapping(THESIS_RANGES, "affine training ranges (thesis §6.2; {}: the "
                            "same up to rounding)", check=_ranges_problem,
                            form="augmentation ranges")

    @property
    def devices(self) -> int:
        """How many devices ``ctx`` names."""
        _, _, ids = self.ctx.partition(":")
        return len(ids.split(",")) if ids else 1

    def problems(self) -> list[str]:
        out = []
        late = [s for s in self.lr_steps if s > self.epochs]
        if late and self.schedule == "steps":
            out.append(f"train.lr_steps: each step within 1..train.epochs ({self.epochs}), "
                       f"got {list(late)}")
        if self.schedule != "steps":  # the keys of the other schedules are not read
            if self.warmup_epochs >= self.epochs:
                out.append(f"train.warmup_epochs: less than train.epochs ({self.epochs}) "
                           f"under schedule {self.schedule}, got {_num(self.warmup_epochs)}")
            if self.min_lr >= self.lr:
                out.append(f"train.min_lr: less than train.lr ({_num(self.lr)}) under "
                           f"schedule {self.schedule}, got {_num(self.min_lr)}")
        if self.schedule == "onecycle" and self.cycle_momentum > self.momentum:
            out.append(f"train.cycle_momentum: at most train.momentum ({_num(self.momentum)}) "
                       f"under schedule onecycle, got {_num(self.cycle_momentum)}")
        if re.fullmatch(r"(cpu|gpu)(:\d+(,\d+)*)?", self.ctx) and self.batch_size % self.devices:
            out.append(f"train.batch_size: a multiple of the {self.devices} devices of "
                       f"train.ctx ({self.ctx}), got {self.batch_size}")
        return out


@dataclass(frozen=True)
class TTASection(Section):
    NAME: ClassVar[str] = "tta"
    n: int = integer(100, "views averaged per image (0: the plain image)", lo=0)
    method: str = choice("random", ("random", "halton", "stratified"), "how views are drawn")
    mean: str = choice("probs", ("probs", "logits", "geometric"), "how views are averaged")
    seed: int = _key(0, dataclasses.replace(SEED, doc="seed of the views"))
    ranges: dict = mapping(TTA_RANGES, "affine TTA ranges ({}: the model's training "
                           "ranges)", check=_ranges_problem, form="augmentation ranges")
    batch_size: int = integer(4, "images warped together (batch_size x n views)", lo=1)
    max_views: int = integer(128, "views per forward pass (bounds memory)", lo=1)
    precision: str = choice("auto", ("float32", "bfloat16", "auto"),
                            "float path: auto = the faster of float32 and bfloat16 as measured "
                            "on this machine (cached)")
    int8: Any = choice("auto", (True, False, "auto"),
                       "INT8 inference; auto: unless its validation log loss is worse by "
                       "more than int8_tolerance")
    int8_tolerance: float = number(0.01, "largest log-loss increase INT8 may cost", lo=0)
    int8_guard_views: int = integer(10, "views of the validation images the guard compares "
                                    "(0: the plain images)", lo=0)
    calib_images: int = integer(256, "INT8 calibration views from training records", lo=1)
    calib_mode: str = choice("mean", ("naive", "entropy", "percentile", "mean"),
                             "INT8 calibration of the activation ranges")
    int8_keep_fp32: tuple = listing(["first_conv"], Rule("choice", "", choices=(
        "first_conv", "classifier")), "layers kept in float32 in the INT8 net", unique=True)
    int8_granularity: str = choice("tensor-wise", ("tensor-wise", "channel-wise"),
                                   "weight scales of the quantized classifier")
    chunk_images: int = integer(256, "images per resumable chunk", lo=1, dvc_param=False)
    work: str = path("predictions/work", "scratch folder of runs in progress", dvc_param=False)

    INT8_KEYS: ClassVar[tuple] = ("int8_tolerance", "int8_guard_views", "calib_images",
                                  "calib_mode", "int8_keep_fp32", "int8_granularity")


@dataclass(frozen=True)
class PseudoSection(Section):
    NAME: ClassVar[str] = "pseudo"
    temperature: float = number(1.0, "< 1 sharpens the soft targets, > 1 softens them",
                                lo=0, lo_open=True)
    fraction: float = number(0.25, "share of every second-round batch that is "
                             "pseudo-labelled test images; 0 with pseudo.finetune > 0 is the "
                             "control: the same fine-tuning without them", lo=0, hi=1,
                             hi_open=True)
    finetune: float = number(0.5, "0: the second round trains from scratch for train.epochs; "
                             "f > 0: it fine-tunes the first round's model over the "
                             "schedule's last ceil(f x train.epochs) epochs", lo=0, hi=1)


@dataclass(frozen=True)
class EnsembleSection(Section):
    NAME: ClassVar[str] = "ensemble"
    calibration: str = choice("temperature", ("temperature", "none"),
                              "temperature fitted on the out-of-fold blend, or none")


@dataclass(frozen=True)
class SubmitSection(Section):
    NAME: ClassVar[str] = "submit"
    sample_submission: str | None = path(None, "Kaggle sample submission to follow (null: "
                                         "data.root's sampleSubmission.csv if present)",
                                         optional=True)
    plain_csv: bool = boolean(False, "write .csv instead of .csv.gz")


@dataclass(frozen=True)
class ScoreSection(Section):
    NAME: ClassVar[str] = "score"
    labels: str = path("data/sample/ndsb/test_labels.csv", "labels CSV (image,class) of the "
                       "test images", dvc_param=False)


@dataclass(frozen=True)
class ReportSection(Section):
    NAME: ClassVar[str] = "report"
    samples_per_class: int = integer(6, "example images per class", lo=1)
    mistakes: int = integer(12, "most confident out-of-fold mistakes shown", lo=0)
    seed: int = _key(0, dataclasses.replace(SEED, doc="seed of the example choice"))


@dataclass(frozen=True)
class BundleSection(Section):
    NAME: ClassVar[str] = "bundle"
    out: str = path("bundle", "folder of the model bundle (and OUT.tar, the same as one file) "
                    "that classify runs", dvc_param=False)
    target_precision: float = number(0.9, "out-of-fold precision each class's threshold "
                                     "must reach; below it an image is unclassified",
                                     lo=0, hi=1)


SECTIONS: dict[str, type] = {s.NAME: s for s in (
    SampleSection, DataSection, Paths, ModelsSection, TrainSection, TTASection, PseudoSection,
    EnsembleSection, SubmitSection, ScoreSection, ReportSection, BundleSection)}


# ---------------------------------------------------------------------------------- loading


def _build(cls: type, given: Mapping[str, Any], problems: list[str]) -> Any:
    """The section ``cls`` from ``given`` (missing keys default), appending every problem."""
    name = cls.NAME
    if not isinstance(given, Mapping):
        problems.append(f"{name}: a mapping of keys, got {given!r}")
        return cls()
    unknown = sorted(set(given) - set(cls.keys()))
    if unknown:
        problems.append(f"{name}: unknown key(s) {unknown}; valid keys: {cls.keys()}")
    values = {}
    for f in dataclasses.fields(cls):
        if f.name not in given:
            continue
        r: Rule = f.metadata["rule"]
        typed, ok = r.coerce(given[f.name])
        problem = None if ok else f"{r.describe()}, got {given[f.name]!r}"
        if ok and r.check is not None and typed is not None:
            problem = r.check(typed)
        if problem:
            problems.append(f"{name}.{f.name}: {problem}")
        else:
            values[f.name] = typed
    made = cls(**values)
    problems.extend(made.problems())
    return made


def _cross(p: dict[str, Any]) -> list[str]:
    """Rules between sections."""
    out = []
    models, data = p.get("models"), p.get("data")
    if models is not None and data is not None:
        bad = [k for k in models.folds if k >= data.folds]
        if bad:
            out.append(f"models.folds: each < data.folds ({data.folds}), got {bad}")
    pseudo = p.get("pseudo")
    if models is not None and pseudo is not None and models.pseudo_nets \
            and pseudo.fraction == 0 and pseudo.finetune == 0:
        out.append(PSEUDO_CONTROL_PROBLEM)
    return out


# pseudo.fraction 0 keeps the test images out of the second round, the control that shows what
# they add; from scratch that round would retrain the first one unchanged.
PSEUDO_CONTROL_PROBLEM = ("pseudo.fraction: 0 (a second round without pseudo-labels) needs "
                          "pseudo.finetune > 0; from scratch it would only retrain the first "
                          "round")


def read_file(file: str | os.PathLike = PARAMS_FILE) -> dict[str, Any]:
    """The raw mapping of ``file``; SettingsError if it is missing or not YAML."""
    file = Path(file)
    if not file.is_file():
        raise SettingsError(f"{file} not found (run from the project root, or pass --params)")
    try:
        data = yaml.safe_load(file.read_text(encoding="utf-8")) or {}
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        where = getattr(exc, "problem_mark", None)
        line = f" (line {where.line + 1})" if where is not None else ""
        raise SettingsError(f"{file}: not valid YAML{line}: fix the syntax") from None
    if not isinstance(data, dict):
        raise SettingsError(f"{file}: the top level must be a mapping of sections")
    return data


@dataclass(frozen=True)
class Settings:
    """The checked sections a stage declared it reads (attribute per section)."""

    sections: Mapping[str, Any]
    file: str = PARAMS_FILE

    def __getattr__(self, name: str) -> Any:
        sections = object.__getattribute__(self, "sections")
        if name in sections:
            return sections[name]
        if name in SECTIONS:  # a bug in the stage, not a user's mistake
            raise AttributeError(f"section {name!r} was not declared by this stage "
                                 f"(declared: {sorted(sections)})")
        raise AttributeError(name)


def check(data: Mapping[str, Any], where: str = PARAMS_FILE) -> dict[str, Any]:
    """Every section of ``data`` built and checked; SettingsError naming every problem."""
    problems: list[str] = []
    unknown = sorted(set(data) - set(SECTIONS))
    if unknown:
        problems.append(f"unknown section(s) {unknown}; valid sections: {sorted(SECTIONS)}")
    built = {name: _build(cls, data.get(name) or {}, problems) for name, cls in SECTIONS.items()}
    problems.extend(_cross(built))
    if problems:
        raise SettingsError(f"{where}: " + "; ".join(problems))
    return built


def load(reads: Sequence[str], file: str | os.PathLike | None = PARAMS_FILE,
         overrides: Mapping[str, Any] | None = None) -> Settings:
    """Check the whole file (every section, so a bad setting fails the first stage that runs,
    not the one that uses it hours later) and return the sections in ``reads``.

    ``overrides`` maps ``section.key`` to a value (a stage's command-line options) and is
    checked like the file. ``file`` None: the defaults (a tool used outside the project).
    """
    raw = read_file(file) if file is not None else {}
    data = {k: dict(v) if isinstance(v, Mapping) else v for k, v in raw.items()}
    for dotted, value in (overrides or {}).items():
        section, key = dotted.split(".", 1)
        data.setdefault(section, {})
        if isinstance(data[section], dict):
            data[section][key] = value
    built = check(data, str(file or "settings"))
    missing = [r for r in reads if r not in SECTIONS]
    if missing:
        raise AssertionError(f"unknown sections {missing}")
    return Settings({r: built[r] for r in reads}, str(file))


def defaults() -> dict[str, Any]:
    """Every section with its defaults (the schema's table)."""
    return {name: cls() for name, cls in SECTIONS.items()}


def reference() -> str:
    """The settings table in Markdown (README "Settings"): key, default, valid form, meaning."""
    rows = ["| key | default | valid | meaning |", "|---|---|---|---|"]
    for name, cls in SECTIONS.items():
        for f in dataclasses.fields(cls):
            r: Rule = f.metadata["rule"]
            default = _plain(f.default if f.default is not dataclasses.MISSING
                             else f.default_factory())
            shown = yaml.safe_dump(default, default_flow_style=True).strip()
            shown = shown[:-4] if shown.endswith("\n...") else shown.replace("\n...", "")
            how = "" if r.dvc_param else " (not a DVC param: where or how work runs)"
            rows.append(f"| `{name}.{f.name}` | `{shown}` | {r.describe()} | {r.doc}{how} |")
    return "\n".join(rows)


def dvc_params(section: str) -> list[str]:
    """The keys of ``section`` that a stage reading it lists under ``params`` in dvc.yaml."""
    return [f.name for f in dataclasses.fields(SECTIONS[section])
            if f.metadata["rule"].dvc_param]


def main(argv: Sequence[str] | None = None) -> None:
    """``python -m pipeline.lib.settings [--check FILE] [--reference]``."""
    import argparse
    import sys

    from pipeline.lib.errors import stage_errors

    parser = argparse.ArgumentParser(description="Check params.yaml, or print the settings "
                                                 "reference.")
    parser.add_argument("--params", default=PARAMS_FILE)
    parser.add_argument("--reference", action="store_true", help="print the Markdown table")
    args = parser.parse_args(argv)
    if args.reference:
        print(reference())
        return
    with stage_errors("params"):
        check(read_file(args.params), args.params)
    print(f"{args.params}: OK", file=sys.stderr)


if __name__ == "__main__":
    main()

"""Settings: one schema (pipeline/lib/settings.py), checked whole before any stage works, and
dvc.yaml, params.yaml and the README kept true to it."""
from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from pipeline.lib import settings as S
from pipeline.lib.stage import parse_overrides
from tests.conftest import ROOT

# (key path, bad value, words the message must hold). Every case of issue 25 is here.
BAD = [
    ("train.batch_size", -4, "train.batch_size: an integer >= 1, got -4"),
    ("train.batch_size", 0, "train.batch_size: an integer >= 1, got 0"),
    ("train.batch_size", 4.5, "train.batch_size: an integer >= 1, got 4.5"),
    ("train.ctx", "cpu:x", "train.ctx: cpu, gpu, cpu:I,J or gpu:I,J, got 'cpu:x'"),
    ("train.ctx", "tpu", "train.ctx:"),
    ("train.lr_steps", ["a"], "train.lr_steps: a list of integers >= 1"),
    ("train.lr_steps", [26, 20], "increasing, got [26, 20]"),
    ("train.lr_steps", [20, 40], "each step within 1..train.epochs (30), got [40]"),
    ("train.seed", -1, "train.seed: an integer in [0, 2147483647], got -1"),
    ("tta.seed", -1, "tta.seed: an integer in [0, 2147483647], got -1"),
    ("tta.n", 2.5, "tta.n: an integer >= 0, got 2.5"),
    ("tta.batch_size", 2.5, "tta.batch_size: an integer >= 1, got 2.5"),
    ("data.size", 32.5, "data.size: an integer in [8, 1024], got 32.5"),
    ("train.precision", "bf16", "train.precision: one of float32, bfloat16, auto, got 'bf16'"),
    ("tta.precision", "fp16", "tta.precision: one of float32, bfloat16, auto"),
    ("models.seeds", [], "models.seeds: a non-empty list"),
    ("models.seeds", [0, 0], "no repeats, got [0, 0]"),
    ("models.seeds", [-1], "models.seeds:"),
    ("models.folds", [0, 5], "models.folds: each < data.folds (3), got [5]"),
    ("models.folds", [], "models.folds: a non-empty list"),
    ("models.nets", [], "models.nets: a non-empty list"),
    ("models.pseudo_nets", ["lenet"], "models.pseudo_nets: ['lenet'] not in models.nets"),
    ("train.workers", -1, "train.workers: an integer >= 0, got -1"),
    ("train.prefetch", 0, "train.prefetch: an integer >= 1"),
    ("train.label_smoothing", 1.0, "train.label_smoothing: a number in [0, 1), got 1.0"),
    ("train.ema_half_life", -1, "train.ema_half_life: a number >= 0"),
    ("train.momentum", 1.5, "train.momentum: a number in [0, 1)"),
    ("train.lr", 0, "train.lr: a number > 0, got 0"),
    ("train.lr", "fast", "train.lr: a number > 0, got 'fast'"),
    ("train.kvstore", "horovod", "train.kvstore: one of device, local, nccl, dist_sync"),
    ("train.act", "swish", "train.act: one of relu, leaky"),
    ("train.bn", "yes", "train.bn: true or false, got 'yes'"),
    ("train.epochs", 0, "train.epochs: an integer >= 1, got 0"),
    ("train.augment", {"zoom": [2, 1]}, "train.augment: zoom: low 2.0 > high 1.0"),
    ("train.augment", {"bogus": 1}, "train.augment: unknown augmentation key(s) ['bogus']"),
    ("train.net_kwargs", {"tinynet": 3}, "train.net_kwargs: {net: {keyword: value}}"),
    ("tta.method", "sobol", "tta.method: one of random, halton, stratified, got 'sobol'"),
    ("tta.mean", "median", "tta.mean: one of probs, logits, geometric"),
    ("tta.int8", "yes", "tta.int8: one of true, false, auto, got 'yes'"),
    ("tta.int8_tolerance", -0.1, "tta.int8_tolerance: a number >= 0"),
    ("tta.calib_mode", "kl", "tta.calib_mode: one of naive, entropy, percentile, mean"),
    ("tta.int8_keep_fp32", ["conv0"], "tta.int8_keep_fp32: a list of first_conv, classifier, no repeats, got"),
    ("tta.int8_keep_fp32", "first_conv", "tta.int8_keep_fp32: a list of"),
    ("tta.int8_granularity", "per-channel", "tta.int8_granularity: one of tensor-wise"),
    ("tta.max_views", 0, "tta.max_views: an integer >= 1"),
    ("tta.chunk_images", 0, "tta.chunk_images: an integer >= 1"),
    ("tta.int8_guard_views", -1, "tta.int8_guard_views: an integer >= 0"),
    ("tta.ranges", {"shear": 95}, "tta.ranges: shear must be in [0, 90) degrees"),
    ("pseudo.fraction", 1.5, "pseudo.fraction: a number in [0, 1), got 1.5"),
    ("pseudo.fraction", -0.25, "pseudo.fraction: a number in [0, 1), got -0.25"),
    ("pseudo.temperature", 0, "pseudo.temperature: a number > 0"),
    ("ensemble.calibration", "platt", "ensemble.calibration: one of temperature, none"),
    ("submit.plain_csv", "no", "submit.plain_csv: true or false"),
    ("report.mistakes", -1, "report.mistakes: an integer >= 0"),
    ("report.samples_per_class", 0, "report.samples_per_class: an integer >= 1"),
    ("data.background", 256, "data.background: an integer in [0, 255], got 256"),
    ("data.format", "tiff", "data.format: one of png, jpg, got 'tiff'"),
    ("data.jpeg_quality", 0, "data.jpeg_quality: an integer in [1, 100]"),
    ("data.skip_bad", 1, "data.skip_bad: true or false, got 1"),
    ("data.folds", 1, "data.folds: an integer in [2, 100], got 1"),
    ("data.workers", -2, "data.workers: an integer >= 0"),
    ("sample.train_fraction", 1.0, "sample.train_fraction: a number in (0, 1), got 1.0"),
    ("bundle.target_precision", 1.5, "bundle.target_precision: a number in [0, 1], got 1.5"),
    ("paths.records", "", "paths.records: a path, got ''"),
    ("paths.checkpoints", None, "paths.checkpoints: a path, got None"),
    ("train.bogus", 1, "train: unknown key(s) ['bogus']; valid keys: ['net_kwargs'"),
    ("trian.epochs", 1, "unknown section(s) ['trian']; valid sections:"),
]
# Stages whose main() is cheap to call in-process; each case goes to one of them in turn, so
# every stage is shown to refuse a bad setting of any section.
STAGES = ["sample", "ingest", "pseudo", "ensemble", "submit", "score", "report"]


def test_the_table_has_at_least_40_cases_over_every_section():
    assert len(BAD) >= 40
    assert {k.split(".")[0] for k, _, _ in BAD} >= set(S.SECTIONS) - {"score"}


def _with(data: dict, dotted: str, value) -> dict:
    section, key = dotted.split(".")
    data = {k: dict(v) if isinstance(v, dict) else v for k, v in data.items()}
    data.setdefault(section, {})[key] = value
    return data


def _snapshot(folder: Path) -> list[tuple[str, int]]:
    return sorted((str(p.relative_to(folder)), p.stat().st_mtime_ns)
                  for p in folder.rglob("*"))


@pytest.mark.parametrize("n,case", list(enumerate(BAD)), ids=[c[0] for c in BAD])
def test_a_bad_setting_ends_any_stage_in_one_line_before_any_work(tmp_path, monkeypatch,
                                                                   capsys, n, case):
    import importlib

    dotted, value, words = case
    stage = STAGES[n % len(STAGES)]
    monkeypatch.chdir(tmp_path)
    data = yaml.safe_load((ROOT / "params.yaml").read_text())
    Path("params.yaml").write_text(yaml.safe_dump(_with(data, dotted, value)))
    before = _snapshot(tmp_path)
    main = importlib.import_module(f"pipeline.{stage}").main
    with pytest.raises(SystemExit) as err:
        main([])
    message = str(err.value.code)
    assert message.startswith(f"{stage} failed: params.yaml: ") and "\n" not in message
    assert words in message, message
    assert _snapshot(tmp_path) == before  # nothing written, nothing touched
    assert capsys.readouterr().out == ""


def test_every_problem_of_the_file_is_named_at_once():
    data = yaml.safe_load((ROOT / "params.yaml").read_text())
    for dotted, value, _ in BAD[:12]:
        data = _with(data, dotted, value)
    with pytest.raises(S.SettingsError) as err:
        S.check(data)
    message = str(err.value)
    for dotted in {d for d, _, _ in BAD[:12]}:
        assert f"{dotted}:" in message, dotted


def test_real_commands_refuse_bad_settings_with_exit_1_and_no_traceback(tmp_path):
    data = yaml.safe_load((ROOT / "params.yaml").read_text())
    data = _with(_with(data, "train.batch_size", 4.5), "tta.seed", -1)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(data))
    for cmd in (["pipeline.train", "--net", "tinynet", "--fold", "0"],
                ["pipeline.predict", "--net", "tinynet", "--fold", "0"]):
        done = subprocess.run([sys.executable, "-m", *cmd], cwd=tmp_path, capture_output=True,
                              text=True, timeout=120, env=dict(os.environ, PYTHONPATH=str(ROOT)))
        assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr
        last = done.stderr.strip().splitlines()[-1]
        assert "train.batch_size: an integer >= 1, got 4.5" in last
        assert "tta.seed: an integer in [0, 2147483647], got -1" in last
    assert sorted(p.name for p in tmp_path.iterdir()) == ["params.yaml"]


def test_yaml_quirks_and_syntax_errors(tmp_path):
    # YAML 1.1 reads 1e6 and 5e-4 (no dot) as strings: numbers are accepted as written.
    data = _with(_with(yaml.safe_load((ROOT / "params.yaml").read_text()), "train.lr", "1e6"),
                 "train.wd", "5e-4")
    built = S.check(data)
    assert built["train"].lr == 1e6 and built["train"].wd == 5e-4
    (tmp_path / "params.yaml").write_text("train:\n  epochs: [1\n")
    with pytest.raises(S.SettingsError, match=r"not valid YAML \(line \d+\): fix the syntax"):
        S.load(("train",), tmp_path / "params.yaml")
    (tmp_path / "params.yaml").write_text("- a list\n")
    with pytest.raises(S.SettingsError, match="top level must be a mapping"):
        S.load(("train",), tmp_path / "params.yaml")


def test_the_pixel_limit_default_is_the_decoder_default():
    from pipeline.lib.images import MAX_PIXELS

    assert S.DataSection().max_pixels == MAX_PIXELS


def test_batch_size_must_split_over_the_devices():
    with pytest.raises(S.SettingsError, match=r"a multiple of the 2 devices of train.ctx "
                                              r"\(cpu:0,1\), got 5"):
        S.TrainSection.of(ctx="cpu:0,1", batch_size=5)
    assert S.TrainSection.of(ctx="cpu:0,1", batch_size=6).devices == 2


def test_overrides_are_checked_like_the_file(tmp_path):
    (tmp_path / "params.yaml").write_text((ROOT / "params.yaml").read_text())
    cfg = S.load(("train",), tmp_path / "params.yaml",
                 parse_overrides(["train.epochs=3", "train.lr_steps=[1, 2]"]))
    assert cfg.train.epochs == 3 and cfg.train.lr_steps == (1, 2)
    with pytest.raises(S.SettingsError, match="train.epochs: an integer >= 1, got -3"):
        S.load(("train",), tmp_path / "params.yaml", parse_overrides(["train.epochs=-3"]))
    with pytest.raises(S.SettingsError, match="expected SECTION.KEY=VALUE"):
        parse_overrides(["epochs=3"])


def test_a_stage_sees_only_the_sections_it_declares(tmp_path):
    (tmp_path / "params.yaml").write_text((ROOT / "params.yaml").read_text())
    cfg = S.load(("train", "paths"), tmp_path / "params.yaml")
    assert cfg.train.epochs >= 1 and cfg.paths.records
    with pytest.raises(AttributeError, match="not declared by this stage"):
        cfg.tta


# ------------------------------------------------------- the schema and the files around it


def test_params_yaml_holds_the_schema_defaults():
    """One table of defaults: every value in params.yaml is the schema's default, so code and
    file can never disagree again (change both together, or neither)."""
    data = yaml.safe_load((ROOT / "params.yaml").read_text())
    built = S.check(data)
    defaults = S.defaults()
    for name, section in data.items():
        for key in section:
            assert getattr(built[name], key) == getattr(defaults[name], key), f"{name}.{key}"


def _stage_reads() -> dict[str, tuple[str, ...]]:
    """Each stage module's declared sections: the tuple in its ``stage.run(...)`` call."""
    out = {}
    for path in (ROOT / "pipeline").glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and getattr(node.func, "attr", "") == "run" \
                    and getattr(node.func.value, "id", "") == "stage":
                out[path.stem] = tuple(ast.literal_eval(node.args[1]))
    return out


def test_dvc_yaml_lists_exactly_the_params_each_stage_reads():
    """dvc.yaml's params are the keys of the sections the stage's code declares that change
    what it computes; how/where keys (workers, scratch folders, paths) are never listed, so
    changing them leaves every stage up to date."""
    reads = _stage_reads()
    assert set(reads) >= {"sample", "ingest", "train", "predict", "pseudo", "ensemble",
                          "submit", "score", "report"}
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    for name, stage in stages.items():
        module = stage["cmd"].split()[2].split(".")[1]
        listed = set(stage.get("params") or [])
        declared = {s for s in reads[module] if s != "paths"}
        expected = {f"{s}.{k}" for s in declared for k in S.dvc_params(s)}
        if module == "train":  # the pseudo section matters to the second round only
            expected = {k for k in expected if not k.startswith("pseudo.")}
            if "--pseudo" in stage["cmd"]:
                expected |= {"pseudo.fraction", "pseudo.finetune"}
        assert listed == expected, (name, sorted(listed ^ expected))
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    listed = {k for stage in stages.values() for k in stage.get("params") or []}
    absent = sorted(k for k in listed if k.split(".")[1] not in params[k.split(".")[0]])
    assert not absent, f"dvc repro needs these in params.yaml: {absent}"
    assert not any(k in stages["train"]["params"] for k in ("train.workers", "train.prefetch"))
    assert "tta.work" not in stages["predict"]["params"]


def test_readme_settings_table_is_the_schema():
    readme = (ROOT / "README.md").read_text()
    assert S.reference() in readme, "README 'Settings': paste `python -m pipeline.lib.settings " \
                                    "--reference`"

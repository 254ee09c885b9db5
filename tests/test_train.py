"""Training: schedule, contexts, checkpoints that survive kill -9 and corruption, 2 devices."""
from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from pipeline import train as T
from pipeline.ingest import Settings, ingest
from pipeline.lib import checkpoint
from pipeline.lib import devices as D
from pipeline.lib.settings import SettingsError, TrainSection
from pipeline.tools.synth import generate
from tests.conftest import ROOT, where, write_params

NET = "lenet"


@pytest.fixture(scope="module")
def records(tmp_path_factory) -> Path:
    """A tiny synthetic record set: 3 classes x 16 images at 32 px, 2 folds."""
    base = tmp_path_factory.mktemp("train")
    generate(base / "ndsb", classes=3, per_class=16, test=6, seed=2, max_size=90)
    ingest(base / "ndsb", base / "records", Settings(size=32), folds=2, workers=1)
    return base / "records"


def config(tmp: Path, **over) -> TrainSection:
    """Fast train settings; the run's files go under ``tmp`` (:func:`where`)."""
    base = {"epochs": 2, "batch_size": 8, "lr_steps": [1], "workers": 0, "act": "leaky",
            "bn": False}
    base.update(over)
    return TrainSection.of(**base)


def params_of(directory: Path, name: str = "model.params") -> dict[str, np.ndarray]:
    import mxnet as mx

    return {k: v.asnumpy() for k, v in mx.nd.load(str(directory / name)).items()}


def test_lr_schedule_steps_by_factor():
    steps = [400, 480]
    assert T.lr_at(0, 0.01, steps, 0.1) == 0.01
    assert T.lr_at(399, 0.01, steps, 0.1) == 0.01
    assert T.lr_at(400, 0.01, steps, 0.1) == pytest.approx(0.001)
    assert T.lr_at(479, 0.01, steps, 0.1) == pytest.approx(0.001)
    assert T.lr_at(480, 0.01, steps, 0.1) == pytest.approx(0.0001)
    assert T.lr_at(559, 0.01, [], 0.1) == 0.01


def test_parse_ctx():
    import mxnet as mx

    assert D.parse_ctx("cpu") == [mx.cpu(0)]
    assert D.parse_ctx("cpu:0,1") == [mx.cpu(0), mx.cpu(1)]
    with pytest.raises(D.DeviceError, match="cpu"):
        D.parse_ctx("tpu:0")
    if mx.context.num_gpus() == 0:
        with pytest.raises(D.DeviceError, match="not available"):
            D.parse_ctx("gpu:0")


def test_unsupported_kvstores_are_refused():
    with pytest.raises(D.DeviceError, match="falls back"):
        D.make_kvstore("horovod", [])


def test_train_writes_metrics_plots_checkpoint_and_oof(records, tmp_path):
    cfg = config(tmp_path)
    metrics = T.train(T.Run(NET, 0, cfg, where(tmp_path, records)))
    run_dir = tmp_path / "ck" / f"{NET}--fold0"
    spec = json.loads((run_dir / "model.json").read_text())
    assert spec["net"] == NET and spec["classes"] == json.loads(
        (records / "meta.json").read_text())["classes"]
    assert spec["epoch"] == 2 and spec["size"] == 32 and spec["input"]["invert"]
    plot = (tmp_path / "p" / f"train--{NET}--fold0.tsv").read_text().splitlines()
    assert plot[0].split("\t")[:4] == ["epoch", "lr", "train_loss", "valid_logloss"]
    assert len(plot) == 3 and plot[2].split("\t")[1] == "0.001"
    saved = json.loads((tmp_path / "m" / f"train--{NET}--fold0.json").read_text())
    assert saved["valid_logloss"] == pytest.approx(metrics["valid_logloss"])
    from pipeline.lib.predictions import load_prediction_file

    probs, names = load_prediction_file(run_dir / "valid.npy")
    assert len(names) == saved["valid_images"] and np.allclose(probs.sum(1), 1, atol=1e-5)
    net, spec = checkpoint.load_model(run_dir)  # enough to predict, no training code


def test_rerun_of_finished_run_changes_nothing(records, tmp_path):
    cfg = config(tmp_path)
    T.train(T.Run(NET, 0, cfg, where(tmp_path, records)))
    before = params_of(tmp_path / "ck" / f"{NET}--fold0")
    T.train(T.Run(NET, 0, cfg, where(tmp_path, records)))
    after = params_of(tmp_path / "ck" / f"{NET}--fold0")
    assert all(np.array_equal(before[k], after[k]) for k in before)


def test_resume_equals_uninterrupted_run(records, tmp_path):
    full = config(tmp_path / "full", epochs=3)
    T.train(T.Run(NET, 0, full, where(tmp_path / "full", records)))
    part = config(tmp_path / "part", epochs=3)
    T.train(T.Run(NET, 0, part.replace(epochs=1), where(tmp_path / "part", records)))  # "interrupted" after epoch 1
    T.train(T.Run(NET, 0, part, where(tmp_path / "part", records)))                   # resumes at epoch 2
    a, b = (params_of(tmp_path / d / "ck" / f"{NET}--fold0") for d in ("full", "part"))
    for key in a:
        np.testing.assert_allclose(a[key], b[key], rtol=1e-5, atol=1e-6, err_msg=key)


def test_corrupt_latest_checkpoint_falls_back_with_warning(records, tmp_path):
    cfg = config(tmp_path, epochs=2)
    T.train(T.Run(NET, 0, cfg, where(tmp_path, records)))
    run_dir = tmp_path / "ck" / f"{NET}--fold0"
    latest = run_dir / "epoch-0002.params"
    latest.write_bytes(latest.read_bytes()[:100])  # truncated, as by a full disk
    with pytest.warns(UserWarning, match="epoch-0002.params"):
        record = checkpoint.latest(run_dir)
    assert record["epoch"] == 1
    with pytest.warns(UserWarning):
        T.train(T.Run(NET, 0, cfg, where(tmp_path, records)))  # redoes epoch 2 from epoch 1
    assert checkpoint.latest(run_dir)["epoch"] == 2


def test_precision_is_recorded_and_part_of_the_fingerprint(records, tmp_path, capsys):
    from pipeline.lib.precision import native_bfloat16

    T.train(T.Run(NET, 0, config(tmp_path, epochs=1, precision="float32"), where(tmp_path, records)))
    run_dir = tmp_path / "ck" / f"{NET}--fold0"
    assert json.loads((run_dir / "model.json").read_text())["precision"] == "float32"
    if native_bfloat16():
        T.train(T.Run(NET, 0, config(tmp_path, epochs=1, precision="bfloat16"), where(tmp_path, records)))
        assert "starting afresh" in capsys.readouterr().out
        assert json.loads((run_dir / "model.json").read_text())["precision"] == "bfloat16"
    with pytest.raises(SettingsError, match="train.precision: one of float32, bfloat16, auto"):
        config(tmp_path, epochs=1, precision="half")


def test_changed_settings_start_afresh(records, tmp_path, capsys):
    T.train(T.Run(NET, 0, config(tmp_path, epochs=1), where(tmp_path, records)))
    T.train(T.Run(NET, 0, config(tmp_path, epochs=1, lr=0.02), where(tmp_path, records)))
    assert "starting afresh" in capsys.readouterr().out


def test_two_contexts_equal_one_context_with_same_global_batch(records, tmp_path):
    # float32: in bfloat16 each half batch rounds differently, which is not what this tests.
    one = config(tmp_path / "one", epochs=1, ctx="cpu", precision="float32")
    two = config(tmp_path / "two", epochs=1, ctx="cpu:0,1", precision="float32")
    T.train(T.Run(NET, 0, one, where(tmp_path / "one", records)))
    T.train(T.Run(NET, 0, two, where(tmp_path / "two", records)))
    a, b = (params_of(tmp_path / d / "ck" / f"{NET}--fold0") for d in ("one", "two"))
    import mxnet as mx

    from pipeline.lib.records import load_meta

    initial = T.build(T.Run(NET, 0, one, where(tmp_path / "one", records)),
                      load_meta(records), D.parse_ctx("cpu"))[0]
    initial(mx.nd.zeros((1, 1, 32, 32)))  # finish deferred initialization
    moved = 0.0
    for key in a:
        np.testing.assert_allclose(a[key], b[key], rtol=1e-4, atol=1e-5, err_msg=key)
    for name, p in initial._collect_params_with_prefix().items():
        moved = max(moved, float(np.abs(p.data().asnumpy() - a[name]).max()))
    assert moved > 1e-4  # the update was real, so the equality above means something


def test_nan_loss_stops_with_clear_error_and_keeps_last_checkpoint(records, tmp_path):
    # a sane first epoch, then the schedule multiplies the rate by 1e30: the loss diverges
    cfg = config(tmp_path, epochs=3, lr=0.01, lr_steps=[1], lr_factor=1e30)
    with pytest.raises(T.TrainingError, match="loss became"):
        T.train(T.Run(NET, 0, cfg, where(tmp_path, records)))
    run_dir = tmp_path / "ck" / f"{NET}--fold0"
    assert checkpoint.latest(run_dir)["epoch"] == 1
    assert not (run_dir / "model.json").exists()  # no final model from a diverged run


@pytest.mark.slow
def test_kill_9_then_rerun_resumes_and_finishes(records, tmp_path):
    cfg = config(tmp_path, epochs=12, workers=1)
    write_params(tmp_path / "params.yaml", where(Path("."), records), train=cfg)
    cmd = [sys.executable, "-m", "pipeline.train", "--net", NET, "--fold", "0",
           "--params", str(tmp_path / "params.yaml")]
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    log = open(tmp_path / "first-run.log", "wb")  # a file, not a pipe: output never blocks
    proc = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)
    run_dir = tmp_path / "ck" / f"{NET}--fold0"
    deadline = time.time() + 300
    while not (run_dir / "epoch-0002.json").exists():
        assert proc.poll() is None, (tmp_path / "first-run.log").read_text()
        assert time.time() < deadline
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)  # the trainer and its data workers, mid-epoch
    proc.wait()
    log.close()
    killed_at = checkpoint.latest(run_dir)["epoch"]
    assert 2 <= killed_at < 12
    out = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True,
                         timeout=600)
    assert out.returncode == 0, out.stderr
    assert f"resuming after epoch {killed_at}" in out.stdout
    spec = json.loads((run_dir / "model.json").read_text())
    assert spec["epoch"] == 12 and [h["epoch"] for h in spec["history"]] == list(range(1, 13))


def test_fingerprint_follows_architecture_and_settings_not_epochs():
    meta = {"classes": ["a", "b"], "size": 32, "background": 255, "folds": 2, "seed": 0,
            "files": {}}
    cfg = TrainSection().as_dict()
    base = T.fingerprint("lenet", 0, cfg, meta, "Conv(16)")
    assert base == T.fingerprint("lenet", 0, dict(cfg, epochs=99, workers=3), meta, "Conv(16)")
    assert base != T.fingerprint("lenet", 0, cfg, meta, "Conv(32)")
    assert base != T.fingerprint("lenet", 0, dict(cfg, lr=0.5), meta, "Conv(16)")
    assert base != T.fingerprint("lenet", 1, cfg, meta, "Conv(16)")


def test_restart_with_new_settings_replaces_longer_old_run(records, tmp_path):
    T.train(T.Run(NET, 0, config(tmp_path, epochs=3), where(tmp_path, records)))
    metrics = T.train(T.Run(NET, 0, config(tmp_path, epochs=2, lr=0.02), where(tmp_path, records)))
    run_dir = tmp_path / "ck" / f"{NET}--fold0"
    spec = json.loads((run_dir / "model.json").read_text())
    assert spec["epoch"] == 2 and len(spec["history"]) == 2 and metrics["epochs"] == 2
    assert sorted(p.name for p in run_dir.glob("epoch-*.json")) == [
        "epoch-0001.json", "epoch-0002.json"]


def test_fewer_epochs_than_the_checkpoint_never_keep_the_longer_run(records, tmp_path, capsys):
    """Asking for fewer epochs uses that epoch if kept (same weights), else starts afresh."""
    T.train(T.Run(NET, 0, config(tmp_path / "ref", epochs=2), where(tmp_path / "ref", records)))
    reference = params_of(tmp_path / "ref" / "ck" / f"{NET}--fold0")

    T.train(T.Run(NET, 0, config(tmp_path, epochs=3), where(tmp_path, records)))
    capsys.readouterr()
    metrics = T.train(T.Run(NET, 0, config(tmp_path, epochs=2), where(tmp_path, records)))  # epoch 2 is kept
    assert "using its epoch 2" in capsys.readouterr().out
    assert metrics["epochs"] == 2 and metrics["origin"] == "epoch 2 of an earlier 3-epoch run"
    run_dir = tmp_path / "ck" / f"{NET}--fold0"
    assert json.loads((run_dir / "model.json").read_text())["epoch"] == 2
    assert not (run_dir / "epoch-0003.json").exists()
    got = params_of(run_dir)
    assert all(np.array_equal(reference[k], got[k]) for k in reference)

    T.train(T.Run(NET, 0, config(tmp_path, epochs=4), where(tmp_path, records)))  # keeps epochs 3 and 4
    metrics = T.train(T.Run(NET, 0, config(tmp_path, epochs=1), where(tmp_path, records)))
    assert "no longer kept; starting afresh" in capsys.readouterr().out
    assert metrics["epochs"] == 1 and metrics["origin"] == "trained from scratch"
    assert json.loads((run_dir / "model.json").read_text())["epoch"] == 1
    assert metrics["precision"] in ("float32", "bfloat16") and metrics["seed"] == 0


def test_a_seed_of_the_grid_names_the_run_and_replaces_train_seed(records, tmp_path):
    from pipeline.lib.runs import RunNameError, member_name, parse_member

    run = T.Run(NET, 0, config(tmp_path, epochs=1), where(tmp_path, records), seed=3)
    assert run.name == f"{NET}-seed3--fold0" and run.cfg.seed == 3
    metrics = T.train(run)
    assert (metrics["seed"], metrics["net"], metrics["member"]) == (3, NET, f"{NET}-seed3")
    spec = json.loads((tmp_path / "ck" / f"{NET}-seed3--fold0" / "model.json").read_text())
    assert spec["net"] == NET and spec["rng"]["seed"] == 3
    assert (tmp_path / "m" / f"train--{NET}-seed3--fold0.json").exists()
    assert parse_member(member_name("ndsb_net1", 12)) == ("ndsb_net1", 12)
    assert parse_member("ndsb_net1") == ("ndsb_net1", None)
    with pytest.raises(RunNameError, match="reserved"):
        member_name("lenet-seed2", 1)
    with pytest.raises(RunNameError, match=">= 0"):
        member_name("lenet", -1)


def test_weight_average_is_validated_published_and_resumed(records, tmp_path):
    """ema_half_life: validation and model.params use the average; resuming continues it."""
    full = config(tmp_path / "full", epochs=3, ema_half_life=1.0)
    metrics = T.train(T.Run(NET, 0, full, where(tmp_path / "full", records)))
    run_dir = tmp_path / "full" / "ck" / f"{NET}--fold0"
    record = json.loads((run_dir / "epoch-0003.json").read_text())
    assert "ema.params" in record["sha256"] and record["average_steps"] > 0
    published = params_of(run_dir)
    average = params_of(run_dir, "epoch-0003.ema.params")
    assert all(np.array_equal(published[k], average[k]) for k in published)
    raw = params_of(run_dir, "epoch-0003.params")
    assert any(not np.allclose(raw[k], average[k]) for k in raw)
    assert metrics["valid_logloss"] == pytest.approx(record["history"][-1]["valid_logloss"])

    part = config(tmp_path / "part", epochs=3, ema_half_life=1.0)
    T.train(T.Run(NET, 0, part.replace(epochs=1), where(tmp_path / "part", records)))
    T.train(T.Run(NET, 0, part, where(tmp_path / "part", records)))
    resumed = params_of(tmp_path / "part" / "ck" / f"{NET}--fold0")
    for key in published:
        np.testing.assert_allclose(published[key], resumed[key], rtol=1e-5, atol=1e-6)


def test_label_smoothing_trains_and_bad_options_are_refused(records, tmp_path):
    import mxnet as mx

    from pipeline.lib import sgd

    out = mx.nd.array([[2.0, 0.0, -1.0]])
    plain = sgd.loss_function()(out, mx.nd.array([0])).asscalar()
    smooth = sgd.loss_function(0.3)(out, mx.nd.array([0])).asscalar()
    logp = np.log(np.exp([2.0, 0.0, -1.0]) / np.exp([2.0, 0.0, -1.0]).sum())
    assert plain == pytest.approx(-logp[0], rel=1e-5)
    assert smooth == pytest.approx(-(0.8 * logp[0] + 0.1 * logp[1] + 0.1 * logp[2]), rel=1e-5)
    cfg = config(tmp_path, epochs=1, label_smoothing=0.1)
    metrics = T.train(T.Run(NET, 0, cfg, where(tmp_path, records)))
    assert math.isfinite(metrics["valid_logloss"])
    with pytest.raises(SettingsError) as err:
        config(tmp_path, label_smoothing=1.0, ema_half_life=-1)
    assert "train.label_smoothing" in str(err.value) and "ema_half_life" in str(err.value)


# ------------------------------------------------------------------ learning-rate schedules

def test_cosine_warms_up_per_batch_then_decays_to_min_lr():
    from pipeline.lib.schedule import Schedule

    s = Schedule("cosine", lr=0.1, epochs=10, warmup_epochs=2, min_lr=0.001)
    # warm-up: linear over the 2 x 4 steps, the first step not at 0
    assert [s.lr_at(0, b, 4) for b in range(4)] == pytest.approx([0.0125, 0.025, 0.0375, 0.05])
    assert s.lr_at(1, 3, 4) == pytest.approx(0.1)
    assert s.lr_at(2, 0, 4) == pytest.approx(0.1)  # the peak, where the decay starts
    assert s.lr_at(6, 0, 4) == pytest.approx((0.1 + 0.001) / 2)  # half way down the cosine
    assert s.lr_at(9, 3, 4) == pytest.approx(0.001, abs=3e-4)  # the last step: near min_lr
    lrs = [s.lr_at(e, b, 4) for e in range(2, 10) for b in range(4)]
    assert all(a > b for a, b in zip(lrs, lrs[1:]))  # falls every step after the warm-up
    assert s.momentum_at(5, 1, 4) == s.momentum
    # it ends where epochs says: the same step of a longer run has a higher rate
    longer = Schedule("cosine", lr=0.1, epochs=20, warmup_epochs=2, min_lr=0.001)
    assert longer.lr_at(6, 0, 4) > s.lr_at(6, 0, 4)


def test_onecycle_rises_from_lr_over_div_and_moves_momentum_the_other_way():
    from pipeline.lib.schedule import Schedule

    s = Schedule("onecycle", lr=0.1, momentum=0.95, epochs=10, warmup_epochs=3, min_lr=0.0,
                 cycle_div=25, cycle_momentum=0.85)
    assert s.lr_at(0, 0, 5) == pytest.approx(0.004) and s.momentum_at(0, 0, 5) == 0.95
    assert s.lr_at(1, 2, 4) == pytest.approx(0.004 + 0.096 / 2)  # half way up: t = 1.5
    assert s.momentum_at(1, 2, 4) == pytest.approx(0.90)
    assert s.lr_at(3, 0, 5) == pytest.approx(0.1) and s.momentum_at(3, 0, 5) == \
        pytest.approx(0.85)
    assert s.lr_at(6, 2, 4) == pytest.approx(0.05)  # half way down: t = 6.5
    assert s.momentum_at(6, 2, 4) == pytest.approx(0.90)
    assert s.lr_at(9, 4, 5) < 0.001 and s.momentum_at(9, 4, 5) > 0.949


def test_steps_is_the_thesis_schedule_and_ignores_epochs():
    from pipeline.lib.schedule import Schedule

    cfg = TrainSection.of(epochs=30, lr_steps=[20, 26])
    schedule = T.schedule_of(cfg)
    assert not schedule.per_batch
    assert [schedule.lr_at(e, b, 7) for e, b in ((0, 0), (19, 6), (20, 0), (26, 3))] == \
        pytest.approx([0.01, 0.01, 0.001, 0.0001])
    assert Schedule("steps", 0.01, epochs=300, lr_steps=(20, 26)).lr_at(26) == \
        pytest.approx(0.0001)


def test_schedule_settings_are_checked_for_the_schedule_that_reads_them():
    with pytest.raises(SettingsError) as err:
        TrainSection.of(schedule="cosine", epochs=3, warmup_epochs=3, lr=0.01, min_lr=0.02)
    assert "train.warmup_epochs: less than train.epochs (3) under schedule cosine, got 3" in \
        str(err.value) and "train.min_lr: less than train.lr (0.01)" in str(err.value)
    with pytest.raises(SettingsError, match="train.cycle_momentum: at most train.momentum"):
        TrainSection.of(schedule="onecycle", epochs=10, momentum=0.8, cycle_momentum=0.85)
    # keys of another schedule are not read, so not checked against each other
    TrainSection.of(schedule="cosine", epochs=10, lr_steps=[20, 26])
    TrainSection.of(schedule="steps", epochs=1, warmup_epochs=2.0, lr_steps=[])
    with pytest.raises(SettingsError, match="train.schedule: one of steps, cosine, onecycle"):
        TrainSection.of(schedule="linear")


def test_fingerprint_holds_epochs_only_under_schedules_that_read_it():
    meta = {"classes": ["a", "b"], "size": 32, "background": 255, "folds": 2, "seed": 0,
            "files": {}}
    steps = TrainSection().as_dict()

    def fp(cfg):
        return T.fingerprint("lenet", 0, cfg, meta, "Conv(16)")

    # steps: epochs and the other schedules' keys are not part of it, so a run extends; and
    # it is the fingerprint from before schedules existed (those checkpoints still fit)
    assert fp(steps) == fp(dict(steps, epochs=99, warmup_epochs=5, min_lr=1e-4,
                                cycle_div=10, cycle_momentum=0.8))
    before = {k: v for k, v in steps.items() if k not in T.RESUMABLE_KEYS
              and k not in ("schedule", "warmup_epochs", "min_lr", "cycle_div",
                            "cycle_momentum")}
    import hashlib

    data = {k: meta[k] for k in ("classes", "size", "background", "folds", "seed", "files")}
    blob = json.dumps(["lenet", 0, before, data, "Conv(16)"], sort_keys=True, default=str)
    assert fp(steps) == hashlib.sha256(blob.encode()).hexdigest()[:16]
    cosine = dict(steps, schedule="cosine")
    assert fp(cosine) != fp(steps)
    assert fp(cosine) != fp(dict(cosine, epochs=99))  # the lr of every epoch depends on it
    assert fp(cosine) != fp(dict(cosine, warmup_epochs=1))
    assert fp(cosine) == fp(dict(cosine, lr_steps=[5], cycle_div=3, workers=4))  # not read
    onecycle = dict(steps, schedule="onecycle")
    assert fp(onecycle) != fp(dict(onecycle, cycle_momentum=0.8))
    assert "schedule" in T.shaping(cosine) and "schedule" not in T.shaping(steps)


def test_other_epochs_under_cosine_train_afresh_and_say_why(records, tmp_path, capsys):
    cfg = config(tmp_path, epochs=2, schedule="cosine", warmup_epochs=1)
    T.train(T.Run(NET, 0, cfg, where(tmp_path, records)))
    capsys.readouterr()
    metrics = T.train(T.Run(NET, 0, cfg.replace(epochs=3), where(tmp_path, records)))
    out = capsys.readouterr().out
    assert "train.epochs changed from 2 to 3, and under schedule cosine the learning rate " \
           "of every epoch depends on the total" in out and "starting afresh" in out
    assert metrics["origin"] == "trained from scratch" and metrics["epochs"] == 3
    plot = (tmp_path / "p" / f"train--{NET}--fold0.tsv").read_text().splitlines()
    lrs = [float(line.split("\t")[1]) for line in plot[1:]]
    assert lrs[0] < lrs[1] and lrs[2] < lrs[1]  # warm-up, then down (first step per epoch)


@pytest.mark.parametrize("schedule", ["cosine", "onecycle"])
def test_resume_under_per_batch_schedules_equals_an_uninterrupted_run(records, tmp_path,
                                                                       monkeypatch, capsys,
                                                                       schedule):
    """A crash after epoch 1 (as kill -9) and a graceful stop mid-epoch 2, both in the
    warm-up: the resumed run takes the very same steps as a run without interruption."""
    from pipeline.lib import sgd
    from pipeline.lib.errors import Stopped

    over = dict(epochs=3, schedule=schedule, warmup_epochs=1.5, lr=0.02, min_lr=0.001)
    T.train(T.Run(NET, 0, config(tmp_path / "full", **over), where(tmp_path / "full", records)))
    cut = config(tmp_path / "cut", **over)
    run_epoch = T.run_epoch

    def crash_in_epoch_2(s, epoch, *args, **kwargs):
        if epoch == 1:
            raise RuntimeError("killed")  # epoch 1 is saved, nothing of epoch 2
        return run_epoch(s, epoch, *args, **kwargs)

    monkeypatch.setattr(T, "run_epoch", crash_in_epoch_2)
    with pytest.raises(RuntimeError, match="killed"):
        T.train(T.Run(NET, 0, cut, where(tmp_path / "cut", records)))
    monkeypatch.undo()
    step, calls = sgd.step, []

    def stop_after_second_batch(*args, **kwargs):
        loss = step(*args, **kwargs)
        calls.append(1)
        if len(calls) == 2:  # epoch 2, batch 2: t = 1.67, between warm-up and decay
            os.kill(os.getpid(), signal.SIGTERM)
        return loss

    monkeypatch.setattr(sgd, "step", stop_after_second_batch)
    with pytest.raises(Stopped, match="saved epoch 2 after batch 2"):
        T.train(T.Run(NET, 0, cut, where(tmp_path / "cut", records)))
    monkeypatch.undo()
    capsys.readouterr()
    metrics = T.train(T.Run(NET, 0, cut, where(tmp_path / "cut", records)))
    assert metrics["origin"] == "resumed in epoch 2 after batch 2"
    a, b = (params_of(tmp_path / d / "ck" / f"{NET}--fold0") for d in ("full", "cut"))
    for key in a:
        np.testing.assert_allclose(a[key], b[key], rtol=1e-5, atol=1e-6, err_msg=key)
    full = json.loads((tmp_path / "full" / "ck" / f"{NET}--fold0" / "model.json").read_text())
    assert [h["lr"] for h in full["history"]] == pytest.approx(
        [h["lr"] for h in json.loads((tmp_path / "cut" / "ck" / f"{NET}--fold0" /
                                      "model.json").read_text())["history"]])


def test_onecycle_moves_the_momentum_of_the_optimizer(records, tmp_path):
    over = dict(epochs=1, schedule="onecycle", warmup_epochs=0.5, momentum=0.9)
    for name, low in (("flat", 0.9), ("cycled", 0.5)):
        cfg = config(tmp_path / name, cycle_momentum=low, **over)
        T.train(T.Run(NET, 0, cfg, where(tmp_path / name, records)))
    a, b = (params_of(tmp_path / d / "ck" / f"{NET}--fold0") for d in ("flat", "cycled"))
    assert any(not np.allclose(a[k], b[k], rtol=1e-4, atol=1e-6) for k in a)

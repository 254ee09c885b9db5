"""Pseudo-labels: per-fold soft targets without leakage, mixed batches, the second round."""
from __future__ import annotations

import contextlib
import json
from pathlib import Path

import numpy as np
import pytest

from pipeline import pseudo as P
from pipeline import train as T
from pipeline.ingest import Settings, ingest
from pipeline.lib.settings import TrainSection
from tests.conftest import where
from pipeline.lib.data import MixedBatchLoader, MixedReader, soft_targets
from pipeline.lib.predictions import load_predictions, save_predictions
from pipeline.lib.records import RecordReader, load_meta
from pipeline.tools.synth import generate

NET = "lenet"


@pytest.fixture(scope="module")
def records(tmp_path_factory) -> Path:
    """3 classes x 16 train images and 12 test images at 32 px, 2 folds."""
    base = tmp_path_factory.mktemp("pseudo")
    generate(base / "ndsb", classes=3, per_class=16, test=12, seed=5, max_size=90)
    ingest(base / "ndsb", base / "records", Settings(size=32), folds=2, workers=1)
    return base / "records"


def fake_predictions(directory: Path, meta: dict, member: str, fold: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    names = [t["name"] for t in meta["test"]]
    probs = rng.dirichlet(np.ones(len(meta["classes"])), len(names)).astype(np.float32)
    order = rng.permutation(len(names))  # rows in another order than meta.json's
    save_predictions(directory, "test", member, fold, probs[order], [names[i] for i in order])
    return probs


def test_fold_targets_come_from_that_folds_models_only(records, tmp_path):
    meta = load_meta(records)
    preds = tmp_path / "models"
    made = {(m, k): fake_predictions(preds, meta, m, k, seed=10 * k + i)
            for i, m in enumerate(["a-seed0", "a-seed1", "b-seed0", "b-seed1"]) for k in (0, 1)}
    metrics = P.pseudo(["a", "b"], None, [0, 1], preds, records, tmp_path / "pl",
                       metrics_path=tmp_path / "pseudo.json")
    for k in (0, 1):
        targets, names = load_predictions(tmp_path / "pl", "test", "pseudo", k)
        assert names == [t["name"] for t in meta["test"]]
        expected = np.mean([made[(m, k)] for m in ("a-seed0", "a-seed1", "b-seed0", "b-seed1")],
                           axis=0)
        np.testing.assert_allclose(targets, expected / expected.sum(1, keepdims=True),
                                   atol=1e-5)
    assert metrics["members"] == ["a-seed0", "a-seed1", "b-seed0", "b-seed1"]
    assert json.loads((tmp_path / "pseudo.json").read_text())["folds"] == [0, 1]
    # No file of another fold, and no validation prediction, was read: fold 0's targets stay
    # the same when fold 1's predictions are replaced.
    fake_predictions(preds, meta, "a-seed0", 1, seed=99)
    P.pseudo(["a", "b"], [0], [0, 1], preds, records, tmp_path / "pl2")
    again, _ = load_predictions(tmp_path / "pl2", "test", "pseudo", 0)
    first, _ = load_predictions(tmp_path / "pl", "test", "pseudo", 0)
    np.testing.assert_array_equal(again, first)
    # temperature < 1 sharpens
    P.pseudo(["a", "b"], [0], [0, 1], preds, records, tmp_path / "sharp", temperature=0.5)
    sharp, _ = load_predictions(tmp_path / "sharp", "test", "pseudo", 0)
    assert sharp.max(axis=1).mean() > first.max(axis=1).mean()


def test_bad_settings_and_missing_predictions_are_named(records, tmp_path, monkeypatch):
    with pytest.raises(P.PseudoError) as err:
        P.pseudo([], [0, 5], [], tmp_path, records, tmp_path / "pl", temperature=0,
                 fraction=1.5)
    for words in ("distinct first-round nets", "folds [0, 5] invalid", "models.seeds",
                  "pseudo.temperature", "pseudo.fraction"):
        assert words in str(err.value)
    with pytest.raises(P.PseudoError, match="test--a-seed0--fold0.npy"):
        P.pseudo(["a"], [0], [0], tmp_path, records, tmp_path / "pl")
    monkeypatch.chdir(tmp_path)
    Path("params.yaml").write_text(f"paths:\n  records: {records}\npseudo:\n  temperature: -1\n")
    with pytest.raises(SystemExit, match="^pseudo failed: params.yaml: pseudo.temperature: a "
                                         "number > 0, got -1"):
        P.main(["--set", "models.nets=[a]", "--set", "models.pseudo_nets=[]"])


def test_mixed_batches_hold_the_fraction_and_replay_exactly(records):
    train, test = RecordReader(records, "train"), RecordReader(records, "test")
    reader = MixedReader(train, test)
    loader = MixedBatchLoader(reader, np.arange(20), batch_size=8, pseudo_per_batch=2, workers=0)
    batches = list(loader.epoch(3))
    assert len(batches) == len(loader) == 20 // 6
    for x, y in batches:
        assert x.shape == (8, 1, 32, 32) and (y < 0).sum() == 2 and (y >= 0).sum() == 6
    again = list(loader.epoch(3))
    assert all(np.array_equal(a[1], b[1]) for a, b in zip(batches, again))
    # Over epochs every test image is drawn about equally often.
    drawn = np.concatenate([y[y < 0] for e in range(6) for _, y in loader.epoch(e)])
    counts = np.bincount((-drawn - 1).astype(int), minlength=len(test))
    assert counts.max() - counts.min() <= 1
    targets = np.full((len(test), 3), 1 / 3, np.float32)
    soft = soft_targets(np.array([2.0, -1.0, 0.0]), targets)
    np.testing.assert_allclose(soft, [[0, 0, 1], [1 / 3, 1 / 3, 1 / 3], [1, 0, 0]])


def config(tmp: Path, **over) -> TrainSection:
    base = {"epochs": 2, "batch_size": 8, "lr_steps": [1], "workers": 0, "act": "leaky",
            "bn": False}
    base.update(over)
    return TrainSection.of(**base)


def test_second_round_trains_as_its_own_net_and_follows_its_targets(records, tmp_path):
    meta = load_meta(records)
    pl = tmp_path / "pl"
    names = [t["name"] for t in meta["test"]]
    uniform = np.full((len(names), 3), 1 / 3, np.float32)
    save_predictions(pl, "test", "pseudo", 0, uniform, names)
    run = T.Run(NET, 0, config(tmp_path), where(tmp_path, records), seed=1, pseudo=pl, pseudo_fraction=0.25)
    assert run.name == f"{NET}-pl-seed1--fold0"
    metrics = T.train(run)
    assert metrics["member"] == f"{NET}-pl-seed1" and np.isfinite(metrics["valid_logloss"])
    spec = json.loads((tmp_path / "ck" / run.name / "model.json").read_text())
    assert spec["net"] == NET and spec["train"]["pseudo"]["fraction"] == 0.25
    first = spec["fingerprint"]
    # New targets: a new second round, not a resumed one.
    save_predictions(pl, "test", "pseudo", 0, np.eye(3, dtype=np.float32)[
        np.arange(len(names)) % 3], names)
    again = T.Run(NET, 0, config(tmp_path), where(tmp_path, records), seed=1, pseudo=pl, pseudo_fraction=0.25)
    assert T.train(again)["origin"] == "trained from scratch"
    spec = json.loads((tmp_path / "ck" / run.name / "model.json").read_text())
    assert spec["fingerprint"] != first
    with pytest.raises(T.TrainingError, match="must be in \\[0, 1\\)"):
        T.Run(NET, 0, config(tmp_path), where(tmp_path, records), pseudo=pl, pseudo_fraction=1.0)
    with pytest.raises(T.TrainingError, match="needs pseudo.finetune > 0"):
        T.Run(NET, 0, config(tmp_path), where(tmp_path, records), pseudo=pl, pseudo_fraction=0.0)
    with pytest.raises(T.TrainingError, match="run the pseudo stage first"):
        T.Run(NET, 1, config(tmp_path), where(tmp_path, records), pseudo=pl)
    with pytest.raises(T.TrainingError, match="must leave room"):
        T.train(T.Run(NET, 0, config(tmp_path, batch_size=2), where(tmp_path, records), pseudo=pl,
                      pseudo_fraction=0.1))


def _params(path: Path) -> dict[str, np.ndarray]:
    import mxnet as mx

    return {k: v.asnumpy() for k, v in mx.nd.load(str(path)).items()}


def test_second_round_can_fine_tune_the_first_rounds_model(records, tmp_path):
    """pseudo.finetune = f: the second round starts from the first round's final weights
    (same net, seed, fold) and trains the schedule's last ceil(f x epochs) epochs; it resumes
    like any run, and new first-round weights start it afresh."""
    meta = load_meta(records)
    pl, paths = tmp_path / "pl", where(tmp_path, records)
    names = [t["name"] for t in meta["test"]]
    save_predictions(pl, "test", "pseudo", 0, np.full((len(names), 3), 1 / 3, np.float32), names)
    cfg = config(tmp_path, epochs=3, lr_steps=[2])

    def second(f: float = 0.5, c: TrainSection = cfg) -> T.Run:  # ceil(0.5 x 3) = 2 epochs
        return T.Run(NET, 0, c, paths, seed=1, pseudo=pl, pseudo_fraction=0.25, finetune=f)

    with pytest.raises(T.TrainingError, match="holds no finished model: train it first "
                                              r"\(python -m pipeline.train --net lenet --fold 0 "
                                              r"--seed 1\)"):
        second()
    T.train(T.Run(NET, 0, cfg, paths, seed=1))
    first = tmp_path / "ck" / f"{NET}-seed1--fold0"
    run = second()
    assert run.first_epoch == 1 and run.init_dir == first
    with contextlib.ExitStack() as held:  # the session starts from the first round's weights
        s = T.open_session(run, held)
        s.train_loader.close()
        start = {k: v.data().asnumpy() for k, v in s.net._collect_params_with_prefix().items()}
        assert s.start == 1 and s.origin.startswith(f"fine-tuned from {NET}-seed1--fold0")
    for k, v in _params(first / "model.params").items():
        np.testing.assert_array_equal(start[k], v)

    metrics = T.train(run)
    spec = json.loads((tmp_path / "ck" / run.name / "model.json").read_text())
    assert [h["epoch"] for h in spec["history"]] == [2, 3] and metrics["epochs"] == 2
    assert [h["lr"] for h in spec["history"]] == pytest.approx([0.01, 0.001])
    assert spec["train"]["pseudo"]["finetune"]["from_epoch"] == 1
    done = _params(tmp_path / "ck" / run.name / "model.params")
    # kill -9 after its first epoch: the rerun continues from there, to the same weights.
    for f in (tmp_path / "ck" / run.name).glob("epoch-0003*"):
        f.unlink()
    assert T.train(second())["origin"] == "resumed after epoch 2"
    for k, v in _params(tmp_path / "ck" / run.name / "model.params").items():
        np.testing.assert_array_equal(done[k], v)
    assert T.train(second())["origin"] == "already trained (3 epochs)"
    # Another share or new first-round weights: a new second round.
    assert T.train(second(0.2))["origin"].startswith("fine-tuned from")
    assert json.loads((tmp_path / "ck" / run.name / "model.json").read_text())["history"][0][
        "epoch"] == 3  # ceil(0.2 x 3) = 1: the last epoch
    T.train(T.Run(NET, 0, config(tmp_path, epochs=3, lr_steps=[2], lr=0.02), paths, seed=1))
    assert T.train(second(0.2))["origin"].startswith("fine-tuned from")
    # Damaged first-round weights, a first round of another shape, bad values: one line each.
    (first / "model.params").write_bytes(b"damaged")
    with pytest.raises(T.TrainingError, match="does not match its model.json"):
        T.train(second(0.2))
    T.train(T.Run(NET, 0, config(tmp_path, epochs=3, lr_steps=[2],
                                 net_kwargs={NET: {"width": 2}}), paths, seed=1))
    with pytest.raises(T.TrainingError, match="differs from this run in kwargs"):
        T.train(second(0.2))
    with pytest.raises(T.TrainingError, match=r"must be a number in \[0, 1\], got 1.5"):
        second(1.5)
    with pytest.raises(T.TrainingError, match="applies to a second round only"):
        T.Run(NET, 0, cfg, paths, seed=1, finetune=0.5)


def test_fraction_zero_is_the_same_fine_tuning_without_pseudo_labels(records, tmp_path):
    """pseudo.fraction 0 with pseudo.finetune > 0: the control. The second round fine-tunes
    the first round's model over the same epochs on the training images alone (no targets
    are read, so it needs no pseudo stage), with its own fingerprint: it is neither the first
    round nor the pseudo-labelled second round, and switching between them starts afresh."""
    meta = load_meta(records)
    paths = where(tmp_path, records)
    cfg = config(tmp_path, epochs=3, lr_steps=[2])
    missing = tmp_path / "no-pseudo-stage"  # nothing there: fraction 0 reads no targets
    with pytest.raises(T.TrainingError) as no_first:  # the only way out: train the first round
        T.Run(NET, 0, cfg, paths, seed=1, pseudo=missing, pseudo_fraction=0.0, finetune=0.5)
    assert str(no_first.value).endswith("--seed 1)")
    T.train(T.Run(NET, 0, cfg, paths, seed=1))
    control = T.Run(NET, 0, cfg, paths, seed=1, pseudo=missing, pseudo_fraction=0.0,
                    finetune=0.5)
    assert control.first_epoch == 1 and control.name == f"{NET}-pl-seed1--fold0"
    with contextlib.ExitStack() as held:
        s = T.open_session(control, held)
        s.train_loader.close()
        # only training images, a first round's batches: no test rows, no soft targets
        assert s.targets is None and len(s.train_loader) == len(s.train_idx) // 8
    metrics = T.train(control)
    assert metrics["origin"].startswith(f"fine-tuned from {NET}-seed1--fold0")
    spec = json.loads((tmp_path / "ck" / control.name / "model.json").read_text())
    assert spec["train"]["pseudo"]["fraction"] == 0.0 and "targets" not in spec["train"]["pseudo"]
    assert [h["epoch"] for h in spec["history"]] == [2, 3]
    assert T.train(T.Run(NET, 0, cfg, paths, seed=1, pseudo=missing, pseudo_fraction=0.0,
                         finetune=0.5))["origin"] == "already trained (3 epochs)"
    # With pseudo-labels the same run is another model: it starts afresh from the first round.
    pl = tmp_path / "pl"
    names = [t["name"] for t in meta["test"]]
    save_predictions(pl, "test", "pseudo", 0, np.full((len(names), 3), 1 / 3, np.float32), names)
    with_pl = T.Run(NET, 0, cfg, paths, seed=1, pseudo=pl, pseudo_fraction=0.25, finetune=0.5)
    assert T.train(with_pl)["origin"].startswith("fine-tuned from")
    again = json.loads((tmp_path / "ck" / control.name / "model.json").read_text())
    assert again["fingerprint"] != spec["fingerprint"]


def test_fraction_zero_without_fine_tuning_is_refused_when_loaded():
    from pipeline.lib.settings import SettingsError, check

    with pytest.raises(SettingsError, match="pseudo.fraction: 0 .* needs pseudo.finetune > 0"):
        check({"pseudo": {"fraction": 0, "finetune": 0}})
    assert check({"pseudo": {"fraction": 0, "finetune": 0.5}})["pseudo"].fraction == 0.0
    # without a second round the pair is harmless
    assert check({"pseudo": {"fraction": 0, "finetune": 0},
                  "models": {"pseudo_nets": []}})["pseudo"].fraction == 0.0


def test_finetune_share_is_checked_when_loaded():
    from pipeline.lib.settings import SettingsError, check

    for bad in (-0.1, 1.5, "half", True):
        with pytest.raises(SettingsError, match="pseudo.finetune: a number in \\[0, 1\\], got"):
            check({"pseudo": {"finetune": bad}})
    assert check({"pseudo": {"finetune": 1}})["pseudo"].finetune == 1.0

"""Smoke test of the TTA view-design benchmark on a tiny trained lenet (figures, no asserts)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from pipeline.tools import tta_designs as D
from tests.conftest import train_lenet


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> tuple[Path, Path]:
    """(records, checkpoints) of a lenet trained for one epoch on tiny synthetic data."""
    return train_lenet(tmp_path_factory.mktemp("designs"), per_class=6, test=2, size=24,
                       max_size=60)


def test_prefix_losses_and_fewest_within():
    probs = np.array([[[0.5, 0.5], [1.0, 0.0], [0.0, 1.0]]])  # 1 image, 3 views, true class 0
    losses = D.prefix_losses(probs, np.array([0]))
    np.testing.assert_allclose(losses[0], -np.log([0.5, 0.75, 0.5]))
    curve = np.array([0.9, 0.5, 0.7, 0.52, 0.5])
    assert D.fewest_within(curve, 0.5, 0.03) == 4      # stays within from n = 4 on
    assert D.fewest_within(curve + 1, 0.5, 0.03) is None


def test_table_has_a_line_per_model_and_design(trained, tmp_path, capsys):
    records, ck = trained
    (tmp_path / "params.yaml").write_text("tta:\n  ranges: {}\n")
    D.main(["--records", str(records), "--checkpoints", str(ck), "--n", "6",
            "--designs", "random,halton,stratified", "--random-seeds", "2",
            "--params", str(tmp_path / "params.yaml")])
    out = capsys.readouterr().out
    lines = [line.split() for line in out.splitlines() if line.startswith("lenet--fold0 ")]
    assert [line[1] for line in lines] == ["no", "random", "halton", "stratified"]
    assert "n=6" in out and "fewest" in out
    stratified = next(line for line in lines if line[1] == "stratified")
    no_tta = next(line for line in lines if line[1] == "no")
    assert float(stratified[3]) == pytest.approx(float(no_tta[3]), abs=1e-4)  # view 0 = plain

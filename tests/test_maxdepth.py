"""Max-depth designer (§4.3, Eqs. 4.2-4.6) and the receptive-field / c-value report."""
from __future__ import annotations

import math

import numpy as np
import pytest
from mxnet import nd

import nets
from nets.maxdepth import (FORMS, check_design, closed_form, design_table, equivalent_design,
                           max_c_value_t, relaxed, report, solve)

pytestmark = pytest.mark.filterwarnings("ignore:Cannot decide type")

CASES = [(z, k, t) for z in (16, 24, 32, 48, 64) for k in (3, 5) for t in (0.25, 0.4, 0.5, 1.0)
         if z >= k]


def _feasible(a, z, k, t, form):
    """Eqs. 4.3-4.4 written out directly (independent of nets.maxdepth)."""
    power = (lambda l: 2 ** l) if form == "printed" else (lambda l: 2 ** (l - 1))
    prefix = 0
    for l, a_l in enumerate(a, start=1):
        prefix += a_l * 2 ** (l - 1)
        if prefix > power(l) * k / (t * (k - 1)) + 1e-9:
            return False
    return prefix <= z / (k - 1) + 1e-9


def _designs(budget, stage=0, prefix=()):
    """Every a with a_i >= 1 and sum a_i 2^(i-1) <= budget (Eq. 4.4's left side)."""
    if prefix:
        yield prefix
    weight = 2 ** stage
    for a in range(1, int(budget // weight) + 1):
        yield from _designs(budget - a * weight, stage + 1, prefix + (a,))


def _brute_force(z, k, t, form):
    """Deepest feasible design by enumeration (0 if none)."""
    return max((sum(a) for a in _designs(z / (k - 1)) if _feasible(a, z, k, t, form)),
               default=0)


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("z,k,t", CASES)
def test_solution_is_feasible_and_maximal(z, k, t, form):
    try:
        design = solve(z, k, t, form)
    except ValueError:  # nothing fits: the brute force must agree
        assert _brute_force(z, k, t, form) == 0
        return
    assert check_design(design.a, z, k, t, form) == []
    assert all(a >= 1 for a in design.a)
    assert design.depth == _brute_force(z, k, t, form)


@pytest.mark.parametrize("form", FORMS)
def test_check_design_agrees_with_the_equations(form):
    for z, k, t in [(64, 3, 0.4), (48, 5, 0.25)]:
        for a in _designs(z / (k - 1) * 1.5):  # also designs that break Eq. 4.4
            assert (check_design(a, z, k, t, form) == []) == _feasible(a, z, k, t, form), a


@pytest.mark.parametrize("z,k,t", [(128, 3, 0.25), (144, 3, 0.25), (224, 3, 0.3),
                                   (256, 5, 0.5), (96, 3, 0.375)])
def test_integer_optimum_is_bounded_by_the_relaxation(z, k, t):
    design = solve(z, k, t)
    lp = relaxed(z, k, t)
    assert check_design(lp, z, k, t) == []  # the relaxation's optimum is feasible ...
    assert design.depth <= sum(lp) + 1e-9  # ... and bounds the integer problem
    assert design.depth >= math.floor(sum(lp)) - len(lp)  # rounding down loses < 1 per stage


def test_closed_form_eqs_4_5_4_6_is_the_relaxed_optimum():
    # z = 2^(m-1) k / t with k=3, t=0.375 (k/t = 8): z=128 -> m=5.
    cf = closed_form(128, 3, 0.375)
    assert cf["m"] == pytest.approx(5) and cf["n"] == pytest.approx(5)
    lp = relaxed(128, 3, 0.375)
    assert len(lp) == 5  # n = m (Eq. 4.5)
    assert lp[0] == pytest.approx(cf["a1"]) == pytest.approx(4.0)  # a_1 = k/((k-1)t)
    assert lp[1:] == pytest.approx([cf["a1"] / 2] * 4)  # a_2..a_n = a_1 / 2 ...
    assert cf["a_rest_as_printed"] == pytest.approx(0.125)  # ... not the printed 1/(2 a_1)
    assert sum(lp) == pytest.approx(cf["depth"]) == pytest.approx(12.0)
    # The printed a_i = 1/(2 a_1) is feasible but far from maximal:
    printed = [cf["a1"]] + [cf["a_rest_as_printed"]] * 4
    assert check_design(printed, 128, 3, 0.375) == [] and sum(printed) < sum(lp) / 2
    # Integral here, so the integer optimum equals it.
    assert solve(128, 3, 0.375).a == (4, 2, 2, 2, 2)


def test_printed_eq_4_3_is_the_consistent_form_with_half_t():
    for z, k, t in [(128, 3, 0.5), (64, 5, 0.8), (224, 3, 0.6)]:
        assert solve(z, k, t, "printed").a == solve(z, k, t / 2, "consistent").a
    # With the printed 2^l the relaxation has m-1 stages, contradicting Eq. 4.5:
    assert len(relaxed(128, 3, 0.375, "printed")) == 4


def test_constraint_violations_are_reported():
    assert check_design((7, 3, 3, 3, 1), 128, 3, 0.25)[0].startswith("Eq. 4.3 at stage 1")
    assert any(p.startswith("Eq. 4.4") for p in check_design((6, 3, 3, 3, 2), 128, 3, 0.25))
    with pytest.raises(ValueError):
        solve(128, 1, 0.5)
    with pytest.raises(ValueError):
        solve(128, 3, 0.5, form="other")


def test_designed_net_follows_the_design():
    net = nets.get_model("maxdepth", z=128, k=3, t=0.25, base=8, max_width=32, classes=7)
    assert net.design.a == (6, 3, 3, 3, 1)
    rows = [r["type"] for r in net.rows]
    assert rows.count("convolution") == 16 and rows.count("max pooling") == 4
    widths = [r["filters"] for r in net.rows if r["type"] == "convolution"]
    assert widths == [8] * 6 + [16] * 3 + [32] * 3 + [32] * 3 + [32]  # doubling, capped
    nets.initialize(net)
    net.hybridize()
    assert net(nd.random.normal(shape=(2, 1, 40, 40))).shape == (2, 7)
    table = design_table(solve(64, 5, 0.5), pool_kernel=3)
    assert ("max pooling", "3x3/2") in table["rows"]


def test_design_receptive_field_versus_the_report():
    # Eqs. 4.3-4.4 approximate the receptive field by (k-1) sum a_i 2^(i-1), leaving out the
    # 1-pixel start and the pooling windows; the report counts both.
    design = solve(128, 3, 0.25)
    assert design.weighted == 64 and design.receptive_field == 129
    net = nets.get_model("maxdepth", z=128, t=0.25)
    convs = [l for l in report(net, 128, t=0.25) if l["op"] == "Convolution"]
    pools = sum(2 ** i for i in range(design.n - 1))  # a 2x2/2 pool adds its input jump
    assert convs[-1]["rf"] == design.receptive_field + pools == 144


def test_ndsb_net1_relation_to_the_rule():
    a, jumps = equivalent_design("ndsb_net1", 128)
    assert a == [2, 5, 1, 1, 2] and jumps == [1, 2, 4, 8, 16]  # 5x5 = two 3x3
    assert check_design(a, 128, 3, 0.25) == []  # Eqs. 4.3-4.4 hold for t <= 0.25 ...
    assert max_c_value_t(a, 3) == pytest.approx(0.25)
    assert check_design(a, 128, 3, 0.26)[0].startswith("Eq. 4.3 at stage 2")  # 5 convs @64
    assert sum(x * j for x, j in zip(a, jumps)) == 56 <= 128 / 2  # Eq. 4.4
    assert solve(128, 3, 0.25).depth == 16 > sum(a)  # the designer goes deeper (11)
    layers = report("ndsb_net1", 128, t=0.25)
    convs = [l for l in layers if l["op"] == "Convolution"]
    assert [l["rf"] for l in convs[-2:]] == [111, 143]  # 3x3/2 pools widen the field
    assert convs[-1]["violations"] == ["rf > image"]
    assert convs[0]["c_value"] == 1.0
    flagged_c = [l["name"] for l in convs if "c < t" in l["violations"]]
    assert len(flagged_c) == 1 and convs[5]["c_value"] == pytest.approx(6 / 27)


def test_ndsb_net2_relation_to_the_rule():
    a, jumps = equivalent_design("ndsb_net2", 144)
    assert a == [2, 5, 1, 2, 2] and jumps == [1, 2, 4, 8, 24]  # the 3x3/3 pooling
    assert check_design(a, 144, 3, 0.25, jumps=jumps) == ["Eq. 4.4: 80 > 72"]
    assert check_design(a, 144, 3, 0.25) == []  # with the printed 2^(i-1) weights: 64
    convs = [l for l in report("ndsb_net2", 144) if l["op"] == "Convolution"]
    assert [l["rf"] for l in convs[-2:]] == [143, 191]
    assert [l["violations"] for l in convs[-2:]] == [[], ["rf > image"]]


def test_report_works_for_multipath_nets():
    layers = report("tinynet", 224, t=0.25, in_channels=3)
    convs = [l for l in layers if l["op"] == "Convolution"]
    assert all(l["c_value"] is None for l in convs if l["kernel"] == 1)  # 1x1: no extent
    assert convs[-1]["rf"] == 369  # widest path of the last module
    assert all(np.isfinite(l["rf"]) for l in layers)

"""Maximum-depth structure design (thesis §4.3, Eqs. 4.2-4.6) and a receptive-field report.

The problem. A z x z image, k x k filters, minimum c-value t. The net has n stages; stage i
has a_i stacked k x k convolutions followed by one 2x pooling, so a convolution of stage i
sees the input with a jump of 2^(i-1) pixels and widens the receptive field by
(k-1) 2^(i-1). Maximise the depth sum_i a_i (Eq. 4.2) subject to

* Eq. 4.3 (c-value, constraint 2): for every stage l,
  ``sum_{i<=l} a_i 2^(i-1) <= 2^(l-1) k / (t (k-1))``  [form ``"consistent"``, default]
* Eq. 4.4 (receptive field, constraint 1): ``sum_i a_i 2^(i-1) <= z / (k-1)``.

Which power of two. Eq. 4.3 is printed with ``2^l`` on the right. With ``2^(l-1)`` it is
exactly "c-value >= t" for c = real filter size / receptive field, a stage-l filter spanning
k 2^(l-1) input pixels and the receptive field being (k-1) sum_{i<=l} a_i 2^(i-1); and the
relaxed optimum of that program is exactly the thesis' closed form Eqs. 4.5-4.6 (see
:func:`closed_form` and :func:`relaxed`). With the printed ``2^l`` the relaxed optimum has
n = m-1 stages and a_1 = 2k/((k-1)t), contradicting Eq. 4.5. ``form="printed"`` solves the
printed version; it is the consistent one with t halved.

The closed form. For z = 2^(m-1) k / t and real a_i: n = m (Eq. 4.5), a_1 = k/((k-1)t),
and a_2 = ... = a_n = a_1 / 2. The thesis prints ``1/(2 a_1)``, which is not the optimum
of its own program (the relaxation fills each prefix constraint in turn, giving
a_l 2^(l-1) = 2^(l-1) a_1 - 2^(l-2) a_1); ``tests/test_maxdepth.py`` checks this.

The integer problem (a_i >= 1) is solved exactly by dynamic programming over (stage,
prefix sum); ties in depth go to more stages, then to more convolutions early, like the
relaxed solution. :func:`build_maxdepth` turns a design into a layer table for
:func:`nets.build.build`: stage i = a_i k x k 'same' convolutions with
``min(base 2^(i-1), max_width)`` filters, then a 2x2/2 (or 3x3/2) max pooling; the last
stage ends in global pooling and the classifier, as in the NDSB nets.

The report (:func:`report`) gives, for any registered network and input size, every
layer's receptive field and, for convolutions wider than 1x1, its c-value
``k * jump_in / rf``, flagging constraint 1 (rf > image size) and constraint 2 (c < t).
Unlike Eqs. 4.3-4.4 it counts what pooling windows add to the receptive field.

How the NDSB nets relate (tests/test_maxdepth.py). In 3x3-equivalents (a 5x5 counts as two
3x3) NDSB-Net-1 at 128 px is a = (2, 5, 1, 1, 2), 10 convolutions: sum a_i 2^(i-1) = 56 <=
128/2, so Eq. 4.4 holds, and Eq. 4.3 holds for t <= 0.25, binding at its five-convolution
64x64 stage. The designer at (128, 3, 0.25) goes deeper: a = (6, 3, 3, 3, 1), 16
convolutions, spending the depth at 128x128 where the thesis net saves computation by
starting with one 5x5 and pooling. Counting its 3x3/2 pooling windows, the last two
convolutions of Net-1 see 111 and 143 px, so the last breaks constraint 1 (Eq. 4.4's
arithmetic, which ignores pooling, gives 113). NDSB-Net-2 at 144 px has a 3x3/3 pooling, so
its last stage works at jump 24, not 16: with the real jumps Eq. 4.4 fails (sum a_i jump_i
= 80 > 72), with the printed 2^(i-1) weights it holds (64); its last two convolutions see
143 and 191 > 144 px. The designer's own nets also exceed z by the pooling windows and the
1-pixel start that Eqs. 4.3-4.4 leave out (144 px for the (128, 3, 0.25) design).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, Sequence

from mxnet.gluon import HybridBlock

FORMS = ("consistent", "printed")
_EPS = 1e-9  # slack for bounds such as 2^l k / (t (k-1)) that are integers in exact arithmetic


def _check(z: float, k: int, t: float, form: str) -> None:
    if form not in FORMS:
        raise ValueError(f"form must be one of {FORMS}, got {form!r}")
    if k < 2 or z < k or not t > 0:
        raise ValueError(f"need k >= 2, z >= k, t > 0; got z={z}, k={k}, t={t}")


def c_bound(jump: float, k: int, t: float, form: str = "consistent") -> float:
    """Right-hand side of Eq. 4.3 for a stage whose convolutions have input jump ``jump``
    (2^(l-1) for stage l): ``jump k / (t (k-1))``, doubled for ``form="printed"``."""
    return jump * k / (t * (k - 1)) * (2 if form == "printed" else 1)


def check_design(a: Sequence[float], z: float, k: int, t: float, form: str = "consistent",
                 jumps: Sequence[float] | None = None) -> list[str]:
    """Violated constraints of design ``a`` (empty list = feasible).

    ``jumps`` default to 2^(i-1) (2x pooling per stage); pass real jumps for nets with
    other pooling strides (NDSB-Net-2's 3x3/3).
    """
    _check(z, k, t, form)
    jumps = list(jumps) if jumps is not None else [2 ** i for i in range(len(a))]
    problems, prefix = [], 0.0
    for l, (a_l, j_l) in enumerate(zip(a, jumps), start=1):
        prefix += a_l * j_l
        if prefix > c_bound(j_l, k, t, form) + _EPS:
            problems.append(f"Eq. 4.3 at stage {l}: {prefix:g} > {c_bound(j_l, k, t, form):g}")
    if prefix > z / (k - 1) + _EPS:
        problems.append(f"Eq. 4.4: {prefix:g} > {z / (k - 1):g}")
    return problems


def max_c_value_t(a: Sequence[float], k: int, jumps: Sequence[float] | None = None,
                  form: str = "consistent") -> float:
    """Largest t for which design ``a`` satisfies Eq. 4.3 at every stage."""
    jumps = list(jumps) if jumps is not None else [2 ** i for i in range(len(a))]
    prefix, best = 0.0, math.inf
    for a_l, j_l in zip(a, jumps):
        prefix += a_l * j_l
        best = min(best, c_bound(j_l, k, 1.0, form) / prefix)
    return best


@dataclass(frozen=True)
class Design:
    """An integer solution: ``a[i]`` convolutions in stage ``i+1``."""

    z: float
    k: int
    t: float
    form: str
    a: tuple[int, ...]

    @property
    def n(self) -> int:
        return len(self.a)

    @property
    def depth(self) -> int:
        return sum(self.a)

    @property
    def weighted(self) -> int:
        """``sum a_i 2^(i-1)``, the left-hand side of Eq. 4.4."""
        return sum(a * 2 ** i for i, a in enumerate(self.a))

    @property
    def receptive_field(self) -> int:
        """Receptive field of the last convolution, ignoring pooling windows (as Eq. 4.4)."""
        return 1 + (self.k - 1) * self.weighted


def _caps(z: float, k: int, t: float, form: str, n: int) -> list[int]:
    """Integer upper bounds on each prefix sum: min(Eq. 4.3 bound, Eq. 4.4 bound)."""
    total = z / (k - 1)
    return [math.floor(min(c_bound(2 ** l, k, t, form), total) + _EPS) for l in range(n)]


def _solve_stages(caps: tuple[int, ...]) -> tuple[int, tuple[int, ...]] | None:
    """Best (depth, a) with exactly len(caps) stages, a_i >= 1; None if infeasible."""
    n = len(caps)

    @lru_cache(maxsize=None)
    def best(stage: int, prefix: int) -> tuple[int, tuple[int, ...]] | None:
        if stage == n:
            return 0, ()
        weight, found = 2 ** stage, None
        for a in range(1, (caps[stage] - prefix) // weight + 1):
            rest = best(stage + 1, prefix + a * weight)
            if rest is not None:
                cand = (a + rest[0], (a,) + rest[1])
                found = cand if found is None or cand > found else found
        return found

    return best(0, 0)


def solve(z: float, k: int = 3, t: float = 0.25, form: str = "consistent") -> Design:
    """Exact integer maximum-depth design for Eqs. 4.2-4.4 (a_i >= 1)."""
    _check(z, k, t, form)
    best_key, n = None, 1
    while True:
        found = _solve_stages(tuple(_caps(z, k, t, form, n)))
        if found is None:  # n stages of one convolution each no longer fit: nor will n+1
            break
        key = (found[0], n, found[1])
        best_key = key if best_key is None or key > best_key else best_key
        n += 1
    if best_key is None:
        raise ValueError(f"no design with at least one convolution fits z={z}, k={k}, t={t}")
    return Design(z, k, t, form, best_key[2])


def relaxed(z: float, k: int = 3, t: float = 0.25, form: str = "consistent"
            ) -> list[float]:
    """Optimum of the linear relaxation (real a_i >= 0): fill each prefix bound in turn.

    Filling early stages first is optimal because a convolution costs 2^(i-1) of every
    later bound: moving depth to an earlier stage never uses more budget.
    """
    _check(z, k, t, form)
    total, a, prefix, l = z / (k - 1), [], 0.0, 0
    while prefix < total - _EPS:
        cap = min(c_bound(2 ** l, k, t, form), total)
        a.append((cap - prefix) / 2 ** l)
        prefix, l = cap, l + 1
    return a


def closed_form(z: float, k: int = 3, t: float = 0.25) -> dict[str, Any]:
    """Eqs. 4.5-4.6 for z = 2^(m-1) k / t: ``m`` (real), ``a_1`` and ``a_rest`` = a_1 / 2."""
    m = math.log2(z * t / k) + 1
    a1 = k / ((k - 1) * t)
    return {"m": m, "n": m, "a1": a1, "a_rest": a1 / 2, "depth": a1 + (m - 1) * a1 / 2,
            "a_rest_as_printed": 1 / (2 * a1)}


def design_table(design: Design, base: int = 16, max_width: int = 512,
                 pool_kernel: int = 2) -> dict[str, Any]:
    """Layer table (the format of :mod:`nets.tables`) for a design."""
    if pool_kernel not in (2, 3):
        raise ValueError(f"pool_kernel must be 2 (2x2/2) or 3 (3x3/2), got {pool_kernel}")
    k, rows = design.k, []
    for i, count in enumerate(design.a):
        filters = min(base * 2 ** i, max_width)
        rows += [("convolution", f"{k}x{k}/1", filters)] * count
        last = i == design.n - 1
        rows.append(("avg/max pooling", "global") if last
                    else ("max pooling", f"{pool_kernel}x{pool_kernel}/2"))
    rows.append(("softmax",))
    return {
        "name": "maxdepth",
        "source": f"§4.3 design z={design.z}, k={k}, t={design.t}, a={design.a}",
        "input": design.z,
        "columns": ("type", "kernel/stride", "filters"),
        "conv_act": True, "conv_pad": "same", "pool_pad": "same", "pool_convention": "valid",
        "rows": rows,
    }


def build_maxdepth(z: int = 128, k: int = 3, t: float = 0.25, form: str = "consistent",
                   base: int = 16, max_width: int = 512, pool_kernel: int = 2,
                   **options: Any) -> HybridBlock:
    """Solve the design for (z, k, t) and build it; ``options`` go to :func:`nets.build.build`.

    The design is recorded as ``net.design``.
    """
    from .build import build

    design = solve(z, k, t, form)
    net = build(design_table(design, base, max_width, pool_kernel), **options)
    net.design = design
    return net


def report(net: HybridBlock | str, size: int, t: float = 0.25,
           in_channels: int | None = None, **kw: Any) -> list[dict[str, Any]]:
    """Receptive field and c-value of every layer of ``net`` (a network or registered name).

    Each entry of :func:`nets.summary.trace` gains ``real_filter`` (k * jump_in, input pixels
    spanned by the filter), ``c_value`` (real_filter / rf; None for 1x1 convolutions, pooling
    and FC layers) and ``violations``: ``"rf > image"`` (constraint 1) and/or ``"c < t"``
    (constraint 2), for convolutions only.
    """
    from . import get_model  # deferred: nets/__init__ imports this module
    from .summary import trace

    if isinstance(net, str):
        net = get_model(net, in_channels=in_channels or 1, **kw)
    channels = in_channels or getattr(net, "arch", {}).get("in_channels", 1)
    layers = trace(net, size, channels)
    for layer in layers:
        conv = layer["op"] == "Convolution" and layer["kernel"] > 1
        layer["real_filter"] = layer["kernel"] * layer["jump_in"] if conv else None
        layer["c_value"] = layer["real_filter"] / layer["rf"] if conv else None
        layer["violations"] = []
        if conv and layer["rf"] > size:
            layer["violations"].append("rf > image")
        if conv and layer["c_value"] < t:
            layer["violations"].append("c < t")
    return layers


def equivalent_design(net: HybridBlock | str, size: int, k: int = 3, **kw: Any
                      ) -> tuple[list[float], list[int]]:
    """A built net read back as a design: per distinct input jump, the number of k x k
    convolutions with the same receptive-field growth ((kernel-1)/(k-1) per convolution).

    Returns (a, jumps); with a jump sequence 1, 2, 4, ... it is directly comparable with
    :func:`solve`.
    """
    stages: dict[int, float] = {}
    for layer in report(net, size, **kw):
        if layer["op"] == "Convolution" and layer["kernel"] > 1:
            j = layer["jump_in"]
            stages[j] = stages.get(j, 0.0) + (layer["kernel"] - 1) / (k - 1)
    jumps = sorted(stages)
    return [stages[j] for j in jumps], jumps


def format_report(layers: list[dict[str, Any]]) -> str:
    lines = [f"{'layer':<36} {'k/s':>7} {'output':>16} {'rf':>5} {'real':>5} {'c':>6}  flags"]
    for l in layers:
        ks = "global" if l["global"] else f"{l['kernel']}/{l['stride']}"
        c = f"{l['c_value']:.3f}" if l["c_value"] is not None else "-"
        real = l["real_filter"] if l["real_filter"] is not None else "-"
        lines.append(f"{l['name']:<36} {ks:>7} {str(l['shape']):>16} {l['rf']:>5} {real:>5} "
                     f"{c:>6}  {', '.join(l['violations'])}")
    return "\n".join(lines)

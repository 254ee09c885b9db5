"""The one builder: a layer table of :mod:`nets.tables` (or of the max-depth designer) in,
an uninitialised Gluon ``HybridBlock`` out.

The network is a :class:`TableNet` with ``features`` (one child block per table row, in
table order, so ``net.features[i]`` is row ``i``) and ``output`` (flatten, optional dropout,
``Dense(classes)`` returning logits; softmax is applied by the loss or the caller).

Options shared by every network:

``act``, ``act_kw``  activation name and its keywords (:mod:`nets.activations`);
``bn``               batch normalisation between each convolution / FC layer and its
                     activation (the layer then has no bias: BN's beta replaces it);
``in_channels``      input channels (1 for the grey plankton images, 3 for ImageNet);
``classes``          classifier outputs;
``pool``             the final global pooling: ``"avg"``, ``"max"`` or ``"both"`` (average
                     and max pooled features concatenated, doubling the classifier input);
``dropout``          dropout probability right before the classifier (0 = none);
``width``            multiplier on every filter / unit count (``round``, at least 1);
``variant``          picks the cells of a table that differ between variants (TinyNet A/B,
                     AlexNet grouped/single).

The final pooling is global, so every net runs on inputs smaller than its table's (the
pipeline's 48-64 px samples); at the table's input size the per-row output shapes equal the
table's ``output`` column (tests/test_nets.py). Channel counts are tracked while building
and checked against the ``output`` column, which catches transcription errors.
"""
from __future__ import annotations

import re
from typing import Any

from mxnet.gluon import nn

from .activations import check_activation, make_activation
from .precision import Conv2D, Dense, Dropout, LowPrecision, to_dtype

POOL_MODES = ("avg", "max", "both")
CLASSIFIER_TYPES = ("softmax", "linear classifier")
GLOBAL_POOL_TYPES = ("avg pool", "avg/max pooling")
MAX_POOL_TYPES = ("max pool", "max pooling")

# AlexNet's local response normalisation (Eq. 4.1) with the constants of [34].
LRN_ARGS = {"nsize": 5, "alpha": 1e-4, "beta": 0.75, "knorm": 2.0}
TABLE_DROPOUT = 0.5  # the dropout rows of Tables 4.2 and 4.3 (AlexNet, VGG)


class TableNet(LowPrecision, nn.HybridBlock):
    """``features`` (one block per table row) followed by ``output`` (the classifier).

    With ``compute_dtype == 'bfloat16'`` (:func:`nets.precision.set_precision`) the input is
    cast to bfloat16 for ``features`` and their result back to float32 for ``output``.
    """

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        with self.name_scope():
            self.features = nn.HybridSequential(prefix="features_")
            self.output = nn.HybridSequential(prefix="output_")

    def hybrid_forward(self, F, x):
        if self.low_precision:
            return self.output(to_dtype(F, self.features(to_dtype(F, x, "bfloat16")), "float32"))
        return self.output(self.features(x))


class Concat(nn.HybridSequential):
    """Parallel paths on the same input, concatenated along channels (Inception style)."""

    def hybrid_forward(self, F, x):
        return F.concat(*[path(x) for path in self._children.values()], dim=1)


class GlobalPool(nn.HybridBlock):
    """Global average, max, or both concatenated (``mode='both'``)."""

    def __init__(self, mode: str = "avg", **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if mode not in POOL_MODES:
            raise ValueError(f"pool must be one of {POOL_MODES}, got {mode!r}")
        self.mode = mode

    def hybrid_forward(self, F, x):
        if self.mode == "both":
            return F.concat(F.Pooling(x, global_pool=True, pool_type="avg", kernel=(1, 1)),
                            F.Pooling(x, global_pool=True, pool_type="max", kernel=(1, 1)),
                            dim=1)
        return F.Pooling(x, global_pool=True, pool_type=self.mode, kernel=(1, 1))


class LRN(nn.HybridBlock):
    """Local response normalisation across channels, Eq. 4.1."""

    def hybrid_forward(self, F, x):
        return F.LRN(x, **LRN_ARGS)


# ---------------------------------------------------------------- parsing table cells

def parse_kernel(text: str | None) -> tuple[int | None, int | None, int | None]:
    """``"5x5/1"`` -> (5, 1, None); ``"11x11 pad 0"`` -> (11, None, 0); ``"stride 2"`` ->
    (None, 2, None); ``""``/``None`` -> (None, None, None)."""
    text = (text or "").strip()
    kernel = stride = pad = None
    if m := re.search(r"(\d+)x(\d+)(?:/(\d+))?", text):
        if m.group(1) != m.group(2):
            raise ValueError(f"only square kernels are supported, got {text!r}")
        kernel = int(m.group(1))
        stride = int(m.group(3)) if m.group(3) else None
    if m := re.search(r"stride (\d+)", text):
        stride = int(m.group(1))
    if m := re.search(r"pad (\d+)", text):
        pad = int(m.group(1))
    return kernel, stride, pad


def parse_output(text: str | None) -> tuple[int, int, int] | None:
    """``"64x64x32"`` -> (64, 64, 32)."""
    if not text:
        return None
    h, w, c = (int(v) for v in text.split("x"))
    return h, w, c


def row_dict(table: dict, row: tuple, variant: str | None) -> dict[str, Any]:
    """A row as ``{column: value}``; dict cells are resolved by ``variant``."""
    columns = table["columns"]
    if len(row) > len(columns):
        raise ValueError(f"{table['name']}: row {row} has more cells than columns {columns}")
    cells = dict(zip(columns, tuple(row) + (None,) * (len(columns) - len(row))))
    return {k: _pick(v, variant, table["name"]) for k, v in cells.items()}


def _pick(value: Any, variant: str | None, name: str) -> Any:
    if not isinstance(value, dict):
        return value
    if variant not in value:
        raise ValueError(f"{name}: variant must be one of {sorted(value)}, got {variant!r}")
    return value[variant]


def table_variants(table: dict) -> list[str]:
    """Variants a table distinguishes (empty if none)."""
    found = {k for row in table["rows"] for v in row if isinstance(v, dict) for k in v}
    if isinstance(table.get("input"), dict):
        found |= set(table["input"])
    return sorted(found)


def nominal_input(table: dict, variant: str | None = None) -> int:
    """The input size the table's ``output`` column refers to."""
    return _pick(table["input"], variant, table["name"])


# ---------------------------------------------------------------- the builder

class _Builder:
    """Turns rows into blocks while tracking the channel count."""

    def __init__(self, table: dict, act: str, act_kw: dict, bn: bool, in_channels: int,
                 pool: str, width: float, variant: str | None) -> None:
        self.table, self.act, self.act_kw, self.bn = table, act, act_kw, bn
        self.pool, self.width, self.variant = pool, width, variant
        self.channels = in_channels
        # True once the data is (batch, channels): after global pooling or an FC layer, so a
        # following Dense layer knows its input size without seeing the image size.
        self.flat = False

    def scale(self, n: int) -> int:
        return max(1, int(round(n * self.width)))

    def padding(self, kernel: int, pad: int | None, key: str) -> int:
        if pad is not None:
            return pad
        return (kernel - 1) // 2 if self.table[key] == "same" else 0

    def norm_act(self, channels: int) -> nn.HybridSequential:
        seq = nn.HybridSequential(prefix="")
        if self.bn:
            seq.add(nn.BatchNorm(in_channels=channels))
        seq.add(make_activation(self.act, **self.act_kw))
        return seq

    def conv(self, filters: int, kernel: int, stride: int = 1, pad: int | None = None,
             act: bool = True, groups: int = 1) -> nn.HybridSequential:
        """Convolution (+ BN + activation when ``act``); updates the channel count."""
        if self.channels % groups or filters % groups:
            raise ValueError(f"{self.table['name']}: {self.channels} -> {filters} channels "
                             f"cannot be split in {groups} groups (try another width)")
        seq = nn.HybridSequential(prefix="")
        seq.add(Conv2D(filters, kernel, strides=stride,
                          padding=self.padding(kernel, pad, "conv_pad"), groups=groups,
                          use_bias=not self.bn, in_channels=self.channels))
        if act:
            seq.add(self.norm_act(filters))
        self.channels = filters
        return seq

    def max_pool(self, kernel: int, stride: int, pad: int | None = None) -> nn.MaxPool2D:
        return nn.MaxPool2D(kernel, stride, self.padding(kernel, pad, "pool_pad"),
                            ceil_mode=self.table["pool_convention"] == "full")

    # -- one method per row type ------------------------------------------------------

    def convolution(self, row: dict) -> nn.HybridBlock:
        kernel, stride, pad = parse_kernel(row.get("kernel/stride") or row.get("kernel"))
        stride = row.get("stride") or stride or 1
        out = parse_output(row.get("output"))
        filters = row.get("filters") or (out[2] if out else None) or row.get("3x3")
        reduce = row.get("3x3 reduce")
        if not reduce:
            return self.conv(self.scale(filters), kernel, stride, pad, self.table["conv_act"],
                             row.get("groups") or 1)
        seq = nn.HybridSequential(prefix="")
        seq.add(self.conv(self.scale(reduce), 1))
        seq.add(self.conv(self.scale(filters), kernel, stride, pad))
        return seq

    def max_pooling(self, row: dict) -> nn.HybridBlock:
        kernel, stride, pad = parse_kernel(row.get("kernel/stride") or row.get("kernel"))
        return self.max_pool(kernel, row.get("stride") or stride or kernel, pad)

    def global_pool(self, row: dict) -> nn.HybridBlock:
        if self.pool == "both":
            self.channels *= 2
        self.flat = True
        return GlobalPool(self.pool)

    def module(self, row: dict) -> nn.HybridBlock:
        """TinyNet module: 1x1 + 3x3 paths, or stride-2 3x3 conv + 3x3/2 max-pool paths."""
        _, stride, _ = parse_kernel(row.get("kernel/stride"))
        cin, paths = self.channels, Concat(prefix="")
        if stride and stride > 1:  # the "pool" column says max for both such modules
            paths.add(self.conv(self.scale(row["3x3"]), 3, stride))
            paths.add(self.max_pool(3, stride))
            self.channels = self.scale(row["3x3"]) + cin
            return paths
        total = 0
        for key, kernel in (("1x1", 1), ("3x3", 3)):
            self.channels = cin
            paths.add(self.conv(self.scale(row[key]), kernel))
            total += self.channels
        self.channels = total
        return paths

    def inception(self, row: dict) -> nn.HybridBlock:
        """Inception-BN module (Table 4.4): 1x1, 3x3, double 3x3 and pool(+proj) paths."""
        _, stride, _ = parse_kernel(row.get("kernel/stride"))
        stride = stride or 1
        cin, paths, total = self.channels, Concat(prefix=""), 0
        if row["1x1"]:
            paths.add(self.conv(self.scale(row["1x1"]), 1))
            total += self.channels
        for reduce_key, key, depth in (("3x3 reduce", "3x3", 1),
                                       ("double 3x3 reduce", "double 3x3", 2)):
            self.channels = cin
            path = nn.HybridSequential(prefix="")
            path.add(self.conv(self.scale(row[reduce_key]), 1))
            for i in range(depth):
                path.add(self.conv(self.scale(row[key]), 3, stride if i == depth - 1 else 1))
            paths.add(path)
            total += self.channels
        paths.add(self.pool_path(row["pool"], stride, cin))
        self.channels = total + self.channels
        return paths

    def pool_path(self, spec: str, stride: int, cin: int) -> nn.HybridBlock:
        """``"avg + 32"``: 3x3 average pool then 1x1 projection to 32; ``"max"``: pool only."""
        kind, _, proj = (s.strip() for s in spec.partition("+"))
        path = nn.HybridSequential(prefix="")
        pool = nn.AvgPool2D if kind == "avg" else nn.MaxPool2D
        path.add(pool(3, stride, 1))
        self.channels = cin
        if proj:
            path.add(self.conv(self.scale(int(proj)), 1))
        return path

    def fully_connected(self, row: dict) -> nn.HybridBlock:
        units = self.scale(row["filters"])
        # After convolutions the flattened size depends on the image size: in_units deferred.
        dense = Dense(units, use_bias=not self.bn,
                         in_units=self.channels if self.flat else 0)
        self.channels, self.flat = units, True
        return dense

    def activation(self, row: dict) -> nn.HybridBlock:
        return self.norm_act(self.channels)

    def lrn(self, row: dict) -> nn.HybridBlock:
        return LRN()

    def dropout(self, row: dict) -> nn.HybridBlock:
        return Dropout(TABLE_DROPOUT)

    def block(self, row: dict) -> nn.HybridBlock:
        kind = row["type"]
        if kind == "convolution":
            return self.convolution(row)
        if kind in MAX_POOL_TYPES:
            return self.max_pooling(row)
        if kind in GLOBAL_POOL_TYPES:
            return self.global_pool(row)
        if kind.startswith("module"):
            return self.module(row)
        if kind.startswith("inception"):
            return self.inception(row)
        handler = {"fully connected": self.fully_connected, "activation": self.activation,
                   "lrn": self.lrn, "dropout": self.dropout}.get(kind)
        if handler is None:
            raise ValueError(f"{self.table['name']}: unknown row type {kind!r}")
        return handler(row)

    def check_channels(self, index: int, row: dict) -> None:
        out = parse_output(row.get("output"))
        doubled = self.pool == "both" and row["type"] in GLOBAL_POOL_TYPES
        if out and self.width == 1 and not doubled and out[2] != self.channels:
            raise ValueError(f"{self.table['name']} row {index} ({row['type']}): built "
                             f"{self.channels} channels, the table says {out[2]}")


def build(table: dict, classes: int = 121, act: str = "rrelu",
          act_kw: dict[str, Any] | None = None, bn: bool = True, in_channels: int = 1,
          pool: str = "avg", dropout: float = 0.0, width: float = 1.0,
          variant: str | None = None) -> TableNet:
    """Build ``table`` into an uninitialised :class:`TableNet` (see the module docstring)."""
    act_kw = dict(act_kw or {})
    check_activation(act, act_kw)
    if pool not in POOL_MODES:
        raise ValueError(f"pool must be one of {POOL_MODES}, got {pool!r}")
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"dropout must be in [0, 1), got {dropout}")
    if width <= 0:
        raise ValueError(f"width must be > 0, got {width}")
    variants = table_variants(table)
    if variants and variant is None:
        raise ValueError(f"{table['name']}: choose variant= one of {variants}")
    builder = _Builder(table, act, act_kw, bn, in_channels, pool, width, variant)
    net = TableNet(prefix=f"{table['name']}_")
    rows = [row_dict(table, r, variant) for r in table["rows"]]
    with net.features.name_scope():
        for index, row in enumerate(rows):
            if row["type"] in CLASSIFIER_TYPES:
                if index != len(rows) - 1:
                    raise ValueError(f"{table['name']}: the classifier must be the last row")
                break
            net.features.add(builder.block(row))
            builder.check_channels(index, row)
    with net.output.name_scope():
        net.output.add(nn.Flatten())
        if dropout > 0:
            net.output.add(nn.Dropout(dropout))
        net.output.add(nn.Dense(classes, in_units=builder.channels if builder.flat else 0))
    net.rows = [r for r in rows if r["type"] not in CLASSIFIER_TYPES]
    return net

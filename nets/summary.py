"""Size, cost and geometry of a registered network: ``python -m nets.summary NAME --size S``.

Everything is read off the network's symbolic graph (no weights are allocated), so even
VGG-16 at 224 px is summarised in well under a second:

* ``params`` learnable parameters, ``aux`` BatchNorm running statistics; ``size_mb`` is
  their float32 storage in MiB (2^20 bytes), the unit that reproduces Table 4.7's
  528 MB for VGG-16's 138.4M parameters;
* ``macs`` forward multiply-adds of convolution and fully connected layers, Eq. 4.7:
  ``sum_l n_{l-1} s_l^2 n_l m_l^2`` (a fully connected layer counts as a convolution whose
  filter covers its whole input). FLOPs in the usual sense are about twice this;
* ``rf`` the receptive field of the deepest layer before global pooling;
* ``layers`` per convolution / pooling / FC layer: kernel, stride, output shape, receptive
  field, jump (distance in input pixels between neighbouring outputs), MACs, weights.

Table 4.7 against this module (3 channels, 1000 classes, no BatchNorm as in 2015; the
numbers are asserted in tests/test_nets.py):

=============  ======  ===========  =========  ==========  ==============================
net            input   parameters   MiB fp32   G mult-add  Table 4.7
=============  ======  ===========  =========  ==========  ==============================
AlexNet        227     60.97M       232.6      0.724 (1X)  60M, 212 MB, 1X
VGG-16         224     138.36M      527.8      15.47       138M, 528 MB, 22.6X (ours 21.4X)
TinyNet-B      224     2.05M        7.83       0.295       1.56M, 7.9 MB, 0.42X (ours 0.41X)
TinyNet-A      112     2.05M        7.80       0.275       1.54M, 7.9 MB, 0.40X (ours 0.38X)
Inception-BN   224     11.28M       43.0       2.03        (GoogLeNet row: 5M, 45.3 MB, 3.07X)
=============  ======  ===========  =========  ==========  ==============================

* AlexNet is the original two-GPU version (``variant='grouped'``); the ungrouped one has
  62.4M parameters and 1.14 G multiply-adds. The table's 212 MB fits neither (60M float32
  is 229 MiB).
* TinyNet: the model size matches (7.83 vs 7.9 MB) but the parameter count does not:
  1.56M float32 would be 6.0 MiB, so Table 4.7 is internally inconsistent, and Table 4.6,
  which we transcribe, implies 2.05M (0.34M of them in the 1000-way classifier). A has
  6144 fewer weights than B (7x7 vs 9x9 first filters); the table says 0.02M. The
  complexity ratios agree with the table to within 0.02.
* NDSB nets (1 channel, 121 classes): Net-1 at 128 px 1.50 G (2.1X AlexNet), Net-2 at
  144 px 2.45 G (3.4X). §6.2 says 12X and 6X; Tables 6.1/6.2 as printed cannot give that.
"""
from __future__ import annotations

import argparse
import ast
import json
import re
from typing import Any

import mxnet as mx
import numpy as np
from mxnet.gluon import HybridBlock

BYTES_PER_FLOAT = 4
MIB = 2 ** 20
LAYER_OPS = ("Convolution", "Pooling", "FullyConnected")


def _ints(text: str | None, default: int) -> int:
    """First integer of an MXNet tuple attribute such as ``"(3, 3)"``."""
    found = re.findall(r"\d+", text or "")
    return int(found[0]) if found else default


def _shapes(sym: mx.sym.Symbol, data_shape: tuple[int, ...]) -> dict[str, tuple]:
    internals = sym.get_internals()
    _, out_shapes, _ = internals.infer_shape(data=data_shape)
    return dict(zip(internals.list_outputs(), out_shapes))


def _output_name(node: dict, index: int = 0, shapes: dict | None = None) -> str:
    """Name of output ``index`` of ``node`` in ``get_internals()`` (multi-output operators,
    like the native RReLU, number their outputs)."""
    if node["op"] == "null":
        return node["name"]
    single = node["name"] + "_output"
    return single if shapes is None or single in shapes else f"{single}{index}"


def symbol_of(net: HybridBlock) -> mx.sym.Symbol:
    """The network's graph on a ``data`` variable (works on an uninitialised network)."""
    return net(mx.sym.var("data"))


def trace(net: HybridBlock, size: int, in_channels: int = 1) -> list[dict[str, Any]]:
    """Per-layer geometry and cost of ``net`` on a ``size`` x ``size`` input.

    Receptive fields follow ``rf_out = rf_in + (k - 1) * jump_in``, ``jump_out = jump_in * s``
    along every path from the input; where paths join (concat, add) the largest receptive
    field is kept. Global pooling and FC layers see their whole input map.
    """
    sym = symbol_of(net)
    nodes = json.loads(sym.tojson())["nodes"]
    shapes = _shapes(sym, (1, in_channels, size, size))
    args = dict(zip(sym.list_arguments(), sym.infer_shape(
        data=(1, in_channels, size, size))[0]))
    geo: list[tuple[int, int] | None] = []  # (rf, jump) per node, None if not data-driven
    layers = []
    for node in nodes:
        ins = [geo[i] for i, *_ in node["inputs"] if geo[i] is not None]
        if node["op"] == "null":
            geo.append((1, 1) if node["name"] == "data" else None)
            continue
        if not ins:
            geo.append(None)
            continue
        rf, jump = max(g[0] for g in ins), max(g[1] for g in ins)
        if node["op"] in LAYER_OPS:
            layer = _layer(node, nodes, shapes, args, rf, jump)
            layers.append(layer)
            geo.append((layer["rf"], layer["jump"]))
        else:
            geo.append((rf, jump))
    return layers


def _layer(node: dict, nodes: list[dict], shapes: dict, args: dict, rf_in: int,
           jump_in: int) -> dict[str, Any]:
    attrs = node.get("attrs", {})
    source, index = node["inputs"][0][0], node["inputs"][0][1]
    data_in = shapes[_output_name(nodes[source], index, shapes)]
    out = shapes[_output_name(node, 0, shapes)]
    weight = args.get(nodes[node["inputs"][1][0]]["name"]) if len(node["inputs"]) > 1 else None
    is_global = node["op"] == "FullyConnected" or attrs.get("global_pool") == "True"
    if is_global:
        kernel, stride = (data_in[2] if len(data_in) == 4 else 1), 1
    else:
        dilate = _ints(attrs.get("dilate"), 1)
        kernel = dilate * (_ints(attrs.get("kernel"), 1) - 1) + 1
        stride = _ints(attrs.get("stride"), 1)
    macs = 0
    if node["op"] == "Convolution":
        macs = int(np.prod(out[1:])) * int(np.prod(weight[1:]))
    elif node["op"] == "FullyConnected":
        macs = int(np.prod(weight))
    return {
        "name": node["name"], "op": node["op"], "global": is_global,
        "kernel": kernel, "stride": stride, "shape": tuple(out[1:]),
        "rf": rf_in + (kernel - 1) * jump_in, "jump_in": jump_in, "jump": jump_in * stride,
        "macs": macs, "weights": int(np.prod(weight)) if weight else 0,
    }


def row_shapes(net: HybridBlock, size: int, in_channels: int = 1) -> list[tuple[int, ...]]:
    """Output shape (without batch) after each table row of a :class:`nets.build.TableNet`,
    aligned with ``net.rows``: compare with the thesis' ``output`` column."""
    x, shapes = mx.sym.var("data"), []
    for block in net.features:
        x = block(x)
        shapes.append(tuple(x.infer_shape(data=(1, in_channels, size, size))[1][0][1:]))
    return shapes


def count_parameters(net: HybridBlock, size: int, in_channels: int = 1) -> tuple[int, int]:
    """(learnable parameters, auxiliary states) of ``net`` at this input size."""
    sym = symbol_of(net)
    arg_shapes, _, aux_shapes = sym.infer_shape(data=(1, in_channels, size, size))
    params = sum(int(np.prod(s)) for n, s in zip(sym.list_arguments(), arg_shapes)
                 if n != "data")
    return params, sum(int(np.prod(s)) for s in aux_shapes)


def summarize(name: str, size: int, **kw: Any) -> dict[str, Any]:
    """Summary of registered network ``name`` built with ``get_model(name, **kw)``."""
    from . import get_model  # here, not at import time: nets/__init__ imports nothing of ours

    net = get_model(name, **kw)
    in_channels = net.arch["in_channels"]
    layers = trace(net, size, in_channels)
    params, aux = count_parameters(net, size, in_channels)
    out_shape = symbol_of(net).infer_shape(data=(1, in_channels, size, size))[1][0]
    spatial = [l["rf"] for l in layers if not l["global"]]
    return {
        "name": name, "size": size, "in_channels": in_channels,
        "params": params, "aux": aux,
        "size_mb": (params + aux) * BYTES_PER_FLOAT / MIB,
        "params_mb": params * BYTES_PER_FLOAT / MIB,
        "macs": sum(l["macs"] for l in layers),
        "rf": max(spatial) if spatial else 1,
        "output_shape": tuple(out_shape),
        "layers": layers,
    }


def format_summary(s: dict[str, Any], per_layer: bool = False) -> str:
    lines = [
        f"{s['name']} @ {s['size']}x{s['size']}x{s['in_channels']}",
        f"  parameters     {s['params']:,} (+{s['aux']:,} BatchNorm statistics)",
        f"  size (fp32)    {s['size_mb']:.2f} MiB ({s['params_mb']:.2f} MiB learnable)",
        f"  multiply-adds  {s['macs']:,} ({s['macs'] / 1e9:.3f} G, Eq. 4.7)",
        f"  receptive field {s['rf']} px (deepest layer before global pooling)",
        f"  output shape   {s['output_shape']}",
    ]
    if per_layer:
        lines.append(f"  {'layer':<36} {'k/s':>7} {'output':>16} {'rf':>5} {'MACs':>14}")
        for l in s["layers"]:
            ks = "global" if l["global"] else f"{l['kernel']}/{l['stride']}"
            lines.append(f"  {l['name']:<36} {ks:>7} {str(l['shape']):>16} {l['rf']:>5} "
                         f"{l['macs']:>14,}")
    return "\n".join(lines)


def _parse_kw(items: list[str]) -> dict[str, Any]:
    out = {}
    for item in items:
        key, _, value = item.partition("=")
        try:
            out[key] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            out[key] = value
    return out


def main(argv: list[str] | None = None) -> None:
    from . import list_models

    p = argparse.ArgumentParser(prog="python -m nets.summary", description=__doc__.split("\n")[0])
    p.add_argument("name", choices=list_models())
    p.add_argument("--size", type=int, required=True, help="input height = width (px)")
    p.add_argument("--act", default="rrelu")
    p.add_argument("--classes", type=int, default=121)
    p.add_argument("--in-channels", type=int, default=1)
    p.add_argument("--no-bn", action="store_true", help="build without batch normalisation")
    p.add_argument("--layers", action="store_true", help="also print every layer")
    p.add_argument("kw", nargs="*", help="extra get_model keywords, e.g. width=0.5 variant=A")
    a = p.parse_intermixed_args(argv)  # keywords may come before or after the options
    s = summarize(a.name, a.size, act=a.act, classes=a.classes, in_channels=a.in_channels,
                  bn=not a.no_bn, **_parse_kw(a.kw))
    print(format_summary(s, a.layers))


if __name__ == "__main__":
    main()

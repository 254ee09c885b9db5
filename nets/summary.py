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

Table 4.7 against this module (3 channels, 1000 classes, no BatchNorm as in 2015; see
tests/test_nets.py for the asserted numbers):

* VGG-16 at 224 px: 138.36M parameters, 527.8 MiB -- the table's 138M / 528 MB.
* AlexNet (Table 4.2, no groups) at 227 px: 62.4M parameters (table: 60M; the original
  two-GPU groups halve convolutions 2, 4, 5) and 1.14 G multiply-adds.
* TinyNet-B at 224 px: 2.05M parameters, 7.8 MiB. The table's 7.9 MB matches, its 1.56M
  parameters do not: 1.56M float32 would be 6.0 MiB, so the table is internally
  inconsistent and Table 4.6 (which we transcribe) implies ~2.05M. TinyNet-A at 112 px has
  6144 fewer weights (7x7 instead of 9x9 first filters); the table's A/B difference is 0.02M.
  TinyNet-B costs 0.49 G multiply-adds = 0.43x AlexNet, the table's 0.42x (A: 0.40x).
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


def _output_name(node: dict) -> str:
    return node["name"] if node["op"] == "null" else node["name"] + "_output"


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
    data_in = shapes[_output_name(nodes[node["inputs"][0][0]])]
    out = shapes[_output_name(node)]
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
    a = p.parse_args(argv)
    s = summarize(a.name, a.size, act=a.act, classes=a.classes, in_channels=a.in_channels,
                  bn=not a.no_bn, **_parse_kw(a.kw))
    print(format_summary(s, a.layers))


if __name__ == "__main__":
    main()

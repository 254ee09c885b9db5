"""Switching settings on every block of a kind inside a built network."""
from __future__ import annotations

from typing import Any

from mxnet.gluon import nn


def set_on(root: nn.Block, kind: type, **attrs: Any) -> int:
    """Set ``attrs`` on every block of type ``kind`` under ``root`` (included); return how
    many blocks were changed. Call before ``hybridize()``: a cached graph keeps the old values.
    """
    found: list[nn.Block] = []
    root.apply(lambda block: found.append(block) if isinstance(block, kind) else None)
    for block in found:
        for name, value in attrs.items():
            setattr(block, name, value)
    return len(found)

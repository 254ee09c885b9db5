"""Lists of names (images, classes, columns): duplicates and mismatches, said the same way
everywhere they are checked (ingest, predictions files, submissions, labels)."""
from __future__ import annotations

from typing import Any, Hashable, Iterable, Sequence


def duplicates(items: Iterable[Hashable]) -> list:
    """The items that occur more than once, each listed once, sorted."""
    seen: set = set()
    repeated: set = set()
    for x in items:
        (repeated if x in seen else seen).add(x)
    return sorted(repeated, key=str)


def examples(items: Sequence[Any], limit: int = 5) -> str:
    """``'a', 'b', 'c' and 7 more``: the first ``limit`` items of a list for a message."""
    items = list(items)
    shown = ", ".join(repr(x) for x in items[:limit])
    return shown + (f" and {len(items) - limit} more" if len(items) > limit else "")


def describe_mismatch(missing: Sequence[Any], extra: Sequence[Any],
                      repeated: Sequence[Any] = (), limit: int = 5) -> str:
    """``2 missing ['a', 'b']; 1 extra ['c']``: each kind of mismatch with a few examples."""
    parts = []
    for label, items in (("missing", missing), ("extra", extra), ("duplicate", repeated)):
        if items:
            parts.append(f"{len(items)} {label} [{examples(items, limit)}]")
    return "; ".join(parts)

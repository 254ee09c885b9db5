"""What classify writes: the probabilities CSV, the EcoTaxa import table, the counts, the
unreadable files. All four are streamed chunk by chunk and renamed into place together at the
end, so a stopped run leaves none half-written.

Given ``--out DIR/NAME.csv``:

* ``DIR/NAME.csv``: one row per image read: ``image``, ``class_1``/``probability_1`` to
  ``class_3``/``probability_3`` (the top three calibrated probabilities), ``assigned`` (the
  top class if its probability reaches the class's threshold, else ``unclassified``), and
  with ``--all-probs`` one column per class with its probability (the bundle's class order);
* ``DIR/ecotaxa_NAME.tsv``: an EcoTaxa import table (checked against EcoTaxa's importer,
  ``ecotaxa_back`` ``TSVFile``/``InBundle``: a file named ``ecotaxa*.tsv``, the header row,
  then the ``[t]``/``[f]`` type row, UTF-8 with a BOM, which the importer detects): per
  image ``img_file_name`` (relative to the table's folder, or as the input table had it),
  ``object_id``, ``object_annotation_category`` and ``object_annotation_status`` =
  ``predicted`` for an assigned image (both empty, i.e. unclassified in EcoTaxa, for the
  others), ``object_score`` (the top class's probability) and ``object_top1_category``
  (the top class, thresholded or not);
* ``DIR/NAME.summary.csv``: per class the images whose top class it is and those assigned
  to it (``top1``, ``assigned``: the counts without and with the thresholds), its threshold
  and out-of-fold precision and recall; then ``unclassified`` (assigned to no class),
  ``total_read`` and ``unreadable``;
* ``DIR/NAME.unreadable.csv``: ``image``, ``reason`` of every input that could not be read
  (header only when there is none).
"""
from __future__ import annotations

import contextlib
import csv
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from pipeline.lib.thresholds import UNCLASSIFIED, apply_thresholds, threshold_array

TOP = 3
ECOTAXA_COLUMNS = (("img_file_name", "[t]"), ("object_id", "[t]"),
                   ("object_annotation_category", "[t]"), ("object_annotation_status", "[t]"),
                   ("object_score", "[f]"), ("object_top1_category", "[t]"))
PREDICTED = "predicted"


@dataclass(frozen=True)
class OutputPaths:
    csv: Path
    ecotaxa: Path
    summary: Path
    unreadable: Path

    @classmethod
    def of(cls, out: str | Path) -> "OutputPaths":
        out = Path(out)
        stem = out.stem if out.suffix.lower() == ".csv" else out.name
        return cls(out, out.with_name(f"ecotaxa_{stem}.tsv"),
                   out.with_name(f"{stem}.summary.csv"), out.with_name(f"{stem}.unreadable.csv"))

    def all(self) -> tuple[Path, ...]:
        return (self.csv, self.ecotaxa, self.summary, self.unreadable)


class Writers:
    """The four outputs, open on temporary files while the rows are added."""

    def __init__(self, paths: OutputPaths, classes: Sequence[str],
                 thresholds: Sequence[dict[str, Any]], all_probs: bool):
        self.paths, self.classes, self.records = paths, list(classes), list(thresholds)
        self.cut = threshold_array(thresholds)
        self.all_probs = all_probs
        k = min(TOP, len(classes))
        self.top = k
        self.counts = {"top1": np.zeros(len(classes), np.int64),
                       "assigned": np.zeros(len(classes), np.int64)}
        self.unclassified = self.unreadable = 0
        self._stack = contextlib.ExitStack()

    def __enter__(self) -> "Writers":
        from pipeline.lib.fsutil import atomic_path

        tmp = [self._stack.enter_context(atomic_path(p)) for p in self.paths.all()]
        handles = [self._stack.enter_context(open(
            t, "w", newline="", encoding="utf-8-sig" if p == self.paths.ecotaxa else "utf-8"))
            for t, p in zip(tmp, self.paths.all())]
        self._csv = csv.writer(handles[0])
        self._tsv = csv.writer(handles[1], delimiter="\t", lineterminator="\n")
        self._summary_fh = handles[2]
        self._bad = csv.writer(handles[3])
        header = ["image"] + [f"{what}_{i}" for i in range(1, self.top + 1)
                              for what in ("class", "probability")] + ["assigned"]
        self._csv.writerow(header + (self.classes if self.all_probs else []))
        self._tsv.writerow([c for c, _ in ECOTAXA_COLUMNS])
        self._tsv.writerow([t for _, t in ECOTAXA_COLUMNS])
        self._bad.writerow(["image", "reason"])
        return self

    def add(self, chunk: Sequence[Any], probs: np.ndarray, reasons: Sequence[str]) -> None:
        """Rows of one chunk: its entries (:class:`pipeline.lib.inputs.Entry`), their
        probabilities and read errors ("" for an image that was read)."""
        ok = np.array([not r for r in reasons], dtype=bool)
        for entry, reason in zip(chunk, reasons):
            if reason:
                self._bad.writerow([entry.name, reason])
        self.unreadable += int((~ok).sum())
        if not ok.any():
            return
        p = np.asarray(probs, dtype=np.float64)[ok]
        order = np.argsort(-p, axis=1, kind="stable")[:, :self.top]
        best = order[:, 0]
        score = p[np.arange(len(p)), best]
        kept = apply_thresholds(best, score, self.cut)
        np.add.at(self.counts["top1"], best, 1)
        np.add.at(self.counts["assigned"], best[kept], 1)
        self.unclassified += int((~kept).sum())
        for row, entry in enumerate(e for e, good in zip(chunk, ok) if good):
            top = [v for c in order[row] for v in (self.classes[c], f"{p[row, c]:.6f}")]
            assigned = self.classes[best[row]] if kept[row] else UNCLASSIFIED
            extra = [f"{v:.6f}" for v in p[row]] if self.all_probs else []
            self._csv.writerow([entry.name] + top + [assigned] + extra)
            self._tsv.writerow([entry.img, entry.object_id,
                                assigned if kept[row] else "", PREDICTED if kept[row] else "",
                                f"{score[row]:.6f}", self.classes[best[row]]])

    def summary(self) -> list[list[Any]]:
        """The summary table's rows (header first)."""
        def show(v: Any) -> str:
            return "" if v is None else f"{v:.4f}" if isinstance(v, float) else str(v)

        rows: list[list[Any]] = [["class", "top1", "assigned", "threshold", "oof_precision",
                                  "oof_recall"]]
        for c, name in enumerate(self.classes):
            r = self.records[c]
            rows.append([name, int(self.counts["top1"][c]), int(self.counts["assigned"][c]),
                         show(r["threshold"]), show(r["precision"]), show(r["recall"])])
        read = int(self.counts["top1"].sum())
        rows.append([UNCLASSIFIED, "", self.unclassified, "", "", ""])
        rows.append(["total_read", read, read, "", "", ""])
        rows.append(["unreadable", self.unreadable, self.unreadable, "", "", ""])
        return rows

    def __exit__(self, kind, value, tb) -> None:
        if kind is None:
            csv.writer(self._summary_fh).writerows(self.summary())
        self._stack.__exit__(kind, value, tb)

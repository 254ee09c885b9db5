"""Synthetic NDSB-shaped data: dark shapes on white, for scale tests and benchmarks.

``python -m pipeline.tools.synth OUT --classes N --per-class M --test T`` writes::

    OUT/train/<class>/*.jpg   M images per class
    OUT/test/*.jpg            T images
    OUT/sampleSubmission.csv  (unless --no-sample-submission) classes in a shuffled,
                              NOT alphabetical, order, like the real NDSB file
    OUT/test_labels.csv       image,class of the test images (outside test/: hidden labels)

``--ecotaxa`` writes the same images as an EcoTaxa export instead (``OUT`` a ``.zip``, as
EcoTaxa's general export split by sample writes it, see :func:`write_export`): the labelled
images as validated objects, the test images as predicted ones, their true categories in
``OUT``'s ``*_test_labels.csv`` (``image`` = ``object_id``) beside the zip.

Each class is a shape family (ellipse, rectangle, triangle, star, ring, cross, ...) crossed
with a number of parts and a stroke style, drawn at a random size, aspect ratio, rotation and
grey level on white with sensor-like noise, so classes are learnable but not trivial and image
sizes vary as NDSB's do (tens to a few hundred pixels a side).
"""
from __future__ import annotations

import argparse
import csv
import io
import zipfile
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from pipeline.lib.submission import SAMPLE_SUBMISSION, non_alphabetical, write_sample_submission

SHAPES = ("ellipse", "rectangle", "triangle", "star", "ring", "cross", "crescent", "chain")


def class_names(n: int) -> list[str]:
    """N distinct class names; beyond the shape families, add part counts and stroke styles."""
    names = []
    for i in range(n):
        shape = SHAPES[i % len(SHAPES)]
        parts = 1 + (i // len(SHAPES)) % 3
        style = "filled" if (i // (3 * len(SHAPES))) % 2 == 0 else "outline"
        names.append(f"{shape}_{parts}_{style}_{i:03d}")
    return names


def _polygon(shape: str, rng: np.random.Generator) -> np.ndarray:
    """Unit-scale outline points (x, y) of one part of a shape."""
    t = np.linspace(0, 2 * np.pi, 60, endpoint=False)
    if shape in ("ellipse", "ring", "chain"):
        return np.stack([np.cos(t), np.sin(t)], 1)
    if shape == "rectangle":
        return np.array([[-1, -0.6], [1, -0.6], [1, 0.6], [-1, 0.6]], float)
    if shape == "triangle":
        return np.array([[0, -1], [0.9, 0.8], [-0.9, 0.8]], float)
    if shape == "star":
        k = int(rng.integers(5, 8))
        a = np.linspace(0, 2 * np.pi, 2 * k, endpoint=False)
        r = np.where(np.arange(2 * k) % 2 == 0, 1.0, 0.45)
        return np.stack([r * np.cos(a), r * np.sin(a)], 1)
    if shape == "cross":
        w = 0.3
        return np.array([[-w, -1], [w, -1], [w, -w], [1, -w], [1, w], [w, w], [w, 1], [-w, 1],
                         [-w, w], [-1, w], [-1, -w], [-w, -w]], float)
    if shape == "crescent":
        outer = np.stack([np.cos(t[:30] * 1.0), np.sin(t[:30])], 1)
        inner = outer[::-1] * 0.7 + [0.0, 0.25]
        return np.concatenate([outer, inner])
    raise ValueError(f"unknown shape {shape}")


def draw(class_name: str, rng: np.random.Generator, min_size: int = 24, max_size: int = 240
         ) -> np.ndarray:
    """One HxW uint8 image of ``class_name``: dark organism on a white, slightly noisy field."""
    import cv2

    shape, parts, style = class_name.split("_")[:3]
    parts = int(parts)
    long_side = int(np.exp(rng.uniform(np.log(min_size), np.log(max_size))))
    aspect = np.exp(rng.uniform(-0.6, 0.6))
    w, h = (long_side, max(8, int(long_side / aspect))) if aspect > 1 else \
        (max(8, int(long_side * aspect)), long_side)
    img = np.full((h, w), 255, np.uint8)
    angle = rng.uniform(0, 2 * np.pi)
    rot = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    scale = 0.42 * min(w, h) / max(1.0, 0.6 * parts + 0.4)
    grey = int(rng.integers(20, 120))
    thickness = max(1, int(scale / 5))
    for p in range(parts):
        offset = (p - (parts - 1) / 2) * 1.2 * np.array([1.0, 0.0])
        pts = (_polygon(shape, rng) + offset) @ rot.T * scale * rng.uniform(0.85, 1.15)
        pts = np.round(pts + [w / 2, h / 2]).astype(np.int32)
        if style == "filled" and shape != "ring":
            cv2.fillPoly(img, [pts], grey, lineType=cv2.LINE_AA)
        else:
            cv2.polylines(img, [pts], True, grey, thickness, lineType=cv2.LINE_AA)
    noise = rng.normal(0, 6, img.shape)
    return np.clip(img.astype(np.float64) + noise, 0, 255).astype(np.uint8)


def generate(out: str | Path, classes: int = 10, per_class: int = 20, test: int = 50,
             seed: int = 0, min_size: int = 24, max_size: int = 240,
             sample_submission: bool = True) -> list[str]:
    """Write a synthetic NDSB folder to ``out``; return the class names."""
    import cv2

    out = Path(out)
    rng = np.random.default_rng(seed)
    names = class_names(classes)
    for cls in names:
        folder = out / "train" / cls
        folder.mkdir(parents=True, exist_ok=True)
        for j in range(per_class):
            cv2.imwrite(str(folder / f"{cls}_{j:05d}.jpg"), draw(cls, rng, min_size, max_size))
    (out / "test").mkdir(parents=True, exist_ok=True)
    test_classes = rng.choice(names, size=test)
    with open(out / "test_labels.csv", "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["image", "class"])
        for j, cls in enumerate(test_classes):
            name = f"{j + 1:06d}.jpg"
            cv2.imwrite(str(out / "test" / name), draw(str(cls), rng, min_size, max_size))
            writer.writerow([name, cls])
    if sample_submission:
        write_sample_submission(out / SAMPLE_SUBMISSION,
                                [f"{j + 1:06d}.jpg" for j in range(test)],
                                non_alphabetical(names, rng))
    return names


# The columns of an EcoTaxa general export with images (ecotaxa/ecotaxa_back,
# py/API_operations/exports/ForProject.py, create_tsv), in its order, with their types.
EXPORT_COLUMNS = {"img_file_name": "[t]", "img_rank": "[f]", "object_id": "[t]",
                  "object_lat": "[f]", "object_lon": "[f]", "object_annotation_status": "[t]",
                  "object_annotation_person_name": "[t]", "object_annotation_category": "[t]",
                  "object_annotation_hierarchy": "[t]", "sample_id": "[t]"}


def write_export(path: str | Path, samples: Mapping[str, Sequence[Mapping[str, Any]]],
                 images: Mapping[str, bytes], types_row: bool = True,
                 columns: Sequence[str] | None = None) -> Path:
    """A zip as EcoTaxa's general export split by sample writes it: per sample an
    ``ecotaxa_<sample>.tsv`` at the root (UTF-8 with a byte-order mark, tab-separated, text
    cells quoted, the ``[t]``/``[f]`` type row when ``types_row``) and ``images`` (member name
    -> bytes), which rows name in ``img_file_name`` as ``<sample>/<file>``. Rows are column ->
    value mappings; ``columns`` defaults to :data:`EXPORT_COLUMNS`."""
    path = Path(path)
    columns = list(columns or EXPORT_COLUMNS)
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for sample, rows in samples.items():
            text = io.StringIO()
            writer = csv.DictWriter(text, columns, delimiter="\t", quotechar='"',
                                    lineterminator="\n", quoting=csv.QUOTE_NONNUMERIC,
                                    extrasaction="ignore")
            writer.writeheader()
            if types_row:
                writer.writerow({c: EXPORT_COLUMNS.get(c, "[t]") for c in columns})
            for row in rows:
                writer.writerow(row)
            zf.writestr(f"ecotaxa_{sample}.tsv", text.getvalue().encode("utf-8-sig"))
        for member, data in images.items():
            zf.writestr(member, data)
    return path


def display_name(class_name: str) -> str:
    """An EcoTaxa-like category for a synthetic class: spaces and a ``<parent`` part, as
    EcoTaxa's display names have (``ellipse_1_filled_000`` -> ``ellipse x1<filled 000``)."""
    shape, parts, style, number = class_name.split("_")
    return f"{shape} x{parts}<{style} {number}"


def lineage(class_name: str) -> str:
    """The ``>``-separated lineage EcoTaxa exports as ``object_annotation_hierarchy``: names,
    not display names (``living>synthetic>filled 000>ellipse x1``)."""
    name, parent = display_name(class_name).split("<")
    return f"living>synthetic>{parent}>{name}"


def generate_export(out: str | Path, classes: int = 10, per_class: int = 20, test: int = 50,
                    seed: int = 0, min_size: int = 24, max_size: int = 240, samples: int = 2,
                    types_row: bool = True) -> list[str]:
    """Write a synthetic EcoTaxa export zip to ``out`` (see :func:`write_export`) and its test
    objects' categories beside it; return the categories."""
    import cv2

    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    names = class_names(classes)
    drawn = [(cls, "validated") for cls in names for _ in range(per_class)]
    drawn += [(str(cls), "predicted") for cls in rng.choice(names, size=test)]
    order = rng.permutation(len(drawn))  # objects of all kinds mixed over the samples
    rows: dict[str, list[dict[str, Any]]] = {f"s{k:02d}": [] for k in range(samples)}
    images, labels = {}, []
    for n, i in enumerate(order):
        cls, status = drawn[i]
        sample = f"s{n % samples:02d}"
        object_id = f"{sample}_{n:06d}"
        member = f"{sample}/{object_id}.png"
        ok, png = cv2.imencode(".png", draw(cls, rng, min_size, max_size))
        images[member] = png.tobytes()
        # A predicted object carries a category too (the classifier's guess); only the
        # validated ones are known to be right.
        guess = cls if status == "validated" else str(rng.choice(names))
        rows[sample].append({
            "img_file_name": member, "img_rank": 0, "object_id": object_id,
            "object_lat": 43.68, "object_lon": 7.31, "object_annotation_status": status,
            "object_annotation_person_name": "synth" if status == "validated" else "",
            "object_annotation_category": display_name(guess),
            "object_annotation_hierarchy": lineage(guess),
            "sample_id": sample})
        if status == "predicted":
            labels.append((object_id, display_name(cls)))
    write_export(out, rows, images, types_row)
    with open(out.with_name(f"{out.stem}_test_labels.csv"), "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["image", "class"])
        writer.writerows(labels)
    return [display_name(c) for c in names]


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Write a synthetic NDSB-layout folder.")
    parser.add_argument("out")
    parser.add_argument("--classes", type=int, default=10)
    parser.add_argument("--per-class", type=int, default=20)
    parser.add_argument("--test", type=int, default=50)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--min-size", type=int, default=24)
    parser.add_argument("--max-size", type=int, default=240)
    parser.add_argument("--no-sample-submission", action="store_true")
    parser.add_argument("--ecotaxa", action="store_true",
                        help="write OUT as an EcoTaxa export zip (validated + predicted objects)")
    parser.add_argument("--samples", type=int, default=2, help="--ecotaxa: samples (TSVs)")
    args = parser.parse_args(argv)
    if args.ecotaxa:
        names = generate_export(args.out, args.classes, args.per_class, args.test, args.seed,
                                args.min_size, args.max_size, args.samples)
        print(f"synth: EcoTaxa export of {len(names)} categories x {args.per_class} validated + "
              f"{args.test} predicted objects in {args.samples} sample(s) -> {args.out}")
        return
    names = generate(args.out, args.classes, args.per_class, args.test, args.seed,
                     args.min_size, args.max_size, not args.no_sample_submission)
    print(f"synth: {len(names)} classes x {args.per_class} train + {args.test} test -> {args.out}")


if __name__ == "__main__":
    main()

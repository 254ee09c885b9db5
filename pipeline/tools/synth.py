"""Synthetic NDSB-shaped data: dark shapes on white, for scale tests and benchmarks.

``python -m pipeline.tools.synth OUT --classes N --per-class M --test T`` writes::

    OUT/train/<class>/*.jpg   M images per class
    OUT/test/*.jpg            T images
    OUT/sampleSubmission.csv  (unless --no-sample-submission) classes in a shuffled,
                              NOT alphabetical, order, like the real NDSB file
    OUT/test_labels.csv       image,class of the test images (outside test/: hidden labels)

Each class is a shape family (ellipse, rectangle, triangle, star, ring, cross, ...) crossed
with a number of parts and a stroke style, drawn at a random size, aspect ratio, rotation and
grey level on white with sensor-like noise, so classes are learnable but not trivial and image
sizes vary as NDSB's do (tens to a few hundred pixels a side).
"""
from __future__ import annotations

import argparse
import csv
from pathlib import Path
from typing import Sequence

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
    args = parser.parse_args(argv)
    names = generate(args.out, args.classes, args.per_class, args.test, args.seed,
                     args.min_size, args.max_size, not args.no_sample_submission)
    print(f"synth: {len(names)} classes x {args.per_class} train + {args.test} test -> {args.out}")


if __name__ == "__main__":
    main()

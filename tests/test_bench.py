"""Smoke test of ``python -m pipeline.tools.bench``: a tiny net, tiny inputs, a fraction of a
second.

Only the output contract is checked (one JSON line per mode with the fields the PyTorch
reference prints, all positive numbers); the figures themselves live in BENCHMARKS.md.
"""
from __future__ import annotations

import json
import subprocess
import sys

from tests.conftest import ROOT

REFERENCE_FIELDS = ("net", "act", "batch", "size", "threads")


def _positive(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0


def test_bench_prints_reference_fields_and_data_line():
    cmd = [sys.executable, "-m", "pipeline.tools.bench", "--net", "tinynet_cifar", "--size", "16",
           "--batch", "4", "--seconds", "0.05", "--threads", "1", "--what", "train,infer,data",
           "--ingest-images", "20"]
    done = subprocess.run(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    lines = [json.loads(l) for l in done.stdout.splitlines()]
    assert all(isinstance(l, dict) for l in lines)

    head = lines[0]
    assert head["engine"] == "mxnet"
    for field in REFERENCE_FIELDS:
        assert field in head
    assert (head["net"], head["size"], head["batch"], head["threads"]) == ("tinynet_cifar", 16, 4, 1)
    assert _positive(head["train_img_s"]) and _positive(head["infer_img_s"])
    assert head["precision"] in ("float32", "bfloat16")  # auto is resolved, not echoed
    assert head["rrelu_impl"] == "native"

    data = next(l for l in lines if l.get("what") == "data")
    assert _positive(data["img_s_per_worker"]) and _positive(data["per_worker_over_train"])
    for line in lines:  # every line: which CPU, which precision, which day
        assert line["cpu"] == head["cpu"] and line["cpu"].strip() and "precision" in line
        assert len(line["date"]) == 10
    assert data["precision"] is None  # no network in the data line
    # the decisions `auto` took (as train and predict take them), last, one per kind
    auto = {l["kind"]: l for l in lines if l.get("what") == "auto"}
    assert set(auto) == {"training", "inference"} and lines[-1]["what"] == "auto"
    assert auto["training"]["used"] == auto["training"]["precision"] == head["precision"]
    assert auto["inference"]["used"] == head["infer_precision"]
    assert all(l["requested"] == "auto" and l["source"] in ("only candidate", "flags")
               for l in auto.values())  # the tests run with NDSB_AUTO=flags
    assert "auto: " + head["precision"] + " for training here" in done.stderr


def test_bench_precision_and_rrelu_impl_flags():
    cmd = [sys.executable, "-m", "pipeline.tools.bench", "--net", "tinynet_cifar", "--size", "16",
           "--batch", "4", "--seconds", "0.05", "--threads", "1", "--what", "train",
           "--precision", "float32", "--rrelu-impl", "ops"]
    done = subprocess.run(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    head = json.loads(done.stdout.splitlines()[0])
    assert head["precision"] == "float32" and head["rrelu_impl"] == "ops"
    auto = next(json.loads(l) for l in done.stdout.splitlines() if '"training"' in l)
    assert (auto["requested"], auto["used"], auto["source"]) == ("float32", "float32",
                                                                 "explicit")
    assert _positive(head["train_img_s"])


def test_every_tta_line_names_the_precision_of_its_variant():
    cmd = [sys.executable, "-m", "pipeline.tools.bench", "--net", "tinynet_cifar", "--size", "16",
           "--batch", "4", "--seconds", "0.05", "--threads", "1", "--what", "int8,tta",
           "--precision", "float32", "--infer-precision", "float32", "--tta-views", "2",
           "--tta-batch", "2", "--ingest-images", "20", "--calib-images", "8"]
    done = subprocess.run(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    lines = [json.loads(l) for l in done.stdout.splitlines()]
    tta = {l["variant"]: l["precision"] for l in lines if l.get("what") == "tta"}
    assert tta["predict"] == "float32" and tta["fused"] == "float32" and tta["int8"] == "int8"
    assert tta.get("bfloat16", "bfloat16") == "bfloat16"
    int8 = next(l for l in lines if l.get("what") == "int8")
    assert int8["precision"] == "int8" and int8["precisions"]["int8_img_s"] == "int8"

"""Smoke test of the benchmark suite (moe/bench/suite.py) at toy sizes: every benchmark runs end to end and
reports its figures as finite positive numbers. No timing assertions: speed is measured, not tested."""

from __future__ import annotations

import json
import math

import pytest

from moe.bench import suite as bench

KEYS = {
    "moe_layer": ("ratio_e8", "ratio_e16", "ratio_e32", "ratio_e64", "flatness", "dropless_ratio_e8"),
    "routing": ("causal_ratio", "probability_ratio", "bias_ratio", "sigmoid_ratio", "seq_loss_ratio"),
    "train_step": ("mfu", "step_time_s", "tokens_per_sec", "peak_gflops"),
    "compile": ("compile_ratio",),
    "input": ("input_ratio",),
    "checkpoint": ("ckpt_stall_ratio",),
}


@pytest.mark.parametrize("name", [n for n in KEYS if n != "compile"])  # compile: through the CLI below
def test_benchmark_reports_its_figures(name):
    out = bench.run(name, quick=True)
    for key in KEYS[name]:
        assert isinstance(out[key], float) and math.isfinite(out[key]) and out[key] > 0, (key, out[key])


def test_cli_writes_json(tmp_path):
    path = tmp_path / "bench.json"
    bench.main(["compile", "--quick", "--json", str(path)])
    out = json.loads(path.read_text())
    for key in KEYS["compile"]:
        assert math.isfinite(out[key]) and out[key] > 0, (key, out[key])
    assert "machine" in out and out["command"].startswith("python -m moe.bench compile")

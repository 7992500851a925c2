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


def test_moe_layer_takes_dtype_and_grouped_matmul_from_set():
    """The GPU script's settings (scripts/gpu_moe_layer.sh) reach moe_layer; other keys stay train_step's."""
    from moe.config import ConfigError

    assert bench._layer_settings([]) == {"dtype": "float32", "grouped_matmul": "auto"}
    assert bench._layer_settings(["model.dtype=bfloat16", "model.grouped_matmul=ragged", "train.batch_size=2"]) == {
        "dtype": "bfloat16", "grouped_matmul": "ragged"}
    with pytest.raises(ConfigError, match="model.grouped_matmul"):
        bench._layer_settings(["model.grouped_matmul=megablocks"])
    out = bench.run("moe_layer", quick=True, overrides=["model.dtype=bfloat16", "model.grouped_matmul=ragged"])
    assert out["dtype"] == "bfloat16" and out["grouped_matmul"] == "ragged" and out["dropless_ratio_e8"] > 0

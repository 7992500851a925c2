"""Two processes on localhost (2 fake CPU devices each, gloo collectives) train through train.py; their
losses, and the in-training eval (each host evaluating its share of the rows), equal one process with 4
devices fed the same global batches."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
OVERRIDES = ["model.dtype=float32", "model.num_layers=2", "model.d_model=64", "model.d_ff=128", "train.batch_size=8",
             "train.seq_len=64", "train.steps=3", "train.log_every=1", "train.eval_every=0", "checkpoint.every=3", "mesh.data=4",
             "train.progress=false"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(devices: int) -> dict:
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")
    env["PYTHONPATH"] = str(ROOT)
    return env


@pytest.mark.slow
def test_two_processes_match_one_process(tmp_path):
    port = _free_port()
    workdir = tmp_path / "run"
    procs = [subprocess.Popen(
        [sys.executable, "train.py", "--config", "configs/tiny.yaml", "--workdir", str(workdir),
         "--coordinator", f"127.0.0.1:{port}", "--num_processes", "2", "--process_id", str(i), *OVERRIDES],
        cwd=ROOT, env=_env(2), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for i in range(2)]
    outs = [p.communicate(timeout=600)[0] for p in procs]
    for p, out in zip(procs, outs):
        assert p.returncode == 0, out[-3000:]
    records = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    multi = [r["loss"] for r in records]
    ref = subprocess.run([sys.executable, "tests/helpers/multihost_reference.py", "configs/tiny.yaml", *OVERRIDES],
                         cwd=ROOT, env=_env(4), capture_output=True, text=True, timeout=600)
    assert ref.returncode == 0, ref.stderr[-3000:]
    ref = json.loads(ref.stdout.strip().splitlines()[-1])
    single = ref["losses"]
    assert len(multi) == len(single) == 3
    assert multi == pytest.approx(single, rel=1e-5)
    assert records[-1]["eval_tokens"] == ref["eval_tokens"]  # not N hosts x the tokens
    assert records[-1]["eval_loss"] == pytest.approx(ref["eval_loss"], rel=1e-5)
    assert (workdir / "checkpoints" / "3").is_dir()

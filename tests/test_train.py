"""End-to-end training on the built-in corpus: loss goes down, metrics and checkpoints are
complete, a stopped-and-resumed run is bit-identical to an uninterrupted one, Lion and AdamW both learn,
`train.init_from` starts from another run's params, and the resolved config lands in WORKDIR/config.yaml.

Runs are in-process (`loop.train(cfg, workdir)`) and shared through module-scoped fixtures. Every run uses
the same model, batch and schedule (`OVERRIDES`; stops before `train.steps` come from the SIGTERM hook
MOE_FAULT_SIGTERM_STEP), so the jitted steps compile once and later runs load them from the persistent
compilation cache (conftest.py).
"""

import json
import logging
import math

import pytest
import yaml

from moe.train import loop
from moe import config
from moe.train.checkpoint import Checkpointer
from moe.config import load_config
from moe.train.metrics import read_metrics


STEPS = 30
OVERRIDES = ["model.num_layers=2", "model.d_model=64", "model.d_ff=128", "train.batch_size=8",
             "train.seq_len=64", f"train.steps={STEPS}", "train.log_every=1", "train.eval_every=10",
             "train.eval_batches=2", "checkpoint.every=10", "train.progress=false", "optim.warmup_steps=5"]
FIELDS = ("step", "loss", "lr", "grad_norm", "aux_loss", "z_loss", "tokens_per_sec", "mfu", "drop_fraction",
          "expert_load", "skipped_total", "rollbacks")


def tiny(*extra):
    return load_config("configs/tiny.yaml", OVERRIDES + list(extra))


def run(workdir, *extra, stop_at=None):
    """train.train on `workdir`; with stop_at, a SIGTERM arrives after that step (loop.Preempted)."""
    with pytest.MonkeyPatch.context() as mp:
        if stop_at is not None:
            mp.setenv("MOE_FAULT_SIGTERM_STEP", str(stop_at))
            with pytest.raises(loop.Preempted, match=f"SIGTERM at step {stop_at}"):
                loop.train(tiny(*extra), str(workdir))
            return None
        return loop.train(tiny(*extra), str(workdir))


def losses(workdir):
    return {r["step"]: r["loss"] for r in read_metrics(workdir)}


@pytest.fixture(scope="module")
def run_a(tmp_path_factory):
    """30 uninterrupted AdamW steps."""
    wd = tmp_path_factory.mktemp("a")
    return wd, run(wd)


@pytest.fixture(scope="module")
def run_b(tmp_path_factory):
    """The same run, stopped by SIGTERM after step 15 (not a checkpoint.every multiple), then resumed."""
    wd = tmp_path_factory.mktemp("b")
    run(wd, stop_at=15)
    first = losses(wd)
    steps_at_stop = Checkpointer(str(wd), tiny().checkpoint).steps()
    return wd, first, steps_at_stop, run(wd)


def test_end_to_end_loss_metrics_checkpoints(run_a):
    wd, summary = run_a
    records = read_metrics(wd)
    assert [r["step"] for r in records] == list(range(1, STEPS + 1))
    for r in records:
        missing = [k for k in FIELDS if k not in r]
        assert not missing, (r["step"], missing)
        assert ("eval_loss" in r) == (r["step"] % 10 == 0), r["step"]
        assert len(r["expert_load"]) == 1 and len(r["expert_load"][0]) == 8  # one MoE layer, E=8
        assert math.isclose(sum(r["expert_load"][0]), 1.0, rel_tol=1e-5)
        assert 0 <= r["drop_fraction"] < 1 and r["tokens_per_sec"] > 0 and r["mfu"] > 0
    first, last = records[0], records[-1]
    assert last["loss"] < first["loss"] - 0.5, (first["loss"], last["loss"])
    assert records[-1]["eval_loss"] < records[9]["eval_loss"]
    assert summary["step"] == STEPS and summary["done"] and summary["rollbacks"] == 0
    assert summary["params_sha"] and json.loads((wd / "summary.json").read_text()) == summary
    assert Checkpointer(str(wd), tiny().checkpoint).steps() == [10, 20, 30]
    assert any(f.name.startswith("events.out.tfevents") for f in (wd / "tb").iterdir())


def test_resolved_config_written(run_a):
    wd, _ = run_a
    written = yaml.safe_load((wd / "config.yaml").read_text())
    assert written == config.to_dict(tiny())
    assert config.from_dict(written) == tiny()


def test_stop_and_resume_is_bit_identical(run_a, run_b):
    wd_a, summary_a = run_a
    wd_b, first, steps_at_stop, summary_b = run_b
    assert max(first) == 15 and steps_at_stop == [10, 15]  # the SIGTERM saved at the step it arrived
    a, b = read_metrics(wd_a), read_metrics(wd_b)
    assert [r["step"] for r in b] == list(range(1, STEPS + 1))  # no step logged twice after the resume
    for ra, rb in zip(a, b):
        for key in ("loss", "grad_norm", "aux_loss", "z_loss", "lr", "expert_load", "eval_loss"):
            assert ra.get(key) == rb.get(key), (ra["step"], key, ra.get(key), rb.get(key))
    assert summary_b["params_sha"] == summary_a["params_sha"]


def test_resume_with_changed_model_is_refused(run_a, tmp_path):
    wd, _ = run_a
    with pytest.raises(config.ConfigError, match=r"model.d_ff: 128 \(checkpoint\) -> 256 \(now\)") as e:
        loop.train(tiny("model.d_ff=256", "optim.lr=1e-3", "train.log_every=5"), str(wd))
    msg = str(e.value)
    assert "optim.lr" in msg and "train.log_every" not in msg and "\n" not in msg  # log_every may change


def test_lion_reduces_the_loss(tmp_path):
    run(tmp_path, "optim.name=lion", "optim.lr=1e-3", "optim.weight_decay=0.3", stop_at=15)
    loss = losses(tmp_path)
    start, end = sum(loss[s] for s in (1, 2, 3)) / 3, sum(loss[s] for s in (13, 14, 15)) / 3
    assert end < start - 0.3, (start, end)


def test_adamw_reduces_the_loss(run_a):
    loss = losses(run_a[0])
    start, end = sum(loss[s] for s in (1, 2, 3)) / 3, sum(loss[s] for s in (13, 14, 15)) / 3
    assert end < start - 0.3, (start, end)  # the same window as the Lion test


def test_init_from_loads_params_only(run_a, tmp_path, caplog):
    wd_a, _ = run_a
    with caplog.at_level(logging.INFO, logger="moe.train"):
        run(tmp_path, f"train.init_from={wd_a}", stop_at=1)
    assert f"initialised params from {wd_a} (step {STEPS})" in caplog.text
    a, c = losses(wd_a), losses(tmp_path)
    # step 1 sees the same first batch as run A's step 1, but with A's trained params
    assert c[1] < a[1] - 0.5 and abs(c[1] - a[STEPS]) < 0.3, (a[1], a[STEPS], c[1])
    first = read_metrics(tmp_path)[0]
    assert first["lr"] == read_metrics(wd_a)[0]["lr"]  # the optimizer and its schedule start fresh


def test_init_from_a_run_without_router_biases_starts_them_at_zero(run_a, tmp_path, caplog):
    wd_a, _ = run_a
    with caplog.at_level(logging.INFO, logger="moe.train"):
        run(tmp_path, f"train.init_from={wd_a}", "model.router_bias_update_rate=1e-3", stop_at=1)
    assert "has no router biases" in caplog.text and "they start at 0" in caplog.text
    a, c = losses(wd_a), losses(tmp_path)
    assert abs(c[1] - a[STEPS]) < 0.3, (a[STEPS], c[1])  # the trained parameters did load
    assert read_metrics(tmp_path)[0]["router_bias_norm"] > 0  # and the bias moved after the first step

"""Sweep files (moe.scaling.sweep), the resumable runner, and the run -> collect -> fit -> plot loop (moe.scaling.runner)."""

import json
import os
from pathlib import Path

import pytest

from moe.scaling import runner as scaling
from moe.config import load_config
from moe.scaling.fit import FitError
from moe.scaling.sweep import SweepError, load_sweep

REPO = Path(__file__).resolve().parent.parent
TINY = REPO / "configs" / "tiny.yaml"


def _sweep(tmp_path: Path, body: str) -> Path:
    path = tmp_path / "sweep.yaml"
    path.write_text(f"base: {TINY}\n" + body)
    return path


def _child_env() -> dict:
    """train.py children see the host's real devices, not the 8 fake ones conftest sets for this process."""
    env = dict(os.environ)
    env["XLA_FLAGS"] = env.get("XLA_FLAGS", "").replace("--xla_force_host_platform_device_count=8", "").strip()
    return env


def test_grid_expansion_steps_and_stable_names(tmp_path):
    path = _sweep(tmp_path, """
fixed: {train.batch_size: 8, train.seq_len: 64}
budgets: [30720, 1.2e6]
grid: {model.top_k: [1, 2], optim.lr: [1.0e-3, 3.0e-3]}
seeds: [0, 1]
warmup_fraction: 0.1
""")
    sweep = load_sweep(path)
    assert len(sweep.points) == 2 * 2 * 2 * 2
    names = [p.name for p in sweep.points]
    assert len(set(names)) == len(names)
    assert names == [p.name for p in load_sweep(path).points]  # stable across loads
    p = next(p for p in sweep.points if p.budget_tokens == 1.2e6 and "topk2" in p.name and "lr3e-3" in p.name
             and p.name.endswith("s1-topk2"))
    assert p.name == "d128-l4-e8-tok1.2M-lr3e-3-s1-topk2"
    cfg = load_config(sweep.base, list(p.overrides))
    assert cfg.train.steps == round(1.2e6 / (8 * 64)) and cfg.optim.warmup_steps == round(0.1 * cfg.train.steps)
    assert (cfg.model.top_k, cfg.optim.lr, cfg.train.seed) == (2, 3e-3, 1)


def test_size_ladder_and_compute_budgets_size_tokens_from_flops(tmp_path):
    from moe.model.decoder import flops_per_token

    path = _sweep(tmp_path, """
fixed: {train.batch_size: 8, train.seq_len: 64}
sizes:
  - {name: s, model.d_model: 64, model.d_ff: 256}
  - {name: m, model.d_model: 128, model.d_ff: 512}
compute_budgets: [1e13, 3e13]
""")
    sweep = load_sweep(path)
    assert [p.size for p in sweep.points] == ["s", "s", "m", "m"]
    for p in sweep.points:
        cfg = load_config(sweep.base, list(p.overrides))
        tokens = p.budget_flops / flops_per_token(cfg.model, cfg.train.seq_len)
        assert cfg.train.steps == round(tokens / (8 * 64))
        assert f"-C{p.budget_flops:.0e}-".replace("+", "") in p.name  # e.g. d64-l4-e8-C1e13-lr3e-3-s0-dff256
    small, big = sweep.points[0], sweep.points[2]
    assert load_config(sweep.base, list(small.overrides)).train.steps > load_config(sweep.base, list(big.overrides)).train.steps


@pytest.mark.parametrize("body, message", [
    ("sizes:\n  - {name: a, model.d_model: 32}\n  - {name: b, model.dmodel: 64}\n",
     r"sizes\[1\] \(b\): unknown config key 'model.dmodel'; did you mean 'model.d_model'"),
    ("budgets: [1000, lots]\n", r"budgets\[1\]: expected a positive number, got 'lots'"),
    ("grid: {model.top_k: 2}\n", r"grid.model.top_k: expected a non-empty list"),
    ("points:\n  - {model.top_k: 1}\n  - top_k=2\n", r"points\[1\]: expected a mapping"),
    ("budget: [1000]\n", r"unknown sweep key 'budget'; did you mean 'budgets'"),
    ("budgets: [1000]\ncompute_budgets: [1e12]\n", r"not both"),
    ("points:\n  - {model.top_k: 1}\n  - {model.top_k: 1}\n", r"share the run name"),
])
def test_malformed_sweep_names_the_offending_entry(tmp_path, body, message):
    with pytest.raises(SweepError, match=message):
        load_sweep(_sweep(tmp_path, body))


def test_fit_with_too_few_finished_points_is_a_clear_error(tmp_path, capsys):
    path = _sweep(tmp_path, "points:\n  - {model.d_model: 64}\n  - {model.d_model: 128}\n")
    rows = scaling.collect(load_sweep(path), tmp_path / "runs")
    assert [r["status"] for r in rows] == ["pending", "pending"]
    with pytest.raises(FitError, match="5 parameters but only 0 points"):
        scaling.fit_rows(rows, "chinchilla")
    assert scaling.main(["fit", str(path), "--workdir", str(tmp_path / "runs")]) == 2
    assert "only 0 points" in capsys.readouterr().err


def test_emit_writes_one_local_line_per_point(tmp_path):
    sweep = load_sweep(_sweep(tmp_path, "budgets: [20480, 40960]\n"))
    lines = scaling.emit_commands(sweep, "gs://b/sw")
    assert len(lines) == 2
    assert lines[0].startswith("python train.py --config configs/tiny.yaml "
                               "--workdir gs://b/sw/d128-l4-e8-tok20.5k-lr3e-3-s0 ")
    assert lines[1].endswith("train.steps=20")


def test_failing_point_is_recorded_and_the_sweep_continues(tmp_path):
    # num_heads 3 and 5 do not divide d_model 128: train.py rejects each with exit status 2.
    path = _sweep(tmp_path, "points:\n  - {model.num_heads: 3}\n  - {model.num_heads: 5}\n")
    sweep = load_sweep(path)
    lines = []
    rc = scaling.run_sweep(sweep, tmp_path / "runs", env=_child_env(), echo=lines.append)
    assert rc == 1
    assert len(lines) == 3 and "FAILED (exit 2" in lines[0] and "FAILED (exit 2" in lines[1]
    assert lines[2].startswith("2 points: 0 done, 2 not done")
    for p in sweep.points:
        rec = json.loads((tmp_path / "runs" / p.name / "point.json").read_text())
        assert rec["status"] == "failed" and rec["returncode"] == 2 and "num_heads" in rec["error"]
    rows = scaling.collect(sweep, tmp_path / "runs")
    assert [r["status"] for r in rows] == ["failed", "failed"]


@pytest.mark.slow
def test_tiny_sweep_run_collect_fit_plot(tmp_path, capsys):
    """The real thing: 3 sizes x 2 budgets of the tiny preset on the built-in corpus (~3-4 min on 2 cores)."""
    sweep_path = REPO / "configs" / "sweeps" / "tiny_sizes.yaml"
    sweep, work = load_sweep(sweep_path), tmp_path / "sweep"
    lines = []
    assert scaling.run_sweep(sweep, work, env=_child_env(), echo=lines.append) == 0, "\n".join(lines)
    assert scaling.run_sweep(sweep, work, echo=lines.append) == 0  # second pass: everything done already
    assert sum("done already" in x for x in lines) == len(sweep.points)

    assert scaling.main(["collect", str(sweep_path), "--workdir", str(work)]) == 0
    assert (work / "results.csv").exists() and "| name | status |" in (work / "results.md").read_text()
    rows = scaling.collect(sweep, work)
    assert all(r["status"] == "done" and r["eval_loss"] > 0 and r["E"] == 8 for r in rows)
    big_budget = max(r["budget_tokens"] for r in rows)
    at_big = sorted((r for r in rows if r["budget_tokens"] == big_budget), key=lambda r: r["N_active"])
    assert at_big[-1]["eval_loss"] < at_big[0]["eval_loss"]  # the larger model wins at the larger budget

    assert scaling.main(["fit", str(sweep_path), "--workdir", str(work), "--bootstrap", "10",
                         "--target-flops", "1e15"]) == 0
    fit = json.loads((work / "fit_chinchilla.json").read_text())
    assert fit["n_points"] == 6 and fit["target"]["N_opt"] > 0
    assert "alpha" in capsys.readouterr().out

    assert scaling.main(["plot", str(sweep_path), "--workdir", str(work)]) == 0
    for png in ("loss_vs_n.png", "residuals_chinchilla.png"):
        assert (work / "plots" / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_plots_from_a_synthetic_isoflop_sweep(tmp_path):
    import numpy as np

    from moe.scaling import fit as sf
    from moe.scaling.plot import plot_all

    true = {"E": 1.82, "A": 482.0, "B": 2085.0, "alpha": 0.348, "beta": 0.366}
    rows = []
    for c in (1e18, 1e19, 1e20):
        for i, n in enumerate(sf.compute_optimal(true, c)["N_opt"] * np.geomspace(0.25, 4, 5)):
            d = c / (6 * n)
            rows.append(dict.fromkeys(scaling.COLUMNS) | {
                "name": f"C{c:.0e}-{i}", "status": "done", "N_active": n, "N_total": 8 * n, "E": 8, "tokens": d,
                "eval_loss": float(sf.chinchilla_loss(true, n, d)), "budget_flops": c})
    fits = {"isoflop": scaling.fit_rows(rows, "isoflop", bootstrap=5),
            "chinchilla": scaling.fit_rows(rows, "chinchilla", bootstrap=5)}
    assert abs(fits["chinchilla"]["params"]["alpha"] - true["alpha"]) < 0.02
    paths = [Path(p) for p in plot_all(rows, fits, str(tmp_path / "plots"))]
    assert sorted(p.name for p in paths) == ["isoflop.png", "loss_vs_n.png", "residuals_chinchilla.png"]
    assert all(p.read_bytes()[:4] == b"\x89PNG" for p in paths)

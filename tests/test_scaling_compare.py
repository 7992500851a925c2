"""`python -m moe.scaling compare` (moe/scaling/compare.py) on hand-written runs: variants are the points'
settings other than the seed, figures are means over seeds with half the range as spread, and the tail
averages read the last quarter of the logged steps."""

import json

from moe.scaling import runner
from moe.scaling.compare import compare
from moe.scaling.sweep import load_sweep


def _write_run(folder, final_eval, loads, drops):
    folder.mkdir(parents=True)
    lines = []
    for i, (load, drop) in enumerate(zip(loads, drops), 1):
        rec = {"step": i * 10, "loss": 5.0 - i * 0.1, "load_imbalance": [1.0, load], "drop_fraction": drop,
               "tokens_per_sec": 100.0 * i}
        if i == len(loads):
            rec["eval_loss"] = final_eval
        lines.append(json.dumps(rec))
    (folder / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    (folder / "config.yaml").write_text("optim:\n  warmup_steps: 10\n")


def test_compare_groups_seeds_and_averages_the_tail(tmp_path):
    sweep_file = tmp_path / "s.yaml"
    sweep_file.write_text(f"base: {runner.REPO / 'configs/tiny.yaml'}\nfixed: {{train.steps: 40, optim.warmup_steps: 10}}\n"
                          "seeds: [0, 1]\npoints:\n  - {model.drop_policy: position}\n"
                          "  - {model.router_bias_update_rate: 1.0e-3}\n")
    sweep = load_sweep(sweep_file)
    assert len(sweep.points) == 4
    wd = tmp_path / "runs"
    # steps 10..40; the last quarter of 40 steps is step 40 only (> 30); worst load after warmup (step > 10)
    # points run seed-major: (s0, position), (s0, bias), (s1, position), (s1, bias)
    values = {0: (5.0, [3.0, 2.0, 1.5, 1.2], [0.1, 0.1, 0.1, 0.08]), 2: (5.2, [3.0, 2.5, 1.8, 1.4], [0.1, 0.1, 0.1, 0.06]),
              1: (4.9, [2.0, 1.5, 1.1, 1.05], [0.0] * 4), 3: (4.95, [2.0, 1.4, 1.2, 1.15], [0.0] * 4)}
    for i, p in enumerate(sweep.points):
        _write_run(wd / p.name, *values[i])
    rows = compare(sweep, wd)
    assert [r["variant"] for r in rows] == ["drop_policy=position", "router_bias_update_rate=0.001"]
    a, b = rows
    assert a["seeds"] == b["seeds"] == 2
    assert abs(a["eval_loss"] - 5.1) < 1e-9 and abs(a["eval_loss_spread"] - 0.1) < 1e-9
    assert abs(a["load_tail"] - 1.3) < 1e-9 and abs(a["load_worst"] - 2.25) < 1e-9  # (2.0 + 2.5) / 2
    assert abs(a["drop_tail"] - 0.07) < 1e-9 and abs(b["eval_loss"] - 4.925) < 1e-9
    assert a["tokens_per_sec"] == 300.0  # median of the steps after the first
    assert runner.main(["compare", str(sweep_file), "--workdir", str(wd)]) == 0
    assert "drop_policy=position | 2 | 5.1000 ± 0.1000" in (wd / "compare.md").read_text()
    assert (wd / "plots" / "compare_load_imbalance.png").stat().st_size > 0

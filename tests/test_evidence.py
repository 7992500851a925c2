"""The evidence study (docs/results.md): its sweep files expand to the runs the docs describe, and
`python -m moe.scaling report` builds results.json from finished runs (a synthetic fixture: no training here)."""

import dataclasses
import json
import math

import pytest

from moe.config import apply_overrides, from_dict, read_preset
from moe.model.decoder import flops_per_token, param_counts
from moe.scaling import fit as sf
from moe.scaling import report as rp
from moe.scaling.runner import main
from moe.scaling.sweep import load_sweep

TOL = 1e-5


def _sweep(claim: str, role: str = "runs"):
    return load_sweep(rp.SWEEPS / rp.CLAIMS[claim][role])  # the whole file (a fit sweep: both designs' points)


def _cfg(sweep, point):
    return from_dict(apply_overrides(read_preset(sweep.base), list(point.overrides)))


def _flops(sweep, point) -> float:
    c = _cfg(sweep, point)
    return flops_per_token(c.model, c.train.seq_len) * c.train.steps * c.train.batch_size * c.train.seq_len


# --- the sweep files -----------------------------------------------------------------------------


def test_every_evidence_sweep_evaluates_on_the_full_validation_split():
    for files in rp.CLAIMS.values():
        for f in files.values():
            assert load_sweep(rp.SWEEPS / f).eval_full, f


def test_moe_vs_dense_ladder():
    s = _sweep("moe_vs_dense")
    assert len(s.points) == 24
    cfgs = [_cfg(s, p) for p in s.points]
    budgets = sorted({c.train.steps for c in cfgs})
    assert len(budgets) == 3 and budgets[-1] / budgets[0] >= 8
    for steps in budgets:
        at = [c for c in cfgs if c.train.steps == steps]
        assert sorted(c.model.num_experts for c in at) == [0, 0, 8, 8, 32, 32, 32, 32]
        assert sorted(c.model.router_z_loss_weight for c in at if c.model.num_experts == 32) == [0.0, 0.0, 1e-3, 1e-3]
        assert sorted(c.train.seed for c in at) == [0] * 4 + [1] * 4
        assert all(c.model.top_k == 2 for c in at if c.model.num_experts)
        fpt = [flops_per_token(c.model, c.train.seq_len) for c in at]
        assert max(fpt) / min(fpt) - 1 < 0.01  # equal active FLOPs per token (the router's are the difference)


def test_optimizer_grids_follow_chen_et_al():
    s = _sweep("lion_vs_adamw")
    cfgs = [_cfg(s, p) for p in s.points]
    assert len({c.train.steps for c in cfgs}) == 1
    for e in (0, 8):
        grid = {o: sorted((c.optim.lr, c.optim.weight_decay) for c in cfgs if c.model.num_experts == e and c.optim.name == o)
                for o in ("adamw", "lion")}
        assert len(grid["adamw"]) >= 4 and len(grid["lion"]) >= 4
        assert len({lr for lr, _ in grid["adamw"]}) >= 4 and len({lr for lr, _ in grid["lion"]}) >= 4
        within = lambda x: 3 * (1 - TOL) <= x <= 10 * (1 + TOL)  # noqa: E731 (Chen et al.'s 3-10x, float slack)
        for (lr_a, wd_a), (lr_l, wd_l) in zip(grid["adamw"], grid["lion"]):
            assert within(lr_a / lr_l), (lr_a, lr_l)
        assert all(within(wd_l / wd_a) for _, wd_l in grid["lion"] for _, wd_a in grid["adamw"])


@pytest.mark.parametrize("claim", rp.SCALING_CLAIMS)
def test_scaling_sweeps_and_held_out_runs(claim):
    fit, held = _sweep(claim, "fit"), _sweep(claim, "heldout")
    points = rp.claim_sweep(claim, "fit").points
    cfgs = [_cfg(fit, p) for p in points]
    assert len(points) >= 12 and len({c.model.d_model for c in cfgs}) >= 4 and len({c.train.steps for c in cfgs}) >= 3
    assert all((c.model.num_experts > 0) == ("moe" in claim) for c in cfgs)
    largest = max(_flops(fit, p) for p in points)
    assert len(held.points) >= 2
    assert all(_flops(held, p) >= 4 * largest for p in held.points)
    tokens = lambda s, p: _cfg(s, p).train.steps * _cfg(s, p).train.batch_size * _cfg(s, p).train.seq_len  # noqa: E731
    if claim.endswith("_1epoch"):  # no held-out run sees more tokens than the fit's largest budget
        assert max(tokens(held, p) for p in held.points) <= max(tokens(fit, p) for p in points)
    if claim.endswith("_pysrc"):  # the packages corpus; held out beyond the fit in N *and* D, at tokens per
        # parameter inside the fit's range
        assert {_cfg(s, p).data.source for s in (fit, held) for p in s.points} == {"packages"}
        n = lambda s, p: param_counts(_cfg(s, p).model)[1]  # noqa: E731 (active parameters)
        ratio = [tokens(fit, p) / n(fit, p) for p in points]
        for p in held.points:
            assert n(held, p) > max(n(fit, q) for q in points) and tokens(held, p) > max(tokens(fit, q) for q in points)
            assert min(ratio) <= tokens(held, p) / n(held, p) <= max(ratio)


def test_the_two_scaling_designs_share_their_fit_runs():
    for family in ("dense", "moe"):
        fit = _sweep(f"scaling_{family}", "fit")
        multi, one = (rp.claim_sweep(f"scaling_{family}{d}", "fit").points for d in ("", "_1epoch"))
        assert len(multi) == len(one) == 12 and len(set(multi) & set(one)) == 8
        assert set(multi) | set(one) == set(fit.points)


def test_lr_check_is_a_held_out_run_at_half_and_twice_the_lr():
    """evidence_heldout_lr.yaml (docs/results.md, claim 3) changes nothing of its held-out run but optim.lr."""
    check, held = load_sweep(rp.SWEEPS / "evidence_heldout_lr.yaml"), _sweep("scaling_dense_1epoch", "heldout")
    ref = next(_cfg(held, p) for p in held.points if _cfg(held, p).model.d_model == 224)
    lrs = []
    for p in check.points:
        c = _cfg(check, p)
        lrs.append(c.optim.lr / ref.optim.lr)
        assert c.model == ref.model and c.train == ref.train and dataclasses.replace(c.optim, lr=ref.optim.lr) == ref.optim
    assert sorted(lrs) == pytest.approx([0.5, 2.0], rel=TOL) and check.eval_full


def test_expert_count_sweep():
    s = _sweep("moe_law")
    cfgs = [_cfg(s, p) for p in s.points]
    assert sorted({c.model.num_experts for c in cfgs}) == [0, 4, 8, 16, 32]
    assert len({c.model.d_model for c in cfgs}) >= 2 and len(cfgs) == 10


def test_investigation_sweep():
    """One dense reference; 32 experts under each dispatch / balance setting named in docs/results.md; 8 both ways."""
    s = _sweep("investigation")
    cfgs = [_cfg(s, p) for p in s.points]
    assert [c.model.num_experts for c in cfgs].count(0) == 1 and {c.train.steps for c in cfgs} == {600}
    e32 = {(c.model.dispatch, c.model.capacity_factor if c.model.dispatch == "capacity" else None, c.model.aux_loss_weight,
            c.model.router_z_loss_weight, c.model.router_bias_update_rate) for c in cfgs if c.model.num_experts == 32}
    assert e32 == {("capacity", 1.25, 0.01, 1e-3, 0.0), ("capacity", 2.0, 0.01, 1e-3, 0.0), ("capacity", 1.25, 0.0, 1e-3, 1e-3),
                   ("dropless", None, 0.01, 1e-3, 0.0), ("dropless", None, 0.0, 1e-3, 0.0), ("dropless", None, 0.1, 1e-3, 0.0),
                   ("dropless", None, 0.01, 0.0, 0.0)}
    assert sorted(c.model.dispatch for c in cfgs if c.model.num_experts == 8) == ["capacity", "dropless"]


def test_expert_norms_per_expert_over_the_three_weights():
    import numpy as np

    from moe.eval.experts import expert_norms

    rng = np.random.default_rng(0)
    g = {"w_gate_EDF": rng.normal(size=(2, 4, 3, 5)), "w_up_EDF": rng.normal(size=(2, 4, 3, 5)),
         "w_down_EFD": rng.normal(size=(2, 4, 5, 3)), "w_router_DE": rng.normal(size=(2, 3, 4))}
    grads = {"blocks": {"moe": g}, "embed": rng.normal(size=(7, 3))}
    want = np.sqrt(sum(np.sum(g[k] ** 2, axis=(-2, -1)) for k in ("w_gate_EDF", "w_up_EDF", "w_down_EFD")))
    np.testing.assert_allclose(expert_norms(grads), want, rtol=TOL)
    with pytest.raises(ValueError, match="no MoE layer"):
        expert_norms({"embed": grads["embed"]})


# --- the report from a fixture of finished runs ----------------------------------------------------

LAW = {"E": 2.0, "A": 40.0, "B": 300.0, "alpha": 0.3, "beta": 0.35}
MOE_OFFSET = {0: 0.0, 8: -0.05, 32: -0.08}  # fixture: MoE variants this much below dense at every budget
LION_OFFSET = 0.02  # fixture: the best Lion run this much above the best AdamW run


def _fixture_loss(cfg, n_active, tokens) -> float:
    """LAW + the variant's offset + a bowl in log lr: AdamW's minimum at 3e-3 (every sweep's lr but the
    optimizer grid's), Lion's at 3e-4 and LION_OFFSET higher, with 4e-3 / 4e-4 the grids' nearest points."""
    base = float(sf.chinchilla_loss(LAW, n_active, tokens)) + MOE_OFFSET.get(cfg.model.num_experts, 0.0)
    if cfg.optim.name == "lion":
        return base + LION_OFFSET + 0.1 * math.log(cfg.optim.lr / 3e-4) ** 2
    return base + 0.1 * math.log(cfg.optim.lr / 3e-3) ** 2


def _write_fixture(root, *, skip: str = ""):
    """summary.json / point.json / eval_full.json for every point of every claim, losses from LAW."""
    for files in rp.CLAIMS.values():
        for f in files.values():
            s = load_sweep(rp.SWEEPS / f)
            for p in s.points:
                if p.name == skip:
                    continue
                c = _cfg(s, p)
                total, active = param_counts(c.model)
                tokens = c.train.steps * c.train.batch_size * c.train.seq_len
                d = root / s.name / p.name
                d.mkdir(parents=True, exist_ok=True)
                (d / "summary.json").write_text(json.dumps({
                    "done": True, "step": c.train.steps, "params_total": total, "params_active": active, "tokens": tokens,
                    "flops": flops_per_token(c.model, c.train.seq_len) * tokens, "eval_loss": 9.0, "wall_time_s": 1.0}))
                (d / "point.json").write_text(json.dumps({"status": "done", "attempt_cpu_s": 2.0}))
                (d / "eval_full.json").write_text(json.dumps({"loss": _fixture_loss(c, active, tokens), "eval_cpu_s": 1.0}))
                if s.name == "evidence_investigation" and c.model.num_experts:
                    _write_investigation_fixture(d, c)


def _fixture_drop(cfg) -> float:
    """Fixture: capacity runs drop 1 / capacity_factor - 0.5 of their assignments, dropless runs none."""
    return 1 / cfg.model.capacity_factor - 0.5 if cfg.model.dispatch == "capacity" else 0.0


def _write_investigation_fixture(d, cfg):
    e = cfg.model.num_experts
    (d / "metrics.jsonl").write_text("".join(json.dumps(
        {"step": step, "loss": 5.0, "tokens_per_sec": 1.0, "drop_fraction": _fixture_drop(cfg) * f,
         "load_imbalance": [1 + f, 2 * f], "router_entropy": 3.0, "aux_loss": 1.0, "grad_norm": 0.5}) + "\n"
        for step, f in ((25, 2.0), (600, 1.0))))
    grad = [[1.0] * (e - 1) + [3.0]]
    (d / rp.EXPERTS_FILE).write_text(json.dumps({
        "step": 600, "drop_fraction": _fixture_drop(cfg), "grad_norm": grad, "load": [[1 / e] * e],
        "grad_norm_max_over_mean": 3.0 * e / (e + 2), "grad_norm_min_over_mean": e / (e + 2), "load_max_over_mean": 1.0,
        "experts_without_gradient": 0}))


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    root = tmp_path_factory.mktemp("sweeps")
    _write_fixture(root)
    out = root / "results.json"
    assert main(["report", "--workdir", str(root), "--out", str(out), "--plots", str(root / "plots"), "--bootstrap", "0"]) == 0
    return json.loads(out.read_text()), root


def test_report_headline_numbers(report):
    res, root = report
    h = res["headline"]
    for v, off in (("e8", MOE_OFFSET[8]), ("e32", MOE_OFFSET[32]), ("e32-z0", MOE_OFFSET[32])):
        assert len(h["moe_minus_dense"][v]) == 3
        for got in h["moe_minus_dense"][v]:  # the fixture's law differs between variants only through N_active
            assert abs(got - off) < 0.01
    assert res["claims"]["moe_vs_dense"]["met_at_two_largest_budgets"] == {"e8": True, "e32": True, "e32-z0": True}
    opt = res["claims"]["lion_vs_adamw"]
    for model in ("dense", "e8"):
        assert opt["models"][model]["lion"]["best"]["lr"] == pytest.approx(4e-4)
        assert opt["models"][model]["adamw"]["best"]["lr"] == pytest.approx(4e-3)
        assert not opt["models"][model]["lion"]["best_at_grid_edge"]
    assert h["lion_minus_adamw"] == pytest.approx({"dense": LION_OFFSET, "e8": LION_OFFSET}, abs=TOL)
    for fam in rp.SCALING_CLAIMS:  # runs on the exact law: the fit predicts the held-out runs
        c = res["claims"][fam]
        assert len(c["heldout"]) == len(load_sweep(rp.SWEEPS / rp.CLAIMS[fam]["heldout"]).points) >= 2
        assert all(x["compute_vs_largest_fitted"] >= 4 for x in c["heldout"])
        assert all(abs(e) < 1e-3 for e in h["prediction_error"][fam].values())
        assert c["fit"]["params"]["alpha"] == pytest.approx(LAW["alpha"], abs=0.01)
    assert res["claims"]["moe_law"]["fit"]["n_points"] == 10
    pinned = read_preset(rp.REPO / "configs" / "micro_pysrc.yaml")["data"]["packages"]
    assert [res["claims"][f"scaling_{f}_pysrc"]["corpus"]["packages"] for f in ("dense", "moe")] == [pinned, pinned]
    assert res["claims"]["moe_vs_dense"]["corpus"] == {"source": "builtin", "validation_fraction": 0.05}
    runs = {(r["sweep"], r["name"]) for c in res["claims"].values() for r in c["runs"] + c.get("heldout_runs", [])}
    n_points = sum(len(load_sweep(rp.SWEEPS / f).points) for f in {f for fs in rp.CLAIMS.values() for f in fs.values()})
    assert len(runs) == n_points  # a fit run two designs share is counted once
    assert res["cpu_hours_total"] == pytest.approx(len(runs) * 3.0 / 3600, rel=TOL)
    assert sorted(p.name for p in (root / "plots").iterdir()) == sorted(
        ["moe_vs_dense.png", "lion_vs_adamw.png", *(f"{f}.png" for f in rp.SCALING_CLAIMS), "moe_law.png",
         "investigation.png"])


def test_report_investigation(report):
    """Each run against the one dense reference; MoE runs carry their logged curves and expert diagnostics."""
    res, _ = report
    inv, s = res["claims"]["investigation"], _sweep("investigation")
    assert [r["name"] for r in inv["runs"]] == [p.name for p in s.points]
    dense = inv["dense_loss"]
    for r, p in zip(inv["runs"], s.points):
        c = _cfg(s, p)
        assert r["vs_dense"] == pytest.approx(r["eval_loss"] - dense, abs=TOL)
        assert res["headline"]["investigation_vs_dense"][r["name"]] == pytest.approx(r["vs_dense"], abs=TOL)
        if not c.model.num_experts:
            assert r["vs_dense"] == 0 and "curves" not in r
            continue
        (s0, d0), (s1, d1) = r["curves"]["drop_fraction"]
        assert (s0, s1) == (25, 600) and d0 == pytest.approx(2 * _fixture_drop(c)) and d1 == pytest.approx(_fixture_drop(c))
        assert r["curves"]["load_imbalance"] == [[25, 4.0], [600, 2.0]]  # the worst layer of each step
        assert r["experts"]["drop_fraction"] == pytest.approx(_fixture_drop(c))
        assert len(r["experts"]["grad_norm"][0]) == c.model.num_experts


def test_report_runs_carry_their_overrides(report):
    res, _ = report
    s = _sweep("moe_vs_dense")
    runs = res["claims"]["moe_vs_dense"]["runs"]
    assert [r["name"] for r in runs] == [p.name for p in s.points]
    assert [r["overrides"] for r in runs] == [dict(o.split("=", 1) for o in p.overrides) for p in s.points]
    assert all(r["eval_split"] == "full" for r in runs)


def test_a_partial_report_keeps_the_other_claims_and_refreshes_what_the_repo_defines(report):
    """--claim X rebuilds X from its runs; the other claims keep their runs and figures from results.json, with
    their corpus, sweeps and command brought up to date from the repo; a claim CLAIMS no longer names is dropped."""
    res, root = report
    old = json.loads(json.dumps(res))
    for k in ("corpus", "sweeps", "commands"):
        del old["claims"]["moe_vs_dense"][k]
    old["claims"]["moe_vs_dense"]["dense_loss_marker"] = 1.5  # a figure only the runs could have given
    old["claims"]["retired_claim"] = {"runs": [], "cpu_s": 1e6}
    out = root / "partial.json"
    out.write_text(json.dumps(old))
    assert main(["report", "--claim", "lion_vs_adamw", "--workdir", str(root), "--out", str(out), "--plots", "",
                 "--bootstrap", "0"]) == 0
    new = json.loads(out.read_text())
    assert sorted(new["claims"]) == sorted(rp.CLAIMS)
    assert new["claims"]["moe_vs_dense"] == res["claims"]["moe_vs_dense"] | {"dense_loss_marker": 1.5}
    assert new["claims"]["lion_vs_adamw"] == res["claims"]["lion_vs_adamw"]
    assert new["cpu_hours_total"] == pytest.approx(res["cpu_hours_total"], rel=TOL)


def test_report_refuses_a_claim_with_unfinished_runs(tmp_path, capsys):
    missing = _sweep("lion_vs_adamw").points[3].name
    _write_fixture(tmp_path, skip=missing)
    rc = main(["report", "--claim", "lion_vs_adamw", "--workdir", str(tmp_path), "--out", str(tmp_path / "r.json"),
               "--plots", ""])
    err = capsys.readouterr().err
    assert rc == 2 and "1 of 24 points not done" in err and missing in err and "evidence_optim.yaml" in err
    assert not (tmp_path / "r.json").exists()


def test_docs_results_json_matches_the_sweeps():
    """docs/results.json lists exactly the runs the sweep files expand to (once the study has been reported)."""
    path = rp.REPO / "docs" / "results.json"
    res = json.loads(path.read_text())
    for name, c in res["claims"].items():
        files = rp.CLAIMS[name]
        if "runs" in files:
            assert [r["name"] for r in c["runs"]] == [p.name for p in load_sweep(rp.SWEEPS / files["runs"]).points]
        else:
            assert [r["name"] for r in c["runs"]] == [p.name for p in rp.claim_sweep(name, "fit").points]
            assert [r["name"] for r in c["heldout_runs"]] == [p.name for p in load_sweep(rp.SWEEPS / files["heldout"]).points]
        assert all(r["eval_split"] == "full" for r in c["runs"])
        assert c["corpus"] == rp.corpus(name)
    assert sorted(res["claims"]) == sorted(rp.CLAIMS)


# --- investigation: the MoE training path ---------------------------------------------------------


def test_one_expert_top1_trains_exactly_like_dense():
    """E=1, top-1, MoE in every layer, balance and z losses off, given the dense model's weights: 4 AdamW
    steps give the dense model's losses and weights (the router's gate is 1 and gets no gradient)."""
    import jax
    import numpy as np

    from moe.config import load_config
    from moe.runtime.sharding import make_mesh
    from moe.train import steps as train_steps
    from tests.test_sharding import SMALL, _batch

    common = SMALL[:-1] + ["mesh.data=1", "train.steps=4", "optim.warmup_steps=1"]
    setups = {}
    for name, ov in (("dense", ["model.num_experts=0"]),
                     ("e1", ["model.num_experts=1", "model.top_k=1", "model.moe_every=1", "model.aux_loss_weight=0",
                             "model.router_z_loss_weight=0", "model.capacity_factor=1.0"])):
        cfg = load_config("configs/tiny.yaml", common + ov)
        setups[name] = train_steps.build(cfg, make_mesh(cfg.mesh, jax.devices()[:1]))
    dense = train_steps.init_state(setups["dense"])
    moe = train_steps.init_state(setups["e1"])
    p = jax.device_get(moe["params"])
    ffn = jax.device_get(dense["params"])["blocks"]["layers"][0]["ffn"]
    layer = p["blocks"]["layers"][0]
    layer["ffn"] = {**layer["ffn"], "w_gate_EDF": ffn["w_gate_DF"][:, None], "w_up_EDF": ffn["w_up_DF"][:, None],
                    "w_down_EFD": ffn["w_down_FD"][:, None]}
    for k in ("attn", "attn_norm", "ffn_norm"):
        layer[k] = jax.device_get(dense["params"])["blocks"]["layers"][0][k]
    p["embed"], p["final_norm"] = (jax.device_get(dense["params"])[k] for k in ("embed", "final_norm"))
    moe = dict(moe, params=p, opt_state=train_steps.fresh_opt_state(setups["e1"], p),
               rng=jax.numpy.array(np.asarray(dense["rng"])))  # a copy: the dense steps donate their state
    losses = {}
    for name, state in (("dense", dense), ("e1", moe)):
        step = train_steps.make_train_step(setups[name])
        out = []
        for i in range(4):
            state, m = step(state, train_steps.device_batch(setups[name], _batch(i)))
            out.append(float(m["loss"]))
        losses[name] = (out, jax.device_get(state["params"]))
    np.testing.assert_allclose(losses["e1"][0], losses["dense"][0], rtol=1e-4)
    got = losses["e1"][1]["blocks"]["layers"][0]["ffn"]
    want = losses["dense"][1]["blocks"]["layers"][0]["ffn"]
    np.testing.assert_allclose(got["w_gate_EDF"][:, 0], want["w_gate_DF"], rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(got["w_down_EFD"][:, 0], want["w_down_FD"], rtol=1e-4, atol=1e-6)
    assert losses["e1"][0][0] != losses["e1"][0][-1]  # it trained

"""moe.lm_eval_adapter: the `moe` model in lm-evaluation-harness agrees with moe.eval.lm and a direct forward
pass, and custom tasks from local YAML + JSONL run end to end through simple_evaluate (offline)."""

from __future__ import annotations

import os

import numpy as np
import pytest
from lm_eval.api.instance import Instance

from moe.eval import lm as eval_lm
from moe.eval import tasks
from moe.lm_eval_adapter import MoeLM
from test_eval import STRINGS, direct_loglik

ROOT = os.path.join(os.path.dirname(__file__), "..")


@pytest.fixture(scope="module")
def lm(eval_workdir):
    return MoeLM(workdir=eval_workdir, batch_size="8")


def requests(kind, args):
    return [Instance(request_type=kind, doc={}, arguments=a, idx=i) for i, a in enumerate(args)]


def test_registered():
    from lm_eval.api.registry import get_model

    assert get_model("moe") is MoeLM


def test_loglikelihood_matches_eval_lib_and_forward(lm):
    out = lm.loglikelihood(requests("loglikelihood", STRINGS))
    lm1 = MoeLM(run=lm.run, batch_size=1)
    out1 = lm1.loglikelihood(requests("loglikelihood", STRINGS))
    ours = eval_lm.score(lm.run, [tasks.encode_pair(lm.run.tok, c, k) for c, k in STRINGS])
    for (c, k), (ll, g), (ll1, g1), (ll_e, g_e) in zip(STRINGS, out, out1, ours):
        ctx, cont = tasks.encode_pair(lm.run.tok, c, k)
        ref = direct_loglik(lm.run, ctx, cont)
        np.testing.assert_allclose([ll, ll1, ll_e], ref, rtol=1e-4, atol=1e-4)
        assert g == g1 == g_e


def test_loglikelihood_rolling_matches_windows(lm):
    text = open(os.path.join(ROOT, "moe", "model", "generate.py")).read()[:700]
    (total,) = lm.loglikelihood_rolling(requests("loglikelihood_rolling", [(text,)]))
    ids = lm.run.tok.encode(text)
    assert len(ids) > lm.run.cfg.train.seq_len  # several windows
    windows = eval_lm.rolling_windows(ids, lm.run.tok.bos_id, lm.run.cfg.train.seq_len)
    assert [t for _, cont in windows for t in cont] == ids  # every token predicted exactly once
    ref = sum(direct_loglik(lm.run, ctx, cont) for ctx, cont in windows)
    np.testing.assert_allclose(total, ref, rtol=1e-5)


def test_generate_until_matches_generator(lm):
    out = lm.generate_until(requests("generate_until", [("import os\nimport", {"until": ["\n"], "max_gen_toks": 8}),
                                                        ("class A", {"until": ["("], "max_gen_toks": 5})]))
    gen = lm.run.generator()
    assert out[0] == gen.generate(lm.run.tok, ["import os\nimport"], 8, stop=["\n"])[0]
    assert out[1] == gen.generate(lm.run.tok, ["class A"], 5, stop=["("])[0]


def test_simple_evaluate_custom_tasks(lm, monkeypatch):
    import lm_eval
    from lm_eval.tasks import TaskManager

    monkeypatch.chdir(ROOT)  # the task YAMLs name their JSONL files relative to the repo root
    tm = TaskManager(include_path=os.path.join(ROOT, "tests", "data", "lm_eval_tasks"))
    res = lm_eval.simple_evaluate(model=lm, tasks=["moe_python_keywords", "moe_python_completion"], task_manager=tm)
    acc = res["results"]["moe_python_keywords"]["acc,none"]
    mc = tasks.run_task(lm.run, tasks.load_task(os.path.join(ROOT, "tests", "data", "tasks", "python_keywords.jsonl")))
    assert acc == pytest.approx(mc["accuracy"])  # same prompts and choices as our own task runner
    assert 0.0 <= res["results"]["moe_python_completion"]["exact_match,none"] <= 1.0


def test_bad_model_args():
    with pytest.raises(eval_lm.EvalError, match="workdir"):
        MoeLM()


MERGES = [("return self.", "_x"), ("x = self.", "__dict__"), ("if x =", "= 1"), ("except Key", "Error:"),
          ("import", "lib")]


def test_pairs_whose_tokens_merge_across_the_boundary_are_resplit_and_counted(lm):
    """lm-eval cuts encode(context + continuation) at len(encode(context)); a BPE piece spanning the boundary
    (`._` in `return self._x`) made that continuation empty (a crash) or shifted. split_pair re-splits at
    the last shared token boundary and scores the merged piece as part of the continuation."""
    tok = lm.run.tok
    for c, k in MERGES:
        ctx, cont, merged = tasks.split_pair(tok, c, k)
        assert merged and cont and ctx[1:] + cont == tok.encode(c + k), (c, k)
    lm.boundary_merges = 0
    out = lm.loglikelihood(requests("loglikelihood", MERGES))
    assert lm.boundary_merges == len(MERGES)
    for (c, k), (ll, _) in zip(MERGES, out):
        ctx, cont = tasks.encode_pair(tok, c, k)
        np.testing.assert_allclose(ll, direct_loglik(lm.run, ctx, cont), rtol=1e-4, atol=1e-4)


def test_multiple_choice_task_with_boundary_merges_scores_and_counts_them(lm, monkeypatch):
    import lm_eval
    from lm_eval.tasks import TaskManager

    monkeypatch.chdir(ROOT)
    tm = TaskManager(include_path=os.path.join(ROOT, "tests", "data", "lm_eval_tasks"))
    lm.boundary_merges = 0
    res = lm_eval.simple_evaluate(model=lm, tasks=["moe_python_merges"], task_manager=tm)
    mc = tasks.run_task(lm.run, tasks.load_task(os.path.join(ROOT, "tests", "data", "tasks", "python_merges.jsonl")))
    assert res["results"]["moe_python_merges"]["acc,none"] == pytest.approx(mc["accuracy"])
    assert lm.boundary_merges > 0
    print(f"\nlm-eval multiple choice with boundary merges: scored, {lm.boundary_merges} pairs re-split")

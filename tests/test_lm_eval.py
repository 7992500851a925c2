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

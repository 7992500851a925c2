"""eval.py / moe.eval.lm / moe.eval.tasks: scores against a direct forward pass, padding and mesh invariance,
LM metrics vs rolling log-likelihood, tasks (trained beats untrained), --all curve, and clear errors on bad input."""

from __future__ import annotations

import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moe.eval import lm as eval_lm
from moe.eval import tasks
from moe.train import steps as train_steps

TASKS = os.path.join(os.path.dirname(__file__), "data", "tasks")
STRINGS = [("def f(x):\n    ", "return x"), ("import os\nimport", " sys"), ("for i in", " range(10):"),
           ("class A", "(object):\n    pass"), ("    if x is", " None"), ("x", " = 1")]


@pytest.fixture(scope="module")
def run(eval_workdir):
    return eval_lm.load_run(eval_workdir, batch_size=8)


def direct_loglik(run, ctx, cont) -> float:
    """Reference: one unpadded forward pass of the whole sequence, summed log-softmax at the targets."""
    ids = jnp.asarray([ctx + cont])
    logits, _ = run.model(ids[:, :-1], train=False)
    logp = np.asarray(jax.nn.log_softmax(logits[0], axis=-1))
    return float(sum(logp[len(ctx) - 1 + j, t] for j, t in enumerate(cont)))


def test_scores_equal_direct_forward_and_batch_size(run):
    pairs = [tasks.encode_pair(run.tok, c, k) for c, k in STRINGS]
    by8 = eval_lm.score(run, pairs, batch_size=8)
    by1 = eval_lm.score(run, pairs, batch_size=1)
    for (ctx, cont), (ll8, g8), (ll1, g1) in zip(pairs, by8, by1):
        ref = direct_loglik(run, ctx, cont)
        np.testing.assert_allclose(ll8, ref, rtol=1e-4, atol=1e-4)
        np.testing.assert_allclose(ll1, ref, rtol=1e-4, atol=1e-4)
        assert g8 == g1


def test_greedy_flag_matches_argmax(run):
    ctx = [run.tok.bos_id] + run.tok.encode("import os\nimport")
    logits, _ = run.model(jnp.asarray([ctx]), train=False)
    best = int(jnp.argmax(logits[0, -1]))
    other = (best + 1) % run.tok.vocab_size
    (_, g_best), (_, g_other) = eval_lm.score(run, [(ctx, [best]), (ctx, [other])])
    assert g_best and not g_other


def test_mesh_invariance(run):
    """Single device vs the 8-device data mesh: same scores."""
    mesh1 = jax.sharding.Mesh(np.asarray(jax.devices()[:1]).reshape(1, 1, 1, 1), ("data", "fsdp", "expert", "tensor"))
    setup1 = train_steps.build(run.cfg, mesh1)
    one = eval_lm.restore(eval_lm.Run(run.workdir, run.cfg, run.tok, setup1, None, -1), run.step)
    assert run.batch_ways == 8 and one.batch_ways == 1
    pairs = [tasks.encode_pair(run.tok, c, k) for c, k in STRINGS]
    np.testing.assert_allclose([s for s, _ in eval_lm.score(one, pairs)], [s for s, _ in eval_lm.score(run, pairs)],
                               rtol=1e-4, atol=1e-4)


def test_lm_metrics_equal_rolling_loglikelihood(eval_workdir, tmp_path):
    """eval.py's perplexity over a split == rolling log-likelihood of the same documents (+ their EOS terms):
    packed rows, documents longer than seq_len (several windows) and padding are all counted exactly once."""
    root = os.path.join(os.path.dirname(__file__), "..", "moe")
    docs = [open(os.path.join(root, name)).read()[:n]
            for name, n in (("model/generate.py", 900), ("eval/lm.py", 350), ("config.py", 400),
                            ("data/pipeline.py", 300), ("model/decoder.py", 700), ("model/layers.py", 500))]
    data = tmp_path / "docs.jsonl"
    data.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    over = ["data.source=files", f"data.files={data}", "data.validation_fraction=0.5", f"data.data_dir={tmp_path}"]
    run = eval_lm.load_run(eval_workdir, batch_size=8, overrides=over)
    lm = eval_lm.evaluate_lm(run, "validation")
    from moe.data.corpus import open_corpus

    corpus = open_corpus(run.cfg)
    src = corpus.source("validation")
    texts = [corpus.text(src[i]) for i in range(len(src))]
    ids = [run.tok.encode(t) for t in texts]
    assert any(len(i) + 1 > run.cfg.train.seq_len for i in ids), "want a document spanning several windows"
    rolling = eval_lm.loglikelihood_rolling(run, ids)
    # the last piece of a document holds at most seq_len tokens before EOS: same context as in the pipeline
    pieces_ctx = [[run.tok.bos_id, *i][((len(i)) // run.cfg.train.seq_len) * run.cfg.train.seq_len:] for i in ids]
    eos = eval_lm.score(run, [(c, [run.tok.eos_id]) for c in pieces_ctx])
    total = -(sum(rolling) + sum(ll for ll, _ in eos))
    assert lm["tokens"] == sum(len(i) + 1 for i in ids)
    np.testing.assert_allclose(lm["loss_sum"], total, rtol=1e-5)
    np.testing.assert_allclose(lm["perplexity"], np.exp(total / lm["tokens"]), rtol=1e-5)
    assert lm["bits_per_byte"] > 0


def test_trained_beats_untrained_on_keywords(run):
    task = tasks.load_task(os.path.join(TASKS, "python_keywords.jsonl"))
    untrained = eval_lm.with_params(run, train_steps.init_state(run.setup)["params"])
    trained = tasks.run_task(run, task, 0)["accuracy"]
    chance = tasks.run_task(untrained, task, 0)["accuracy"]
    assert trained >= chance + 0.3, (trained, chance)


def test_completion_exact_match(run, tmp_path):
    """Exact match scores 1 for the model's own greedy completion and 0 for another answer."""
    gen = run.generator()
    contexts = ["import os\nimport", "    def __init__(self"]
    outs = gen.generate(run.tok, contexts, 6, stop=["\n"])
    right = tmp_path / "right.jsonl"
    right.write_text("".join(json.dumps({"context": c, "answer": o + "\n"}) + "\n"
                             for c, o in zip(contexts, outs) if o.strip()))
    wrong = tmp_path / "wrong.jsonl"
    wrong.write_text("".join(json.dumps({"context": c, "answer": "zzz_not_this"}) + "\n" for c in contexts))
    if right.read_text():
        assert tasks.run_task(run, tasks.load_task(right))["accuracy"] == 1.0
    assert tasks.run_task(run, tasks.load_task(wrong))["accuracy"] == 0.0


def test_few_shot_prompt_is_fixed_by_seed():
    task = tasks.load_task(os.path.join(TASKS, "python_keywords.jsonl"))
    a, b = tasks.few_shot_prompt(task, 3, 2, seed=7), tasks.few_shot_prompt(task, 3, 2, seed=7)
    assert a == b and a.endswith(task.examples[3]["context"]) and a.count(tasks.SHOT_SEPARATOR) == 2
    assert tasks.few_shot_prompt(task, 3, 0, seed=7) == task.examples[3]["context"]


def test_cli_all_curve_and_json(eval_workdir, tmp_path, capsys):
    import eval as eval_cli

    out = tmp_path / "res" / "all.json"
    rc = eval_cli.main(["--workdir", eval_workdir, "--all", "--max_batches", "1", "--tasks",
                        os.path.join(TASKS, "python_keywords.jsonl"), "--out", str(out)])
    assert rc == 0
    rows = json.loads(out.read_text())
    assert [r["step"] for r in rows] == [30, 60]
    for r in rows:
        assert {"loss", "perplexity", "bits_per_byte", "tokens"} <= set(r)
        assert 0 <= r["tasks"]["python_keywords/0-shot"]["accuracy"] <= 1
    curve = [json.loads(line) for line in (tmp_path / "res" / "curve.jsonl").read_text().splitlines()]
    assert [r["step"] for r in curve] == [30, 60]
    assert (tmp_path / "res" / "curve.png").stat().st_size > 1000
    assert "bits/byte" in capsys.readouterr().out


@pytest.mark.parametrize("case", ["missing_workdir", "no_checkpoints", "no_tokenizer", "bad_step"])
def test_bad_run_input_is_a_clear_error(eval_workdir, tmp_path, case):
    wd = tmp_path / "wd"
    if case != "missing_workdir":
        wd.mkdir()
        shutil.copy(os.path.join(eval_workdir, "config.yaml"), wd)
        if case != "no_tokenizer":
            shutil.copy(os.path.join(eval_workdir, "tokenizer.model"), wd)
        if case != "no_checkpoints":
            os.symlink(os.path.join(eval_workdir, "checkpoints"), wd / "checkpoints")
    message = {"missing_workdir": "does not exist", "no_checkpoints": "no checkpoints",
               "no_tokenizer": "tokenizer", "bad_step": "step 7 not in"}[case]
    with pytest.raises(eval_lm.EvalError, match=message):
        eval_lm.load_run(str(wd), 7 if case == "bad_step" else None)
    import eval as eval_cli

    assert eval_cli.main(["--workdir", str(wd)] + (["--step", "7"] if case == "bad_step" else [])) == 2


@pytest.mark.parametrize("text,message", [
    ('{"context": "a", "choices": ["b", "c"], "answer": 0}\nnot json\n', r"bad\.jsonl:2: not valid JSON"),
    ('{"context": "a", "choices": ["b"], "answer": 0}\n', "at least 2"),
    ('{"context": "a", "choices": ["b", "c"], "answer": 5}\n', "index of the right choice"),
    ('{"choices": ["b", "c"], "answer": 0}\n', "string 'context'"),
    ('{"context": "a"}\n', "need 'choices'"),
    ('{"context": "a", "answer": "b"}\n{"context": "a", "choices": ["b", "c"], "answer": 0}\n', "mixes"),
    ("\n", "no examples"),
])
def test_malformed_task_file(tmp_path, text, message):
    path = tmp_path / "bad.jsonl"
    path.write_text(text)
    with pytest.raises(eval_lm.EvalError, match=message):
        tasks.load_task(path)


def test_in_training_eval_equals_eval_py(eval_workdir):
    """One rule for both (README, Evaluation): the eval_loss training logged at its last step is the loss eval.py
    reports for that checkpoint over the same number of batches of the same split."""
    from moe.train.metrics import read_metrics

    logged = [r for r in read_metrics(eval_workdir) if "eval_loss" in r][-1]
    run = eval_lm.load_run(eval_workdir, logged["step"])
    res = eval_lm.evaluate_lm(run, max_batches=run.cfg.train.eval_batches)
    assert res["tokens"] == logged["eval_tokens"]
    assert res["loss"] == pytest.approx(logged["eval_loss"], rel=1e-4)

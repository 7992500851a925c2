"""moe.model.generate: KV-cache decoding equals argmax decoding without a cache; sampling rule; stop strings."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from moe.eval import lm as eval_lm
from moe.model import generate


@pytest.fixture(scope="module")
def run(eval_workdir):
    return eval_lm.load_run(eval_workdir, batch_size=8)


def argmax_no_cache(run, prompt: list[int], n: int) -> list[int]:
    """Reference: the full forward pass over the whole sequence for every new token (no cache). The sequence
    sits right-padded in a fixed buffer (segment id 0 = padding) so one compilation serves every step."""
    length = len(prompt) + n
    forward = jax.jit(lambda p, ids, seg: nnx.merge(run.setup.graphdef, p)(ids, None, seg, train=False)[0])
    ids = list(prompt)
    for _ in range(n):
        buf = np.zeros((1, length), np.int32)
        buf[0, : len(ids)] = ids
        seg = (np.arange(length) < len(ids)).astype(np.int32)[None]
        logits = forward(run.params, buf, seg)
        ids.append(int(jnp.argmax(logits[0, len(ids) - 1])))
    return ids[len(prompt):]


def test_greedy_with_cache_equals_argmax_without_cache(run):
    """Prompts of different lengths in one batch (left padding, per-row positions), 12 new tokens each."""
    tok = run.tok
    prompts = [[tok.bos_id] + tok.encode(t) for t in ("import os\nimport", "def f(x):\n    return x + 1\n\n\nclass")]
    got = run.generator().generate_ids(prompts, 12)
    eos = tok.eos_id
    for p, g in zip(prompts, got):
        ref = argmax_no_cache(run, p, 12)
        ref = ref[: ref.index(eos)] if eos in ref else ref
        assert g == ref


def test_cached_logits_equal_full_forward(run):
    """Prefill a prompt in two chunks through the cache: logits match the uncached forward pass."""
    tok = run.tok
    ids = [tok.bos_id] + tok.encode("for i in range(10):\n    print(i)\n")
    full, _ = run.model(jnp.asarray([ids]), train=False)
    cache = generate.init_cache(run.cfg.model, 1, 32)
    valid = jnp.ones((1, 32), bool)
    pos = jnp.arange(len(ids))[None]
    half = len(ids) // 2
    a, cache = generate.decode_step(run.model, jnp.asarray([ids[:half]]), pos[:, :half], cache, 0, valid)
    b, cache = generate.decode_step(run.model, jnp.asarray([ids[half:]]), pos[:, half:], cache, half, valid)
    np.testing.assert_allclose(np.concatenate([a, b], axis=1), full, rtol=1e-4, atol=1e-4)


def test_stop_strings_and_max_tokens(run):
    gen = run.generator()
    free = gen.generate(run.tok, ["import os\n"], 20)[0]
    assert len(run.tok.encode(free)) <= 20
    cut = free[1:4]  # a stop string that occurs in the free-running output
    stopped = gen.generate(run.tok, ["import os\n"], 20, stop=[cut])[0]
    assert stopped == free[: free.index(cut)]


def test_sampling_rule():
    logits = jnp.log(jnp.asarray([[0.5, 0.3, 0.15, 0.05]]))
    keys = jax.random.split(jax.random.key(0), 400)
    draw = lambda t, p: np.asarray([int(generate.sample(logits, k, t, p)[0]) for k in keys[:200]])  # noqa: E731
    assert int(generate.sample(logits, keys[0], 0.0, 1.0)[0]) == 0
    assert set(draw(1.0, 0.7)) == {0, 1}  # 0.5 < 0.7 <= 0.8: the nucleus is the top two tokens
    assert set(draw(1.0, 0.5)) == {0}
    assert set(draw(1.0, 1.0)) >= {0, 1, 2}

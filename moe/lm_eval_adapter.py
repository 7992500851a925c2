"""Our checkpoints as an EleutherAI lm-evaluation-harness model, registered as `moe`.

    import moe.lm_eval_adapter  # registers the model
    lm_eval.simple_evaluate(model="moe", model_args="workdir=runs/tiny,step=300,batch_size=8", tasks=[...])

Owns: the translation between lm-eval's requests and moe/eval/lm.py (scoring) and moe/model/generate.py
(decoding). Every number comes from those modules, so the adapter, eval.py and a direct forward pass agree
(tested). Requests are batched and right-padded by `moe.eval.lm.score`; BOS starts every context, as it starts
every training document.
"""

from __future__ import annotations

from typing import Any

from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from tqdm import tqdm

from moe.eval import lm as eval_lm
from moe.eval.tasks import split_pair


@register_model("moe")
class MoeLM(TemplateLM):
    """model_args: workdir=DIR[,step=N][,batch_size=B][,max_length=T]; or pass a restored `run=` (eval.py)."""

    def __init__(self, workdir: str | None = None, step: int | str | None = None, batch_size: int | str = 8,
                 max_length: int | str | None = None, run: eval_lm.Run | None = None, **_lm_eval_extras: Any):
        super().__init__()
        # lm-eval also passes device / max_batch_size: meaningless here (jax places the work), ignored.
        if run is None:
            if not workdir:
                raise eval_lm.EvalError("model_args needs workdir=DIR (a training run's workdir)")
            run = eval_lm.load_run(str(workdir), None if step in (None, "") else int(step))
        self.run = run
        self.batch_size = 8 if str(batch_size).startswith("auto") else int(batch_size)
        self.max_length = int(max_length) if max_length else run.cfg.train.seq_len
        self.boundary_merges = 0  # (context, continuation) pairs re-split because BPE merged across them

    # --- tokenization ----------------------------------------------------------------------------

    @property
    def eot_token_id(self) -> int:
        return self.run.tok.eos_id

    @property
    def prefix_token_id(self) -> int:
        return self.run.tok.bos_id

    @property
    def tokenizer_name(self) -> str:
        return self.run.tok.path

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        return self.run.tok.encode(string)

    def tok_decode(self, ids: list[int]) -> str:
        return self.run.tok.decode(ids)

    # --- requests ----------------------------------------------------------------------------------

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        """lm-eval's token split (`TemplateLM._encode_pair`) cuts encode(context + continuation) at
        len(encode(context)); when BPE merges across that boundary the continuation comes out shifted or
        empty. Pairs whose strings are known are re-split by `moe.eval.tasks.split_pair` (our task runner's
        rule); `boundary_merges` counts how often a merge moved the boundary."""
        bos = self.prefix_token_id
        pairs = []
        for key, ctx, cont in requests:
            if isinstance(key, tuple) and len(key) == 2 and all(isinstance(k, str) for k in key):
                ctx, cont, merged = split_pair(self.run.tok, *key)
                self.boundary_merges += merged
            pairs.append((ctx if ctx[:1] == [bos] else [bos, *ctx], cont))
        out = eval_lm.score(self.run, pairs, self.batch_size, self.max_length)
        for (key, _, _), res in zip(requests, out):
            self.cache_hook.add_partial("loglikelihood", key, res)
        return out

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """Total log-likelihood of each document over disjoint windows (see moe.eval.lm.rolling_windows)."""
        texts = [req.args[0] for req in requests]
        docs = [self.tok_encode(t) for t in tqdm(texts, desc="tokenizing", disable=disable_tqdm)]
        out = eval_lm.loglikelihood_rolling(self.run, docs, self.batch_size)
        for text, res in zip(texts, out):
            self.cache_hook.add_partial("loglikelihood_rolling", (text,), res)
        return out

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Greedy (or sampled, with do_sample/temperature/top_p) continuations, cut at `until` strings."""
        gen = self.run.generator()
        out: list[str | None] = [None] * len(requests)
        groups: dict[str, list[int]] = {}  # requests decoded together share their generation settings
        for i, req in enumerate(requests):
            groups.setdefault(repr(sorted(req.args[1].items(), key=lambda kv: kv[0])), []).append(i)
        for idx in groups.values():
            kw = dict(requests[idx[0]].args[1])
            until = kw.get("until", [self.tok_decode([self.eot_token_id])])
            until = [until] if isinstance(until, str) else list(until)
            max_tokens = int(kw.get("max_gen_toks", 256))
            temperature = float(kw.get("temperature", 0.0)) if kw.get("do_sample", False) else 0.0
            top_p = float(kw.get("top_p", 1.0) or 1.0)
            for s in tqdm(range(0, len(idx), self.batch_size), desc="generating", disable=disable_tqdm):
                chunk = idx[s : s + self.batch_size]
                # keep the newest context tokens so prompt + generation fit the trained length
                keep = max(self.max_length - max_tokens, 1)
                prompts = [self.tok_decode(self.tok_encode(requests[i].args[0])[-keep:]) for i in chunk]
                texts = gen.generate(self.run.tok, prompts, max_tokens, temperature=temperature, top_p=top_p,
                                     stop=until, seed=int(kw.get("seed", 0) or 0))
                for i, text in zip(chunk, texts):
                    out[i] = text
                    self.cache_hook.add_partial("generate_until", requests[i].args, text)
        return out

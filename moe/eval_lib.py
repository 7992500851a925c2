"""Evaluating checkpoints: loading a run, language-model loss / perplexity / bits per byte, scoring
(context, continuation) pairs, and few-shot tasks from local JSONL files.

Owns: what eval.py and the lm-eval adapter (moe/lm_eval_adapter.py) compute. Must not train or write into
the run's checkpoints.

No-drop evaluation (a deliberate choice). With capacity dispatch a token can lose its expert slot to other
tokens of its sequence, so its score would depend on padding and on what else is in the row. Evaluation runs
the same params with `dispatch: dropless` (every token reaches its top-k experts, GShard/GLaM without the
capacity limit), which makes every score independent of batch size, padding and mesh (tested).

Task files (JSONL, one example per line; the file name without .jsonl is the task name):
    {"context": "import", "choices": [" os", " lambda"], "answer": 0}   multiple choice: the choice with the
        highest log-likelihood wins (`accuracy`), and the highest per byte of the choice (`accuracy_norm`,
        lm-eval's acc_norm).
    {"context": "def f(x):\\n    ", "answer": "return"}                 completion: greedy generation (cut at
        the first of `stop`, default ["\\n"], or 16 tokens past the longest answer decoded in its batch) must
        equal answer (both stripped).
    k-shot prompts put k other examples of the file (context + answer, separated by a blank line) before
    the context; the shots of example i are drawn with `random.Random(f"{seed}-{i}")`, fixed across runs.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import random
from pathlib import Path
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import yaml
from flax import nnx

from moe import checkpoint as ckpt
from moe import config as C
from moe import data as data_lib
from moe import train_lib as TL
from moe.generate import Generator
from moe.sharding import make_mesh
from moe.tokenizer import Tokenizer, tokenizer_from_file

LENGTH_MULTIPLE = 16  # scored rows are padded to a multiple of this (fewer compilations, little waste)
SHOT_SEPARATOR = "\n\n"


class EvalError(ValueError):
    """Bad evaluation input (workdir, task file, arguments); the message says what to fix."""


# --- loading a run -------------------------------------------------------------------------------


@dataclasses.dataclass
class Run:
    """A restored run: the config (with eval settings), its tokenizer, the eval Setup and params."""

    workdir: str
    cfg: C.Config
    tok: Tokenizer
    setup: TL.Setup
    params: Any
    step: int
    cache: dict = dataclasses.field(default_factory=dict)  # jitted functions, shared by restored copies

    @property
    def model(self):
        return nnx.merge(self.setup.graphdef, self.params)

    @property
    def batch_ways(self) -> int:
        return math.prod(self.setup.mesh.shape[a] for a in ("data", "fsdp", "expert"))

    def generator(self) -> Generator:
        return Generator(self.setup.graphdef, self.params, self.cfg.model, self.tok.bos_id, self.tok.eos_id)


def eval_config(cfg: C.Config, batch_size: int | None, ways: int) -> C.Config:
    """The run's config for evaluation: no-drop dispatch (module docstring), no grad accumulation, and a
    batch size rounded up to a multiple of the mesh's batch ways."""
    bs = batch_size or cfg.train.batch_size
    bs = -(-bs // ways) * ways
    model = {"dispatch": "dropless"} if C.is_moe(cfg.model) else {}
    return C.replace(cfg, model=model, train={"batch_size": bs}, optim={"grad_accum": 1})


def _eval_mesh(cfg: C.Config):
    """The run's mesh if it fits the devices present now, else plain data parallelism over all of them."""
    try:
        return make_mesh(cfg.mesh)
    except C.ConfigError:
        return make_mesh(C.MeshConfig())


def load_run_config(workdir: str, overrides: Sequence[str] = ()) -> C.Config:
    """WORKDIR/config.yaml (+ `key.sub=value` overrides) -> Config; clear errors for a missing run."""
    wd = Path(workdir)
    if not wd.is_dir():
        raise EvalError(f"workdir '{workdir}' does not exist; pass the --workdir of a training run")
    path = wd / "config.yaml"
    if not path.is_file():
        raise EvalError(f"'{path}' not found: '{workdir}' is not a training workdir (train.py writes config.yaml)")
    tree = yaml.safe_load(path.read_text()) or {}
    return C.from_dict(C.apply_overrides(tree, list(overrides)))


def checkpoint_steps(workdir: str) -> list[int]:
    """Steps saved under WORKDIR/checkpoints (committed ones; interrupted saves are not listed)."""
    ckdir = Path(workdir) / "checkpoints"
    steps = sorted(int(p.name) for p in ckdir.iterdir() if p.is_dir() and p.name.isdigit()) if ckdir.is_dir() else []
    if not steps:
        raise EvalError(f"no checkpoints in '{ckdir}'; train first (python train.py --workdir {workdir})")
    return steps


def load_run(workdir: str, step: int | None = None, *, batch_size: int | None = None,
             overrides: Sequence[str] = ()) -> Run:
    """Config + tokenizer from the workdir, params of `step` (default newest) onto the devices present now."""
    workdir = os.path.abspath(workdir)
    cfg = load_run_config(workdir, overrides)
    tok_path = os.path.join(workdir, "tokenizer.model")
    if not os.path.isfile(tok_path):
        raise EvalError(f"tokenizer '{tok_path}' is missing; copy the tokenizer the run was trained with there")
    tok = tokenizer_from_file(tok_path)
    if tok.vocab_size != cfg.model.vocab_size:
        raise EvalError(f"'{tok_path}' has {tok.vocab_size} pieces but the run's model.vocab_size is "
                        f"{cfg.model.vocab_size}: it is not the run's tokenizer")
    steps = checkpoint_steps(workdir)
    if step is not None and step not in steps:
        raise EvalError(f"step {step} not in '{workdir}/checkpoints'; available: {steps}")
    mesh = _eval_mesh(cfg)
    ways = math.prod(mesh.shape[a] for a in ("data", "fsdp", "expert"))
    cfg = eval_config(cfg, batch_size, ways)
    setup = TL.build(cfg, mesh)
    run = Run(workdir, cfg, tok, setup, None, -1)
    return restore(run, step if step is not None else steps[-1])


def restore(run: Run, step: int) -> Run:
    """The same run with the params of another step (reuses the compiled functions' layout)."""
    got, params = ckpt.restore_params(run.workdir, run.setup.abstract_state["params"], step)
    return dataclasses.replace(run, params=params, step=got)


def with_params(run: Run, params: Any, step: int = 0) -> Run:
    return dataclasses.replace(run, params=params, step=step)


# --- language modelling --------------------------------------------------------------------------


def evaluate_lm(run: Run, split: str | None = None, max_batches: int | None = None) -> dict[str, float]:
    """Mean next-token loss, perplexity and bits per byte over a split of the run's data (every target token
    once, padding never: the pipeline's exact eval batches, moe/data.py)."""
    if "eval_step" not in run.cache:
        run.cache["eval_step"] = TL.make_eval_step(run.setup)
    step_fn = run.cache["eval_step"]
    sums = {"loss_sum": 0.0, "tokens": 0.0, "bytes": 0.0}
    for batch in data_lib.eval_batches(run.cfg, run.tok, split, max_batches, jax.process_index(),
                                       jax.process_count()):
        out = jax.device_get(step_fn(run.params, TL.device_batch(run.setup, batch)))
        for k in sums:
            sums[k] += float(out[k])
    if not sums["tokens"]:
        raise EvalError(f"split '{split or run.cfg.data.eval_split}' has no tokens to evaluate")
    loss = sums["loss_sum"] / sums["tokens"]
    # bits per byte (Gao et al. 2020, The Pile): total nats / ln 2 / UTF-8 bytes of the targets.
    return {"loss": loss, "perplexity": math.exp(loss), "bits_per_byte": sums["loss_sum"] / math.log(2) / sums["bytes"],
            "tokens": sums["tokens"], "bytes": sums["bytes"], "loss_sum": sums["loss_sum"]}


# --- scoring (context, continuation) pairs -------------------------------------------------------


@functools.lru_cache(maxsize=16)
def _score_fn(graphdef):
    """jit(params, batch) -> per-row (sum of weighted target log-probs, all targets greedy)."""

    def row_scores(params, batch):
        logits_BTV, _ = nnx.merge(graphdef, params)(batch["inputs"], batch["positions"],
                                                              batch["segment_ids"], train=False)
        logp_BTV = jax.nn.log_softmax(logits_BTV, axis=-1)
        target_BT = jnp.take_along_axis(logp_BTV, batch["targets"][..., None], axis=-1)[..., 0]
        w_BT = batch["weights"]
        greedy_BT = (jnp.argmax(logits_BTV, axis=-1) == batch["targets"]) | (w_BT == 0)
        return jnp.sum(target_BT * w_BT, axis=1), jnp.all(greedy_BT, axis=1)

    return jax.jit(row_scores)


def score(run: Run, pairs: Sequence[tuple[Sequence[int], Sequence[int]]], batch_size: int = 8,
          max_length: int | None = None) -> list[tuple[float, bool]]:
    """(sum of log p(continuation | context), whether greedy decoding gives the continuation) per pair.

    Token ids are used as given (put BOS in the context yourself). Rows longer than max_length (default:
    the training seq_len) lose context tokens from the left. Each row is one document: right padding has
    segment id 0, so it is neither attended to nor counted.
    """
    max_length = max_length or run.cfg.train.seq_len
    fn = _score_fn(run.setup.graphdef)
    order = sorted(range(len(pairs)), key=lambda i: -(len(pairs[i][0]) + len(pairs[i][1])))
    out: list[tuple[float, bool]] = [(0.0, False)] * len(pairs)
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        rows = []
        for i in idx:
            ctx, cont = list(pairs[i][0]), list(pairs[i][1])
            if not ctx or not cont:
                raise EvalError(f"pair {i}: context and continuation need at least one token each")
            if len(cont) > max_length:
                raise EvalError(f"pair {i}: continuation of {len(cont)} tokens exceeds max_length {max_length}")
            full = (ctx + cont)[-(max_length + 1):]
            rows.append((full, len(cont)))
        length = min(-(-max(len(f) - 1 for f, _ in rows) // LENGTH_MULTIPLE) * LENGTH_MULTIPLE, max_length)
        n_rows = -(-len(rows) // run.batch_ways) * run.batch_ways
        batch = {k: np.zeros((n_rows, length), np.int32) for k in ("inputs", "targets", "segment_ids", "positions")}
        batch["weights"] = np.zeros((n_rows, length), np.float32)
        for r, (full, n_cont) in enumerate(rows):
            t = len(full) - 1
            batch["inputs"][r, :t] = full[:-1]
            batch["targets"][r, :t] = full[1:]
            batch["segment_ids"][r, :t] = 1
            batch["positions"][r, :t] = np.arange(t)
            batch["weights"][r, t - n_cont : t] = 1.0
        ll, greedy = jax.device_get(fn(run.params, TL.device_batch(run.setup, batch)))
        for r, i in enumerate(idx):
            out[i] = (float(ll[r]), bool(greedy[r]))
    return out


def rolling_windows(ids: Sequence[int], bos_id: int, seq_len: int) -> list[tuple[list[int], list[int]]]:
    """A document's tokens as disjoint prediction windows: [bos] + ids cut into pieces of seq_len + 1 tokens
    overlapping by one, exactly the pieces moe/data.py packs, so the summed log-likelihood equals the one
    eval.py's perplexity counts for the same document (without its EOS target). lm-eval's HF model gives
    the last window more context; ours keeps the two numbers identical."""
    doc = [bos_id, *ids]
    return [(doc[s : s + 1], doc[s + 1 : s + seq_len + 1]) for s in range(0, len(doc) - 1, seq_len)]


def loglikelihood_rolling(run: Run, docs: Sequence[Sequence[int]], batch_size: int = 8) -> list[float]:
    """Total log-likelihood of each token sequence (conditioned on BOS), over rolling_windows."""
    windows, owner = [], []
    for d, ids in enumerate(docs):
        for w in rolling_windows(ids, run.tok.bos_id, run.cfg.train.seq_len):
            windows.append(w)
            owner.append(d)
    totals = [0.0] * len(docs)
    for d, (ll, _) in zip(owner, score(run, windows, batch_size)):
        totals[d] += ll
    return totals


# --- tasks from JSONL ----------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Task:
    name: str
    kind: str  # multiple_choice | completion
    examples: tuple[dict, ...]


def load_task(path: str | Path) -> Task:
    """Reads and validates a task file (format in the module docstring); errors name file and line."""
    path = Path(path)
    if not path.is_file():
        raise EvalError(f"task file '{path}' does not exist")
    examples, kinds = [], set()
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        where = f"{path}:{n}"
        try:
            ex = json.loads(line)
        except json.JSONDecodeError as e:
            raise EvalError(f"{where}: not valid JSON ({e.msg})") from None
        if not isinstance(ex, dict) or not isinstance(ex.get("context"), str):
            raise EvalError(f"{where}: each line must be an object with a string 'context'")
        if "choices" in ex:
            ch = ex["choices"]
            if not (isinstance(ch, list) and len(ch) >= 2 and all(isinstance(c, str) and c for c in ch)):
                raise EvalError(f"{where}: 'choices' must be a list of at least 2 non-empty strings")
            if not (isinstance(ex.get("answer"), int) and 0 <= ex["answer"] < len(ch)):
                raise EvalError(f"{where}: 'answer' must be the index of the right choice (0..{len(ch) - 1})")
            kinds.add("multiple_choice")
        elif isinstance(ex.get("answer"), str) and ex["answer"].strip():
            stop = ex.get("stop", ["\n"])
            if not (isinstance(stop, list) and all(isinstance(s, str) for s in stop)):
                raise EvalError(f"{where}: 'stop' must be a list of strings")
            kinds.add("completion")
        else:
            raise EvalError(f"{where}: need 'choices' + integer 'answer' (multiple choice) or a string 'answer' "
                            "(completion)")
        examples.append(ex)
    if not examples:
        raise EvalError(f"task file '{path}' holds no examples")
    if len(kinds) > 1:
        raise EvalError(f"task file '{path}' mixes multiple-choice and completion examples; split it in two")
    return Task(path.stem, kinds.pop(), tuple(examples))


def task_files(paths: Sequence[str]) -> list[Path]:
    """Files and directories (every *.jsonl inside) -> task files."""
    out = []
    for p in map(Path, paths):
        if p.is_dir():
            found = sorted(p.glob("*.jsonl"))
            if not found:
                raise EvalError(f"task directory '{p}' holds no .jsonl files")
            out += found
        else:
            out.append(p)
    return out


def _target(ex: dict) -> str:
    return ex["choices"][ex["answer"]] if "choices" in ex else ex["answer"]


def few_shot_prompt(task: Task, i: int, shots: int, seed: int) -> str:
    """k other examples (context + answer) then the context of example i; shots fixed by (seed, i)."""
    others = [j for j in range(len(task.examples)) if j != i]
    if shots > len(others):
        raise EvalError(f"task '{task.name}' has {len(task.examples)} examples: too few for {shots} shots")
    picked = random.Random(f"{seed}-{i}").sample(others, shots)
    parts = [task.examples[j]["context"] + _target(task.examples[j]) for j in picked]
    return SHOT_SEPARATOR.join(parts + [task.examples[i]["context"]])


def _encode_pair(tok: Tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """[bos] + context and the continuation's tokens, as lm-eval's TemplateLM splits them: trailing whitespace
    of the context moves to the continuation, and the boundary is where encoding the whole text puts it (a
    continuation starting mid-word tokenizes as it would in running text)."""
    n_space = len(context) - len(context.rstrip())
    if n_space and context.rstrip():
        context, continuation = context[:-n_space], context[-n_space:] + continuation
    whole, ctx = tok.encode(context + continuation), tok.encode(context)
    return [tok.bos_id, *whole[: len(ctx)]], whole[len(ctx):]


def run_task(run: Run, task: Task, shots: int = 0, seed: int = 1234, batch_size: int = 8) -> dict[str, float]:
    """Accuracy of the run on a task at k shots (and accuracy_norm for multiple choice)."""
    prompts = [few_shot_prompt(task, i, shots, seed) for i in range(len(task.examples))]
    if task.kind == "multiple_choice":
        pairs, index = [], []
        for i, (ex, prompt) in enumerate(zip(task.examples, prompts)):
            for c, choice in enumerate(ex["choices"]):
                pairs.append(_encode_pair(run.tok, prompt, choice))
                index.append((i, c))
        lls = [ll for ll, _ in score(run, pairs, batch_size)]
        raw = {(i, c): ll for (i, c), ll in zip(index, lls)}
        correct = correct_norm = 0
        for i, ex in enumerate(task.examples):
            n = len(ex["choices"])
            best = max(range(n), key=lambda c: raw[i, c])
            best_norm = max(range(n), key=lambda c: raw[i, c] / len(ex["choices"][c].encode("utf-8")))
            correct += best == ex["answer"]
            correct_norm += best_norm == ex["answer"]
        n_ex = len(task.examples)
        return {"accuracy": correct / n_ex, "accuracy_norm": correct_norm / n_ex, "examples": n_ex}
    gen = run.generator()
    groups: dict[tuple[str, ...], list[int]] = {}  # rows decoded together must share their stop strings
    for i, ex in enumerate(task.examples):
        groups.setdefault(tuple(ex.get("stop", ["\n"])), []).append(i)
    correct = 0
    for stop, idx in groups.items():
        for s in range(0, len(idx), batch_size):
            chunk = idx[s : s + batch_size]
            max_tokens = max(len(run.tok.encode(task.examples[i]["answer"])) for i in chunk) + 16
            texts = gen.generate(run.tok, [prompts[i] for i in chunk], max_tokens, stop=stop)
            correct += sum(t.strip() == task.examples[i]["answer"].strip() for t, i in zip(texts, chunk))
    return {"accuracy": correct / len(task.examples), "examples": len(task.examples)}

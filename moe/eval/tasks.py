"""Few-shot tasks from local JSONL files: the file format, prompts, and accuracy of a restored run.

Owns: the task-file format and its validation, few-shot prompt building, the lm-eval-style split of a
prompt into (context, continuation) tokens, and the accuracy metrics. Every log-likelihood comes from
`moe.eval.lm.score` and every completion from `moe.model.generate`, so the numbers agree with eval.py's LM
metrics and the lm-eval adapter (tested). Must not load runs, build models or touch checkpoints.

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
import json
import random
from pathlib import Path
from typing import Sequence

from moe.eval.lm import EvalError, Run, score
from moe.data.tokenizer import Tokenizer

SHOT_SEPARATOR = "\n\n"


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


def encode_pair(tok: Tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """[bos] + context tokens and continuation tokens (see split_pair)."""
    ctx, cont, _ = split_pair(tok, context, continuation)
    return ctx, cont


def split_pair(tok: Tokenizer, context: str, continuation: str) -> tuple[list[int], list[int], bool]:
    """([bos] + context tokens, continuation tokens, whether a token merged across the boundary).

    As lm-eval's TemplateLM splits them: trailing whitespace of the context moves to the continuation, and the
    boundary is where encoding the whole text puts it (a continuation starting mid-word tokenizes as it would
    in running text). When BPE merges the end of the context with the start of the continuation (context
    `return self.`, continuation `_x`: the whole text has a `._` piece that the context alone does not), the
    context's own tokens are no prefix of the whole text's, and cutting at their count would score the wrong
    tokens or none. Then the pair is re-split at the last token boundary both encodings share: the merged
    piece is scored as part of the continuation (a few context characters scored with it, never none).
    """
    n_space = len(context) - len(context.rstrip())
    if n_space and context.rstrip():
        context, continuation = context[:-n_space], context[-n_space:] + continuation
    whole, ctx = tok.encode(context + continuation), tok.encode(context)
    shared = 0
    while shared < min(len(whole), len(ctx)) and whole[shared] == ctx[shared]:
        shared += 1
    merged = shared < len(ctx)
    if shared == len(whole):  # no token of the continuation's own (e.g. it is empty): score its own encoding
        return [tok.bos_id, *ctx], tok.encode(continuation), merged
    return [tok.bos_id, *whole[:shared]], whole[shared:], merged


def run_task(run: Run, task: Task, shots: int = 0, seed: int = 1234, batch_size: int = 8) -> dict[str, float]:
    """Accuracy of the run on a task at k shots (and accuracy_norm for multiple choice)."""
    prompts = [few_shot_prompt(task, i, shots, seed) for i in range(len(task.examples))]
    if task.kind == "multiple_choice":
        pairs, index = [], []
        for i, (ex, prompt) in enumerate(zip(task.examples, prompts)):
            for c, choice in enumerate(ex["choices"]):
                pairs.append(encode_pair(run.tok, prompt, choice))
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

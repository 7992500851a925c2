"""Evaluate a training run's checkpoints: LM loss / perplexity / bits per byte, JSONL tasks, generation, lm-eval.

    python eval.py --workdir runs/tiny                                  # newest step, validation split
    python eval.py --workdir runs/tiny --step 200 --tasks tests/data/tasks --shots 0 3 --out runs/tiny/eval.json
    python eval.py --workdir runs/tiny --all                            # every step -> eval/curve.jsonl + .png
    python eval.py --workdir runs/tiny --generate "def main(" --max_tokens 64 --temperature 0.8 --top_p 0.95
    python eval.py --workdir runs/tiny --lm_eval hellaswag,piqa         # lm-evaluation-harness tasks
    python eval.py --workdir runs/tiny --lm_eval moe_python_keywords --lm_eval_include tests/data/lm_eval_tasks
    python eval.py --workdir runs/tiny data.source=files data.files=notes/*.txt   # another corpus, same tokenizer

Sections: arguments -> load the run -> language modelling -> tasks -> lm-eval -> output. The run's config and
tokenizer come from the workdir; params are restored onto the devices present now. Bad input exits with
status 2 and one line naming what to fix. Method: moe/eval/lm.py; task-file format: moe/eval/tasks.py;
README: docs/eval.md.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys

EXIT_BAD_INPUT = 2


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", required=True, help="a training run's workdir (config.yaml, tokenizer.model, checkpoints/)")
    which = p.add_mutually_exclusive_group()
    which.add_argument("--step", type=int, default=None, help="checkpoint step (default: newest)")
    which.add_argument("--all", action="store_true", help="evaluate every checkpoint; write the curve (JSONL + PNG)")
    p.add_argument("--split", default=None, help="data split for LM metrics (default: the run's data.eval_split)")
    p.add_argument("--max_batches", type=int, default=None, help="LM eval on the first N batches only (default: all)")
    p.add_argument("--no_lm", action="store_true", help="skip the language-modelling metrics")
    p.add_argument("--tasks", nargs="*", default=[], help="JSONL task files or directories of them")
    p.add_argument("--shots", type=int, nargs="+", default=[0], help="few-shot counts to run each task at")
    p.add_argument("--seed", type=int, default=1234, help="seed choosing the few-shot examples")
    p.add_argument("--batch_size", type=int, default=None, help="rows per forward pass (default: train.batch_size)")
    p.add_argument("--generate", default=None, help="print a completion of this prompt")
    p.add_argument("--max_tokens", type=int, default=64, help="generation: new tokens at most")
    p.add_argument("--temperature", type=float, default=0.0, help="generation: 0 = greedy")
    p.add_argument("--top_p", type=float, default=1.0, help="generation: nucleus sampling mass")
    p.add_argument("--stop", action="append", default=[], help="generation: stop string (repeatable)")
    p.add_argument("--lm_eval", default="", help="comma-separated lm-evaluation-harness task names")
    p.add_argument("--lm_eval_include", default=None, help="directory of extra lm-eval task YAMLs")
    p.add_argument("--lm_eval_limit", type=int, default=None, help="lm-eval: examples per task at most")
    p.add_argument("--lm_eval_shots", type=int, default=None, help="lm-eval: num_fewshot (default: the task's)")
    p.add_argument("--out", default=None, help="write results as JSON here (with --all: default WORKDIR/eval/)")
    from moe.config import EVAL_OVERRIDABLE

    p.add_argument("overrides", nargs="*", help=f"key.sub=value for keys starting with {', '.join(EVAL_OVERRIDABLE)}")
    return p.parse_args(argv)


def evaluate(run, args) -> dict:
    """Everything asked for at one checkpoint -> a flat-ish results dict."""
    from moe.eval import lm as eval_lm
    from moe.eval import tasks

    res: dict = {"step": run.step}
    if not args.no_lm:
        res.update(eval_lm.evaluate_lm(run, args.split, args.max_batches))
    if args.tasks:
        res["tasks"] = {}
        for path in tasks.task_files(args.tasks):
            task = tasks.load_task(path)
            for k in args.shots:
                res["tasks"][f"{task.name}/{k}-shot"] = tasks.run_task(run, task, k, args.seed, run.cfg.train.batch_size)
    if args.lm_eval:
        res["lm_eval"], res["lm_eval_boundary_merges"] = run_lm_eval(run, args)
    return res


def run_lm_eval(run, args) -> tuple[dict, int]:
    """lm-eval's numeric metrics per task, and how many (context, continuation) pairs a BPE merge across
    their boundary made the adapter re-split (moe/lm_eval_adapter.py)."""
    import lm_eval
    from lm_eval.tasks import TaskManager

    from moe.lm_eval_adapter import MoeLM

    model = MoeLM(run=run, batch_size=run.cfg.train.batch_size)
    out = lm_eval.simple_evaluate(model=model,
                                  tasks=[t for t in args.lm_eval.split(",") if t], num_fewshot=args.lm_eval_shots,
                                  limit=args.lm_eval_limit, task_manager=TaskManager(include_path=args.lm_eval_include),
                                  random_seed=args.seed, numpy_random_seed=args.seed, fewshot_random_seed=args.seed)
    return ({task: {k: v for k, v in metrics.items() if isinstance(v, (int, float))}
             for task, metrics in out["results"].items()}, model.boundary_merges)


def table(res: dict) -> str:
    """Readable stdout summary: one line of LM metrics, one line per task."""
    lines = [f"step {res['step']}"]
    if "loss" in res:
        lines.append(f"  loss {res['loss']:.4f}  perplexity {res['perplexity']:.2f}  bits/byte {res['bits_per_byte']:.4f}"
                     f"  tokens {int(res['tokens']):,}")
    for name, m in res.get("tasks", {}).items():
        extra = f"  accuracy_norm {m['accuracy_norm']:.3f}" if "accuracy_norm" in m else ""
        lines.append(f"  {name:<36} accuracy {m['accuracy']:.3f}{extra}  (n={m['examples']})")
    for name, m in res.get("lm_eval", {}).items():
        lines.append(f"  lm-eval {name:<28} " + "  ".join(f"{k} {v:.4f}" for k, v in m.items()))
    if res.get("lm_eval_boundary_merges"):
        lines.append(f"  lm-eval: {res['lm_eval_boundary_merges']} pairs re-split where BPE merged across the "
                     "context/continuation boundary")
    return "\n".join(lines)


def plot_curve(rows: list[dict]) -> bytes:
    """Loss and bits per byte against step: the bytes of one PNG."""
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    steps = [r["step"] for r in rows]
    for key in ("loss", "bits_per_byte"):
        if all(key in r for r in rows):
            ax.plot(steps, [r[key] for r in rows], marker="o", label=key)
    for name in rows[0].get("tasks", {}):
        ax.plot(steps, [r["tasks"][name]["accuracy"] for r in rows], marker=".", linestyle="--", label=name)
    ax.set_xlabel("step")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    return buf.getvalue()


def main(argv=None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    from moe.eval import lm as eval_lm
    from moe.eval import tasks
    from moe.train.checkpoint import CheckpointError
    from moe.config import ConfigError, check_eval_overrides
    from moe.data.corpus import DataError
    from moe.runtime import storage
    from moe.runtime.hostmem import set_host_malloc

    try:
        check_eval_overrides(args.overrides)
        # the run's host malloc policy, set before JAX starts its threads (moe/runtime/hostmem.py)
        set_host_malloc(eval_lm.load_run_config(args.workdir, args.overrides).train.host_malloc)
        for path in tasks.task_files(args.tasks):  # malformed task files fail before anything compiles
            tasks.load_task(path)
        steps = eval_lm.checkpoint_steps(args.workdir) if args.all else [args.step]
        run = eval_lm.load_run(args.workdir, steps[0], batch_size=args.batch_size, overrides=args.overrides)
        if args.generate is not None:
            text = run.generator().generate(run.tok, [args.generate], args.max_tokens, temperature=args.temperature,
                                            top_p=args.top_p, stop=args.stop, seed=args.seed)[0]
            print(args.generate + text)
            if not (args.all or args.tasks or args.lm_eval or args.out):
                return 0
        rows = []
        for step in steps:
            if step is not None and step != run.step:
                run = eval_lm.restore(run, step)
            res = evaluate(run, args)
            rows.append(res)
            print(table(res), flush=True)
    except (eval_lm.EvalError, ConfigError, DataError, CheckpointError) as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    if args.all:  # outputs go through moe/runtime/storage.py: the workdir (or --out) may be a bucket
        out_dir = storage.parent(args.out) if args.out else storage.join(args.workdir, "eval")
        storage.write_text(storage.join(out_dir, "curve.jsonl"), "".join(json.dumps(r) + "\n" for r in rows))
        storage.write_bytes(storage.join(out_dir, "curve.png"), plot_curve(rows))
        print(f"wrote {storage.join(out_dir, 'curve.jsonl')} and curve.png")
    if args.out:
        storage.write_text(args.out, json.dumps(rows if args.all else rows[0], indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())

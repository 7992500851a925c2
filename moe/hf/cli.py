"""The `python -m moe.hf` command line: export a run's checkpoint as a Hugging Face model folder.

    python -m moe.hf export --workdir runs/tiny --out runs/tiny-hf            # newest step, auto class, bf16
    python -m moe.hf export --workdir gs://B/run --step 3000 --out hf/glam --arch qwen2_moe --dtype float32
"""

from __future__ import annotations

import argparse
import sys

EXIT_BAD_INPUT = 2


def export_run(workdir: str, out: str, *, step: int | None = None, arch: str = "auto",
               dtype: str = "bfloat16") -> dict:
    """Restores `step` (default newest) of a run onto this host's devices and writes the HF folder."""
    from moe.eval import lm as eval_lm
    from moe.hf import export, mapping
    from moe.runtime import storage
    from moe.train import checkpoint as ckpt
    from moe.train import steps as train_steps

    cfg = eval_lm.load_run_config(workdir)
    mapping.choose_arch(cfg.model, arch)  # an unrepresentable config fails before anything is restored
    steps = eval_lm.checkpoint_steps(workdir)
    if step is not None and step not in steps:
        raise eval_lm.EvalError(f"step {step} not in '{workdir}/checkpoints'; available: {steps}")
    setup = train_steps.build(cfg, eval_lm.eval_mesh(cfg))
    got, params = ckpt.restore_params(workdir, setup.abstract_state["params"], step)
    tok = storage.join(workdir, "tokenizer.model")
    summary = export.write_folder(cfg.model, params, out, arch=arch, dtype=dtype, max_positions=cfg.train.seq_len,
                                  tokenizer_bytes=storage.read_bytes(tok) if storage.isfile(tok) else None)
    return dict(summary, step=got)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m moe.hf", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    e = sub.add_parser("export", help="write a Hugging Face model folder from a run's checkpoint")
    e.add_argument("--workdir", required=True)
    e.add_argument("--step", type=int, default=None, help="checkpoint step (default: newest)")
    e.add_argument("--out", required=True, help="a new (or empty) folder")
    e.add_argument("--arch", default="auto", help="auto | qwen3_moe | qwen2_moe | mixtral | qwen3 | llama")
    e.add_argument("--dtype", default="bfloat16", help="bfloat16 | float32")
    a = ap.parse_args(argv)
    from moe.config import ConfigError
    from moe.eval.lm import EvalError
    from moe.train.checkpoint import CheckpointError

    try:
        s = export_run(a.workdir, a.out, step=a.step, arch=a.arch, dtype=a.dtype)
    except (ConfigError, EvalError, CheckpointError) as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_BAD_INPUT
    print(f"wrote {s['out']}: step {s['step']} as {s['arch']} ({s['dtype']}, {s['bytes'] / 2**20:.1f} MiB in "
          f"{s['files']} file(s))")
    return 0

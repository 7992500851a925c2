"""Train a GLaM-style MoE language model.

    python train.py --config configs/tiny.yaml [--workdir runs/tiny] [key.sub=value ...]
    python train.py --config configs/glam_1.7b_64e.yaml --aot v5e:8x8     # compile for a TPU pod, no TPU needed

The loop is moe/train/loop.py. A run started on a workdir that has checkpoints resumes from the newest good
one (moe/train/checkpoint.py states the policy). SIGTERM/SIGINT (spot preemption) finish the current step,
save, and exit with status 75. Bad config or data, or a checkpoint that cannot be written, exits with status
2 and a one-line message naming the key or file; repeated divergence after rollbacks exits with status 1.
docs/reliability.md has the whole table and the MOE_FAULT_* test hooks (moe/train/faults.py).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

from moe.train.signals import Preempted, raise_on_signal

EXIT_PREEMPTED = 75  # EX_TEMPFAIL: try again — the next start resumes from the checkpoint just written
EXIT_BAD_INPUT = 2
EXIT_DIVERGED = 1  # rolled back to every checkpoint the ladder allows: lower optim.lr or fix the data


def parse_args(argv=None) -> argparse.Namespace:
    from moe.config import help_text

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="config keys (override with key.sub=value):\n" + help_text())
    p.add_argument("--config", default="configs/tiny.yaml", help="YAML preset (default: configs/tiny.yaml)")
    p.add_argument("--workdir", default="", help="run directory (default: runs/<preset name>); may be gs://")
    p.add_argument("--aot", default="", help="ahead-of-time compile for a TPU topology (e.g. v5e:8x8) and exit")
    p.add_argument("--aot_json", default="", help="with --aot: also write the report as JSON here")
    p.add_argument("--aot_step", choices=("train", "eval"), default="train",
                   help="with --aot: compile the train step (default) or the eval step (dropless, same mesh)")
    p.add_argument("--coordinator", default="", help="multi-process: coordinator host:port (else auto-detected)")
    p.add_argument("--num_processes", type=int, default=0, help="multi-process: number of processes")
    p.add_argument("--process_id", type=int, default=-1, help="multi-process: this process's index")
    p.add_argument("overrides", nargs="*", help="config overrides key.sub=value")
    return p.parse_args(argv)


def main(argv=None) -> int:
    try:
        return run(argv)
    except Preempted as e:  # also during the imports and set-up below: train.py exits 75 from the first instant
        print(f"stopped by {e} — run the same command to resume", file=sys.stderr)
        return EXIT_PREEMPTED


def run(argv=None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s",
                        datefmt="%H:%M:%S")
    for noisy in ("absl", "orbax", "jax._src", "tensorflow_datasets", "grain"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    from moe.config import ConfigError, load_config
    from moe.data.corpus import DataError
    from moe.runtime.hostmem import set_host_malloc
    from moe.runtime.multihost import init_processes
    from moe.train.checkpoint import CheckpointError
    from moe.train.guards import Diverged
    from moe.train.loop import train

    try:
        cfg = load_config(args.config, args.overrides)
        set_host_malloc(cfg.train.host_malloc)  # before JAX starts its threads
        if args.aot:
            from moe.launch.aot import aot_main

            return aot_main(cfg, args.aot, args.aot_json, args.aot_step)
        init_processes(args.coordinator, args.num_processes, args.process_id)
        train(cfg, args.workdir or os.path.join("runs", cfg.name))
    except (ConfigError, DataError, CheckpointError) as e:
        print(f"error: {one_line(e)}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except Diverged as e:
        print(f"error: {one_line(e)}", file=sys.stderr)
        return EXIT_DIVERGED
    return 0


def one_line(e: Exception) -> str:
    return " ".join(str(e).split())


if __name__ == "__main__":
    raise_on_signal()  # from the first instant: a stop signal during start-up exits 75 with a message, too
    sys.exit(main())

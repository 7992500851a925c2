"""The `python -m moe.hf` command line: export a run's checkpoint as a Hugging Face model folder.

    python -m moe.hf export --workdir runs/tiny --out runs/tiny-hf            # newest step, auto class, bf16
    python -m moe.hf export --workdir gs://B/run --step 3000 --out hf/glam --arch qwen2_moe --dtype float32
    python -m moe.hf import path/to/Qwen3-MoE-folder --workdir runs/cpt --config configs/small.yaml train.steps=2000
        # writes config.yaml, the tokenizer and checkpoint 0; then continue pretraining with
        # python train.py --config runs/cpt/config.yaml --workdir runs/cpt
"""

from __future__ import annotations

import argparse
import sys

from moe.hf.mapping import HFError

EXIT_BAD_INPUT = 2


def export_run(workdir: str, out: str, *, step: int | None = None, arch: str = "auto",
               dtype: str = "bfloat16") -> dict:
    """Restores `step` (default newest) of a run onto this host's devices and writes the HF folder."""
    from moe.data import tokenizer
    from moe.data.corpus import DataError
    from moe.eval import lm as eval_lm
    from moe.eval.lm import EvalError
    from moe.hf import export, mapping
    from moe.train import checkpoint as ckpt
    from moe.train import steps as train_steps

    cfg = eval_lm.load_run_config(workdir)
    mapping.choose_arch(cfg.model, arch)  # an unrepresentable config fails before anything is restored
    steps = eval_lm.checkpoint_steps(workdir)
    if step is not None and step not in steps:
        raise EvalError(f"step {step} not in '{workdir}/checkpoints'; available: {steps}")
    setup = train_steps.build(cfg, eval_lm.eval_mesh(cfg))
    got, params = ckpt.restore_params(workdir, setup.abstract_state["params"], step)
    try:
        tok = tokenizer.from_workdir(workdir, cfg)
    except DataError as e:
        raise EvalError(f"{e}: the export needs the run's tokenizer") from None
    summary = export.write_folder(cfg.model, params, out, arch=arch, dtype=dtype, max_positions=cfg.train.seq_len,
                                  tokenizer=tok)
    return dict(summary, step=got)


def import_folder(folder: str, workdir: str, *, preset: str = "configs/tiny.yaml",
                  overrides: list[str] | None = None) -> str:
    """Makes WORKDIR a run that continues pretraining the HF checkpoint FOLDER: config.yaml (`preset` for
    everything but the model, the model of FOLDER's config.json, `train.init_from=hf:FOLDER`, then
    `overrides`), the folder's tokenizer (tokenizer.json + tokenizer_config.json, else a SentencePiece
    tokenizer.model) and a step-0 checkpoint holding its weights. `train.py --config WORKDIR/config.yaml
    --workdir WORKDIR` resumes from that checkpoint. Returns the config path."""
    import os

    from moe import config
    from moe.data import hf_tokenizer, tokenizer
    from moe.hf import load
    from moe.runtime import storage
    from moe.train import loop

    ckdir = storage.join(workdir, "checkpoints")
    if storage.isdir(ckdir) and storage.listdir(ckdir):
        raise HFError(f"--workdir '{workdir}' already has checkpoints; pass a new workdir")
    hf = load.read_config(folder)
    tree = config.read_preset(preset)
    tree = dict(tree, model={**tree.get("model", {}), **load.model_overrides(hf)},
                train={**tree.get("train", {}), "init_from": f"{loop.HF_PREFIX}{os.path.abspath(folder)}"})
    tok = None
    if os.path.isfile(os.path.join(folder, "tokenizer.json")):
        tok = hf_tokenizer.from_file(os.path.join(folder, "tokenizer.json"))
    elif os.path.isfile(os.path.join(folder, "tokenizer.model")):
        tok = tokenizer.tokenizer_from_file(os.path.join(folder, "tokenizer.model"))
    if tok is not None:
        local = not storage.is_url(workdir)
        path = storage.join(os.path.abspath(workdir) if local else workdir, next(iter(tok.files())))
        tree = dict(tree, data={**tree.get("data", {}), "tokenizer": path})
    cfg = config.from_dict(config.apply_overrides(tree, list(overrides or [])))
    load.matching_config(cfg.model, folder)  # the overrides must not change the model
    if tok is not None and cfg.data.tokenizer == path:
        tokenizer.save_to_workdir(tok, workdir)
    loop.initialize(cfg, workdir)
    return storage.join(workdir, "config.yaml")


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
    i = sub.add_parser("import", help="write a workdir's config.yaml that continues pretraining an HF checkpoint")
    i.add_argument("folder", help="a Hugging Face model folder (config.json + safetensors)")
    i.add_argument("--workdir", required=True)
    i.add_argument("--config", default="configs/tiny.yaml", help="preset for data, train, optim, mesh")
    i.add_argument("overrides", nargs="*", help="key.sub=value (not model.*: the model is the checkpoint's)")
    a, extra = ap.parse_known_args(argv)  # import: key=value overrides may follow --workdir too
    if extra and (a.cmd != "import" or any("=" not in x or x.startswith("-") for x in extra)):
        ap.error(f"unrecognized arguments: {' '.join(extra)}")
    if a.cmd == "import":
        a.overrides = [*a.overrides, *extra]
    from moe.config import ConfigError
    from moe.data.corpus import DataError
    from moe.eval.lm import EvalError
    from moe.train.checkpoint import CheckpointError

    try:
        if a.cmd == "import":
            path = import_folder(a.folder, a.workdir, preset=a.config, overrides=a.overrides)
            print(f"wrote {path} and a step-0 checkpoint; continue pretraining with: python train.py --config {path} "
                  f"--workdir {a.workdir}")
            return 0
        s = export_run(a.workdir, a.out, step=a.step, arch=a.arch, dtype=a.dtype)
    except (ConfigError, DataError, EvalError, CheckpointError) as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_BAD_INPUT
    print(f"wrote {s['out']}: step {s['step']} as {s['arch']} ({s['dtype']}, {s['bytes'] / 2**20:.1f} MiB in "
          f"{s['files']} file(s))")
    return 0

"""Runs in the transformers environment (.venv-hf): builds a random model of an HF class with transformers
itself, saves it with save_pretrained (fp32) and writes its log-softmax for the given tokens.

    .venv-hf/bin/python tests/helpers/hf_make.py MODEL_TYPE CONFIG_JSON OUT_DIR TOKENS.npy OUT.npz
"""

import json
import sys

import numpy as np
import torch
from transformers import AutoConfig, AutoModelForCausalLM


def main(model_type: str, cfg_json: str, out_dir: str, tokens_path: str, out: str) -> None:
    torch.manual_seed(0)
    cfg = AutoConfig.for_model(model_type, **json.loads(cfg_json))
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    with torch.no_grad():  # norms start at 1 and routers near 0: move every weight off its init
        for name, p in model.named_parameters():
            p.add_(torch.randn_like(p) * (0.3 if p.ndim == 1 else 0.02))
    model.eval()
    model.save_pretrained(out_dir)
    tokens = torch.from_numpy(np.load(tokens_path)).long()
    with torch.no_grad():
        logp = torch.log_softmax(model(tokens).logits.float(), dim=-1).numpy()
    np.savez(out, logp=logp)


if __name__ == "__main__":
    main(*sys.argv[1:])

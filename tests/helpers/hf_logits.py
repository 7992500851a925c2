"""Runs in the transformers environment (.venv-hf: Python 3.11, torch, transformers): loads an exported folder
with AutoModelForCausalLM.from_pretrained and writes the log-softmax of its logits for the given tokens.

    .venv-hf/bin/python tests/helpers/hf_logits.py DIR TOKENS.npy OUT.npz
OUT.npz holds `eager` and `sdpa` ([B, T, V] float32) and `class` (the class transformers chose).
"""

import sys

import numpy as np
import torch
from transformers import AutoModelForCausalLM


def main(folder: str, tokens_path: str, out: str) -> None:
    tokens = torch.from_numpy(np.load(tokens_path)).long()
    res = {}
    for impl in ("eager", "sdpa"):
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, attn_implementation=impl)
        model.eval()
        with torch.no_grad():
            logits = model(tokens).logits.float()
        res[impl] = torch.log_softmax(logits, dim=-1).numpy()
        res["class"] = np.array(type(model).__name__)
    np.savez(out, **res)


if __name__ == "__main__":
    main(*sys.argv[1:])

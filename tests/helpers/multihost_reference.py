"""Reference for tests/test_multihost.py: ONE process with 4 devices trains on the global batches that two
hosts would assemble (host 0's rows, then host 1's), and prints the per-step losses and the final eval
(the same function the training loop calls) as JSON."""

import json
import os
import sys

os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"
os.environ["JAX_PLATFORMS"] = "cpu"

import numpy as np  # noqa: E402

from moe.data import pipeline as data_lib  # noqa: E402
from moe.train import steps as train_steps  # noqa: E402
from moe.config import load_config  # noqa: E402
from moe.eval import lm as eval_lm  # noqa: E402
from moe.runtime.sharding import make_mesh  # noqa: E402
from moe.data.tokenizer import load_tokenizer  # noqa: E402

cfg = load_config(sys.argv[1], sys.argv[2:])
tok = load_tokenizer(cfg)
hosts = [data_lib.train_iterator(cfg, tok, i, 2) for i in range(2)]
setup = train_steps.build(cfg, make_mesh(cfg.mesh))
state, step = train_steps.init_state(setup), train_steps.make_train_step(setup)
losses = []
for _ in range(cfg.train.steps):
    parts = [next(h) for h in hosts]
    batch = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
    state, m = step(state, train_steps.device_batch(setup, batch))
    losses.append(float(m["loss"]))
run = eval_lm.with_params(eval_lm.training_run("", cfg, tok, setup.mesh), state["params"], cfg.train.steps)
ev = eval_lm.evaluate_lm(run, max_batches=cfg.train.eval_batches)
print(json.dumps({"losses": losses, "eval_loss": ev["loss"], "eval_tokens": ev["tokens"]}))

"""Reference for tests/test_multihost.py: ONE process with 4 devices trains on the global batches that two
hosts would assemble (host 0's rows, then host 1's), and prints the per-step losses as JSON."""

import json
import os
import sys

os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"
os.environ["JAX_PLATFORMS"] = "cpu"

import numpy as np  # noqa: E402

from moe import data as data_lib  # noqa: E402
from moe import train_lib as TL  # noqa: E402
from moe.config import load_config  # noqa: E402
from moe.sharding import make_mesh  # noqa: E402
from moe.tokenizer import load_tokenizer  # noqa: E402

cfg = load_config(sys.argv[1], sys.argv[2:])
tok = load_tokenizer(cfg)
hosts = [data_lib.train_iterator(cfg, tok, i, 2) for i in range(2)]
setup = TL.build(cfg, make_mesh(cfg.mesh))
state, step = TL.init_state(setup), TL.make_train_step(setup)
losses = []
for _ in range(cfg.train.steps):
    parts = [next(h) for h in hosts]
    batch = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
    state, m = step(state, TL.device_batch(setup, batch))
    losses.append(float(m["loss"]))
print(json.dumps(losses))

"""Checkpointer unit checks that need no training run."""

import jax
import jax.numpy as jnp
import numpy as np

from moe.train.checkpoint import Checkpointer, restore_params
from moe.config import CheckpointConfig


def test_relative_workdir_saves_and_restores(tmp_path, monkeypatch):
    # train.py's default workdir is relative (runs/<preset>); Orbax rejects relative paths unless we resolve them.
    monkeypatch.chdir(tmp_path)
    state = {"params": {"w": jnp.arange(6.0).reshape(2, 3)}, "step": jnp.int32(7)}
    ck = Checkpointer("runs/rel", CheckpointConfig(async_save=True), with_data=False)
    ck.save(7, state, {"note": "x"})
    ck.close()
    abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=a.sharding), state)
    step, restored, meta = Checkpointer("runs/rel", CheckpointConfig(), with_data=False).restore_latest(abstract)
    assert step == 7 and meta == {"note": "x"}
    np.testing.assert_array_equal(restored["params"]["w"], state["params"]["w"])
    _, params = restore_params("runs/rel", abstract["params"])
    np.testing.assert_array_equal(params["w"], state["params"]["w"])

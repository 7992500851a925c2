"""Test setup: 8 fake CPU devices (set before jax is imported anywhere) and offline mode."""
import os

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TFDS_DATA_DIR", os.path.join(os.path.dirname(__file__), "..", "runs", "_tfds_test"))
# Persistent compilation cache for the whole session (and the train.py subprocesses, which inherit it): the
# tests compile the same small train steps many times. Same HLO -> same executable, so results are unchanged.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR",
                      os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "runs", "_jax_cache_test")))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")

from moe.runtime.hostmem import set_host_malloc  # noqa: E402

# the default train.host_malloc policy, before JAX starts its threads (in-process train/eval mains then no-op)
set_host_malloc("keep")

import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")


# --- eval harness (tests/test_eval.py, test_generate.py, test_lm_eval.py) ---------------------------
import pytest  # noqa: E402

EVAL_RUN_OVERRIDES = [  # a 2-layer MoE (4 experts) that learns Python keyword statistics in ~60 steps
    "model.num_layers=2", "model.d_model=64", "model.d_ff=128", "model.num_experts=4", "train.steps=60",
    "train.batch_size=8", "train.seq_len=64", "train.eval_every=0", "train.eval_batches=1", "train.log_every=30",
    "train.progress=false", "optim.lr=1e-2", "optim.warmup_steps=10", "checkpoint.every=30",
    "checkpoint.async_save=false",
]


@pytest.fixture(scope="session")
def eval_workdir(tmp_path_factory) -> str:
    """A trained tiny run (checkpoints at steps 30 and 60), trained once per session in-process."""
    from moe.train import loop
    from moe.config import load_config

    workdir = str(tmp_path_factory.mktemp("eval_run").resolve())
    root = os.path.join(os.path.dirname(__file__), "..")
    loop.train(load_config(os.path.join(root, "configs", "tiny.yaml"), EVAL_RUN_OVERRIDES), workdir)
    return workdir

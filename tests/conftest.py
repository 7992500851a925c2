"""Test setup: 8 fake CPU devices (set before jax is imported anywhere) and offline mode."""
import os

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TFDS_DATA_DIR", os.path.join(os.path.dirname(__file__), "..", "runs", "_tfds_test"))

import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")

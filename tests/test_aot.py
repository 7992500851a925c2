"""AOT compile for Cloud TPU topologies from this CPU host (moe/launch/aot.py): a small MoE compiles for v5e:2x2
with expert parallelism and fits; a bad topology is a clear error; an absurd model is `fits: no`. Also the
memory lever the GLaM presets' fits rely on: the sequence-chunked cross-entropy equals the one-shot one.

The compile tests need libtpu (the `jax[tpu]` extra) and are skipped without it.
"""

import importlib.util
import json

import jax
import jax.numpy as jnp
import pytest
from flax import nnx

from moe.launch import aot  # sets the libtpu environment before libtpu loads
from moe.model import decoder
from moe.config import load_config

needs_libtpu = pytest.mark.skipif(importlib.util.find_spec("libtpu") is None, reason="needs libtpu (jax[tpu])")

SMALL = ["model.vocab_size=512", "model.d_model=64", "model.num_heads=2", "model.d_ff=128", "model.num_layers=2",
         "model.num_experts=4", "train.batch_size=8", "train.seq_len=32", "optim.name=adafactor",
         "mesh.data=-1", "mesh.expert=2"]


@pytest.fixture(scope="module")
def small_report():
    cfg = load_config("configs/tiny.yaml", SMALL)
    return cfg, aot.compile_report(cfg, "v5e:2x2")


@needs_libtpu
def test_small_moe_fits_v5e_with_all_to_all(small_report):
    cfg, r = small_report
    assert r["devices"] == 4 and r["device_kind"] == "TPU v5 lite"
    assert r["mesh"] == {"data": 2, "fsdp": 1, "expert": 2, "tensor": 1}
    assert r["hbm_bytes_per_device"] == 16 * aot.GiB
    assert r["fits"] and not r["oom"]
    # The donated state is the arguments' bulk: 4 experts split 2 ways, the rest replicated.
    assert r["state_bytes_per_device"] <= r["argument_bytes"] < r["state_bytes_per_device"] + 2**20
    assert r["alias_bytes"] >= r["state_bytes_per_device"]  # donation really aliases the state
    assert 0 < r["peak_bytes"] < 2**30 and r["temp_bytes"] > 0
    assert r["model_flops_per_step"] == pytest.approx(6 * (r["params_active"]) * 256 + 12 * 2 * 64 * 32 * 256,
                                                      rel=0.01)  # PaLM app. B; tied embeddings, 256 tokens
    assert r["collectives"]["all-to-all"] >= 2  # tokens to their experts' devices and back
    assert r["collectives"]["all-reduce"] + r["collectives"]["reduce-scatter"] >= 1  # gradients over `data`
    text = aot.format_report(r)
    assert text.splitlines()[-1].startswith("fits: yes (peak ") and text.endswith("of 16.00 GiB HBM)")


@needs_libtpu
def test_scanned_weights_are_cast_per_layer_not_hoisted():
    """The bf16 copy of the scanned weight stacks must not be made before the layer loop (moe.model.layers.
    cast_here): with `astype`, XLA:TPU converts each whole [L, ...] stack once and keeps it through the
    forward and backward loops (3 GiB per chip at GLaM 64B/64E)."""
    cfg = load_config("configs/tiny.yaml", [*SMALL, "model.num_layers=8", "model.remat=full"])
    with jax.default_matmul_precision("default"):
        r = aot.compile_report(cfg, "v5e:2x2", keep_hlo=True)
    blocks, e_local, d, f = 4, 2, 64, 128  # 8 layers = 4 scanned (dense, MoE) blocks; 4 experts over expert=2
    stacked = {f"bf16[{blocks},{e_local},{d},{f}]", f"bf16[{blocks},{e_local},{f},{d}]",  # expert weights
               f"bf16[{blocks},{d},{f}]", f"bf16[{blocks},{f},{d}]"}  # the dense layers' FFN
    assert f"f32[{blocks},{e_local},{d},{f}]" in r["hlo"]  # the fp32 stacks are there ...
    assert not [s for s in stacked if s in r["hlo"]]  # ... their bf16 copies are not


@needs_libtpu
def test_bad_topology_is_a_clear_error(capsys, tmp_path):
    cfg = load_config("configs/tiny.yaml", SMALL)
    with pytest.raises(aot.TopologyError, match="not a TPU topology.*v5e:8x8"):
        aot.topology_devices("v5e-eight")
    with pytest.raises(aot.TopologyError, match="unknown TPU topology 'v9:2x2'"):
        aot.topology_devices("v9:2x2")
    assert aot.aot_main(cfg, "v5e:3x7", str(tmp_path / "r.json")) == 2
    assert "v5e:3x7" in capsys.readouterr().err and not (tmp_path / "r.json").exists()


@needs_libtpu
def test_hbm_per_device():
    assert aot.hbm_bytes(aot.topology_devices("v4:2x2x1")[0]) == 32 * aot.GiB  # megacore: one device per chip
    assert aot.hbm_bytes(aot.topology_devices("v3:2x2")[0]) == 16 * aot.GiB  # one device per core
    assert aot.hbm_bytes(aot.topology_devices("v5p:2x2x1")[0]) == 95 * aot.GiB


@needs_libtpu
def test_absurd_model_does_not_fit(capsys, tmp_path):
    # A dense 2-layer model with D=16384, F=131072: 13 G params, 52 GB of fp32 weights per v5e chip.
    cfg = load_config("configs/tiny.yaml", ["model.num_experts=0", "model.d_model=16384", "model.d_ff=131072",
                                            "model.num_layers=2", "model.num_heads=8", "model.vocab_size=512",
                                            "train.batch_size=4", "train.seq_len=32", "mesh.data=-1"])
    path = tmp_path / "r.json"
    assert aot.aot_main(cfg, "v5e:2x2", str(path)) == 1
    out = capsys.readouterr().out
    assert "fits: no (peak " in out and "of 16.00 GiB HBM)" in out
    r = json.loads(path.read_text())
    assert r["fits"] is False and r["oom"] is True
    assert r["state_bytes_per_device"] > 16 * aot.GiB


def test_loss_chunk_rule():
    assert decoder.loss_chunk_len(1024, 256_000) == 64  # GLaM: 16 chunks of 64 tokens x 256k logits
    assert decoder.loss_chunk_len(128, 8192) == 128  # small models: one shot
    assert decoder.loss_chunk_len(1000, 2**20) == 10  # largest divisor of T with chunk * V <= 2^24
    assert decoder.loss_chunk_len(7, 2**25) == 1


@pytest.mark.parametrize("tied", [True, False])
def test_chunked_cross_entropy_equals_one_shot(monkeypatch, tied):
    cfg = load_config("configs/tiny.yaml", ["model.dtype=float32", "model.vocab_size=512", "model.num_layers=2",
                                            "model.logit_z_loss=1e-3",
                                            f"model.tie_embeddings={str(tied).lower()}"]).model
    model = decoder.Decoder(cfg, nnx.Rngs(0))
    k1, k2 = jax.random.split(jax.random.key(1))
    batch = {"inputs": jax.random.randint(k1, (2, 64), 0, 512), "targets": jax.random.randint(k2, (2, 64), 0, 512),
             "weights": (jnp.arange(64) % 5 != 0).astype(jnp.float32)[None].repeat(2, 0)}
    grad = nnx.jit(nnx.value_and_grad(lambda m: decoder.loss_fn(m, batch, train=True), has_aux=True))
    (l_one, m_one), g_one = grad(model)
    monkeypatch.setattr(decoder, "LOSS_CHUNK_LOGITS", 16 * 512)  # 4 chunks of 16 tokens
    assert decoder.loss_chunk_len(64, 512) == 16
    (l_chunk, m_chunk), g_chunk = nnx.jit(nnx.value_and_grad(lambda m: decoder.loss_fn(m, batch, train=True),
                                                             has_aux=True))(model)
    assert float(l_chunk) == pytest.approx(float(l_one), rel=1e-5)
    assert float(m_chunk["logit_z_loss"]) == pytest.approx(float(m_one["logit_z_loss"]), rel=1e-5)
    for a, b in zip(jax.tree.leaves(nnx.state(g_one)), jax.tree.leaves(nnx.state(g_chunk))):
        assert float(jnp.max(jnp.abs(a - b))) <= 1e-5 * float(jnp.max(jnp.abs(a))) + 1e-7

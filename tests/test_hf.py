"""Hugging Face export against transformers itself: a folder we write is loaded by
`AutoModelForCausalLM.from_pretrained` in a separate Python 3.11 environment with torch (.venv-hf, built by
`make test`; torch has a CPU wheel here only for 3.11), and its log-softmax must equal ours (fp32, our model
dropless): max |difference| <= 1e-4 and the same argmax everywhere, with eager and with sdpa attention.
Measured here: 1.0e-6 to 6.7e-6 over the five cases (printed with -s).
"""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from moe.config import load_config
from moe.hf import export, mapping
from moe.hf.cli import main as hf_main
from moe.model.decoder import Decoder

REPO = Path(__file__).resolve().parent.parent
HF_PY = REPO / ".venv-hf" / "bin" / "python"
TOL = 1e-4  # whole model, fp32

# (name, overrides on configs/tiny.yaml, the class auto must choose)
CASES = [
    ("qwen3_moe", ["model.qk_norm=true", "model.ffn_act=geglu", "model.tie_embeddings=true", "model.moe_every=2",
                   "model.num_heads=4", "model.num_kv_heads=2", "model.head_dim=24", "model.d_model=64",
                   "model.d_ff=48", "model.num_experts=4", "model.vocab_size=96"], "Qwen3MoeForCausalLM"),
    ("mixtral", ["model.moe_every=1", "model.ffn_act=swiglu", "model.tie_embeddings=false", "model.num_heads=4",
                 "model.num_kv_heads=2", "model.d_model=64", "model.d_ff=48", "model.num_experts=4",
                 "model.vocab_size=96", "model.num_layers=2"], "MixtralForCausalLM"),
    ("qwen2_moe", [], "Qwen2MoeForCausalLM"),  # the default preset (tiny) as it is
    ("qwen2_moe", ["model.num_kv_heads=2", "model.head_dim=48", "model.d_model=64", "model.d_ff=48",
                   "model.vocab_size=96", "model.top_k=1", "model.renormalize_gates=false"], "Qwen2MoeForCausalLM"),
    ("llama", ["model.num_experts=0", "model.d_model=64", "model.d_ff=48", "model.vocab_size=96",
               "model.tie_embeddings=false"], "LlamaForCausalLM"),
]


def _model(overrides, seed=0):
    cfg = load_config("configs/tiny.yaml", [*overrides, "model.dispatch=dropless", "model.dtype=float32"]).model
    model = Decoder(cfg, nnx.Rngs(params=seed))
    graphdef, state = nnx.split(model)
    params = nnx.to_pure_dict(state)
    # norms start at exactly 1 and would hide a swapped or missing norm weight: move them off 1
    flat, tree = jax.tree_util.tree_flatten_with_path(params)
    keys = jax.random.split(jax.random.PRNGKey(seed + 1), len(flat))
    leaves = [x + 0.3 * jax.random.normal(k, x.shape, x.dtype) if "scale" in jax.tree_util.keystr(p) else x
              for (p, x), k in zip(flat, keys)]
    return cfg, graphdef, jax.tree.unflatten(tree, leaves)


def _ours(cfg, graphdef, params, tokens):
    logits, _ = nnx.merge(graphdef, params)(jnp.asarray(tokens), train=False)
    return np.asarray(jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1))


def _theirs(folder: Path, tokens: np.ndarray, tmp: Path) -> dict:
    np.save(tmp / "tokens.npy", tokens)
    p = subprocess.run([str(HF_PY), str(REPO / "tests" / "helpers" / "hf_logits.py"), str(folder),
                        str(tmp / "tokens.npy"), str(tmp / "out.npz")], capture_output=True, text=True, timeout=600,
                       env=dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1"))
    assert p.returncode == 0, p.stderr[-3000:]
    return dict(np.load(tmp / "out.npz"))


@pytest.mark.parametrize("name,overrides,cls", CASES, ids=["qwen3_moe", "mixtral", "tiny", "qwen2_moe_gqa", "llama"])
def test_export_matches_transformers(name, overrides, cls, tmp_path):
    cfg, graphdef, params = _model(overrides)
    assert mapping.choose_arch(cfg) == name
    summary = export.write_folder(cfg, params, str(tmp_path / "hf"), dtype="float32", max_positions=64)
    tokens = np.random.default_rng(0).integers(0, cfg.vocab_size, (2, 24))
    ours = _ours(cfg, graphdef, params, tokens)
    theirs = _theirs(tmp_path / "hf", tokens, tmp_path)
    assert str(theirs["class"]) == cls
    for impl in ("eager", "sdpa"):
        diff = float(np.max(np.abs(theirs[impl] - ours)))
        print(f"\n{name} ({impl}): max |log-softmax diff| = {diff:.2e}; {summary['files']} file(s)")
        assert diff <= TOL
        assert np.array_equal(theirs[impl].argmax(-1), ours.argmax(-1))


def test_sharded_export_writes_an_index_transformers_loads(tmp_path):
    cfg, graphdef, params = _model(CASES[0][1])
    s = export.write_folder(cfg, params, str(tmp_path / "hf"), dtype="float32", max_positions=64,
                            max_shard_bytes=200_000)
    index = json.loads((tmp_path / "hf" / "model.safetensors.index.json").read_text())
    assert s["files"] > 2 and len(set(index["weight_map"].values())) == s["files"]
    assert not (tmp_path / "hf" / "model.safetensors").exists()
    tokens = np.arange(20).reshape(1, 20) % cfg.vocab_size
    theirs = _theirs(tmp_path / "hf", tokens, tmp_path)
    assert float(np.max(np.abs(theirs["eager"] - _ours(cfg, graphdef, params, tokens)))) <= TOL


def test_export_to_a_bucket_uploads_config_json_last_and_cleans_up_a_failed_upload(tmp_path, monkeypatch):
    import glob
    import tempfile

    from moe.runtime import storage

    cfg, _, params = _model(CASES[1][1])
    kw = dict(dtype="float32", max_positions=64, max_shard_bytes=150_000)
    export.write_folder(cfg, params, str(tmp_path / "local"), **kw)
    uploads = []
    real = storage.copy_file
    monkeypatch.setattr(storage, "copy_file", lambda a, b: (uploads.append(os.path.basename(b)), real(a, b)))
    s = export.write_folder(cfg, params, f"file://{tmp_path}/bucket/hf", **kw)
    assert s["out"] == f"file://{tmp_path}/bucket/hf" and uploads[-1] == "config.json"
    local, remote = tmp_path / "local", tmp_path / "bucket" / "hf"
    assert sorted(os.listdir(remote)) == sorted(os.listdir(local))
    assert all((remote / n).read_bytes() == (local / n).read_bytes() for n in os.listdir(local))
    with pytest.raises(mapping.HFError, match="exists and is not an empty folder"):
        export.write_folder(cfg, params, f"file://{tmp_path}/bucket/hf", **kw)

    def flaky(a, b):  # the connection drops at the third object
        if len(uploads) == 2:
            raise OSError("connection reset")
        uploads.append(b)
        real(a, b)

    uploads.clear()
    monkeypatch.setattr(storage, "copy_file", flaky)
    with pytest.raises(OSError, match="connection reset"):
        export.write_folder(cfg, params, f"file://{tmp_path}/bucket/cut", **kw)
    assert not (tmp_path / "bucket" / "cut").exists() or not os.listdir(tmp_path / "bucket" / "cut")
    assert not glob.glob(os.path.join(tempfile.gettempdir(), "moe-hf-export-*"))


def test_unrepresentable_configs_are_one_line_errors_naming_the_field(tmp_path):
    for extra, field in ((["model.num_shared_experts=1"], "model.num_shared_experts"),
                         (["model.router_score=sigmoid", "model.routed_scaling_factor=2.5"], "model.router_score"),
                         (["model.router_bias_update_rate=1e-3"], "model.router_bias_update_rate")):
        cfg = load_config("configs/tiny.yaml", extra).model
        with pytest.raises(mapping.HFError, match=field.replace(".", r"\.")):
            mapping.choose_arch(cfg)
    cfg = load_config("configs/tiny.yaml", []).model
    with pytest.raises(mapping.HFError, match=r"cannot export as mixtral: model\.moe_every=2"):
        mapping.choose_arch(cfg, "mixtral")
    with pytest.raises(mapping.HFError, match=r"cannot export as qwen3_moe: model\.qk_norm=false"):
        mapping.choose_arch(cfg, "qwen3_moe")


def test_every_preset_exports_to_some_class():
    chosen = {p.name: mapping.choose_arch(load_config(str(p), []).model) for p in sorted((REPO / "configs").glob("*.yaml"))}
    assert set(chosen.values()) <= set(mapping.ARCHS)
    assert chosen["tiny.yaml"] == "qwen2_moe" and chosen["tiny_dense.yaml"] == "llama"


def test_cli_exports_a_trained_run_and_refuses_a_non_empty_out(tmp_path, capsys):
    import train

    wd = tmp_path / "run"
    assert train.main(["--workdir", str(wd), "model.num_layers=2", "model.d_model=64", "model.d_ff=128",
                       "train.batch_size=8", "train.seq_len=64", "train.steps=2", "train.eval_every=0",
                       "train.eval_batches=1", "train.progress=false", "checkpoint.every=2"]) == 0
    assert hf_main(["export", "--workdir", str(wd), "--out", str(tmp_path / "hf")]) == 0
    out = capsys.readouterr().out
    assert "step 2 as qwen2_moe (bfloat16" in out
    assert {"config.json", "generation_config.json", "model.safetensors", "tokenizer.model", "tokenizer.json",
            "tokenizer_config.json"} == set(os.listdir(tmp_path / "hf"))
    assert hf_main(["export", "--workdir", str(wd), "--out", str(tmp_path / "hf")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "exists and is not an empty folder" in err[0]
    assert hf_main(["export", "--workdir", str(wd), "--out", str(tmp_path / "m"), "--arch", "mixtral"]) == 2
    assert "model.moe_every=2" in capsys.readouterr().err and not (tmp_path / "m").exists()
    assert not [p for p in os.listdir(tmp_path) if ".tmp-" in p]  # nothing half-written left beside


# --- import: checkpoints transformers itself wrote ---------------------------------------------------

HF_MODELS = [  # (model_type, config kwargs): random weights, saved by save_pretrained (Hub layout, fp32)
    ("qwen3_moe", dict(vocab_size=96, hidden_size=64, intermediate_size=48, moe_intermediate_size=48,
                       num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, head_dim=24, num_experts=4,
                       num_experts_per_tok=2, decoder_sparse_step=1, mlp_only_layers=[1, 3], norm_topk_prob=True,
                       hidden_act="silu", tie_word_embeddings=False, rms_norm_eps=1e-6)),
    ("mixtral", dict(vocab_size=96, hidden_size=64, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                     num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2, tie_word_embeddings=False,
                     rms_norm_eps=1e-5, rope_theta=1e6)),
]


def _hf_model(model_type, kwargs, tmp: Path, tokens) -> np.ndarray:
    np.save(tmp / "tokens.npy", tokens)
    p = subprocess.run([str(HF_PY), str(REPO / "tests" / "helpers" / "hf_make.py"), model_type, json.dumps(kwargs),
                        str(tmp / "src"), str(tmp / "tokens.npy"), str(tmp / "src.npz")], capture_output=True,
                       text=True, timeout=600, env=dict(os.environ, HF_HUB_OFFLINE="1"))
    assert p.returncode == 0, p.stderr[-3000:]
    return np.load(tmp / "src.npz")["logp"]


def _load(folder: Path, dtype="float32"):
    from moe.hf import load
    from moe.runtime.sharding import make_mesh
    from moe.train import steps as train_steps

    hf = load.read_config(str(folder))
    ov = [f"model.{k}={json.dumps(v) if isinstance(v, bool) else v}" for k, v in load.model_overrides(hf).items()]
    cfg = load_config("configs/tiny.yaml", [*ov, "model.dispatch=dropless", f"model.dtype={dtype}"])
    setup = train_steps.build(cfg, make_mesh(cfg.mesh))
    params = load.load_params(cfg.model, str(folder), setup.abstract_state["params"], setup.state_shardings["params"])
    return cfg.model, setup.graphdef, params


@pytest.mark.parametrize("model_type,kwargs", HF_MODELS, ids=[m[0] for m in HF_MODELS])
def test_import_of_a_transformers_checkpoint_computes_its_function_and_exports_back_bitwise(model_type, kwargs,
                                                                                            tmp_path):
    """Measured: max |log-softmax diff| 1e-6 to 5e-6; every tensor of export(import(x)) equal to x's bits."""
    from safetensors.numpy import load_file

    tokens = np.random.default_rng(1).integers(0, kwargs["vocab_size"], (2, 24))
    theirs = _hf_model(model_type, kwargs, tmp_path, tokens)
    cfg, graphdef, params = _load(tmp_path / "src")
    ours = _ours(cfg, graphdef, params, tokens)
    diff = float(np.max(np.abs(theirs - ours)))
    print(f"\nimport {model_type}: max |log-softmax diff| = {diff:.2e}")
    assert diff <= TOL and np.array_equal(theirs.argmax(-1), ours.argmax(-1))
    export.write_folder(cfg, params, str(tmp_path / "back"), arch=model_type, dtype="float32", max_positions=64)
    src, back = load_file(str(tmp_path / "src" / "model.safetensors")), load_file(str(tmp_path / "back" / "model.safetensors"))
    assert sorted(src) == sorted(back)
    assert all(src[k].dtype == back[k].dtype and np.array_equal(src[k].view(np.uint32), back[k].view(np.uint32))
               for k in src)


def test_bad_hf_folders_are_one_line_errors(tmp_path):
    from moe.hf import load

    tokens = np.zeros((1, 4), np.int64)
    _hf_model(*HF_MODELS[1], tmp_path, tokens)
    src = tmp_path / "src"

    def attempt(folder):
        from moe.runtime.sharding import make_mesh
        from moe.train import steps as train_steps

        c = load_config("configs/tiny.yaml", [f"model.{k}={json.dumps(v) if isinstance(v, bool) else v}"
                                              for k, v in load.model_overrides(load.read_config(str(folder))).items()])
        s = train_steps.build(c, make_mesh(c.mesh))
        load.load_params(c.model, str(folder), s.abstract_state["params"], s.state_shardings["params"])

    bad = tmp_path / "bad"
    shutil.copytree(src, bad)
    conf = json.loads((src / "config.json").read_text())
    (bad / "config.json").write_text(json.dumps(dict(conf, model_type="gpt_oss")))
    with pytest.raises(load.HFError, match="model_type 'gpt_oss' is not supported"):
        attempt(bad)
    (bad / "config.json").write_text(json.dumps(dict(conf, hidden_size=32)))
    with pytest.raises(load.HFError, match=r"tensor 'model\.\S+' has shape \(\d+, 64\), the config implies \(\d+, 32\)"):
        attempt(bad)
    (bad / "config.json").write_text(json.dumps(conf))
    raw = (src / "model.safetensors").read_bytes()
    (bad / "model.safetensors").write_bytes(raw[: len(raw) // 2])  # truncated
    with pytest.raises(load.HFError, match="model.safetensors"):
        attempt(bad)
    (bad / "model.safetensors").unlink()
    with pytest.raises(load.HFError, match="has no model.safetensors"):
        attempt(bad)


def _train(*args) -> subprocess.CompletedProcess:
    """train.py in a subprocess on this host's own devices (as a user runs it)."""
    env = dict(os.environ, XLA_FLAGS=os.environ.get("XLA_FLAGS", "").replace(
        "--xla_force_host_platform_device_count=8", "").strip())
    return subprocess.run([sys.executable, "train.py", *args], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=600)


def test_continued_pretraining_from_a_transformers_checkpoint(tmp_path, capsys):
    """An HF folder as the Hub has them (weights by save_pretrained, a byte-level tokenizer.json without BOS):
    import writes config.yaml, the tokenizer and checkpoint 0; train.py resumes from step 0 and is bit-identical
    to a run that loads the folder itself (train.init_from=hf:DIR); a fresh model's first loss differs."""
    from moe.train.metrics import read_metrics
    from tests.helpers.byte_level import write_byte_level_tokenizer

    kwargs = dict(HF_MODELS[1][1], vocab_size=1024)  # the model's table is wider than the tokenizer (as Qwen3's)
    src = tmp_path / "src"
    _hf_model(HF_MODELS[1][0], kwargs, tmp_path, np.zeros((1, 4), np.int64))
    write_byte_level_tokenizer(str(src), 1000)
    run = ["train.steps=2", "train.batch_size=8", "train.seq_len=32", "train.eval_every=0", "train.eval_batches=1",
           "train.progress=false", "checkpoint.every=2", "train.log_every=1"]
    wd = tmp_path / "cpt"
    assert hf_main(["import", str(src), "--workdir", str(wd), *run, "model.d_ff=64"]) == 2
    assert "set model.d_ff=48" in capsys.readouterr().err  # the model is the checkpoint's: an override is refused
    assert not (wd / "checkpoints").exists()
    assert hf_main(["import", str(src), "--workdir", str(wd), *run]) == 0
    assert "a step-0 checkpoint" in capsys.readouterr().out
    assert {"config.yaml", "tokenizer.json", "tokenizer_config.json", "checkpoints"} <= set(os.listdir(wd))
    assert os.listdir(wd / "checkpoints") == ["0"]
    conf = str(wd / "config.yaml")
    text = (wd / "config.yaml").read_text()
    assert f"init_from: hf:{src}" in text and "num_experts: 4" in text and f"tokenizer: {wd / 'tokenizer.json'}" in text
    first = _train("--config", conf, "--workdir", str(wd))
    assert first.returncode == 0 and "resumed from step 0" in first.stderr, first.stderr[-2000:]
    direct = _train("--config", conf, "--workdir", str(tmp_path / "direct"))
    assert direct.returncode == 0 and f"initialised params from hf:{src}" in direct.stderr, direct.stderr[-2000:]
    fresh = _train("--config", conf, "--workdir", str(tmp_path / "fresh"), "train.init_from=")
    assert fresh.returncode == 0, fresh.stderr[-2000:]
    losses = lambda w: [r["loss"] for r in read_metrics(w)]  # noqa: E731
    sha = lambda w: json.loads((w / "summary.json").read_text())["params_sha"]  # noqa: E731
    assert losses(wd) == losses(tmp_path / "direct") and sha(wd) == sha(tmp_path / "direct")
    assert losses(wd)[0] != losses(tmp_path / "fresh")[0]
    again = _train("--config", conf, "--workdir", str(wd), "train.steps=3")
    assert again.returncode == 0 and "resumed from step 2" in again.stderr and "initialised params" not in again.stderr
    assert hf_main(["import", str(src), "--workdir", str(wd), *run]) == 2
    assert "already has checkpoints" in capsys.readouterr().err
    # and back out: the continued model with the tokenizer it came with, its special ids in config.json
    assert hf_main(["export", "--workdir", str(wd), "--out", str(tmp_path / "out")]) == 0
    assert (tmp_path / "out" / "tokenizer.json").read_bytes() == (src / "tokenizer.json").read_bytes()
    eot = json.loads((src / "tokenizer.json").read_text())["added_tokens"][0]["id"]
    conf_out = json.loads((tmp_path / "out" / "config.json").read_text())
    assert (conf_out["bos_token_id"], conf_out["eos_token_id"], conf_out["vocab_size"]) == (eot, eot, 1024)


def test_a_sharded_folder_imports_to_the_same_params(tmp_path):
    cfg, graphdef, params = _model(CASES[1][1])
    export.write_folder(cfg, params, str(tmp_path / "hf"), dtype="float32", max_positions=64, max_shard_bytes=150_000)
    assert (tmp_path / "hf" / "model.safetensors.index.json").exists()
    _, _, back = _load(tmp_path / "hf")
    same = jax.tree.map(lambda a, b: np.array_equal(np.asarray(a), np.asarray(b)), params, back)
    assert all(jax.tree.leaves(same))

"""Config: presets load, nested overrides, --help lists every key, and the bad-config catalogue.

Every bad configuration must fail in `load_config` (before jax is touched) with a one-line `ConfigError`
that names the offending key; mesh-vs-devices checks run in `moe.runtime.sharding.make_mesh`, also before compiling.
"""

import glob
import re

import pytest

import train
from moe import config
from moe.config import ConfigError, load_config

TINY = "configs/tiny.yaml"


@pytest.mark.parametrize("path", sorted(glob.glob("configs/*.yaml")))
def test_every_preset_loads(path):
    cfg = load_config(path)
    assert cfg.name == path.split("/")[-1][:-5] or cfg.name  # a preset may set its own name
    assert config.from_dict(config.to_dict(cfg)) == cfg  # the resolved config round-trips (what WORKDIR/config.yaml holds)


def test_nested_overrides_and_types():
    cfg = load_config(TINY, ["model.num_experts=16", "optim.name=lion", "train.steps=7", "optim.lr=1e-4",
                             "model.qk_norm=true", "data.files=a.txt,b.txt", "name=x"])
    assert (cfg.model.num_experts, cfg.optim.name, cfg.train.steps, cfg.optim.lr) == (16, "lion", 7, 1e-4)
    assert cfg.model.qk_norm is True and cfg.data.files == ("a.txt", "b.txt") and cfg.name == "x"
    base = load_config(TINY)
    assert cfg.model.d_model == base.model.d_model  # untouched siblings keep the preset's values


def test_preset_base_inheritance(tmp_path):
    (tmp_path / "child.yaml").write_text(f"base: {(tmp_path.cwd() / TINY).resolve()}\nmodel:\n  num_layers: 2\n")
    cfg = load_config(tmp_path / "child.yaml")
    tiny = load_config(TINY)
    assert cfg.name == "child" and cfg.model.num_layers == 2
    assert cfg.model.d_model == tiny.model.d_model and cfg.train == tiny.train


def test_help_lists_every_key_with_its_comment(capsys):
    with pytest.raises(SystemExit) as e:
        train.main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for key in config.all_keys():
        if key != "name":
            assert re.search(rf"^\s+{re.escape(key)} = .*# \S", out, re.M), key
    # the key names scripts and sweeps rely on
    for key in ("train.steps", "train.batch_size", "train.seq_len", "train.log_every", "train.eval_every",
                "train.seed", "checkpoint.every", "checkpoint.keep", "optim.name", "optim.lr", "model.num_experts",
                "model.top_k", "model.moe_every", "model.num_layers", "model.d_model"):
        assert key in config.all_keys()


# (overrides, the key the message must name, a fragment of the message). 35 distinct invalid configurations:
# unknown keys, types, ranges, choices, divisibility, and cross-field rules.
BAD = [
    (["model.num_expert=4"], "model.num_experts", "did you mean"),
    (["optim.nme=lion"], "optim.name", "did you mean"),
    (["trian.steps=3"], "train.steps", "did you mean"),
    (["model.num_layers=two"], "model.num_layers", "expected an integer"),
    (["train.steps=1.5"], "train.steps", "expected an integer"),
    (["model.qk_norm=maybe"], "model.qk_norm", "expected true or false"),
    (["optim.lr=fast"], "optim.lr", "expected a number"),
    (["optim.lr=0"], "optim.lr", "positive"),
    (["optim.lr=.nan"], "optim.lr", "positive"),
    (["optim.name=sgd"], "optim.name", "not one of"),
    (["model.dispatch=dropfull"], "model.dispatch", "did you mean 'dropless'"),
    (["train.host_malloc=kept"], "train.host_malloc", "did you mean 'keep'"),
    (["model.top_k=9"], "model.top_k", "<= model.num_experts"),
    (["model.top_k=0"], "model.top_k", ">= 1"),
    (["model.num_layers=3"], "model.moe_every", "must divide model.num_layers"),
    (["model.num_heads=3"], "model.num_heads", "must divide model.d_model"),
    (["model.num_kv_heads=3"], "model.num_kv_heads", "must divide model.num_heads"),
    (["model.d_model=0"], "model.d_model", "> 0"),
    (["model.capacity_factor=0"], "model.capacity_factor", "> 0"),
    (["model.router_jitter=1.5"], "model.router_jitter", "[0, 1)"),
    (["optim.b1=1"], "optim.b1", "[0, 1)"),
    (["optim.grad_accum=3"], "optim.grad_accum", "must divide train.batch_size"),
    (["train.spike_factor=0.5"], "train.spike_factor", "> 1"),
    (["checkpoint.keep=0"], "checkpoint.keep", ">= 1"),
    (["mesh.data=-1", "mesh.fsdp=-1"], "mesh", "at most one"),
    (["data.source=tfds"], "data.tfds_name", "required"),
    (["data.source=packages"], "data.packages", "required"),
    (["data.validation_fraction=1"], "data.validation_fraction", "(0, 1)"),
    (["model=3"], "'model'", "unknown config key"),
    (["train.batch_size"], "train.batch_size", "key.sub=value"),
    (["model.router_score=sigmoid", "model.renormalize_gates=false"], "model.routed_scaling_factor", "sigmoid"),
    (["model.router_bias_update_rate=-1e-3"], "model.router_bias_update_rate", ">= 0"),
    (["model.router_bias_update_rate=1e-3", "model.top_k=8"], "model.router_bias_update_rate", "no effect"),
    (["model.num_experts=0", "model.seq_aux_loss_weight=1e-4"], "model.seq_aux_loss_weight", "dense"),
    (["model.drop_policy=token"], "model.drop_policy", "not one of"),
    (["model.router_score=relu"], "model.router_score", "not one of"),
]


@pytest.mark.parametrize("overrides, key, fragment", BAD, ids=[" ".join(b[0]) for b in BAD])
def test_bad_config_one_line_naming_the_key(overrides, key, fragment):
    with pytest.raises(ConfigError) as e:
        load_config(TINY, overrides)
    msg = str(e.value)
    assert "\n" not in msg and key in msg and fragment in msg, msg


def test_bad_preset_files(tmp_path):
    cases = {"missing.yaml": (None, "not found"), "list.yaml": ("- 1\n- 2\n", "mapping"),
             "broken.yaml": ("model: [1,\n", "not valid YAML"), "loop.yaml": ("base: loop.yaml\n", "circular"),
             "scalar.yaml": ("model: 3\n", "model: expected a section")}
    for name, (text, fragment) in cases.items():
        if text is not None:
            (tmp_path / name).write_text(text)
        with pytest.raises(ConfigError, match=re.escape(fragment)) as e:
            load_config(tmp_path / name)
        assert fragment == "model: expected a section" or name in str(e.value)


def test_mesh_that_does_not_match_the_devices():
    import jax

    from moe.runtime.sharding import make_mesh

    cfg = load_config(TINY, ["mesh.data=3"])  # 8 fake devices: 3 does not divide them
    with pytest.raises(ConfigError, match="mesh") as e:
        make_mesh(cfg.mesh)
    assert "\n" not in str(e.value) and str(jax.device_count()) in str(e.value)

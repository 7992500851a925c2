"""Damaged and poisoned checkpoints, restore errors by kind, the rollback ladder, stop signals from the first
instant, and one-line errors for bad invocations (docs/reliability.md has the table these figures fill).

Runs share test_faults.py's model and schedule (OVERRIDES: 12 steps, checkpoints at 4, 8, 12), so the jitted
steps compile once for both files. Figures are printed with -s.
"""

import json
import logging
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest

import train
from moe.config import ConfigError, load_config
from moe.runtime.sharding import make_mesh
from moe.train import integrity
from moe.train import steps as train_steps
from moe.train.checkpoint import Checkpointer
from moe.train.guards import MAX_ROLLBACKS_PER_STEP, Guard
from test_faults import ENV, OVERRIDES, ckpt_steps, losses, reference, run, tiny  # noqa: F401 (fixture)


def copy_run(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def data_files(step_dir: Path) -> list[Path]:
    return sorted((step_dir / "state").rglob("d/*"))


@pytest.fixture(scope="module")
def abstract_state():
    cfg = tiny()
    return train_steps.build(cfg, make_mesh(cfg.mesh)).abstract_state


def restore_verdict(wd: Path, abstract_state) -> tuple[int, list, list[bytes]]:
    """(the step restore_latest resumes from, the steps it set aside with reasons, the restored state's bytes)."""
    ck = Checkpointer(str(wd), tiny().checkpoint, with_data=False)
    try:
        step, state, _ = ck.restore_latest(abstract_state)
        return step, ck.damaged, state_bytes(state)
    finally:
        ck.close()


def state_bytes(state) -> list[bytes]:
    """Every leaf's raw bytes, on the host (typed PRNG keys as their key data)."""
    def raw(x):
        if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
            x = jax.random.key_data(x)
        return np.asarray(x).tobytes()
    return [raw(x) for x in jax.tree.leaves(state)]


# --- bit flips --------------------------------------------------------------------------------------------


def test_random_bit_flips_in_array_data_are_detected_and_fallen_back_from(reference, abstract_state, tmp_path):
    """32 random flips (16 of one bit, 16 of 16 consecutive bytes) in step 12's array data files (a byte drawn
    uniformly over their bytes): each one is caught (unreadable, or a checksum mismatch) and restore falls back
    to step 8 -- or it hit bytes that carry no value, and step 12 restores bit-identical to the unflipped save.
    Such bytes exist: OCDBT leaves b-tree nodes that a later flush of the same save superseded in the data
    folder (here a whole 801-byte file under ocdbt.process_0/d/ is read by no key of the committed version),
    and the layout differs between machines (the CI machine drew one at the 23rd flip). What must never happen is
    a restore of values that differ from the save: before checksums, every flip of a value did that."""
    ref_wd, _, _ = reference
    step, damaged, clean = restore_verdict(ref_wd, abstract_state)
    assert step == 12 and damaged == []
    rng = random.Random(15)
    caught, harmless = {}, []
    for i in range(32):
        wd = copy_run(ref_wd, tmp_path / f"flip{i}")
        files = data_files(wd / "checkpoints" / "12")  # a byte drawn uniformly over all of them: the arrays'
        f = rng.choices(files, weights=[g.stat().st_size for g in files])[0]  # bytes, nearly always
        raw = bytearray(f.read_bytes())
        at = rng.randrange(len(raw) - 16)
        if i % 2 == 0:
            raw[at] ^= 1 << rng.randrange(8)
        else:
            raw[at:at + 16] = bytes(rng.randrange(256) for _ in range(16))
        f.write_bytes(bytes(raw))
        step, damaged, restored = restore_verdict(wd, abstract_state)
        if step == 12:  # nothing was set aside: then nothing restored may differ from the unflipped save
            assert damaged == [] and restored == clean, (i, f.name, at, damaged)
            harmless.append((f.name, at))
        else:
            assert step == 8 and [s for s, _ in damaged] == [12], (i, f.name, at, damaged)
            kind = "checksum" if "checksum mismatch" in damaged[0][1] else "unreadable"
            caught[kind] = caught.get(kind, 0) + 1
        shutil.rmtree(wd)
    print(f"\nbit flips detected and fallen back from: {32 - len(harmless)} / 32 ({caught}); "
          f"in bytes that carry no value (restored bit-identical): {len(harmless)}")
    assert len(harmless) <= 16, harmless  # array bytes are nearly all of the files' bytes


def test_a_flipped_checkpoint_resumes_bit_identically_from_the_older_step(reference, tmp_path):
    ref_wd, ref_summary, ref_losses = reference
    wd = copy_run(ref_wd, tmp_path / "run")
    f = max(data_files(wd / "checkpoints" / "12"), key=lambda p: p.stat().st_size)
    raw = bytearray(f.read_bytes())
    raw[len(raw) // 2] ^= 0x10
    f.write_bytes(bytes(raw))
    summary = run(wd)
    assert summary["params_sha"] == ref_summary["params_sha"] and losses(wd) == ref_losses


def test_checksums_do_not_depend_on_the_mesh():
    x = jax.numpy.arange(64, dtype=jax.numpy.float32).reshape(8, 8)
    mesh = jax.sharding.Mesh(np.asarray(jax.devices()).reshape(8), ("x",))
    sharded = jax.device_put(x, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("x")))
    tree = {"w": x, "n": jax.numpy.arange(3, dtype=jax.numpy.int32), "h": x.astype(jax.numpy.bfloat16)}
    sums = integrity.checksums(tree)
    assert integrity.checksums(dict(tree, w=sharded)) == sums and integrity.nonfinite(tree) == []
    assert integrity.verify(dict(tree, w=x.at[3, 3].add(1e-6)), sums).startswith("checksum mismatch")
    assert integrity.verify(dict(tree, w=x.at[0, 0].set(np.nan)), None).startswith("non-finite")


# --- poisoned, all-damaged, incompatible --------------------------------------------------------------------


def poison(wd: Path, step: int, abstract_state) -> None:
    """Rewrites `step` with NaN params and matching checksums: only the finiteness check can catch it."""
    import orbax.checkpoint as ocp

    ck = Checkpointer(str(wd), tiny().checkpoint)
    out = ck.manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state),
                                                           meta=ocp.args.JsonRestore()))
    ck.close()
    state = dict(out["state"], params=jax.tree.map(lambda a: a * np.nan, out["state"]["params"]))
    shutil.rmtree(wd / "checkpoints" / str(step))
    ck = Checkpointer(str(wd), tiny().checkpoint, with_data=False)
    ck.save(step, state, {k: v for k, v in out["meta"].items() if k != "checksums"})
    ck.close()


def test_a_checkpoint_with_nan_params_is_set_aside_not_resumed_from(reference, abstract_state, tmp_path, caplog):
    """Before: the run resumed from it, rolled back to it 3 times and gave up advising a lower lr."""
    ref_wd, ref_summary, _ = reference
    wd = copy_run(ref_wd, tmp_path / "run")
    poison(wd, 12, abstract_state)
    with caplog.at_level(logging.INFO):
        summary = run(wd)
    assert "non-finite values" in caplog.text and "resumed from step 8" in caplog.text
    assert summary["params_sha"] == ref_summary["params_sha"]


def test_every_step_damaged_is_an_error_that_moves_nothing(reference, tmp_path, capsys):
    ref_wd, _, _ = reference
    wd = copy_run(ref_wd, tmp_path / "run")
    for s in (4, 8, 12):
        for f in data_files(wd / "checkpoints" / str(s)):
            f.write_bytes(f.read_bytes()[:16])
    rc = train.main(["--workdir", str(wd), *OVERRIDES])
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert rc == train.EXIT_BAD_INPUT and err.startswith("error: no sound checkpoint")
    assert all(f"step {s}:" in err for s in (4, 8, 12))
    assert ckpt_steps(wd) == [4, 8, 12] and not (wd / "checkpoints_damaged").exists()


def test_a_data_position_of_another_pipeline_is_an_error_not_damage(reference, tmp_path, capsys):
    ref_wd, _, _ = reference
    wd = copy_run(ref_wd, tmp_path / "run")
    (f,) = (wd / "checkpoints" / "12" / "data").glob("process_*.json")
    f.write_text(json.dumps({"some": "other pipeline"}))
    rc = train.main(["--workdir", str(wd), *OVERRIDES])
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert rc == train.EXIT_BAD_INPUT and "data-iterator position does not fit" in err, err
    assert ckpt_steps(wd) == [4, 8, 12] and not (wd / "checkpoints_damaged").exists()


def test_a_garbled_data_position_is_damage(reference, tmp_path, caplog):
    ref_wd, ref_summary, _ = reference
    wd = copy_run(ref_wd, tmp_path / "run")
    (f,) = (wd / "checkpoints" / "12" / "data").glob("process_*.json")
    f.write_text('{"truncated": ')
    with caplog.at_level(logging.INFO):
        summary = run(wd)
    assert "is not JSON" in caplog.text and "resumed from step 8" in caplog.text
    assert summary["params_sha"] == ref_summary["params_sha"]


def test_changing_num_workers_on_resume_is_an_error_listing_it(reference, tmp_path, capsys):
    """Before: every restore raised KeyError 'exhausted', was taken for damage, and all three checkpoints were
    moved aside; training restarted from step 0 and exited 0."""
    ref_wd, _, _ = reference
    wd = copy_run(ref_wd, tmp_path / "run")
    rc = train.main(["--workdir", str(wd), *OVERRIDES, "train.steps=16", "data.num_workers=2"])
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert rc == train.EXIT_BAD_INPUT and "data.num_workers: 0 (checkpoint) -> 2 (now)" in err
    assert ckpt_steps(wd) == [4, 8, 12] and not (wd / "checkpoints_damaged").exists()


RESUME_CHANGES = {  # every key the config declares resumable, with a changed value
    "name": "renamed", "data.data_dir": None, "optim.max_consecutive_skips": "7", "train.steps": "14",
    "train.log_every": "2", "train.eval_every": "7", "train.eval_batches": "2", "train.init_from": None,
    "train.spike_factor": "3.0", "train.spike_window": "5", "train.progress": "true", "train.host_malloc": "system",
    "mesh.fsdp": "2", "checkpoint.every": "7", "model.attention": "xla", "model.dropless_buffer_factor": "3.0",
    "model.grouped_matmul": "ragged", "model.eval_dropless_buffer_factor": "2.0",
}
# Splash tiles must divide train.seq_len in multiples of 128, which these 64-token runs cannot: their
# resumability is checked on the configs alone (resume_diff is what a resume consults).
# The megablox tiles only act on a TPU (the kernel is Pallas/Mosaic): checked the same way.
TILE_CHANGES = {"model.attention_block_q": "128", "model.attention_block_kv": "256", "model.megablox_tile_m": "256",
                "model.megablox_tile_k": "512", "model.megablox_tile_n": "2048"}


# Keys that only the host reads (logging, schedules of evals and saves, the guard's thresholds): one resume
# changes them all at once. Each other key changes what is compiled, read or restored: one resume each.
HOST_ONLY = ("name", "optim.max_consecutive_skips", "train.steps", "train.log_every", "train.eval_every",
             "train.eval_batches", "train.spike_factor", "train.spike_window", "train.progress",
             "train.host_malloc", "checkpoint.every")


def test_resume_after_changing_each_resumable_key(reference, tmp_path):
    from moe.config import RESUMABLE

    ref_wd, _, _ = reference
    listed = {k for k in RESUMABLE if not k.endswith(".")} | {"mesh.fsdp", "checkpoint.every"}
    assert listed == set(RESUME_CHANGES) | set(TILE_CHANGES), listed ^ (set(RESUME_CHANGES) | set(TILE_CHANGES))
    from moe.config import load_config, resume_diff, to_dict

    long_rows = ["train.seq_len=256"]
    saved = to_dict(load_config("configs/tiny.yaml", long_rows))
    for key, value in TILE_CHANGES.items():
        assert not resume_diff(saved, to_dict(load_config("configs/tiny.yaml", [*long_rows, f"{key}={value}"]))), key
    assert resume_diff(saved, to_dict(load_config("configs/tiny.yaml", ["train.seq_len=128"])))  # the check can fail

    changes = dict(RESUME_CHANGES, **{"data.data_dir": str(tmp_path / "tfds_elsewhere"), "train.init_from": str(ref_wd)})
    saved = to_dict(tiny())
    for key, value in changes.items():  # the rule, key by key; the runs below show the restore follows it
        assert not resume_diff(saved, to_dict(tiny(f"{key}={value}"))), key
    assert set(HOST_ONLY) <= set(changes)
    groups = [list(HOST_ONLY)] + [[k] for k in changes if k not in HOST_ONLY]
    for group in groups:
        wd = copy_run(ref_wd, tmp_path / group[0])
        overrides = {"train.steps": "14", **{k: changes[k] for k in group}}
        summary = run(wd, *(f"{k}={v}" for k, v in overrides.items()))
        assert summary["step"] == 14 and ckpt_steps(wd)[-1] == 14, group
        assert not (wd / "checkpoints_damaged").exists(), group
        shutil.rmtree(wd)
    print(f"\nresumed after changing each of {len(RESUME_CHANGES)} resumable keys ({len(groups)} resumes)")


# --- the rollback ladder ----------------------------------------------------------------------------------


def test_guard_ladder_goes_to_older_checkpoints():
    cfg = tiny()
    g = Guard(cfg.train, cfg.optim)
    assert g.ceiling() is None
    for _ in range(MAX_ROLLBACKS_PER_STEP):
        g.rolled_back(10, 8)
    assert g.ceiling() == 7
    g.rolled_back(9, 4)
    assert g.ceiling() == 7 and g.rollbacks == MAX_ROLLBACKS_PER_STEP + 1
    assert "no older checkpoint" in str(g.give_up(9, "loss spike", 9.0))
    bad = {"loss": 1.0, "param_norm": float("nan"), "skipped_consecutive": 0}
    assert g.verdict(bad) == "non-finite updates"


def test_rollback_ladder_in_training(reference, tmp_path, caplog):
    """NaN batches at 9, 10, 11, 12 with max_consecutive_skips=1: three rollbacks to step 8, then the ladder
    tries step 4 (step 8 is set aside as superseded) and the run finishes."""
    ref_wd, _, _ = reference
    wd = copy_run(ref_wd, tmp_path / "run")
    shutil.rmtree(wd / "checkpoints" / "12")
    with caplog.at_level(logging.WARNING):
        summary = run(wd, "optim.max_consecutive_skips=1", env={"MOE_FAULT_NAN_STEPS": "9,10,11,12"})
    assert caplog.text.count("rolled back to step 8") == MAX_ROLLBACKS_PER_STEP
    assert "rolled back to step 4" in caplog.text
    assert summary["rollbacks"] == MAX_ROLLBACKS_PER_STEP + 1 and summary["step"] == 12
    aside = [p.name.split("-")[0] for p in (wd / "checkpoints_damaged").iterdir()]
    assert aside == ["8"] and "was superseded" in next((wd / "checkpoints_damaged").iterdir()).joinpath(
        "DAMAGED.txt").read_text()


# --- stop signals from the first instant ------------------------------------------------------------------


@pytest.mark.slow
def test_sigterm_at_any_moment_of_start_up_exits_75_with_a_message(tmp_path):
    results = []
    for i, delay in enumerate((0.3, 0.6, 1.0, 1.8, 2.4)):
        p = subprocess.Popen([sys.executable, "train.py", "--workdir", str(tmp_path / f"w{i}"), *OVERRIDES],
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=ENV)
        time.sleep(delay)
        p.send_signal(signal.SIGTERM if i % 2 == 0 else signal.SIGINT)
        out = p.communicate(timeout=120)[0]
        results.append((delay, p.returncode))
        assert p.returncode == train.EXIT_PREEMPTED, (delay, out[-2000:])
        assert "Traceback" not in out and out.strip().splitlines()[-1].startswith("stopped by SIG"), out[-2000:]
    print(f"\nstop signals during start-up -> exit 75: {len(results)} / {len(results)} ({results})")


SIGNAL_AT_IMPORT = """import os, signal, sys
target = sys.argv[1]
sys.argv = ["train.py", "--workdir", *sys.argv[2:]]
def hook(event, args):  # SIGINT to ourselves as `target` starts importing, once train.py's handler is in place
    if event == "import" and args[0] == target and signal.getsignal(signal.SIGINT) is not signal.default_int_handler:
        os.kill(os.getpid(), signal.SIGINT)
sys.addaudithook(hook)
sys.path.insert(0, ".")
import runpy
runpy.run_path("train.py", run_name="__main__")
"""


@pytest.mark.parametrize("module", ["jaxlib._hlo", "numpy._core._exceptions", "google.protobuf.message"])
def test_a_stop_signal_inside_an_import_waits_for_it_and_exits_75(module, tmp_path):
    """jaxlib._hlo is imported by jaxlib._jax's (nanobind) initialisation: a `Preempted` raised inside it used
    to surface as "ImportError: Encountered an error while initializing the extension" (exit 1), or as SIGABRT
    (exit -6, seen once in CI). The others are imported from a Cython and a C extension's initialisation."""
    out = subprocess.run([sys.executable, "-c", SIGNAL_AT_IMPORT, module, str(tmp_path / "w"), *OVERRIDES],
                         capture_output=True, text=True, timeout=120, env=ENV, cwd=Path(__file__).resolve().parents[1])
    assert out.returncode == train.EXIT_PREEMPTED, out.stderr[-2000:]
    assert "Traceback" not in out.stderr and out.stderr.strip().splitlines()[-1].startswith("stopped by SIGINT")

def test_a_stop_signal_inside_a_del_prints_nothing_and_stops_at_the_next_check():
    """A signal whose handler runs inside `__del__` (or a gc callback, as XLA's is) cannot propagate: Python
    would print "Exception ignored in ..." with a traceback. It is kept and raised by `deferred` instead."""
    code = ("import os, signal, time\n"
            "from moe.train import signals\n"
            "signals.raise_on_signal()\n"
            "class D:\n"
            "    def __del__(self):\n"
            "        os.kill(os.getpid(), signal.SIGTERM); time.sleep(0.05)\n"
            "d = D(); del d\n"
            "try:\n"
            "    with signals.deferred():\n"
            "        print('not reached')\n"
            "except signals.Preempted as e:\n"
            "    print('stopped:', e)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                         cwd=Path(__file__).resolve().parents[1])
    assert out.stderr == "" and out.stdout.startswith("stopped: SIGTERM outside the training loop"), out


# --- bad invocations: one `error:` line, exit 2, before compiling --------------------------------------------


def bad_invocations(tmp_path: Path) -> dict[str, tuple[list[str], list[str]]]:
    """name -> (flags, overrides): each must give one `error:` line and exit 2 before anything compiles."""
    import dataclasses

    from moe.config import Config, _hints

    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    presets = {"int_key.yaml": "1: 2\n", "base_list.yaml": "base: [tiny.yaml]\n", "syntax.yaml": "model:\n  d: [1\n",
               "list.yaml": "- 1\n", "section_scalar.yaml": "model: 3\n", "circular.yaml": "base: circular.yaml\n"}
    for name, text in presets.items():
        (tmp_path / name).write_text(text)
    cases = {f"preset {n}": (["--config", str(tmp_path / n)], []) for n in presets}
    cases.update({
        "--config a binary": (["--config", "/bin/ls"], []),
        "--config missing": (["--config", str(tmp_path / "nope.yaml")], []),
        "--workdir a file": (["--workdir", str(a_file)], []),
        "override broken list": ([], ["data.files=[a,"]),
        "override broken map": ([], ["train.steps={"]),
        "override without =": ([], ["train.steps"]),
        "override unknown key": ([], ["train.stpes=3"]),
        "steps beyond int32": ([], ["train.steps=100000000000000000000"]),
        "init_from nowhere": ([], [f"train.init_from={tmp_path / 'no_run'}"]),
        "init_from without steps": ([], [f"train.init_from={tmp_path}"]),
    })
    for sec in dataclasses.fields(Config):
        cls = _hints(Config)[sec.name]
        if dataclasses.is_dataclass(cls):
            for fl in dataclasses.fields(cls):
                if fl.metadata.get("range") is not None:
                    cases[f"{sec.name}.{fl.name}=nan"] = ([], [f"{sec.name}.{fl.name}=.nan"])
    return cases


def test_bad_invocations_give_one_error_line_and_exit_2_before_compiling(tmp_path, capsys, monkeypatch):
    def compile_guard(*_a, **_k):
        raise AssertionError("a bad invocation reached compilation")

    monkeypatch.setattr(train_steps, "make_train_step", compile_guard)
    cases = bad_invocations(tmp_path)
    for name, (flags, overrides) in cases.items():
        rc = train.main(["--workdir", str(tmp_path / "w"), *flags, *OVERRIDES, *overrides])
        err = capsys.readouterr().err.strip().splitlines()
        assert rc == 2 and err and err[-1].startswith("error: "), (name, err[-3:])
        assert "Traceback" not in "\n".join(err), name
    print(f"\nbad invocations -> one error line, exit 2, nothing compiled: {len(cases)} / {len(cases)}")


def test_every_numeric_field_rejects_bad_values_by_name():
    """nan, inf, -1, 0, a huge value and a wrong type for every field with a range: a ConfigError naming the
    field whenever the declared range excludes the value (and never for a value it allows, unless a rule
    across fields names another key)."""
    import dataclasses

    from moe.config import _hints, Config

    tried = rejected = 0
    for sec in dataclasses.fields(Config):
        cls = _hints(Config)[sec.name]
        if not dataclasses.is_dataclass(cls):
            continue
        for fl in dataclasses.fields(cls):
            rng, key = fl.metadata.get("range"), f"{sec.name}.{fl.name}"
            if rng is None:
                continue
            for raw, value in ((".nan", float("nan")), (".inf", float("inf")), ("-1", -1), ("0", 0),
                               ("1e300", 1e300), ("abc", None)):
                tried += 1
                try:
                    load_config("configs/tiny.yaml", [f"{key}={raw}"])
                    ok = True
                except ConfigError as e:
                    ok, msg = False, str(e)
                allowed = value is not None and rng.ok(value) and (
                    _hints(cls)[fl.name] is float or float(value).is_integer())
                if not allowed:
                    rejected += 1
                    assert not ok and key in msg and "\n" not in msg, (key, raw)
                elif not ok:
                    assert key not in msg or "must divide" in msg or "<=" in msg, (key, raw, msg)
    print(f"\nconfig values tried: {tried}, rejected naming the key: {rejected}")

"""Fault injection: kill -9 and SIGTERM with restarts, damaged checkpoints, a full disk during a
save, NaN batches, loss spikes, and the bad-config / bad-data catalogues at the `train.py` level.

Real process deaths (kill -9, SIGTERM, exit codes) run `train.py` as a subprocess; the rest runs in-process
through `train.train` / `train.main`. Every run shares one model and schedule (`OVERRIDES`) so the jitted
steps compile once (persistent cache runs/_jax_cache_test, also handed to the subprocesses, which get the
same matmul precision as this process so that their numbers are comparable bit for bit).
The figures (faults injected, runs resumed, steps lost, bad inputs tried) are printed by the tests that
produce them; run with `-s` to see them.
"""

import hashlib
import json
import logging
import os
import random
import resource
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import pytest

import train
from moe.train import loop
from moe.config import load_config
from moe.train.metrics import read_metrics
from moe.data.tokenizer import load_tokenizer

CACHE = os.environ["JAX_COMPILATION_CACHE_DIR"]  # set by conftest.py

STEPS = 12
OVERRIDES = ["model.num_layers=2", "model.d_model=64", "model.d_ff=128", "train.batch_size=8",
             "train.seq_len=64", f"train.steps={STEPS}", "train.log_every=1", "train.eval_every=0",
             "train.eval_batches=1", "checkpoint.every=4", "train.progress=false", "optim.warmup_steps=5",
             "model.router_bias_update_rate=1e-3"]  # the router bias is train state: resumes must restore it too
ENV = dict(os.environ, JAX_COMPILATION_CACHE_DIR=CACHE, JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
           JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0", JAX_DEFAULT_MATMUL_PRECISION="highest")


def tiny(*extra):
    return load_config("configs/tiny.yaml", OVERRIDES + list(extra))


def run(workdir, *extra, env=None):
    """In-process train.train; `env` sets MOE_FAULT_* hooks for the run. Returns the summary or the exception."""
    with pytest.MonkeyPatch.context() as mp:
        for k, v in (env or {}).items():
            mp.setenv(k, v)
        try:
            return loop.train(tiny(*extra), str(workdir))
        except loop.Preempted as e:
            return e


def losses(workdir):
    return {r["step"]: r["loss"] for r in read_metrics(workdir)}


def ckpt_steps(workdir):
    """Committed checkpoint steps (an interrupted async save leaves a `*.orbax-checkpoint-tmp*` folder)."""
    folder = Path(workdir) / "checkpoints"
    return sorted(int(p.name) for p in folder.iterdir() if p.name.isdigit()) if folder.is_dir() else []


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """An uninterrupted in-process run: (workdir, summary, per-step losses)."""
    wd = tmp_path_factory.mktemp("reference")
    summary = run(wd)
    return wd, summary, losses(wd)


# --- process deaths --------------------------------------------------------------------------------------


def start(workdir, log_name, *extra):
    log = open(Path(workdir).parent / f"{Path(workdir).name}-{log_name}.log", "w")
    p = subprocess.Popen([sys.executable, "train.py", "--workdir", str(workdir), *OVERRIDES, *extra],
                         stdout=log, stderr=subprocess.STDOUT, env=ENV)
    p.log_path = log.name
    return p


def last_step(workdir):
    path = Path(workdir) / "metrics.jsonl"
    try:
        lines = [ln for ln in path.read_text().splitlines() if ln.endswith("}")]
    except FileNotFoundError:
        return 0
    return json.loads(lines[-1])["step"] if lines else 0


def wait_for_step(p, workdir, step, timeout=300):
    t0 = time.time()
    while last_step(workdir) < step:
        assert p.poll() is None, f"run ended (rc {p.returncode}) before step {step}: {Path(p.log_path).read_text()[-2000:]}"
        assert time.time() - t0 < timeout, f"no step {step} after {timeout} s"
        time.sleep(0.02)
    return last_step(workdir)


def resumed_from(p):
    text = Path(p.log_path).read_text()
    marker = "resumed from step "
    return int(text.split(marker)[1].split()[0]) if marker in text else 0


@pytest.fixture(scope="module")
def interrupted(reference, tmp_path_factory):
    """kill -9 at 5 random steps, then a SIGTERM, restarting each time, then a run to the end."""
    wd = tmp_path_factory.mktemp("interrupted") / "run"
    rng = random.Random(8)
    targets = sorted(rng.sample(range(1, STEPS - 1), 5))
    events, at = [], 0
    for i, target in enumerate(targets):
        p = start(wd, f"kill{i}")
        at = wait_for_step(p, wd, max(target, at + 1))  # past the last death: this process made progress
        os.kill(p.pid, signal.SIGKILL)
        p.wait()
        events.append({"kind": "kill -9", "after_step": at, "resumed_from": resumed_from(p), "rc": p.returncode,
                       "committed": ckpt_steps(wd)})  # what had committed when the process died
    p = start(wd, "sigterm")
    at = wait_for_step(p, wd, at + 1)
    t0 = time.time()
    p.send_signal(signal.SIGTERM)
    p.wait(timeout=60)
    stop_s = time.time() - t0
    log = Path(p.log_path).read_text()
    stopped = int(log.split("stopped by SIGTERM at step ")[1].split(";")[0]) if "stopped by SIGTERM" in log else -1
    events.append({"kind": "SIGTERM", "signalled_after": at, "after_step": stopped, "resumed_from": resumed_from(p),
                   "rc": p.returncode, "stop_s": stop_s, "log": log, "committed": ckpt_steps(wd)})
    p = start(wd, "final")
    assert p.wait(timeout=300) == 0, Path(p.log_path).read_text()[-3000:]
    events.append({"kind": "final", "resumed_from": resumed_from(p)})
    # steps lost by an interruption: the work after the checkpoint the next run resumed from
    for before, after in zip(events, events[1:]):
        before["lost"] = before["after_step"] - after["resumed_from"]
    return wd, events


@pytest.mark.slow
def test_kill9_at_random_steps_then_resume_is_bit_identical(reference, interrupted):
    ref_wd, ref_summary, ref_losses = reference
    wd, events = interrupted
    kills = [e for e in events if e["kind"] == "kill -9"]
    assert len(kills) == 5 and all(e["rc"] == -signal.SIGKILL for e in kills)
    # each restart resumed from the newest checkpoint that had committed when the process was killed
    assert [e["resumed_from"] for e in events[1:len(kills) + 1]] == [max(e["committed"], default=0) for e in kills]
    assert all(e["lost"] >= 0 for e in events[:-1])
    summary = json.loads((wd / "summary.json").read_text())
    assert summary["params_sha"] == ref_summary["params_sha"]
    assert losses(wd) == ref_losses  # every step's loss, bit for bit (each resume rewrote the steps after it)
    bias_norms = lambda w: {r["step"]: r["router_bias_norm"] for r in read_metrics(w)}  # noqa: E731
    assert bias_norms(wd) == bias_norms(ref_wd) and bias_norms(wd)[STEPS] > 0
    print(f"\nfaults injected: {len(events) - 1} (5 kill -9, 1 SIGTERM); runs resumed: "
          f"{sum(e['resumed_from'] > 0 for e in events)}; steps lost: {sum(e['lost'] for e in events[:-1])} "
          f"(kind, died after step, next run resumed from): "
          f"{[(e['kind'], e['after_step'], e['after_step'] - e['lost']) for e in events[:-1]]}")


@pytest.mark.slow
def test_sigterm_saves_the_current_step_and_resume_continues(interrupted):
    wd, events = interrupted
    term = next(e for e in events if e["kind"] == "SIGTERM")
    assert term["rc"] == train.EXIT_PREEMPTED and term["stop_s"] < 30, term["stop_s"]
    stopped = term["after_step"]  # the step in flight when the signal came is finished, then saved
    assert stopped >= term["signalled_after"] and stopped in term["committed"]
    assert "Traceback" not in term["log"]
    assert events[-1]["resumed_from"] == stopped and term["lost"] == 0


# --- damaged checkpoints, full disk --------------------------------------------------------------------------


def damage(step_dir: Path, kind: str) -> None:
    data_files = sorted((step_dir / "state").rglob("d/*"), key=lambda f: f.stat().st_size)
    if kind == "truncated":
        big = data_files[-1]
        big.write_bytes(big.read_bytes()[: big.stat().st_size // 3])
    elif kind == "deleted":
        data_files[-1].unlink()
    else:  # an empty step folder
        shutil.rmtree(step_dir)
        step_dir.mkdir()


@pytest.mark.parametrize("kind", ["truncated", "deleted", "empty"])
def test_damaged_newest_checkpoint_falls_back_and_says_so(kind, reference, tmp_path, caplog):
    ref_wd, ref_summary, ref_losses = reference
    wd = tmp_path / "run"
    shutil.copytree(ref_wd, wd)
    assert ckpt_steps(wd) == [4, 8, 12]
    damage(wd / "checkpoints" / "12", kind)
    with caplog.at_level(logging.INFO):
        summary = run(wd)
    assert "checkpoint step 12 is damaged" in caplog.text and "resumed from step 8" in caplog.text
    aside = list((wd / "checkpoints_damaged").iterdir())
    assert len(aside) == 1 and aside[0].name.startswith("12-")  # kept for the user, not deleted
    assert "step 12 could not be restored" in (aside[0] / "DAMAGED.txt").read_text()
    assert summary["params_sha"] == ref_summary["params_sha"] and losses(wd) == ref_losses


def tree_digest(root: Path) -> dict:
    return {str(f.relative_to(root)): hashlib.sha256(f.read_bytes()).hexdigest()
            for f in sorted(root.rglob("*")) if f.is_file()}


def test_disk_full_during_save_is_a_clear_error_and_keeps_checkpoints(reference, tmp_path, capsys):
    """A file-size limit (RLIMIT_FSIZE; root ignores chmod) makes the checkpoint's data file fail to write
    (EFBIG) as a full disk would; the run must stop with one line and leave steps 4, 8, 12 as they were."""
    ref_wd, _, _ = reference
    wd = tmp_path / "run"
    shutil.copytree(ref_wd, wd)
    before = {s: tree_digest(wd / "checkpoints" / str(s)) for s in (4, 8, 12)}
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    old = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit then fails with EFBIG
    resource.setrlimit(resource.RLIMIT_FSIZE, (2 << 20, hard))  # params+moments files are ~8 MB
    jax.config.update("jax_enable_compilation_cache", False)  # no cache entries written under the limit
    try:
        rc = train.main(["--workdir", str(wd), *OVERRIDES, "train.steps=16"])
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, old)
        jax.config.update("jax_enable_compilation_cache", True)
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert rc == train.EXIT_BAD_INPUT
    assert err.startswith("error: could not write a checkpoint") and "File too large" in err
    assert "resumes from step 12" in err
    assert {s: tree_digest(wd / "checkpoints" / str(s)) for s in (4, 8, 12)} == before
    assert ckpt_steps(wd) == [4, 8, 12]


# --- non-finite batches and loss spikes -------------------------------------------------------------------


def test_nan_batches_are_skipped_and_counted(reference, tmp_path, caplog):
    """One NaN batch (step 3) is skipped; five in a row (6-10, = optim.max_consecutive_skips) roll back."""
    _, _, ref_losses = reference
    with caplog.at_level(logging.WARNING):
        out = run(tmp_path, env={"MOE_FAULT_NAN_STEPS": "3,6,7,8,9,10", "MOE_FAULT_SIGTERM_STEP": "11"})
    assert isinstance(out, loop.Preempted)
    recs = {r["step"]: r for r in read_metrics(tmp_path)}
    assert recs[3]["loss"] != recs[3]["loss"] and recs[3]["skipped_total"] == 1  # NaN logged, update skipped
    assert recs[4]["skipped_total"] == 1 and recs[4]["rollbacks"] == 0
    assert recs[2]["loss"] == ref_losses[2] and recs[4]["loss"] != ref_losses[4]  # step 3's update was skipped
    assert "step 10: non-finite updates" in caplog.text and "rolled back to step 8" in caplog.text
    assert recs[11]["rollbacks"] == 1 and recs[11]["skipped_batches"] == 2  # batches 9 and 10 skipped
    assert all(r["loss"] == r["loss"] for s, r in recs.items() if s > 8)  # training goes on, finite
    assert sorted(recs) == list(range(1, 12))  # the rolled-back steps' records were replaced


def test_loss_spike_rolls_back_and_training_recovers(tmp_path, caplog):
    with caplog.at_level(logging.WARNING):
        # this early the model is near uniform, so shifted targets raise the loss by ~3-4 %: hence 1.02
        out = run(tmp_path, "train.spike_factor=1.02", "train.spike_window=3",
                  env={"MOE_FAULT_SPIKE_STEPS": "10", "MOE_FAULT_SIGTERM_STEP": "11"})
    assert isinstance(out, loop.Preempted)
    assert "step 10: loss spike" in caplog.text and "rolled back to step 8 and skipped 2 batches" in caplog.text
    recs = {r["step"]: r for r in read_metrics(tmp_path)}
    assert sorted(recs) == list(range(1, 12)) and recs[11]["rollbacks"] == 1 and recs[11]["skipped_batches"] == 2
    assert recs[11]["loss"] < recs[8]["loss"]  # back on the normal, falling curve after the rollback


# --- bad configs and bad data at the train.py level ---------------------------------------------------------


def test_bad_inputs_exit_2_with_one_line_in_a_subprocess(tmp_path):
    for extra in (["model.top_k=9"], ["data.source=files", f"data.files=[{tmp_path / 'nope.txt'}]"]):
        p = subprocess.run([sys.executable, "train.py", "--workdir", str(tmp_path / "w"), *OVERRIDES, *extra],
                           capture_output=True, text=True, env=ENV, timeout=300)
        assert p.returncode == 2, p.stderr[-2000:]
        assert "Traceback" not in p.stderr and p.stderr.strip().splitlines()[-1].startswith("error: ")


def write_corpus(root: Path, short_docs: int = 10) -> None:
    root.mkdir()
    for i in range(40):
        (root / f"f{i}.txt").write_text(f"def f{i}(x):\n    return x + {i}\n")  # ~15 tokens, all < seq_len
    for i in range(short_docs):
        (root / f"short{i}.txt").write_text("x")  # one token: skipped and counted
    (root / "latin1.txt").write_bytes("caf\xe9 = 1\n".encode("latin-1"))  # not UTF-8: skipped and counted


def test_bad_data_catalogue(tmp_path, capsys):
    tok = load_tokenizer(tiny()).path
    src = ["data.source=files", f"data.tokenizer={tok}", f"data.data_dir={tmp_path / 'tfds'}"]
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "a.txt").write_bytes(b"\xff\xfe\x00 not utf-8")
    cases = {
        "missing data dir": (["data.source=tfds", "data.tfds_name=c4/en:3.1.0", f"data.data_dir={tmp_path / 'no'}"],
                             "data.data_dir"),
        "empty file": (src + [f"data.files=[{tmp_path / 'empty.txt'}]"], "no usable documents"),
        "only non-UTF-8": (src + [f"data.files=[{tmp_path / 'bad'}]"], "no usable documents"),
        "empty directory": (src + [f"data.files=[{tmp_path / 'tfds_none'}]"], "data.files"),
        "tokenizer of another size": (["model.vocab_size=4096", f"data.tokenizer={tok}"], "model.vocab_size"),
        "tokenizer not a model": ([f"data.tokenizer={tmp_path / 'empty.txt'}"], "data.tokenizer"),
        "missing split": (["data.eval_split=test"], "data.eval_split"),
    }
    for name, (extra, key) in cases.items():
        rc = train.main(["--workdir", str(tmp_path / "w"), *OVERRIDES, *extra])
        err = capsys.readouterr().err.strip().splitlines()
        assert rc == 2 and err[-1].startswith("error: ") and key in err[-1], (name, err[-3:])
    print(f"\nbad data inputs tried at train.py level: {len(cases) + 1} (+1 in a subprocess)")


def test_short_documents_and_non_utf8_are_counted_skips_and_seq_len_exceeds_every_document(tmp_path, caplog):
    write_corpus(tmp_path / "docs")
    tok = load_tokenizer(tiny()).path
    extra = ["data.source=files", f"data.files=[{tmp_path / 'docs'}]", f"data.tokenizer={tok}",
             f"data.data_dir={tmp_path / 'tfds'}", "data.validation_fraction=0.2"]
    with caplog.at_level(logging.WARNING):
        out = run(tmp_path / "w", *extra, env={"MOE_FAULT_SIGTERM_STEP": "2"})
    assert isinstance(out, loop.Preempted)  # it trained: every document is shorter than a row and gets packed
    assert "not_utf8" in caplog.text and "shorter than 2 tokens" in caplog.text
    assert [r["step"] for r in read_metrics(tmp_path / "w")] == [1, 2]


def test_all_documents_too_short_is_an_error(tmp_path):
    docs = tmp_path / "docs"
    docs.mkdir()
    # 40 files: the train/validation split hashes the (random) tmp path, and with 8 files a split came out
    # empty now and then (a different DataError); with 40 the chance is 0.7^40 ~ 1e-6.
    for i in range(40):
        (docs / f"s{i}.txt").write_text("x")
    tok = load_tokenizer(tiny()).path
    code = ("import sys\nfrom moe.config import load_config\nfrom moe.data import pipeline as data, tokenizer\n"
            f"cfg = load_config('configs/tiny.yaml', {OVERRIDES + ['data.source=files', f'data.files=[{docs}]', f'data.tokenizer={tok}', f'data.data_dir={tmp_path / 'tfds'}', 'data.validation_fraction=0.3']!r})\n"
            "try:\n    data.check_data(cfg)\n    next(data.train_iterator(cfg, tokenizer.load_tokenizer(cfg)))\n"
            "except data.DataError as e:\n    sys.exit(f'error: {e}')\n")
    try:
        p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=ENV, timeout=60)
    except subprocess.TimeoutExpired:
        pytest.fail("no error after 60 s: the iterator spins on an all-filtered dataset")
    assert p.returncode == 1 and "shorter than" in p.stderr

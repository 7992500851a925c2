"""Runs and sweeps whose workdir is a bucket (moe/runtime/storage.py): every file lands there and nothing beside
it, kill -9 resumes from it bit-identically, damage is set aside there, the readers (eval.py, moe.scaling
collect / status) read it, the cluster scripts skip what it says is done, bad locations are one-line errors.

The bucket is a `file://` URL: the object-store code path (whole-object writes, appends staged locally and
uploaded, moves as copy + delete, Orbax given the path it understands) running on the local disk. Runs share
test_faults.py's model and schedule, so they compare bit for bit with its uninterrupted reference run.
"""

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

import eval as eval_cli
import train
from moe.runtime import storage
from moe.runtime.sharding import make_mesh
from moe.scaling import cluster, runner
from moe.scaling.sweep import load_sweep
from moe.train import steps as train_steps
from moe.train.checkpoint import Checkpointer
from moe.train.metrics import read_metrics
from test_faults import ENV, OVERRIDES, STEPS, ckpt_steps, losses, reference, run, tiny  # noqa: F401 (fixture)

REPO = Path(__file__).resolve().parent.parent

# Modules that read or write workdirs: any file operation in them goes through moe.runtime.storage, or is on
# a local file and says so with a `# local` comment (the metrics' staging copy, a temporary log).
WORKDIR_MODULES = ["train.py", "eval.py", "moe/train/loop.py", "moe/train/metrics.py", "moe/train/checkpoint.py",
                   "moe/eval/lm.py", "moe/lm_eval_adapter.py", "moe/data/tokenizer.py", "moe/data/hf_tokenizer.py", "moe/scaling/runner.py",
                   "moe/scaling/points.py", "moe/scaling/compare.py", "moe/scaling/plot.py", "moe/scaling/cluster.py"]
FILE_OPS = re.compile(r"(^|[^.\w])open\(|os\.(makedirs|replace|remove|rename|unlink|listdir|mkdir|path\.(exists|isdir|"
                      r"isfile))|shutil\.|(?<!storage)\.(write_text|read_text|write_bytes|read_bytes|mkdir|iterdir|"
                      r"unlink)\(")


def url(path: Path) -> str:
    return "file://" + str(path)


def staging_dirs() -> set[str]:
    return {p for p in os.listdir(tempfile.gettempdir()) if p.startswith("moe-staging-")}


def test_workdir_modules_do_no_file_io_of_their_own():
    bad = []
    for rel in WORKDIR_MODULES:
        for n, line in enumerate((REPO / rel).read_text().splitlines(), 1):
            code = line.split("#", 1)[0]
            if FILE_OPS.search(code) and "storage." not in code and "# local" not in line:
                bad.append(f"{rel}:{n}: {line.strip()}")
    assert not bad, "workdir I/O outside moe/runtime/storage.py:\n" + "\n".join(bad)


def test_paths_schemes_and_one_line_errors(tmp_path):
    assert storage.join("gs://b/run/", "checkpoints", "12") == "gs://b/run/checkpoints/12"
    assert storage.join("runs/x", "summary.json") == os.path.join("runs/x", "summary.json")
    assert storage.parent("gs://b/run/out.json") == "gs://b/run" and storage.parent("out.json") == "."
    assert storage.orbax_path(url(tmp_path / "w")) == str(tmp_path / "w")  # Orbax gets what it understands
    assert storage.orbax_path("gs://b/w") == "gs://b/w" and storage.orbax_path("rel") == os.path.abspath("rel")
    with pytest.raises(storage.StorageError, match=r"unknown scheme 'foo://'; use a local path or one of gs://"):
        storage.scheme("foo://bucket/run")
    storage.write_text(url(tmp_path / "a" / "b.txt"), "x")  # parents made, the temporary object renamed away
    assert (tmp_path / "a" / "b.txt").read_text() == "x" and os.listdir(tmp_path / "a") == ["b.txt"]


def test_mirror_uploads_whole_files_only_when_they_changed(tmp_path, monkeypatch):
    bucket = url(tmp_path / "bucket")
    m = storage.Mirror(bucket)
    assert not m.local_root.startswith(str(tmp_path))  # staged outside the bucket
    Path(m.local("metrics.jsonl")).write_text('{"step": 1}\n')
    uploads = []
    real = storage.write_bytes
    monkeypatch.setattr(storage, "write_bytes", lambda p, d: (uploads.append(p), real(p, d)))
    m.sync()
    m.sync()  # nothing changed: nothing sent
    with open(m.local("metrics.jsonl"), "a") as f:
        f.write('{"step": 2}\n')
    m.sync(force=False)  # within every_s of the last sync: waits
    assert len(uploads) == 1
    m.close()  # a final sync, then the staging folder goes
    assert len(uploads) == 2 and not os.path.exists(m.local_root)
    assert (tmp_path / "bucket" / "metrics.jsonl").read_text() == '{"step": 1}\n{"step": 2}\n'


def test_a_run_in_a_bucket_writes_everything_there_and_is_the_reference_run(reference, tmp_path):
    _, ref_summary, ref_losses = reference
    before = staging_dirs()
    bucket = tmp_path / "bucket"
    summary = run(url(bucket / "run"))
    assert summary["params_sha"] == ref_summary["params_sha"] and losses(url(bucket / "run")) == ref_losses
    names = set(os.listdir(bucket / "run"))
    assert {"config.yaml", "tokenizer.model", "metrics.jsonl", "summary.json", "tb", "checkpoints"} <= names
    assert any(f.startswith("events.") for f in os.listdir(bucket / "run" / "tb"))
    assert ckpt_steps(bucket / "run") == [4, 8, 12]
    assert os.listdir(tmp_path) == ["bucket"] and not Path("file:").exists()  # no URL taken for a local folder
    assert staging_dirs() <= before  # the staged metrics were uploaded and removed (and dead processes' too)

    # the readers read the bucket: eval.py (and --out into the bucket), collect, status
    out = url(bucket / "run" / "eval.json")
    assert eval_cli.main(["--workdir", url(bucket / "run"), "--max_batches", "1", "--out", out]) == 0
    assert json.loads((bucket / "run" / "eval.json").read_text())["step"] == STEPS
    sweep_file = tmp_path / "sweep.yaml"
    sweep_file.write_text(f"base: {REPO / 'configs' / 'tiny.yaml'}\npoints:\n  - {{model.top_k: 1}}\n")
    name = load_sweep(sweep_file).points[0].name
    shutil.copytree(bucket / "run", bucket / "sweep" / name)
    assert runner.main(["collect", str(sweep_file), "--workdir", url(bucket / "sweep")]) == 0
    assert f"| {name} | done |" in (bucket / "sweep" / "results.md").read_text()


@pytest.mark.slow
def test_kill9_with_the_workdir_in_a_bucket_resumes_bit_identically(reference, tmp_path):
    """The process SIGKILLs itself at step 10 (no handler, no final upload): the bucket has the records up to
    its newest checkpoint, because the staged metrics are uploaded before each save."""
    _, ref_summary, ref_losses = reference
    wd = url(tmp_path / "bucket" / "run")
    cmd = [sys.executable, "train.py", "--workdir", wd, *OVERRIDES]
    killed = subprocess.run(cmd, cwd=REPO, env=dict(ENV, MOE_FAULT_KILL_STEP="10"), capture_output=True, text=True,
                            timeout=300)
    assert killed.returncode == -9, killed.stderr[-2000:]
    committed = ckpt_steps(tmp_path / "bucket" / "run")
    assert committed and max(committed) <= 9
    assert max(r["step"] for r in read_metrics(wd)) >= max(committed)  # nothing the resume needs is lost
    done = subprocess.run(cmd, cwd=REPO, env=ENV, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert f"resumed from step {max(committed)}" in done.stderr
    summary = json.loads((tmp_path / "bucket" / "run" / "summary.json").read_text())
    assert summary["params_sha"] == ref_summary["params_sha"] and losses(wd) == ref_losses
    dead = [d for d in staging_dirs() if not os.path.exists(f"/proc/{d.split('-')[2]}")]  # moe-staging-PID-...
    assert not dead, f"the resumed run removes the staging folders of dead processes: {dead}"


def test_a_damaged_step_in_a_bucket_is_moved_aside_there(reference, tmp_path):
    ref_wd, _, _ = reference
    shutil.copytree(ref_wd, tmp_path / "bucket" / "run")
    f = max((tmp_path / "bucket" / "run" / "checkpoints" / "12" / "state").rglob("d/*"), key=lambda p: p.stat().st_size)
    raw = bytearray(f.read_bytes())
    raw[len(raw) // 2] ^= 0x10
    f.write_bytes(bytes(raw))
    ck = Checkpointer(url(tmp_path / "bucket" / "run"), tiny().checkpoint, with_data=False)
    try:
        step, _, _ = ck.restore_latest(train_steps.build(tiny(), make_mesh(tiny().mesh)).abstract_state)
    finally:
        ck.close()
    assert step == 8 and [s for s, _ in ck.damaged] == [12]
    aside = os.listdir(tmp_path / "bucket" / "run" / "checkpoints_damaged")
    assert len(aside) == 1 and aside[0].startswith("12-")
    moved = tmp_path / "bucket" / "run" / "checkpoints_damaged" / aside[0]
    assert "checksum mismatch" in (moved / "DAMAGED.txt").read_text() and (moved / "state").is_dir()
    assert ckpt_steps(tmp_path / "bucket" / "run") == [4, 8]


def test_bad_locations_are_one_line_errors(tmp_path, capsys, monkeypatch):
    assert train.main(["--workdir", "foo://bucket/run", *OVERRIDES]) == train.EXIT_BAD_INPUT
    assert "unknown scheme 'foo://'" in capsys.readouterr().err.strip().splitlines()[-1]
    assert eval_cli.main(["--workdir", "foo://bucket/run"]) == eval_cli.EXIT_BAD_INPUT
    assert capsys.readouterr().err.strip().splitlines()[-1].startswith("error: 'foo://bucket/run': unknown scheme")

    def denied(path, data):  # what gcsfs / tf.io.gfile raise for a bucket this account may not write
        raise PermissionError(13, "403 POST: caller does not have storage.objects.create access")
    monkeypatch.setattr(storage, "write_bytes", denied)
    assert train.main(["--workdir", url(tmp_path / "ro"), *OVERRIDES]) == train.EXIT_BAD_INPUT
    err = capsys.readouterr().err.strip().splitlines()
    assert len([x for x in err if x.startswith("error:")]) == 1 and "Traceback" not in "\n".join(err)
    assert err[-1].startswith(f"error: --workdir '{url(tmp_path / 'ro')}' is not writable (403 POST: caller does not")


# --- sweeps in a bucket ------------------------------------------------------------------------------


@pytest.fixture
def sweep_in_bucket(tmp_path):
    """A 5-point sweep file in the repo (the cluster scripts need a committed path; removed after) and a bucket
    with one point in every state."""
    path = REPO / "configs" / "sweeps" / f"_test_{os.getpid()}.yaml"
    path.write_text("base: ../tiny.yaml\npoints:\n" + "".join(f"  - {{optim.lr: {lr}}}\n"
                                                                     for lr in (1e-3, 2e-3, 3e-3, 4e-3, 5e-3)))
    try:
        sweep, root = load_sweep(path), tmp_path / "bucket"
        p = [root / q.name for q in sweep.points]
        for d in p[:4]:
            d.mkdir(parents=True)
        (p[0] / "summary.json").write_text(json.dumps({"done": True, "step": 300, "eval_loss": 5.0685}))
        (p[1] / "point.json").write_text(json.dumps({"status": "failed", "returncode": 2, "started_unix": 1.0,
                                                     "error": "error: model.num_heads (3) must divide d_model"}))
        (p[2] / "point.json").write_text(json.dumps({"status": "interrupted", "returncode": 75, "started_unix": 1.0,
                                                     "error": "stopped by SIGTERM at step 40"}))
        (p[3] / "point.json").write_text(json.dumps({"status": "running", "started": "2026-12-02T03:00:00+0000",
                                                     "started_unix": 1.0, "host": "t1v-n-1-w-0"}))
        (p[3] / "metrics.jsonl").write_text('{"step": 10, "loss": 7.0}\n{"step": 20, "loss": 6.5}\n')
        yield path, sweep, url(root)
    finally:
        path.unlink()


def test_status_reads_every_state_from_the_bucket(sweep_in_bucket, capsys):
    path, sweep, bucket = sweep_in_bucket
    assert runner.main(["status", str(path), "--workdir", bucket]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    names = [p.name for p in sweep.points]
    assert lines[0] == f"{names[0]}: done (step 300), eval_loss 5.0685"
    assert lines[1] == f"{names[1]}: failed -- exit 2: error: model.num_heads (3) must divide d_model"
    assert lines[2] == f"{names[2]}: interrupted -- exit 75: stopped by SIGTERM at step 40"
    assert lines[3] == f"{names[3]}: running (step 20) -- since 2026-12-02T03:00:00+0000 on t1v-n-1-w-0"
    assert lines[4] == f"{names[4]}: not started"
    assert lines[5] == "5 points: 1 done, 1 running, 1 failed, 1 interrupted, 1 not started"
    assert runner.main(["status", str(path), "--workdir", bucket, "--point", names[0]]) == 0  # the skip rule
    assert runner.main(["status", str(path), "--workdir", bucket, "--point", names[1]]) == 1
    assert runner.main(["status", str(path), "--workdir", bucket, "--point", names[2], "--since", "2"]) == 1
    assert capsys.readouterr().out.splitlines()[-1] == "not started"  # an older attempt's verdict is not this one's


def _fake_tools(tmp_path: Path, bucket_root: Path) -> tuple[dict, Path]:
    """`gcloud` and `git` stand-ins on PATH that log their arguments; the ssh that starts a point marks it done
    in the bucket (as the point would when it finished)."""
    bin_dir, log = tmp_path / "bin", tmp_path / "calls.log"
    bin_dir.mkdir()
    (bin_dir / "git").write_text(f"#!/bin/bash\necho git \"$@\" >> {log}\n")
    (bin_dir / "gcloud").write_text(f"""#!/bin/bash
echo gcloud "$@" >> {log}
case "$*" in
  *"queued-resources describe"*) echo ACTIVE ;;
  *"moe.scaling point"*) p=$(echo "$*" | sed -E 's/.*--point ([^ ]+).*/\\1/')
     mkdir -p {bucket_root}/$p && echo '{{"done": true, "step": 5}}' > {bucket_root}/$p/summary.json ;;
esac
""")
    for f in ("git", "gcloud"):
        (bin_dir / f).chmod(0o755)
    return dict(os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}"), log


def test_tpu_sweep_script_launches_each_unfinished_point_once_and_a_rerun_skips_all(sweep_in_bucket, tmp_path):
    path, sweep, _ = sweep_in_bucket
    names = [p.name for p in sweep.points]
    with pytest.raises(runner.SweepError, match="needs a workdir every host shares"):
        cluster.tpu_script(sweep, "runs/x", prefix="iso", zone="us-east5-a", tpu_type="v5p-128")
    text = cluster.tpu_script(sweep, "gs://b/sw", prefix="iso", zone="us-east5-a", tpu_type="v5p-128", parallel=2)
    assert subprocess.run(["bash", "-n"], input=text, text=True).returncode == 0
    for i, n in enumerate(names):  # one queued resource per point, each created, started and deleted
        assert f"queued-resources create iso-{i} --accelerator-type=v5p-128" in text
        assert f"moe.scaling point {path.relative_to(REPO)} --workdir gs://b/sw --point {n}" in text
        assert f"queued-resources delete iso-{i} --force --quiet" in text
    # run it for real against the fake bucket, with gcloud faked: the done point launches nothing
    bucket_root = tmp_path / "bucket"
    script = cluster.tpu_script(sweep, url(bucket_root), prefix="iso", zone="us-east5-a", tpu_type="v5p-128",
                                parallel=2, retries=1)
    env, log = _fake_tools(tmp_path, bucket_root)
    first = subprocess.run(["bash", "-c", script], cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    calls = log.read_text().splitlines()
    assert not any("iso-0" in c for c in calls), "a done point must not be launched"
    for i in range(1, 5):
        assert sum(f"queued-resources create iso-{i} " in c for c in calls) == 1
        assert sum(f"queued-resources delete iso-{i} " in c for c in calls) == 1
    assert first.stdout.strip().splitlines()[-1] == "5 points: 5 done"
    log.unlink()
    again = subprocess.run(["bash", "-c", script], cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0 and not log.exists()  # re-run: every point done, no gcloud call at all
    assert sum("done already" in x for x in again.stdout.splitlines()) == 5


def test_slurm_sweep_is_a_job_array_with_the_skip_rule(sweep_in_bucket):
    path, sweep, _ = sweep_in_bucket
    text = cluster.slurm_script(sweep, "gs://b/sw", nodes=2, gpus_per_node=8, parallel=3)
    assert subprocess.run(["bash", "-n"], input=text, text=True).returncode == 0
    assert "#SBATCH --array=0-4%3" in text and "#SBATCH --nodes=2" in text
    assert "POINTS=(" + " ".join(p.name for p in sweep.points) + ")" in text
    skip = text.index("--point \"$POINT\" >/dev/null; then echo \"$POINT: done already\"; exit 0; fi")
    assert skip < text.index("srun --kill-on-bad-exit=1")
    assert text.rstrip().endswith(f"-m moe.scaling point {path.relative_to(REPO)} --workdir gs://b/sw --point \"$POINT\"")


def test_tpu_sweep_points_get_the_slices_their_config_asks_for():
    path = REPO / "configs" / "sweeps" / f"_test_slices_{os.getpid()}.yaml"
    path.write_text("base: ../tiny.yaml\npoints:\n  - {mesh.dcn_data: 2}\n  - {optim.lr: 1.0e-3}\n")
    try:
        sweep = load_sweep(path)
        text = cluster.tpu_script(sweep, "gs://b/sw", prefix="ms", zone="us-east5-a", tpu_type="v5p-16")
        assert "queued-resources create ms-0 --accelerator-type=v5p-16 --runtime-version=v2-alpha-tpuv5 " \
               "--node-count=2 --node-prefix=ms-0" in text  # multislice: mesh.dcn_data = 2
        assert "queued-resources create ms-1 --accelerator-type=v5p-16 --runtime-version=v2-alpha-tpuv5 " \
               "--node-id=ms-1" in text
        forced = cluster.tpu_script(sweep, "gs://b/sw", prefix="ms", zone="us-east5-a", tpu_type="v5p-16", slices=4)
        assert forced.count("--node-count=4") == 2
    finally:
        path.unlink()


def test_the_tokenizer_and_its_cache_in_a_bucket(tmp_path, monkeypatch):
    from moe.config import load_config
    from moe.data.tokenizer import load_tokenizer

    cfg = load_config("configs/tiny.yaml", ["model.vocab_size=1024"])
    monkeypatch.setenv("MOE_CACHE_DIR", url(tmp_path / "cache"))  # trained once, written into the bucket
    first = load_tokenizer(cfg)
    assert first.path.startswith(url(tmp_path / "cache") + "/tokenizer-") and first.path.endswith("-v1024.model")
    assert os.listdir(tmp_path / "cache") == [os.path.basename(first.path)]  # no lock file, no temporary left
    mtime = (tmp_path / "cache" / os.path.basename(first.path)).stat().st_mtime_ns
    again = load_tokenizer(cfg)  # read back from the bucket, not retrained
    assert (tmp_path / "cache" / os.path.basename(first.path)).stat().st_mtime_ns == mtime
    assert again.encode("def f(x):\n    return x\n") == first.encode("def f(x):\n    return x\n")
    given = load_config("configs/tiny.yaml", ["model.vocab_size=1024", f"data.tokenizer={first.path}"])
    assert load_tokenizer(given).token_bytes().tolist() == first.token_bytes().tolist()

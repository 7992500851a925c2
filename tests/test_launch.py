"""moe.launch.jobs: the exact gcloud / sbatch text, input validation, and `--run` through an injected runner.

Nothing here touches the network or runs gcloud: `--run` is exercised with a fake runner that records argvs.
"""
import shlex
import subprocess

import pytest

from moe.launch import jobs as launch
from moe.launch.jobs import LaunchError, make_job, parse_tpu_type, sbatch_script, tpu_followups, tpu_steps

TRAIN = ["--config", "configs/glam_1.7b_64e.yaml"]


def _commands(text: str) -> list[list[str]]:
    """The printed plan back as argv lists (comment lines dropped), as a shell would split it."""
    return [shlex.split(line) for line in text.splitlines() if line and not line.startswith("#")]


def _remote(argv: list[str]) -> str:
    (cmd,) = [a.removeprefix("--command=") for a in argv if a.startswith("--command=")]
    return cmd


def test_single_slice_v5p_spot_dry_run(capsys):
    rc = launch.main(["tpu", "--name", "glam", "--zone", "us-east5-a", "--type", "v5p-128", "--spot",
                      "--bucket", "gs://my-bkt/", "--", *TRAIN])
    assert rc == 0
    cmds = _commands(capsys.readouterr().out)
    assert cmds[0] == ["gcloud", "compute", "tpus", "tpu-vm", "create", "glam", "--accelerator-type=v5p-128",
                       "--version=v2-alpha-tpuv5", "--spot", "--zone=us-east5-a"]
    assert cmds[1] == ["git", "-C", str(launch.Path(launch.__file__).resolve().parents[2]), "archive",
                       "--format=tar.gz", "--prefix=moe/", "-o", "/tmp/moe-glam.tar.gz", "HEAD"]
    assert cmds[2] == ["gcloud", "compute", "tpus", "tpu-vm", "scp", "/tmp/moe-glam.tar.gz", "glam:moe-src.tar.gz",
                       "--zone=us-east5-a", "--worker=all"]
    assert cmds[3][:8] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "glam", "--zone=us-east5-a", "--worker=all"]
    install = _remote(cmds[3])
    assert "uv venv -q --python 3.12 .venv" in install and 'pip install -q --python .venv/bin/python -e ".[tpu]"' in install
    start = _remote(cmds[4])
    assert "--worker=all" in cmds[4]
    assert ("nohup .venv/bin/python train.py --config configs/glam_1.7b_64e.yaml --workdir gs://my-bkt/glam "
            ">> ~/moe-logs/worker-$(hostname).log 2>&1 < /dev/null & echo $! > ~/moe-logs/train.pid") in start
    # follow-ups: tail worker 0, stop, delete; a plain VM is deleted directly
    assert "--worker=0" in cmds[5] and "tail -n 100 -f ~/moe-logs/worker-*.log" in _remote(cmds[5])
    assert _remote(cmds[6]) == "kill $(cat ~/moe-logs/train.pid)"
    assert cmds[7] == ["gcloud", "compute", "tpus", "tpu-vm", "delete", "glam", "--quiet", "--zone=us-east5-a"]
    assert len(cmds) == 8


def test_queued_multislice():
    job = make_job("ms", "us-central2-b", "v4-64", TRAIN, slices=3, bucket="gs://bkt", project="proj")
    assert job.queued and launch.nodes(job) == ["ms-0", "ms-1", "ms-2"]
    steps = tpu_steps(job)
    assert steps[0].argv == ["gcloud", "compute", "tpus", "queued-resources", "create", "ms",
                             "--accelerator-type=v4-64", "--runtime-version=tpu-ubuntu2204-base", "--node-count=3",
                             "--node-prefix=ms", "--zone=us-central2-b", "--project=proj"]
    wait = steps[1].argv
    assert wait[:2] == ["bash", "-c"] and "queued-resources describe ms" in wait[2]
    assert "ACTIVE) exit 0" in wait[2] and "FAILED|SUSPENDED) exit 1" in wait[2]
    # every slice gets the code, the install and the start, all on --worker=all
    titles = [s.what for s in steps[2:]]
    assert titles == ["pack the committed code (git archive of HEAD)"] + [
        f"{verb} {n}" for verb in ("copy the code to every worker of", "install on every worker of",
                                   "start train.py on every worker of") for n in ("ms-0", "ms-1", "ms-2")]
    for s in steps[3:]:
        assert "--worker=all" in s.argv and "--project=proj" in s.argv
    delete = tpu_followups(job)[-1].argv
    assert delete == ["gcloud", "compute", "tpus", "queued-resources", "delete", "ms", "--force", "--quiet",
                      "--zone=us-central2-b", "--project=proj"]


def test_queued_single_slice_uses_node_id():
    steps = tpu_steps(make_job("q", "us-east5-a", "v5p-8", TRAIN, queued=True, spot=True))
    assert "--node-id=q" in steps[0].argv and "--spot" in steps[0].argv
    assert not any(a.startswith("--node-count") for a in steps[0].argv)


@pytest.mark.parametrize("text, accel, runtime, hosts", [
    ("v5e-16", "v5litepod-16", "v2-alpha-tpuv5-lite", 2),
    ("v5litepod-8", "v5litepod-8", "v2-alpha-tpuv5-lite", 1),
    ("v5e-4", "v5litepod-4", "v2-alpha-tpuv5-lite", 1),
    ("v6e-256", "v6e-256", "v2-alpha-tpuv6e", 32),
    ("v4-8", "v4-8", "tpu-ubuntu2204-base", 1),
    ("V4-2048", "v4-2048", "tpu-ubuntu2204-base", 256),
    ("v5p-128", "v5p-128", "v2-alpha-tpuv5", 16),
    ("v3-32", "v3-32", "tpu-ubuntu2204-base", 4),
])
def test_type_naming_and_runtime(text, accel, runtime, hosts):
    t = parse_tpu_type(text)
    assert (t.accelerator, t.runtime, t.hosts) == (accel, runtime, hosts)


def test_runtime_override():
    job = make_job("x", "us-east5-a", "v5e-8", TRAIN, runtime="v2-alpha-tpuv5-lite-custom")
    assert "--version=v2-alpha-tpuv5-lite-custom" in tpu_steps(job)[0].argv


def test_quoting_of_train_args_with_spaces_and_quotes():
    nasty = "train.note=it's a \"big\" run; rm -rf ~"
    job = make_job("q", "us-east5-a", "v5p-8", [*TRAIN, nasty, "--tag", "a b"], env=["NOTE=x y"])
    text = launch.render(tpu_steps(job))
    start = _remote(_commands(text)[-1])  # what the worker's shell receives
    words = shlex.split(start)
    i = words.index("train.py")
    assert words[i + 1:i + 6] == [*TRAIN, nasty, "--tag", "a b"]
    assert words[words.index("nohup") + 1:words.index("nohup") + 3] == ["env", "NOTE=x y"]
    assert "rm -rf ~" not in start.replace(shlex.quote(nasty), "")  # only ever inside the quoted argument


def test_workdir_given_by_user_is_not_duplicated():
    job = make_job("w", "us-east5-a", "v5p-16", ["--workdir=gs://x/y"], bucket="gs://bkt")
    start = launch.train_command(job)
    assert "--workdir=gs://x/y" in start and "gs://bkt" not in start


@pytest.mark.parametrize("kwargs, message", [
    (dict(tpu_type="v7-8"), "generation in v2, v3, v4, v5p, v5e, v6e"),
    (dict(tpu_type="tpu-8"), "expected <generation>-<size>"),
    (dict(tpu_type="v5p-100"), "v5p size 100 does not exist; allowed: multiples of 8 from 8 to 12288"),
    (dict(tpu_type="v5e-12"), "v5e size 12 does not exist; allowed: 1, 4, 8, 16, 32, 64, 128, 256"),
    (dict(tpu_type="v6e-512"), "v6e size 512 does not exist"),
    (dict(slices=0), "--slices 0: must be >= 1"),
    (dict(slices=-2), "--slices -2: must be >= 1"),
    (dict(tpu_type="v3-8", slices=2), "multislice needs v4, v5e, v5p or v6e, not v3"),
    (dict(name="My_TPU"), "--name 'My_TPU'"),
    (dict(zone="us-east5"), "--zone 'us-east5'"),
    (dict(bucket="my-bucket"), "--bucket 'my-bucket': expected gs://BUCKET[/PATH]"),
    (dict(env=["=1"]), "--env '=1': expected KEY=VALUE"),
    (dict(tpu_type="v5p-128", bucket=""), "runs 16 hosts: pass --bucket"),
    (dict(tpu_type="v5e-8", slices=2, bucket=""), "runs 2 hosts: pass --bucket"),
])
def test_bad_input_errors(kwargs, message):
    args = dict(name="ok", zone="us-east5-a", tpu_type="v5p-8", train_args=TRAIN, bucket="gs://bkt") | kwargs
    with pytest.raises(LaunchError, match=launch.re.escape(message)):
        make_job(**args)


def test_cli_reports_errors_without_traceback(capsys):
    rc = launch.main(["tpu", "--name", "x", "--zone", "us-east5-a", "--type", "v5p-8", "--slices", "0"])
    assert rc == 2
    assert capsys.readouterr().err.strip() == "moe.launch: error: --slices 0: must be >= 1"


def _tpu_argv(*extra):
    return ["tpu", "--name", "r", "--zone", "us-east5-a", "--type", "v5p-8", *extra, "--", *TRAIN]


def test_run_executes_steps_in_order(capsys):
    calls = []
    rc = launch.main(_tpu_argv("--run"), runner=calls.append)
    assert rc == 0
    job = make_job("r", "us-east5-a", "v5p-8", TRAIN, src=str(launch.Path(launch.__file__).resolve().parents[2]))
    assert calls == [s.argv for s in tpu_steps(job)]  # create, pack, copy, install, start: nothing else
    assert not any("delete" in c for c in calls)
    out = capsys.readouterr().out
    assert "[1/5] create v5p-8 (1 host(s))" in out and "launched. Next:" in out and "tpu-vm delete r" in out


def test_run_stops_at_first_failure(capsys):
    calls = []

    def runner(argv):
        calls.append(argv)
        if len(calls) == 3:  # the scp fails
            raise subprocess.CalledProcessError(255, argv)

    assert launch.main(_tpu_argv("--run"), runner=runner) == 2
    assert len(calls) == 3 and calls[2][3:5] == ["tpu-vm", "scp"]
    err = capsys.readouterr().err
    assert "step 3/5 (copy the code to every worker of r) failed with exit code 255" in err
    assert "later steps were not run" in err


def test_run_without_gcloud_installed():
    def runner(argv):
        raise FileNotFoundError(argv[0])

    with pytest.raises(LaunchError, match="step 1/2 \\(a\\): 'gcloud' is not installed"):
        launch.run_steps([launch.Step("a", ["gcloud", "x"]), launch.Step("b", ["true"])], runner, log=lambda s: None)


def test_gpu_sbatch_script(capsys):
    rc = launch.main(["gpu", "--nodes", "4", "--gpus-per-node", "8", "--partition", "a100", "--time", "2-00:00:00",
                      "--", *TRAIN, "train.note=a b"])
    assert rc == 0
    script = capsys.readouterr().out
    lines = script.splitlines()
    assert lines[0] == "#!/bin/bash"
    sbatch = [ln.removeprefix("#SBATCH ") for ln in lines if ln.startswith("#SBATCH ")]
    assert sbatch == ["--job-name=moe", "--nodes=4", "--ntasks-per-node=8", "--gpus-per-node=8",
                      "--cpus-per-task=8", "--time=2-00:00:00", "--output=%x-%j.out", "--partition=a100"]
    assert "--gpus-per-task" not in script  # each task must see all its node's GPUs (jax picks SLURM_LOCALID)
    assert "mkdir -p moe-logs" in script
    assert shlex.split(lines[-1]) == ["srun", "--kill-on-bad-exit=1", "--output=moe-logs/%x-%j-task%t.log",
                                      ".venv/bin/python", "train.py", *TRAIN, "train.note=a b"]
    assert "32 JAX processes" in script


@pytest.mark.parametrize("kwargs, message", [
    (dict(nodes=0), "--nodes 0"),
    (dict(gpus_per_node=0), "--gpus-per-node 0"),
    (dict(job_name="a b"), "--job-name 'a b'"),
    (dict(time="1 day"), "--time '1 day'"),
])
def test_gpu_bad_input(kwargs, message):
    args = dict(nodes=1, gpus_per_node=8, train_args=TRAIN) | kwargs
    with pytest.raises(LaunchError, match=launch.re.escape(message)):
        sbatch_script(**args)


def test_shipped_sbatch_example_is_generator_output():
    shipped = launch.Path(launch.__file__).resolve().parents[2] / "scripts" / "slurm_train.sbatch"
    assert shipped.read_text() == sbatch_script(2, 8, ["--config", "configs/glam_1.7b_64e.yaml"]), (
        "regenerate: python -m moe.launch gpu --nodes 2 --gpus-per-node 8 -- "
        "--config configs/glam_1.7b_64e.yaml > scripts/slurm_train.sbatch")

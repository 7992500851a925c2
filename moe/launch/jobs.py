"""Launch `train.py` on a Cloud TPU VM slice (or several: multislice) or print an sbatch script for GPUs.

Owns: turning a TPU type / GPU node count and the train.py arguments into the exact shell commands, and
(with `--run`) executing them in order. Pure builders return `Step`s (a title and an argv list); `main`
only parses flags, prints, and runs. Must not import jax or read the model config: a launch plan is
decided before anything is installed.

    python -m moe.launch tpu --name glam --zone us-east5-a --type v5p-128 --spot \
        --bucket gs://my-bucket -- --config configs/glam_1.7b_64e.yaml
    python -m moe.launch gpu --nodes 4 --gpus-per-node 8 -- --config configs/glam_1.7b_64e.yaml > job.sbatch

Code travels as a `git archive` tarball of HEAD: one file per worker instead of thousands (scp of a tree
opens a transfer per file, per worker), never `.venv/`, `runs/` or caches, and exactly the commit the log
names. Uncommitted edits are therefore *not* shipped: commit first.

Multi-host and multislice need no flags: `jax.distributed.initialize()` reads the worker list from the TPU
metadata server, and for multislice the `MEGASCALE_*` values (coordinator, slice count, slice id) that the
queued-resources API writes into each VM's `tpu-env` metadata (jax/_src/clusters/cloud_tpu_cluster.py).
Under SLURM it reads `SLURM_*`, one process per GPU (jax/_src/clusters/slurm_cluster.py).
"""

from __future__ import annotations

import argparse
import re
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Callable, NamedTuple, Sequence


class LaunchError(ValueError):
    """Bad launcher input, or a step that failed under `--run`; the message says which and why."""


class Step(NamedTuple):
    what: str  # one-line description printed as a comment above the command
    argv: list[str]  # the command; printed with shlex.join, executed without a shell


# generation -> (gcloud accelerator-type prefix, default runtime, valid sizes or None = multiple of 8, max)
# Runtimes: cloud.google.com/tpu/docs/runtimes ("PyTorch and JAX" table). v2-v4 and v5p count TensorCores
# (2 per chip, 4 chips = 8 cores per host); v5e and v6e count chips (up to 8 per host).
GENERATIONS: dict[str, tuple[str, str, tuple[int, ...] | None, int]] = {
    "v2": ("v2", "tpu-ubuntu2204-base", (8, 32, 128, 256, 512), 512),
    "v3": ("v3", "tpu-ubuntu2204-base", (8, 32, 64, 128, 256, 512, 1024, 2048), 2048),
    "v4": ("v4", "tpu-ubuntu2204-base", None, 8192),
    "v5p": ("v5p", "v2-alpha-tpuv5", None, 12288),
    "v5e": ("v5litepod", "v2-alpha-tpuv5-lite", (1, 4, 8, 16, 32, 64, 128, 256), 256),
    "v6e": ("v6e", "v2-alpha-tpuv6e", (1, 4, 8, 16, 32, 64, 128, 256), 256),
}
ALIASES = {"v5litepod": "v5e", "v5lite": "v5e"}
PYTHON = "3.12"  # pyproject requires-python; TPU runtime images ship Ubuntu 22.04's 3.10, so uv fetches it
LOG_DIR = "~/moe-logs"
_NAME_RE = re.compile(r"^[a-z]([-a-z0-9]{0,48}[a-z0-9])?$")  # GCE resource name, room for "-<slice>"
_ZONE_RE = re.compile(r"^[a-z]+-[a-z]+[0-9]+-[a-z]$")
_ENV_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*=")
_SLURM_WORD_RE = re.compile(r"^[A-Za-z0-9_.+-]+$")


class TpuType(NamedTuple):
    generation: str  # v2 | v3 | v4 | v5p | v5e | v6e
    size: int  # the number after the dash: TensorCores (v2-v5p) or chips (v5e, v6e)
    accelerator: str  # what gcloud's --accelerator-type takes, e.g. v5litepod-16
    runtime: str  # default --version / --runtime-version for this generation
    hosts: int  # TPU VM workers in one slice (processes jax.distributed starts)


def parse_tpu_type(text: str) -> TpuType:
    """`v5p-128` -> TpuType; `v5e-N` is spelled `v5litepod-N` for gcloud. Raises LaunchError."""
    m = re.fullmatch(r"(v\d[a-z]*)-(\d+)", text.strip().lower())
    gen = ALIASES.get(m.group(1), m.group(1)) if m else None
    if gen not in GENERATIONS:
        raise LaunchError(f"--type {text!r}: expected <generation>-<size> with generation in "
                          f"{', '.join(GENERATIONS)} (e.g. v4-8, v5e-16, v5p-128, v6e-256)")
    prefix, runtime, sizes, biggest = GENERATIONS[gen]
    size = int(m.group(2))
    ok = size in sizes if sizes else (size % 8 == 0 and 8 <= size <= biggest)
    if not ok:
        allowed = ", ".join(map(str, sizes)) if sizes else f"multiples of 8 from 8 to {biggest}"
        raise LaunchError(f"--type {text!r}: {gen} size {size} does not exist; allowed: {allowed}")
    hosts = max(1, size // 8)  # 8 cores (v2-v5p) or up to 8 chips (v5e/v6e) per host
    return TpuType(gen, size, f"{prefix}-{size}", runtime, hosts)


class TpuJob(NamedTuple):
    name: str  # TPU VM name; multislice nodes are <name>-0 .. <name>-<slices-1>
    zone: str
    tpu: TpuType
    train_args: list[str]  # passed to train.py verbatim (each shell-quoted on the worker)
    spot: bool = False
    queued: bool = False  # request through the queued-resources API (implied by slices > 1)
    slices: int = 1
    project: str = ""
    runtime: str = ""  # "" = the generation's default
    bucket: str = ""  # gs://... ; the run's workdir becomes <bucket>/<name>
    env: tuple[str, ...] = ()  # KEY=VALUE set for train.py on every worker
    src: str = "."  # local git checkout to archive
    entry: tuple[str, ...] = ("train.py",)  # what .venv/bin/python runs with the args (a sweep point: -m moe.scaling point)


def make_job(name: str, zone: str, tpu_type: str, train_args: Sequence[str], *, slices: int = 1,
             bucket: str = "", env: Sequence[str] = (), spot: bool = False, queued: bool = False,
             project: str = "", runtime: str = "", src: str = ".", entry: Sequence[str] = ("train.py",)) -> TpuJob:
    """Validate every user input and build a TpuJob; each error names the flag and what is allowed."""
    if not _NAME_RE.match(name):
        raise LaunchError(f"--name {name!r}: use 1-50 lowercase letters, digits and '-', starting with a letter")
    if not _ZONE_RE.match(zone):
        raise LaunchError(f"--zone {zone!r}: expected a zone such as us-central2-b or europe-west4-a")
    tpu = parse_tpu_type(tpu_type)
    if slices < 1:
        raise LaunchError(f"--slices {slices}: must be >= 1")
    if slices > 1 and tpu.generation in ("v2", "v3"):
        raise LaunchError(f"--slices {slices}: multislice needs v4, v5e, v5p or v6e, not {tpu.generation}")
    if bucket and not re.fullmatch(r"gs://[a-z0-9][-a-z0-9_.]{1,221}[a-z0-9](/.*)?", bucket):
        raise LaunchError(f"--bucket {bucket!r}: expected gs://BUCKET[/PATH]")
    for e in env:
        if not _ENV_RE.match(e):
            raise LaunchError(f"--env {e!r}: expected KEY=VALUE")
    has_workdir = any(a == "--workdir" or a.startswith("--workdir=") for a in train_args)
    if tpu.hosts * slices > 1 and not (bucket or has_workdir):
        # Orbax writes each host's shards into one directory: a worker-local path splits the checkpoint.
        raise LaunchError(f"{tpu.accelerator} x {slices} slice(s) runs {tpu.hosts * slices} hosts: pass "
                          "--bucket gs://... (or --workdir in the train.py args) so checkpoints are shared")
    return TpuJob(name, zone, tpu, list(train_args), spot=spot, queued=queued or slices > 1, slices=slices,
                  project=project, runtime=runtime, bucket=bucket.rstrip("/"), env=tuple(env), src=src,
                  entry=tuple(entry))


def nodes(job: TpuJob) -> list[str]:
    """TPU VM names: the queued-resources API names multislice nodes <prefix>-0 .. <prefix>-(N-1)."""
    return [f"{job.name}-{i}" for i in range(job.slices)] if job.slices > 1 else [job.name]


def gcloud(job: TpuJob, *args: str) -> list[str]:
    return ["gcloud", "compute", "tpus", *args, f"--zone={job.zone}"] + (
        [f"--project={job.project}"] if job.project else [])


def _ssh(job: TpuJob, node: str, command: str, worker: str = "all") -> list[str]:
    return gcloud(job, "tpu-vm", "ssh", node) + [f"--worker={worker}", f"--command={command}"]


def train_command(job: TpuJob) -> str:
    """The shell line each worker runs: train.py in the background, immune to the ssh hang-up, one log per host."""
    args = list(job.train_args)
    if job.bucket and not any(a == "--workdir" or a.startswith("--workdir=") for a in args):
        args += ["--workdir", f"{job.bucket}/{job.name}"]
    env = ["env", *job.env] if job.env else []
    cmd = shlex.join([*env, ".venv/bin/python", *job.entry, *args])
    log = f"{LOG_DIR}/worker-$(hostname).log"  # $(hostname) left unquoted: expanded on the worker
    # `;` not `&&` before nohup: `a && b &` would background the whole list and $! would be a subshell's pid
    return (f"mkdir -p {LOG_DIR} && cd ~/moe || exit 1; echo \"=== start $(date -Is) $(cat COMMIT 2>/dev/null)\" "
            f">> {log}; nohup {cmd} >> {log} 2>&1 < /dev/null & echo $! > {LOG_DIR}/train.pid")


def tpu_steps(job: TpuJob) -> list[Step]:
    """Everything `--run` executes, in order: create, (wait), pack, copy, install, start."""
    runtime = job.runtime or job.tpu.runtime
    spot = ["--spot"] if job.spot else []
    tarball = f"/tmp/moe-{job.name}.tar.gz"
    if job.queued:
        shape = ([f"--node-count={job.slices}", f"--node-prefix={job.name}"] if job.slices > 1
                 else [f"--node-id={job.name}"])
        create = gcloud(job, "queued-resources", "create", job.name, f"--accelerator-type={job.tpu.accelerator}",
                         f"--runtime-version={runtime}", *shape, *spot)
        state = shlex.join(gcloud(job, "queued-resources", "describe", job.name, "--format=value(state.state)"))
        wait = (f"while :; do s=$({state}); echo \"{job.name}: $s\"; case \"$s\" in ACTIVE) exit 0;; "
                "FAILED|SUSPENDED) exit 1;; esac; sleep 30; done")
        steps = [Step(f"request {job.slices} x {job.tpu.accelerator} (queued)", create),
                 Step("wait until the queued resource is ACTIVE", ["bash", "-c", wait])]
    else:
        create = gcloud(job, "tpu-vm", "create", job.name, f"--accelerator-type={job.tpu.accelerator}",
                         f"--version={runtime}", *spot)
        steps = [Step(f"create {job.tpu.accelerator} ({job.tpu.hosts} host(s))", create)]
    pack = ["git", "-C", job.src, "archive", "--format=tar.gz", "--prefix=moe/", "-o", tarball, "HEAD"]
    steps.append(Step("pack the committed code (git archive of HEAD)", pack))
    install = ("rm -rf ~/moe && tar -xzf ~/moe-src.tar.gz -C ~ && "
               "{ gzip -dc ~/moe-src.tar.gz | git get-tar-commit-id > ~/moe/COMMIT || true; } && "  # for the log
               "export PATH=$HOME/.local/bin:$PATH && "
               "{ command -v uv >/dev/null || python3 -m pip install -q --user uv || "
               "curl -LsSf https://astral.sh/uv/install.sh | sh; } && "
               f"cd ~/moe && uv venv -q --python {PYTHON} .venv && uv pip install -q --python .venv/bin/python -e \".[tpu]\"")
    for node in nodes(job):
        steps.append(Step(f"copy the code to every worker of {node}", gcloud(
            job, "tpu-vm", "scp", tarball, f"{node}:moe-src.tar.gz") + ["--worker=all"]))
    steps += [Step(f"install on every worker of {node}", _ssh(job, node, install)) for node in nodes(job)]
    steps += [Step(f"start {' '.join(job.entry)} on every worker of {node}", _ssh(job, node, train_command(job)))
              for node in nodes(job)]
    return steps


def tpu_followups(job: TpuJob) -> list[Step]:
    """Printed, never run: follow the logs, stop training, delete the TPU (it bills until deleted)."""
    first = nodes(job)[0]
    delete = (gcloud(job, "queued-resources", "delete", job.name, "--force", "--quiet") if job.queued
              else gcloud(job, "tpu-vm", "delete", job.name, "--quiet"))
    return [Step("follow worker 0's log (--worker=all for every host)",
                 _ssh(job, first, f"tail -n 100 -f {LOG_DIR}/worker-*.log", worker="0")),
            *[Step(f"stop training on {n}", _ssh(job, n, f"kill $(cat {LOG_DIR}/train.pid)")) for n in nodes(job)],
            Step("delete the TPU" + (" and its queued resource" if job.queued else ""), delete)]


def render(steps: Sequence[Step]) -> str:
    """Copy-pasteable shell text: a comment per step, then the command."""
    return "\n".join(f"# {s.what}\n{shlex.join(s.argv)}" for s in steps) + "\n"


def default_runner(argv: list[str]) -> None:
    subprocess.run(argv, check=True)


def run_steps(steps: Sequence[Step], runner: Callable[[list[str]], None] = default_runner,
              log: Callable[[str], None] = print) -> None:
    """Execute in order; the first failure stops everything with a LaunchError naming the step."""
    for i, step in enumerate(steps, 1):
        log(f"[{i}/{len(steps)}] {step.what}")
        try:
            runner(step.argv)
        except subprocess.CalledProcessError as e:
            raise LaunchError(f"step {i}/{len(steps)} ({step.what}) failed with exit code {e.returncode}: "
                              f"{shlex.join(step.argv)}; later steps were not run") from e
        except FileNotFoundError as e:
            raise LaunchError(f"step {i}/{len(steps)} ({step.what}): {step.argv[0]!r} is not installed") from e


def sbatch_script(nodes: int, gpus_per_node: int, train_args: Sequence[str], *, job_name: str = "moe",
                  time: str = "24:00:00", partition: str = "", account: str = "", cpus_per_task: int = 8,
                  python: str = ".venv/bin/python", entry: Sequence[str] = ("train.py",),
                  array: Sequence[str] = (), parallel: int = 0, before: Sequence[str] = ()) -> str:
    """A SLURM batch script: one task per GPU, because jax's SlurmCluster gives each process the single
    local device SLURM_LOCALID; so every task must see all its node's GPUs (no --gpus-per-task binding).
    With `array` (one label per array task; a sweep's point names) it is a job array of len(array) tasks,
    at most `parallel` at once (0: no limit); `$POINT` holds the task's label and `before` lines run ahead of
    srun (a sweep's skip rule)."""
    if nodes < 1 or gpus_per_node < 1 or cpus_per_task < 1:
        raise LaunchError(f"--nodes {nodes}, --gpus-per-node {gpus_per_node}, --cpus-per-task {cpus_per_task}: "
                          "each must be >= 1")
    for flag, value in (("--job-name", job_name), ("--partition", partition), ("--account", account)):
        if value and not _SLURM_WORD_RE.match(value):
            raise LaunchError(f"{flag} {value!r}: use letters, digits and _ . + - only")
    if not re.fullmatch(r"(\d+-)?\d+(:\d\d){0,2}", time):
        raise LaunchError(f"--time {time!r}: expected SLURM time such as 24:00:00 or 2-00:00:00")
    head = [f"--job-name={job_name}", f"--nodes={nodes}", f"--ntasks-per-node={gpus_per_node}",
            f"--gpus-per-node={gpus_per_node}", f"--cpus-per-task={cpus_per_task}", f"--time={time}",
            "--output=%x-%A_%a.out" if array else "--output=%x-%j.out"]
    if array:
        head.append(f"--array=0-{len(array) - 1}" + (f"%{parallel}" if parallel > 0 else ""))
    head += [f"--partition={partition}"] * bool(partition) + [f"--account={account}"] * bool(account)
    srun = ["srun", "--kill-on-bad-exit=1", "--output=moe-logs/%x-%j-task%t.log", python, *entry, *train_args]
    pick = ([f"POINTS=({' '.join(shlex.quote(a) for a in array)})", 'POINT="${POINTS[$SLURM_ARRAY_TASK_ID]}"']
            if array else [])
    return "\n".join([
        "#!/bin/bash",
        f"# {nodes} node(s) x {gpus_per_node} GPU(s) = {nodes * gpus_per_node} JAX processes, one per GPU.",
        "# jax.distributed.initialize() reads SLURM_NTASKS/PROCID/LOCALID/STEP_NODELIST: no flags needed.",
        *(f"#SBATCH {h}" for h in head),
        "set -euo pipefail",
        "mkdir -p moe-logs  # per-task logs (srun opens them after this line runs)",
        *pick, *before,
        "# a dead rank would leave the others blocked in a collective: --kill-on-bad-exit ends the job",
        shlex.join(srun).replace("'$POINT'", '"$POINT"'), ""])


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m moe.launch", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("tpu", help="print (or --run) the gcloud commands for a Cloud TPU VM slice")
    t.add_argument("--name", required=True)
    t.add_argument("--zone", required=True)
    t.add_argument("--type", required=True, help="e.g. v4-8, v5e-16 (= v5litepod-16), v5p-128, v6e-256")
    t.add_argument("--spot", action="store_true", help="spot capacity: cheaper, can be preempted")
    t.add_argument("--queued", action="store_true", help="use the queued-resources API (implied by --slices>1)")
    t.add_argument("--slices", type=int, default=1, help="multislice: N slices joined over the DCN")
    t.add_argument("--project", default="")
    t.add_argument("--version", default="", help="TPU runtime; default per generation")
    t.add_argument("--bucket", default="", help="gs://... ; workdir = <bucket>/<name>")
    t.add_argument("--env", action="append", default=[], metavar="KEY=VALUE", help="env var for train.py")
    t.add_argument("--run", action="store_true", help="execute the launch steps instead of printing them")
    g = sub.add_parser("gpu", help="print an sbatch script for a SLURM GPU cluster")
    g.add_argument("--nodes", type=int, required=True)
    g.add_argument("--gpus-per-node", type=int, required=True)
    g.add_argument("--job-name", default="moe")
    g.add_argument("--time", default="24:00:00")
    g.add_argument("--partition", default="")
    g.add_argument("--account", default="")
    g.add_argument("--cpus-per-task", type=int, default=8)
    g.add_argument("--python", default=".venv/bin/python", help="interpreter with moe and jax[cuda12]")
    return p


def main(argv: Sequence[str] | None = None, runner: Callable[[list[str]], None] = default_runner) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    cut = argv.index("--") if "--" in argv else len(argv)  # everything after -- belongs to train.py
    ours, train_args = argv[:cut], argv[cut + 1:]
    a = _parser().parse_args(ours)
    try:
        if a.cmd == "gpu":
            sys.stdout.write(sbatch_script(a.nodes, a.gpus_per_node, train_args, job_name=a.job_name, time=a.time,
                                           partition=a.partition, account=a.account,
                                           cpus_per_task=a.cpus_per_task, python=a.python))
            return 0
        job = make_job(a.name, a.zone, a.type, train_args, slices=a.slices, bucket=a.bucket, env=a.env,
                       spot=a.spot, queued=a.queued, project=a.project, runtime=a.version,
                       src=str(Path(__file__).resolve().parents[2]))
        steps, after = tpu_steps(job), tpu_followups(job)
        if a.run:
            run_steps(steps, runner)
            print("\nlaunched. Next:\n" + render(after), end="")
        else:
            print(f"# {job.slices} x {job.tpu.accelerator}: {job.tpu.hosts * job.slices} host(s); "
                  "add --run to execute the launch steps\n" + render(steps) + "\n# afterwards\n" + render(after), end="")
        return 0
    except LaunchError as e:
        print(f"moe.launch: error: {e}", file=sys.stderr)
        return 2


"""A sweep scheduled on cluster machinery: one bash script for Cloud TPU queued resources, one sbatch job array
for SLURM. Both can be re-run (re-submitted) at any time: a point whose summary.json in the sweep's workdir says
done is skipped, an unfinished one resumes from its checkpoints. Progress: `python -m moe.scaling status`.

Owns: the text of those scripts. Every point runs `python -m moe.scaling point SWEEP --point NAME --workdir W`
on every host of its slice / allocation (moe/scaling/points.py: the skip rule, train.py, point.json, the log
uploaded to the bucket). The TPU commands themselves come from moe/launch/jobs.py (create the queued
resource, wait until ACTIVE, ship the committed code, install, start), so a sweep point is launched exactly
like a single run.

TPU: one queued resource per point, named PREFIX-<index>, `--parallel` of them at a time. For each point the
script checks the skip rule, creates the resource, starts the point, polls its state in the bucket (and the
resource's: a spot resource that is preempted or fails counts as an interrupted attempt), deletes the
resource, and retries an interrupted point up to `--retries` times (each retry resumes).
"""

from __future__ import annotations

import shlex
from pathlib import Path

from moe.launch import jobs
from moe.runtime import storage
from moe.scaling.sweep import Sweep, SweepError

REPO = Path(__file__).resolve().parents[2]
POLL_S = 60


def repo_relative(path: Path) -> str:
    """The sweep file as the workers see it (they get the committed repo): it must live in the repo."""
    try:
        return str(Path(path).resolve().relative_to(REPO))
    except ValueError:
        raise SweepError(f"sweep file {path} is outside the repository ({REPO}); the workers receive the committed "
                         "repo, so put the sweep file under configs/sweeps/ and commit it") from None


def _point_args(sweep_file: str, workdir: str, name: str) -> list[str]:
    return ["-m", "moe.scaling", "point", sweep_file, "--workdir", workdir, "--point", name]


def preset_slices(sweep: Sweep, point) -> int:
    """The slices a point's config asks for: its `mesh.dcn_data` (the data-parallel ways across slices)."""
    from moe.config import apply_overrides, read_preset

    tree = apply_overrides(read_preset(sweep.base), list(point.overrides))
    return int((tree.get("mesh") or {}).get("dcn_data", 1) or 1)


def tpu_script(sweep: Sweep, workdir: str, *, prefix: str, zone: str, tpu_type: str, slices: int = 0,
               spot: bool = False, project: str = "", parallel: int = 1, retries: int = 3) -> str:
    """The bash script that runs the whole sweep on queued resources (see the module docstring). `slices` 0:
    each point gets the slices its config asks for (mesh.dcn_data; multislice when > 1)."""
    if not storage.is_url(workdir):
        raise SweepError(f"--workdir {workdir!r}: a TPU sweep needs a workdir every host shares, a bucket URL "
                         "(gs://B/PATH; or file:// on storage every host mounts): every host of every point writes "
                         "there, and the script reads the points' state from it")
    if parallel < 1 or retries < 0:
        raise SweepError(f"--parallel {parallel} / --retries {retries}: need parallel >= 1 and retries >= 0")
    sweep_file = repo_relative(sweep.path)
    py = ".venv/bin/python"
    status = f"{py} -m moe.scaling status {shlex.quote(sweep_file)} --workdir {shlex.quote(workdir)} --point"
    body = ["#!/bin/bash",
            f"# sweep {sweep.name}: {len(sweep.points)} points, each on its own queued resource {prefix}-<i> "
            f"({f'{slices} x ' if slices else ''}{tpu_type}{', spot' if spot else ''}), {parallel} at a time.",
            f"# Re-run this script to resume: points whose {workdir}/<point>/summary.json says done are skipped.",
            f"# Progress: {status.rsplit(' --point', 1)[0]}",
            "# Run it from the repository root (it ships the committed HEAD, like python -m moe.launch tpu).",
            "set -uo pipefail", f"PARALLEL=${{PARALLEL:-{parallel}}}", f"RETRIES=${{RETRIES:-{retries}}}", ""]
    for i, p in enumerate(sweep.points):
        args = _point_args(sweep_file, workdir, p.name)
        n = slices or preset_slices(sweep, p)
        job = jobs.make_job(f"{prefix}-{i}", zone, tpu_type, args[3:], slices=n, spot=spot, queued=True,
                            project=project, src=".", entry=args[:3])
        delete = jobs.tpu_followups(job)[-1].argv
        qstate = shlex.join(jobs.gcloud(job, "queued-resources", "describe", job.name, "--format=value(state.state)"))
        launch = "\n".join(f"    # {s.what}\n    {shlex.join(s.argv)} || return 75" for s in jobs.tpu_steps(job))
        body += [
            f"point_{i}() {{  # {p.name}",
            f"  if {status} {shlex.quote(p.name)} >/dev/null; then echo '{p.name}: done already'; return 0; fi",
            "  local rc=75 attempt t0",
            "  for attempt in $(seq 0 \"$RETRIES\"); do",
            f"    echo \"{p.name}: attempt $attempt on {job.name}\"",
            f"    t0=$(date +%s); rc=0; launch_{i} || rc=75",
            "    while [ $rc = 0 ]; do",
            f"      case \"$({status} {shlex.quote(p.name)} --since \"$t0\")\" in  # this attempt's state\n"
            "        done) break;; failed) rc=1;; interrupted) rc=75;; esac",
            "      [ $rc = 0 ] || break",
            f"      q=$({qstate}); [ \"$q\" = ACTIVE ] || {{ echo \"{job.name}: $q\"; rc=75; break; }}",
            f"      sleep {POLL_S}",
            "    done",
            f"    {shlex.join(delete)} || true",
            "    [ $rc = 75 ] || break  # done (0) or failed (1): no retry",
            "  done",
            f"  echo \"{p.name}: $( [ $rc = 0 ] && echo done || echo \"not done (exit $rc)\")\"",
            "  return $rc",
            "}",
            f"launch_{i}() {{",
            launch,
            "}", ""]
    body += ["failed=0",
             f"for i in $(seq 0 {len(sweep.points) - 1}); do",
             "  \"point_$i\" &",
             "  while [ \"$(jobs -rp | wc -l)\" -ge \"$PARALLEL\" ]; do wait -n || failed=1; done",
             "done",
             "while [ \"$(jobs -rp | wc -l)\" -gt 0 ]; do wait -n || failed=1; done",
             f"{status.rsplit(' --point', 1)[0]}", "exit $failed", ""]
    return "\n".join(body)


def slurm_script(sweep: Sweep, workdir: str, *, nodes: int, gpus_per_node: int, parallel: int = 0,
                 job_name: str = "", time: str = "24:00:00", partition: str = "", account: str = "",
                 cpus_per_task: int = 8, python: str = ".venv/bin/python") -> str:
    """An sbatch job array, one task per point (every point on `nodes` x `gpus_per_node` GPUs)."""
    sweep_file = repo_relative(sweep.path)
    names = [p.name for p in sweep.points]
    skip = [f"# the skip rule: a point whose {workdir}/<point>/summary.json says done exits at once",
            f"if {python} -m moe.scaling status {shlex.quote(sweep_file)} --workdir {shlex.quote(workdir)} "
            "--point \"$POINT\" >/dev/null; then echo \"$POINT: done already\"; exit 0; fi"]
    script = jobs.sbatch_script(nodes, gpus_per_node, _point_args(sweep_file, workdir, "$POINT"),
                                job_name=job_name or sweep.name.replace("_", "-")[:40], time=time,
                                partition=partition, account=account, cpus_per_task=cpus_per_task, python=python,
                                entry=(), array=names, parallel=parallel, before=skip)
    note = (f"# sweep {sweep.name}: {len(names)} points as a job array; re-submit to resume (done points exit at "
            f"once).\n# Progress: {python} -m moe.scaling status {sweep_file} --workdir {workdir}\n")
    return script.replace("#!/bin/bash\n", "#!/bin/bash\n" + note, 1)

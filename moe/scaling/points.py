"""One sweep point: run it (skipping it if done), record what happened, and read its state back -- on a local
disk or in a bucket (every file goes through moe/runtime/storage.py).

Owns: the point files and the state rule every scheduler shares (the local runner, TPU queued resources,
SLURM array tasks: moe/scaling/cluster.py). A point's folder WORKDIR/<name>/ is an ordinary train.py workdir
plus:
    point.json        {"status": running|done|failed|interrupted, "returncode", "host", "started", "ended",
                       "error": the last lines of the log when not done}; written by process 0 only
    logs/process-<rank>.log  train.py's output on each host (written locally, uploaded at the attempt's end)
    eval_full.json    with the sweep's `eval_full: true`: eval.py's LM metrics on the full validation split,
                      run once after training, with the eval's wall and CPU seconds (`eval_wall_s`, `eval_cpu_s`)

State, in this order: `done` (summary.json says done -- the skip rule), `failed` / `interrupted` (the last
attempt's point.json), `running` (an attempt started and has not recorded an end: a live run, or one whose
machine died; `last_step` says how far its metrics got), `not started`. `collect` reads every point of a sweep
back as one row of the results table (moe/scaling/runner.py writes it; moe/scaling/report.py reads it).
"""

from __future__ import annotations

import json
import os
import re
import resource
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

from moe.config import ConfigError, apply_overrides, from_dict, is_moe, read_preset
from moe.runtime import storage
from moe.scaling.sweep import Point, Sweep

REPO = Path(__file__).resolve().parents[2]
EXIT_PREEMPTED = 75  # train.py's: resumable
STATES = ("done", "running", "failed", "interrupted", "not started")


def read_json(path: str) -> dict | None:
    try:
        return json.loads(storage.read_text(path))
    except (OSError, ValueError):
        return None


def read_summary(run_dir: str | os.PathLike) -> dict | None:
    return read_json(storage.join(run_dir, "summary.json"))


def is_done(run_dir: str | os.PathLike) -> bool:
    s = read_summary(run_dir)
    return bool(s and s.get("done"))


def process_index() -> int:
    """This host's rank as the schedulers give it, unique within a point: SLURM_PROCID; on a TPU VM the worker
    id (TPU_WORKER_ID, or the `-w-<id>` suffix of the VM's hostname) within slice MEGASCALE_SLICE_ID of a
    multislice job; 0 on a single machine. Rank 0 writes point.json; each rank uploads its own log."""
    env = os.environ
    if env.get("SLURM_PROCID", "").isdigit():
        return int(env["SLURM_PROCID"])
    worker = env.get("TPU_WORKER_ID", "")
    if not worker.isdigit():
        m = re.search(r"-w-(\d+)$", socket.gethostname())
        worker = m.group(1) if m else "0"
    slice_id = env.get("MEGASCALE_SLICE_ID", "0")
    return (int(slice_id) if slice_id.isdigit() else 0) * 4096 + int(worker)


def log_name(rank: int) -> str:
    return f"logs/process-{rank}.log"


def _children_cpu_s() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


EVAL_FILE = "eval_full.json"


def evaluate_point(run_dir: str, *, env: dict | None = None, python: str = sys.executable) -> tuple[int, str]:
    """eval.py on the run's newest checkpoint, the full validation split -> run_dir/eval_full.json (once)."""
    out = storage.join(run_dir, EVAL_FILE)
    if storage.isfile(out):
        return 0, ""
    with tempfile.TemporaryDirectory(prefix="moe-eval-") as tmp:
        local = os.path.join(tmp, "eval.json")  # local: eval.py writes it, then it is uploaded with the timings
        t0, c0 = time.time(), _children_cpu_s()
        p = subprocess.run([python, str(REPO / "eval.py"), "--workdir", run_dir, "--out", local], cwd=REPO, env=env,
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        if p.returncode != 0:
            return p.returncode, _tail(p.stdout.decode("utf-8", "replace"))
        with open(local) as f:  # local
            res = json.load(f)
    res.update(eval_wall_s=round(time.time() - t0, 1), eval_cpu_s=round(_children_cpu_s() - c0, 1))
    storage.write_text(out, json.dumps(res, indent=1))
    return 0, ""


def _tail(text: str, lines: int = 3) -> str:
    return " | ".join([x for x in text.splitlines() if x.strip()][-lines:])


def run_point(sweep: Sweep, point: Point, workdir: str, *, env: dict | None = None,
              python: str = sys.executable) -> tuple[str, int, str]:
    """Runs train.py for one point unless it is done; returns (status, returncode, error tail).
    Re-running resumes (train.py resumes from the point's checkpoints)."""
    run_dir = storage.join(workdir, point.name)
    if is_done(run_dir):
        rc, error = evaluate_point(run_dir, env=env, python=python) if sweep.eval_full else (0, "")
        return ("done already", 0, "") if rc == 0 else ("failed", rc, f"eval.py: {error}")
    rank = process_index()
    main = rank == 0
    host = socket.gethostname()
    record = {"name": point.name, "status": "running", "returncode": None, "host": host,
              "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "started_unix": round(time.time(), 1), "overrides": list(point.overrides),
              "size": point.size, "budget_tokens": point.budget_tokens, "budget_flops": point.budget_flops}
    if main:
        storage.write_text(storage.join(run_dir, "point.json"), json.dumps(record, indent=1))
    cmd = [python, str(REPO / "train.py"), "--config", str(sweep.base), "--workdir", run_dir, *point.overrides,
           "train.progress=false"]  # a progress bar in a log file is noise
    prev = storage.join(run_dir, log_name(rank))
    t0, c0 = time.time(), _children_cpu_s()
    with tempfile.TemporaryDirectory(prefix="moe-point-") as tmp:
        local_log = os.path.join(tmp, "train.log")  # staged here; uploaded whole (a bucket cannot append)
        with open(local_log, "wb") as log:  # local: a temporary file, not a workdir path
            if storage.isfile(prev):
                log.write(storage.read_bytes(prev))
            log.write(f"\n=== {time.strftime('%Y-%m-%d %H:%M:%S')} {' '.join(cmd)}\n".encode())
            log.flush()
            rc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=REPO, env=env).returncode
        with open(local_log, "rb") as log:  # local
            text = log.read()
    storage.write_bytes(prev, text)
    cpu_s = round(_children_cpu_s() - c0, 1)
    ok = rc == 0 and is_done(run_dir)
    status = "done" if ok else ("interrupted" if rc == EXIT_PREEMPTED else "failed")
    error = "" if ok else _tail(text.decode("utf-8", "replace"))
    if ok and sweep.eval_full:
        rc, eval_error = evaluate_point(run_dir, env=env, python=python)
        status, error = ("done", "") if rc == 0 else ("failed", f"eval.py: {eval_error}")
    record.update(status=status, returncode=rc, ended=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                  attempt_wall_s=round(time.time() - t0, 1), attempt_cpu_s=cpu_s, error=error)
    if main:
        storage.write_text(storage.join(run_dir, "point.json"), json.dumps(record, indent=1))
    return status, rc, error


def point_state(workdir: str, point: Point, since: float = 0.0) -> dict:
    """{"name", "state" (one of STATES), "last_step", "eval_loss", "detail"} read from the point's files.
    `since` (Unix time): a point.json of an attempt started before it is not this attempt's (a scheduler that
    has just relaunched the point): the state is then `not started` until the new attempt writes its own."""
    from moe.train.metrics import read_metrics

    run_dir = storage.join(workdir, point.name)
    out = {"name": point.name, "state": "not started", "last_step": None, "eval_loss": None, "detail": ""}
    summary = read_summary(run_dir)
    if summary and summary.get("done"):
        loss = summary.get("eval_loss") if summary.get("eval_loss") is not None else summary.get("loss")
        return dict(out, state="done", last_step=summary.get("step"), eval_loss=loss)
    rec = read_json(storage.join(run_dir, "point.json"))
    if since and rec and rec.get("started_unix", 0) < since:
        return out
    try:
        records = read_metrics(run_dir)
    except ValueError:
        records = []
    out["last_step"] = records[-1]["step"] if records else None
    if rec and rec.get("status") in ("failed", "interrupted"):
        return dict(out, state=rec["status"], detail=f"exit {rec.get('returncode')}: {rec.get('error', '')}")
    if rec or records or storage.isdir(storage.join(run_dir, "checkpoints")):
        since = f"since {rec['started']} on {rec.get('host', '?')}" if rec else "no point.json"
        return dict(out, state="running", detail=since)
    return out


def sweep_status(sweep: Sweep, workdir: str) -> list[dict]:
    return [point_state(workdir, p) for p in sweep.points]


def format_status(rows: list[dict]) -> str:
    counts = {s: sum(r["state"] == s for r in rows) for s in STATES}
    lines = [f"{r['name']}: {r['state']}"
             + (f" (step {r['last_step']})" if r["last_step"] is not None and r["state"] != "not started" else "")
             + (f", eval_loss {r['eval_loss']:.4f}" if r["eval_loss"] is not None else "")
             + (f" -- {r['detail']}" if r["detail"] else "") for r in rows]
    lines.append(f"{len(rows)} points: " + ", ".join(f"{n} {s}" for s, n in counts.items() if n))
    return "\n".join(lines)


def run_sweep(sweep: Sweep, workdir: str | os.PathLike, *, env: dict | None = None,
              echo: Callable[[str], None] = print) -> int:
    """Runs every point in order on this machine: finished ones are skipped, unfinished ones resume, a failing
    one is recorded and the sweep goes on. Returns 0 when every point is done, else 1."""
    workdir = os.fspath(workdir)
    failed, n = [], len(sweep.points)
    for i, p in enumerate(sweep.points, 1):
        resumed = storage.isdir(storage.join(workdir, p.name, "checkpoints"))
        status, rc, error = run_point(sweep, p, workdir, env=env)
        summary = read_summary(storage.join(workdir, p.name)) or {}
        full = read_json(storage.join(workdir, p.name, EVAL_FILE)) if sweep.eval_full else None
        loss = f"{full['loss']:.4f} full split" if full else _cell(summary.get("eval_loss"))
        how = "resumed, " if resumed else ""
        if status == "done already":
            echo(f"[{i}/{n}] {p.name}: done already (eval_loss {loss})")
        elif status == "done":
            wall = (read_json(storage.join(workdir, p.name, "point.json")) or {}).get("attempt_wall_s")
            echo(f"[{i}/{n}] {p.name}: done ({how}eval_loss {loss}, {wall}s)")
        else:
            failed.append(p.name)
            log = storage.join(workdir, p.name, log_name(process_index()))
            echo(f"[{i}/{n}] {p.name}: {status.upper()} (exit {rc}; {how}log {log}): {error}")
    echo(f"{n} points: {n - len(failed)} done, {len(failed)} not done" + (f": {', '.join(failed)}" if failed else ""))
    return 1 if failed else 0


def _cell(v) -> str:
    if v is None:
        return ""
    if isinstance(v, float):
        return f"{v:.4g}" if abs(v) < 1e4 else f"{v:.3e}"
    return str(v)


# --- the results table (`collect`; moe/scaling/runner.py writes it) -------------------------------------

COLUMNS = ("name", "status", "size", "N_total", "N_active", "E", "tokens", "flops", "eval_loss", "bits_per_byte",
           "wall_time_s", "cpu_s", "eval_split", "budget_tokens", "budget_flops")


def collect(sweep: Sweep, workdir: str | os.PathLike) -> list[dict]:
    """One row per point; N, E, tokens and FLOPs come from summary.json, the planned config otherwise.

    eval_loss: with the sweep's `eval_full: true`, eval.py's on the full validation split (eval_full.json; a
    finished point without one is `status: not evaluated` until `run` evaluates it); otherwise the
    run's own final eval (train.eval_batches batches). cpu_s: the last training attempt's plus the eval's."""
    base_tree = read_preset(sweep.base)
    rows = []
    for p in sweep.points:
        tree = apply_overrides(base_tree, list(p.overrides))
        row = dict.fromkeys(COLUMNS)
        row.update(name=p.name, size=p.size, budget_tokens=p.budget_tokens, budget_flops=p.budget_flops)
        try:
            cfg = from_dict(tree)
            row["E"] = cfg.model.num_experts if is_moe(cfg.model) else 1
        except ConfigError:
            cfg = None
        run_dir = storage.join(workdir, p.name)
        s = read_summary(run_dir)
        if s and s.get("done"):
            loss = s.get("eval_loss") if s.get("eval_loss") is not None else s.get("loss")
            bpb, split, status = s.get("bits_per_byte"), "train.eval_batches", "done"
            cpu = (read_json(storage.join(run_dir, "point.json")) or {}).get("attempt_cpu_s")
            if sweep.eval_full:
                ev = read_json(storage.join(run_dir, EVAL_FILE))
                loss, bpb, split = (ev["loss"], ev.get("bits_per_byte"), "full") if ev else (None, None, None)
                status = "done" if ev else "not evaluated"
                cpu = cpu + ev.get("eval_cpu_s", 0.0) if ev and cpu is not None else cpu
            row.update(status=status, N_total=s["params_total"], N_active=s["params_active"], tokens=s["tokens"],
                       flops=s["flops"], eval_loss=loss, bits_per_byte=bpb, wall_time_s=s.get("wall_time_s"),
                       cpu_s=cpu, eval_split=split)
        else:
            row["status"] = (read_json(storage.join(workdir, p.name, "point.json")) or {}).get("status", "pending")
            if cfg is not None:
                from moe.model.decoder import param_counts

                row["N_total"], row["N_active"] = param_counts(cfg.model)
                row["tokens"] = cfg.train.steps * cfg.train.batch_size * cfg.train.seq_len
        rows.append(row)
    return rows

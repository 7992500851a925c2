"""Training metrics to WORKDIR/metrics.jsonl (one JSON object per logged step) and TensorBoard (WORKDIR/tb/).

Owns: the on-disk metric formats and reading them back. Must not compute metrics (train.py does) nor
touch checkpoints. Only process 0 writes: other processes build a `MetricsWriter(..., enabled=False)`.

    writer = MetricsWriter(workdir)
    writer.write(step, {"loss": 2.31, "lr": 3e-3, "expert_load": np.array([...])})  # -> {"step": ..., ...}
    records = read_metrics(workdir)

Crash safety: every line is flushed as it is written, so a killed run keeps all it logged except perhaps a
half-written last line, which `read_metrics` drops and a new writer cuts off before appending. On resume
from step s, `truncate_after(s)` drops the records logged after the checkpoint (they will be logged again)
and tells TensorBoard to hide its events after s (tensorboardX `purge_step`).

A workdir in a bucket (moe/runtime/storage.py): both files are written in a local staging folder and
uploaded whole by `sync()` -- the loop calls it before each checkpoint save, so the bucket holds every
record up to the newest checkpoint whatever kills the run -- and at most every 30 s otherwise, and on close.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from moe.runtime import storage

METRICS_FILE = "metrics.jsonl"
TB_DIR = "tb"


def _to_json(value: Any) -> Any:
    """numpy / jax scalars -> python int/float/bool, arrays -> (nested) lists; strings pass through."""
    if isinstance(value, (str, bool, int, float)) or value is None:
        return value
    if isinstance(value, (list, tuple)):
        return [_to_json(v) for v in value]
    arr = np.asarray(value)  # jax arrays land here (a device->host copy)
    if arr.dtype == np.bool_ or np.issubdtype(arr.dtype, np.integer) or np.issubdtype(arr.dtype, np.floating):
        return arr.tolist()  # 0-d -> python scalar
    return arr.astype(np.float64).tolist()  # e.g. bfloat16, which numpy does not count as floating


def _scalars(name: str, value: Any) -> list[tuple[str, float]]:
    """TensorBoard scalars for one metric: a vector v becomes `name/0`, `name/1`, ...; strings none."""
    if isinstance(value, str) or value is None:
        return []
    flat = np.asarray(value, dtype=np.float64).reshape(-1)
    if np.ndim(value) == 0:
        return [(name, float(flat[0]))]
    return [(f"{name}/{i}", float(v)) for i, v in enumerate(flat)]


def _drop_partial_tail(path: Path) -> None:
    """Cut a half-written last line (a run killed mid-write) so appended lines start on their own line;
    a last line that is a whole record short of its newline gets the newline instead."""
    if not path.exists() or path.stat().st_size == 0:
        return
    with open(path, "rb+") as f:  # local: the workdir's file or the staged copy
        data = f.read()
        if data.endswith(b"\n"):
            return
        start = data.rfind(b"\n") + 1
        try:
            json.loads(data[start:])
            f.write(b"\n")
        except ValueError:  # JSONDecodeError, or UnicodeDecodeError if cut inside a character
            f.truncate(start)


class MetricsWriter:
    """Appends metric records to WORKDIR/metrics.jsonl and WORKDIR/tb/ (see module docstring)."""

    def __init__(self, workdir: str | os.PathLike, enabled: bool = True):
        self.enabled = enabled
        self._file = None
        self._tb = None
        if enabled:
            self._mirror = storage.Mirror(os.fspath(workdir))
            self._mirror.pull(METRICS_FILE)
            self.path = Path(self._mirror.local(METRICS_FILE))  # a local file: the workdir's or the staged copy
            self.tb_dir = Path(self._mirror.local(TB_DIR))  # local: likewise
            self.path.parent.mkdir(parents=True, exist_ok=True)  # local
            _drop_partial_tail(self.path)
            self._file = open(self.path, "a", encoding="utf-8")  # local: a bucket object is never appended to
            self._tb = self._open_tb()

    def _open_tb(self, purge_step: int | None = None):
        from tensorboardX import SummaryWriter  # imported lazily: ~0.5 s, and only process 0 needs it

        return SummaryWriter(logdir=str(self.tb_dir), purge_step=purge_step)

    def write(self, step: int, metrics: dict[str, Any]) -> None:
        """One JSON line `{"step": step, **metrics}` (flushed) and the same values as TensorBoard scalars."""
        if not self.enabled:
            return
        record = {"step": int(step), **{k: _to_json(v) for k, v in metrics.items()}}
        self._file.write(json.dumps(record) + "\n")  # NaN/Inf are written as NaN/Infinity: a NaN loss must show
        self._file.flush()
        for name, value in metrics.items():
            for tag, x in _scalars(name, value):
                self._tb.add_scalar(tag, x, int(step))
        self._tb.flush()
        self._mirror.sync(force=False)

    def sync(self) -> None:
        """Uploads what was written (a bucket workdir; nothing to do on a local disk)."""
        if self.enabled:
            self._mirror.sync()

    def truncate_after(self, step: int) -> None:
        """Drop records with step > `step` (a resume from checkpoint `step` logs them again)."""
        if not self.enabled:
            return
        self._file.close()
        kept = [r for r in _records(self.path.read_text(encoding="utf-8"), self.path) if r["step"] <= step]  # local
        tmp = self.path.with_suffix(".jsonl.tmp")
        tmp.write_text("".join(json.dumps(r) + "\n" for r in kept), encoding="utf-8")  # local
        os.replace(tmp, self.path)  # local; atomic: a crash here leaves the old file or the new one, never half
        self._file = open(self.path, "a", encoding="utf-8")  # local
        # TensorBoard cannot edit event files; a new writer with purge_step hides events >= step + 1.
        self._tb.close()
        self._tb = self._open_tb(purge_step=step + 1)
        self._mirror.sync()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None
        if self.enabled:
            self._mirror.close()


def read_metrics(workdir: str | os.PathLike) -> list[dict]:
    """All records of WORKDIR/metrics.jsonl in order; [] if absent. A truncated last line is skipped;
    an unreadable line elsewhere is corruption and raises ValueError naming the line."""
    path = storage.join(workdir, METRICS_FILE)
    if not storage.isfile(path):
        return []
    return _records(storage.read_text(path), path)


def _records(text: str, path) -> list[dict]:
    lines = text.split("\n")
    complete, tail = lines[:-1], lines[-1]  # text after the last newline is a partial write (or "")
    records = []
    for i, line in enumerate(complete, 1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{i}: not a JSON record ({e})") from None
    if tail.strip():
        try:  # a last line whose newline alone is missing is still a whole record
            records.append(json.loads(tail))
        except json.JSONDecodeError:
            pass
    return records


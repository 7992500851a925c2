"""moe.train.metrics: JSONL records and TensorBoard scalars, a truncated last line, truncate_after on resume."""

import json
import struct

import jax.numpy as jnp
import numpy as np

from moe.train.metrics import MetricsWriter, read_metrics


def _tb_events(tb_dir) -> list:
    """Reads the TFRecord event files (u64 length, u32 crc, data, u32 crc) written by tensorboardX."""
    from tensorboardX.proto.event_pb2 import Event

    events = []
    files = sorted(tb_dir.glob("events.out.tfevents.*"))
    assert files, f"no event files in {tb_dir}"
    for path in files:
        data, pos = path.read_bytes(), 0
        while pos < len(data):
            (n,) = struct.unpack("<Q", data[pos:pos + 8])
            events.append(Event.FromString(data[pos + 12:pos + 12 + n]))
            pos += 12 + n + 4
    return events


def _tb_scalars(tb_dir) -> dict[str, list[tuple[int, float]]]:
    out: dict[str, list[tuple[int, float]]] = {}
    for event in _tb_events(tb_dir):
        for v in event.summary.value:
            out.setdefault(v.tag, []).append((event.step, v.simple_value))
    return out


def test_write_jsonl_and_tensorboard(tmp_path):
    w = MetricsWriter(str(tmp_path))
    w.write(10, {"loss": jnp.float32(2.5), "lr": np.float64(1e-3), "skipped": np.int32(3),
                 "expert_load": jnp.array([[0.25, 0.75], [0.5, 0.5]]), "note": "eval"})
    w.write(20, {"loss": 2.0, "eval_loss": float("nan")})
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert json.loads(lines[0]) == {"step": 10, "loss": 2.5, "lr": 1e-3, "skipped": 3,
                                    "expert_load": [[0.25, 0.75], [0.5, 0.5]], "note": "eval"}
    assert len(lines) == 2 and np.isnan(json.loads(lines[1])["eval_loss"])
    w.close()
    tb = _tb_scalars(tmp_path / "tb")
    assert tb["loss"] == [(10, 2.5), (20, 2.0)]
    assert [tb[f"expert_load/{i}"] for i in range(4)] == [[(10, 0.25)], [(10, 0.75)], [(10, 0.5)], [(10, 0.5)]]
    assert "note" not in tb


def test_disabled_writer_writes_nothing(tmp_path):
    w = MetricsWriter(str(tmp_path / "run"), enabled=False)
    w.write(1, {"loss": 1.0})
    w.truncate_after(0)
    w.close()
    assert not (tmp_path / "run").exists()


def test_truncated_last_line(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1, "loss": 3.0}\n{"step": 2, "loss": 2.0}\n{"step": 3, "lo')
    assert [r["step"] for r in read_metrics(tmp_path)] == [1, 2]
    w = MetricsWriter(str(tmp_path))  # a resumed writer cuts the partial line before appending
    w.write(3, {"loss": 1.5})
    w.close()
    assert read_metrics(tmp_path) == [{"step": 1, "loss": 3.0}, {"step": 2, "loss": 2.0}, {"step": 3, "loss": 1.5}]
    assert read_metrics(tmp_path / "missing") == []


def test_truncate_after_resume(tmp_path):
    w = MetricsWriter(str(tmp_path))
    for step in (10, 20, 30, 40):
        w.write(step, {"loss": 1.0 / step})
    w.close()
    w = MetricsWriter(str(tmp_path))  # resumed from the checkpoint at step 20
    w.truncate_after(20)
    for step in (30, 40):
        w.write(step, {"loss": 2.0 / step})
    w.close()
    records = read_metrics(tmp_path)
    assert [r["step"] for r in records] == [10, 20, 30, 40]
    assert [r["loss"] for r in records] == [0.1, 0.05, 2.0 / 30, 0.05]
    # TensorBoard is told to hide the first run's events from step 21 on (a SessionLog START at purge_step)
    from tensorboardX.proto.event_pb2 import SessionLog

    starts = [e.step for e in _tb_events(tmp_path / "tb") if e.session_log.status == SessionLog.START]
    assert starts == [21]

"""Benchmarks: `python -m moe.bench NAME [--json PATH] [--quick]`, NAME in moe_layer, routing, train_step,
compile, input, checkpoint, all. They print a table and write the figures as a flat JSON object; they assert nothing
(correctness lives in tests/, speed targets and measured figures in docs/performance.md).

Owns: measuring. Must not change what it measures: it builds the real MoE layer, train step, input pipeline
and checkpointer from their modules.

Method. Every compared variant is compiled and run once (warm-up), then the variants are run in rounds,
round-robin, alternating direction each round; a ratio is the median over rounds of the per-round ratio
(paired), so load from other processes on a shared machine hits both sides of a ratio alike.
`--quick` shrinks every size so the whole suite runs in seconds (for tests/test_bench.py; its numbers mean
nothing). One module for the six benchmarks (~390 lines): they share the paired timing and the trainer.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from moe.config import Config, MeshConfig, ModelConfig, load_config, replace
from moe.runtime.hostmem import set_host_malloc
from moe.runtime.peak import matmul_peak

PRESETS = Path(__file__).resolve().parents[2] / "configs"


def _paired_ratio(times: dict[str, list[float]], num: str, den: str) -> float:
    return statistics.median(a / b for a, b in zip(times[num], times[den]))


def _ratios_to(ref: str, fns: dict[str, Callable[[], Any]], reps: int) -> tuple[dict[str, float], list[float]]:
    """Median over `reps` rounds of time(fn) / time(ref), each fn timed right next to its own call of ref (in
    alternating order), so the machine's slow speed drifts (seconds long on this VM) cancel within a pair.
    Returns the ratios and the ref's times."""
    for f in fns.values():
        jax.block_until_ready(f())
    ratios: dict[str, list[float]] = {k: [] for k in fns if k != ref}
    ref_times: list[float] = []
    for r in range(reps):
        for k in ratios:
            pair = {}
            for name in ((ref, k) if r % 2 == 0 else (k, ref)):
                t0 = time.perf_counter()
                jax.block_until_ready(fns[name]())
                pair[name] = time.perf_counter() - t0
            ratios[k].append(pair[k] / pair[ref])
            ref_times.append(pair[ref])
    return {k: statistics.median(v) for k, v in ratios.items()}, ref_times


# --- 1. MoE layer vs dense FFN -------------------------------------------------------------------------


def _fwd_bwd(module: nnx.Module, x: jax.Array) -> Callable[[], Any]:
    """jit(value_and_grad) of <module(x), ct> w.r.t. params and input: one forward + backward."""
    graphdef, params, rest = nnx.split(module, nnx.Param, ...)  # rest: e.g. a router bias (no gradient)
    ct = jax.random.normal(jax.random.key(2), x.shape, x.dtype)

    def loss(p, x):
        y = nnx.merge(graphdef, p, rest)(x)
        y = y[0] if isinstance(y, tuple) else y
        return jnp.sum(y.astype(jnp.float32) * ct)

    f = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))
    return lambda: f(params, x)


class _Train(nnx.Module):
    """The MoE layer in training mode (capacity factor 1.25), output only."""

    def __init__(self, cfg: ModelConfig, dtype):
        from moe.model.experts.layer import MoEFFN

        self.moe = MoEFFN(cfg, dtype, nnx.Rngs(0))

    def __call__(self, x):
        return self.moe(x, train=True)[0]


def bench_moe_layer(quick: bool = False, dtype: str = "float32", reps: int = 5,
                    dropless_experts: tuple[int, ...] = (8, 16, 32, 64), grouped_matmul: str = "auto") -> dict:
    """MoE FFN fwd+bwd time / dense gated FFN with hidden K*F (same active FLOPs), one routing group of T tokens,
    for the capacity path and the dropless path (grouped matmul: on CPU the bucketed kernel), timed in the same
    interleaved rounds.

    B=1, T=4096: one routing group of 4096 tokens. The same number of tokens as B sequences of T/B tokens
    (the model's per-sequence groups) gives the same number of slots up to rounding of C, but E*B smaller
    matmuls. `grouped_matmul`: the dropless kernel (model.grouped_matmul; auto = the platform's).
    """
    from moe.model.layers import FFN

    t, d, f, k = (256, 64, 128, 2) if quick else (4096, 512, 2048, 2)
    experts = (8, 16, 32, 64)
    if quick:
        reps, dropless_experts = 2, (8,)
    cdt = jnp.bfloat16 if dtype == "bfloat16" else jnp.float32
    x = jax.random.normal(jax.random.key(1), (1, t, d), cdt)
    fns = {"dense": _fwd_bwd(FFN(d, k * f, "geglu", cdt, nnx.Rngs(0)), x)}
    for e in experts:
        cfg = ModelConfig(d_model=d, d_ff=f, num_experts=e, top_k=k, capacity_factor=1.25, dtype=dtype)
        fns[f"capacity_e{e}"] = _fwd_bwd(_Train(cfg, cdt), x)
    for e in dropless_experts:
        cfg = ModelConfig(d_model=d, d_ff=f, num_experts=e, top_k=k, dispatch="dropless", dtype=dtype,
                          grouped_matmul=grouped_matmul)
        fns[f"dropless_e{e}"] = _fwd_bwd(_Train(cfg, cdt), x)
    ratios, dense_s = _ratios_to("dense", fns, reps)
    out: dict[str, Any] = {f"ratio_e{e}": ratios[f"capacity_e{e}"] for e in experts}
    out["flatness"] = out["ratio_e64"] / out["ratio_e8"]
    out["dense_fwd_bwd_s"] = statistics.median(dense_s)
    for e in dropless_experts:
        out[f"dropless_ratio_e{e}"] = ratios[f"dropless_e{e}"]
    if {8, 64} <= set(dropless_experts):
        out["dropless_flatness"] = out["dropless_ratio_e64"] / out["dropless_ratio_e8"]
    out.update(tokens=t, d_model=d, d_ff=f, top_k=k, capacity_factor=1.25, dtype=dtype, rounds=reps,
               grouped_matmul=grouped_matmul, platform=jax.devices()[0].platform)
    return out


def bench_routing(quick: bool = False, reps: int = 7) -> dict:
    """MoE FFN fwd+bwd time of each routing option / the GShard baseline (softmax, position drop policy, no
    bias), E=16 top-2, capacity 1.25, one routing group of T tokens (the dispatch and FFN cost is shared)."""
    t, d, f, e = (256, 64, 128, 8) if quick else (4096, 512, 2048, 16)
    reps = 2 if quick else reps
    x = jax.random.normal(jax.random.key(1), (1, t, d), jnp.float32)
    base = dict(d_model=d, d_ff=f, num_experts=e, top_k=2, capacity_factor=1.25, drop_policy="position")
    variants = {"position": {}, "causal": {"drop_policy": "causal"}, "probability": {"drop_policy": "probability"},
                "bias": {"router_bias_update_rate": 1e-3}, "sigmoid": {"router_score": "sigmoid"},
                "seq_loss": {"seq_aux_loss_weight": 1e-4}}
    fns = {k: _fwd_bwd(_Train(ModelConfig(**{**base, **v}), jnp.float32), x) for k, v in variants.items()}
    ratios, base_s = _ratios_to("position", fns, reps)
    return {**{f"{k}_ratio": v for k, v in ratios.items()}, "position_fwd_bwd_s": statistics.median(base_s),
            "tokens": t, "num_experts": e, "rounds": reps}


# --- 2. train step MFU, 5. checkpoint stall ------------------------------------------------------------


def _preset(name: str, quick: bool, overrides: list[str] = ()) -> Config:
    """A preset on a 1-device mesh; `quick` shrinks it to a toy model."""
    path = PRESETS / f"{'tiny' if quick else name}.yaml"  # quick shrinks any preset to the same toy
    if not path.is_file():
        raise SystemExit(f"configs/{name}.yaml not found")
    cfg = load_config(path, list(overrides))
    cfg = replace(cfg, mesh=MeshConfig(), optim={"grad_accum": 1})
    if quick:
        cfg = replace(cfg, model={"d_model": 32, "num_layers": 2, "num_heads": 2, "d_ff": 64, "num_kv_heads": 0,
                                  "head_dim": 0},
                      train={"batch_size": 2, "seq_len": 32})
    return cfg


def _mesh(cfg: Config, quick: bool):
    """All devices; `quick` uses one (a toy model gains nothing from 8 fake CPU devices but compile time)."""
    from moe.runtime.sharding import make_mesh

    return make_mesh(cfg.mesh, jax.devices()[:1] if quick else None)


def _synthetic_batch(cfg: Config) -> dict:
    b, t = cfg.train.batch_size, cfg.train.seq_len
    tokens = np.random.default_rng(0).integers(0, cfg.model.vocab_size, (b, t + 1), dtype=np.int32)
    return {"inputs": tokens[:, :-1], "targets": tokens[:, 1:], "weights": np.ones((b, t), np.float32),
            "segment_ids": np.ones((b, t), np.int32), "positions": np.broadcast_to(np.arange(t, dtype=np.int32), (b, t))}


class _Trainer:
    """The real train step (moe.train.steps) on synthetic tokens: the step alone, no input pipeline."""

    def __init__(self, cfg: Config, quick: bool = False):
        from moe.train import steps as train_steps

        self.cfg = cfg
        self.setup = train_steps.build(cfg, _mesh(cfg, quick))
        self.state = train_steps.init_state(self.setup)
        self.step_fn = train_steps.make_train_step(self.setup)
        self.batch = train_steps.device_batch(self.setup, _synthetic_batch(cfg))

    def step(self) -> dict:
        self.state, metrics = self.step_fn(self.state, self.batch)
        return metrics

    def time_steps(self, n: int) -> float:
        """Seconds per step over n back-to-back steps (no host sync inside, as in the training loop)."""
        jax.block_until_ready(self.state)
        t0 = time.perf_counter()
        for _ in range(n):
            self.step()
        jax.block_until_ready(self.state)
        return (time.perf_counter() - t0) / n


def bench_train_step(quick: bool = False, preset: str = "small", overrides: list[str] = (), steps: int = 5,
                     rounds: int = 3) -> dict:
    """MFU = flops_per_token (PaLM app. B) * tokens per step / step time / matmul peak measured here."""
    from moe.model.decoder import flops_per_token

    cfg = _preset(preset, quick, overrides)
    tr = _Trainer(cfg, quick)
    tr.step()
    tr.time_steps(1)  # warm-up (first call compiles)
    step_s, peaks = [], []
    for _ in range(1 if quick else rounds):  # peak and steps alternate: both see the same background load
        peaks.append(matmul_peak(cfg.model.dtype, n=256 if quick else 2048))
        step_s.append(tr.time_steps(1 if quick else steps))
    step_time, peak = statistics.median(step_s), statistics.median(peaks)
    tokens = cfg.train.batch_size * cfg.train.seq_len
    flops = flops_per_token(cfg.model, cfg.train.seq_len) * tokens
    return {"mfu": flops / step_time / peak, "step_time_s": step_time, "tokens_per_sec": tokens / step_time,
            "peak_gflops": peak / 1e9, "model_gflops_per_step": flops / 1e9, "preset": cfg.name,
            "dtype": cfg.model.dtype, "remat": cfg.model.remat, "batch_tokens": tokens}


def bench_checkpoint(quick: bool = False, preset: str = "small", rounds: int = 3, steps_after: int = 3) -> dict:
    """Seconds the loop is blocked in `Checkpointer.save` (async; includes the state's checksums) / step time,
    on the real train state. Also: the slowdown of the steps that run while the background write is in flight
    (same cores), the checksum pass alone, and what verifying adds to a restore (checksums + finiteness)."""
    import orbax.checkpoint as ocp

    from moe.train import integrity
    from moe.train.checkpoint import Checkpointer

    cfg = _preset(preset, quick)
    tr = _Trainer(cfg, quick)
    tr.step()
    base = tr.time_steps(1 if quick else steps_after)
    workdir = tempfile.mkdtemp(prefix="bench_ckpt_", dir=os.environ.get("TMPDIR"))
    ck = Checkpointer(workdir, dataclasses.replace(cfg.checkpoint, async_save=True, keep=2), with_data=False)
    stalls, slowdowns, sums, restores, verifies = [], [], [], [], []
    try:
        for r in range(1 if quick else rounds):
            jax.block_until_ready(tr.state)
            t0 = time.perf_counter()
            expected = integrity.checksums(tr.state)  # of the state being saved (the save repeats it)
            sums.append(time.perf_counter() - t0)
            abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=a.sharding), tr.state)
            t0 = time.perf_counter()
            ck.save(r + 1, tr.state, {"step": r + 1})
            stalls.append(time.perf_counter() - t0)
            during = tr.time_steps(1 if quick else steps_after)
            slowdowns.append((during - base) * (1 if quick else steps_after) / base)
            ck.wait()
            base = tr.time_steps(1 if quick else steps_after)
            t0 = time.perf_counter()
            restored = ck.manager.restore(r + 1, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract)))
            jax.block_until_ready(restored["state"])
            restores.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            if integrity.verify(restored["state"], expected):  # the benchmark must time a sound restore
                raise RuntimeError("benchmark checkpoint did not verify")
            verifies.append(time.perf_counter() - t0)
        ck.close()
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    stall, restore, verify = statistics.median(stalls), statistics.median(restores), statistics.median(verifies)
    return {"ckpt_stall_ratio": stall / base, "ckpt_stall_s": stall, "step_time_s": base,
            "ckpt_write_slowdown_steps": statistics.median(slowdowns), "ckpt_checksum_s": statistics.median(sums),
            "ckpt_restore_s": restore, "ckpt_verify_s": verify, "ckpt_verify_overhead": verify / restore,
            "preset": cfg.name}


# --- 3. compile time vs depth --------------------------------------------------------------------------


def _compile_seconds(cfg: Config, quick: bool) -> float:
    """Trace + lower + compile of a fresh jit of the train step (no cache hit possible)."""
    from moe.train import steps as train_steps

    setup = train_steps.build(cfg, _mesh(cfg, quick))
    batch = {k: jax.ShapeDtypeStruct((cfg.train.batch_size, cfg.train.seq_len),
                                     jnp.float32 if k == "weights" else jnp.int32, sharding=s)
             for k, s in train_steps.batch_shardings(setup).items()}
    fn = jax.jit(train_steps.train_step_fn(setup), in_shardings=(setup.state_shardings, train_steps.batch_shardings(setup)),
                 out_shardings=(setup.state_shardings, None), donate_argnums=(0,))
    t0 = time.perf_counter()
    with jax.set_mesh(setup.mesh):
        fn.lower(setup.abstract_state, batch).compile()
    return time.perf_counter() - t0


def bench_compile(quick: bool = False, preset: str = "tiny", rounds: int = 2) -> dict:
    """Compile time of the train step at 32 layers / at 4 layers, same width (scanned blocks: ~flat).

    `quick` compares 4 with 2 layers (the key is the same; the figure is not the target's)."""
    cfg = _preset(preset, quick)
    deep, shallow = (replace(cfg, model={"num_layers": n}) for n in ((4 if quick else 32), 2 if quick else 4))
    times: dict[str, list[float]] = {"l32": [], "l4": []}
    for r in range(1 if quick else rounds):
        for name, c in ((("l4", shallow), ("l32", deep)) if r % 2 == 0 else (("l32", deep), ("l4", shallow))):
            times[name].append(_compile_seconds(c, quick))
    return {"compile_ratio": _paired_ratio(times, "l32", "l4"), "compile_s_l4": statistics.median(times["l4"]),
            "compile_s_l32": statistics.median(times["l32"]), "preset": cfg.name}


# --- 4. input pipeline vs train step -------------------------------------------------------------------


def bench_input(quick: bool = False, preset: str = "tiny", batches: int = 50) -> dict:
    """Tokens/s the input pipeline delivers (tokenize + pack + batch) / tokens/s the train step consumes."""
    from moe.data.pipeline import train_iterator
    from moe.data.tokenizer import load_tokenizer

    cfg = _preset(preset, False)
    it = train_iterator(cfg, load_tokenizer(cfg))
    next(it)  # start-up (opening the corpus, first shuffle window) is not throughput
    n = 5 if quick else batches
    t0 = time.perf_counter()
    for _ in range(n):
        batch = next(it)
    pipe_tps = n * batch["inputs"].size / (time.perf_counter() - t0)
    tr = _Trainer(_preset(preset, quick), quick)
    tr.step()
    step_s = tr.time_steps(2 if quick else 10)
    step_tps = tr.cfg.train.batch_size * tr.cfg.train.seq_len / step_s
    return {"input_ratio": pipe_tps / step_tps, "pipeline_tokens_per_sec": pipe_tps,
            "step_tokens_per_sec": step_tps, "preset": cfg.name, "num_workers": cfg.data.num_workers}


BENCHES: dict[str, Callable[..., dict]] = {
    "moe_layer": bench_moe_layer,
    "routing": bench_routing,
    "train_step": bench_train_step,
    "compile": bench_compile,
    "input": bench_input,
    "checkpoint": bench_checkpoint,
}


def run(name: str, quick: bool = False, overrides: list[str] = ()) -> dict:
    """Runs one benchmark (or 'all': a dict of dicts) and returns its figures.

    `overrides` (config `key=value`) apply to the preset of train_step (e.g. model.dtype=bfloat16); moe_layer
    takes model.dtype and model.grouped_matmul from them (its shapes are fixed)."""
    if name == "all":
        return {n: run(n, quick, overrides) for n in BENCHES}
    if name == "train_step":
        return bench_train_step(quick=quick, overrides=list(overrides))
    if name == "moe_layer":
        return bench_moe_layer(quick=quick, **_layer_settings(overrides))
    return BENCHES[name](quick=quick)


def _layer_settings(overrides) -> dict:
    """moe_layer's settings from `--set` (validated as config values; fp32 unless model.dtype is set; other keys
    belong to train_step)."""
    from moe.config import load_config

    mine = [o for o in overrides if o.split("=")[0] in LAYER_KEYS]
    cfg = load_config("configs/tiny.yaml", ["model.dtype=float32", *mine]).model
    return {"dtype": cfg.dtype, "grouped_matmul": cfg.grouped_matmul}


LAYER_KEYS = ("model.dtype", "model.grouped_matmul")


def _table(results: dict) -> str:
    rows = []
    for k, v in results.items():
        if isinstance(v, dict):
            rows.append(f"[{k}]")
            rows += ["  " + line for line in _table(v).splitlines()]
        else:
            rows.append(f"{k:28s} {v:.4g}" if isinstance(v, float) else f"{k:28s} {v}")
    return "\n".join(rows)


def machine() -> str:
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), "unknown CPU") if Path("/proc/cpuinfo").exists() else "unknown"
    return f"{cpu}, {os.cpu_count()} cores, jax {jax.__version__}, {jax.devices()[0].platform}"


def main(argv: list[str] | None = None, host_malloc: bool = False) -> None:
    """`host_malloc`: apply the preset's `train.host_malloc` (as train.py does) before JAX starts: the command
    line does; an in-process caller (tests) whose JAX already runs must not."""
    p = argparse.ArgumentParser(prog="python -m moe.bench", description=__doc__.split("\n")[0])
    p.add_argument("name", choices=[*BENCHES, "all"])
    p.add_argument("--json", help="write the figures to this JSON file")
    p.add_argument("--quick", action="store_true", help="toy sizes (smoke test; numbers mean nothing)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="config override for train_step's preset, e.g. --set model.dtype=float32")
    args = p.parse_args(argv)
    kept = host_malloc and set_host_malloc(_preset("small", False, args.set).train.host_malloc)
    t0 = time.perf_counter()
    results = run(args.name, quick=args.quick, overrides=args.set)
    results = dict(results, machine=machine(), host_malloc="keep" if kept else "system",
                   command="python -m moe.bench " + " ".join(argv or sys.argv[1:]),
                   wall_s=round(time.perf_counter() - t0, 1))
    print(_table(results))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(results, indent=1) + "\n")


"""Ahead-of-time compile of the real train step for a Cloud TPU topology, on a CPU host with no TPU.

Owns: `--aot TOPOLOGY` of train.py. libtpu (the `jax[tpu]` extra) describes a pod slice as abstract devices
(`jax.experimental.topologies.get_topology_desc`); the mesh, the sharded abstract state and the jitted step
are the very ones train.py builds (moe/runtime/sharding.py, moe/train/steps.py), lowered with ShapeDtypeStructs and
compiled by the TPU compiler. Nothing is allocated: the answer is what XLA's buffer assignment needs per
device, set against the chip's HBM. Must not touch the model, the step or the rules table.

    python train.py --config configs/glam_1.7b_64e.yaml --aot v5e:8x8 [--aot_json runs/aot.json]

Exit status of `aot_main`: 0 fits, 1 does not fit (including the compiler's own HBM OOM), 2 bad topology.
"""

from __future__ import annotations

import json
import os
import re
import sys
import tempfile
import time
from typing import Any

# libtpu reads these when it loads (at the first topology query), so they are set at import. Several
# processes (parallel tests, agents) may load libtpu at once: without ALLOW_MULTIPLE_LIBTPU_LOAD the second
# fails on /tmp/libtpu_lockfile. TPU_WORKER_HOSTNAMES=localhost silences a harmless metadata lookup error.
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
os.environ.setdefault("TPU_LOG_DIR", os.path.join(tempfile.gettempdir(), "moe_aot_tpu_logs"))
os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
os.environ.setdefault("JAX_PLATFORMS", "cpu")  # the host computes nothing; TPU devices are compile-only

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

if not jax.config.jax_platforms:  # jax was imported before us (train.py): same choice, made via the config
    jax.config.update("jax_platforms", "cpu")

from moe.config import Config  # noqa: E402
from moe.runtime.peak import chip, chips_of  # noqa: E402

GiB = 1024**3

COLLECTIVES = ("all-to-all", "ragged-all-to-all", "all-gather", "reduce-scatter", "all-reduce", "collective-permute")
_OOM_MARKERS = ("RESOURCE_EXHAUSTED", "HbmOom", "Ran out of memory", "out of memory")


class TopologyError(ValueError):
    """The topology name is not one libtpu knows; the message gives the accepted form."""


def topology_devices(topology: str) -> list:
    """Abstract TPU devices of a topology such as 'v5e:8x8', 'v4:8x8x16' or 'v5p:4x4x8'.

    v4 uses megacore (one device per chip, both TensorCores), as JAX does on real v4 pods; v5p is megacore
    by default.
    """
    from jax.experimental import topologies

    if not re.fullmatch(r"[A-Za-z0-9_ ]+:[0-9]+(x[0-9]+)*", topology or ""):
        raise TopologyError(f"--aot: '{topology}' is not a TPU topology; write GENERATION:CHIPS, e.g. v5e:8x8, "
                            f"v4:8x8x16, v5p:4x4x8, v6e:16x16")
    kwargs = {"chip_config_name": "megacore"} if topology.lower().startswith("v4:") else {}
    try:
        return list(topologies.get_topology_desc(topology_name=topology, platform="tpu", **kwargs).devices)
    except ModuleNotFoundError as e:
        raise TopologyError(f"--aot needs libtpu: pip install 'jax[tpu]' ({e})") from None
    except Exception as e:  # libtpu raises JaxRuntimeError INVALID_ARGUMENT with its own reason
        if "libtpu" in str(e).lower() and "not found" in str(e).lower():
            raise TopologyError(f"--aot needs libtpu: pip install 'jax[tpu]' ({e})") from None
        reason = str(e).splitlines()[0].replace("INVALID_ARGUMENT: ", "")
        raise TopologyError(f"--aot: unknown TPU topology '{topology}': {reason} "
                            f"(examples: v5e:8x8, v4:8x8x16, v5p:4x4x8, v6e:16x16)") from None


def hbm_bytes(device) -> float:
    """HBM one device may use (moe/runtime/peak.py CHIPS)."""
    row = chip(device.device_kind)
    if row is None:
        raise TopologyError(f"--aot: no HBM figure for device kind '{device.device_kind}'; add it to "
                            "moe.runtime.peak.CHIPS")
    return row.hbm_gib * GiB * getattr(device, "num_cores", 1) / row.cores


def count_collectives(hlo_text: str) -> dict[str, int]:
    """Collective instructions in the optimised HLO, async start/done pairs counted once.

    Static counts: an op inside the scanned layer body (a while loop) counts once, not once per layer.
    """
    counts = {}
    for op in COLLECTIVES:
        counts[op] = len(re.findall(rf"\s{op}(?:-start)?\(", hlo_text))
    return counts


def abstract_batch(setup) -> dict:
    """ShapeDtypeStructs of one global batch, sharded as train.py feeds it (see moe/data/pipeline.py for dtypes)."""
    from moe.train import steps as train_steps

    cfg = setup.cfg
    shape = (cfg.train.batch_size, cfg.train.seq_len)
    shardings = train_steps.batch_shardings(setup)
    return {k: jax.ShapeDtypeStruct(shape, jnp.float32 if k == "weights" else jnp.int32, sharding=shardings[k])
            for k in train_steps.BATCH_KEYS}


def _state_bytes_per_device(abstract_state) -> int:
    """Bytes of one device's shard of the train state, from the shardings alone (no compile needed)."""
    total = 0
    for a in jax.tree.leaves(abstract_state):
        n = 1
        for d in a.sharding.shard_shape(a.shape):
            n *= d
        total += n * a.dtype.itemsize
    return total


def _oom_figures(message: str) -> tuple[float | None, float | None]:
    """(needed, available) bytes from the compiler's OOM message, if it says: 'Used 40.5G of 15.75G hbm', or
    'the total memory required for HLO temporaries (64.73G) exceeds available HBM (30.75G)' (temporaries
    alone, so a lower bound on the peak)."""
    scale = {"K": 1024, "M": 1024**2, "G": GiB, "T": 1024**4}
    for pattern in (r"Used ([0-9.]+)([KMGT]) of ([0-9.]+)([KMGT]) hbm",
                    r"required for HLO temporaries \(([0-9.]+)([KMGT])\) exceeds available HBM \(([0-9.]+)([KMGT])\)"):
        m = re.search(pattern, message)
        if m:
            return float(m.group(1)) * scale[m.group(2)], float(m.group(3)) * scale[m.group(4)]
    return None, None


def compile_report(cfg: Config, topology: str, *, keep_hlo: bool = False, step: str = "train") -> dict[str, Any]:
    """Compiles cfg's train step (or, with step="eval", the eval step eval.py and the in-training eval run:
    the eval config of moe/eval/lm.py, i.e. dropless, on the same mesh) for `topology`; returns the report
    (memory per device, FLOPs, collectives, Pallas kernel calls; the compiled HLO text too with `keep_hlo`).

    Raises TopologyError for an unknown topology and ConfigError when the mesh does not fit the device
    count; a compile-time HBM OOM is a report with fits=False.
    """
    from moe.train import steps as train_steps
    from moe.model.decoder import flops_per_token, param_counts
    from moe.runtime.sharding import make_mesh

    devices = topology_devices(topology)
    dev = devices[0]
    hbm = hbm_bytes(dev)
    mesh = make_mesh(cfg.mesh, devices)
    if step == "eval":
        from moe.eval.lm import eval_config
        from moe.runtime.sharding import batch_ways

        cfg = eval_config(cfg, None, batch_ways(mesh))
    setup = train_steps.build(cfg, mesh)
    total_params, active_params = param_counts(cfg.model)
    tokens = cfg.train.batch_size * cfg.train.seq_len
    model_flops = flops_per_token(cfg.model, cfg.train.seq_len) * tokens
    report: dict[str, Any] = {
        "config": cfg.name, "step": step, "topology": topology, "device_kind": dev.device_kind, "devices": len(devices),
        "mesh": dict(mesh.shape), "params_total": total_params, "params_active": active_params,
        "tokens_per_step": tokens, "model_flops_per_step": model_flops,
        "model_flops_per_device": model_flops / len(devices),
        "ideal_step_s": model_flops / (chip(dev.device_kind).peak_bf16 * chips_of(devices)),
        "state_bytes_per_device": _state_bytes_per_device(  # the eval step holds the params only
            setup.abstract_state["params"] if step == "eval" else setup.abstract_state),
        "hbm_bytes_per_device": hbm,
    }
    # The same jits as train_steps.make_train_step / make_eval_step, built here so that `.lower` is at hand
    # whatever those wrap them in.
    if step == "eval":
        fn = jax.jit(train_steps.eval_step_fn(setup), in_shardings=(setup.param_shardings, train_steps.batch_shardings(setup)))
        args = (setup.abstract_state["params"], abstract_batch(setup))
        report["model_flops_per_step"] /= 3  # a forward pass only
        report["model_flops_per_device"] /= 3
        report["ideal_step_s"] /= 3
    else:
        fn = jax.jit(train_steps.train_step_fn(setup), in_shardings=(setup.state_shardings, train_steps.batch_shardings(setup)),
                     out_shardings=(setup.state_shardings, None), donate_argnums=(0,))
        args = (setup.abstract_state, abstract_batch(setup))
    t0 = time.perf_counter()
    try:
        with jax.set_mesh(mesh):  # activates the model's `constrain` hints, as on the real pod
            lowered = fn.lower(*args)
        compiled = lowered.compile()
    except Exception as e:  # XlaRuntimeError; its type is not public API, so match the message
        if not any(m in str(e) for m in _OOM_MARKERS):
            raise
        used, _ = _oom_figures(str(e))
        if used is not None and "HLO temporaries" in str(e):  # temporaries alone: add the state they work on
            used += report["state_bytes_per_device"]
        report.update(compile_s=time.perf_counter() - t0, fits=False, peak_bytes=used, oom=True,
                      oom_memory="vmem" if re.search(r"space[ =]vmem", str(e)) else "hbm",
                      error=str(e).splitlines()[0][:500])
        return report
    report["compile_s"] = time.perf_counter() - t0
    mem = compiled.memory_analysis()
    args_b, out_b, alias_b = mem.argument_size_in_bytes, mem.output_size_in_bytes, mem.alias_size_in_bytes
    temp_b, code_b = mem.temp_size_in_bytes, mem.generated_code_size_in_bytes
    # Donated state aliases the output: count those bytes once.
    total_b = args_b + out_b - alias_b + temp_b + code_b
    peak_b = getattr(mem, "peak_memory_in_bytes", 0) or total_b
    report.update(argument_bytes=args_b, output_bytes=out_b, alias_bytes=alias_b, temp_bytes=temp_b,
                  code_bytes=code_b, total_bytes=total_b, peak_bytes=max(peak_b, total_b), oom=False,
                  collectives=count_collectives(compiled.as_text()),
                  pallas_calls=compiled.as_text().count('custom_call_target="tpu_custom_call"'))
    if keep_hlo:
        report["hlo"] = compiled.as_text()
    report["fits"] = report["peak_bytes"] <= hbm
    return report


def format_report(r: dict[str, Any]) -> str:
    g = lambda b: "?" if b is None else f"{b / GiB:.2f} GiB"  # noqa: E731
    lines = [
        f"aot: {r['config']} {r.get('step', 'train')} step on {r['topology']}: {r['devices']} x {r['device_kind']}, mesh {r['mesh']}",
        f"  params: {r['params_total']:,} total, {r['params_active']:,} active per token",
        f"  model FLOPs per step: {r['model_flops_per_step']:.3e} ({r['tokens_per_step']:,} tokens; "
        f"{r['model_flops_per_device']:.3e} per device; {r['ideal_step_s']:.3g} s at 100% MFU)",
        f"  state per device ({'params' if r.get('step') == 'eval' else 'params + optimizer'}, from shardings): "
        f"{g(r['state_bytes_per_device'])}",
        f"  compile: {r['compile_s']:.1f} s",
    ]
    if r["oom"]:
        if r.get("oom_memory") == "vmem":  # a Pallas kernel's tiles do not fit the core's vector memory
            lines.append("  compiler: out of VMEM (smaller Pallas tiles: model.megablox_tile_m/k/n, "
                         f"model.attention_block_q/kv): {r['error']}")
        else:
            lines.append(f"  compiler: out of HBM: {r['error']}")
    else:
        lines += [
            f"  memory per device: arguments {g(r['argument_bytes'])}, temporaries {g(r['temp_bytes'])}, "
            f"output {g(r['output_bytes'])} (aliased with arguments {g(r['alias_bytes'])}), "
            f"code {g(r['code_bytes'])}, peak {g(r['peak_bytes'])}",
            "  collectives in the HLO (a scanned layer body counted once): "
            + ", ".join(f"{k} {v}" for k, v in r["collectives"].items()),
        ]
    lines.append(f"fits: {'yes' if r['fits'] else 'no'} (peak {g(r['peak_bytes'])} of "
                 f"{r['hbm_bytes_per_device'] / GiB:.2f} GiB HBM)")
    return "\n".join(lines)


def aot_main(cfg: Config, topology: str, json_path: str = "", step: str = "train") -> int:
    """train.py --aot: print the report (and write it as JSON); 0 fits, 1 does not fit, 2 bad topology."""
    try:
        report = compile_report(cfg, topology, step=step)
    except TopologyError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(format_report(report), flush=True)
    if json_path:
        os.makedirs(os.path.dirname(os.path.abspath(json_path)), exist_ok=True)
        with open(json_path, "w") as f:
            json.dump(report, f, indent=1)
    return 0 if report["fits"] else 1

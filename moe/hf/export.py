"""Export a run's checkpoint as a Hugging Face model folder: config.json, generation_config.json,
model.safetensors (or shards + model.safetensors.index.json) and the run's tokenizer: tokenizer.json +
tokenizer_config.json (AutoTokenizer loads them; a SentencePiece run's tokenizer.model is converted exactly and
copied beside them).

Owns: the folder layout and the writes. The mapping (which class, which names) is moe/hf/mapping.py.

Tensors are read one at a time from the restored (possibly sharded) params and written into shards of at most
`max_shard_bytes`, so the host holds one shard, never the model twice. Everything is written into a temporary
folder beside `out` and renamed to `out` at the end: a failed export leaves no folder that looks complete.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from typing import Any

import numpy as np

from moe.data import hf_tokenizer
from moe.hf import mapping
from moe.hf.mapping import HFError
from moe.runtime import storage

DTYPES = ("bfloat16", "float32")
SHARD_BYTES = 5 * 2**30  # what save_pretrained uses by default (5 GB)


def _cast(a: np.ndarray, dtype: str) -> np.ndarray:
    import ml_dtypes

    return a.astype(ml_dtypes.bfloat16 if dtype == "bfloat16" else np.float32)


def write_folder(cfg_model, params: Any, out: str, *, arch: str = "auto", dtype: str = "bfloat16",
                 max_positions: int = 2048, tokenizer=None, max_shard_bytes: int = SHARD_BYTES) -> dict:
    """Writes the HF folder for `params` of a model with config `cfg_model`, with `tokenizer` (ours, either
    kind: moe/data/hf_tokenizer.py export_files) if given; returns a summary. `out` may be a bucket URL: the
    folder is written on the local disk first, then uploaded file by file, config.json last (an upload cut
    short is no loadable model, and what it uploaded is deleted)."""
    if dtype not in DTYPES:
        raise HFError(f"--dtype {dtype}: choose bfloat16 or float32")
    arch = mapping.choose_arch(cfg_model, arch)
    kw = dict(arch=arch, dtype=dtype, max_positions=max_positions, tokenizer=tokenizer, max_shard_bytes=max_shard_bytes)
    if not storage.is_url(out):
        return _write_local(cfg_model, params, out, **kw)
    if storage.exists(out) and (not storage.isdir(out) or storage.listdir(out)):
        raise HFError(f"--out '{out}' exists and is not an empty folder; pass a new folder")
    staging = tempfile.mkdtemp(prefix="moe-hf-export-")
    try:
        summary = _write_local(cfg_model, params, os.path.join(staging, "hf"), **kw)
        names = sorted(os.listdir(os.path.join(staging, "hf")), key=lambda n: n == "config.json")
        done: list[str] = []
        try:
            for name in names:
                storage.copy_file(os.path.join(staging, "hf", name), storage.join(out, name))
                done.append(name)
        except BaseException:
            for name in done:
                storage.remove(storage.join(out, name))
            raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return dict(summary, out=out)


def _write_local(cfg_model, params: Any, out: str, *, arch: str, dtype: str, max_positions: int, tokenizer,
                 max_shard_bytes: int) -> dict:
    from safetensors.numpy import save_file

    if os.path.exists(out) and (not os.path.isdir(out) or os.listdir(out)):
        raise HFError(f"--out '{out}' exists and is not an empty folder; pass a new folder")
    tmp = f"{out.rstrip('/')}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    try:
        shards: list[list[str]] = [[]]
        buf: dict[str, np.ndarray] = {}
        size = total = 0
        files: list[str] = []

        def flush() -> None:
            nonlocal buf, size
            if buf:
                name = f"shard-{len(files):05d}.safetensors"
                save_file(buf, os.path.join(tmp, name), metadata={"format": "pt"})
                files.append(name)
                shards.append([])
            buf, size = {}, 0

        for name, get in mapping.hf_tensors(cfg_model, arch, params):
            a = _cast(get(), dtype)
            if buf and size + a.nbytes > max_shard_bytes:
                flush()
            buf[name] = a
            shards[-1].append(name)
            size += a.nbytes
            total += a.nbytes
        flush()
        shards = [s for s in shards if s]
        if len(files) == 1:
            os.rename(os.path.join(tmp, files[0]), os.path.join(tmp, "model.safetensors"))
        else:
            final = [f"model-{i + 1:05d}-of-{len(files):05d}.safetensors" for i in range(len(files))]
            for src, dst in zip(files, final):
                os.rename(os.path.join(tmp, src), os.path.join(tmp, dst))
            index = {"metadata": {"total_size": total},
                     "weight_map": {n: final[i] for i, names in enumerate(shards) for n in names}}
            with open(os.path.join(tmp, "model.safetensors.index.json"), "w") as f:
                json.dump(index, f, indent=1)
        ids = ({"bos_token_id": tokenizer.bos_id, "eos_token_id": tokenizer.eos_id, "pad_token_id": tokenizer.pad_id}
               if tokenizer is not None else {"bos_token_id": 2, "eos_token_id": 3, "pad_token_id": 0})
        with open(os.path.join(tmp, "config.json"), "w") as f:
            json.dump({**mapping.hf_config(cfg_model, arch, max_positions=max_positions, dtype=dtype), **ids}, f,
                      indent=1)
        with open(os.path.join(tmp, "generation_config.json"), "w") as f:
            json.dump(ids, f, indent=1)
        for name, data in (hf_tokenizer.export_files(tokenizer) if tokenizer is not None else {}).items():
            with open(os.path.join(tmp, name), "wb") as f:
                f.write(data)
        if os.path.isdir(out):
            os.rmdir(out)  # empty (checked above)
        os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return {"arch": arch, "out": out, "files": len(files), "bytes": total, "dtype": dtype}

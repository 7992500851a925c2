"""Tokenizers for code and text: SentencePiece training, caching, loading, per-piece byte lengths; and the one
entry point for any tokenizer a run names (`data.tokenizer`: a SentencePiece `.model`, or a Hugging Face
`tokenizer.json`, read by moe/data/hf_tokenizer.py behind the same interface).

Owns: the tokenizer choices, the cached tokenizer of the builtin/packages/files corpora, the vocab-size check and the
tokenizer files of a workdir. Must not read batches or pack: that is `moe.data.pipeline`.

    python -m moe.data.tokenizer train --config configs/tiny.yaml [--out PATH] [key=value ...]

Deliberate choices (Kudo & Richardson 2018, SentencePiece):
- BPE, not unigram: ~1.5 s instead of ~60 s on the 8.5 MB builtin corpus, similar bytes per token.
- Lossless: `normalization_rule_name=identity`, no dummy prefix, no whitespace collapsing, so
  `decode(encode(x)) == x` for every string (tested on the stdlib). `byte_fallback` turns characters
  outside the vocabulary into UTF-8 byte pieces instead of <unk>.
- Code layout is first class: "\\n" is a user-defined piece (always exactly one token; it never merges with
  text, so training line by line loses nothing), and `allow_whitespace_only_pieces` learns indentation runs
  ("▁▁▁▁", "▁▁▁▁▁▁▁▁", ...) as single pieces.
- Ids: pad 0, unk 1, bos 2, eos 3 (pad = 0 lets padded batches be zeros).
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import io
import logging
import os
import sys
from collections.abc import Iterator

import numpy as np
import sentencepiece as spm
from sentencepiece import sentencepiece_model_pb2 as sp_pb

from moe.data.corpus import DataError, file_lock, open_corpus
from moe.runtime import storage

log = logging.getLogger(__name__)

PAD_ID, UNK_ID, BOS_ID, EOS_ID = 0, 1, 2, 3
MAX_TRAIN_BYTES = 200_000_000  # tokenizer training reads at most this much text of the train split
TRAINER_OPTIONS = dict(
    model_type="bpe", byte_fallback=True, pad_id=PAD_ID, unk_id=UNK_ID, bos_id=BOS_ID, eos_id=EOS_ID,
    normalization_rule_name="identity", add_dummy_prefix=False, remove_extra_whitespaces=False,
    allow_whitespace_only_pieces=True, split_digits=False, user_defined_symbols=["\n"],
    max_sentence_length=1 << 16, character_coverage=0.9999, hard_vocab_limit=True,
)


class Tokenizer:
    """A loaded SentencePiece model with the ids the data pipeline needs.

    The interface every tokenizer here has (moe.data.hf_tokenizer.HFTokenizer too): `path`, `vocab_size`,
    `pad_id` / `bos_id` / `eos_id`, `encode`, `decode`, `token_bytes`, `sha` (what a checkpoint records) and
    `files` (what a workdir holds of it)."""

    exact_vocab = True  # model.vocab_size must equal ours (an HF tokenizer may have fewer ids than the model)

    def __init__(self, path: str, model_proto: bytes):
        self.path = path
        self._sp = spm.SentencePieceProcessor(model_proto=model_proto)
        self.vocab_size: int = self._sp.get_piece_size()
        self.pad_id: int = self._sp.pad_id()
        self.bos_id: int = self._sp.bos_id()
        self.eos_id: int = self._sp.eos_id()
        for name, value in (("pad", self.pad_id), ("bos", self.bos_id), ("eos", self.eos_id)):
            if value < 0:
                raise DataError(f"data.tokenizer '{path}' defines no {name} piece; train it with "
                                "`python -m moe.data.tokenizer train` (pad_id=0, bos_id=2, eos_id=3)")

        proto = sp_pb.ModelProto.FromString(model_proto)
        user = [i for i, p in enumerate(proto.pieces) if p.type == sp_pb.ModelProto.SentencePiece.USER_DEFINED
                and p.piece == "\n"]
        # "\n" as an atomic user-defined piece makes line-by-line encoding give the same ids, ~2x faster
        # (BPE cost grows faster than linearly in the length of what it is given).
        self._newline = user[0] if user else None
        self._proto = model_proto

    @property
    def sha(self) -> str:
        return hashlib.sha256(self._proto).hexdigest()[:16]

    def files(self) -> dict[str, bytes]:
        return {"tokenizer.model": self._proto}

    def encode(self, text: str) -> list[int]:
        if self._newline is None:
            return self._sp.encode(text)
        out: list[int] = []
        for ids in self._sp.encode(text.split("\n")):
            out += ids
            out.append(self._newline)
        out.pop()
        return out

    def decode(self, ids) -> str:
        return self._sp.decode([int(i) for i in ids])

    def token_bytes(self) -> np.ndarray:
        """int32 [V]: UTF-8 bytes each piece stands for (byte pieces 1, control/unknown 0), for bits per byte."""
        sp = self._sp
        out = np.zeros(self.vocab_size, np.int32)
        for i in range(self.vocab_size):
            if sp.is_control(i) or sp.is_unknown(i):
                continue
            out[i] = 1 if sp.is_byte(i) else len(sp.id_to_piece(i).replace("\u2581", " ").encode("utf-8"))
        return out


def tokenizer_from_file(path: str):
    """Loads a SentencePiece `.model` file or a Hugging Face `tokenizer.json` (a local path or a bucket URL)."""
    p = path if storage.is_url(path) else os.path.expanduser(path)
    if not storage.isfile(p):
        raise DataError(f"data.tokenizer: '{path}' does not exist; give a SentencePiece .model file or a Hugging "
                        "Face tokenizer.json, or leave data.tokenizer empty to train one "
                        "(python -m moe.data.tokenizer train --config ...)")
    if p.endswith(".json"):
        from moe.data import hf_tokenizer

        return hf_tokenizer.from_file(p)
    try:
        return Tokenizer(p, storage.read_bytes(p))
    except RuntimeError as e:
        raise DataError(f"data.tokenizer: '{path}' is not a SentencePiece model ({e})") from None


def cache_dir() -> str:
    """$MOE_CACHE_DIR (a local folder or a bucket URL, shared by the workers of a pod), else runs/_cache."""
    return os.environ.get("MOE_CACHE_DIR") or "runs/_cache"


def cached_path(corpus_name: str, vocab_size: int) -> str:
    """e.g. runs/_cache/tokenizer-moe_text-stdlib_r1_val0500-3.12.1-v8192.model (corpus identity + vocab)."""
    tag = corpus_name.replace("/", "-").replace(":", "-")
    return storage.join(cache_dir(), f"tokenizer-{tag}-v{vocab_size}.model")


def _training_lines(cfg, max_bytes: int) -> Iterator[str]:
    """Non-empty lines of the train split, in dataset order, up to `max_bytes` of text."""
    corpus = open_corpus(cfg)
    source = corpus.source(cfg.data.train_split)
    seen = 0
    for i in range(len(source)):
        text = corpus.text(source[i])
        for line in text.split("\n"):
            if line:
                yield line
        seen += len(text)
        if seen >= max_bytes:
            return


def train_tokenizer(cfg, out: str, max_bytes: int = MAX_TRAIN_BYTES) -> Tokenizer:
    """Trains a BPE model of `model.vocab_size` pieces on the configured train split and writes `out`."""
    vocab = cfg.model.vocab_size
    model = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(sentence_iterator=_training_lines(cfg, max_bytes), model_writer=model,
                                       vocab_size=vocab, num_threads=os.cpu_count() or 1, minloglevel=2,
                                       **TRAINER_OPTIONS)
    except RuntimeError as e:  # e.g. "Vocabulary size is too high" on a tiny corpus
        raise DataError(f"model.vocab_size={vocab}: SentencePiece could not train on data.source="
                        f"{cfg.data.source} ({str(e).strip()}); lower model.vocab_size or add data") from None
    storage.write_bytes(out, model.getvalue())  # atomic: a concurrent reader never sees half a file
    return Tokenizer(os.fspath(out), model.getvalue())


def load_tokenizer(cfg) -> Tokenizer:
    """`data.tokenizer` if set; else (builtin/packages/files) the cached tokenizer of the corpus, trained on first use."""
    if cfg.data.tokenizer:
        tok = tokenizer_from_file(cfg.data.tokenizer)
    elif cfg.data.source == "tfds":
        raise DataError("data.tokenizer is required with data.source=tfds; train one with "
                        "`python -m moe.data.tokenizer train --config CONFIG --out runs/tok.model` and set data.tokenizer")
    else:
        path = cached_path(open_corpus(cfg).name, cfg.model.vocab_size)
        if not storage.isfile(path):
            # one trainer per local cache (a lock file); in a bucket, concurrent trainers write the same bytes
            # (training is deterministic) and each write is one whole object
            lock = contextlib.nullcontext() if storage.is_url(path) else file_lock(os.path.dirname(path),
                                                                                     os.path.basename(path))
            with lock:
                if not storage.isfile(path):
                    log.info("training tokenizer %s (once)", path)
                    train_tokenizer(cfg, path)
        tok = tokenizer_from_file(path)
    check_vocab(tok, cfg.model.vocab_size)
    return tok


def check_vocab(tok, vocab_size: int) -> None:
    """A SentencePiece model must have exactly model.vocab_size pieces; an HF tokenizer at most that many ids
    (HF models pad their embedding table: Qwen3's tokenizer has 151,669 ids for a 151,936-row table)."""
    if tok.vocab_size == vocab_size or (not tok.exact_vocab and tok.vocab_size < vocab_size):
        return
    raise DataError(f"tokenizer '{tok.path}' has {tok.vocab_size} pieces but model.vocab_size is {vocab_size}; "
                    f"set model.vocab_size={tok.vocab_size} or point data.tokenizer at a tokenizer of the right size")


def workdir_files(cfg) -> tuple[str, ...]:
    """The tokenizer files a run's workdir holds: tokenizer.model, or tokenizer.json + tokenizer_config.json."""
    return ("tokenizer.json", "tokenizer_config.json") if cfg.data.tokenizer.endswith(".json") else ("tokenizer.model",)


def save_to_workdir(tok, workdir: str) -> None:
    """Writes `tok.files()` into the workdir (skipped when data.tokenizer already is the workdir's own file)."""
    for name, data in tok.files().items():
        dst = storage.join(workdir, name)
        if storage.orbax_path(dst) != storage.orbax_path(tok.path):
            storage.write_bytes(dst, data)


def from_workdir(workdir: str, cfg):
    """The tokenizer a run trained with, from its workdir."""
    path = storage.join(workdir, workdir_files(cfg)[0])
    if not storage.isfile(path):
        raise DataError(f"tokenizer '{path}' is missing; copy the tokenizer the run was trained with there")
    tok = tokenizer_from_file(path)
    try:
        check_vocab(tok, cfg.model.vocab_size)
    except DataError:
        raise DataError(f"'{path}' has {tok.vocab_size} pieces but the run's model.vocab_size is "
                        f"{cfg.model.vocab_size}: it is not the run's tokenizer") from None
    return tok


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m moe.data.tokenizer", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    train = sub.add_parser("train", help="train a SentencePiece model on the configured source's train split")
    train.add_argument("--config", required=True, help="preset YAML, e.g. configs/tiny.yaml")
    train.add_argument("--out", default="", help="output .model path (default: the cache path for builtin/packages/files)")
    train.add_argument("--max-bytes", type=int, default=MAX_TRAIN_BYTES, help="text of the train split to read")
    train.add_argument("overrides", nargs="*", help="key.sub=value config overrides")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    from moe.config import ConfigError, load_config

    try:
        cfg = load_config(args.config, args.overrides)
        if args.out:
            out = args.out  # a local path or a bucket URL
        elif cfg.data.source == "tfds":
            raise DataError("--out is required with data.source=tfds (there is no cache path for it)")
        else:
            out = cached_path(open_corpus(cfg).name, cfg.model.vocab_size)
        tok = train_tokenizer(cfg, out, args.max_bytes)
    except (ConfigError, DataError) as e:
        sys.exit(f"error: {e}")
    print(f"wrote {tok.path} ({tok.vocab_size} pieces)")


if __name__ == "__main__":
    main()

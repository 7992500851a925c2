"""Training and evaluation batches with grain: tokenize, cut into row-sized pieces, pack, batch.

Owns: the input pipeline from a corpus (`moe.data.corpus`) and a tokenizer (`moe.data.tokenizer`) to numpy batches,
its determinism and checkpointable state, and `check_data`. Must not touch devices: turning per-host
batches into global jax.Arrays is the trainer's job.

Batch (per host, B = train.batch_size // process_count rows, T = train.seq_len):
    inputs      int32   [B, T]  token ids
    targets     int32   [B, T]  next token of the same document (0 where weights is 0)
    weights     float32 [B, T]  1 where the target counts; 0 for padding and across document boundaries
    segment_ids int32   [B, T]  1, 2, ... per document piece in the row; 0 = padding
    positions   int32   [B, T]  position within the piece, restarting at 0 (always < T)
    target_bytes float32 [B, T] eval only: UTF-8 bytes of each counted target (for bits per byte)

Packing (a deliberate choice). Each document is [bos] + tokens + [eos]. A document longer than a row is
cut into pieces of at most T+1 tokens that overlap by one token: piece k is tokens[kT : kT+T+1]. A row
holds T+1 tokens (inputs = row[:-1], targets = row[1:]), so a piece of m tokens placed whole in a row
yields exactly its m-1 targets, and the pieces of a document yield each of its targets exactly once:
nothing is lost at row edges (concat-then-split loses one target per row) and evaluation can count every
target token once. Pieces are window-shuffled (`data.shuffle_buffer`) so a long file does not fill
consecutive rows, then packed first-fit (grain `FirstFitPackIterDataset`, as in T5/MaxText) into rows;
a piece is never split, so attention (masked by segment_ids) never sees another document and positions
restart at 0 per piece, like the packers of T5 and MaxText. On the builtin corpus at T=128, ~1% of
row slots are padding.

Order: documents are shuffled by `train.seed` per epoch (grain reshuffles on every repeat) after each host
takes its share `[process_index::process_count]`; the iterator's state (`get_state`/`set_state`, or
orbax `grain.checkpoint.CheckpointSave/Restore`) reproduces the exact batch sequence. A tfrecord TFDS
dataset (no random access) is streamed instead by `moe.data.tfrecord_source`: each host reads a contiguous
share, shuffled per epoch by files and a `data.shuffle_buffer` of documents; its state is checkpointed the
same way (resuming re-reads the current epoch up to the saved position).
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Iterable, Iterator

import grain
import grain.experimental as gx
import numpy as np

from moe.config import check_placement
from moe.data.corpus import SPLITS, Corpus, DataError, open_corpus
from moe.data.tfrecord_source import TfRecordSource  # imports TensorFlow only when a tfrecord split is read
from moe.data.tokenizer import Tokenizer, load_tokenizer

__all__ = ["DataError", "check_data", "eval_batches", "train_iterator"]

log = logging.getLogger(__name__)

PACKING_BINS = 64  # rows packed together by first-fit: more = less padding, more rows held in memory
MIN_TOKENS = 2  # documents that encode to fewer text tokens are skipped (and counted)
Docs = grain.MapDataset | grain.IterDataset  # random-access (ArrayRecord) or streamed (tfrecord) records


class _Tokenize(grain.transforms.Map):
    """record -> {"tokens": int32 [bos, ..., eos]}."""

    def __init__(self, corpus: Corpus, tok: Tokenizer):
        self.corpus, self.tok = corpus, tok

    def map(self, record) -> dict[str, np.ndarray]:
        ids = self.tok.encode(self.corpus.text(record))
        return {"tokens": np.asarray([self.tok.bos_id, *ids, self.tok.eos_id], np.int32)}


class _LongEnough(grain.transforms.Filter):
    """Drops documents with fewer than MIN_TOKENS text tokens; counts them and says so the first time."""

    def __init__(self, split: str):
        self.split, self.skipped = split, 0

    def filter(self, element: dict[str, np.ndarray]) -> bool:
        if len(element["tokens"]) - 2 >= MIN_TOKENS:
            return True
        if self.skipped == 0:
            log.warning("%s split: skipping documents shorter than %d tokens (first seen now)", self.split, MIN_TOKENS)
        self.skipped += 1
        return False


class _Pieces(gx.FlatMapTransform):
    """A document -> pieces of at most T+1 tokens overlapping by one (see module docstring)."""

    max_fan_out = 1 << 20

    def __init__(self, seq_len: int):
        self.seq_len = seq_len

    def flat_map(self, element: dict[str, np.ndarray]) -> list[dict[str, np.ndarray]]:
        t, n = element["tokens"], self.seq_len
        return [{"tokens": t[s : s + n + 1]} for s in range(0, len(t) - 1, n)]


def _to_example(row: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """A packed row of T+1 tokens -> inputs/targets/weights/segment_ids/positions of length T."""
    tokens, seg, pos = row["tokens"], row["tokens_segment_ids"], row["tokens_positions"]
    same = (seg[:-1] == seg[1:]) & (seg[:-1] > 0)  # the target is the next token of the same piece
    return {
        "inputs": tokens[:-1].astype(np.int32),
        "targets": np.where(same, tokens[1:], 0).astype(np.int32),
        "weights": same.astype(np.float32),
        "segment_ids": seg[:-1].astype(np.int32),
        "positions": pos[:-1].astype(np.int32),
    }


def _packed_rows(docs: Docs, cfg, *, shuffle_seed: int | None) -> grain.IterDataset:
    """Tokenized documents -> packed example rows (shuffled pieces and bins when shuffle_seed is given)."""
    if isinstance(docs, grain.MapDataset):  # random access: tokenize on 2 threads, in order
        docs = docs.to_iter_dataset(grain.ReadOptions(num_threads=2, prefetch_buffer_size=8))
    it = gx.FlatMapIterDataset(docs, _Pieces(cfg.train.seq_len))
    if shuffle_seed is not None:
        it = gx.WindowShuffleIterDataset(it, window_size=cfg.data.shuffle_buffer, seed=shuffle_seed)
    it = gx.FirstFitPackIterDataset(it, length_struct={"tokens": cfg.train.seq_len + 1},
                                    num_packing_bins=PACKING_BINS, seed=shuffle_seed or 0,
                                    shuffle_bins=shuffle_seed is not None)
    return it.map(_to_example)


def _tokenized(corpus: Corpus, tok: Tokenizer, split: str, docs: Docs) -> Docs:
    return docs.map(_Tokenize(corpus, tok)).filter(_LongEnough(split))


def _host_rows(cfg, process_count: int) -> int:
    check_placement(cfg, processes=process_count)
    return cfg.train.batch_size // process_count


def _require_usable_document(corpus: Corpus, tok: Tokenizer, split: str, records: Iterable[dict], n: int) -> None:
    """Fails fast if no document is long enough: the repeated, filtered stream would otherwise never yield.
    Stops at the first usable document, so on real data this reads one record."""
    for record in records:
        if len(tok.encode(corpus.text(record))) >= MIN_TOKENS:
            return
    raise DataError(f"{corpus.name} split '{split}': all {n} documents are shorter than {MIN_TOKENS} "
                    "tokens; nothing to train on — check data.files / data.text_key")


def _train_documents(corpus: Corpus, cfg, split: str, process_index: int,
                     process_count: int) -> tuple[Docs, Iterable[dict], int]:
    """This host's share of `split`: (records shuffled per epoch and repeated forever, the same records in
    stored order, their number)."""
    if corpus.streaming:
        share = functools.partial(TfRecordSource, corpus.builder, split, text_key=corpus.text_key,
                                  process_index=process_index, process_count=process_count)
        ordered = share(shuffle_seed=None)
        shuffled = share(shuffle_seed=cfg.train.seed, shuffle_buffer=cfg.data.shuffle_buffer, repeat=True)
        return shuffled, ordered, ordered.num_records
    docs = grain.MapDataset.source(corpus.source(split)).seed(cfg.train.seed)[process_index::process_count]
    return docs.shuffle().repeat(), (docs[i] for i in range(len(docs))), len(docs)


def _all_documents(corpus: Corpus, split: str) -> Docs:
    """Every record of `split` in stored order, once."""
    if corpus.streaming:
        corpus.check_split(split)
        return TfRecordSource(corpus.builder, split, text_key=corpus.text_key, shuffle_seed=None)
    return grain.MapDataset.source(corpus.source(split))


def train_iterator(cfg, tok: Tokenizer, process_index: int = 0, process_count: int = 1) -> grain.DatasetIterator:
    """Infinite iterator of this host's training batches; deterministic from train.seed, checkpointable."""
    rows = _host_rows(cfg, process_count)
    corpus = open_corpus(cfg)
    split = cfg.data.train_split
    corpus.check_split(split)
    docs, ordered, n = _train_documents(corpus, cfg, split, process_index, process_count)
    if n == 0:
        raise DataError(f"{corpus.name} split '{split}' has no documents for process {process_index} of "
                        f"{process_count}; use more data or fewer processes")
    _require_usable_document(corpus, tok, split, ordered, n)
    docs = _tokenized(corpus, tok, split, docs)
    ds = _packed_rows(docs, cfg, shuffle_seed=cfg.train.seed + 7919 * process_index).batch(rows, drop_remainder=True)
    if cfg.data.num_workers > 0 and corpus.streaming:
        # grain workers slice a random-access source; tf.data already reads on its own threads.
        log.warning("data.num_workers=%d ignored for tfrecord %s: it is read in this process through tf.data",
                    cfg.data.num_workers, corpus.name)
    elif cfg.data.num_workers > 0:
        from absl import flags  # grain workers read absl flags; outside absl.app.run nobody parsed them

        if not flags.FLAGS.is_parsed():
            flags.FLAGS.mark_as_parsed()
        ds = ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=cfg.data.num_workers))
    return iter(ds)


def eval_batches(cfg, tok: Tokenizer, split: str | None = None, max_batches: int | None = None,
                 process_index: int = 0, process_count: int = 1) -> Iterator[dict[str, np.ndarray]]:
    """Finite, deterministic batches covering every target token of `split` once (or the first max_batches).

    Every host packs the same global batches of train.batch_size rows and yields its slice of rows, so all
    hosts agree on the number of batches. The last batch is padded with all-zero rows (weights 0).
    """
    rows = _host_rows(cfg, process_count)
    split = split or cfg.data.eval_split
    corpus = open_corpus(cfg)
    keep = _LongEnough(split)
    docs = _all_documents(corpus, split).map(_Tokenize(corpus, tok)).filter(keep)
    token_bytes = tok.token_bytes().astype(np.float32)
    batches = _packed_rows(docs, cfg, shuffle_seed=None).batch(cfg.train.batch_size, drop_remainder=False)
    for i, batch in enumerate(batches):
        if max_batches is not None and i >= max_batches:
            return
        missing = cfg.train.batch_size - len(batch["inputs"])
        if missing:  # static shapes for the jitted eval step: pad with rows that count nothing
            batch = {k: np.concatenate([v, np.zeros((missing, *v.shape[1:]), v.dtype)]) for k, v in batch.items()}
        batch["target_bytes"] = token_bytes[batch["targets"]] * batch["weights"]
        yield {k: v[process_index * rows : (process_index + 1) * rows] for k, v in batch.items()}
    if keep.skipped:
        log.warning("%s split: skipped %d documents shorter than %d tokens", split, keep.skipped, MIN_TOKENS)


def check_data(cfg) -> None:
    """Fast checks before anything compiles: data present, splits non-empty, tokenizer loadable and of the
    configured size. Builds the builtin/packages/files dataset and trains their tokenizer on first use.

    Raises DataError naming the key or file and the fix."""
    corpus = open_corpus(cfg)
    for key, split in (("data.train_split", cfg.data.train_split), ("data.eval_split", cfg.data.eval_split)):
        corpus.check_split(split)
        if corpus.num_documents(split) == 0:
            hint = ("raise data.validation_fraction or add documents" if cfg.data.source != "tfds" and
                    split in SPLITS else "choose a split with documents")
            raise DataError(f"{key}: split '{split}' of {corpus.name} is empty; {hint}")
    load_tokenizer(cfg)

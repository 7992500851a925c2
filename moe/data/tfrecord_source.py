"""A grain source that reads a tfrecord TFDS split through tf.data, with checkpointable state.

Owns: the only use of TensorFlow in `moe` (imported lazily, on first read, never when `moe.*` is imported),
one host's share of a tfrecord split, its per-epoch order, and the iterator state that reproduces it. Must
not tokenize, pack or batch (that is `moe.data.pipeline`) nor find datasets (that is `moe.data.corpus`).

tfrecord files have no random access, so grain's global shuffle (`MapDataset.shuffle`) cannot apply. The
order is instead what `tfds.load` users know, made reproducible: per epoch e, a seeded shuffle of the files,
a deterministic interleave of 16 of them, and a seeded shuffle buffer of `shuffle_buffer` records, all seeded
from (seed, process_index, e) with `tf.data.Options.deterministic = True`. Each host reads its own contiguous
range of the split, `tfds.split_for_jax_process` (sizes differ by at most one record). Unshuffled (eval)
reads every file in stored order, once, like the ArrayRecord path.

State is {"epoch", "consumed"} (records yielded in that epoch). `set_state` rebuilds the epoch's pipeline
and `skip(consumed)`s, so resuming re-reads this epoch's records so far (skip still reads, parses and
shuffles them: ~0.4-0.7 s per 10k records of ~200 bytes on 2 cores, about as long as reading them), while
the checkpoint holds two integers. grain composes the states of the iterators downstream (tokenize,
pieces, window shuffle, packing, batch) on top of this one, so a resumed run sees exactly the batches an
uninterrupted run would.

    source = TfRecordSource(builder, "train", text_key="text", shuffle_seed=0, repeat=True)
    it = iter(source); record = next(it)  # {"text": b"..."}; it.get_state() -> {"epoch": 0, "consumed": 1}
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Any

import grain
import numpy as np
import tensorflow_datasets as tfds

log = logging.getLogger(__name__)
# Expected tfds warnings, hidden: we shuffle ordered (disable_shuffling) datasets on purpose for training
# (warned every epoch), and tfds' own PartialDecoding reads a deprecated field (warned once).
_EXPECTED = ("is an ordered dataset ('disable_shuffling=True')", "`FeatureConnector.dtype` is deprecated")
logging.getLogger("absl").addFilter(lambda r: not any(m in str(r.msg) for m in _EXPECTED))

TF_THREADS = 2  # tf.data's private thread pool: reading is cheap next to tokenizing; leave the cores to JAX
READ_BATCH = 256  # records per tf.data -> Python hand-over (read-ahead only: the state counts records yielded)
INTERLEAVE_FILES = 16  # files read at once when shuffling (tfds' default); 1 = stored order


def tensorflow_available() -> bool:
    """True if `import tensorflow` works (the `tf` extra); imports it, so call only when it will be used."""
    try:
        _tf()
    except ImportError:
        return False
    return True


def _tf():
    """TensorFlow, imported once, kept off every accelerator and to few threads (JAX owns the devices)."""
    import tensorflow as tf

    if not getattr(_tf, "configured", False):
        _tf.configured = True
        try:  # only possible before TF's runtime starts; if someone started it, their settings stand
            tf.config.set_visible_devices([], "GPU")
            tf.config.threading.set_inter_op_parallelism_threads(TF_THREADS)
            tf.config.threading.set_intra_op_parallelism_threads(1)
        except RuntimeError as e:
            log.warning("TensorFlow already initialised; could not hide GPUs / limit threads: %s", e)
    return tf


def _epoch_seed(seed: int, process_index: int, epoch: int) -> int:
    """A 31-bit tf.data seed per (run seed, host, epoch): hosts and epochs get independent orders."""
    return int(np.random.SeedSequence([seed, process_index, epoch]).generate_state(1)[0] >> 1)


class TfRecordSource(grain.IterDataset):
    """One host's records of a tfrecord TFDS split, as dicts {text_key: bytes}, via tf.data.

    shuffle_seed None: one pass in stored order (eval). Otherwise a seeded order per epoch; with repeat,
    epochs follow one another forever (training)."""

    def __init__(self, builder: Any, split: str, *, text_key: str, shuffle_seed: int | None,
                 shuffle_buffer: int = 1024, repeat: bool = False, process_index: int = 0, process_count: int = 1):
        super().__init__()
        self.builder, self.text_key = builder, text_key
        self.split = tfds.split_for_jax_process(split, process_index=process_index, process_count=process_count)
        self.shuffle_seed, self.shuffle_buffer, self.repeat = shuffle_seed, shuffle_buffer, repeat
        self.process_index = process_index

    @property
    def num_records(self) -> int:
        """Records in this host's share of the split (from the dataset's metadata, without reading)."""
        return self.builder.info.splits[self.split].num_examples

    def __iter__(self) -> _TfRecordIterator:
        return _TfRecordIterator(self)

    def __str__(self) -> str:
        return f"TfRecordSource({self.builder.info.name}, {self.split}, seed={self.shuffle_seed})"

    def epoch_records(self, epoch: int, skip: int) -> Iterator[dict[str, bytes]]:
        """The records of `epoch` after the first `skip`, through a freshly built tf.data pipeline."""
        tf = _tf()
        options = tf.data.Options()
        options.deterministic = True  # parallel interleave still yields in a fixed order
        options.threading.private_threadpool_size = TF_THREADS
        options.threading.max_intra_op_parallelism = 1
        shuffle = self.shuffle_seed is not None
        seed = _epoch_seed(self.shuffle_seed, self.process_index, epoch) if shuffle else None
        read_config = tfds.ReadConfig(
            shuffle_seed=seed, interleave_cycle_length=INTERLEAVE_FILES if shuffle else 1,
            try_autocache=False,  # a cached epoch would be read again by the next epoch's new pipeline: no gain
            enable_ordering_guard=not shuffle, options=options)
        ds = self.builder.as_dataset(split=self.split, shuffle_files=shuffle, read_config=read_config,
                                     decoders=tfds.decode.PartialDecoding({self.text_key: True}))
        if shuffle:
            ds = ds.shuffle(self.shuffle_buffer, seed=seed, reshuffle_each_iteration=False)
        # skip after the shuffle: it must drop what was yielded, in that order. Records cross into Python in
        # batches: one by one, tf.data's iterator costs ~240 us a record (4k/s); batched, ~45 us.
        ds = ds.skip(skip).batch(READ_BATCH).prefetch(2)
        for batch in tfds.as_numpy(ds):
            for value in batch[self.text_key]:
                yield {self.text_key: value}


class _TfRecordIterator(grain.DatasetIterator):
    """Iterates TfRecordSource epochs; state {"epoch", "consumed"} rebuilds the tf.data pipeline lazily."""

    def __init__(self, source: TfRecordSource):
        super().__init__()
        self._source = source
        self._epoch, self._consumed = 0, 0
        self._records: Iterator | None = None  # built on the next __next__, so repeated set_state is free
        self._done = False

    def __next__(self) -> dict[str, Any]:
        while not self._done:
            if self._records is None:
                self._records = self._source.epoch_records(self._epoch, self._consumed)
            try:
                record = next(self._records)
            except StopIteration:
                # An empty epoch would repeat forever: stop instead (moe.data.pipeline checks for records up front).
                if not self._source.repeat or self._consumed == 0:
                    self._done = True
                    break
                self._epoch, self._consumed, self._records = self._epoch + 1, 0, None
                continue
            self._consumed += 1
            return record
        raise StopIteration

    def get_state(self) -> dict[str, int]:
        return {"epoch": self._epoch, "consumed": self._consumed}

    def set_state(self, state: dict[str, Any]) -> None:
        self._epoch, self._consumed = int(state["epoch"]), int(state["consumed"])
        self._records, self._done = None, False

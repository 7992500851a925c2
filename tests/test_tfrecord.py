"""tfrecord TFDS datasets read through tf.data (`moe.data.tfrecord_source`): the same eval batches as the
ArrayRecord build of the same documents, per-epoch coverage and disjoint host shares, a seeded order, and
bit-exact resume from the iterator state (also across an epoch boundary, and through orbax).

One small MoeText dataset (local files) is built twice, as ArrayRecord and as 4-shard tfrecord, so the two
paths differ in storage only."""

import json
import sys
from collections import Counter

import numpy as np
import pytest
import tensorflow_datasets as tfds

pytest.importorskip("tensorflow")

from moe.config import load_config  # noqa: E402
from moe.data.corpus import DataError, MoeText, open_corpus, text_config  # noqa: E402
from moe.data.pipeline import check_data, eval_batches, train_iterator  # noqa: E402
from moe.data.tfrecord_source import TfRecordSource  # noqa: E402
from moe.data.tokenizer import load_tokenizer  # noqa: E402
from tests.helpers.orbax_iter import orbax_roundtrip  # noqa: E402

BASE = ["model.vocab_size=1024", "train.seq_len=32", "train.batch_size=4", "data.shuffle_buffer=16"]
WORDS = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu".split()


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    with pytest.MonkeyPatch.context() as mp:  # a private cache, as in test_data
        mp.setenv("MOE_CACHE_DIR", str(tmp_path_factory.mktemp("cache")))
        return load_tokenizer(load_config("configs/tiny.yaml", BASE))


@pytest.fixture(scope="module")
def dirs(tmp_path_factory, tok):
    """(files dir, ArrayRecord data_dir, tfrecord data_dir, tfds_name): ~100 distinct documents of 5-25
    tokens (some longer than a row), one too short to use, split 80/20."""
    root = tmp_path_factory.mktemp("docs")
    lines = [json.dumps({"text": f"doc {i}: " + " ".join(WORDS[(i * j) % len(WORDS)] for j in range(i % 9 + 1))})
             for i in range(100)] + [json.dumps({"text": "a"})]
    (root / "c.jsonl").write_text("\n".join(lines) + "\n")
    (root / "long.txt").write_text("\n".join(f"line {j} of a long file" for j in range(40)))
    ar, tf = root / "ar", root / "tf"
    cfg = load_config("configs/tiny.yaml", BASE + ["data.source=files", f"data.files=[{root}]",
                                                   f"data.data_dir={ar}", "data.validation_fraction=0.2"])
    corpus = open_corpus(cfg)  # builds the ArrayRecord copy
    builder = MoeText(config=text_config(cfg), data_dir=str(tf), file_format="tfrecord")
    builder.download_and_prepare(download_config=tfds.download.DownloadConfig(num_shards=4))
    return root, ar, tf, corpus.name


def tfds_cfg(dirs, tok, data_dir, *extra):
    return load_config("configs/tiny.yaml", BASE + ["data.source=tfds", f"data.tfds_name={dirs[3]}",
                                                   f"data.data_dir={data_dir}", f"data.tokenizer={tok.path}", *extra])


def texts(source) -> list[bytes]:
    return [r["text"] for r in source]


def source_state(state):
    """The TfRecordSource iterator's {"epoch", "consumed"} inside grain's nested iterator state."""
    if isinstance(state, dict):
        if set(state) == {"epoch", "consumed"}:
            return state
        for v in state.values():
            if (found := source_state(v)) is not None:
                return found
    return None


def equal(a, b) -> bool:
    return a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


def test_eval_batches_equal_the_arrayrecord_build(dirs, tok):
    """Stored order, one pass: bit-identical batches to ArrayRecord, so no document lost or duplicated."""
    tf_cfg, ar_cfg = tfds_cfg(dirs, tok, dirs[2]), tfds_cfg(dirs, tok, dirs[1])
    check_data(tf_cfg)
    tf_corpus = open_corpus(tf_cfg)
    assert tf_corpus.streaming and not open_corpus(ar_cfg).streaming
    ar_source = open_corpus(ar_cfg).source("train")
    assert tf_corpus.builder.info.splits["train"].num_shards == 4
    for split in ("validation", "train"):
        got, want = list(eval_batches(tf_cfg, tok, split)), list(eval_batches(ar_cfg, tok, split))
        assert len(got) == len(want) > 0 and all(equal(a, b) for a, b in zip(got, want))
    # the documents themselves, and every usable one starts exactly one piece
    assert texts(TfRecordSource(tf_corpus.builder, "train", text_key="text", shuffle_seed=None)) == \
        [ar_source[i]["text"] for i in range(len(ar_source))]
    starts = sum(int(((b["positions"] == 0) & (b["inputs"] == tok.bos_id) & (b["segment_ids"] > 0)).sum())
                 for b in got)
    records = [ar_source[i] for i in range(len(ar_source))]
    usable = [r for r in records if len(tok.encode(r["text"].decode())) >= 2]
    # the one too-short document ("a") lands in train or validation by a hash of its (tmp) path
    assert starts == len(usable) == len(records) - sum(r["text"] == b"a" for r in records)


def test_epochs_cover_the_split_and_hosts_are_disjoint(dirs, tok):
    builder = open_corpus(tfds_cfg(dirs, tok, dirs[2])).builder
    everything = Counter(texts(TfRecordSource(builder, "train", text_key="text", shuffle_seed=None)))
    shares = []
    for host in (0, 1):
        source = TfRecordSource(builder, "train", text_key="text", shuffle_seed=0, shuffle_buffer=16, repeat=True,
                                process_index=host, process_count=2)
        n, it = source.num_records, iter(source)
        epochs = [[next(it)["text"] for _ in range(n)] for _ in range(2)]
        assert it.get_state() == {"epoch": 1, "consumed": n}
        assert Counter(epochs[0]) == Counter(epochs[1]) and epochs[0] != epochs[1], "reshuffled per epoch"
        shares.append(Counter(epochs[0]))
    assert not shares[0] & shares[1] and shares[0] + shares[1] == everything
    assert abs(sum(shares[0].values()) - sum(shares[1].values())) <= 1


def test_train_order_is_seeded(dirs, tok):
    cfg = tfds_cfg(dirs, tok, dirs[2])
    a, b = train_iterator(cfg, tok), train_iterator(cfg, tok)
    first = [next(a) for _ in range(6)]
    assert all(equal(x, next(b)) for x in first)
    other = train_iterator(tfds_cfg(dirs, tok, dirs[2], "train.seed=1"), tok)
    assert not all(equal(x, next(other)) for x in first)


def test_resume_is_bit_exact_across_epochs(dirs, tok, tmp_path):
    """Resume after 20 batches (the next 26 cross into epoch 1) and after 36 (in epoch 1, through orbax).

    An epoch is ~25 batches here; the packer takes 64 rows (16 batches) at a time, so the source's saved
    position moves in steps of 16 batches and sits a pack behind the batches already yielded."""
    cfg = tfds_cfg(dirs, tok, dirs[2])
    it = train_iterator(cfg, tok)
    want, states = [], {}
    for k in range(46):
        if k in (20, 36):
            states[k] = it.get_state()
        want.append(next(it))
    assert source_state(states[20])["epoch"] == 0 < source_state(states[20])["consumed"]
    assert source_state(states[36])["epoch"] == 1, "the second resume point lies in the next epoch"
    fresh = train_iterator(cfg, tok)
    fresh.set_state(states[20])
    assert all(equal(w, next(fresh)) for w in want[20:])
    resumed = train_iterator(cfg, tok)
    for _ in range(36):
        next(resumed)
    restored = orbax_roundtrip(resumed, lambda: train_iterator(cfg, tok), 36, tmp_path / "ckpt")
    assert all(equal(w, next(restored)) for w in want[36:])


def test_without_tensorflow_the_error_names_the_tf_extra(dirs, tok, monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorflow", None)  # `import tensorflow` now raises ImportError
    with pytest.raises(DataError, match=r'stored as tfrecord.*install the `tf` extra \(pip install -e "\.\[tf\]"\)'):
        check_data(tfds_cfg(dirs, tok, dirs[2]))
    check_data(tfds_cfg(dirs, tok, dirs[1]))  # the ArrayRecord copy needs no TensorFlow


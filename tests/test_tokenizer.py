"""SentencePiece tokenizer: training on the builtin corpus, exact round trips on code, caching, size checks."""

import sysconfig
from pathlib import Path

import numpy as np
import pytest
import sentencepiece as spm

from moe.config import load_config
from moe.data.corpus import DataError, open_corpus
from moe.data.tokenizer import cached_path, load_tokenizer, tokenizer_from_file, train_tokenizer

VOCAB = 1024  # small vocabulary: trains in ~1 s and still exercises merges, byte fallback and specials
STDLIB = Path(sysconfig.get_paths()["stdlib"])
FILES = ["json/decoder.py", "asyncio/base_events.py", "textwrap.py", "email/_header_value_parser.py"]
TRICKY = "class A:\n\tdef f(self):\n        return  'héllo ✓ 😀 日本'\r\n\n\n   \n# trailing spaces   "


@pytest.fixture(scope="module")
def cfg():
    return load_config("configs/tiny.yaml", [f"model.vocab_size={VOCAB}"])


@pytest.fixture(scope="module")
def tok(cfg, tmp_path_factory):
    return train_tokenizer(cfg, tmp_path_factory.mktemp("tok") / "tok.model")


def test_round_trip_exact_on_code(tok):
    texts = [(STDLIB / f).read_text(encoding="utf-8") for f in FILES] + [TRICKY, "", "\n", " ", "x"]
    for text in texts:
        ids = tok.encode(text)
        assert tok.decode(ids) == text
        assert all(0 <= i < tok.vocab_size for i in ids)
        # token_bytes must account for every UTF-8 byte exactly (bits-per-byte relies on it)
        assert int(tok.token_bytes()[ids].sum()) == len(text.encode("utf-8"))


def test_code_layout_pieces(tok):
    newline = tok.encode("\n")
    assert len(newline) == 1 and tok.decode(newline) == "\n"
    assert tok.encode("a\nb").count(newline[0]) == 1
    assert len(tok.encode("    ")) == 1, "a 4-space indent should be one piece"
    assert len(tok.encode("        ")) == 1, "an 8-space indent should be one piece"
    # line-by-line encoding (the fast path) gives exactly SentencePiece's ids for the whole text
    sp = spm.SentencePieceProcessor(model_file=tok.path)
    for f in FILES[:2]:
        text = (STDLIB / f).read_text(encoding="utf-8")
        assert tok.encode(text) == sp.encode(text)


def test_specials_and_token_bytes(tok):
    assert (tok.pad_id, tok.bos_id, tok.eos_id, tok.vocab_size) == (0, 2, 3, VOCAB)
    tb = tok.token_bytes()
    assert tb.shape == (VOCAB,) and tb.dtype.kind == "i"
    assert tb[tok.pad_id] == tb[tok.bos_id] == tb[tok.eos_id] == 0
    assert (tb[tok.encode("é")] == 1).all()  # not in a 1k vocab: two byte-fallback pieces, one byte each
    assert tb.max() > 3  # real merges exist


def test_save_load_identical(tok):
    again = tokenizer_from_file(tok.path)
    text = (STDLIB / FILES[0]).read_text(encoding="utf-8")
    assert again.encode(text) == tok.encode(text)
    assert np.array_equal(again.token_bytes(), tok.token_bytes())


def test_load_trains_once_and_caches(cfg, monkeypatch, tmp_path):
    monkeypatch.setenv("MOE_CACHE_DIR", str(tmp_path))
    path = Path(cached_path(open_corpus(cfg).name, VOCAB))
    assert not path.exists()
    first = load_tokenizer(cfg)
    assert Path(first.path) == path and path.is_file() and first.vocab_size == VOCAB
    mtime = path.stat().st_mtime_ns
    second = load_tokenizer(cfg)
    assert path.stat().st_mtime_ns == mtime, "the cached tokenizer must not be retrained"
    assert second.encode(TRICKY) == first.encode(TRICKY)


def test_vocab_mismatch_names_both_keys(tok):
    cfg = load_config("configs/tiny.yaml", [f"data.tokenizer={tok.path}", "model.vocab_size=8192"])
    with pytest.raises(DataError, match=r"model\.vocab_size.*8192|1024.*model\.vocab_size") as e:
        load_tokenizer(cfg)
    assert "data.tokenizer" in str(e.value) or tok.path in str(e.value)
    assert f"model.vocab_size={VOCAB}" in str(e.value)


def test_missing_or_bad_tokenizer_file(tmp_path):
    with pytest.raises(DataError, match="data.tokenizer.*does not exist"):
        load_tokenizer(load_config("configs/tiny.yaml", [f"data.tokenizer={tmp_path / 'nope.model'}"]))
    bad = tmp_path / "bad.model"
    bad.write_bytes(b"not a model")
    with pytest.raises(DataError, match="not a SentencePiece model"):
        tokenizer_from_file(str(bad))


def test_tfds_source_requires_a_tokenizer():
    cfg = load_config("configs/tiny.yaml", ["data.source=tfds", "data.tfds_name=c4/en:3.1.0"])
    with pytest.raises(DataError, match="data.tokenizer is required"):
        load_tokenizer(cfg)

"""Hugging Face tokenizers (moe/data/hf_tokenizer.py): our SentencePiece model converted to tokenizer.json encodes
the whole built-in corpus exactly as SentencePiece does (in-process with `tokenizers`, and through transformers'
AutoTokenizer in .venv-hf); an imported tokenizer.json encodes exactly as the `tokenizers` library itself, with
token byte lengths that add up to the text's UTF-8 length; bad tokenizer files are one-line errors."""

import json
import os
import subprocess
from pathlib import Path

import numpy as np
import pytest
import tokenizers

from moe.config import load_config
from moe.data import hf_tokenizer
from moe.data.corpus import DataError
from moe.data.tokenizer import check_vocab, load_tokenizer, tokenizer_from_file
from tests.helpers.byte_level import SPECIAL, corpus_texts, write_byte_level_tokenizer

REPO = Path(__file__).resolve().parent.parent
HF_PY = REPO / ".venv-hf" / "bin" / "python"
ODD = "a <s> b </s> <pad> <unk>\n\n\tλ 😀 \x00 <|endoftext|> x"  # special tokens' strings are text; unseen chars


@pytest.fixture(scope="module")
def sp():
    return load_tokenizer(load_config("configs/tiny.yaml", []))


def test_converted_sentencepiece_encodes_the_whole_corpus_exactly(sp):
    conv = hf_tokenizer.from_sentencepiece(sp.files()["tokenizer.model"], sp.path)
    assert (conv.vocab_size, conv.bos_id, conv.eos_id, conv.pad_id) == (sp.vocab_size, sp.bos_id, sp.eos_id, sp.pad_id)
    assert np.array_equal(conv.token_bytes(), sp.token_bytes())
    texts = corpus_texts("train") + corpus_texts("eval") + [ODD]
    assert len(texts) > 400
    differ = [i for i, t in enumerate(texts) if conv.encode(t) != sp.encode(t)]
    assert not differ, (len(differ), texts[differ[0]][:200])
    assert all(conv.decode(conv.encode(t)) == t for t in texts)  # lossless, like SentencePiece


def test_autotokenizer_loads_the_exported_tokenizer_and_encodes_like_us(sp, tmp_path):
    """transformers' AutoTokenizer on the folder `python -m moe.hf export` writes: same ids, same text."""
    for name, data in hf_tokenizer.export_files(sp).items():
        (tmp_path / name).write_bytes(data)
    assert {"tokenizer.json", "tokenizer_config.json", "tokenizer.model"} == set(os.listdir(tmp_path))
    texts = corpus_texts("eval") + corpus_texts("train", 60) + [ODD]
    (tmp_path / "texts.json").write_text(json.dumps(texts))
    p = subprocess.run([str(HF_PY), str(REPO / "tests" / "helpers" / "hf_tokenize.py"), str(tmp_path),
                        str(tmp_path / "texts.json"), str(tmp_path / "out.json")], capture_output=True, text=True,
                       timeout=600, env=dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1"))
    assert p.returncode == 0, p.stderr[-3000:]
    got = json.loads((tmp_path / "out.json").read_text())
    assert (got["bos_token_id"], got["eos_token_id"], got["pad_token_id"]) == (sp.bos_id, sp.eos_id, sp.pad_id)
    assert got["ids"] == [sp.encode(t) for t in texts]
    assert got["decoded"] == texts


def test_an_imported_tokenizer_json_encodes_like_tokenizers_itself(tmp_path):
    path = write_byte_level_tokenizer(str(tmp_path / "qwenish"), 1000)
    ref = tokenizers.Tokenizer.from_file(path)
    tok = tokenizer_from_file(path)
    eot = ref.token_to_id(SPECIAL)
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (eot, eot, eot)  # no BOS: documents start with end-of-text
    assert tok.vocab_size == ref.get_vocab_size() <= 1000
    texts = corpus_texts("eval") + [ODD.replace(SPECIAL, "")]
    nbytes = tok.token_bytes()
    for t in texts:
        ids = tok.encode(t)
        assert ids == ref.encode(t, add_special_tokens=False).ids
        assert tok.decode(ids) == t
        assert int(nbytes[ids].sum()) == len(t.encode("utf-8"))  # bits per byte counts every byte once
    # text is text: the special token's string inside a document is characters, not the special id
    ids = tok.encode(f"a{SPECIAL}b")
    assert eot not in ids and tok.decode(ids) == f"a{SPECIAL}b" and ref.encode(f"a{SPECIAL}b").ids.count(eot) == 1
    # the same through data.tokenizer, with a model table wider than the tokenizer (as Qwen3's is)
    cfg = load_config("configs/tiny.yaml", [f"data.tokenizer={path}", "model.vocab_size=1024"])
    assert load_tokenizer(cfg).encode(texts[0]) == tok.encode(texts[0])
    # the ids can also come from a config.json beside it (an HF model folder without tokenizer_config.json)
    bare = write_byte_level_tokenizer(str(tmp_path / "bare"), 1000, config={})
    (tmp_path / "bare" / "config.json").write_text(json.dumps({"eos_token_id": [eot], "bos_token_id": 0}))
    t2 = tokenizer_from_file(bare)
    assert (t2.bos_id, t2.eos_id, t2.pad_id) == (0, eot, eot)


def test_bad_tokenizer_files_are_one_line_errors(tmp_path):
    (tmp_path / "broken.json").write_text("{not json")
    with pytest.raises(DataError, match=r"'.*broken\.json' is not a Hugging Face tokenizer\.json"):
        tokenizer_from_file(str(tmp_path / "broken.json"))
    with pytest.raises(DataError, match=r"data\.tokenizer: '.*missing\.json' does not exist"):
        tokenizer_from_file(str(tmp_path / "missing.json"))
    path = write_byte_level_tokenizer(str(tmp_path / "noeos"), 600, config={})
    with pytest.raises(DataError, match='names no end-of-text token; set "eos_token" in a tokenizer_config.json'):
        tokenizer_from_file(path)
    (tmp_path / "noeos" / "tokenizer_config.json").write_text(json.dumps({"eos_token": "</s>"}))
    with pytest.raises(DataError, match=r"eos_token '</s>' of tokenizer_config\.json .* is not a token of it"):
        tokenizer_from_file(path)
    (tmp_path / "noeos" / "tokenizer_config.json").write_text(json.dumps({"eos_token": SPECIAL}))
    tok = tokenizer_from_file(path)
    with pytest.raises(DataError, match=rf"has {tok.vocab_size} pieces but model\.vocab_size is 96"):
        check_vocab(tok, 96)
    assert msg_lines(lambda: check_vocab(tok, 96)) == 1


def msg_lines(f) -> int:
    try:
        f()
    except DataError as e:
        return len(str(e).splitlines())
    raise AssertionError("no error")

"""Hugging Face tokenizers (`tokenizer.json`, read by the `tokenizers` library; no torch, no transformers) behind
the same interface as our SentencePiece tokenizer, and the conversion of our SentencePiece models into a
`tokenizer.json` that encodes exactly like them.

Owns: reading a tokenizer.json with its special tokens, the UTF-8 bytes of each token (for bits per byte), and
`from_sentencepiece`. Must not train tokenizers (moe/data/tokenizer.py) or touch model weights (moe/hf/).

Special tokens: `eos_token` / `bos_token` / `pad_token` of a `tokenizer_config.json` beside the file (a key
that is there decides, `null` meaning none), else the `eos_token_id` / `bos_token_id` / `pad_token_id` of a
`config.json` beside it. A tokenizer without a
beginning-of-text token (Qwen's) starts documents with its end-of-text token, as GPT-2 and Qwen pretraining do;
one without an end-of-text token is an error (packing needs a document boundary).

Text is text: a special token's string inside a document ("<s>", "<|endoftext|>") is encoded as ordinary
characters, never as the special id (`encode_special_tokens`; SentencePiece behaves so too). The pipeline adds
the special ids itself. The tokenizer_config.json we write says `split_special_tokens: true`, so that
transformers' AutoTokenizer encodes the same way.
"""

from __future__ import annotations

import hashlib
import json
import os
import re

import numpy as np

from moe.data.corpus import DataError
from moe.runtime import storage

CONFIG = "tokenizer_config.json"
_BYTE_PIECE = re.compile(r"^<0x[0-9A-Fa-f]{2}>$")


def _byte_level_alphabet() -> dict[str, int]:
    """The GPT-2 byte-level alphabet (char -> byte) that ByteLevel pre-tokenizers and decoders use: printable
    bytes map to themselves, the other 68 to U+0100 onwards, in byte order."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, extra = {}, 0
    for b in range(256):
        if b in keep:
            chars[chr(b)] = b
        else:
            chars[chr(256 + extra)] = b
            extra += 1
    return chars


class HFTokenizer:
    """A tokenizer.json with the ids the data pipeline needs (the interface of moe.data.tokenizer.Tokenizer)."""

    exact_vocab = False  # the model's embedding table may have more rows than the tokenizer has ids

    def __init__(self, path: str, json_text: str, config: dict | None = None, model_config: dict | None = None):
        import tokenizers

        self.path = path
        try:
            self._tok = tokenizers.Tokenizer.from_str(json_text)
        except Exception as e:  # tokenizers raises plain Exceptions for a malformed file
            raise DataError(f"data.tokenizer: '{path}' is not a Hugging Face tokenizer.json ({e})") from None
        self._tok.encode_special_tokens = True  # not stored in tokenizer.json: set on every load
        self._json = json_text
        self.config = dict(config or {})
        vocab = self._tok.get_vocab(with_added_tokens=True)
        self.vocab_size: int = max(vocab.values()) + 1
        model_config = model_config or {}

        def find(kind: str) -> int | None:
            if f"{kind}_token" in self.config:  # authoritative, null included (Qwen: "bos_token": null)
                value = self.config[f"{kind}_token"]
                value = value.get("content") if isinstance(value, dict) else value
                if value is None:
                    return None
                tid = self._tok.token_to_id(value)
                if tid is None:
                    raise DataError(f"data.tokenizer: {kind}_token {value!r} of {CONFIG} beside '{path}' is not a "
                                    "token of it")
                return tid
            value = model_config.get(f"{kind}_token_id")
            return value[0] if isinstance(value, list) and value else value if isinstance(value, int) else None

        eos = find("eos")
        if eos is None:
            raise DataError(f"data.tokenizer: '{path}' names no end-of-text token; set \"eos_token\" in a {CONFIG} "
                            "beside it")
        self.eos_id: int = eos
        self.bos_id: int = find("bos") if find("bos") is not None else eos
        self.pad_id: int = find("pad") if find("pad") is not None else eos

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=False)

    def token_bytes(self) -> np.ndarray:
        """int32 [V]: UTF-8 bytes each token stands for (special tokens and unused ids 0, `<0xNN>` pieces 1)."""
        spec = json.loads(self._json)
        byte_level = "ByteLevel" in json.dumps(spec.get("decoder"))
        alphabet = _byte_level_alphabet() if byte_level else {}
        special = {i for i, t in self._tok.get_added_tokens_decoder().items() if t.special}
        out = np.zeros(self.vocab_size, np.int32)
        for token, i in self._tok.get_vocab(with_added_tokens=True).items():
            if i in special:
                continue
            if byte_level and all(c in alphabet for c in token):
                out[i] = len(token)
            elif _BYTE_PIECE.match(token):
                out[i] = 1
            else:
                out[i] = len(token.replace("\u2581", " ").encode("utf-8"))
        return out

    @property
    def sha(self) -> str:
        ids = f"{self.bos_id},{self.eos_id},{self.pad_id}"
        return hashlib.sha256(self._json.encode() + ids.encode()).hexdigest()[:16]

    def files(self) -> dict[str, bytes]:
        """What a workdir or an exported folder holds of it: tokenizer.json and a tokenizer_config.json that
        names its special tokens (so AutoTokenizer and this class agree on them)."""
        name = self._tok.id_to_token
        cfg = {**self.config, "tokenizer_class": "PreTrainedTokenizerFast", "split_special_tokens": True,
               "bos_token": name(self.bos_id), "eos_token": name(self.eos_id), "pad_token": name(self.pad_id)}
        return {"tokenizer.json": self._json.encode(), CONFIG: json.dumps(cfg, indent=1).encode()}


def _read_json(path: str) -> dict | None:
    if not storage.isfile(path):
        return None
    try:
        return json.loads(storage.read_bytes(path))
    except ValueError as e:
        raise DataError(f"'{path}' is not JSON ({e})") from None


def from_file(path: str) -> HFTokenizer:
    """A tokenizer.json (local or in a bucket), with the tokenizer_config.json / config.json beside it."""
    folder = os.path.dirname(path) if not storage.is_url(path) else path.rsplit("/", 1)[0]
    try:
        text = storage.read_bytes(path).decode("utf-8")
    except UnicodeDecodeError:
        raise DataError(f"data.tokenizer: '{path}' is not a Hugging Face tokenizer.json (not UTF-8 text)") from None
    return HFTokenizer(path, text, _read_json(storage.join(folder, CONFIG)),
                       _read_json(storage.join(folder, "config.json")))


def from_sentencepiece(model_proto: bytes, path: str = "tokenizer.model") -> HFTokenizer:
    """A tokenizer.json that encodes and decodes exactly as our SentencePiece BPE model `model_proto` does.

    SentencePiece BPE repeatedly merges the adjacent pair whose concatenation is the highest-scoring piece;
    the `tokenizers` BPE merges the lowest-ranked pair of its merge list. So the merges are every split
    (a, b) of every normal piece into two pieces, ranked by the merged piece's score. Spaces become "▁" (no
    dummy prefix, identity normalisation: the options of moe.data.tokenizer), "\\n" and the control pieces are
    added tokens matched before BPE, and characters outside the vocabulary fall back to `<0xNN>` bytes."""
    import tokenizers
    from sentencepiece import sentencepiece_model_pb2 as sp_pb
    from tokenizers import decoders, models, normalizers

    proto = sp_pb.ModelProto.FromString(model_proto)
    spec, norm = proto.trainer_spec, proto.normalizer_spec
    if spec.model_type != sp_pb.TrainerSpec.BPE:
        raise DataError(f"'{path}': only SentencePiece BPE models convert exactly to tokenizer.json")
    if norm.name != "identity" or norm.add_dummy_prefix or norm.remove_extra_whitespaces or not spec.byte_fallback:
        raise DataError(f"'{path}': the conversion needs the options moe.data.tokenizer trains with "
                        "(identity normalisation, no dummy prefix, byte_fallback)")
    kind = sp_pb.ModelProto.SentencePiece
    vocab = {p.piece: i for i, p in enumerate(proto.pieces)}
    merges = []
    for i, p in enumerate(proto.pieces):
        if p.type != kind.NORMAL:
            continue
        for cut in range(1, len(p.piece)):
            a, b = p.piece[:cut], p.piece[cut:]
            if a in vocab and b in vocab:
                merges.append((-p.score, i, vocab[a], vocab[b], a, b))
    merges.sort()
    unk = next(p.piece for p in proto.pieces if p.type == kind.UNKNOWN)
    tok = tokenizers.Tokenizer(models.BPE(vocab=vocab, merges=[(a, b) for *_, a, b in merges], unk_token=unk,
                                          byte_fallback=True, fuse_unk=True))
    tok.normalizer = normalizers.Replace(" ", "\u2581")
    tok.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()])
    added = tokenizers.AddedToken
    tok.add_special_tokens([added(p.piece, special=True, normalized=False) for p in proto.pieces
                            if p.type in (kind.CONTROL, kind.UNKNOWN)])
    tok.add_tokens([added(p.piece, special=False, normalized=False) for p in proto.pieces
                    if p.type == kind.USER_DEFINED])
    names = {"bos": spec.bos_id, "eos": spec.eos_id, "pad": spec.pad_id, "unk": spec.unk_id}
    config = {f"{k}_token": proto.pieces[i].piece for k, i in names.items() if i >= 0}
    return HFTokenizer(path, tok.to_str(), config)


def export_files(tok) -> dict[str, bytes]:
    """The tokenizer files of an exported HF folder for our tokenizer `tok` (either kind): tokenizer.json and
    tokenizer_config.json, plus the SentencePiece model itself when the run trained with one."""
    if isinstance(tok, HFTokenizer):
        return tok.files()
    model = tok.files()["tokenizer.model"]
    return {"tokenizer.model": model, **from_sentencepiece(model, tok.path).files()}

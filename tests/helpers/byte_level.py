"""A Hugging Face tokenizer.json as open models ship them (GPT-2 / Qwen style byte-level BPE, "<|endoftext|>" and
no beginning-of-text token), trained by the `tokenizers` library itself on the built-in corpus."""

import json
import os

SPECIAL = "<|endoftext|>"


def corpus_texts(split: str = "train", limit: int | None = None) -> list[str]:
    from moe.config import load_config
    from moe.data.corpus import open_corpus

    cfg = load_config("configs/tiny.yaml", [])
    corpus = open_corpus(cfg)
    src = corpus.source(cfg.data.train_split if split == "train" else cfg.data.eval_split)
    return [corpus.text(src[i]) for i in range(min(len(src), limit or len(src)))]


def write_byte_level_tokenizer(folder: str, vocab_size: int, *, config: dict | None = None) -> str:
    """Trains it on 200 train documents, writes FOLDER/tokenizer.json (+ tokenizer_config.json naming the
    end-of-text token, unless `config` replaces it; {} writes none) and returns the tokenizer.json path."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[SPECIAL],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(corpus_texts("train", 200), trainer)
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, "tokenizer.json")
    tok.save(path)
    config = {"eos_token": SPECIAL, "bos_token": None} if config is None else config
    if config:
        with open(os.path.join(folder, "tokenizer_config.json"), "w") as f:
            json.dump(config, f)
    return path

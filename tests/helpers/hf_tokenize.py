"""Runs in the transformers environment (.venv-hf): loads a folder's tokenizer with AutoTokenizer and writes
what it makes of the given texts.

    .venv-hf/bin/python tests/helpers/hf_tokenize.py DIR TEXTS.json OUT.json
OUT.json: {"class", "ids" (per text, no special tokens added), "decoded", "bos_token_id", "eos_token_id",
"pad_token_id"}.
"""

import json
import sys

from transformers import AutoTokenizer


def main(folder: str, texts_path: str, out: str) -> None:
    tok = AutoTokenizer.from_pretrained(folder)
    with open(texts_path) as f:
        texts = json.load(f)
    ids = [tok(t, add_special_tokens=False)["input_ids"] for t in texts]
    res = {"class": type(tok).__name__, "ids": ids,
           "decoded": [tok.decode(i, clean_up_tokenization_spaces=False) for i in ids],
           "bos_token_id": tok.bos_token_id, "eos_token_id": tok.eos_token_id, "pad_token_id": tok.pad_token_id}
    with open(out, "w") as f:
        json.dump(res, f)


if __name__ == "__main__":
    main(*sys.argv[1:])

"""Input pipeline: exact packing, eval coverage, resumable state, host sharding, sources and bad data."""

import json
from collections import Counter

import numpy as np
import pytest

from moe.config import load_config
from moe.data.corpus import DataError, open_corpus
from moe.data.pipeline import check_data, eval_batches, train_iterator
from moe.data.tokenizer import load_tokenizer
from tests.helpers.orbax_iter import orbax_roundtrip

BASE = ["model.vocab_size=1024", "train.seq_len=64", "train.batch_size=8"]


@pytest.fixture(scope="module")
def cfg(tmp_path_factory):
    with pytest.MonkeyPatch.context() as mp:  # a private cache: this module trains its own small tokenizer
        mp.setenv("MOE_CACHE_DIR", str(tmp_path_factory.mktemp("cache")))
        cfg = load_config("configs/tiny.yaml", BASE)
        tok = load_tokenizer(cfg)
    return load_config("configs/tiny.yaml", BASE + [f"data.tokenizer={tok.path}"])


@pytest.fixture(scope="module")
def tok(cfg):
    return load_tokenizer(cfg)


def documents(cfg, tok, split):
    corpus = open_corpus(cfg)
    source = corpus.source(split)
    docs = [[tok.bos_id, *tok.encode(corpus.text(source[i])), tok.eos_id] for i in range(len(source))]
    return [d for d in docs if len(d) >= 4]  # documents of < 2 text tokens are skipped


def pieces_of(batch):
    """Each segment of each row as its token list (the last token comes from the targets at a row's end)."""
    out = []
    for inp, tgt, w, seg, pos in zip(*(batch[k] for k in ("inputs", "targets", "weights", "segment_ids", "positions"))):
        ids = [s for s in np.unique(seg) if s]
        assert ids == list(range(1, len(ids) + 1)), "segments are numbered 1, 2, ... in row order"
        pad = seg == 0
        assert not pad.any() or pad[np.argmax(pad):].all(), "padding only at the end of a row"
        assert (w[pad] == 0).all() and (inp[pad] == 0).all() and (tgt[w == 0] == 0).all()
        for s in ids:
            idx = np.flatnonzero(seg == s)
            assert (np.diff(idx) == 1).all() and (pos[idx] == np.arange(len(idx))).all()
            assert (w[idx[:-1]] == 1).all() and (tgt[idx[:-1]] == inp[idx[1:]]).all()
            last_counts = idx[-1] == len(seg) - 1 and w[idx[-1]] == 1
            assert w[idx[-1]] == (1 if last_counts else 0), "no target across a document boundary"
            out.append(list(inp[idx]) + ([int(tgt[idx[-1]])] if last_counts else []))
    return out


def test_eval_packing_is_exact(cfg, tok):
    """Every document's pieces appear exactly once; every target is counted once; bytes add up."""
    docs = documents(cfg, tok, "validation")
    T = cfg.train.seq_len
    expected = Counter(tuple(d[s : s + T + 1]) for d in docs for s in range(0, len(d) - 1, T))
    batches = list(eval_batches(cfg, tok))
    got = Counter(tuple(int(t) for t in p) for b in batches for p in pieces_of(b))
    assert got == expected
    for b in batches:
        assert {k: (v.shape, v.dtype.name) for k, v in b.items()} == {
            **{k: ((8, T), "int32") for k in ("inputs", "targets", "segment_ids", "positions")},
            "weights": ((8, T), "float32"), "target_bytes": ((8, T), "float32")}
    assert sum(b["weights"].sum() for b in batches) == sum(len(d) - 1 for d in docs)
    corpus = open_corpus(cfg)
    source = corpus.source("validation")
    text_bytes = sum(len(corpus.text(source[i]).encode()) for i in range(len(source)))
    assert sum(b["target_bytes"].sum() for b in batches) == text_bytes
    assert len(list(eval_batches(cfg, tok, max_batches=2))) == 2
    first = next(eval_batches(cfg, tok))
    assert all(np.array_equal(first[k], batches[0][k]) for k in first), "eval batches are deterministic"
    # two hosts get complementary rows of the same global batches
    h0, h1 = (next(eval_batches(cfg, tok, process_index=i, process_count=2)) for i in (0, 1))
    assert np.array_equal(np.concatenate([h0["inputs"], h1["inputs"]]), first["inputs"])


def test_train_batches_pack_train_documents(cfg, tok):
    it = train_iterator(cfg, tok)
    batches = [next(it) for _ in range(4)]
    assert all(b["inputs"].shape == (8, 64) for b in batches)
    T = cfg.train.seq_len
    known = {tuple(d[s : s + T + 1]) for d in documents(cfg, tok, "train") for s in range(0, len(d) - 1, T)}
    pieces = [tuple(int(t) for t in p) for b in batches for p in pieces_of(b)]
    assert all(p in known for p in pieces)
    assert sum(b["weights"].sum() for b in batches) > 0.95 * 4 * 8 * T, "packing leaves little padding"
    other = train_iterator(load_config("configs/tiny.yaml", BASE + [f"data.tokenizer={tok.path}", "train.seed=1"]), tok)
    assert not np.array_equal(next(other)["inputs"], batches[0]["inputs"]), "the seed changes the order"


def test_iterator_state_resumes_exactly(cfg, tok, tmp_path):
    it = train_iterator(cfg, tok)
    for _ in range(3):
        next(it)
    state = it.get_state()
    want = [next(it) for _ in range(3)]
    fresh = train_iterator(cfg, tok)
    fresh.set_state(state)
    for a in want:
        b = next(fresh)
        assert all(np.array_equal(a[k], b[k]) for k in a)
    # through orbax, as the trainer checkpoints it
    it = train_iterator(cfg, tok)
    for _ in range(3):
        next(it)
    restored = orbax_roundtrip(it, lambda: train_iterator(cfg, tok), 3, tmp_path / "ckpt")
    for a in want:
        b = next(restored)
        assert all(np.array_equal(a[k], b[k]) for k in a)


def write_files(root, n_docs=60):
    (root / "a.txt").write_text("first text document\nwith two lines\n")
    (root / "b.txt").write_text("def second(x):\n    return x + 1\n")
    (root / "latin1.txt").write_bytes("caf\xe9 is not utf-8".encode("latin-1"))
    lines = [json.dumps({"text": f"document number {i} says {'hello ' * (i % 5 + 1)}", "id": i}) for i in range(n_docs)]
    lines += [json.dumps({"text": "a"}), "{not json", ""]
    (root / "c.jsonl").write_text("\n".join(lines) + "\n")


def files_cfg(root, tok, *extra):
    return load_config("configs/tiny.yaml", BASE + ["data.source=files", f"data.files=[{root}]",
                                                     f"data.tokenizer={tok.path}", "data.validation_fraction=0.2",
                                                     f"data.data_dir={root / 'tfds'}",
                                                     *extra])


def test_files_source_counts_bad_documents_and_splits_hosts(tok, tmp_path):
    write_files(tmp_path)
    cfg = files_cfg(tmp_path, tok, "train.seq_len=32", "train.batch_size=4", "data.shuffle_buffer=16")
    check_data(cfg)
    corpus = open_corpus(cfg)
    skipped = {r: keys for split in corpus.skipped.values() for r, keys in split.items()}
    assert skipped["not_utf8"] == [str((tmp_path / "latin1.txt").resolve())]
    assert len(skipped["bad_json"]) == 1 and skipped["bad_json"][0].endswith("c.jsonl:62")
    n = corpus.num_documents("train") + corpus.num_documents("validation")
    assert n == 2 + 60 + 1  # two .txt, 60 JSONL documents and the one-token "a" (skipped later, by length)
    # every target of the validation split counted once, the 1-token document left out
    docs = documents(cfg, tok, "validation")
    assert sum(b["weights"].sum() for b in eval_batches(cfg, tok)) == sum(len(d) - 1 for d in docs)
    # two hosts read disjoint halves of the train documents, together all of them
    train_docs = {tuple(d) for d in documents(cfg, tok, "train")}
    starts = []
    for host in (0, 1):
        it = train_iterator(cfg, tok, process_index=host, process_count=2)
        seen = set()
        for _ in range(40):
            for p in pieces_of(next(it)):
                if p[0] == tok.bos_id:
                    seen.add(tuple(p[: p.index(tok.eos_id) + 1]) if tok.eos_id in p else None)
        seen.discard(None)
        starts.append(seen)
        assert next(it)["inputs"].shape == (2, 32)
    assert starts[0] and starts[1] and not starts[0] & starts[1]
    assert starts[0] | starts[1] == {d for d in train_docs if len(d) <= 33}


def test_tfds_source_reads_a_prepared_dataset(tok, tmp_path):
    write_files(tmp_path)
    data_dir = tmp_path / "tfds"
    built = open_corpus(files_cfg(tmp_path, tok))
    name = built.name.split(":")[0]
    cfg = load_config("configs/tiny.yaml", BASE + ["data.source=tfds", f"data.tfds_name={name}",
                                                   f"data.data_dir={data_dir}", f"data.tokenizer={tok.path}"])
    check_data(cfg)
    assert open_corpus(cfg).num_documents("train") == built.num_documents("train")
    assert next(train_iterator(cfg, tok))["inputs"].shape == (8, 64)
    with pytest.raises(DataError, match="data.text_key 'body'"):
        open_corpus(load_config("configs/tiny.yaml", BASE + ["data.source=tfds", f"data.tfds_name={name}",
                                                             f"data.data_dir={data_dir}", "data.text_key=body"]))


@pytest.mark.parametrize("case, message", [
    ("missing_file", "does not exist"),
    ("empty_dir", "holds no .txt or .jsonl"),
    ("no_glob_match", "matches no files"),
    ("wrong_suffix", "neither .txt"),
    ("missing_key", "set data.text_key"),
    ("all_bad", "no usable documents"),
    ("empty_split", "split 'validation' would be empty.*data.validation_fraction"),
    ("tfds_no_data_dir", "data.data_dir .* does not exist"),
    ("tfds_unknown_name", "dataset 'nonexistent_ds' not found"),
    ("tfds_unknown_version", "no prepared version"),
])
def test_bad_data_gives_clear_errors(case, message, tok, tmp_path):
    src = ["data.source=files", f"data.tokenizer={tok.path}", f"data.data_dir={tmp_path / 'tfds'}"]
    if case == "missing_file":
        over = src + [f"data.files=[{tmp_path / 'nope.txt'}]"]
    elif case == "empty_dir":
        over = src + [f"data.files=[{tmp_path}]"]
    elif case == "no_glob_match":
        over = src + [f"data.files=[{tmp_path}/*.jsonl]"]
    elif case == "wrong_suffix":
        (tmp_path / "x.csv").write_text("a,b\n")
        over = src + [f"data.files=[{tmp_path / 'x.csv'}]"]
    elif case == "missing_key":
        (tmp_path / "x.jsonl").write_text(json.dumps({"content": "hello world"}) + "\n")
        over = src + [f"data.files=[{tmp_path / 'x.jsonl'}]"]
    elif case == "all_bad":
        (tmp_path / "x.txt").write_bytes(b"\xff\xfe bad bytes")
        (tmp_path / "y.txt").write_text("   \n")
        over = src + [f"data.files=[{tmp_path}]"]
    elif case == "empty_split":
        (tmp_path / "x.txt").write_text("just one document here")
        over = src + [f"data.files=[{tmp_path}]", "data.validation_fraction=0.001"]
    elif case == "tfds_no_data_dir":
        over = ["data.source=tfds", "data.tfds_name=c4/en:3.1.0", f"data.data_dir={tmp_path / 'missing'}"]
    else:
        (tmp_path / "other_ds" / "1.0.0").mkdir(parents=True)
        (tmp_path / "nonexistent_ds" / "1.0.0").mkdir(parents=True)
        (tmp_path / "nonexistent_ds" / "1.0.0" / "dataset_info.json").write_text("{}")
        name = "nonexistent_ds:2.0.0" if case == "tfds_unknown_version" else "nonexistent_ds"
        if case == "tfds_unknown_name":
            (tmp_path / "nonexistent_ds" / "1.0.0" / "dataset_info.json").unlink()
            (tmp_path / "nonexistent_ds" / "1.0.0").rmdir()
            (tmp_path / "nonexistent_ds").rmdir()
        over = ["data.source=tfds", f"data.tfds_name={name}", f"data.data_dir={tmp_path}"]
    with pytest.raises(DataError, match=message) as e:
        check_data(load_config("configs/tiny.yaml", BASE + over))
    assert "\n" not in str(e.value)


def fake_distribution(site, version="1.0"):
    """An installed distribution `fakepkg` under `site` (its dist-info RECORD lists what it installed): 30
    modules, an empty __init__.py, and files the packages source leaves out (tests, vendored code, non-.py)."""
    files = {f"fakepkg/mod_{i:02d}.py": f"def f{i}(x):\n    return x + {i}\n" for i in range(30)}
    files |= {"fakepkg/__init__.py": "", "fakepkg/tests/test_mod.py": "def test(): pass\n",
              "fakepkg/test_top.py": "def test(): pass\n", "fakepkg/conftest.py": "import pytest\n",
              "fakepkg/_vendor/six.py": "six = 6\n", "fakepkg/core_test.py": "x = 1\n", "fakepkg/data.txt": "text\n",
              "fakepkg/listed_not_installed.py": None}
    info = site / f"fakepkg-{version}.dist-info"
    info.mkdir(parents=True, exist_ok=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: fakepkg\nVersion: {version}\n")
    (info / "RECORD").write_text("".join(f"{rel},,\n" for rel in files) + f"{info.name}/RECORD,,\n")
    for rel, text in files.items():
        if text is not None:
            (site / rel).parent.mkdir(parents=True, exist_ok=True)
            (site / rel).write_text(text)
    return sorted(k for k, v in files.items() if v and "mod_" in k)


def test_packages_source_reads_a_distributions_sources(tok, tmp_path, monkeypatch):
    from moe.data.corpus import text_config

    site = tmp_path / "site"
    modules = fake_distribution(site)
    monkeypatch.syspath_prepend(str(site))
    over = BASE + ["data.source=packages", f"data.tokenizer={tok.path}", "data.validation_fraction=0.2",
                   f"data.data_dir={tmp_path / 'tfds'}", "train.seq_len=16", "train.batch_size=4"]
    cfg = load_config("configs/tiny.yaml", over + ["data.packages=[fakepkg==1.0]"])
    check_data(cfg)
    corpus = open_corpus(cfg)
    keys = [corpus.source(s)[i]["key"].decode() for s in ("train", "validation") for i in range(corpus.num_documents(s))]
    assert sorted(keys) == modules and corpus.num_documents("validation") > 0  # site-relative keys, no tests
    assert corpus.skipped["train"] | corpus.skipped["validation"] == {"empty": ["fakepkg/__init__.py"]}
    assert next(train_iterator(cfg, tok))["inputs"].shape == (4, 16)
    # unpinned gives the same corpus; another installed version is another corpus, and a pin refuses it
    assert text_config(load_config("configs/tiny.yaml", over + ["data.packages=[fakepkg]"])).name == corpus.builder.builder_config.name
    fake_distribution(site, "1.1")
    (site / "fakepkg-1.0.dist-info" / "RECORD").unlink()
    (site / "fakepkg-1.0.dist-info" / "METADATA").unlink()
    (site / "fakepkg-1.0.dist-info").rmdir()
    unpinned = load_config("configs/tiny.yaml", over + ["data.packages=[fakepkg]"])
    assert text_config(unpinned).name.startswith("packages_r") and text_config(unpinned).name != corpus.builder.builder_config.name
    for packages, message in (("fakepkg==1.0", r"fakepkg 1.1 is installed but the config pins fakepkg==1.0; "
                                               r"install the pinned version \(pip install 'fakepkg==1.0'\)"),
                              ("no_such_pkg", "data.packages: 'no_such_pkg' is not installed")):
        with pytest.raises(DataError, match=message) as e:
            check_data(load_config("configs/tiny.yaml", over + [f"data.packages=[{packages}]"]))
        assert "\n" not in str(e.value)

"""Text corpora as TFDS datasets: the built-in Python-stdlib corpus, installed packages' sources, local files, or
any prepared TFDS dataset.

Owns: finding documents, building them once into a local TFDS dataset (ArrayRecord, so `tfds.data_source`
and grain read it without TensorFlow), the stable train/validation split, counting the documents that are
skipped (not UTF-8, empty, malformed JSON), and every "where is my data" error (`DataError`). Must not
tokenize, shuffle or pack: that is `moe.data.pipeline`; the tokenizer lives in `moe.data.tokenizer`.

    corpus = open_corpus(cfg)              # builds the builtin/packages/files dataset on first use (~2 s)
    source = corpus.source("train")        # random-access records; corpus.text(record) -> str

Sources (`data.source`):
  builtin  the running interpreter's stdlib `.py` files (tests, site-packages and generated tables left out),
           in sorted order; the dataset version is the Python version, so another interpreter rebuilds.
  packages the `.py` files installed distributions list in their RECORD (`data.packages`: name or name==version;
           tests, vendored copies and `__pycache__` left out), in sorted order; the dataset is keyed by the
           names and installed versions, so upgrading a package rebuilds, and a pinned version that is not
           the installed one is refused. ~46 MB of code for the 9 packages of configs/micro_pysrc.yaml, 18x builtin.
  files    `.txt` files (one document each) and `.jsonl` files (one document per line, field `data.text_key`);
           the dataset is keyed by a hash of the file list, sizes and mtimes, so editing a file rebuilds.
  tfds     `data.tfds_name` = name[/config][:version] already prepared under `data.data_dir`: ArrayRecord is
           read by random access (`source`); tfrecord is `streaming` and read in order through tf.data
           (`moe.data.tfrecord_source`), which needs the optional `tf` extra.

The split is a stable hash (SHA-256) of each document's key (stdlib-relative path, the site-packages-relative
path of a package file, file path, or `path:line` for JSONL), so adding a file never moves another between train and validation.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import glob
import hashlib
import importlib.metadata
import json
import logging
import os
import sys
import sysconfig
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import tensorflow_datasets as tfds

log = logging.getLogger(__name__)
# tfds warns "Using custom data configuration" on every open of our per-source configs: expected, so hidden.
logging.getLogger("absl").addFilter(lambda r: not str(r.msg).startswith("Using custom data configuration"))

SPLITS = ("train", "validation")
# Left out of the builtin corpus: test suites (half the stdlib, many deliberately odd files), third-party
# packages, IDLE, and machine-generated tables (codec maps, pydoc topics) that would teach nothing about code.
STDLIB_SKIP_DIRS = frozenset({"test", "tests", "idle_test", "site-packages", "dist-packages", "idlelib",
                              "pydoc_data", "encodings", "turtledemo", "__pycache__", "_bundled"})
# Left out of the packages corpus as well: vendored third-party copies and test helpers inside packages.
PACKAGE_SKIP_DIRS = STDLIB_SKIP_DIRS | {"testing", "_vendor", "vendor", "vendored", "third_party"}
BUILDER_REVISION = 1  # builtin source: bump when the way its documents are generated changes (in its dataset name)
FILES_REVISION = 2  # files source: 2 = JSONL text fields that are not strings are skipped, not str()-ed
PACKAGES_REVISION = 1  # packages source: bump when PACKAGE_SKIP_DIRS or the test-file rule changes


class DataError(ValueError):
    """A data problem found before training: the message names the config key or file and the fix."""


# --- finding documents ---------------------------------------------------------------------------------


def stdlib_files() -> tuple[Path, list[str]]:
    """(stdlib root, sorted relative paths of its `.py` files, skipping STDLIB_SKIP_DIRS)."""
    root = Path(sysconfig.get_paths()["stdlib"])
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in STDLIB_SKIP_DIRS)
        rel = Path(dirpath).relative_to(root)
        out += [str(rel / f) for f in filenames if f.endswith(".py")]
    return root, sorted(out)


def _is_package_source(rel: str) -> bool:
    parts = rel.split("/")
    name = parts[-1]
    return (name.endswith(".py") and not PACKAGE_SKIP_DIRS.intersection(parts[:-1]) and name != "conftest.py"
            and not name.startswith("test_") and not name.endswith("_test.py"))


def resolve_packages(specs: tuple[str, ...]) -> tuple[str, ...]:
    """`data.packages` entries (name or name==version) -> sorted "name==installed version"; DataError when one
    is not installed or a pinned version is not the installed one (another version is another corpus)."""
    out = set()
    for spec in specs:
        name, sep, want = (x.strip() for x in spec.partition("=="))
        try:
            have = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            raise DataError(f"data.packages: '{name}' is not installed in this environment; install it "
                            f"(pip install '{spec}') or remove it from data.packages") from None
        if sep and want != have:
            raise DataError(f"data.packages: {name} {have} is installed but the config pins {name}=={want}; "
                            f"install the pinned version (pip install '{name}=={want}') or change the pin "
                            "(another version is another corpus)")
        out.add(f"{importlib.metadata.distribution(name).metadata['Name']}=={have}")
    return tuple(sorted(out))


def package_files(packages: tuple[str, ...]) -> list[tuple[str, Path]]:
    """Sorted (site-packages-relative path, file) of the `.py` sources the resolved `packages` install."""
    found: dict[str, Path] = {}
    for spec in packages:
        dist = importlib.metadata.distribution(spec.partition("==")[0])
        hits = {str(f): Path(dist.locate_file(f)) for f in dist.files or () if _is_package_source(str(f))}
        hits = {rel: p for rel, p in hits.items() if p.is_file()}
        if not hits:
            raise DataError(f"data.packages: {spec} lists no installed .py sources in its RECORD (an editable "
                            "install lists none); remove it from data.packages")
        found.update(hits)
    return sorted(found.items())


def expand_files(patterns: tuple[str, ...]) -> list[Path]:
    """`data.files` entries (paths, globs, or directories searched recursively) -> sorted .txt/.jsonl files."""
    found: set[Path] = set()
    for pattern in patterns:
        p = Path(pattern).expanduser()
        if p.is_dir():
            hits = [f for f in p.rglob("*") if f.suffix in (".txt", ".jsonl") and f.is_file()]
            if not hits:
                raise DataError(f"data.files: directory '{pattern}' holds no .txt or .jsonl files")
        elif glob.has_magic(pattern):
            hits = [Path(f) for f in glob.glob(os.path.expanduser(pattern), recursive=True) if Path(f).is_file()]
            if not hits:
                raise DataError(f"data.files: pattern '{pattern}' matches no files")
        elif p.is_file():
            hits = [p]
        else:
            raise DataError(f"data.files: '{pattern}' does not exist; give existing paths, directories or globs")
        for f in hits:
            if f.suffix not in (".txt", ".jsonl"):
                raise DataError(f"data.files: '{f}' is neither .txt (one document) nor .jsonl (one per line)")
            found.add(f.resolve())
    return sorted(found)


def is_validation(key: str, fraction: float) -> bool:
    """Stable split: the first 8 bytes of SHA-256(key) as a fraction of 2**64."""
    h = int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "big")
    return h / 2.0**64 < fraction


def _documents(config: TextConfig) -> Iterator[tuple[str, str | None, str]]:
    """Yields (key, text or None, why skipped) for every candidate document, in a deterministic order."""
    if config.kind == "builtin":
        root, rels = stdlib_files()
        for rel in rels:
            yield rel, *_decode((root / rel).read_bytes())
        return
    if config.kind == "packages":
        for rel, path in package_files(config.files):
            yield rel, *_decode(path.read_bytes())
        return
    for path in map(Path, config.files):
        if path.suffix == ".txt":
            yield str(path), *_decode(path.read_bytes())
            continue
        for n, line in enumerate(path.read_bytes().splitlines(), 1):
            key = f"{path}:{n}"
            text, why = _decode(line)
            if text is None or not text.strip():
                yield key, None, why or "blank_line"
                continue
            try:
                record = json.loads(text)
            except json.JSONDecodeError:
                yield key, None, "bad_json"
                continue
            if not isinstance(record, dict) or config.text_key not in record:
                # A missing field is almost always a config mistake, not one bad line: stop and say so.
                raise DataError(f"{key}: no field '{config.text_key}' in this JSON line; set data.text_key to the "
                                f"field holding the text (found: {sorted(record) if isinstance(record, dict) else type(record).__name__})")
            value = record[config.text_key]
            if not isinstance(value, str):  # null, a number, a list: not a document (str() would invent one)
                yield key, None, "not_text"
                continue
            yield key, *_decode(value.encode())


def _decode(raw: bytes) -> tuple[str | None, str]:
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        return None, "not_utf8"
    return (text, "") if text.strip() else (None, "empty")


# --- the TFDS builder ----------------------------------------------------------------------------------


@dataclasses.dataclass(eq=False)
class TextConfig(tfds.core.BuilderConfig):
    kind: str = "builtin"  # builtin | files | packages
    files: tuple[str, ...] = ()  # resolved file paths (files), or "name==version" per distribution (packages)
    text_key: str = "text"  # JSON field holding the text (files)
    validation_fraction: float = 0.05


class MoeText(tfds.core.GeneratorBasedBuilder):
    """Documents with fields `text` and `key` (their origin); configs are made per source by `text_config`."""

    VERSION = tfds.core.Version("1.0.0")  # overridden by each config's version

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self,
            description="Plain-text documents for moe language-model pretraining.",
            features=tfds.features.FeaturesDict({"text": tfds.features.Text(), "key": tfds.features.Text()}),
            disable_shuffling=True,  # keep the sorted generation order: the dataset is identical on every machine
            metadata=tfds.core.MetadataDict(),
        )

    def _split_generators(self, dl_manager) -> dict[str, Iterator]:
        self.info.metadata["skipped"] = {s: {} for s in SPLITS}
        return {s: self._generate_examples(s) for s in SPLITS}

    def _generate_examples(self, split: str) -> Iterator[tuple[str, dict[str, str]]]:
        config: TextConfig = self.builder_config
        skipped = self.info.metadata["skipped"][split]
        for key, text, why in _documents(config):
            if (split == "validation") != is_validation(key, config.validation_fraction):
                continue
            if text is None:
                skipped.setdefault(why, []).append(key)
                continue
            yield key, {"text": text, "key": key}


def text_config(cfg) -> TextConfig:
    """The builder config (name and version = cache identity) for source builtin, packages or files."""
    d = cfg.data
    val = f"val{round(d.validation_fraction * 10000):04d}"  # 0.05 -> val0500
    if d.source == "builtin":
        v = sys.version_info
        # The version is the interpreter's: another Python has another stdlib, hence another dataset.
        return TextConfig(name=f"stdlib_r{BUILDER_REVISION}_{val}", version=f"{v.major}.{v.minor}.{v.micro}",
                          kind="builtin", validation_fraction=d.validation_fraction)
    if d.source == "packages":
        packages = resolve_packages(d.packages)
        h = hashlib.sha256(json.dumps(packages).encode()).hexdigest()[:16]
        return TextConfig(name=f"packages_r{PACKAGES_REVISION}_{val}_{h}", version="1.0.0", kind="packages",
                          files=packages, validation_fraction=d.validation_fraction)
    files = expand_files(d.files)
    h = hashlib.sha256(json.dumps([d.text_key, [(str(f), f.stat().st_size, f.stat().st_mtime_ns) for f in files]])
                       .encode()).hexdigest()[:16]
    return TextConfig(name=f"files_r{FILES_REVISION}_{val}_{h}", version="1.0.0", kind="files",
                      files=tuple(map(str, files)), text_key=d.text_key, validation_fraction=d.validation_fraction)


# --- opening a corpus ----------------------------------------------------------------------------------


def data_dir(cfg) -> str:
    """`data.data_dir`, else $TFDS_DATA_DIR, else runs/_tfds."""
    return cfg.data.data_dir or os.environ.get("TFDS_DATA_DIR") or "runs/_tfds"


@dataclasses.dataclass
class Corpus:
    """An opened dataset: `source(split)` gives random-access records, `text(record)` their document text."""

    name: str  # e.g. moe_text/stdlib_r1_val0500:3.12.1 (also names the cached tokenizer)
    builder: Any  # tfds.core.DatasetBuilder
    text_key: str
    skipped: dict[str, dict[str, list[str]]]  # split -> reason -> document keys (builtin/packages/files only)
    streaming: bool = False  # tfrecord: no random access; moe.data.pipeline reads it through moe.data.tfrecord_source

    def check_split(self, split: str) -> None:
        if split not in self.builder.info.splits:
            raise DataError(f"split '{split}' not in {self.name} (has: {', '.join(self.builder.info.splits)}); "
                            "set data.train_split / data.eval_split")

    def source(self, split: str):
        """Random-access records of `split` (not for a streaming corpus: read that with TfRecordSource)."""
        self.check_split(split)
        if self.streaming:
            raise DataError(f"{self.name} is stored as tfrecord, which has no random access (moe.data.pipeline "
                            "streams it through moe.data.tfrecord_source); for this, convert it to ArrayRecord")
        return self.builder.as_data_source(split=split)

    def num_documents(self, split: str) -> int:
        return self.builder.info.splits[split].num_examples if split in self.builder.info.splits else 0

    def text(self, record: dict) -> str:
        value = record[self.text_key]
        return value.decode("utf-8", errors="replace") if isinstance(value, bytes) else str(value)


@contextlib.contextmanager
def file_lock(directory: str, name: str):
    """Exclusive file lock so concurrent runs (or test workers) build a dataset once, not twice at once. A bucket
    (a URL) has no locks: concurrent builders there may both build, and each writes whole objects (TFDS
    prepares into a temporary folder and renames it; the tokenizer is one object), so readers never see half."""
    if "://" in directory:
        yield
        return
    os.makedirs(directory, exist_ok=True)
    with open(os.path.join(directory, f".{name}.lock"), "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


_LOGGED: set[str] = set()  # corpora whose skip counts were logged (once per process)


def _build_local(cfg) -> Corpus:
    config = text_config(cfg)
    root = data_dir(cfg)
    builder = MoeText(config=config, data_dir=root)
    if not builder.is_prepared():  # cheap check first: the lock is only needed to build
        with file_lock(root, f"moe_text-{config.name}"):
            builder = MoeText(config=config, data_dir=root)
            if not builder.is_prepared():
                _check_splits(config)
                log.info("building %s/%s:%s under %s (once)", builder.name, config.name, config.version, root)
                builder = MoeText(config=config, data_dir=root, file_format="array_record")
                builder.download_and_prepare()
                builder = MoeText(config=config, data_dir=root)
    skipped = builder.info.metadata.get("skipped", {})
    counts = {s: {k: len(v) for k, v in r.items()} for s, r in skipped.items() if r}
    name = f"{builder.name}/{config.name}:{config.version}"
    if counts and name not in _LOGGED:
        _LOGGED.add(name)
        log.warning("skipped documents (split -> reason -> count): %s; first: %s", counts,
                    next(iter(v for r in skipped.values() for v in r.values())))
    return Corpus(name, builder, "text", skipped)


def _check_splits(config: TextConfig) -> None:
    """Before building (TFDS cannot write an empty split): every split must get a usable document."""
    kept, skipped = Counter(), Counter()
    for key, text, why in _documents(config):
        if text is None:
            skipped[why] += 1
        else:
            kept["validation" if is_validation(key, config.validation_fraction) else "train"] += 1
    what = {"files": "data.files", "packages": "data.packages"}.get(config.kind, "the stdlib corpus")
    if not kept:
        raise DataError(f"{what}: no usable documents (skipped: {dict(skipped) or 'none found'}); "
                        "documents must be non-empty UTF-8 text")
    for split in SPLITS:
        if not kept[split]:
            raise DataError(f"{what}: split '{split}' would be empty ({dict(kept)} documents); "
                            f"adjust data.validation_fraction ({config.validation_fraction}) or add documents")


def _open_tfds(cfg) -> Corpus:
    d = cfg.data
    root = data_dir(cfg)
    if "://" not in root and not os.path.isdir(root):
        raise DataError(f"data.data_dir '{root}' does not exist; point it at the folder holding prepared TFDS "
                        f"datasets (e.g. `tfds build {d.tfds_name.split(':')[0]} --data_dir {root} "
                        "--file_format array_record`)")
    name, _, version = d.tfds_name.partition(":")
    folder = tfds.core.Path(root) / name
    if not folder.exists():
        have = sorted(p.name for p in tfds.core.Path(root).iterdir() if p.is_dir() and not p.name.startswith("."))
        raise DataError(f"data.tfds_name: dataset '{name}' not found under data.data_dir '{root}' "
                        f"(found: {', '.join(have) or 'nothing'}); prepare it there with `tfds build`")
    versions = sorted((p.name for p in folder.iterdir() if (p / "dataset_info.json").exists()),
                      key=lambda v: tuple(int(x) for x in v.split(".") if x.isdigit()))
    if not versions or (version and version not in versions):
        raise DataError(f"data.tfds_name: '{d.tfds_name}' has no prepared version "
                        f"{version or ''} under {folder} (found: {', '.join(versions) or 'none'})")
    builder = tfds.builder_from_directory(str(folder / (version or versions[-1])))
    fmt = builder.info.file_format
    streaming = fmt is None or fmt.value != "array_record"
    convert = (f"convert it once with `tfds convert_format --dataset_version_dir {folder / (version or versions[-1])} "
               "--out_file_format array_record`")
    if streaming and fmt is not None and fmt.value != "tfrecord":
        raise DataError(f"data.tfds_name: '{d.tfds_name}' is stored as {fmt.value}; moe reads ArrayRecord (grain) or "
                        f"tfrecord (tf.data): {convert}")
    if streaming:
        from moe.data.tfrecord_source import tensorflow_available  # imports TensorFlow: only on this path

        if not tensorflow_available():
            raise DataError(f"data.tfds_name: '{d.tfds_name}' is stored as tfrecord, which moe reads through "
                            f"tf.data: install the `tf` extra (pip install -e \".[tf]\"), or {convert} (this too "
                            "needs TensorFlow, once, on any machine)")
    if d.text_key not in builder.info.features:
        raise DataError(f"data.text_key '{d.text_key}' is not a feature of {d.tfds_name} "
                        f"(features: {', '.join(builder.info.features)})")
    return Corpus(f"{d.tfds_name.split(':')[0]}:{builder.info.version}", builder, d.text_key, {}, streaming)


def open_corpus(cfg) -> Corpus:
    """Opens the configured corpus, building builtin/packages/files datasets on first use; raises DataError."""
    if cfg.data.source == "tfds":
        return _open_tfds(cfg)
    return _build_local(cfg)

"""Workdir I/O: every file of a run or a sweep, on a local disk or in a bucket.

Owns: reading and writing the files of a workdir (config.yaml, the tokenizer copy, metrics.jsonl, summary.json,
eval outputs, sweep point files, the moves of damaged checkpoints, TensorBoard events) and the path Orbax is
given for the checkpoints. Nothing else opens a workdir path (tests/test_storage.py greps for it).

Why etils.epath: Orbax writes the checkpoints through it, so a run's own files and its checkpoints share one
library, one set of credentials and one backend (tf.io.gfile for gs:// when TensorFlow is installed, as it is
for tfds; fsspec otherwise). fsspec alone would need gcsfs and credentials of its own; tf.io.gfile alone would
tie every local path to TensorFlow.

A local path is a folder. A URL (gs://, s3://, az://, file://) is an object store, with its rules:
  - a write is one whole object: `write_bytes` writes a temporary object and renames it over the target
    (one object: a reader sees the old object or the new one, never half);
  - nothing is appended: a file that grows (metrics.jsonl, TensorBoard events) is written to a local staging
    folder and uploaded whole by `Mirror.sync` (before each checkpoint, at exit, and at most every
    `Mirror.every_s` seconds in between), so what the bucket holds survives a preemption;
  - folders are not renamed: `move_tree` copies every object, then deletes the source.
`file:///abs/path` runs that code path on the local disk (the tests' bucket). Orbax gets the URL itself for
gs:// / s3:// / az://, the local path for file://.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
import time
from pathlib import Path

from etils import epath

from moe.config import ConfigError

SCHEMES = ("gs", "s3", "az", "file")


class StorageError(ConfigError):
    """A workdir path that cannot be used (unknown scheme, no permission): one line, exit 2."""


def scheme(p: str | os.PathLike) -> str | None:
    """'gs' for gs://b/x, None for a local path; an unknown scheme is a StorageError."""
    s = os.fspath(p)
    if "://" not in s:
        return None
    name = s.split("://", 1)[0]
    if name not in SCHEMES:
        raise StorageError(f"'{s}': unknown scheme '{name}://'; use a local path or one of "
                           + ", ".join(f"{x}://" for x in SCHEMES))
    return name


def is_url(p: str | os.PathLike) -> bool:
    return scheme(p) is not None


def _local(p: str) -> str:
    """file:///abs/x -> /abs/x."""
    return "/" + p[len("file://"):].lstrip("/")


def path(p: str | os.PathLike) -> epath.Path:
    """The epath.Path that reads and writes `p` (file:// URLs as the local path they name)."""
    s = os.fspath(p)
    return epath.Path(_local(s) if scheme(s) == "file" else s)


def orbax_path(p: str | os.PathLike) -> str:
    """What Orbax is given: gs:// / s3:// / az:// as they are, file:// and local paths absolute (Orbax fails at
    the first save on a relative path)."""
    s = os.fspath(p)
    sch = scheme(s)
    if sch == "file":
        return _local(s)
    return s if sch else os.path.abspath(s)


def join(p: str | os.PathLike, *parts: str) -> str:
    """Joins keeping a URL a URL ('gs://b/run' + 'summary.json' -> 'gs://b/run/summary.json')."""
    s = os.fspath(p)
    if is_url(s):
        return "/".join([s.rstrip("/"), *(x.strip("/") for x in parts)])
    return os.path.join(s, *parts)


def name(p: str | os.PathLike) -> str:
    return os.fspath(p).rstrip("/").rsplit("/", 1)[-1]


def parent(p: str | os.PathLike) -> str:
    """The folder holding `p` ('.' for a bare file name)."""
    s = os.fspath(p).rstrip("/")
    if is_url(s):
        return s.rsplit("/", 1)[0]
    return os.path.dirname(s) or "."


def exists(p) -> bool:
    return path(p).exists()


def isdir(p) -> bool:
    return path(p).is_dir()


def isfile(p) -> bool:
    q = path(p)
    return q.exists() and not q.is_dir()


def listdir(p) -> list[str]:
    """Names in a folder (sorted); [] if it does not exist."""
    q = path(p)
    return sorted(c.name for c in q.iterdir()) if q.is_dir() else []


def makedirs(p) -> None:
    path(p).mkdir(parents=True, exist_ok=True)


def read_bytes(p) -> bytes:
    return path(p).read_bytes()


def read_text(p) -> str:
    return read_bytes(p).decode("utf-8")


def write_bytes(p, data: bytes) -> None:
    """Atomic: a temporary file/object next to the target, renamed over it."""
    q = path(p)
    q.parent.mkdir(parents=True, exist_ok=True)
    tmp = q.parent / f".{q.name}.{os.getpid()}.tmp"
    tmp.write_bytes(data)
    tmp.replace(q)


def write_text(p, text: str) -> None:
    write_bytes(p, text.encode("utf-8"))


def remove(p) -> None:
    path(p).unlink()


def rmtree(p) -> None:
    path(p).rmtree()


def copy_file(src, dst) -> None:
    write_bytes(dst, read_bytes(src))


def move_tree(src, dst) -> None:
    """Moves a folder: a rename on a local disk; on an object store every object copied, then the source
    deleted (a move cut short leaves the source whole, and a partial copy beside it)."""
    if not is_url(src) and not is_url(dst):
        os.makedirs(os.path.dirname(os.path.abspath(dst)), exist_ok=True)
        shutil.move(src, dst)
        return
    root = path(src)
    for parent, _, files in root.walk():
        rel = os.path.relpath(os.fspath(parent), os.fspath(root))
        for f in files:
            copy_file(join(os.fspath(parent), f), join(dst, *([] if rel == "." else [rel]), f))
    root.rmtree()


def check_writable(p, what: str = "--workdir") -> None:
    """Creates the folder and writes/deletes a probe object, or says in one line why it cannot be used."""
    s = os.fspath(p)
    scheme(s)
    if not is_url(s) and os.path.exists(s) and not os.path.isdir(s):
        raise StorageError(f"{what} '{s}' is a file, not a directory; pass a directory")
    probe = join(s, f".write-test-{os.getpid()}")
    try:
        makedirs(s)
        write_bytes(probe, b"ok")
        remove(probe)
    except (OSError, PermissionError) as e:  # gfile raises PermissionDeniedError (an OSError) for a 403
        why = getattr(e, "strerror", None) or (str(e).splitlines() or [type(e).__name__])[0]
        raise StorageError(f"{what} '{s}' is not writable ({why}); fix its permissions, credentials, mount or "
                           "attributes, or pass another location") from None


def _remove_stale_staging() -> None:
    """Staging folders of processes that died without closing their Mirror (kill -9): what they held was
    uploaded at their last sync, or belongs to steps after their last checkpoint, which the resume redoes."""
    root = tempfile.gettempdir()
    for entry in os.listdir(root):
        m = re.fullmatch(r"moe-staging-(\d+)-.*", entry)
        if not m:
            continue
        try:
            os.kill(int(m.group(1)), 0)
        except ProcessLookupError:
            shutil.rmtree(os.path.join(root, entry), ignore_errors=True)
        except PermissionError:  # alive, another user's
            pass


class Mirror:
    """Files that grow by appends, for a workdir that may be a bucket: written under `local_root` and, for a
    URL workdir, uploaded whole by `sync` (changed files only). For a local workdir `local_root` is the
    workdir itself and `sync` does nothing."""

    every_s = 30.0

    def __init__(self, workdir: str):
        self.workdir = os.fspath(workdir)
        self.remote = is_url(self.workdir)
        if self.remote:
            _remove_stale_staging()
        self.local_root = tempfile.mkdtemp(prefix=f"moe-staging-{os.getpid()}-") if self.remote else self.workdir
        self._sent: dict[str, tuple[int, int]] = {}
        self._last = time.monotonic()

    def local(self, rel: str) -> str:
        """The local file to write for WORKDIR/rel."""
        return os.path.join(self.local_root, rel)

    def pull(self, rel: str) -> None:
        """Copies WORKDIR/rel from the bucket into staging (before appending to it on a resume)."""
        if self.remote and isfile(join(self.workdir, rel)):
            dst = Path(self.local(rel))
            dst.parent.mkdir(parents=True, exist_ok=True)
            dst.write_bytes(read_bytes(join(self.workdir, rel)))
            st = dst.stat()
            self._sent[rel] = (st.st_size, st.st_mtime_ns)

    def sync(self, force: bool = True) -> None:
        """Uploads every staged file that changed since it was last sent; with force=False only when
        `every_s` has passed since the last sync."""
        if not self.remote or (not force and time.monotonic() - self._last < self.every_s):
            return
        for parent, _, files in os.walk(self.local_root):
            for f in files:
                full = os.path.join(parent, f)
                rel = os.path.relpath(full, self.local_root)
                st = os.stat(full)
                if self._sent.get(rel) != (st.st_size, st.st_mtime_ns):
                    with open(full, "rb") as fh:  # the local staging copy, not a workdir path
                        write_bytes(join(self.workdir, *rel.split(os.sep)), fh.read())
                    self._sent[rel] = (st.st_size, st.st_mtime_ns)
        self._last = time.monotonic()

    def close(self) -> None:
        self.sync()
        if self.remote:
            shutil.rmtree(self.local_root, ignore_errors=True)

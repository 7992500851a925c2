"""Host memory for XLA:CPU: transparent huge pages for its large buffers, via a glibc tunable set by re-exec.

Owns: `use_huge_pages`, called first thing by the entry points (train.py, eval.py, `python -m moe.bench`,
`python -m moe.scaling`). Must not import jax: it runs before anything else is loaded.

Why. XLA:CPU allocates every large output and temporary buffer afresh on each execution; glibc serves
allocations over 32 MiB with a fresh mmap, and the kernel zero-fills it one 4 KiB page fault at a time on
first touch. On this project's 2-core VM that runs at ~1.3 GB/s: writing a fresh 268 MB buffer took
210 ms against 20 ms for the same write into a donated (reused) one. A step's gradients and activations are
such buffers (0.8 GB of expert-weight gradients alone for the E=64 MoE layer benchmark). With the tunable
`glibc.malloc.hugetlb=1` (glibc >= 2.35) malloc madvises its mappings for transparent huge pages (2 MiB
pages, 512x fewer faults, fewer TLB misses): the same fresh write took 49 ms. docs/performance.md has the
benchmark figures with and without it.

glibc reads tunables only when a process starts, so `use_huge_pages` re-executes the same command line once
with the tunable added. It does nothing where it cannot help (not Linux/glibc, glibc < 2.35, THP disabled),
when the user already set `glibc.malloc.hugetlb`, or with MOE_HUGE_PAGES=0.
"""

from __future__ import annotations

import os
import platform
import sys

TUNABLE = "glibc.malloc.hugetlb=1"
THP_SETTING = "/sys/kernel/mm/transparent_hugepage/enabled"


def _applicable() -> bool:
    if sys.platform != "linux" or os.environ.get("MOE_HUGE_PAGES", "1") == "0":
        return False
    if "glibc.malloc.hugetlb" in os.environ.get("GLIBC_TUNABLES", ""):
        return False  # set already: by our own re-exec, or by the user (who may have chosen 0)
    libc, version = platform.libc_ver()
    if libc != "glibc" or tuple(int(x) for x in version.split(".")[:2] if x.isdigit()) < (2, 35):
        return False
    try:
        with open(THP_SETTING) as f:
            return "[never]" not in f.read()
    except OSError:
        return False


def use_huge_pages() -> None:
    """Re-executes this process with GLIBC_TUNABLES += glibc.malloc.hugetlb=1 when that applies (see above).

    Call it before importing jax, from an entry point's `__main__` block only: it replaces the process."""
    if not _applicable():
        return
    tunables = ":".join(t for t in (os.environ.get("GLIBC_TUNABLES", ""), TUNABLE) if t)
    sys.stdout.flush()
    sys.stderr.flush()
    try:
        os.execve(sys.executable, sys.orig_argv, dict(os.environ, GLIBC_TUNABLES=tunables))
    except OSError:
        pass  # could not re-execute (e.g. the interpreter path vanished): run on with small pages

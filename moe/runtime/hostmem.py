"""Host memory: keep freed memory for reuse instead of handing it back to the kernel (glibc only).

Owns: the malloc policy of the process, config key `train.host_malloc` (`set_host_malloc`). Entry points
apply it before JAX starts its threads (train.py after loading the config, eval.py, `python -m moe.bench`):
threads that have already allocated keep their own malloc arena, which the policy cannot reach.

Why. XLA:CPU allocates every output and temporary buffer of an execution with malloc and frees it at the end.
glibc serves any block over 32 MiB with a fresh mmap and unmaps it on free, so the next step's buffers are
new pages that the kernel zero-fills one 4 KiB fault at a time: a 268 MB buffer took 210 ms to write fresh
against 20 ms into memory already mapped (docs/performance.md, commit 0f21771). Per step that is the size of
all large buffers, e.g. the [E, D, F] expert weight gradients (805 MB in fp32 at E=64, D=512, F=2048).

What. mallopt(M_MMAP_MAX=0) serves large blocks from the heap, M_TRIM_THRESHOLD=-1 never gives the heap
top back, and M_ARENA_MAX=1 puts every thread on the main heap (glibc's other arenas are 64 MiB heaps, which
map larger blocks afresh whatever M_MMAP_MAX says). The cost: the process keeps its peak host memory mapped
(a `small` train-step process: 8.7 GB RSS against 3.9 GB), the first steps fault that peak in
once, and threads share one malloc lock. Device memory on TPU/GPU is not malloc'd: there only host-side
buffers (input pipeline, checkpoint staging) are affected; "system" leaves malloc as it is.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import platform

M_TRIM_THRESHOLD, M_MMAP_MAX, M_ARENA_MAX = -1, -4, -8  # <malloc.h>
TRIM_THRESHOLD = -1  # never trim (mallopt(3): -1 disables trimming)

_applied: bool | None = None


def set_host_malloc(policy: str) -> bool:
    """Applies `train.host_malloc` ("keep" | "system") once per process; later calls change nothing.
    True if "keep" is in effect (glibc only)."""
    global _applied
    if _applied is None:
        _applied = policy == "keep" and _apply()
    return _applied


def _apply() -> bool:
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    libc = ctypes.CDLL(ctypes.util.find_library("c"))
    return all(libc.mallopt(param, value) == 1
               for param, value in ((M_ARENA_MAX, 1), (M_MMAP_MAX, 0), (M_TRIM_THRESHOLD, TRIM_THRESHOLD)))

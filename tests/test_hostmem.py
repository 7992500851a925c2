"""train.host_malloc (moe/runtime/hostmem.py): with "keep" a freed large buffer is reused without page faults."""
import platform
import subprocess
import sys

import pytest

from moe.runtime import hostmem

# Writes a 256 MB malloc'd buffer (over glibc's 32 MiB mmap threshold; as XLA:CPU allocates, no numpy, which
# madvises huge pages itself), frees it, writes a second one; prints the minor page faults of the second.
PROBE = """
import ctypes, ctypes.util, resource, sys
from moe.runtime.hostmem import set_host_malloc
print(set_host_malloc(sys.argv[1]))
libc = ctypes.CDLL(ctypes.util.find_library("c"))
libc.malloc.restype = ctypes.c_void_p
libc.free.argtypes = [ctypes.c_void_p]
size = 2**28
def write_fresh_buffer():
    p = libc.malloc(size)
    ctypes.memset(p, 1, size)
    return p
libc.free(write_fresh_buffer())
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
write_fresh_buffer()
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""

glibc_only = pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="the policy is glibc's mallopt")


def _faults_of_second_buffer(policy: str) -> tuple[str, int]:
    out = subprocess.run([sys.executable, "-c", PROBE, policy], capture_output=True, text=True, check=True).stdout
    applied, faults = out.split()
    return applied, int(faults)


@glibc_only
def test_keep_reuses_freed_memory_without_page_faults():
    applied, faults = _faults_of_second_buffer("keep")
    assert applied == "True"
    assert faults < 1000  # the freed 256 MB are reused: no fresh pages (a few for Python objects)


@glibc_only
def test_system_maps_every_large_buffer_afresh():
    applied, faults = _faults_of_second_buffer("system")
    assert applied == "False"
    assert faults > 2**28 // 4096 // 2  # most of the 65,536 pages of 256 MB are faulted in again


def test_policy_is_applied_once_per_process():
    # conftest applied the default ("keep") before JAX started; a later call cannot undo or redo it
    assert hostmem.set_host_malloc("system") == hostmem.set_host_malloc("keep")

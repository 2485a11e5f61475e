"""The CPU allocator setting the trainer applies: after it, a freed block of 1 MiB or more goes back to
the OS at once (glibc maps it instead of carving it from a heap the process keeps), whatever blocks
the process freed before (which raise glibc's dynamic threshold). Checked with glibc's own counters."""

from __future__ import annotations

import ctypes
import ctypes.util
import sys

import pytest

from embedforge.train.memory import memory_record


class MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks",
                 "keepcost")]


def glibc():
    if not sys.platform.startswith("linux"):
        return None
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    if not hasattr(libc, "mallinfo2"):
        return None
    libc.mallinfo2.restype = MallInfo2
    libc.malloc.restype = ctypes.c_void_p
    libc.free.argtypes = [ctypes.c_void_p]
    return libc


PROBE = """
import ctypes, ctypes.util, sys
sys.path.insert(0, {tests!r})
from test_train_memory import glibc
libc = glibc()
libc.free(libc.malloc(16 << 20))  # a freed 16 MiB mapped block raises glibc's threshold to 16 MiB
if {fix}:
    from embedforge.train.memory import steady_cpu_allocator
    assert steady_cpu_allocator() is not None
before = libc.mallinfo2().hblkhd
block = libc.malloc(4 << 20)
mapped = libc.mallinfo2().hblkhd - before
libc.free(block)
print(mapped, libc.mallinfo2().hblkhd - before)
"""


@pytest.mark.skipif(glibc() is None, reason="glibc with mallinfo2 (2.33+) only")
@pytest.mark.parametrize("fix", [True, False])
def test_large_blocks_are_mapped_after_the_dynamic_threshold_grew(fix):
    # A fresh interpreter: a long-lived process may serve the block from free heap space it already holds.
    import subprocess
    from pathlib import Path

    code = PROBE.format(tests=str(Path(__file__).parent), fix=fix)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    mapped, left = (int(x) for x in done.stdout.split())
    if fix:
        assert mapped >= 4 << 20 and left == 0  # mapped, and returned on free
    else:
        assert mapped == 0  # the same block from the heap: what the fix is for


def test_memory_record_on_cpu_reads_this_process():
    import psutil
    import torch

    record = memory_record(torch.device("cpu"))
    now = psutil.Process().memory_info().rss / 2**20
    assert set(record) == {"rss_mb", "peak_rss_mb"}
    assert record["peak_rss_mb"] >= record["rss_mb"] * 0.99 and abs(record["rss_mb"] - now) < 0.1 * now

"""The CPU allocator setting the trainer applies: after it, a freed block of 1 MiB or more goes back to
the OS at once (glibc maps it instead of carving it from a heap the process keeps), whatever blocks
the process freed before (which raise glibc's dynamic threshold). Checked with glibc's own counters."""

from __future__ import annotations

import ctypes
import ctypes.util
import sys

import pytest

from embedforge.train.memory import memory_record, steady_cpu_allocator


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


@pytest.mark.skipif(glibc() is None, reason="glibc with mallinfo2 (2.33+) only")
def test_large_blocks_are_mapped_after_the_dynamic_threshold_grew():
    libc = glibc()
    # Free a 16 MiB mapped block: glibc raises its threshold to 16 MiB, so 4 MiB would come from the heap.
    libc.free(libc.malloc(16 << 20))
    assert steady_cpu_allocator() is not None
    mapped_before = libc.mallinfo2().hblkhd
    block = libc.malloc(4 << 20)
    try:
        assert libc.mallinfo2().hblkhd - mapped_before >= 4 << 20
    finally:
        libc.free(block)
    assert libc.mallinfo2().hblkhd == mapped_before  # returned on free


def test_memory_record_on_cpu_reads_this_process():
    import psutil
    import torch

    record = memory_record(torch.device("cpu"))
    now = psutil.Process().memory_info().rss / 2**20
    assert set(record) == {"rss_mb", "peak_rss_mb"}
    assert record["peak_rss_mb"] >= record["rss_mb"] * 0.99 and abs(record["rss_mb"] - now) < 0.1 * now

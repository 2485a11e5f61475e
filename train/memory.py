"""Memory a CPU run can predict, and memory per logged step in metrics.jsonl.

Per record: CPU, the process's resident memory now (`rss_mb`) and its peak so far (`peak_rss_mb`,
the kernel's high-water mark); CUDA, the peak allocation since the previous record (`cuda_peak_mb`).

On CPU, glibc's malloc raises its mmap threshold each time a large mapped block is freed, so after a
few steps the activations of a step (tensors of many shapes) come from the heap, which the process
keeps and fragments: resident memory crept by hundreds of MB over 80 steps of all-MiniLM-L6-v2.
`steady_cpu_allocator` fixes the threshold (blocks of 1 MiB and more are mapped and returned on free):
less creep at the same step time (bench/train_memory.py, bench/results/train_memory.md).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import resource
import sys

import torch

logger = logging.getLogger(__name__)

M_MMAP_THRESHOLD = -3  # glibc mallopt parameter
MMAP_THRESHOLD_BYTES = 1 << 20


def steady_cpu_allocator() -> str | None:
    """Fix glibc's mmap threshold (see the module docstring); returns the decision to log, or None
    where malloc is not glibc's (macOS, musl) and nothing was changed."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        if libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES) != 1:
            return None
    except (OSError, AttributeError):
        return None
    return (f"glibc malloc: blocks of {MMAP_THRESHOLD_BYTES >> 20} MiB and more mapped and returned on free "
            "(fixed mmap threshold), so resident memory does not creep from step to step")


def memory_record(device: torch.device) -> dict[str, float]:
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device) / 2**20
        torch.cuda.reset_peak_memory_stats(device)
        return {"cuda_peak_mb": peak}
    import psutil

    # ru_maxrss is KiB on Linux, bytes on macOS
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / (2**20 if sys.platform == "darwin" else 2**10)
    return {"rss_mb": psutil.Process().memory_info().rss / 2**20, "peak_rss_mb": peak}

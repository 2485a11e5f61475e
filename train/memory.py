"""Memory per logged step, so a run's footprint is visible in metrics.jsonl as it grows.

CPU: the process's resident memory now (`rss_mb`) and its peak so far (`peak_rss_mb`, the kernel's
high-water mark). CUDA: the peak allocation since the previous record (`cuda_peak_mb`), then reset.
"""

from __future__ import annotations

import resource
import sys

import torch


def memory_record(device: torch.device) -> dict[str, float]:
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device) / 2**20
        torch.cuda.reset_peak_memory_stats(device)
        return {"cuda_peak_mb": peak}
    import psutil

    # ru_maxrss is KiB on Linux, bytes on macOS
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / (2**20 if sys.platform == "darwin" else 2**10)
    return {"rss_mb": psutil.Process().memory_info().rss / 2**20, "peak_rss_mb": peak}

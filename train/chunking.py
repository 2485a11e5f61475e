"""How many texts go into one training forward: a token budget, so that no batch exhausts memory
however long its texts or however many negatives each row carries. A step whose texts exceed it is
split into chunks and GradCache (train/gradcache.py) gives the gradients of the unsplit step.

Tokens are counted as the padded forward computes them: texts x the longest text of the chunk. A
padded step on real data with long-tailed lengths computes mostly padding when all its texts share
one forward, so padded steps are cut into length groups that minimise the positions computed
(`plan_padded_chunks`); when those groups together fit the budget they are forwarded one after the
other with their graphs kept and one backward (no GradCache re-forward).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

MIN_TOKENS = 1024  # below this a forward is slower than it is worth, whatever the memory
MAX_TOKENS = 1 << 20
# What one more forward costs, in token positions: a launch overhead that makes a chunk of a few short
# texts not worth cutting off (kernel launches and per-layer bookkeeping; a few ms on CPU or GPU).
FORWARD_COST = 256
MEMORY_SHARE = 0.5  # of the memory available at start: weights' gradients, optimizer state and allocator slack take the rest


def activation_bytes_per_token(config, max_length: int, dtype: torch.dtype) -> int:
    """An upper estimate of what a training forward keeps per token for its backward: per layer,
    about 16 hidden-size vectors (norm inputs, q/k/v, attention output, residuals), 2 of the MLP's
    intermediate size and the attention scores and probabilities (2 x heads x sequence length,
    kept by the math attention a CPU runs)."""
    text = getattr(config, "text_config", None) or config
    layers = int(text.num_hidden_layers)
    hidden = int(text.hidden_size)
    intermediate = int(getattr(text, "intermediate_size", None) or 4 * hidden)
    heads = int(text.num_attention_heads)
    per_layer = 16 * hidden + 2 * intermediate + 2 * heads * max_length
    return layers * per_layer * torch.empty((), dtype=dtype).element_size()


def available_memory(device: torch.device) -> int:
    """Bytes free on the device now (CUDA), or in the machine's RAM (CPU)."""
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    import psutil

    return int(psutil.virtual_memory().available)


def forward_token_budget(config, max_length: int, dtype: torch.dtype, device: torch.device) -> tuple[int, str]:
    """(tokens per forward, why): MEMORY_SHARE of the available memory over the activation estimate."""
    free = available_memory(device)
    per_token = activation_bytes_per_token(config, max_length, dtype)
    budget = max(MIN_TOKENS, min(MAX_TOKENS, int(MEMORY_SHARE * free / per_token)))
    return budget, (f"at most {budget} tokens per forward ({MEMORY_SHARE:.0%} of {free / 2**30:.1f} GiB free on "
                    f"{device.type}, about {per_token / 1024:.0f} KiB of activations per token at length "
                    f"{max_length}); larger steps run in chunks with GradCache")


def plan_chunks(order: Sequence[int], lengths: Sequence[int], max_tokens: int | None,
                max_texts: int | None) -> list[list[int]]:
    """Consecutive runs of `order` (text indices sorted by length, shortest first), each at most
    `max_texts` texts whose padded size (texts x longest) is at most `max_tokens`; a text longer than
    the budget gets a chunk of its own."""
    chunks: list[list[int]] = []
    current: list[int] = []
    width = 0
    for i in order:
        too_many = max_texts is not None and len(current) + 1 > max_texts
        too_big = max_tokens is not None and (len(current) + 1) * max(width, lengths[i]) > max_tokens
        if current and (too_many or too_big):
            chunks.append(current)
            current, width = [], 0
        current.append(i)
        width = max(width, lengths[i])
    if current:
        chunks.append(current)
    return chunks


def padded_positions(chunks: Sequence[Sequence[int]], lengths: Sequence[int]) -> int:
    """Positions the padded forwards of `chunks` compute: each chunk's texts x its longest text."""
    return sum(len(c) * max(lengths[i] for i in c) for c in chunks if c)


def plan_padded_chunks(order: Sequence[int], lengths: Sequence[int], max_tokens: int | None,
                       max_texts: int | None, forward_cost: int | None = None) -> list[list[int]]:
    """Consecutive runs of `order` (sorted by length, shortest first) that minimise the padded
    positions computed plus `forward_cost` per forward, then cut to the budget as `plan_chunks` does.

    Exact over the cut points between distinct lengths (an optimal partition never splits texts of
    one length: moving them into the earlier chunk widens nothing and shortens the later one), by
    dynamic programming over at most max_length distinct lengths."""
    if not order:
        return []
    forward_cost = FORWARD_COST if forward_cost is None else forward_cost
    widths: list[int] = []  # distinct lengths, ascending, and how many texts end at each
    ends: list[int] = []
    for position, i in enumerate(order):
        if widths and lengths[i] == widths[-1]:
            ends[-1] = position + 1
        else:
            if widths and lengths[i] < widths[-1]:
                raise ValueError("order must be sorted by length")
            widths.append(lengths[i])
            ends.append(position + 1)
    starts = np.array([0] + ends[:-1], dtype=np.int64)
    best = np.zeros(len(widths) + 1, dtype=np.float64)  # best[g]: cost of the texts before group g
    cut = np.zeros(len(widths), dtype=np.int64)
    for g, (width, end) in enumerate(zip(widths, ends)):
        costs = best[:g + 1] + (end - starts[:g + 1]) * float(width) + forward_cost
        cut[g] = int(np.argmin(costs))
        best[g + 1] = costs[cut[g]]
    groups: list[list[int]] = []
    g = len(widths) - 1
    while g >= 0:
        first = int(cut[g])
        groups.append(list(order[starts[first]:ends[g]]))
        g = first - 1
    groups.reverse()
    return [chunk for group in groups for chunk in plan_chunks(group, lengths, max_tokens, max_texts)]

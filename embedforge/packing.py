"""Padding-free ("packed") batches for decoders: several texts share one row of the batch.

A packed row is the texts' token ids one after the other, with position ids that restart at 0 for
each text and no attention mask. From those position ids transformers builds the attention that
keeps every text to itself: a block-diagonal causal mask for SDPA and eager attention
(`masking_utils.find_packed_sequence_indices`), variable-length kernels for flash-attention
(`prepare_fa_kwargs_from_position_ids`, which needs the whole batch in ONE row). Both need the
forward to run without a KV cache (`use_cache=False`): with one, transformers ignores the packing
and every text attends to the texts before it in its row. Each text's vector is then read at its
own last token (or first, or the mean of its tokens), so a packed forward gives the vectors of the
padded one without computing padding between texts.

The rows are filled greedily by length (best fit, longest text first) and are never wider than the
longest text they hold, so a packed row costs no more attention than a row of the padded batch.
"""

from __future__ import annotations

import bisect
from collections.abc import Mapping, Sequence
from typing import Any, Literal

import torch

Packing = bool | Literal["auto"]

# Decoder families whose packed forward equals the padded one (tests/test_core_packing.py checks
# each with a tiny random model of that type against its padded forward).
PACKABLE_MODEL_TYPES = frozenset({
    "qwen2", "qwen3", "qwen3_moe", "llama", "mistral", "mixtral", "gemma", "gemma2", "gemma3_text", "phi3",
    "olmo2", "smollm3", "granite",
})
# Attention implementations that turn packed position ids into per-text attention. flex_attention
# builds the same mask but could not be run here (its CPU kernel does not compile), so it pads.
DENSE_MASK_ATTENTION = frozenset({"sdpa", "eager"})
VARLEN_ATTENTION = frozenset({"flash_attention_2", "flash_attention_3", "flash_attention_4"})
TEXT_INDEX = "text_index"  # (rows, width): which text of the batch each position holds, -1 for padding
LAST_INDEX = "last_index"  # (texts,): where each text's last token is in the flattened (rows * width) batch


def backbone_config(model: torch.nn.Module) -> Any:
    """The transformers config under DDP / accelerate / peft wrappers."""
    while not hasattr(model, "config") and hasattr(model, "module"):
        model = model.module
    return model.config


def why_not_packable(model: torch.nn.Module) -> str | None:
    """None when this model's forward honours packed position ids; otherwise the reason, for the log."""
    config = backbone_config(model)
    model_type = getattr(config, "model_type", None)
    attention = getattr(config, "_attn_implementation", None)
    if model_type not in PACKABLE_MODEL_TYPES:
        return f"{model_type} is not a decoder checked for packing (bidirectional encoders attend across texts)"
    if not getattr(config, "is_causal", True):
        return f"{model_type} is configured bidirectional (is_causal false)"
    if attention not in DENSE_MASK_ATTENTION | VARLEN_ATTENTION:
        return f"attention implementation {attention!r} builds no per-text mask from position ids"
    return None


def needs_single_row(model: torch.nn.Module) -> bool:
    """Flash-attention reads sequence boundaries from position ids only when the batch is one row."""
    return getattr(backbone_config(model), "_attn_implementation", None) in VARLEN_ATTENTION


def fill_rows(lengths: Sequence[int], capacity: int, max_rows: int | None = None, start: int = 0) -> list[list[int]]:
    """Best fit of `lengths[start:]`, in that order, into rows of `capacity` tokens: each text goes
    to the open row it fills most tightly, or opens a row. Stops at the first text that fits no open
    row once `max_rows` rows are open. Returns the indices (into `lengths`) of each row's texts; a
    text longer than `capacity` gets a row of its own."""
    rows: list[list[int]] = []
    free: list[tuple[int, int]] = []  # (free tokens, row), sorted: the tightest row that fits is a bisect away
    for i in range(start, len(lengths)):
        at = bisect.bisect_left(free, (lengths[i], -1))
        if at < len(free):
            room, row = free.pop(at)
            rows[row].append(i)
            room -= lengths[i]
        elif max_rows is None or len(rows) < max_rows:
            rows.append([i])
            room, row = capacity - lengths[i], len(rows) - 1
        else:
            break
        if room > 0:
            bisect.insort(free, (room, row))
    return rows


def plan_rows(lengths: Sequence[int], capacity: int | None = None) -> list[list[int]]:
    """Indices of the texts in each row: best fit, longest first, rows of `capacity` tokens
    (default: the longest length, so no row is wider than the padded batch would be)."""
    if not lengths:
        return []
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    ordered = [lengths[i] for i in order]
    rows = fill_rows(ordered, max(capacity or 0, ordered[0]))
    return [[order[i] for i in row] for row in rows]


def plan_forwards(lengths: Sequence[int], max_rows: int, single_row: bool = False) -> list[list[list[int]]]:
    """Forwards for lengths sorted longest first, each a list of rows of indices into `lengths`.

    A forward takes the next `max_rows` longest texts, one per row, exactly as the padded batch
    would, and is as wide as the first of them; the room those rows leave (the padded batch's
    padding) then takes the shortest remaining texts, tightest gap first. So no forward is larger
    than the padded one that starts with the same text, and the short texts' own forwards vanish.
    `single_row`: one row per forward of at most `max_rows` times its longest text's tokens."""
    forwards: list[list[list[int]]] = []
    head, tail = 0, len(lengths)  # texts head..tail-1 are still to place
    while head < tail:
        width = lengths[head]
        if single_row:
            budget, row = max_rows * width, []
            while head < tail and len(row) < max_rows:
                budget -= lengths[head]
                row.append(head)
                head += 1
            while head < tail and lengths[tail - 1] <= budget:
                budget -= lengths[tail - 1]
                tail -= 1
                row.append(tail)
            forwards.append([row])
            continue
        rows = [[i] for i in range(head, min(head + max_rows, tail))]
        head += len(rows)
        free = sorted((width - lengths[row[0]], r) for r, row in enumerate(rows) if width > lengths[row[0]])
        while head < tail and free:
            at = bisect.bisect_left(free, (lengths[tail - 1], -1))
            if at == len(free):
                break
            room, r = free.pop(at)
            tail -= 1
            rows[r].append(tail)
            if room > lengths[tail]:
                bisect.insort(free, (room - lengths[tail], r))
        forwards.append(rows)
    return forwards


def pack(token_rows: Sequence[Sequence[int]], *, pad_id: int, capacity: int | None = None,
         single_row: bool = False, rows: list[list[int]] | None = None) -> dict[str, torch.Tensor]:
    """Packed features for `Embedder.embed`: `input_ids` and `position_ids` (rows, width),
    `text_index` (rows, width), the text each position belongs to (-1 for padding at a row's end),
    and `last_index` (texts,), each text's last token in the flattened batch.

    `single_row` puts every text in one row without padding (flash-attention's variable-length
    path); otherwise rows of `capacity` tokens (default: the longest text) are filled by
    `plan_rows`, unless `rows` gives the plan. Padding at a row's end gets position ids of its own
    that restart at 0: it is a sequence of its own, which no text attends to."""
    lengths = [len(r) for r in token_rows]
    if not lengths or min(lengths) < 1:
        raise ValueError("pack needs at least one text and no empty token row")
    if rows is not None:
        plan = rows
    else:
        plan = [list(range(len(lengths)))] if single_row else plan_rows(lengths, capacity)
    width = max(sum(lengths[i] for i in row) for row in plan)
    ids: list[int] = []
    positions: list[int] = []
    owner: list[int] = []
    last = [0] * len(lengths)
    for r, row in enumerate(plan):
        used = 0
        for i in row:
            n = lengths[i]
            ids.extend(token_rows[i])
            positions.extend(range(n))
            owner.extend([i] * n)
            used += n
            last[i] = r * width + used - 1
        ids.extend([pad_id] * (width - used))
        positions.extend(range(width - used))
        owner.extend([-1] * (width - used))
    shape = (len(plan), width)
    return {"input_ids": torch.tensor(ids, dtype=torch.long).view(shape),
            "position_ids": torch.tensor(positions, dtype=torch.long).view(shape),
            TEXT_INDEX: torch.tensor(owner, dtype=torch.long).view(shape),
            LAST_INDEX: torch.tensor(last, dtype=torch.long)}


def is_packed(features: Mapping[str, Any]) -> bool:
    return TEXT_INDEX in features


def real_tokens(features: Mapping[str, torch.Tensor]) -> int:
    """Tokens of text in a padded or packed batch (padding excluded)."""
    if is_packed(features):
        return int((features[TEXT_INDEX] >= 0).sum())
    return int(features["attention_mask"].sum())


def pool_packed(hidden: torch.Tensor, features: Mapping[str, torch.Tensor], mode: str) -> torch.Tensor:
    """One vector per text from packed hidden states (rows, width, dim), in text order."""
    flat = hidden.reshape(-1, hidden.shape[-1])
    last = features[LAST_INDEX].to(hidden.device)
    if mode == "lasttoken":
        return flat[last]
    owner = features[TEXT_INDEX].reshape(-1).to(hidden.device)
    real = owner >= 0
    counts = torch.bincount(owner[real], minlength=last.shape[0])
    if mode == "cls":
        return flat[last - counts + 1]
    if mode == "mean":
        sums = flat.new_zeros(last.shape[0], flat.shape[1]).index_add(0, owner[real], flat[real])
        return sums / counts.to(flat.dtype).unsqueeze(1)
    raise ValueError(f"unknown pooling mode {mode!r}")


def choose_packing(requested: Packing, model: torch.nn.Module) -> tuple[bool, str | None]:
    """(pack, reason it does not): `True`/"auto" pack when the model can, `False` never does."""
    if requested is False:
        return False, None
    if requested not in (True, "auto"):
        raise ValueError(f"packing must be true, false or 'auto', got {requested!r}")
    reason = why_not_packable(model)
    return reason is None, reason

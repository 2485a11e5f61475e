"""Pooling of token states into one vector, and Matryoshka truncation.

Last-token pooling finds the last real token from the attention mask, so it is right under left
AND right padding (reading position -1 under right padding, or the first pad under left padding,
silently pools the wrong token)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

POOLING_MODES = ("lasttoken", "mean", "cls")


def last_token_pool(hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Hidden state of each row's last attended position, whatever the padding side."""
    seq_len = attention_mask.shape[1]
    last = seq_len - 1 - attention_mask.flip(dims=[1]).int().argmax(dim=1)
    return hidden[torch.arange(hidden.shape[0], device=hidden.device), last]


def mean_pool(hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)


def cls_pool(hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    first = attention_mask.int().argmax(dim=1)  # first attended position (left padding safe)
    return hidden[torch.arange(hidden.shape[0], device=hidden.device), first]


def pool(hidden: torch.Tensor, attention_mask: torch.Tensor, mode: str) -> torch.Tensor:
    if mode == "lasttoken":
        return last_token_pool(hidden, attention_mask)
    if mode == "mean":
        return mean_pool(hidden, attention_mask)
    if mode == "cls":
        return cls_pool(hidden, attention_mask)
    raise ValueError(f"unknown pooling mode {mode!r}; expected one of {POOLING_MODES}")


def truncate_and_normalize(embeddings: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Matryoshka: keep the first `dim` coordinates, then L2-normalise (again)."""
    if dim is not None:
        if not 0 < dim <= embeddings.shape[-1]:
            raise ValueError(f"dim must be in 1..{embeddings.shape[-1]}, got {dim}")
        embeddings = embeddings[..., :dim]
    return F.normalize(embeddings, p=2, dim=-1)

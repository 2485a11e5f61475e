"""Cross-device negatives: a gather that carries gradient back to the rank that owns each row.

Scale convention (what makes 2 processes equal 1)
-------------------------------------------------
Let N rows be split over W ranks, rank r holding n_r of them, and L = (1/N) sum_i l_i the loss one
process would compute on the concatenated batch. On rank r:
  1. gather every rank's rows with `all_gather_with_grad` (concatenated in rank order);
  2. compute the loss of its OWN rows only (`anchors`), as a mean over them: L_r;
  3. multiply by `loss_scale` = W * n_r / N (exactly 1.0 when batches are even) and backward;
  4. let DDP (or accelerate, DeepSpeed) AVERAGE parameter gradients over ranks, as it does.
The backward of the gather all-reduces (SUMs) the gradient of the gathered tensor and hands each
rank the slice of its own rows, so rank r's embeddings receive d(sum_s L_s * scale_s)/d e_r from
every rank's loss. Averaging over W then gives exactly dL/dtheta of the one-process run.
Consequence worth knowing: a gradient that DDP does NOT average, such as the gradient on rank r's
input embeddings, comes out W times the one-process value.

FlagEmbedding instead gathers without gradient and splices the local tensor back in, which drops
the gradient paths through other ranks' losses, and ms-swift gathers detached. sentence-transformers
(`gather_across_devices=True`, 6.x) gathers with gradient through torch.distributed.nn.all_gather,
which needs the same batch size on every rank. Here the full gradient flows, with uneven batches.

Uneven batches are supported: sizes are exchanged first, rows padded to the largest rank for the
collective and stripped after. Hard-negative counts K may differ per rank too; they are padded to
the largest K with `neg_mask` False. When torch.distributed is not initialised (or W = 1) every
function here is a no-op.

Collectives in backward must match one for one across ranks, so `gather_embedding_batch` packs
q, d_pos and d_neg into ONE gathered tensor (one all_reduce in backward on every rank, whatever
each rank's K or ids), and every rank must run the gather in the same grad mode.

Why a custom autograd Function rather than torch.distributed.nn.functional.all_gather: that one
needs equal sizes on every rank and, off NCCL, emulates reduce-scatter with all_to_all. An
all_reduce of the whole gathered gradient works on every backend; it moves about twice the bytes
of a reduce-scatter, which is negligible for [N, D] embeddings next to the model's gradients.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist

from embedforge.train.losses import EmbeddingBatch

Tensor = torch.Tensor


def is_distributed(group: dist.ProcessGroup | None = None) -> bool:
    """True when torch.distributed is initialised with more than one rank."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size(group) > 1


def _all_gather_padded(t: Tensor, sizes: Sequence[int], group: dist.ProcessGroup | None) -> Tensor:
    """All-gather along dim 0 with per-rank sizes; no autograd. Bool goes over the wire as uint8."""
    wire = t.to(torch.uint8) if t.dtype == torch.bool else t
    longest = max(sizes)
    if wire.shape[0] < longest:
        pad = wire.new_zeros((longest - wire.shape[0], *wire.shape[1:]))
        wire = torch.cat([wire, pad])
    parts = [torch.empty_like(wire) for _ in sizes]
    dist.all_gather(parts, wire.contiguous(), group=group)
    out = torch.cat([part[:size] for part, size in zip(parts, sizes)])
    return out.to(torch.bool) if t.dtype == torch.bool else out


class _AllGatherWithGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, t: Tensor, sizes: tuple[int, ...], group: dist.ProcessGroup | None) -> Tensor:
        rank = dist.get_rank(group)
        ctx.start, ctx.stop, ctx.group = sum(sizes[:rank]), sum(sizes[: rank + 1]), group
        return _all_gather_padded(t, sizes, group)

    @staticmethod
    def backward(ctx, grad: Tensor):
        grad = grad.contiguous().clone()  # all_reduce is in place; autograd may reuse the incoming buffer
        dist.all_reduce(grad, op=dist.ReduceOp.SUM, group=ctx.group)
        return grad[ctx.start : ctx.stop], None, None


def all_gather_sizes(n: int, device: torch.device, group: dist.ProcessGroup | None = None) -> list[int]:
    """Every rank's row count, in rank order ([n] when not distributed)."""
    if not is_distributed(group):
        return [n]
    local = torch.tensor([n], dtype=torch.long, device=device)
    parts = [torch.empty_like(local) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, local, group=group)
    return [int(p.item()) for p in parts]


def all_gather_with_grad(
    t: Tensor, group: dist.ProcessGroup | None = None, sizes: Sequence[int] | None = None
) -> Tensor:
    """Concatenate `t` from every rank along dim 0, in rank order, keeping the gradient.

    Backward: each rank receives the SUM over ranks of the gradient of its own slice (see the module
    docstring for the scale convention). Dim 0 may differ across ranks (pass `sizes` from
    `all_gather_sizes` to skip the size exchange); the other dims must match. Integer and bool
    tensors are gathered too (without gradient). Not distributed: returns `t` itself.
    """
    if not is_distributed(group):
        return t
    if sizes is None:
        sizes = all_gather_sizes(t.shape[0], t.device, group)
    sizes = tuple(int(s) for s in sizes)
    if sizes[dist.get_rank(group)] != t.shape[0]:
        raise ValueError(
            f"sizes {sizes} say this rank has {sizes[dist.get_rank(group)]} rows, tensor has {t.shape[0]}"
        )
    if t.is_floating_point():
        return _AllGatherWithGrad.apply(t, sizes, group)
    return _all_gather_padded(t, sizes, group)


@dataclass(frozen=True)
class GatheredBatch:
    """The candidate pool every rank sees, and where this rank's own rows are in it.

    pool: the gathered `EmbeddingBatch` (rows in rank order, K padded to the largest on any rank).
    anchors: this rank's rows in `pool`; pass to the loss as `anchors=`.
    sizes: rows per rank.
    loss_scale: W * n_rank / N; multiply the loss (a mean over anchors) by it before backward so that
        DDP's gradient average equals the one-process gradient on all N rows. 1.0 for even batches
        and for a single process.
    """

    pool: EmbeddingBatch
    anchors: slice
    sizes: tuple[int, ...]
    loss_scale: float


def gather_embedding_batch(batch: EmbeddingBatch, group: dist.ProcessGroup | None = None) -> GatheredBatch:
    """Gather every rank's rows (embeddings with gradient, ids and masks without) into one pool.

    Collective: every rank must call it, the same number of times, in the same order. Not distributed:
    the pool is `batch` itself with anchors covering all rows.
    """
    n = batch.size
    if not is_distributed(group):
        return GatheredBatch(batch, slice(0, n), (n,), 1.0)
    device = batch.q.device
    # One collective for the layout: rows, negatives, and which ids each rank carries (0 absent,
    # 1 given, 2 not applicable: neg_ids of a rank without negatives).
    neg_ids_state = 1 if batch.neg_ids is not None else (2 if batch.num_negatives == 0 else 0)
    layout = torch.tensor(
        [n, batch.num_negatives, batch.q_ids is not None, batch.pos_ids is not None, neg_ids_state],
        dtype=torch.long,
        device=device,
    )
    parts = [torch.empty_like(layout) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, layout, group=group)
    table = torch.stack(parts).tolist()
    sizes = tuple(row[0] for row in table)
    k_max = max(row[1] for row in table)
    for column, name in ((2, "q_ids"), (3, "pos_ids")):
        if len({row[column] for row in table}) > 1:
            raise ValueError(f"{name} given on some ranks and not others; give them on all or none")
    neg_states = {row[4] for row in table}
    if 0 in neg_states and 1 in neg_states:
        raise ValueError("neg_ids given on some ranks and not others; give them on all or none")
    with_neg_ids = 1 in neg_states

    # Pack the embeddings into ONE tensor so the backward runs exactly one all_reduce on every rank,
    # whatever each rank's K or ids: collectives in backward must match across ranks one for one.
    d_neg, neg_mask = _pad_negatives(batch, k_max)
    packed = torch.cat([batch.q.unsqueeze(1), batch.d_pos.unsqueeze(1), d_neg], dim=1)
    packed = all_gather_with_grad(packed, group, sizes)
    zeros = torch.zeros(n, dtype=torch.long, device=device)
    neg_ids = (
        batch.neg_ids
        if batch.neg_ids is not None
        else torch.zeros(n, batch.num_negatives, dtype=torch.long, device=device)
    )
    neg_ids = torch.cat([neg_ids, neg_ids.new_zeros((n, k_max - batch.num_negatives))], dim=1)
    labels = torch.cat(
        [
            (batch.q_ids if batch.q_ids is not None else zeros).unsqueeze(1),
            (batch.pos_ids if batch.pos_ids is not None else zeros).unsqueeze(1),
            neg_ids,
            neg_mask.long(),
        ],
        dim=1,
    )
    labels = all_gather_with_grad(labels, group, sizes)
    first = table[0]
    pool = EmbeddingBatch(
        q=packed[:, 0],
        d_pos=packed[:, 1],
        d_neg=packed[:, 2:] if k_max else None,
        neg_mask=labels[:, 2 + k_max :].bool() if k_max else None,
        q_ids=labels[:, 0] if first[2] else None,
        pos_ids=labels[:, 1] if first[3] else None,
        neg_ids=labels[:, 2 : 2 + k_max] if with_neg_ids and k_max else None,
    )
    rank, total = dist.get_rank(group), sum(sizes)
    start = sum(sizes[:rank])
    scale = len(sizes) * n / total if total else 1.0
    return GatheredBatch(pool, slice(start, start + n), sizes, scale)


def _pad_negatives(batch: EmbeddingBatch, k_max: int) -> tuple[Tensor, Tensor]:
    """d_neg [n, k_max, D] and neg_mask [n, k_max]; padding rows are zeros and masked out."""
    n, k, dim = batch.size, batch.num_negatives, batch.dim
    d_neg = batch.d_neg if batch.d_neg is not None else batch.q.new_zeros((n, 0, dim))
    mask = (
        batch.neg_mask
        if batch.neg_mask is not None
        else torch.ones(n, k, dtype=torch.bool, device=batch.q.device)
    )
    extra = k_max - k
    return (
        torch.cat([d_neg, d_neg.new_zeros((n, extra, dim))], dim=1),
        torch.cat([mask, mask.new_zeros((n, extra))], dim=1),
    )

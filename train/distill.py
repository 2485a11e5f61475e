"""Distillation from a reranker into an embedder: margin-MSE (GPL) and list-wise KL, on tensors.

A mined row carries `teacher_scores = [t(q, d+), t(q, d1-), ..., t(q, dK-)]` (data_synth.mine with a
teacher): a cross-encoder's or yes/no reranker's log-odds for the positive and each hard negative.
The student's score for the same pair is its cosine similarity divided by the temperature tau,

    s(q, d) = cos(q, d) / tau,

for two reasons. A cosine lives in [-1, 1], so its margins are at most 2 while a reranker's log-odds
margins are routinely 5 or 10: matching raw cosine margins to them would ask for the impossible and
saturate the gradient. And cos / tau is exactly the logit the InfoNCE softmax already trains
(train.losses.qwen3_infonce), so the distillation term and the contrastive term speak about the same
numbers: adding them is adding two views of one score. (GPL's students score with an unbounded dot
product and need no such scale.) The teacher's scores are divided by `teacher_temperature` T_t,
which sets how many student logits one teacher log-odd is worth; `matching_teacher_temperature`
picks T_t from the data (the ratio of the two margin spreads) when there is no better choice.

Missing entries: a hard negative is used when `neg_mask` marks it real AND its teacher score and the
row's positive teacher score are finite; NaN marks a score the teacher did not give (padding, a row
from a dataset without teacher scores). Both losses are means over rows, like the InfoNCE, so they
add to it row by row and the distributed loss scale (train.distributed) applies to them unchanged;
a row with no usable negative contributes 0.

References: Hofstätter et al. 2020, "Improving Efficient Neural Ranking Models with Cross-Architecture
Knowledge Distillation" (margin-MSE); Wang et al. 2022, "GPL: Generative Pseudo Labeling for
Unsupervised Domain Adaptation of Dense Retrieval"; Ren et al. 2021, RocketQAv2 (list-wise KL).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from embedforge.train.losses import EmbeddingBatch, LossOutput

Tensor = torch.Tensor


def _scores(batch: EmbeddingBatch, teacher: Tensor, temperature: float, teacher_temperature: float):
    """Student logits [N, 1+K], teacher logits [N, 1+K] (NaN filled with 0) and the valid mask [N, K]."""
    if not temperature > 0 or not teacher_temperature > 0:
        raise ValueError(f"temperatures must be > 0, got temperature={temperature}, "
                         f"teacher_temperature={teacher_temperature}")
    n, k = batch.size, batch.num_negatives
    if tuple(teacher.shape) != (n, 1 + k):
        raise ValueError(f"teacher scores must be [N={n}, 1+K={1 + k}] (positive first), got {tuple(teacher.shape)}")
    dtype = torch.promote_types(batch.q.dtype, torch.float32)  # tau amplifies bf16 rounding
    q = F.normalize(batch.q.to(dtype), dim=-1)
    docs = F.normalize(batch.d_pos.to(dtype), dim=-1).unsqueeze(1)
    if k:
        docs = torch.cat([docs, F.normalize(batch.d_neg.to(dtype), dim=-1)], dim=1)
    student = torch.einsum("nd,nkd->nk", q, docs) / temperature
    teacher = teacher.to(device=student.device, dtype=dtype)
    finite = torch.isfinite(teacher)
    valid = finite[:, 1:] & finite[:, :1]
    if batch.neg_mask is not None:
        valid = valid & batch.neg_mask.to(student.device)
    return student, teacher.nan_to_num(0.0, posinf=0.0, neginf=0.0) / teacher_temperature, valid


def margin_mse_loss(batch: EmbeddingBatch, teacher: Tensor, *, temperature: float,
                    teacher_temperature: float = 1.0) -> LossOutput:
    """Margin-MSE (Hofstätter et al. 2020; the GPL objective), mean over rows:

        L = (1/N) sum_i (1/|V_i|) sum_{k in V_i} ((s(q_i,d_i+) - s(q_i,d_ik-)) - (t_i+ - t_ik) / T_t)^2

    with s = cos / temperature and V_i the row's usable negatives (module docstring).

    Args:
        batch: the rows' embeddings (q, d_pos, d_neg, neg_mask); ids are not needed.
        teacher: [N, 1+K] teacher scores, the positive's first; NaN = missing.
        temperature: the student's tau (use the InfoNCE's, so both terms read the same logits).
        teacher_temperature: T_t, teacher log-odds per student logit.

    Stats: `teacher_margin` and `student_margin` (means over usable pairs, student in logits),
    `margin_agreement` (share of pairs where student and teacher rank the two documents alike),
    `pairs` (usable pairs per row).
    """
    student, scaled, valid = _scores(batch, teacher, temperature, teacher_temperature)
    s_margin = student[:, :1] - student[:, 1:]
    t_margin = scaled[:, :1] - scaled[:, 1:]
    squared = (s_margin - t_margin).square().masked_fill(~valid, 0.0)
    counts = valid.sum(1)
    loss = (squared.sum(1) / counts.clamp(min=1)).sum() / max(batch.size, 1)
    with torch.no_grad():
        pairs = counts.sum().clamp(min=1)
        agree = ((s_margin > 0) == (t_margin > 0)) & valid
        stats = {
            "teacher_margin": t_margin.masked_fill(~valid, 0.0).sum() / pairs,
            "student_margin": s_margin.masked_fill(~valid, 0.0).sum() / pairs,
            "margin_agreement": agree.sum() / pairs,
            "pairs": counts.sum() / max(batch.size, 1),
        }
    return LossOutput(loss, {key: value.detach().float() for key, value in stats.items()})


def kl_distill_loss(batch: EmbeddingBatch, teacher: Tensor, *, temperature: float,
                    teacher_temperature: float = 1.0) -> LossOutput:
    """List-wise KL(teacher || student) over each row's [positive, usable negatives], mean over rows:

        p_t = softmax(t_i / T_t),  p_s = softmax(cos(q_i, .) / temperature)
        L = (1/N) sum_i sum_c p_t(c) (log p_t(c) - log p_s(c))

    Not multiplied by temperature^2 (as Hinton et al. and sentence-transformers' DistillKLDivLoss
    do): there the temperature softens logits that are already on the logit scale, here tau is what
    puts cosines on it, and dL/dcos = (p_s - p_t) / tau is then the same size as the InfoNCE's own
    gradient. A row with no usable negative has one candidate and contributes 0.

    Args and the masking rules: as `margin_mse_loss`.

    Stats: `top1_agreement` (the student's best candidate is the teacher's), `teacher_p_positive`
    (the teacher's probability on the positive), `pairs`.
    """
    student, scaled, valid = _scores(batch, teacher, temperature, teacher_temperature)
    keep = torch.cat([torch.ones_like(valid[:, :1]), valid], dim=1)
    log_ps = student.masked_fill(~keep, float("-inf")).log_softmax(dim=1).masked_fill(~keep, 0.0)
    log_pt = scaled.masked_fill(~keep, float("-inf")).log_softmax(dim=1).masked_fill(~keep, 0.0)
    p_t = log_pt.exp() * keep
    loss = (p_t * (log_pt - log_ps)).sum() / max(batch.size, 1)
    with torch.no_grad():
        top_s = student.masked_fill(~keep, float("-inf")).argmax(1)
        top_t = scaled.masked_fill(~keep, float("-inf")).argmax(1)
        has_pair = valid.any(1)
        rows = has_pair.sum().clamp(min=1)
        stats = {
            "top1_agreement": ((top_s == top_t) & has_pair).sum() / rows,
            "teacher_p_positive": (p_t[:, 0] * has_pair).sum() / rows,
            "pairs": valid.sum() / max(batch.size, 1),
        }
    return LossOutput(loss, {key: value.detach().float() for key, value in stats.items()})


DISTILL_LOSSES = {"margin_mse": margin_mse_loss, "kl": kl_distill_loss}


def usable_margins(batch: EmbeddingBatch, teacher: Tensor, *, temperature: float) -> tuple[Tensor, Tensor]:
    """(teacher margins, student margins), 1-D over the usable pairs (module docstring): the
    teacher's in its own units, the student's in logits (cos / temperature); the input of
    `matching_teacher_temperature`."""
    student, scores, valid = _scores(batch, teacher, temperature, 1.0)
    return (scores[:, :1] - scores[:, 1:])[valid], (student[:, :1] - student[:, 1:])[valid]


def matching_teacher_temperature(teacher_margins: Tensor, student_margins: Tensor) -> float:
    """T_t that gives the teacher's margins the spread of the student's: std(teacher) / std(student).

    Both are margins (positive minus negative) over the same usable pairs, the student's in logits
    (cos / tau) as the model to be trained scores them before training. Chosen from the training rows
    alone, with no relevance labels; a teacher whose margins do not vary is an error.
    """
    t = teacher_margins.double().flatten()
    s = student_margins.double().flatten()
    if t.numel() != s.numel() or t.numel() < 2:
        raise ValueError(f"need the same number (>= 2) of teacher and student margins, got {t.numel()}, {s.numel()}")
    t_std, s_std = float(t.std()), float(s.std())
    if not t_std > 0 or not s_std > 0:
        raise ValueError(f"margins without spread (teacher std {t_std:g}, student std {s_std:g})")
    return t_std / s_std

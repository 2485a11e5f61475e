"""Reranker-to-embedder distillation losses (train/distill.py) against a row-by-row transcription of
their formulas, sentence-transformers' MarginMSELoss / DistillKLDivLoss, and finite differences."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from embedforge.train.distill import kl_distill_loss, margin_mse_loss, matching_teacher_temperature
from embedforge.train.losses import EmbeddingBatch

torch.set_num_threads(1)

N, K, D = 6, 4, 16
TAU, T_T = 0.05, 2.0


def make_problem(dtype=torch.float64, seed=0, masked=True):
    """Embeddings with gradient, teacher log-odds, and (when masked) the missing-entry cases:
    padded negatives (neg_mask False), a NaN teacher score for one negative, a row whose positive has
    no teacher score (all its pairs unusable), and a row with no real negative at all."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(N, D, generator=g, dtype=torch.float64)
    pos = q + 0.8 * torch.randn(N, D, generator=g, dtype=torch.float64)
    neg = q.unsqueeze(1) + 1.2 * torch.randn(N, K, D, generator=g, dtype=torch.float64)
    teacher = 4.0 * torch.randn(N, 1 + K, generator=g, dtype=torch.float64)
    teacher[:, 0] += 3.0
    mask = torch.ones(N, K, dtype=torch.bool)
    if masked:
        mask[1, 2:] = False  # padding
        mask[4, :] = False  # a row without negatives
        teacher[2, 3] = float("nan")  # the teacher skipped one negative
        teacher[3, 0] = float("nan")  # no teacher score for the positive: the whole row is unusable
        teacher[1, 3:] = float("nan")  # padding usually carries no score either
    tensors = [t.to(dtype).requires_grad_(True) for t in (q, pos, neg)]
    return tensors, teacher.to(dtype), mask


def batch_of(q, pos, neg, mask):
    return EmbeddingBatch(q=q, d_pos=pos, d_neg=neg, neg_mask=mask)


# --------------------------------------------------------------------------- transcriptions
def cos(a, b):
    dot = sum(a[j] * b[j] for j in range(len(a)))
    return dot / (torch.sqrt(sum(a[j] * a[j] for j in range(len(a)))) * torch.sqrt(sum(b[j] * b[j] for j in range(len(b)))))


def usable(teacher, mask, i):
    if math.isnan(float(teacher[i, 0])):
        return []
    return [k for k in range(K) if bool(mask[i, k]) and not math.isnan(float(teacher[i, 1 + k]))]


def margin_mse_reference(q, pos, neg, teacher, mask, tau=TAU, t_t=T_T):
    """(1/N) sum_i mean_{k usable} ((s+ - s_k) - (t+ - t_k)/T_t)^2, s = cos / tau, one row at a time."""
    total = 0.0
    for i in range(N):
        ks = usable(teacher, mask, i)
        if not ks:
            continue
        s_pos = cos(q[i], pos[i]) / tau
        row = 0.0
        for k in ks:
            s_neg = cos(q[i], neg[i, k]) / tau
            t_margin = (float(teacher[i, 0]) - float(teacher[i, 1 + k])) / t_t
            row = row + ((s_pos - s_neg) - t_margin) ** 2
        total = total + row / len(ks)
    return total / N


def kl_reference(q, pos, neg, teacher, mask, tau=TAU, t_t=T_T):
    """(1/N) sum_i sum_c p_t(c) log(p_t(c) / p_s(c)) over [positive, usable negatives]."""
    total = 0.0
    for i in range(N):
        ks = usable(teacher, mask, i)
        if not ks:
            continue  # one candidate: both distributions are [1]
        s = [cos(q[i], pos[i]) / tau] + [cos(q[i], neg[i, k]) / tau for k in ks]
        t = [float(teacher[i, 0]) / t_t] + [float(teacher[i, 1 + k]) / t_t for k in ks]
        s_max, t_max = max(float(x.detach()) for x in s), max(t)
        log_zs = s_max + torch.log(sum(torch.exp(x - s_max) for x in s))
        log_zt = t_max + math.log(sum(math.exp(x - t_max) for x in t))
        for s_c, t_c in zip(s, t):
            p_t = math.exp(t_c - log_zt)
            total = total + p_t * ((t_c - log_zt) - (s_c - log_zs))
    return total / N


def grads(loss, tensors):
    return torch.autograd.grad(loss, tensors)


def tolerance(dtype, scale):
    """Worst-case rounding of a D-term dot product is about D * eps relative; the temperature then
    multiplies the cosine's error by 1/tau, and the few operations after it (normalisation, margins,
    square or softmax) add a small constant factor (8 here). `scale` is the size of the compared values."""
    return 8 * D * torch.finfo(dtype).eps / TAU * scale


# --------------------------------------------------------------------------- tests
@pytest.mark.parametrize("loss_fn,reference", [(margin_mse_loss, margin_mse_reference), (kl_distill_loss, kl_reference)])
def test_loss_and_gradients_equal_a_row_by_row_transcription_with_missing_negatives(loss_fn, reference):
    (q, pos, neg), teacher, mask = make_problem()
    out = loss_fn(batch_of(q, pos, neg, mask), teacher, temperature=TAU, teacher_temperature=T_T)
    ref = reference(q, pos, neg, teacher, mask)
    assert float(ref.detach()) > 0.1  # a problem where the loss is not trivially zero
    scale = abs(float(ref.detach()))
    assert float(out.loss.detach()) == pytest.approx(float(ref.detach()), abs=tolerance(torch.float64, scale))
    for got, want in zip(grads(out.loss, [q, pos, neg]), grads(ref, [q, pos, neg])):
        atol = tolerance(torch.float64, float(want.abs().max()))
        torch.testing.assert_close(got, want, rtol=0, atol=atol)
    # the unusable entries receive no gradient at all
    g_neg = grads(loss_fn(batch_of(q, pos, neg, mask), teacher, temperature=TAU, teacher_temperature=T_T).loss,
                  [neg])[0]
    assert torch.all(g_neg[1, 2:] == 0) and torch.all(g_neg[4] == 0) and torch.all(g_neg[2, 2] == 0)
    assert torch.all(g_neg[3] == 0)


def test_margin_mse_equals_sentence_transformers_with_cosine_over_tau():
    from sentence_transformers.sentence_transformer.losses import MarginMSELoss
    from sentence_transformers.util import pairwise_cos_sim

    (q, pos, neg), teacher, mask = make_problem(masked=False)
    ours = margin_mse_loss(batch_of(q, pos, neg, mask), teacher, temperature=TAU, teacher_temperature=T_T)
    st = MarginMSELoss(None, similarity_fct=lambda a, b: pairwise_cos_sim(a, b) / TAU)
    theirs = st.compute_loss_from_embeddings([q, pos, *neg.unbind(1)], teacher / T_T)
    scale = float(theirs)
    assert float(ours.loss) == pytest.approx(float(theirs), abs=tolerance(torch.float64, scale))
    for got, want in zip(grads(ours.loss, [q, pos, neg]), grads(theirs, [q, pos, neg])):
        torch.testing.assert_close(got, want, rtol=0, atol=tolerance(torch.float64, float(want.abs().max())))


def test_kl_equals_sentence_transformers_without_its_temperature_squared():
    from sentence_transformers.sentence_transformer.losses import DistillKLDivLoss
    from sentence_transformers.util import pairwise_cos_sim

    (q, pos, neg), teacher, mask = make_problem(masked=False)
    ours = kl_distill_loss(batch_of(q, pos, neg, mask), teacher, temperature=TAU, teacher_temperature=T_T)
    st = DistillKLDivLoss(None, similarity_fct=pairwise_cos_sim, student_temperature=TAU, teacher_temperature=T_T)
    theirs = st.compute_loss_from_embeddings([q, pos, *neg.unbind(1)], teacher) / TAU**2
    assert float(ours.loss) == pytest.approx(float(theirs), abs=tolerance(torch.float64, float(theirs)))
    for got, want in zip(grads(ours.loss, [q, pos, neg]), grads(theirs, [q, pos, neg])):
        torch.testing.assert_close(got, want, rtol=0, atol=tolerance(torch.float64, float(want.abs().max())))


@pytest.mark.parametrize("loss_fn", [margin_mse_loss, kl_distill_loss])
def test_float32_stays_within_the_rounding_bound_of_float64(loss_fn):
    (q64, pos64, neg64), teacher, mask = make_problem()
    (q32, pos32, neg32), _, _ = make_problem(dtype=torch.float32)
    ref = loss_fn(batch_of(q64, pos64, neg64, mask), teacher, temperature=TAU, teacher_temperature=T_T)
    got = loss_fn(batch_of(q32, pos32, neg32, mask), teacher.float(), temperature=TAU, teacher_temperature=T_T)
    assert got.loss.dtype == torch.float32
    # The inputs were rounded to float32 too (relative eps32), which the bound's D * eps covers.
    assert float(got.loss) == pytest.approx(float(ref.loss), abs=tolerance(torch.float32, float(ref.loss)))
    for g32, g64 in zip(grads(got.loss, [q32, pos32, neg32]), grads(ref.loss, [q64, pos64, neg64])):
        torch.testing.assert_close(g32.double(), g64, rtol=0, atol=tolerance(torch.float32, float(g64.abs().max())))


@pytest.mark.parametrize("loss_fn", [margin_mse_loss, kl_distill_loss])
def test_gradients_match_finite_differences(loss_fn):
    (q, pos, neg), teacher, mask = make_problem()

    def f(q, pos, neg):
        return loss_fn(batch_of(q, pos, neg, mask), teacher, temperature=TAU, teacher_temperature=T_T).loss

    assert torch.autograd.gradcheck(f, (q, pos, neg), eps=1e-6, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("loss_fn", [margin_mse_loss, kl_distill_loss])
def test_zero_loss_and_gradient_when_the_student_already_agrees(loss_fn):
    (q, pos, neg), _, mask = make_problem()
    with torch.no_grad():
        docs = torch.cat([pos.unsqueeze(1), neg], dim=1)
        student = torch.nn.functional.cosine_similarity(q.unsqueeze(1), docs, dim=-1) / TAU
    teacher = student * T_T + 7.0  # same margins / same softmax after dividing by T_t; offset is irrelevant
    out = loss_fn(batch_of(q, pos, neg, mask), teacher, temperature=TAU, teacher_temperature=T_T)
    assert abs(float(out.loss)) < 1e-12
    for g in grads(out.loss, [q, pos, neg]):
        assert float(g.abs().max()) < 1e-9


def test_statistics_count_usable_pairs_and_agreement():
    (q, pos, neg), teacher, mask = make_problem()
    out = margin_mse_loss(batch_of(q, pos, neg, mask), teacher, temperature=TAU, teacher_temperature=T_T)
    pairs, agree = 0, 0
    for i in range(N):
        for k in usable(teacher, mask, i):
            pairs += 1
            s = float(cos(q[i], pos[i]) - cos(q[i], neg[i, k]))
            agree += (s > 0) == (float(teacher[i, 0] - teacher[i, 1 + k]) > 0)
    assert float(out.stats["pairs"]) == pytest.approx(pairs / N)
    assert float(out.stats["margin_agreement"]) == pytest.approx(agree / pairs)
    assert pairs == N * K - 2 - K - 1 - K  # padding 2, row 4 empty, one NaN negative, row 3 unusable


def test_matching_teacher_temperature_equalises_the_spreads():
    g = torch.Generator().manual_seed(1)
    student = torch.randn(200, generator=g, dtype=torch.float64) * 3.0
    teacher = torch.randn(200, generator=g, dtype=torch.float64) * 0.4 + 1.0
    t_t = matching_teacher_temperature(teacher, student)
    assert float((teacher / t_t).std()) == pytest.approx(float(student.std()), rel=1e-12)
    with pytest.raises(ValueError, match="without spread"):
        matching_teacher_temperature(torch.ones(5), student[:5])
    with pytest.raises(ValueError, match="same number"):
        matching_teacher_temperature(teacher, student[:3])


def test_bad_shapes_and_temperatures_are_refused():
    (q, pos, neg), teacher, mask = make_problem()
    batch = batch_of(q, pos, neg, mask)
    with pytest.raises(ValueError, match=r"1\+K=5"):
        margin_mse_loss(batch, teacher[:, :3], temperature=TAU)
    with pytest.raises(ValueError, match="temperatures must be > 0"):
        kl_distill_loss(batch, teacher, temperature=0.0)
    # no hard negatives: a [N, 1] teacher is accepted and the loss is exactly 0
    out = margin_mse_loss(EmbeddingBatch(q=q, d_pos=pos), teacher[:, :1], temperature=TAU)
    assert float(out.loss) == 0.0


@pytest.mark.parametrize("loss_fn", [margin_mse_loss, kl_distill_loss])
def test_a_tiny_qwen3_embedder_learns_the_teachers_ranking(loss_fn, tiny_qwen3_embedder, tiny_qwen3_lm):
    """End to end on real (tiny) models: the tiny Qwen3 reranker's log-odds label each row's
    documents, and a few optimizer steps on the distillation loss alone move the tiny embedder's
    ranking toward the teacher's (loss down, pairwise agreement up)."""
    from embedforge.data_synth.teacher import TeacherScorer
    from embedforge.embedder import Embedder
    from embedforge.reranker import Reranker

    torch.manual_seed(0)
    words = ["river", "violin", "taxes", "rocket", "bread", "chess", "volcano", "tennis"]
    queries = [f"where is the {w}" for w in words[:6]]
    docs = [[f"the {words[(i + j) % 8]} is {j} miles away" for j in range(4)] for i in range(6)]
    teacher = TeacherScorer(Reranker.from_pretrained(tiny_qwen3_lm, dtype="float32"))
    scores = torch.tensor(np.asarray([teacher.log_odds([q] * 4, d) for q, d in zip(queries, docs)]),
                          dtype=torch.float64)
    embedder = Embedder.from_pretrained(tiny_qwen3_embedder, dtype="float32")
    embedder.model.train()
    optimizer = torch.optim.Adam(embedder.model.parameters(), lr=3e-3)
    flat = queries + [d for row in docs for d in row]
    features = embedder.tokenize(flat, max_length=32)
    spread = float((scores[:, :1] - scores[:, 1:]).std())

    def step():
        e = embedder.embed(features)
        batch = EmbeddingBatch(q=e[:6], d_pos=e[6::4], d_neg=e[6:].view(6, 4, -1)[:, 1:])
        return loss_fn(batch, scores, temperature=TAU, teacher_temperature=spread / 2)

    first = step()
    for _ in range(25):
        out = step()
        optimizer.zero_grad()
        out.loss.backward()
        optimizer.step()
    last = step()
    assert float(last.loss.detach()) < 0.5 * float(first.loss.detach())
    key = "margin_agreement" if loss_fn is margin_mse_loss else "top1_agreement"
    assert float(last.stats[key]) > float(first.stats[key])

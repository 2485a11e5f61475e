"""The Qwen3 InfoNCE, Matryoshka and reranker losses against direct transcriptions of their
formulas, written here with Python loops and independent of the implementation."""

from __future__ import annotations

import hashlib
import itertools
import math

import pytest
import torch
from train_workers.precision import reorder_rtol

from embedforge.train.losses import (
    EmbeddingBatch,
    MatryoshkaLoss,
    Qwen3InfoNCEConfig,
    listwise_loss,
    pointwise_yes_no_loss,
    qwen3_infonce,
    text_hashes,
)

torch.set_num_threads(1)


def loss_rtol(dtype: torch.dtype, n: int, k: int, dim: int, tau: float) -> float:
    """How far two evaluations of the InfoNCE loss in `dtype` may differ (train_workers/precision.py):
    cosines sum `dim` products, a row's denominator sums at most its 2n + nk candidates, and the
    similarities are scaled by 1 / tau before the exponential, which multiplies their error."""
    return reorder_rtol(dtype, dim + 2 * n + n * k) / tau


def infonce_grad_atol(rtol: float, tau: float, rows: int, *tensors: torch.Tensor) -> float:
    """Absolute tolerance of a gradient entry of the InfoNCE loss: an entry sums terms
    (p_j - [j is the positive]) / (rows * tau) * d cos_j / dx, whose magnitudes add up to at most
    2 / (rows * tau * min |x|) (softmax weights sum to 1, and |d cos / dx| <= 1 / |x|); the rounding is
    relative to that sum, not to the entry, which can cancel to nearly zero."""
    smallest = min(float(t.norm(dim=-1)[t.norm(dim=-1) > 0].min()) for t in tensors if t.numel())
    return rtol * 2 / (rows * tau * smallest)


def assert_same_grads(pairs, atol: float) -> None:
    for mine, theirs in pairs:
        if theirs.grad is None:  # a tensor the loss does not read, in both
            assert mine.grad is None
            continue
        torch.testing.assert_close(mine.grad.double(), theirs.grad.double(), rtol=0, atol=atol)


# --------------------------------------------------------------------------- reference (Eq. 1)
def cos(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (a * b).sum() / (a.norm() * b.norm())


def eq1_reference(
    q,
    p,
    neg,
    valid,
    q_ids,
    pos_ids,
    neg_ids,
    *,
    tau=0.1,
    hard=True,
    qq=True,
    dd=True,
    qd=True,
    margin=0.1,
    dedup=True,
    exempt=False,
    anchors=None,
):
    """Report Eq. 1 term by term. In-batch documents d_j are the other rows' positives and their valid
    hard negatives; m = 0 for a candidate more similar than s(q_i, d_i+) + margin, or whose text is
    d_i+'s (a query candidate also when its text is q_i's)."""
    n, k = q.shape[0], (0 if neg is None else neg.shape[1])
    docs = [(j, p[j], pos_ids[j]) for j in range(n)]
    docs += [(j, neg[j, kk], neg_ids[j][kk]) for j in range(n) for kk in range(k) if valid[j][kk]]
    anchors = range(n) if anchors is None else anchors
    total = 0.0
    for i in anchors:
        s_pos = cos(q[i], p[i])

        def m(s, text_ids, margin_applies=True, i=i, s_pos=s_pos):
            if dedup and pos_ids[i] in text_ids:
                return 0.0
            if margin is not None and margin_applies and s.item() > s_pos.item() + margin:
                return 0.0
            return 1.0

        z = torch.exp(s_pos / tau)
        if hard:
            for kk in range(k):
                if valid[i][kk]:
                    s = cos(q[i], neg[i, kk])
                    z = z + m(s, [neg_ids[i][kk]], margin_applies=not exempt) * torch.exp(s / tau)
        for j in range(n):
            if qq and j != i:
                s = cos(q[i], q[j])
                same_query = dedup and q_ids[j] == q_ids[i]
                z = z + (0.0 if same_query else m(s, [q_ids[j]])) * torch.exp(s / tau)
        for j, d, d_id in docs:
            if j == i:
                continue
            if dd:
                s = cos(p[i], d)
                z = z + m(s, [d_id]) * torch.exp(s / tau)
            if qd:
                s = cos(q[i], d)
                z = z + m(s, [d_id]) * torch.exp(s / tau)
        total = total - torch.log(torch.exp(s_pos / tau) / z)
    return total / len(anchors)


def make_problem(n=5, k=3, dim=8, seed=0, dtype=torch.float64):
    """Queries, positives near their query, negatives nearer than random: some masks trigger."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(n, dim, generator=g, dtype=dtype)
    p = q + 0.9 * torch.randn(n, dim, generator=g, dtype=dtype)
    neg = q.unsqueeze(1) + 1.1 * torch.randn(n, k, dim, generator=g, dtype=dtype)
    valid = torch.ones(n, k, dtype=torch.bool)
    q_ids = torch.arange(100, 100 + n)
    pos_ids = torch.arange(200, 200 + n)
    neg_ids = torch.arange(300, 300 + n * k).view(n, k)
    return q, p, neg, valid, q_ids, pos_ids, neg_ids


def leaves(*tensors):
    return [t.clone().requires_grad_() for t in tensors]


def assert_matches(cfg: Qwen3InfoNCEConfig, q, p, neg, valid, q_ids, pos_ids, neg_ids, anchors=None):
    """Loss and gradients (w.r.t. q, p, neg) of the implementation equal the reference's."""
    qa, pa, na = leaves(q, p, neg)
    batch = EmbeddingBatch(qa, pa, na, valid, q_ids, pos_ids, neg_ids)
    out = qwen3_infonce(batch, cfg, anchors=None if anchors is None else slice(anchors[0], anchors[-1] + 1))
    out.loss.backward()
    qb, pb, nb = leaves(q, p, neg)
    ref = eq1_reference(
        qb,
        pb,
        nb,
        valid.tolist(),
        q_ids.tolist(),
        pos_ids.tolist(),
        neg_ids.tolist(),
        tau=cfg.temperature,
        hard=cfg.use_hard_negatives,
        qq=cfg.use_qq,
        dd=cfg.use_dd,
        qd=cfg.use_qd,
        margin=cfg.margin,
        dedup=cfg.mask_duplicates,
        exempt=cfg.exempt_hard_negatives_from_margin,
        anchors=anchors,
    )
    ref.backward()
    tolerance = loss_rtol(torch.float64, *neg.shape, cfg.temperature)
    torch.testing.assert_close(out.loss, ref.detach(), rtol=tolerance, atol=0)
    rows = len(anchors) if anchors is not None else q.shape[0]
    atol = infonce_grad_atol(tolerance, cfg.temperature, max(rows, 1), q, p, neg[valid] if valid is not None else neg)
    assert_same_grads(((qa, qb), (pa, pb), (na, nb)), atol)
    return out


# --------------------------------------------------------------------------- Eq. 1 tests
@pytest.mark.parametrize("hard,qq,dd,qd", list(itertools.product([True, False], repeat=4)))
def test_each_term_switch_matches_eq1(hard, qq, dd, qd):
    cfg = Qwen3InfoNCEConfig(use_hard_negatives=hard, use_qq=qq, use_dd=dd, use_qd=qd)
    assert_matches(cfg, *make_problem(seed=1))


@pytest.mark.parametrize("tau", [0.02, 0.05, 0.1, 1.0])
def test_temperature_matches_eq1(tau):
    assert_matches(Qwen3InfoNCEConfig(temperature=tau), *make_problem(seed=2))


def test_default_temperature_is_documented_value():
    assert Qwen3InfoNCEConfig().temperature == 0.1
    assert Qwen3InfoNCEConfig().exempt_hard_negatives_from_margin is False


def test_margin_mask_triggers_and_matches_eq1():
    q, p, neg, valid, q_ids, pos_ids, neg_ids = make_problem(n=4, k=2, seed=3)
    # Row 0: a hard negative almost equal to its query (s ~ 1 > s_pos + 0.1) and an in-batch query
    # (row 1's) nearly equal to query 0.
    neg[0, 0] = q[0] + 1e-3
    q[1] = q[0] + 0.05 * torch.randn(q.shape[1], dtype=q.dtype)
    cfg = Qwen3InfoNCEConfig(margin=0.1)
    out = assert_matches(cfg, q, p, neg, valid, q_ids, pos_ids, neg_ids)
    assert out.stats["masked_margin"] > 0
    assert out.stats["hard_neg_masked_margin"] >= 0.25  # at least row 0's hard negative, over 4 rows
    no_margin = assert_matches(Qwen3InfoNCEConfig(margin=None), q, p, neg, valid, q_ids, pos_ids, neg_ids)
    assert no_margin.stats["masked_margin"] == 0
    assert no_margin.loss > out.loss  # the masked near-duplicates were huge terms of Z


@pytest.mark.parametrize("margin", [0.0, 0.1, 0.3])
def test_margin_values_match_eq1(margin):
    assert_matches(Qwen3InfoNCEConfig(margin=margin), *make_problem(seed=4))


def test_hard_negative_exemption():
    q, p, neg, valid, q_ids, pos_ids, neg_ids = make_problem(n=4, k=2, seed=5)
    neg[2, 1] = q[2] + 1e-3  # far above the margin
    masked = assert_matches(Qwen3InfoNCEConfig(), q, p, neg, valid, q_ids, pos_ids, neg_ids)
    exempt = assert_matches(
        Qwen3InfoNCEConfig(exempt_hard_negatives_from_margin=True), q, p, neg, valid, q_ids, pos_ids, neg_ids
    )
    assert masked.stats["hard_neg_masked_margin"] > 0
    assert exempt.stats["hard_neg_masked_margin"] == 0
    assert exempt.loss > masked.loss


def test_duplicate_texts_are_masked():
    q, p, neg, valid, q_ids, pos_ids, neg_ids = make_problem(n=5, k=2, seed=6)
    pos_ids[3] = pos_ids[0]  # two queries share one positive document text
    neg_ids[1, 0] = pos_ids[1]  # a "negative" that is the positive's text (resampling accident)
    neg_ids[4, 1] = pos_ids[2]  # another row's negative is row 2's positive text
    q_ids[2] = q_ids[1]  # a duplicated query
    cfg = Qwen3InfoNCEConfig(margin=None)
    out = assert_matches(cfg, q, p, neg, valid, q_ids, pos_ids, neg_ids)
    # Row 0: row 3's positive in dd and qd (2). Row 3: row 0's positive (2). Row 1: own negative (1),
    # q_2 as a duplicate query (1). Row 2: row 4's negative in dd and qd (2), q_1 (1). Total 9 over 5 rows.
    assert out.stats["masked_duplicate"].item() == pytest.approx(9 / 5, rel=reorder_rtol(torch.float32, 5))
    off = assert_matches(
        Qwen3InfoNCEConfig(margin=None, mask_duplicates=False), q, p, neg, valid, q_ids, pos_ids, neg_ids
    )
    assert off.stats["masked_duplicate"] == 0
    assert not torch.isclose(off.loss, out.loss)


def test_duplicate_masking_applies_to_exempt_hard_negatives():
    q, p, neg, valid, q_ids, pos_ids, neg_ids = make_problem(n=3, k=2, seed=7)
    neg_ids[0, 1] = pos_ids[0]
    cfg = Qwen3InfoNCEConfig(exempt_hard_negatives_from_margin=True, use_qq=False, use_dd=False, use_qd=False)
    out = assert_matches(cfg, q, p, neg, valid, q_ids, pos_ids, neg_ids)
    assert out.stats["effective_negatives"].item() == pytest.approx(5 / 3, rel=reorder_rtol(torch.float32, 3))


def test_missing_ids_are_an_error_not_a_skipped_check():
    q, p, neg, valid, q_ids, pos_ids, neg_ids = make_problem(n=3, k=2)
    with pytest.raises(ValueError, match="pos_ids"):
        qwen3_infonce(EmbeddingBatch(q, p, neg, valid, q_ids, None, neg_ids))
    with pytest.raises(ValueError, match="neg_ids"):
        qwen3_infonce(EmbeddingBatch(q, p, neg, valid, q_ids, pos_ids, None))
    with pytest.raises(ValueError, match="q_ids"):
        qwen3_infonce(EmbeddingBatch(q, p, neg, valid, None, pos_ids, neg_ids))
    qwen3_infonce(EmbeddingBatch(q, p, neg), Qwen3InfoNCEConfig(mask_duplicates=False))


def test_no_hard_negatives():
    q, p, _, _, q_ids, pos_ids, _ = make_problem(n=4, k=1, seed=8)
    empty_neg = torch.zeros(4, 0, q.shape[1], dtype=q.dtype)
    no_neg_ids = torch.zeros(4, 0, dtype=torch.long)
    no_valid = torch.zeros(4, 0, dtype=torch.bool)
    out = assert_matches(Qwen3InfoNCEConfig(), q, p, empty_neg, no_valid, q_ids, pos_ids, no_neg_ids)
    none = qwen3_infonce(EmbeddingBatch(q, p, None, None, q_ids, pos_ids, None))
    torch.testing.assert_close(none.loss, out.loss, rtol=loss_rtol(torch.float64, 4, 0, q.shape[1], 0.1), atol=0)
    assert out.stats["candidates"].item() == 3 + 3 + 3  # qq, dd, qd: 3 other rows each


def test_padded_negatives_are_ignored_and_get_no_gradient():
    q, p, neg, valid, q_ids, pos_ids, neg_ids = make_problem(n=4, k=3, seed=9)
    valid[0, 2] = valid[1, 1] = valid[1, 2] = valid[3, 0] = False
    neg[~valid] = 1e3 * torch.randn(int((~valid).sum()), q.shape[1], dtype=q.dtype)  # garbage padding
    out = assert_matches(Qwen3InfoNCEConfig(), q, p, neg, valid, q_ids, pos_ids, neg_ids)
    neg_leaf = neg.clone().requires_grad_()
    qwen3_infonce(EmbeddingBatch(q, p, neg_leaf, valid, q_ids, pos_ids, neg_ids)).loss.backward()
    assert torch.all(neg_leaf.grad[~valid] == 0)
    assert torch.any(neg_leaf.grad[valid] != 0)
    # hard 8 valid + qq 3 + dd/qd (3 other positives + other rows' valid negatives) per row
    per_row = [int(valid[i].sum()) + 3 + 2 * (3 + int(valid.sum() - valid[i].sum())) for i in range(4)]
    assert out.stats["candidates"].item() == pytest.approx(sum(per_row) / 4, rel=reorder_rtol(torch.float32, 4))


def test_anchor_rows_use_the_whole_pool():
    """The cross-device form: loss of rows 2..3 against candidates from all 6 rows."""
    problem = make_problem(n=6, k=2, seed=10)
    assert_matches(Qwen3InfoNCEConfig(), *problem, anchors=[2, 3])


def test_empty_anchor_range_keeps_the_graph():
    """A rank left with no rows still backpropagates (its gather must join the collective)."""
    q, p, neg, valid, q_ids, pos_ids, neg_ids = make_problem(n=4, k=2, seed=18)
    qa = q.clone().requires_grad_()
    out = qwen3_infonce(EmbeddingBatch(qa, p, neg, valid, q_ids, pos_ids, neg_ids), anchors=slice(2, 2))
    out.loss.backward()
    assert out.loss.item() == 0 and torch.all(qa.grad == 0)
    with pytest.raises(ValueError, match="contiguous"):
        qwen3_infonce(EmbeddingBatch(q, p, neg, valid, q_ids, pos_ids, neg_ids), anchors=slice(0, 4, 2))


def test_permuting_rows_does_not_change_the_loss():
    q, p, neg, valid, q_ids, pos_ids, neg_ids = make_problem(n=6, k=2, seed=11)
    valid[4, 1] = False
    neg_ids[2, 0] = pos_ids[5]
    perm = torch.randperm(6, generator=torch.Generator().manual_seed(0))
    base = qwen3_infonce(EmbeddingBatch(q, p, neg, valid, q_ids, pos_ids, neg_ids))
    shuffled = qwen3_infonce(
        EmbeddingBatch(q[perm], p[perm], neg[perm], valid[perm], q_ids[perm], pos_ids[perm], neg_ids[perm])
    )
    tolerance = loss_rtol(torch.float64, 6, 2, q.shape[1], 0.1)  # the same sums in another order
    torch.testing.assert_close(base.loss, shuffled.loss, rtol=tolerance, atol=0)
    # ... nor does permuting the negatives within each row
    kperm = torch.tensor([1, 0])
    swapped = qwen3_infonce(
        EmbeddingBatch(q, p, neg[:, kperm], valid[:, kperm], q_ids, pos_ids, neg_ids[:, kperm])
    )
    torch.testing.assert_close(base.loss, swapped.loss, rtol=tolerance, atol=0)


def test_bfloat16_embeddings():
    q, p, neg, valid, q_ids, pos_ids, neg_ids = make_problem(seed=12, dtype=torch.bfloat16)
    qa = q.clone().requires_grad_()
    out = qwen3_infonce(EmbeddingBatch(qa, p, neg, valid, q_ids, pos_ids, neg_ids))
    out.loss.backward()
    assert out.loss.dtype == torch.float32 and qa.grad.dtype == torch.bfloat16
    ref = qwen3_infonce(EmbeddingBatch(q.double(), p.double(), neg.double(), valid, q_ids, pos_ids, neg_ids))
    # The same bfloat16 values, the loss computed in float32 against float64.
    torch.testing.assert_close(out.loss.double(), ref.loss, rtol=loss_rtol(torch.float32, *neg.shape, 0.1), atol=0)


def test_effective_negative_count_without_masks():
    q, p, neg, valid, q_ids, pos_ids, neg_ids = make_problem(n=4, k=2, seed=13)
    out = qwen3_infonce(
        EmbeddingBatch(q, p, neg, valid, q_ids, pos_ids, neg_ids), Qwen3InfoNCEConfig(margin=None)
    )
    # hard 2 + qq 3 + dd 9 + qd 9 (9 = 3 other positives + their 6 negatives)
    assert out.stats["candidates"].item() == out.stats["effective_negatives"].item() == 23


def test_shape_validation():
    q = torch.randn(3, 4)
    with pytest.raises(ValueError, match="d_pos"):
        EmbeddingBatch(q, torch.randn(3, 5))
    with pytest.raises(ValueError, match="d_neg"):
        EmbeddingBatch(q, q, torch.randn(2, 1, 4))
    with pytest.raises(ValueError, match="neg_mask"):
        EmbeddingBatch(q, q, torch.randn(3, 2, 4), torch.ones(3, 2))
    with pytest.raises(ValueError, match="temperature"):
        Qwen3InfoNCEConfig(temperature=0)


# --------------------------------------------------------------------------- Matryoshka
def test_matryoshka_is_weighted_sum_over_truncated_widths():
    q, p, neg, valid, q_ids, pos_ids, neg_ids = make_problem(n=4, k=2, dim=8, seed=14)
    dims, weights = [8, 4, 2], [1.0, 0.5, 0.25]
    cfg = Qwen3InfoNCEConfig(temperature=0.05)
    qa, pa, na = leaves(q, p, neg)
    loss_fn = MatryoshkaLoss(lambda b: qwen3_infonce(b, cfg), dims, weights)
    out = loss_fn(EmbeddingBatch(qa, pa, na, valid, q_ids, pos_ids, neg_ids))
    out.loss.backward()
    qb, pb, nb = leaves(q, p, neg)
    ref = sum(
        w
        * eq1_reference(
            qb[:, :d],
            pb[:, :d],
            nb[:, :, :d],
            valid.tolist(),
            q_ids.tolist(),
            pos_ids.tolist(),
            neg_ids.tolist(),
            tau=0.05,
        )
        for d, w in zip(dims, weights)
    )
    ref.backward()
    tolerance = loss_rtol(torch.float64, *neg.shape, 0.05)  # per width; the weighted sum adds 3 terms
    torch.testing.assert_close(out.loss, ref.detach(), rtol=tolerance, atol=0)
    narrowest = [t[..., :min(dims)] for t in (q, p, neg)]  # truncated rows are shorter: larger d cos / dx
    assert_same_grads(((qa, qb), (pa, pb), (na, nb)),
                      sum(weights) * infonce_grad_atol(tolerance, 0.05, q.shape[0], *narrowest))
    assert set(out.stats) >= {"loss@8", "loss@4", "loss@2", "accuracy@4"}


def test_matryoshka_without_dims_is_the_plain_loss():
    problem = make_problem(seed=15)
    batch = EmbeddingBatch(*problem)
    tolerance = loss_rtol(torch.float64, *problem[2].shape, 0.1)
    torch.testing.assert_close(MatryoshkaLoss(qwen3_infonce)(batch).loss, qwen3_infonce(batch).loss, rtol=tolerance,
                               atol=0)


def test_matryoshka_validation():
    with pytest.raises(ValueError, match="one weight per width"):
        MatryoshkaLoss(qwen3_infonce, [8, 4], [1.0])
    with pytest.raises(ValueError, match="distinct"):
        MatryoshkaLoss(qwen3_infonce, [4, 4])
    with pytest.raises(ValueError, match="exceeds"):
        MatryoshkaLoss(qwen3_infonce, [16])(EmbeddingBatch(*make_problem(dim=8)))


# --------------------------------------------------------------------------- rerankers
def test_pointwise_yes_no_loss_matches_formula():
    g = torch.Generator().manual_seed(16)
    logits = torch.randn(6, 2, generator=g, dtype=torch.float64) * 3
    labels = torch.tensor([1, 0, 0, 1, 1, 0])
    mine = logits.clone().requires_grad_()
    out = pointwise_yes_no_loss(mine, labels)
    out.loss.backward()
    theirs = logits.clone().requires_grad_()
    ref = 0.0
    for (no, yes), label in zip(theirs, labels.tolist()):
        p_yes = torch.exp(yes) / (torch.exp(no) + torch.exp(yes))
        ref = ref - torch.log(p_yes if label == 1 else 1 - p_yes)
    ref = ref / 6
    ref.backward()
    # float32 inside the loss against float64: a log-sigmoid of yes - no (absolute error ~ u |yes - no|)
    # and a mean over 6 rows.
    tolerance = reorder_rtol(torch.float32, 6 + 2) * max(1.0, float((logits[:, 1] - logits[:, 0]).abs().max()))
    torch.testing.assert_close(out.loss.double(), ref.detach(), rtol=tolerance, atol=0)
    assert_same_grads(((mine, theirs),), tolerance / 6)  # each entry is (sigmoid - label) / 6
    expected_acc = (
        sum(((y - n) > 0) == (lab == 1) for (n, y), lab in zip(logits.tolist(), labels.tolist())) / 6
    )
    assert out.stats["accuracy"].item() == pytest.approx(expected_acc, rel=reorder_rtol(torch.float32, 6))
    with pytest.raises(ValueError, match="labels"):
        pointwise_yes_no_loss(logits, torch.tensor([0, 1, 2, 0, 1, 0]))


@pytest.mark.parametrize("temperature", [1.0, 0.5])
def test_listwise_loss_matches_formula(temperature):
    g = torch.Generator().manual_seed(17)
    group = 4
    logits = torch.randn(3 * group, 2, generator=g, dtype=torch.float64)
    mine = logits.clone().requires_grad_()
    out = listwise_loss(mine, group, temperature)
    out.loss.backward()
    theirs = logits.clone().requires_grad_()
    ref = 0.0
    for start in range(0, 3 * group, group):
        scores = [(theirs[r, 1] - theirs[r, 0]) / temperature for r in range(start, start + group)]
        ref = ref - torch.log(torch.exp(scores[0]) / sum(torch.exp(s) for s in scores))
    ref = ref / 3
    ref.backward()
    # float32 inside the loss against float64: a log-softmax over a group of 4 scores (yes - no) / T,
    # then a mean over 3 groups.
    scores = (logits[:, 1] - logits[:, 0]) / temperature
    tolerance = reorder_rtol(torch.float32, group + 3) * max(1.0, float(scores.abs().max()))
    torch.testing.assert_close(out.loss.double(), ref.detach(), rtol=tolerance, atol=0)
    assert_same_grads(((mine, theirs),), tolerance / (3 * temperature))  # each entry: (p - label) / (3 T)
    with pytest.raises(ValueError, match="group_size"):
        listwise_loss(logits, 5)


# --------------------------------------------------------------------------- text ids
def test_text_hashes_are_stable_content_ids():
    ids = text_hashes(["a doc", "another", "a doc"])
    assert ids.dtype == torch.long and ids[0] == ids[2] and ids[0] != ids[1]
    digest = hashlib.blake2b(b"another", digest_size=8).digest()
    assert ids[1].item() == int.from_bytes(digest, "little", signed=True)


def test_collapse_statistics_neg_sim_and_chance_loss():
    """neg_sim: the mean cosine of the kept candidates per anchor; chance_loss: ln(1 + kept), which
    the loss equals exactly when every similarity is the same (collapsed embeddings)."""
    q, p, neg, valid, q_ids, pos_ids, neg_ids = make_problem(n=4, k=2, seed=11)
    valid[2, 1] = False
    cfg = Qwen3InfoNCEConfig(use_qq=False, use_dd=False, margin=None, mask_duplicates=False)
    out = qwen3_infonce(EmbeddingBatch(q, p, neg, valid, q_ids, pos_ids, neg_ids), cfg)
    sims, counts = [], []
    for i in range(4):  # kept candidates of anchor i: its valid hard negatives, then every other row's documents
        docs = [neg[i, kk] for kk in range(2) if valid[i, kk]]
        docs += [p[j] for j in range(4) if j != i] + [neg[j, kk] for j in range(4) if j != i for kk in range(2)
                                                       if valid[j, kk]]
        sims.append(sum(cos(q[i], d) for d in docs) / len(docs))
        counts.append(len(docs))
    # float64: a mean of cosines over 8 dimensions and at most 14 candidates a row, 4 rows.
    assert out.stats["neg_sim"].item() == pytest.approx(sum(sims).item() / 4, rel=reorder_rtol(torch.float64, 8 + 14 + 4))
    expected_chance = sum(math.log1p(c) for c in counts) / 4
    assert out.stats["chance_loss"].item() == pytest.approx(expected_chance, rel=reorder_rtol(torch.float64, 4 + 1))
    same = torch.ones_like(q)
    collapsed = qwen3_infonce(EmbeddingBatch(same, same.clone(), torch.ones_like(neg), valid, q_ids, pos_ids,
                                             neg_ids), cfg)
    assert collapsed.loss.item() == pytest.approx(collapsed.stats["chance_loss"].item(),
                                                  rel=loss_rtol(torch.float64, *neg.shape, cfg.temperature))
    assert collapsed.stats["neg_sim"].item() == pytest.approx(collapsed.stats["pos_sim"].item(),
                                                              rel=reorder_rtol(torch.float64, 8 + 14 + 4))

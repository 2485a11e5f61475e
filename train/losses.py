"""Training losses on embedding tensors: the Qwen3 improved InfoNCE (report Eq. 1), a Matryoshka
wrapper, and the yes/no reranker losses (report Eq. 2 and ms-swift's listwise variant).

Every loss takes tensors, never a model. Matryoshka is then a loop over slices of ONE set of
embeddings, and GradCache (train/gradcache.py) and the cross-device gather (train/distributed.py)
compose with it by handing it different tensors; nothing is monkeypatched.

How the Qwen3 InfoNCE reads a batch (see `qwen3_infonce` for the formula)
--------------------------------------------------------------------------
A batch is N rows (q_j, d_j+, d_j1- .. d_jK-), held by `EmbeddingBatch`. The *document pool* is
every positive and every valid hard negative of every row, each tagged with the row it came from.
For anchor row i:
  * term "hard negatives": row i's own K hard negatives only;
  * terms "q-q": every other row's query q_j (j != i);
  * terms "d-d" and "q-d": every document of the pool that does NOT belong to row i, i.e. other rows'
    positives AND other rows' hard negatives (as Tevatron, FlagEmbedding and sentence-transformers
    use them for q-d_j). Row i's own positive is the numerator and its own hard negatives are already
    in the hard-negative term, so neither is counted twice nor treated as someone else's document.
Ownership is by row index in the pool, and the cross-device gather keeps rows whole (a row's
negatives stay in that row), so after a gather a query never trains toward its own negatives as if
they were in-batch documents, nor against its own positive.

Masks (m = 0 drops a candidate from Z_i), following the report:
  * margin: s(candidate) > s(q_i, d_i+) + margin, on cosine similarities before the temperature;
    for the d-d term the candidate similarity is s(d_i+, d_j), still compared with s(q_i, d_i+).
  * duplicates (`mask_duplicates`): a candidate whose text is the text of d_i+ (same content hash),
    in every term, hard negatives included. A query candidate q_j is also dropped when its text is
    q_i's text (a duplicated query in the batch): an extension of the report, which the margin rule
    would almost always apply anyway since s(q_i, q_j) = 1.
The masks are computed without gradient; they select terms, they are not differentiated.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace

import torch
import torch.nn.functional as F

from embedforge.pooling import truncate_and_normalize

Tensor = torch.Tensor


@dataclass
class LossOutput:
    """A scalar loss with gradient, and detached 0-dim statistics for logging (no host sync here:
    call `.item()` only when you log)."""

    loss: Tensor
    stats: dict[str, Tensor] = field(default_factory=dict)


def text_hashes(texts: Sequence[str]) -> Tensor:
    """Stable 64-bit content ids (blake2b, first 8 bytes) for duplicate masking.

    Python's `hash()` is salted per process, so ranks would disagree; blake2b is the same on every
    machine, which the cross-device duplicate mask needs."""
    ids = [
        int.from_bytes(hashlib.blake2b(t.encode("utf-8"), digest_size=8).digest(), "little", signed=True)
        for t in texts
    ]
    return torch.tensor(ids, dtype=torch.long)


@dataclass(frozen=True)
class EmbeddingBatch:
    """Embeddings of N training rows (query, positive, K hard negatives) and their text ids.

    Shapes: q [N, D]; d_pos [N, D]; d_neg [N, K, D] or None (K = 0); neg_mask [N, K] bool, True for a
    real negative (rows with fewer than K negatives are padded; padding is False), None = all real;
    q_ids [N], pos_ids [N], neg_ids [N, K]: int64 content ids from `text_hashes` (padding ids are
    ignored). Embeddings need not be normalised: the losses normalise them.
    """

    q: Tensor
    d_pos: Tensor
    d_neg: Tensor | None = None
    neg_mask: Tensor | None = None
    q_ids: Tensor | None = None
    pos_ids: Tensor | None = None
    neg_ids: Tensor | None = None

    def __post_init__(self) -> None:
        if self.q.dim() != 2:
            raise ValueError(f"q must be [N, D], got shape {tuple(self.q.shape)}")
        n, d = self.q.shape
        if self.d_pos.shape != self.q.shape:
            raise ValueError(f"d_pos must have q's shape {(n, d)}, got {tuple(self.d_pos.shape)}")
        if self.d_neg is not None and (
            self.d_neg.dim() != 3 or self.d_neg.shape[0] != n or self.d_neg.shape[2] != d
        ):
            raise ValueError(f"d_neg must be [N={n}, K, D={d}], got {tuple(self.d_neg.shape)}")
        k = self.num_negatives
        for name, value, shape in (
            ("neg_mask", self.neg_mask, (n, k)),
            ("q_ids", self.q_ids, (n,)),
            ("pos_ids", self.pos_ids, (n,)),
            ("neg_ids", self.neg_ids, (n, k)),
        ):
            if value is not None and tuple(value.shape) != shape:
                raise ValueError(f"{name} must have shape {shape}, got {tuple(value.shape)}")
        if self.neg_mask is not None and self.neg_mask.dtype != torch.bool:
            raise ValueError(f"neg_mask must be a bool tensor, got {self.neg_mask.dtype}")

    @property
    def size(self) -> int:
        return self.q.shape[0]

    @property
    def dim(self) -> int:
        return self.q.shape[1]

    @property
    def num_negatives(self) -> int:
        return 0 if self.d_neg is None else self.d_neg.shape[1]

    def truncate(self, dim: int) -> EmbeddingBatch:
        """Matryoshka width `dim`: first `dim` coordinates, re-normalised; ids and masks unchanged."""
        return replace(
            self,
            q=truncate_and_normalize(self.q, dim),
            d_pos=truncate_and_normalize(self.d_pos, dim),
            d_neg=None if self.d_neg is None else truncate_and_normalize(self.d_neg, dim),
        )


@dataclass(frozen=True)
class Qwen3InfoNCEConfig:
    """Switches of the Qwen3 improved InfoNCE.

    temperature: 0.1, ms-swift's current default and the value of its published Qwen3-Embedding
        recipe (the report states none; sentence-transformers uses 0.05, FlagEmbedding 0.02). Sweep it.
    use_hard_negatives, use_qq, use_dd, use_qd: include each term of Z_i. All off = plain
        single-positive softmax (loss 0).
    margin: false-negative mask, m = 0 when s(candidate) > s(q_i, d_i+) + margin (report: 0.1).
        None disables the margin rule.
    mask_duplicates: drop candidates whose text is d_i+'s text (and query candidates equal to q_i).
        Needs content ids (`text_hashes`) for every text that enters the loss; a missing id is an
        error rather than a silently skipped check.
    exempt_hard_negatives_from_margin: default False, which is Eq. 1 exactly (m_ik applies to the
        hard negatives too): a curated negative that the model scores 0.1 above the positive is more
        often a mining false negative than an informative one. Set True when negatives were already
        filtered with a teacher margin (data_synth.mine does) and you want the hardest ones kept;
        the statistic `hard_neg_masked_margin` shows how many are being dropped.
        Duplicate masking still applies to exempt hard negatives.
    """

    temperature: float = 0.1
    use_hard_negatives: bool = True
    use_qq: bool = True
    use_dd: bool = True
    use_qd: bool = True
    margin: float | None = 0.1
    mask_duplicates: bool = True
    exempt_hard_negatives_from_margin: bool = False

    def __post_init__(self) -> None:
        if not self.temperature > 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}")


def _check_ids(batch: EmbeddingBatch, cfg: Qwen3InfoNCEConfig) -> None:
    hint = "pass ids from train.losses.text_hashes(texts), or set mask_duplicates=False"
    if batch.pos_ids is None:
        raise ValueError(f"mask_duplicates needs pos_ids; {hint}")
    if batch.num_negatives and batch.neg_ids is None:
        raise ValueError(f"mask_duplicates needs neg_ids when the batch has hard negatives; {hint}")
    if cfg.use_qq and batch.q_ids is None:
        raise ValueError(f"mask_duplicates with use_qq needs q_ids; {hint}")


def qwen3_infonce(
    batch: EmbeddingBatch, cfg: Qwen3InfoNCEConfig | None = None, *, anchors: slice | None = None
) -> LossOutput:
    """Qwen3-Embedding improved InfoNCE (report Eq. 1), mean over the anchor rows.

        L = -(1/n) sum_i log( exp(s(q_i, d_i+)/tau) / Z_i )
        Z_i = exp(s(q_i,d_i+)/tau) + sum_k m_ik exp(s(q_i,d_ik-)/tau) + sum_{j!=i} m_ij exp(s(q_i,q_j)/tau)
              + sum_{j!=i} m_ij exp(s(d_i+,d_j)/tau) + sum_{j!=i} m_ij exp(s(q_i,d_j)/tau)

    with s the cosine similarity, computed in (at least) float32 with a log-sum-exp. Which documents
    are d_j and what m masks is set out in the module docstring.

    Args:
        batch: the candidate pool. Single process: the local batch. Across devices: the gathered
            batch from `train.distributed.gather_embedding_batch`.
        cfg: term switches, temperature, masks. Default `Qwen3InfoNCEConfig()`.
        anchors: the rows of `batch` whose loss is computed (this rank's own rows, as returned by the
            gather); default all rows. Every row of `batch` is a candidate for every anchor.

    Returns:
        LossOutput: loss (mean over anchors) and stats, all means per anchor: `pos_sim`, `candidates`
        (valid candidates in Z_i besides the positive, before masking), `effective_negatives` (kept
        after masking), `masked_margin`, `masked_duplicate`, `hard_neg_masked_margin`, `accuracy`
        (the positive outscores every kept candidate), `neg_sim` (mean cosine of the kept candidates)
        and `chance_loss` (ln(1 + kept candidates), the loss when every similarity is equal). `pos_sim`
        near `neg_sim` with `loss` near `chance_loss` is the signature of collapsed embeddings, which
        the trainer's collapse guard (train/health.py) watches for.
    """
    cfg = cfg or Qwen3InfoNCEConfig()
    n, k = batch.size, batch.num_negatives
    start, stop, step = (anchors or slice(0, n)).indices(n)
    if step != 1 or stop < start:
        raise ValueError(f"anchors must be a contiguous slice of rows 0..{n}, got {anchors}")
    if cfg.mask_duplicates:
        _check_ids(batch, cfg)
    device = batch.q.device
    rows = torch.arange(start, stop, device=device)
    # At least float32: bf16 similarities lose the small differences the temperature amplifies.
    dtype = torch.promote_types(batch.q.dtype, torch.float32)

    q_all = F.normalize(batch.q.to(dtype), dim=-1)
    pos_all = F.normalize(batch.d_pos.to(dtype), dim=-1)
    q_anchor, pos_anchor = q_all[start:stop], pos_all[start:stop]
    s_pos = (q_anchor * pos_anchor).sum(-1)
    threshold = s_pos.detach().unsqueeze(1) + (cfg.margin if cfg.margin is not None else float("inf"))
    anchor_pos_ids = batch.pos_ids[start:stop].unsqueeze(1) if cfg.mask_duplicates else None

    # Document pool: positives then the flattened negatives, each with its owner row and validity.
    doc_emb, doc_owner = pos_all, torch.arange(n, device=device)
    doc_valid = torch.ones(n, dtype=torch.bool, device=device)
    doc_ids = batch.pos_ids
    neg_all = neg_valid = None
    if k:
        neg_all = F.normalize(batch.d_neg.to(dtype), dim=-1)
        neg_valid = (
            batch.neg_mask
            if batch.neg_mask is not None
            else torch.ones(n, k, dtype=torch.bool, device=device)
        )
        doc_emb = torch.cat([pos_all, neg_all.reshape(n * k, -1)])
        doc_owner = torch.cat([doc_owner, doc_owner.repeat_interleave(k)])
        doc_valid = torch.cat([doc_valid, neg_valid.reshape(-1)])
        if cfg.mask_duplicates:
            doc_ids = torch.cat([batch.pos_ids, batch.neg_ids.reshape(-1)])
    not_own_doc = doc_valid.unsqueeze(0) & (doc_owner.unsqueeze(0) != rows.unsqueeze(1))

    # Each term: similarities [n_anchor, M], valid [n_anchor, M], duplicate [n_anchor, M] or None,
    # and whether the margin rule applies.
    terms: list[tuple[str, Tensor, Tensor, Tensor | None, bool]] = []
    if cfg.use_hard_negatives and k:
        sims = torch.einsum("bd,bkd->bk", q_anchor, neg_all[start:stop])
        dup = batch.neg_ids[start:stop] == anchor_pos_ids if cfg.mask_duplicates else None
        terms.append(("hard", sims, neg_valid[start:stop], dup, not cfg.exempt_hard_negatives_from_margin))
    if cfg.use_qq:
        sims = q_anchor @ q_all.T
        valid = torch.arange(n, device=device).unsqueeze(0) != rows.unsqueeze(1)
        dup = None
        if cfg.mask_duplicates:
            q_ids = batch.q_ids.unsqueeze(0)
            dup = (q_ids == anchor_pos_ids) | (q_ids == batch.q_ids[start:stop].unsqueeze(1))
        terms.append(("qq", sims, valid, dup, True))
    doc_dup = doc_ids.unsqueeze(0) == anchor_pos_ids if cfg.mask_duplicates else None
    if cfg.use_dd:
        terms.append(("dd", pos_anchor @ doc_emb.T, not_own_doc, doc_dup, True))
    if cfg.use_qd:
        terms.append(("qd", q_anchor @ doc_emb.T, not_own_doc, doc_dup, True))

    logits = [s_pos.unsqueeze(1) / cfg.temperature]
    n_anchor = stop - start
    zeros = torch.zeros(n_anchor, device=device)
    candidates, kept_total, by_margin, by_dup, hard_by_margin = zeros, zeros, zeros, zeros, zeros
    kept_sim = zeros
    for name, sims, valid, dup, margin_applies in terms:
        with torch.no_grad():
            dup = dup & valid if dup is not None else torch.zeros_like(valid)
            over_margin = (sims > threshold) & valid & ~dup if margin_applies else torch.zeros_like(valid)
            keep = valid & ~dup & ~over_margin
            candidates = candidates + valid.sum(1)
            kept_total = kept_total + keep.sum(1)
            kept_sim = kept_sim + sims.detach().masked_fill(~keep, 0.0).sum(1)
            by_dup = by_dup + dup.sum(1)
            by_margin = by_margin + over_margin.sum(1)
            if name == "hard":
                hard_by_margin = hard_by_margin + over_margin.sum(1)
        logits.append((sims / cfg.temperature).masked_fill(~keep, float("-inf")))
    all_logits = torch.cat(logits, dim=1)
    per_anchor = torch.logsumexp(all_logits, dim=1) - all_logits[:, 0]
    denom = max(n_anchor, 1)  # a rank with no rows still joins the backward collectives
    loss = per_anchor.sum() / denom

    with torch.no_grad():
        best_other = all_logits[:, 1:].max(dim=1).values if all_logits.shape[1] > 1 else all_logits[:, 0] - 1
        stats = {
            "pos_sim": s_pos.sum() / denom,
            "candidates": candidates.sum() / denom,
            "effective_negatives": kept_total.sum() / denom,
            "masked_margin": by_margin.sum() / denom,
            "masked_duplicate": by_dup.sum() / denom,
            "hard_neg_masked_margin": hard_by_margin.sum() / denom,
            "accuracy": (all_logits[:, 0] > best_other).float().sum() / denom,
            "neg_sim": (kept_sim / kept_total.clamp(min=1)).sum() / denom,
            "chance_loss": torch.log1p(kept_total.to(dtype)).sum() / denom,
        }
    return LossOutput(loss, {key: value.detach() for key, value in stats.items()})


class MatryoshkaLoss:
    """Weighted sum of an embedding loss over several Matryoshka widths of ONE set of embeddings.

    Args:
        loss_fn: `loss_fn(batch: EmbeddingBatch, **kwargs) -> LossOutput`, e.g. `qwen3_infonce`
            (bind its cfg with functools.partial or pass it as a keyword at call time).
        dims: widths to train, each truncated from the full embedding and re-normalised. List the
            full width too if it should be trained. None: the full width only (no wrapper effect).
        weights: one non-negative weight per width; default 1.0 each. The result is
            sum_d weight_d * loss_fn(truncate(batch, d)), not normalised by the weights.

    Truncation is slicing, so the embeddings are computed once (no re-forward) and, under GradCache,
    the cached gradient is the sum over widths automatically.

    Stats: `loss@{d}` for each width, and every stat of loss_fn suffixed `@{d}`.

    Example::

        loss_fn = MatryoshkaLoss(functools.partial(qwen3_infonce, cfg=cfg), dims=[1024, 256, 64])
        out = loss_fn(gathered.pool, anchors=gathered.anchors)
    """

    def __init__(
        self,
        loss_fn: Callable[..., LossOutput],
        dims: Sequence[int] | None = None,
        weights: Sequence[float] | None = None,
    ) -> None:
        if dims is not None:
            dims = [int(d) for d in dims]
            if not dims or any(d <= 0 for d in dims) or len(set(dims)) != len(dims):
                raise ValueError(f"dims must be distinct positive widths, got {dims}")
            if weights is None:
                weights = [1.0] * len(dims)
            if len(weights) != len(dims):
                raise ValueError(f"give one weight per width: {len(dims)} dims but {len(weights)} weights")
            if any(w < 0 for w in weights):
                raise ValueError(f"weights must be non-negative, got {list(weights)}")
        elif weights is not None:
            raise ValueError("weights given without dims; pass dims=[...] with one weight each")
        self.loss_fn = loss_fn
        self.dims = dims
        self.weights = None if weights is None else [float(w) for w in weights]

    def __call__(self, batch: EmbeddingBatch, **kwargs) -> LossOutput:
        if self.dims is None:
            return self.loss_fn(batch, **kwargs)
        if max(self.dims) > batch.dim:
            raise ValueError(f"Matryoshka width {max(self.dims)} exceeds the embedding width {batch.dim}")
        total, stats = None, {}
        for dim, weight in zip(self.dims, self.weights):
            out = self.loss_fn(batch.truncate(dim), **kwargs)
            total = weight * out.loss if total is None else total + weight * out.loss
            stats[f"loss@{dim}"] = out.loss.detach()
            stats.update({f"{key}@{dim}": value for key, value in out.stats.items()})
        return LossOutput(total, stats)


def pointwise_yes_no_loss(logits_no_yes: Tensor, labels: Tensor) -> LossOutput:
    """Reranker loss, report Eq. 2: mean of -log p(label | prompt), p = softmax over (no, yes).

    Args:
        logits_no_yes: [B, 2], the last position's logits of the `no` and `yes` tokens, in that order
            (as `Reranker.yes_no_logits` returns them).
        labels: [B], 1/True for a relevant pair (target `yes`), 0/False for an irrelevant one.

    Stats: `accuracy` (p(yes) > 0.5 iff label is yes), `p_yes_pos`, `p_yes_neg` (NaN without such rows).
    """
    if logits_no_yes.dim() != 2 or logits_no_yes.shape[1] != 2 or labels.shape != logits_no_yes.shape[:1]:
        raise ValueError(
            f"expected logits [B, 2] and labels [B], got {tuple(logits_no_yes.shape)} "
            f"and {tuple(labels.shape)}"
        )
    target = labels.long()
    if ((target != 0) & (target != 1)).any():
        raise ValueError("labels must be 0 (no) or 1 (yes)")
    logits = logits_no_yes.float()
    loss = F.cross_entropy(logits, target)
    with torch.no_grad():
        p_yes = logits.softmax(-1)[:, 1]
        positive = target == 1
        stats = {
            "accuracy": ((p_yes > 0.5) == positive).float().mean(),
            "p_yes_pos": p_yes[positive].mean(),
            "p_yes_neg": p_yes[~positive].mean(),
        }
    return LossOutput(loss, stats)


def listwise_loss(logits_no_yes: Tensor, group_size: int, temperature: float = 1.0) -> LossOutput:
    """Listwise reranker loss (ms-swift's listwise variant): per group of `group_size` consecutive
    rows, the first is the positive and the rest its negatives; cross-entropy over the scores
    (logit_yes - logit_no) / temperature with the positive as target, averaged over groups.

    Stats: `accuracy` (positive ranked first), `score_margin` (positive minus best negative score).
    """
    if logits_no_yes.dim() != 2 or logits_no_yes.shape[1] != 2:
        raise ValueError(f"expected logits [B, 2], got {tuple(logits_no_yes.shape)}")
    if group_size < 2 or logits_no_yes.shape[0] % group_size:
        raise ValueError(
            f"group_size must be >= 2 and divide the batch ({logits_no_yes.shape[0]} rows), got {group_size}"
        )
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    logits = logits_no_yes.float()
    scores = ((logits[:, 1] - logits[:, 0]) / temperature).view(-1, group_size)
    loss = F.cross_entropy(scores, torch.zeros(scores.shape[0], dtype=torch.long, device=scores.device))
    with torch.no_grad():
        best_negative = scores[:, 1:].max(dim=1).values
        stats = {
            "accuracy": (scores[:, 0] > best_negative).float().mean(),
            "score_margin": ((scores[:, 0] - best_negative) * temperature).mean(),
        }
    return LossOutput(loss, stats)

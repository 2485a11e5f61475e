"""GradCache gives the parameter gradients of the plain loss: on a small MLP with dropout and on a
tiny random Qwen3 (attention dropout), for several chunk sizes, with Matryoshka widths.

The models run in float64, so "the same gradient" is checked to float64 rounding: TOLERANCE bounds
two evaluation orders of the loss and its gradient over this batch (train_workers/precision.py):
every parameter gradient sums over the batch's B * (2 + K) texts of SEQ tokens, through 2 layers of
width at most 48, and the loss scales similarities by 1 / temperature (20)."""

from __future__ import annotations

import contextlib
import functools

import pytest
import torch
import torch.nn.functional as F
from train_workers.precision import relative_error, reorder_rtol
from transformers import Qwen3Config, Qwen3Model

from embedforge.pooling import last_token_pool
from embedforge.train.gradcache import RandomState, gradcache_step
from embedforge.train.losses import (
    EmbeddingBatch,
    MatryoshkaLoss,
    Qwen3InfoNCEConfig,
    qwen3_infonce,
    text_hashes,
)

torch.set_num_threads(1)

B, K, SEQ, VOCAB = 6, 2, 7, 50
TEMPERATURE = 0.05
TOLERANCE = reorder_rtol(torch.float64, 2 * B * (2 + K) * SEQ + 2 * (32 + 48)) / TEMPERATURE


class TinyEncoder(torch.nn.Module):
    """Token embeddings, masked mean, MLP with dropout, L2 norm."""

    def __init__(self, dim: int = 16, dropout: float = 0.2):
        super().__init__()
        self.tok = torch.nn.Embedding(VOCAB, dim)
        self.mlp = torch.nn.Sequential(
            torch.nn.Linear(dim, 24), torch.nn.Tanh(), torch.nn.Dropout(dropout), torch.nn.Linear(24, dim)
        )

    def forward(self, features):
        mask = features["attention_mask"].unsqueeze(-1).to(self.tok.weight.dtype)
        pooled = (self.tok(features["input_ids"]) * mask).sum(1) / mask.sum(1)
        return F.normalize(self.mlp(pooled), dim=-1)


def tiny_qwen3(dropout: float) -> torch.nn.Module:
    config = Qwen3Config(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        max_position_embeddings=32,
        attention_dropout=dropout,
    )
    config._attn_implementation = "sdpa"  # eager attention turns a fully padded row into NaN in float64
    torch.manual_seed(0)
    model = Qwen3Model(config).double()
    model.train()

    def embed(features):
        hidden = model(**features).last_hidden_state
        return F.normalize(last_token_pool(hidden, features["attention_mask"]), dim=-1)

    return model, embed


def make_features(n: int, seed: int) -> dict[str, torch.Tensor]:
    """Left-padded random token batches of varying length."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, VOCAB, (n, SEQ), generator=g)
    lengths = torch.randint(2, SEQ + 1, (n,), generator=g)
    mask = (torch.arange(SEQ).unsqueeze(0) >= SEQ - lengths.unsqueeze(1)).long()
    return {"input_ids": ids * mask, "attention_mask": mask}


def row_ids(features) -> torch.Tensor:
    return text_hashes([" ".join(map(str, row.tolist())) for row in features["input_ids"]])


FEATURES = {"q": make_features(B, 1), "d_pos": make_features(B, 2), "d_neg": make_features(B * K, 3)}


def make_loss_fn(dims=None):
    cfg = Qwen3InfoNCEConfig(temperature=TEMPERATURE)
    loss = MatryoshkaLoss(functools.partial(qwen3_infonce, cfg=cfg), dims=dims)
    ids = {role: row_ids(f) for role, f in FEATURES.items()}

    def loss_fn(emb):
        batch = EmbeddingBatch(
            emb["q"],
            emb["d_pos"],
            emb["d_neg"].view(B, K, -1),
            None,
            ids["q"],
            ids["d_pos"],
            ids["d_neg"].view(B, K),
        )
        return loss(batch)

    return loss_fn


def chunks_of(size: int) -> dict[str, list]:
    """Each role's features cut into chunks of `size` rows."""
    rows = {role: next(iter(f.values())).shape[0] for role, f in FEATURES.items()}
    return {role: [{name: value[i:i + size] for name, value in f.items()} for i in range(0, rows[role], size)]
            for role, f in FEATURES.items()}


def grads(model) -> dict[str, torch.Tensor]:
    return {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


def reference(model, embed, loss_fn, chunks, seed):
    """The plain loss: every chunk embedded WITH gradient (same random draws as GradCache's first
    pass), one backward."""
    model.zero_grad()
    torch.manual_seed(seed)
    emb = {role: torch.cat([embed(c) for c in role_chunks]) for role, role_chunks in chunks.items()}
    loss = loss_fn(emb).loss
    loss.backward()
    return loss.detach(), grads(model), torch.get_rng_state()


def cached(model, embed, loss_fn, chunks, seed, **kwargs):
    model.zero_grad()
    torch.manual_seed(seed)
    out = gradcache_step(embed, chunks, loss_fn, **kwargs)
    return out.loss, grads(model), torch.get_rng_state()


def assert_same_grads(a, b):
    """The whole gradient (one entry can be a sum that cancels): see the module docstring."""
    assert a.keys() == b.keys() and a
    assert relative_error(b, a) <= TOLERANCE


@pytest.mark.parametrize("chunk_size", [1, 2, 3])
@pytest.mark.parametrize("dims", [None, [16, 8, 4]])
def test_gradcache_equals_full_batch_without_dropout(chunk_size, dims):
    torch.manual_seed(0)
    model = TinyEncoder(dropout=0.0).double()
    loss_fn = make_loss_fn(dims)
    full_loss, full_grads, _ = reference(
        model, model, loss_fn, chunks_of(10**6), seed=0
    )  # one chunk per role
    loss, gc_grads, _ = cached(model, model, loss_fn, chunks_of(chunk_size), seed=0)
    torch.testing.assert_close(loss, full_loss, rtol=TOLERANCE, atol=0)
    assert_same_grads(gc_grads, full_grads)


@pytest.mark.parametrize("chunk_size", [1, 2, 3])
def test_gradcache_replays_dropout(chunk_size):
    torch.manual_seed(0)
    model = TinyEncoder(dropout=0.3).double()
    loss_fn = make_loss_fn([16, 4])
    chunks = chunks_of(chunk_size)
    ref_loss, ref_grads, ref_rng = reference(model, model, loss_fn, chunks, seed=5)
    loss, gc_grads, rng = cached(model, model, loss_fn, chunks, seed=5)
    torch.testing.assert_close(loss, ref_loss, rtol=TOLERANCE, atol=0)
    assert_same_grads(gc_grads, ref_grads)
    assert torch.equal(rng, ref_rng)  # the random stream continues as after a plain pass
    # Dropout is really active: another seed draws other masks and other gradients.
    _, other_grads, _ = reference(model, model, loss_fn, chunks, seed=6)
    assert relative_error(ref_grads, other_grads) > 1e6 * TOLERANCE


@pytest.mark.parametrize("chunk_size", [1, 2, 3])
def test_gradcache_on_tiny_qwen3_with_attention_dropout(chunk_size):
    model, embed = tiny_qwen3(dropout=0.2)
    loss_fn = make_loss_fn([32, 8])
    chunks = chunks_of(chunk_size)
    ref_loss, ref_grads, _ = reference(model, embed, loss_fn, chunks, seed=3)
    loss, gc_grads, _ = cached(model, embed, loss_fn, chunks, seed=3)
    torch.testing.assert_close(loss, ref_loss, rtol=TOLERANCE, atol=0)
    assert_same_grads(gc_grads, ref_grads)


def test_tiny_qwen3_without_dropout_matches_unchunked_batch():
    model, embed = tiny_qwen3(dropout=0.0)
    loss_fn = make_loss_fn()
    _, full_grads, _ = reference(model, embed, loss_fn, chunks_of(10**6), seed=0)
    _, gc_grads, _ = cached(model, embed, loss_fn, chunks_of(4), seed=0)
    assert_same_grads(gc_grads, full_grads)


def test_backward_fn_and_no_sync_hooks():
    torch.manual_seed(0)
    model = TinyEncoder(dropout=0.0).double()
    loss_fn = make_loss_fn()
    chunks = chunks_of(4)  # q: 2 chunks, d_pos: 2, d_neg: 3 -> 7 re-forwards
    _, plain, _ = cached(model, model, loss_fn, chunks, seed=0)
    calls, entered = [], []

    def backward_fn(surrogate):  # what accelerator.backward does under gradient accumulation of 4
        calls.append(surrogate.detach())
        (surrogate / 4).backward()

    @contextlib.contextmanager
    def no_sync():
        entered.append(len(calls))
        yield

    _, scaled, _ = cached(model, model, loss_fn, chunks, seed=0, backward_fn=backward_fn, no_sync=no_sync)
    assert len(calls) == 7
    assert entered == [0, 1, 2, 3, 4, 5]  # every chunk but the last ran without gradient sync
    assert_same_grads({k: v * 4 for k, v in scaled.items()}, plain)


def test_roles_the_loss_ignores_are_not_re_embedded():
    torch.manual_seed(0)
    model = TinyEncoder(dropout=0.0).double()
    seen = []

    def embed(features):
        seen.append(torch.is_grad_enabled())
        return model(features)

    def loss_fn(emb):
        return qwen3_infonce(
            EmbeddingBatch(emb["q"], emb["d_pos"]), Qwen3InfoNCEConfig(mask_duplicates=False)
        )

    chunks = chunks_of(3)
    chunks["unused"] = chunks["d_neg"]
    gradcache_step(embed, {k: chunks[k] for k in ("q", "d_pos", "unused")}, loss_fn)
    assert seen.count(False) == 2 + 2 + 4 and seen.count(True) == 2 + 2


def test_random_state_replay_restores_the_outer_stream():
    torch.manual_seed(0)
    state = RandomState()
    first = torch.rand(3)
    after = torch.get_rng_state()
    with state.replay():
        assert torch.equal(torch.rand(3), first)
    assert torch.equal(torch.get_rng_state(), after)


def test_a_role_without_chunks_is_refused():
    with pytest.raises(ValueError, match="no chunks"):
        gradcache_step(lambda f: f, {"q": []}, lambda e: e["q"].sum())

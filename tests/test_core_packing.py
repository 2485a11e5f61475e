"""Packed (padding-free) batches give the vectors and gradients of padded ones.

The reference is the same model run on each text ALONE (no padding, no packing) or on the padded
batch, through transformers directly. Tolerances come from float32 rounding and the problem size
(`fp32_tol`); a mask that lets texts see each other moves the vectors by O(1), which the negative
controls below show, so the comparisons can fail."""

from __future__ import annotations

import logging
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from embedforge import Embedder
from embedforge.errors import InputError
from embedforge.packing import (
    LAST_INDEX,
    PACKABLE_MODEL_TYPES,
    TEXT_INDEX,
    fill_rows,
    pack,
    plan_forwards,
    plan_rows,
    pool_packed,
    real_tokens,
)
from embedforge.pooling import pool

FP32_U = 2.0**-24  # unit roundoff of float32

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]


def fp32_tol(layers: int, width: int) -> float:
    """Packed and padded runs sum the same products in different orders (other masked key counts,
    other RoPE phases under left padding). A length-K float32 dot product then differs by about
    sqrt(K)·u; each layer adds that once relative to unit-scale states, over `layers` layers; x8 of
    headroom for the softmax and norms. K is the widest reduction: hidden, MLP or sequence length."""
    return 8 * layers * math.sqrt(width) * FP32_U


def long_tailed_texts(n: int) -> list[str]:
    """Real text of long-tailed lengths: Python standard-library docstrings, every 7th one."""
    from embedforge.builtin_data import python_docstrings

    passages = list(python_docstrings().passages.values())
    return passages[::7][:n]


@pytest.fixture(scope="module")
def docstrings():
    return long_tailed_texts(40)


def tiny_config(model_type: str):
    from transformers import AutoConfig

    common = {"vocab_size": 300, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
              "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 512, "pad_token_id": 0,
              "bos_token_id": 1, "eos_token_id": 2}
    extra = {  # small sliding windows, so texts longer than the window exercise that mask too
        "qwen3": {"head_dim": 16}, "gemma": {"head_dim": 16}, "gemma2": {"head_dim": 16, "sliding_window": 8},
        "gemma3_text": {"head_dim": 16, "sliding_window": 8}, "mistral": {"sliding_window": 8},
        "mixtral": {"num_local_experts": 4, "num_experts_per_tok": 2},
        "qwen3_moe": {"num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 32, "head_dim": 16},
    }
    return AutoConfig.for_model(model_type, **common, **extra.get(model_type, {}))


# --- the plan -------------------------------------------------------------------------------------


def test_best_fit_rows_on_a_worked_example():
    # 5->r0 (1 left), 4->r1 (2), 3->r2 (3), 3->r2 (0), 2->r1 (0), 2->r3 (4), 1->r0 (0): 4 rows,
    # the lower bound ceil(20 / 6).
    assert plan_rows([5, 4, 3, 3, 2, 2, 1], capacity=6) == [[0, 6], [1, 4], [2, 3], [5]]


@pytest.mark.parametrize("seed", range(5))
def test_rows_hold_every_text_once_and_never_exceed_the_longest(seed):
    rng = np.random.default_rng(seed)
    lengths = [int(x) for x in np.minimum(rng.lognormal(4, 1, 300), 512).astype(int) + 1]
    rows = plan_rows(lengths)
    assert sorted(i for row in rows for i in row) == list(range(len(lengths)))
    assert max(sum(lengths[i] for i in row) for row in rows) == max(lengths)
    # best fit leaves at most one row less than half full (two such rows would have merged)
    assert sum(sum(lengths[i] for i in row) <= max(lengths) / 2 for row in rows) <= 1


def test_fill_rows_stops_at_the_row_limit():
    lengths = [6, 5, 5, 4, 1, 1]
    rows = fill_rows(lengths, capacity=6, max_rows=2)
    assert rows == [[0], [1]]  # the second 5 fits no open row and no third row may open: stop there
    assert fill_rows(lengths, capacity=6, max_rows=2, start=2) == [[2, 4], [3, 5]]


def test_forwards_move_the_shortest_texts_into_the_padding_of_the_longest():
    lengths = [10, 6, 4, 3, 2, 1, 1]  # sorted, longest first, as encode sorts them
    # padded, 2 texts a forward: [10, 6] [4, 3] [2, 1] [1] = 20 + 8 + 4 + 1 = 33 positions, 4 forwards.
    # packed: the 6's row has room for 4 tokens, which take the 1, the 1 and the 2 (tightest gap
    # first, shortest text first): 20 + 8 = 28 positions, 2 forwards.
    assert plan_forwards(lengths, max_rows=2) == [[[0], [1, 6, 5, 4]], [[2], [3]]]
    # flash-attention: one row of at most 2 x 10 tokens, then one of at most 2 x 4
    assert plan_forwards(lengths, max_rows=2, single_row=True) == [[[0, 1, 6, 5, 4]], [[2, 3]]]


@pytest.mark.parametrize("seed", range(5))
def test_forwards_place_every_text_once_within_the_padded_shape(seed):
    rng = np.random.default_rng(seed)
    lengths = sorted((int(x) for x in np.minimum(rng.lognormal(4, 1, 300), 512).astype(int) + 1), reverse=True)
    forwards = plan_forwards(lengths, max_rows=16)
    assert sorted(i for rows in forwards for row in rows for i in row) == list(range(len(lengths)))
    for rows in forwards:
        width = lengths[rows[0][0]]
        assert len(rows) <= 16 and all(sum(lengths[i] for i in row) <= width for row in rows)
    padded = sum(min(16, len(lengths) - i) * lengths[i] for i in range(0, len(lengths), 16))
    packed = sum(len(rows) * lengths[rows[0][0]] for rows in forwards)
    assert sum(lengths) <= packed < padded


def test_packed_features_restart_positions_and_transformers_reads_the_same_boundaries():
    from transformers.masking_utils import find_packed_sequence_indices

    rows = [[11, 12, 13], [21], [31, 32], [41, 42, 43]]
    f = pack(rows, pad_id=0)
    assert f["input_ids"].shape == (3, 3)
    assert real_tokens(f) == 9 and f[TEXT_INDEX].shape == f["input_ids"].shape
    flat_ids = f["input_ids"].reshape(-1)
    for i, row in enumerate(rows):
        tokens = (f[TEXT_INDEX].reshape(-1) == i).nonzero().squeeze(1)
        assert flat_ids[tokens].tolist() == row
        assert f["position_ids"].reshape(-1)[tokens].tolist() == list(range(len(row)))
        assert int(f[LAST_INDEX][i]) == int(tokens[-1])
    # transformers' own reading of the position ids: one sequence per text (padding is one more)
    groups = find_packed_sequence_indices(f["position_ids"])
    for r in range(f["input_ids"].shape[0]):
        owners = f[TEXT_INDEX][r]
        for a in range(owners.numel()):
            for b in range(owners.numel()):
                same_text = bool(owners[a] == owners[b])
                assert bool(groups[r, a] == groups[r, b]) == same_text


def test_single_row_gives_flash_attention_the_text_boundaries():
    from transformers import modeling_flash_attention_utils as fa

    rows = [[1, 2, 3], [4], [5, 6], [7, 8, 9, 10]]
    f = pack(rows, pad_id=0, single_row=True)
    assert f["input_ids"].shape == (1, 10) and real_tokens(f) == 10
    assert bool(fa._is_packed_sequence(f["position_ids"], batch_size=1))
    (cu_q, _), (max_q, _) = fa.prepare_fa_kwargs_from_position_ids(f["position_ids"])
    assert cu_q.tolist() == [0, 3, 4, 6, 10] and int(max_q) == 4


@pytest.mark.parametrize("mode", ["lasttoken", "mean", "cls"])
def test_pool_packed_equals_pool_on_the_same_states(mode):
    rows = [[1] * 5, [1] * 2, [1] * 7, [1] * 1]
    f = pack(rows, pad_id=0)
    hidden = torch.randn(*f["input_ids"].shape, 4, dtype=torch.float64)
    got = pool_packed(hidden, f, mode)
    # reference: each text's states cut out by hand, pooled as a one-row unpadded batch
    flat = hidden.reshape(-1, 4)
    for i in range(len(rows)):
        states = flat[f[TEXT_INDEX].reshape(-1) == i].unsqueeze(0)
        want = pool(states, torch.ones(states.shape[:2], dtype=torch.long), mode)[0]
        torch.testing.assert_close(got[i], want, rtol=0, atol=1e-12)


# --- packed equals padded --------------------------------------------------------------------------


@pytest.mark.parametrize("model_type", sorted(PACKABLE_MODEL_TYPES))
@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_every_packable_family_gives_each_text_its_lone_forward(model_type, attention):
    from transformers import AutoModel

    torch.manual_seed(0)
    config = tiny_config(model_type)
    try:
        model = AutoModel.from_config(config, attn_implementation=attention).eval()
    except ValueError as exc:  # e.g. gemma2 has no SDPA path in transformers
        pytest.skip(str(exc).splitlines()[0])
    lengths = [7, 3, 12, 1, 5, 9, 2]  # 12 > the sliding windows of 8
    rows = [torch.randint(3, 300, (n,)).tolist() for n in lengths]
    f = pack(rows, pad_id=0)
    assert f["input_ids"].shape[0] < len(rows)  # several texts share a row
    with torch.no_grad():
        alone = torch.stack([model(input_ids=torch.tensor([r]), use_cache=False).last_hidden_state[0, -1]
                             for r in rows])
        hidden = model(input_ids=f["input_ids"], position_ids=f["position_ids"], use_cache=False).last_hidden_state
    got = pool_packed(hidden, f, "lasttoken")
    scale = alone.abs().max()
    tol = fp32_tol(config.num_hidden_layers, max(config.intermediate_size, config.hidden_size))
    assert (got - alone).abs().max() <= tol * scale


def test_negative_controls_a_kv_cache_or_unrestarted_positions_let_texts_see_each_other(tiny_qwen3_embedder):
    emb = Embedder.from_pretrained(tiny_qwen3_embedder, dtype="float32")
    rows = emb.token_ids(["first text of the row", "second, which must not see the first", "third"])
    f = pack(rows, pad_id=0, single_row=True)
    with torch.no_grad():
        alone = torch.cat([emb.embed(emb.batch([r])) for r in rows])
        packed = emb.embed(f)
        with_cache = emb.model(input_ids=f["input_ids"], position_ids=f["position_ids"]).last_hidden_state
        running = emb.model(input_ids=f["input_ids"], use_cache=False).last_hidden_state
    tol = fp32_tol(2, 192)
    assert (packed - alone).abs().max() <= tol
    for hidden in (with_cache, running):  # what a packing that forgets use_cache=False or the restarts gets
        wrong = F.normalize(pool_packed(hidden, f, "lasttoken"), dim=-1)
        assert (wrong[1:] - alone[1:]).abs().max() > 1e3 * tol


@pytest.mark.parametrize("device", DEVICES)
def test_encode_packed_equals_padded_and_lone_texts_on_long_tailed_text(tiny_qwen3_embedder, docstrings, device):
    emb = Embedder.from_pretrained(tiny_qwen3_embedder, dtype="float32", device=device, max_length=256)
    padded = emb.encode(docstrings, batch_size=8, packing=False)
    packed = emb.encode(docstrings, batch_size=8, packing=True)
    alone = np.stack([emb.encode([t], packing=False)[0] for t in docstrings[:10]])
    tol = fp32_tol(2, 256)
    np.testing.assert_allclose(packed, padded, rtol=0, atol=tol)
    np.testing.assert_allclose(packed[:10], alone, rtol=0, atol=tol)  # input order kept
    assert np.abs(packed - np.roll(padded, 1, axis=0)).max() > 100 * tol  # rows out of order would fail


def test_packed_forwards_hold_more_texts_and_fewer_positions(tiny_qwen3_embedder, docstrings):
    emb = Embedder.from_pretrained(tiny_qwen3_embedder, dtype="float32", max_length=256)
    rows = emb.token_ids(docstrings)
    order = sorted(range(len(rows)), key=lambda i: -len(rows[i]))
    padded = emb._forwards(rows, order, 8, False)
    packed = emb._forwards(rows, order, 8, True)
    assert sorted(i for group, _ in packed for i in group) == list(range(len(rows)))
    assert len(packed) <= len(padded) and max(len(group) for group, _ in packed) > 8
    assert sum(f["input_ids"].numel() for _, f in packed) < sum(f["input_ids"].numel() for _, f in padded)
    for (group, f), (_, g) in zip(packed, padded):  # never wider, never more rows than padding
        assert f["input_ids"].shape[0] <= 8 and f["input_ids"].shape[1] <= g["input_ids"].shape[1]
    eos = emb._eos_id
    for _, f in packed:  # every text ends in its one EOS, and the vector is read there
        assert (f["input_ids"].reshape(-1)[f[LAST_INDEX]] == eos).all()
        assert int((f["input_ids"][f[TEXT_INDEX] >= 0] == eos).sum()) == f[LAST_INDEX].numel()


def test_auto_packs_long_tailed_batches_and_pads_uniform_ones(tiny_qwen3_embedder, docstrings):
    emb = Embedder.from_pretrained(tiny_qwen3_embedder, dtype="float32", max_length=256)
    assert TEXT_INDEX in emb.tokenize(docstrings[:16], packing="auto")
    uniform = emb.tokenize(["one two three"] * 4, packing="auto")
    assert "attention_mask" in uniform and TEXT_INDEX not in uniform
    assert TEXT_INDEX in emb.tokenize(["one two three"] * 4, packing=True)


@pytest.mark.parametrize("mode", ["mean", "cls"])
def test_decoder_with_mean_or_first_token_pooling_packs_too(tiny_qwen3_embedder, docstrings, mode):
    emb = Embedder.from_pretrained(tiny_qwen3_embedder, dtype="float32", max_length=128, pooling=mode)
    emb.spec.padding_side = "right"
    with torch.no_grad():
        padded = emb.embed(emb.tokenize(docstrings[:12], packing=False))
        packed = emb.embed(emb.tokenize(docstrings[:12], packing=True))
    torch.testing.assert_close(packed, padded, rtol=0, atol=fp32_tol(2, 192))


def test_encoders_fall_back_to_padding_with_one_log_line(minilm, caplog):
    emb = Embedder.from_pretrained(minilm, dtype="float32")
    texts = ["short", "a rather longer sentence about packing", "mid length text"]
    with caplog.at_level(logging.INFO, logger="embedforge.embedder"):
        padded = emb.encode(texts, packing=False)
        for _ in range(2):
            np.testing.assert_array_equal(emb.encode(texts, packing=True), padded)
    assert len([r for r in caplog.records if "padded batches" in r.getMessage()]) == 1
    assert "attention_mask" in emb.tokenize(texts, packing=True)
    with pytest.raises(InputError, match="cannot pack"):
        emb.embed(pack(emb.token_ids(texts), pad_id=0))


# --- gradients: plain, LoRA, GradCache ------------------------------------------------------------


def embedding_grads(emb: Embedder, features_list, target: torch.Tensor) -> dict[str, torch.Tensor]:
    """Parameter gradients of sum(embeddings * target) over chunks embedded with gradient."""
    emb.model.zero_grad(set_to_none=True)
    vectors = torch.cat([emb.embed(f) for f in features_list])
    (vectors * target).sum().backward()
    return {n: p.grad.detach().clone() for n, p in emb.model.named_parameters() if p.grad is not None}


def assert_grads_close(got: dict, want: dict, tol: float) -> None:
    assert got.keys() == want.keys() and want
    for name, value in want.items():
        assert (got[name] - value).norm() <= tol * max(value.norm(), 1e-12), name


@pytest.mark.parametrize("device", DEVICES)
def test_packed_gradient_equals_padded_gradient(tiny_qwen3_embedder, docstrings, device):
    emb = Embedder.from_pretrained(tiny_qwen3_embedder, dtype="float32", device=device, max_length=128)
    emb.model.train()  # Qwen3 has no dropout: train mode changes nothing but the autograd graph
    texts = docstrings[:16]
    target = torch.randn(len(texts), emb.dimension, generator=torch.Generator().manual_seed(0)).to(device)
    want = embedding_grads(emb, [emb.tokenize(texts, packing=False)], target)
    got = embedding_grads(emb, [emb.tokenize(texts, packing=True)], target)
    assert_grads_close(got, want, fp32_tol(2 * 2, 192))  # backward doubles the path


def test_packed_lora_gradient_equals_padded(tiny_qwen3_embedder, docstrings):
    from peft import LoraConfig, get_peft_model

    emb = Embedder.from_pretrained(tiny_qwen3_embedder, dtype="float32", max_length=128)
    torch.manual_seed(0)
    # init_lora_weights=False: B is random too, so the adapter really changes the forward
    emb.model = get_peft_model(emb.model, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0,
                                                     target_modules="all-linear", init_lora_weights=False))
    texts = docstrings[:12]
    target = torch.randn(len(texts), emb.dimension, generator=torch.Generator().manual_seed(1))
    want = embedding_grads(emb, [emb.tokenize(texts, packing=False)], target)
    got = embedding_grads(emb, [emb.tokenize(texts, packing=True)], target)
    assert all("lora_" in name for name in want)
    assert_grads_close(got, want, fp32_tol(2 * 2, 192))
    with torch.no_grad():
        base = emb.model.get_base_model()
        plain = Embedder(base, emb.tokenizer, emb.spec)
        with emb.model.disable_adapter():
            without = plain.embed(plain.tokenize(texts))
        adapted = emb.embed(emb.tokenize(texts, packing=True))
    assert (adapted - without).abs().max() > 1e3 * fp32_tol(2, 192)  # the adapter is in the packed forward


def test_gradcache_over_packed_chunks_equals_padded_full_batch(tiny_qwen3_embedder, docstrings):
    from embedforge.train.gradcache import gradcache_step

    emb = Embedder.from_pretrained(tiny_qwen3_embedder, dtype="float32", max_length=128)
    queries, docs = docstrings[:6], docstrings[6:12]
    tau = 0.05

    def loss_fn(e):
        scores = e["q"] @ e["d"].T / tau
        return F.cross_entropy(scores, torch.arange(len(queries)))

    emb.model.zero_grad(set_to_none=True)
    loss_fn({"q": emb.embed(emb.tokenize(queries)), "d": emb.embed(emb.tokenize(docs))}).backward()
    want = {n: p.grad.clone() for n, p in emb.model.named_parameters()}
    emb.model.zero_grad(set_to_none=True)
    chunks = {"q": [emb.tokenize(queries[:4], packing=True), emb.tokenize(queries[4:], packing=True)],
              "d": [emb.tokenize(docs[:3], packing=True), emb.tokenize(docs[3:], packing=True)]}
    gradcache_step(emb.embed, chunks, loss_fn)
    got = {n: p.grad.clone() for n, p in emb.model.named_parameters()}
    # the scores divide embedding differences by tau before the softmax: 1/tau more relative error
    assert_grads_close(got, want, fp32_tol(2 * 2, 192) * (1 + 1 / tau))


# --- a real decoder -------------------------------------------------------------------------------


@pytest.mark.slow
def test_smollm2_packed_equals_padded(smollm2):
    emb = Embedder.from_pretrained(smollm2, dtype="float32", max_length=128)
    texts = long_tailed_texts(12)
    padded = emb.encode(texts, batch_size=4, packing=False)
    packed = emb.encode(texts, batch_size=4, packing=True)
    assert emb.spec.padding_side == "left"  # the padded run shifts positions; RoPE is relative
    config = emb.model.config
    np.testing.assert_allclose(packed, padded, rtol=0,
                               atol=fp32_tol(config.num_hidden_layers, config.intermediate_size))

"""Token-budget chunks of a training step: each within the budget, in order, greedy; and the
activation estimate the default budget rests on bounds what autograd really keeps for the backward
(measured by saved-tensor hooks, unique storages) without overstating it more than a few times."""

from __future__ import annotations

import itertools
import random

import pytest
import torch

from embedforge.train.chunking import (
    activation_bytes_per_token,
    padded_positions,
    plan_chunks,
    plan_padded_chunks,
)


@pytest.mark.parametrize("max_tokens,max_texts", [(64, None), (200, 5), (None, 3), (10, None)])
def test_chunks_respect_the_budget_keep_the_order_and_are_greedy(max_tokens, max_texts):
    rng = random.Random(0)
    lengths = [rng.randint(1, 40) for _ in range(97)]
    order = sorted(range(len(lengths)), key=lambda i: (lengths[i], i))
    chunks = plan_chunks(order, lengths, max_tokens, max_texts)
    assert [i for c in chunks for i in c] == order

    def cost(chunk):
        return len(chunk) * max(lengths[i] for i in chunk)

    for k, chunk in enumerate(chunks):
        assert chunk
        if len(chunk) > 1:  # one over-long text alone is allowed to exceed the budget
            assert max_tokens is None or cost(chunk) <= max_tokens
        assert max_texts is None or len(chunk) <= max_texts
        if k + 1 < len(chunks):  # greedy: the next text would not have fitted
            grown = chunk + chunks[k + 1][:1]
            assert (max_tokens is not None and cost(grown) > max_tokens) or (
                max_texts is not None and len(grown) > max_texts)


def brute_force_best(order, lengths, forward_cost):
    """The least padded positions + forward costs over EVERY split of `order` into consecutive runs."""
    best = None
    for mask in itertools.product([False, True], repeat=len(order) - 1):
        chunks, current = [], [order[0]]
        for cut, i in zip(mask, order[1:]):
            if cut:
                chunks.append(current)
                current = []
            current.append(i)
        chunks.append(current)
        cost = padded_positions(chunks, lengths) + forward_cost * len(chunks)
        best = cost if best is None else min(best, cost)
    return best


@pytest.mark.parametrize("seed", range(6))
def test_padded_chunks_are_the_cheapest_split(seed):
    rng = random.Random(seed)
    lengths = [rng.choice([rng.randint(2, 12), rng.randint(40, 300)]) for _ in range(11)]
    order = sorted(range(len(lengths)), key=lambda i: (lengths[i], i))
    forward_cost = rng.choice([0, 16, 256])
    chunks = plan_padded_chunks(order, lengths, None, None, forward_cost=forward_cost)
    assert [i for c in chunks for i in c] == order
    assert padded_positions(chunks, lengths) + forward_cost * len(chunks) == brute_force_best(order, lengths,
                                                                                             forward_cost)


def test_padded_chunks_keep_the_budget_and_save_the_long_tail():
    rng = random.Random(0)
    lengths = [rng.randint(3, 20) for _ in range(60)] + [rng.randint(200, 512) for _ in range(4)]
    order = sorted(range(len(lengths)), key=lambda i: (lengths[i], i))
    for max_tokens, max_texts in ((None, None), (600, None), (None, 7), (1000, 9)):
        chunks = plan_padded_chunks(order, lengths, max_tokens, max_texts)
        assert [i for c in chunks for i in c] == order
        for chunk in chunks:
            assert max_texts is None or len(chunk) <= max_texts
            assert max_tokens is None or len(chunk) == 1 or padded_positions([chunk], lengths) <= max_tokens
    one = padded_positions([order], lengths)
    assert padded_positions(plan_padded_chunks(order, lengths, None, None), lengths) < one / 4
    with pytest.raises(ValueError, match="sorted"):
        plan_padded_chunks(order[::-1], lengths, None, None)


def saved_activation_bytes(model: torch.nn.Module, features: dict[str, torch.Tensor]) -> int:
    """Bytes of the distinct tensors autograd saves for the backward of one forward (parameters excluded)."""
    params = {p.data_ptr() for p in model.parameters()}
    storages: dict[int, int] = {}

    def pack(tensor):
        ptr = tensor.untyped_storage().data_ptr()
        if ptr not in params:
            storages[ptr] = max(storages.get(ptr, 0), tensor.untyped_storage().nbytes())
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = model(**features).last_hidden_state
    out.sum().backward()
    return sum(storages.values())


@pytest.mark.slow
@pytest.mark.parametrize("which", ["minilm", "tiny_qwen3_embedder"])
def test_activation_estimate_bounds_what_autograd_keeps(which, request):
    from embedforge.embedder import Embedder

    torch.set_num_threads(1)
    emb = Embedder.from_pretrained(request.getfixturevalue(which), dtype="float32")
    emb.model.train()
    texts = [("word " * n).strip() for n in (20, 60, 120, 120)]
    features = emb.tokenize(texts, max_length=128)
    tokens = features["input_ids"].numel()  # padded positions, as the budget counts them
    measured = saved_activation_bytes(emb.model, features)
    estimate = tokens * activation_bytes_per_token(emb.model.config, features["input_ids"].shape[1], torch.float32)
    assert measured <= estimate <= 4 * measured, (measured, estimate)

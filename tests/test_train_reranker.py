"""Reranker training on the tiny Qwen3 causal LM: it learns to separate positives from negatives,
the trained folder scores exactly as the official Qwen3-Reranker model-card code (transcribed in test_core_reranker),
and chunked (memory-bounded) list-wise steps equal one unchunked step."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from test_core_reranker import official_scores  # the model-card code, transcribed once
from train_workers.precision import relative_error, reorder_rtol, transformer_terms
from train_workers.toy_data import toy_rows, write_toy

from embedforge.train.config import TrainConfig
from embedforge.train.trainer import Trainer, train

INSTRUCTION = "Find the note about the same two words"


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)


def separation(reranker, rows):
    """Fraction of (positive, negative) pairs ranked correctly, over held-out rows (pairwise AUC)."""
    wins = []
    for row in rows:
        scores = reranker.score(row["query"], [row["positive"], *row["negatives"]], instruction=INSTRUCTION)
        wins += [float(scores[0] > s) for s in scores[1:]]
    return float(np.mean(wins))


def test_pointwise_reranker_learns_and_scores_like_the_official_code(tiny_qwen3_lm, tmp_path):
    from embedforge import Reranker

    data = write_toy(tmp_path / "train.jsonl", 96, negatives=3, seed=1)
    held_out = toy_rows(16, negatives=3, seed=99)
    before = separation(Reranker.from_pretrained(tiny_qwen3_lm, max_length=128), held_out)
    cfg = TrainConfig.model_validate({
        "model": str(tiny_qwen3_lm), "task": "reranker", "method": "full", "output_dir": str(tmp_path / "out"),
        "data": [{"path": data, "num_negatives": 3, "instruction": INSTRUCTION}], "batch_size": 8,
        "max_steps": 25, "lr": 2e-3, "max_length": 128, "save_steps": 0, "progress_bar": False, "warmup_steps": 4,
    })
    result = train(cfg)
    trained = Reranker.from_pretrained(result.final_dir, max_length=128)
    after = separation(trained, held_out)
    assert after >= 0.85 and after > before + 0.2, (before, after)
    pairs = [(r["query"], d) for r in held_out[:3] for d in (r["positive"], r["negatives"][0])]
    ours = [float(trained.score(q, [d], instruction=INSTRUCTION)[0]) for q, d in pairs]
    # Probabilities from the same float32 forward written twice (train_workers/precision.py), T the
    # longest templated pair.
    features = trained.tokenize_pairs(*zip(*pairs), INSTRUCTION, max_length=128)
    atol = reorder_rtol(torch.float32, transformer_terms(features["input_ids"].shape[1], tiny_qwen3_lm))
    official = official_scores(str(result.final_dir), pairs, INSTRUCTION, max_length=512)
    assert np.allclose(ours, official, rtol=0, atol=atol)


@pytest.mark.parametrize("loss", ["listwise", "pointwise"])
def test_chunked_reranker_step_gives_the_unchunked_gradients(tiny_qwen3_lm, tmp_path, loss):
    data = write_toy(tmp_path / "train.jsonl", 24, negatives=2, seed=2)
    results = {}
    for name, chunk in (("whole", None), ("chunked", 3)):
        cfg = TrainConfig.model_validate({
            "model": str(tiny_qwen3_lm), "task": "reranker", "method": "lora", "output_dir": str(tmp_path / name),
            "data": [{"path": data, "num_negatives": 2}], "batch_size": 4, "mini_batch_size": chunk,
            "loss": {"reranker": loss}, "progress_bar": False, "max_length": 96,
        })
        trainer = Trainer(cfg)
        trainer.setup()
        value, _, tokens = trainer.backward(trainer.sampler.next_batch())
        grads = {n: p.grad.clone() for n, p in trainer.model.named_parameters() if p.grad is not None}
        results[name] = (float(value), grads, tokens)
    (whole_loss, whole, tokens), (chunked_loss, chunked, _) = results["whole"], results["chunked"]
    # The same float32 sums in another order (train_workers/precision.py): the loss and the whole
    # gradient, as a norm over every entry (one entry can be a sum that cancels: a list-wise softmax
    # over documents that share their query). Before: entry by entry against 1e-4 of each tensor's
    # largest entry, which one list-wise entry exceeded (5.5e-8 against 5e-8).
    tolerance = reorder_rtol(torch.float32, transformer_terms(tokens, tiny_qwen3_lm))
    assert chunked_loss == pytest.approx(whole_loss, rel=tolerance)
    assert set(whole) == set(chunked) and any(g.abs().max() > 0 for g in whole.values())
    assert relative_error(whole, chunked) <= tolerance

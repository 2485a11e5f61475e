"""The embedding trainer in one process on the tiny Qwen3 fixture: what it writes loads back
(LoRA merged and as an adapter, checked against peft's own unmerged forward and against
sentence-transformers), GradCache and gradient checkpointing give the gradients of a plain step,
and bad inputs are reported before training."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from train_workers.precision import forward_atol, relative_error, reorder_rtol, transformer_terms
from train_workers.toy_data import config, max_diff, toy_rows, weights, write_toy

from embedforge.errors import ConfigError, InputError
from embedforge.train.config import TrainConfig
from embedforge.train.trainer import Trainer, train

TEXTS = ["find alpha beta", "a note about gamma and delta", "blue coral"]


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)


@pytest.fixture(scope="module")
def data_path(tmp_path_factory):
    return write_toy(tmp_path_factory.mktemp("data") / "train.jsonl", 40)



def test_lora_final_is_merged_and_equals_peft_unmerged_forward(tiny_qwen3_embedder, data_path, tmp_path):
    import copy

    from peft import PeftModel

    from embedforge import Embedder
    from embedforge.modeling import load_backbone

    result = train(config(tiny_qwen3_embedder, data_path, tmp_path / "out", method="lora", lora={"rank": 4}))
    final = tmp_path / "out" / "final"
    assert result.final_dir == str(final) and result.steps == 3 and not result.interrupted
    loaded = Embedder.from_pretrained(final)
    trained = loaded.encode(TEXTS)

    def with_model(model):  # the same tokenizer and spec, another backbone
        other = copy.copy(loaded)
        other.model = model.eval()
        return other.encode(TEXTS)

    # Unit-vector entries of two float32 forwards in different orders (merged W + BA against x W + (x A) B:
    # the rank-4 product adds 4 terms); train_workers/precision.py.
    atol = forward_atol(tiny_qwen3_embedder, loaded.tokenizer, TEXTS, extra_terms=4)
    base = with_model(load_backbone(tiny_qwen3_embedder, device="cpu"))
    assert np.abs(trained - base).max() > atol  # the merge is not silently the base (an unmerged adapter)
    # Independent reference: peft's unmerged adapter forward on the base backbone.
    reference = PeftModel.from_pretrained(load_backbone(tiny_qwen3_embedder, device="cpu"), str(final / "adapter"))
    assert np.allclose(trained, with_model(reference), rtol=0, atol=atol)
    assert np.allclose(trained, Embedder.from_pretrained(final / "adapter").encode(TEXTS), rtol=0, atol=atol)
    lines = [json.loads(line) for line in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines] == [1, 2, 3] and all(np.isfinite(r["loss"]) for r in lines)
    assert {"lr", "tokens_per_s", "effective_negatives", "grad_norm"} <= set(lines[0])
    report = json.loads((tmp_path / "out" / "data_report.json").read_text())
    assert report[0]["kept"] == 40


def test_full_finetune_final_loads_in_sentence_transformers_with_the_same_vectors(tiny_qwen3_embedder, data_path,
                                                                                   tmp_path):
    from sentence_transformers import SentenceTransformer

    from embedforge import Embedder

    train(config(tiny_qwen3_embedder, data_path, tmp_path / "out", loss={"matryoshka_dims": [16, 64]}))
    final = tmp_path / "out" / "final"
    ours = Embedder.from_pretrained(final)
    assert ours.spec.matryoshka_dims == [16, 64]
    st = SentenceTransformer(str(final), device="cpu")
    atol = forward_atol(final, ours.tokenizer, TEXTS)  # the same float32 forward, batched and padded otherwise
    assert np.allclose(ours.encode(TEXTS), st.encode(TEXTS), rtol=0, atol=atol)
    base = weights(tiny_qwen3_embedder)
    # Trained, not copied: Adam's first step moves a weight with a gradient by about lr (1e-2), a copy by 0.
    assert max_diff(weights(final), base) > 0.1 * 1e-2
    prompt = json.loads((final / "config_sentence_transformers.json").read_text())["prompts"]["query"]
    assert prompt == "Instruct: Find the note\nQuery:"


def first_step_gradients(cfg: TrainConfig) -> tuple[float, dict[str, torch.Tensor], int]:
    trainer = Trainer(cfg)
    trainer.setup()
    loss, _, tokens = trainer.backward(trainer.sampler.next_batch())
    grads = {n: p.grad.detach().clone() for n, p in trainer.model.named_parameters() if p.grad is not None}
    return float(loss), grads, tokens


def test_chunking_checkpointing_and_packing_give_the_plain_gradients(tiny_qwen3_embedder, data_path, tmp_path,
                                                                      monkeypatch):
    import embedforge.embedder
    import embedforge.train.chunking
    import embedforge.train.gradcache

    packed, chunked, planned = [], [], []
    real_pack, real_gradcache = embedforge.embedder.pack, embedforge.train.gradcache.gradcache_step
    real_plan = embedforge.train.chunking.plan_padded_chunks
    monkeypatch.setattr(embedforge.embedder, "pack", lambda *a, **k: packed.append(1) or real_pack(*a, **k))
    monkeypatch.setattr(embedforge.train.gradcache, "gradcache_step",
                        lambda *a, **k: chunked.append(1) or real_gradcache(*a, **k))
    monkeypatch.setattr(embedforge.train.chunking, "plan_padded_chunks",
                        lambda *a, **k: planned.append(real_plan(*a, **k)) or planned[-1])
    # The reference: the whole batch in ONE padded forward (no forward is worth cutting off).
    monkeypatch.setattr(embedforge.train.chunking, "FORWARD_COST", 10**9)
    base = {"method": "lora", "lora": {"rank": 4}, "loss": {"matryoshka_dims": [16, 64]}, "packing": False,
            "max_tokens_per_forward": None}
    plain_loss, plain, tokens = first_step_gradients(config(tiny_qwen3_embedder, data_path, tmp_path / "a", **base))
    assert any(g.abs().max() > 0 for g in plain.values())
    assert len(planned[-1]) == 1 and not packed and not chunked
    # The same float32 sums in other orders (train_workers/precision.py); the gradient compared as a
    # whole (one entry can be a sum that cancels). The loss reads similarities scaled by 1 / temperature
    # (20), which multiplies their rounding error.
    tolerance = reorder_rtol(torch.float32, transformer_terms(tokens, tiny_qwen3_embedder)) / 0.05
    one_forward = 10**9
    for extra, forward_cost in (({"mini_batch_size": 3}, one_forward),
                                ({"mini_batch_size": 5, "gradient_checkpointing": True}, one_forward),
                                ({"packing": True}, one_forward), ({"packing": True, "mini_batch_size": 5}, one_forward),
                                ({"max_tokens_per_forward": 64}, one_forward), ({}, 0),
                                ({"mini_batch_size": 5}, 0)):
        monkeypatch.setattr(embedforge.train.chunking, "FORWARD_COST", forward_cost)
        packed.clear()
        chunked.clear()
        planned.clear()
        loss, grads, _ = first_step_gradients(config(tiny_qwen3_embedder, data_path, tmp_path / "b",
                                                     **{**base, **extra}))
        assert bool(packed) == extra.get("packing", False)
        assert bool(chunked) == ("mini_batch_size" in extra or "max_tokens_per_forward" in extra)
        if forward_cost == 0:  # length groups: forwarded one after the other, or through GradCache
            assert len(planned[-1]) > 1
        assert loss == pytest.approx(plain_loss, rel=tolerance)
        assert set(grads) == set(plain)
        assert relative_error(plain, grads) <= tolerance


def test_bad_inputs_are_reported_before_training(tiny_qwen3_embedder, data_path, tmp_path):
    with pytest.raises(ConfigError, match="matryoshka_dims: 128 exceeds the model's embedding width 64"):
        train(config(tiny_qwen3_embedder, data_path, tmp_path / "b", loss={"matryoshka_dims": [128]}))
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(toy_rows(1)[0]) + "\n" + json.dumps({"query": "q", "positive": "p", "negatives": "x"})
                   + "\n")
    with pytest.raises(InputError, match=r"bad\.jsonl:2: field 'negatives'"):
        train(config(tiny_qwen3_embedder, str(bad), tmp_path / "c"))



"""Reranker against the official Qwen3-Reranker model-card code, written out here independently."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from embedforge import Reranker
from embedforge.errors import InputError

QUERIES = ["What is the capital of China?", "Explain gravity"]
DOCS = [
    "The capital of China is Beijing.",
    ("Gravity is a force that attracts two bodies towards each other. It gives weight to physical objects and is "
    "responsible for the movement of planets around the sun."),
]


def official_scores(folder, pairs_qd, instruction=None, max_length=8192):
    """Transcribed from the Qwen3-Reranker-0.6B model card (transformers usage)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder, padding_side="left")
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    token_false_id = tokenizer.convert_tokens_to_ids("no")
    token_true_id = tokenizer.convert_tokens_to_ids("yes")
    prefix = (
        "<|im_start|>system\nJudge whether the Document meets the requirements based on the Query and the Instruct "
        'provided. Note that the answer can only be "yes" or "no".<|im_end|>\n<|im_start|>user\n'
    )
    suffix = "<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n"
    prefix_tokens = tokenizer.encode(prefix, add_special_tokens=False)
    suffix_tokens = tokenizer.encode(suffix, add_special_tokens=False)

    def format_instruction(instruction, query, doc):
        if instruction is None:
            instruction = "Given a web search query, retrieve relevant passages that answer the query"
        return f"<Instruct>: {instruction}\n<Query>: {query}\n<Document>: {doc}"

    pairs = [format_instruction(instruction, q, d) for q, d in pairs_qd]
    inputs = tokenizer(pairs, padding=False, truncation="longest_first", return_attention_mask=False,
                       max_length=max_length - len(prefix_tokens) - len(suffix_tokens))
    for i, ele in enumerate(inputs["input_ids"]):
        inputs["input_ids"][i] = prefix_tokens + ele + suffix_tokens
    inputs = tokenizer.pad(inputs, padding=True, return_tensors="pt", max_length=max_length)
    with torch.no_grad():
        batch_scores = model(**inputs).logits[:, -1, :]
    true_vector = batch_scores[:, token_true_id]
    false_vector = batch_scores[:, token_false_id]
    batch_scores = torch.stack([false_vector, true_vector], dim=1)
    batch_scores = torch.nn.functional.log_softmax(batch_scores, dim=1)
    return np.array(batch_scores[:, 1].exp().tolist())


def log_odds(p):
    p = np.asarray(p, dtype=np.float64)
    return np.log(p) - np.log1p(-p)


@pytest.mark.parametrize("instruction", [None, "Judge code relevance"])
def test_scores_match_official_card_code(tiny_qwen3_lm, instruction):
    pairs = [(q, d) for q in QUERIES for d in DOCS]
    expected = official_scores(str(tiny_qwen3_lm), pairs, instruction)
    rr = Reranker.from_pretrained(tiny_qwen3_lm)
    assert (rr.yes_id, rr.no_id) == (9693, 2152)
    got = rr.score([q for q, _ in pairs], [d for _, d in pairs], instruction=instruction, batch_size=3)
    np.testing.assert_allclose(got, expected, atol=1e-4)
    # a random model's p(yes) sits near 0, so hold the log-odds too: the finer, failable comparison
    np.testing.assert_allclose(log_odds(got), log_odds(expected), atol=1e-3)
    assert np.ptp(log_odds(got)) > 1e-2  # the pairs really score differently


def test_truncation_cuts_the_document_not_the_suffix(tiny_qwen3_lm):
    rr = Reranker.from_pretrained(tiny_qwen3_lm, max_length=96)
    long_doc = "Beijing is a big city. " * 100
    with pytest.warns(UserWarning, match="document truncated"):
        features = rr.tokenize_pairs([QUERIES[0]], [long_doc])
    ids = features["input_ids"][0].tolist()
    assert len(ids) == 96
    assert ids[-len(rr.suffix_ids):] == rr.suffix_ids and ids[: len(rr.prefix_ids)] == rr.prefix_ids
    with pytest.warns(UserWarning):
        got = rr.score(QUERIES[0], [long_doc])
    np.testing.assert_allclose(got, official_scores(str(tiny_qwen3_lm), [(QUERIES[0], long_doc)], max_length=96),
                               atol=1e-4)


def test_only_the_last_position_logits_are_computed(tiny_qwen3_lm):
    rr = Reranker.from_pretrained(tiny_qwen3_lm)
    seen = {}

    def record(module, inputs, output):
        seen["shape"] = tuple(output.shape)

    hook = rr.model.lm_head.register_forward_hook(record)
    rr.score(QUERIES[0], DOCS)
    hook.remove()
    assert seen["shape"][1] == 1


def test_bad_inputs(tiny_qwen3_lm):
    rr = Reranker.from_pretrained(tiny_qwen3_lm)
    assert rr.score("q", []).shape == (0,)
    with pytest.raises(InputError, match=r"documents\[1\]: empty string"):
        rr.score("q", ["a", " "])
    with pytest.raises(InputError, match="query: empty string"):
        rr.score("", ["a"])


def test_a_model_without_an_lm_head_is_refused(minilm, tiny_qwen3_embedder):
    from embedforge.errors import ModelLoadError

    # an encoder has no LM head to read yes/no from: AutoModelForCausalLM would invent a random one
    with pytest.raises(ModelLoadError, match="not a yes/no reranker"):
        Reranker.from_pretrained(minilm)
    # a decoder body whose head is tied to its embeddings (Qwen3-0.6B) does score
    assert Reranker.from_pretrained(tiny_qwen3_embedder).score("q", ["d"]).shape == (1,)

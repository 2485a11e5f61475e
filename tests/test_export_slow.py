"""Export of a real Llama-architecture model (SmolLM2-135M-Instruct): the embedder's pooling token is
the tokenizer's own `<|endoftext|>` (its unk token), `LlamaModel` is renamed `LlamaForCausalLM`, and
the reranker becomes `LlamaForSequenceClassification`; every runtime check of the gate passes."""

from __future__ import annotations

import json

import pytest
import torch

from embedforge.export import ExportConfig
from embedforge.export import export as run_export

pytestmark = pytest.mark.slow


@pytest.fixture(autouse=True)
def one_thread():
    torch.set_num_threads(1)


def test_smollm2_embedder_export(smollm2, tmp_path):
    """A chat LLM exports as it is embedded: each text one user turn of its chat template, no EOS baked
    into the tokenizer; the gate rendered that turn under plain transformers (both padding sides) and
    compared sentence-transformers on the folder, queries with their prompt as the system turn."""
    from transformers import AutoTokenizer

    out = tmp_path / "smol-embedder"
    result = run_export(ExportConfig(model=str(smollm2), kind="embedder", output=str(out), dtype="float32"))
    checks = {c["name"]: c for c in result.report["checks"]}
    assert result.report["passed"] and result.report["facts"]["eos_post_processor"] is None
    assert {"tokenizer_matches_embedder", "transformers_left_padding", "transformers_right_padding",
            "sentence_transformers_parity"} <= set(checks)
    assert json.loads((out / "config.json").read_text())["architectures"] == ["LlamaForCausalLM"]
    tokenizer = AutoTokenizer.from_pretrained(str(out))
    assert tokenizer("hello world")["input_ids"] == tokenizer("hello world", add_special_tokens=False)["input_ids"]


def test_smollm2_reranker_seq_cls_export(smollm2, tmp_path):
    out = tmp_path / "smol-reranker"
    result = run_export(ExportConfig(model=str(smollm2), kind="reranker", output=str(out), dtype="float32"))
    checks = {c["name"]: c for c in result.report["checks"]}
    assert result.report["passed"] and checks["cross_encoder_parity"]["max_abs_diff"] < 1e-4
    assert json.loads((out / "config.json").read_text())["architectures"] == ["LlamaForSequenceClassification"]

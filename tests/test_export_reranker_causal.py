"""Reranker export, causal form (what the official Qwen3-Reranker ships): it reloads with `Reranker`
and runs the official model-card code to the source's p(yes), CrossEncoder scores it through
`LogitScore(yes, no)`, and `reranker_template.json` carries the vLLM overrides."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from test_export_helpers import PAIRS, make_judge, official_causal_scores

from embedforge.export import ExportConfig
from embedforge.export import export as run_export


@pytest.fixture(scope="module")
def exported(tiny_qwen3_lm, tmp_path_factory):
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("rerank-causal")
    source = make_judge(tiny_qwen3_lm, root / "judge", tied=True)
    out = root / "causal"
    run_export(ExportConfig(model=str(source), kind="reranker", format="causal", output=str(out)))
    return source, out


def test_causal_export_reloads_to_the_source_scores(exported):
    from sentence_transformers import CrossEncoder

    from embedforge import Reranker

    source, out = exported
    queries, documents = [q for q, _ in PAIRS], [d for _, d in PAIRS]
    want = Reranker.from_pretrained(source, dtype="float32", device="cpu").score(queries, documents)
    assert want.max() - want.min() > 0.1
    got = Reranker.from_pretrained(out, dtype="float32", device="cpu").score(queries, documents)
    np.testing.assert_allclose(got, want, atol=1e-4)
    np.testing.assert_allclose(official_causal_scores(out, PAIRS), want, atol=1e-4)
    model = CrossEncoder(str(out), device="cpu")
    assert type(model[0].model).__name__ == "Qwen3ForCausalLM"
    np.testing.assert_allclose(model.predict(PAIRS), want, atol=1e-4)


def test_causal_files_carry_the_vllm_overrides(exported):
    _, out = exported
    template = json.loads((out / "reranker_template.json").read_text())
    # `method` is what vLLM's generic SequenceClassificationConfig reads for any *ForCausalLM;
    # `is_original_qwen3_reranker` is the Qwen3-only spelling of it.
    assert template["vllm_hf_overrides"] == {
        "architectures": ["Qwen3ForSequenceClassification"],
        "classifier_from_token": ["no", "yes"],
        "method": "from_2_way_softmax",
        "is_original_qwen3_reranker": True,
    }
    assert json.loads((out / "config.json").read_text())["architectures"] == ["Qwen3ForCausalLM"]
    assert (out / "chat_template.jinja").exists()
    readme = (out / "README.md").read_text()
    assert "--hf-overrides" in readme and "is_original_qwen3_reranker" in readme
    # after a push vLLM cannot open ORG/NAME/chat_template.jinja: the card downloads it first
    assert "--chat-template ./chat_template.jinja" in readme and "/chat_template.jinja" not in readme.replace(
        "./chat_template.jinja", "")

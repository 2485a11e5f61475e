"""Reranker export, sequence-classification form: the one-output head is lm_head[yes] - lm_head[no]
(input embedding rows when tied), so sigmoid(logit) from AutoModelForSequenceClassification and
CrossEncoder.predict equal Reranker.score's p(yes); the shipped template renders the official prompt."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors import safe_open
from test_export_helpers import (
    DEFAULT_TASK,
    NO_ID,
    PAIRS,
    PREFIX,
    SUFFIX,
    YES_ID,
    make_judge,
    official_inputs,
)

from embedforge.export import ExportConfig
from embedforge.export import export as run_export

OTHER_TASK = "Given a question about geography, retrieve the passage that answers it"


@pytest.fixture(scope="module", params=["tied", "untied"])
def exported(request, tiny_qwen3_lm, tmp_path_factory):
    """(source judge folder, seq-cls export folder, source p(yes) default, source p(yes) other task)."""
    from embedforge import Reranker

    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp(f"rerank-{request.param}")
    tied = request.param == "tied"
    source = make_judge(tiny_qwen3_lm, root / "judge", tied=tied, seed=0 if tied else 4)  # mid-range p(yes)
    out = root / "seq-cls"
    run_export(ExportConfig(model=str(source), kind="reranker", format="seq-cls", output=str(out)))
    reranker = Reranker.from_pretrained(source, dtype="float32", device="cpu")
    queries, documents = [q for q, _ in PAIRS], [d for _, d in PAIRS]
    want = reranker.score(queries, documents)
    want_other = reranker.score(queries, documents, instruction=OTHER_TASK)
    assert want.max() - want.min() > 0.1 and 0.05 < want.mean() < 0.95  # scores depend on the pair
    return source, out, want, want_other


def test_head_is_yes_minus_no_rows(exported):
    source, out, *_ = exported
    with safe_open(str(source / "model.safetensors"), "pt") as f:
        names = set(f.keys())
        rows = f.get_tensor("lm_head.weight" if "lm_head.weight" in names else "model.embed_tokens.weight")
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        head = f.get_tensor("score.weight")
        exported_names = set(f.keys())
    assert "lm_head.weight" not in exported_names
    expected = rows[YES_ID].double() - rows[NO_ID].double()
    assert head.shape == (1, rows.shape[1])
    torch.testing.assert_close(head[0].double(), expected, atol=1e-6, rtol=0)
    other = rows[YES_ID + 1].double() - rows[NO_ID].double()
    assert (head[0].double() - other).abs().max() > 1e-3  # the comparison can fail


def test_sequence_classification_sigmoid_is_p_yes(exported):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    _, out, want, want_other = exported
    tokenizer = AutoTokenizer.from_pretrained(str(out), padding_side="left")
    model = AutoModelForSequenceClassification.from_pretrained(str(out)).eval()
    assert model.config.num_labels == 1
    for instruction, expected in ((None, want), (OTHER_TASK, want_other)):
        inputs = official_inputs(tokenizer, PAIRS, instruction)
        with torch.no_grad():
            logits = model(**inputs).logits
        np.testing.assert_allclose(torch.sigmoid(logits[:, 0]).numpy(), expected, atol=1e-4)
    # right padding too: the classifier reads the rightmost non-pad token
    tokenizer.padding_side = "right"
    with torch.no_grad():
        logits = model(**official_inputs(tokenizer, PAIRS)).logits
    np.testing.assert_allclose(torch.sigmoid(logits[:, 0]).numpy(), want, atol=1e-4)


def test_cross_encoder_predicts_p_yes(exported):
    from sentence_transformers import CrossEncoder

    _, out, want, want_other = exported
    model = CrossEncoder(str(out), device="cpu")
    np.testing.assert_allclose(model.predict(PAIRS), want, atol=1e-4)
    np.testing.assert_allclose(model.predict(PAIRS, prompt=OTHER_TASK), want_other, atol=1e-4)


def test_shipped_template_and_files(exported):
    from transformers import AutoTokenizer

    _, out, *_ = exported
    tokenizer = AutoTokenizer.from_pretrained(str(out))
    query, document = PAIRS[0]
    rendered = tokenizer.apply_chat_template(
        [{"role": "query", "content": query}, {"role": "document", "content": document}], tokenize=False)
    assert rendered == f"{PREFIX}<Instruct>: {DEFAULT_TASK}\n<Query>: {query}\n<Document>: {document}{SUFFIX}"
    rendered = tokenizer.apply_chat_template(
        [{"role": "system", "content": OTHER_TASK}, {"role": "query", "content": query},
         {"role": "document", "content": document}], tokenize=False)
    assert rendered == f"{PREFIX}<Instruct>: {OTHER_TASK}\n<Query>: {query}\n<Document>: {document}{SUFFIX}"
    assert tokenizer("hello world")["input_ids"] == tokenizer("hello world", add_special_tokens=False)["input_ids"]

    template = json.loads((out / "reranker_template.json").read_text())
    assert (template["prefix"], template["suffix"]) == (PREFIX, SUFFIX)
    assert (template["yes_token_id"], template["no_token_id"]) == (YES_ID, NO_ID)
    first = template["query_template"].format(prefix=PREFIX, instruction=DEFAULT_TASK, query=query)
    second = template["document_template"].format(document=document, suffix=SUFFIX)
    assert first + second == f"{PREFIX}<Instruct>: {DEFAULT_TASK}\n<Query>: {query}\n<Document>: {document}{SUFFIX}"
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["Qwen3ForSequenceClassification"]
    assert config["pad_token_id"] == 151643 and len(config["id2label"]) == 1
    assert json.loads((out / "tokenizer_config.json").read_text())["padding_side"] == "left"
    report = json.loads((out / "export_report.json").read_text())
    assert report["passed"] and {"cross_encoder_parity", "transformers_right_padding",
                                 "template_pair_matches_reranker"} <= {c["name"] for c in report["checks"]}

"""Embedder export beyond the Qwen default: an encoder (all-MiniLM-L6-v2, mean pooling, nothing
baked), a Llama-style tokenizer that adds a BOS through `add_bos_token` (kept, EOS appended once,
flags removed so transformers does not rebuild the post-processor), and bad widths refused."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from embedforge.errors import ConfigError
from embedforge.export import ExportConfig
from embedforge.export import export as run_export
from embedforge.templates import DEFAULT_RETRIEVAL_INSTRUCTION, format_query

TEXTS = ["what is slerp?", "Paris is the capital and most populous city of France, on the Seine.", "x"]
BOS_ID, EOS_ID = 151644, 151643


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    torch.set_num_threads(1)


def test_minilm_export_loads_in_sentence_transformers_and_transformers(minilm, tmp_path):
    from sentence_transformers import SentenceTransformer
    from transformers import AutoModel, AutoTokenizer

    from embedforge import Embedder

    out = tmp_path / "minilm"
    run_export(ExportConfig(model=str(minilm), kind="embedder", output=str(out)))
    want = Embedder.from_pretrained(minilm, dtype="float32", device="cpu").encode(TEXTS)
    np.testing.assert_allclose(SentenceTransformer(str(out), device="cpu").encode(TEXTS), want, atol=1e-4)

    # the all-MiniLM-L6-v2 model card's plain-transformers code, written out
    tokenizer = AutoTokenizer.from_pretrained(str(out))
    model = AutoModel.from_pretrained(str(out))
    encoded = tokenizer(TEXTS, padding=True, truncation=True, return_tensors="pt")
    with torch.no_grad():
        token_embeddings = model(**encoded)[0]
    mask = encoded["attention_mask"].unsqueeze(-1).expand(token_embeddings.size()).float()
    mean = torch.sum(token_embeddings * mask, 1) / torch.clamp(mask.sum(1), min=1e-9)
    np.testing.assert_allclose(F.normalize(mean, p=2, dim=1).numpy(), want, atol=1e-4)

    source_post = json.loads((minilm / "tokenizer.json").read_text())["post_processor"]
    assert json.loads((out / "tokenizer.json").read_text())["post_processor"] == source_post  # nothing baked
    assert json.loads((out / "config.json").read_text())["architectures"] == ["BertModel"]
    assert json.loads((out / "1_Pooling" / "config.json").read_text())["pooling_mode_mean_tokens"] is True
    assert json.loads((out / "tokenizer_config.json").read_text())["padding_side"] == "right"
    assert json.loads((out / "config_sentence_transformers.json").read_text())["prompts"] == {}


@pytest.fixture(scope="module")
def bos_source(tiny_qwen3_embedder_noeos, tmp_path_factory):
    """The no-EOS Qwen folder made Llama-3-like: tokenizer.json's post-processor is
    Sequence[ByteLevel, TemplateProcessing("<bos> $A")], the config names `add_bos_token`, and the
    tokenizer class is the one real Qwen3 folders name."""
    folder = tmp_path_factory.mktemp("bos") / "tiny-qwen3-bos"
    shutil.copytree(tiny_qwen3_embedder_noeos, folder)
    path = folder / "tokenizer_config.json"
    config = json.loads(path.read_text())
    config.update(add_bos_token=True, bos_token="<|im_start|>", tokenizer_class="Qwen2Tokenizer")
    path.write_text(json.dumps(config))
    path = folder / "tokenizer.json"
    data = json.loads(path.read_text())
    bos = {"SpecialToken": {"id": "<|im_start|>", "type_id": 0}}
    template = {
        "type": "TemplateProcessing",
        "single": [bos, {"Sequence": {"id": "A", "type_id": 0}}],
        "pair": [bos, {"Sequence": {"id": "A", "type_id": 0}}, {"Sequence": {"id": "B", "type_id": 1}}],
        "special_tokens": {"<|im_start|>": {"id": "<|im_start|>", "ids": [BOS_ID], "tokens": ["<|im_start|>"]}},
    }
    data["post_processor"] = {"type": "Sequence", "processors": [data["post_processor"], template]}
    path.write_text(json.dumps(data))
    return folder


def test_bos_tokenizer_keeps_bos_and_appends_eos_once(bos_source, tmp_path):
    from transformers import AutoModel, AutoTokenizer

    from embedforge import Embedder

    source_ids = AutoTokenizer.from_pretrained(str(bos_source))("hello")["input_ids"]
    assert source_ids[0] == BOS_ID and source_ids[-1] != EOS_ID  # the premise: BOS yes, EOS no
    out = tmp_path / "bos-export"
    run_export(ExportConfig(model=str(bos_source), kind="embedder", output=str(out)))

    tokenizer = AutoTokenizer.from_pretrained(str(out), padding_side="left")
    bare = tokenizer("hello world", add_special_tokens=False)["input_ids"]
    assert tokenizer("hello world")["input_ids"] == [BOS_ID, *bare, EOS_ID]
    assert "add_bos_token" not in json.loads((out / "tokenizer_config.json").read_text())

    texts = [format_query(TEXTS[0], DEFAULT_RETRIEVAL_INSTRUCTION), *TEXTS[1:]]
    want = Embedder.from_pretrained(bos_source, dtype="float32", device="cpu").encode(texts)
    batch = tokenizer(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        hidden = AutoModel.from_pretrained(str(out))(**batch).last_hidden_state
    got = F.normalize(hidden[:, -1], dim=-1).numpy()  # left padding: the last column is the last token
    np.testing.assert_allclose(got, want, atol=1e-4)


def test_matryoshka_dims_beyond_the_width_are_refused(minilm, tmp_path):
    out = tmp_path / "too-wide"
    with pytest.raises(ConfigError, match="outside 1..384"):
        run_export(ExportConfig(model=str(minilm), kind="embedder", output=str(out), matryoshka_dims=[1024, 32]))
    assert not out.exists() and not list(tmp_path.glob(".*"))


def test_formats_and_kinds_that_do_not_fit_are_refused(minilm, tmp_path):
    with pytest.raises(ConfigError, match="does not apply to --kind embedder"):
        run_export(ExportConfig(model=str(minilm), kind="embedder", format="causal", output=str(tmp_path / "a")))
    with pytest.raises(ConfigError, match="applies to embedders"):
        run_export(ExportConfig(model=str(minilm), kind="reranker", output=str(tmp_path / "b"), matryoshka_dims=[32]))
    assert not list(tmp_path.iterdir())

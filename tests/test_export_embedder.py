"""Embedder export: the folder loads in sentence-transformers and in plain transformers (the official
Qwen3-Embedding model-card code, written out below) to the vectors of `Embedder.encode`, for a
source tokenizer that appends <|endoftext|> and for one that does not; the files vLLM and TEI read
say what they must (post-processor, architectures, modules, pooling, Matryoshka widths)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from embedforge.templates import DEFAULT_RETRIEVAL_INSTRUCTION, query_prompt

QUERIES = ["what is slerp?", "how do I merge two checkpoints?", "capital of france"]
DOCUMENTS = [
    "Slerp interpolates between two vectors along a great circle.",
    "Paris is the capital and most populous city of France, on the Seine.",
    "Merging fine-tuned checkpoints by spherical interpolation keeps their norms.",
]
EOS_ID = 151643
DIMS = [64, 32, 16]


@pytest.fixture(scope="module", params=["tiny_qwen3_embedder", "tiny_qwen3_embedder_noeos"])
def exported(request, tmp_path_factory):
    """(source folder, export folder) for each source tokenizer variant."""
    from embedforge.export import ExportConfig
    from embedforge.export import export as run_export

    torch.set_num_threads(1)
    source = request.getfixturevalue(request.param)
    out = tmp_path_factory.mktemp("export") / request.param
    run_export(ExportConfig(model=str(source), kind="embedder", output=str(out), matryoshka_dims=DIMS))
    return source, out


@pytest.fixture(scope="module")
def reference():
    """Embedder.encode of the source model (queries with the default instruction, documents without)."""
    from embedforge import Embedder

    cache = {}

    def encode(source):
        if str(source) not in cache:
            embedder = Embedder.from_pretrained(source, dtype="float32", device="cpu")
            cache[str(source)] = (embedder.encode(QUERIES, instruction=DEFAULT_RETRIEVAL_INSTRUCTION),
                                  embedder.encode(DOCUMENTS))
        return cache[str(source)]

    return encode


def matryoshka(vectors: np.ndarray, dim: int) -> np.ndarray:
    """First `dim` coordinates, L2-normalised again."""
    head = vectors[:, :dim]
    return head / np.linalg.norm(head, axis=1, keepdims=True)


# --- the official Qwen3-Embedding usage (model card of Qwen/Qwen3-Embedding-0.6B), written out ---

def official_last_token_pool(last_hidden_states, attention_mask):
    left_padding = attention_mask[:, -1].sum() == attention_mask.shape[0]
    if left_padding:
        return last_hidden_states[:, -1]
    sequence_lengths = attention_mask.sum(dim=1) - 1
    batch_size = last_hidden_states.shape[0]
    return last_hidden_states[torch.arange(batch_size, device=last_hidden_states.device), sequence_lengths]


def get_detailed_instruct(task_description: str, query: str) -> str:
    return f"Instruct: {task_description}\nQuery:{query}"


def official_embed(folder) -> np.ndarray:
    from transformers import AutoModel, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(folder), padding_side="left")
    model = AutoModel.from_pretrained(str(folder))
    input_texts = [get_detailed_instruct(DEFAULT_RETRIEVAL_INSTRUCTION, q) for q in QUERIES] + DOCUMENTS
    batch_dict = tokenizer(input_texts, padding=True, truncation=True, max_length=8192, return_tensors="pt")
    with torch.no_grad():
        outputs = model(**batch_dict)
    embeddings = official_last_token_pool(outputs.last_hidden_state, batch_dict["attention_mask"])
    return F.normalize(embeddings, p=2, dim=1).numpy()


def test_sentence_transformers_gives_embedder_vectors(exported, reference):
    from sentence_transformers import SentenceTransformer

    source, out = exported
    want_q, want_d = reference(source)
    model = SentenceTransformer(str(out), device="cpu")
    assert model.prompts["query"] == query_prompt(DEFAULT_RETRIEVAL_INSTRUCTION)
    assert model.similarity_fn_name == "cosine"
    np.testing.assert_allclose(model.encode(QUERIES, prompt_name="query"), want_q, atol=1e-4)
    np.testing.assert_allclose(model.encode(DOCUMENTS), want_d, atol=1e-4)
    # Matryoshka: sentence-transformers' truncate_dim + renormalisation keeps the first d coordinates
    model.truncate_dim = 16
    np.testing.assert_allclose(model.encode(QUERIES, prompt_name="query", normalize_embeddings=True),
                               matryoshka(want_q, 16), atol=1e-4)
    np.testing.assert_allclose(model.encode(DOCUMENTS, normalize_embeddings=True), matryoshka(want_d, 16), atol=1e-4)


def test_official_transformers_code_gives_embedder_vectors(exported, reference):
    source, out = exported
    want_q, want_d = reference(source)
    np.testing.assert_allclose(official_embed(out), np.concatenate([want_q, want_d]), atol=1e-4)


def test_official_code_needs_the_baked_eos(tiny_qwen3_embedder_noeos, reference):
    """The reference can fail: on the source folder whose tokenizer appends nothing, the official
    code pools the wrong token and misses Embedder.encode."""
    want_q, want_d = reference(tiny_qwen3_embedder_noeos)
    got = official_embed(tiny_qwen3_embedder_noeos)
    assert np.abs(got - np.concatenate([want_q, want_d])).max() > 1e-2


def test_files_that_vllm_and_tei_read(exported):
    from tokenizers import Tokenizer

    _, out = exported
    tokenizer = Tokenizer.from_file(str(out / "tokenizer.json"))  # what TEI and vLLM's fast path parse
    ids = tokenizer.encode("hello world").ids
    assert ids[-1] == EOS_ID and ids[-2] != EOS_ID
    assert tokenizer.encode("hello world", add_special_tokens=False).ids == ids[:-1]
    post = json.loads((out / "tokenizer.json").read_text())["post_processor"]
    templates = [post] if post["type"] == "TemplateProcessing" else post["processors"]
    assert any(p["type"] == "TemplateProcessing" and "<|endoftext|>" in p["special_tokens"] for p in templates)

    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["Qwen3ForCausalLM"]
    assert config["matryoshka_dimensions"] == DIMS and config["is_matryoshka"] is True
    modules = json.loads((out / "modules.json").read_text())
    assert [m["type"].rsplit(".", 1)[1] for m in modules] == ["Transformer", "Pooling", "Normalize"]
    assert [m["path"] for m in modules] == ["", "1_Pooling", "2_Normalize"]
    pooling = json.loads((out / "1_Pooling" / "config.json").read_text())
    assert pooling["pooling_mode_lasttoken"] is True and pooling["include_prompt"] is True
    assert not pooling["pooling_mode_mean_tokens"] and not pooling["pooling_mode_cls_token"]
    assert pooling["word_embedding_dimension"] == 64
    tokenizer_config = json.loads((out / "tokenizer_config.json").read_text())
    assert tokenizer_config["padding_side"] == "left"
    assert "local_files_only" not in tokenizer_config and "is_local" not in tokenizer_config
    st_config = json.loads((out / "config_sentence_transformers.json").read_text())
    assert st_config["similarity_fn_name"] == "cosine"
    assert st_config["prompts"] == {"query": query_prompt(DEFAULT_RETRIEVAL_INSTRUCTION), "document": ""}
    assert json.loads((out / "embedforge.json").read_text())["matryoshka_dims"] == DIMS
    report = json.loads((out / "export_report.json").read_text())
    assert report["passed"] and {c["name"] for c in report["checks"]} >= {
        "reload_parity", "batch_invariance", "eos_exactly_once", "transformers_left_padding",
        "transformers_right_padding", "sentence_transformers_parity"}
    assert not list(out.parent.glob(".*.tmp")), "temporary folders left behind"

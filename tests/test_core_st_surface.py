"""`Embedder.encode` speaks sentence-transformers: each keyword, checked against a real
`SentenceTransformer` loading the same folder (all-MiniLM-L6-v2 and an exported tiny Qwen3 with
prompts). fp32 on CPU, a few short texts: 1e-5 absolute is a few ulps of the float32 sums."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from embedforge import Embedder
from embedforge.errors import InputError

TEXTS = ["how do I sort a list in place?", "Lists have a sort() method that modifies the list in place.",
         "Paris is the capital of France.", "binary search in a sorted array", "a"]
TASK = "Given a question, retrieve the passage that answers it"
ATOL = 1e-5


@pytest.fixture(scope="module")
def pair(minilm):
    from sentence_transformers import SentenceTransformer

    return Embedder.from_pretrained(minilm, dtype="float32"), SentenceTransformer(str(minilm), device="cpu")


@pytest.fixture(scope="module")
def prompted(tiny_qwen3_embedder, tmp_path_factory):
    from sentence_transformers import SentenceTransformer

    folder = tmp_path_factory.mktemp("st") / "qwen"
    # the released Qwen3-Embedding tokenizer appends EOS itself, so sentence-transformers pools the same token
    Embedder.from_pretrained(tiny_qwen3_embedder, dtype="float32").save_pretrained(
        folder, default_instruction=TASK)
    return Embedder.from_pretrained(folder, dtype="float32"), SentenceTransformer(str(folder), device="cpu")


def test_plain_encode_and_single_string(pair):
    ours, st = pair
    np.testing.assert_allclose(ours.encode(TEXTS), st.encode(TEXTS), atol=ATOL)
    one = ours.encode(TEXTS[0])
    assert one.shape == (ours.dimension,)
    np.testing.assert_allclose(one, st.encode(TEXTS[0]), atol=ATOL)


@pytest.mark.parametrize("keyword", [{"convert_to_tensor": True}, {"convert_to_numpy": False},
                                     {"normalize_embeddings": True}, {"show_progress_bar": True},
                                     {"device": "cpu"}, {"batch_size": 2}])
def test_keywords_match_sentence_transformers(pair, keyword):
    ours, st = pair
    got, want = ours.encode(TEXTS, **keyword), st.encode(TEXTS, **keyword)
    assert type(got) is type(want)
    if isinstance(want, list):
        got, want = torch.stack(got), torch.stack(want)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=ATOL)


@pytest.mark.parametrize("normalize", [False, True])
def test_truncate_dim_with_and_without_normalize(pair, normalize):
    ours, st = pair
    got = ours.encode(TEXTS, truncate_dim=64, normalize_embeddings=normalize)
    np.testing.assert_allclose(got, st.encode(TEXTS, truncate_dim=64, normalize_embeddings=normalize), atol=ATOL)
    assert np.allclose(np.linalg.norm(got, axis=1), 1, atol=1e-5) == normalize


@pytest.mark.parametrize("precision", ["int8", "uint8", "binary", "ubinary"])
def test_quantized_precisions_equal_sentence_transformers(pair, precision):
    ours, st = pair
    got, want = ours.encode(TEXTS, precision=precision), st.encode(TEXTS, precision=precision)
    assert got.dtype == want.dtype and got.shape == want.shape
    # Buckets are floor((x - min) / step): a float32 difference of 1e-6 may move a value across one
    # bucket edge, never more than one.
    assert np.abs(got.astype(np.int16) - want.astype(np.int16)).max() <= (1 if "int8" in precision else 0)


def test_prompt_name_prompt_and_query_document_helpers(prompted):
    ours, st = prompted
    for kwargs in ({"prompt_name": "query"}, {"prompt": "Instruct: x\nQuery:"}):
        np.testing.assert_allclose(ours.encode(TEXTS, **kwargs), st.encode(TEXTS, **kwargs), atol=ATOL)
    np.testing.assert_allclose(ours.encode_query(TEXTS), st.encode_query(TEXTS), atol=ATOL)
    np.testing.assert_allclose(ours.encode_document(TEXTS), st.encode_document(TEXTS), atol=ATOL)
    # the Qwen3 name for the same thing
    np.testing.assert_allclose(ours.encode(TEXTS, instruction=TASK), st.encode_query(TEXTS), atol=ATOL)


def test_similarity_and_dimension(pair):
    ours, st = pair
    a, b = ours.encode(TEXTS[:2]), ours.encode(TEXTS[2:])
    torch.testing.assert_close(ours.similarity(a, b), st.similarity(a, b), atol=ATOL, rtol=0)
    assert ours.get_sentence_embedding_dimension() == st.get_sentence_embedding_dimension() == 384


def test_matryoshka_dim_alias_renormalises(pair):
    ours, _ = pair
    np.testing.assert_allclose(ours.encode(TEXTS, dim=64), ours.encode(TEXTS, truncate_dim=64,
                                                                       normalize_embeddings=True), atol=1e-7)


def test_unsupported_keywords_are_named(pair):
    ours, _ = pair
    with pytest.raises(InputError, match="output_value"):
        ours.encode(TEXTS, output_value="token_embeddings")
    with pytest.raises(InputError, match="precision"):
        ours.encode(TEXTS, precision="int4")
    with pytest.raises(InputError, match="prompt_name"):
        ours.encode(TEXTS, prompt_name="nope")
    with pytest.raises(TypeError):
        ours.encode(TEXTS, pool={"processes": 2})


@pytest.mark.slow
def test_chat_llm_is_embedded_as_a_chat_turn_like_sentence_transformers(smollm2, tmp_path):
    """A chat LLM that is not an embedder yet (SmolLM2-Instruct): each text is one user turn of its chat
    template, a prompt is the system turn, and the turn's last token is pooled, as sentence-transformers 6
    does; a saved folder reloads the same way in both libraries. A 135M model in fp32: 1e-5."""
    from sentence_transformers import SentenceTransformer

    texts = [*TEXTS, "  leading spaces and\nnewlines", "déjà vu — ünïcode"]
    ours = Embedder.from_pretrained(smollm2, dtype="float32")
    assert ours.spec.chat_template and not ours.spec.append_eos
    st = SentenceTransformer(str(smollm2), device="cpu")
    np.testing.assert_allclose(ours.encode(texts), st.encode(texts, normalize_embeddings=True), atol=ATOL)
    np.testing.assert_allclose(ours.encode(texts, prompt="Be brief"),
                               st.encode(texts, prompt="Be brief", normalize_embeddings=True), atol=ATOL)
    ours.save_pretrained(tmp_path / "saved", default_instruction=TASK)
    again, st_again = Embedder.from_pretrained(tmp_path / "saved", dtype="float32"), SentenceTransformer(
        str(tmp_path / "saved"), device="cpu")
    assert again.spec.chat_template
    np.testing.assert_allclose(again.encode(texts), ours.encode(texts), atol=1e-7)
    np.testing.assert_allclose(again.encode(texts, instruction=TASK),
                               st_again.encode_query(texts, normalize_embeddings=True), atol=ATOL)
    # an over-long text loses its end, never the template: the pooled token is still the turn's last
    rows = again.token_ids(["word " * 400], max_length=64)
    assert len(rows[0]) == 64 and rows[0][-2:] == again.token_ids(["x"])[0][-2:]  # <|im_end|> \n

"""Embedder against the official Qwen3-Embedding model-card code, written out here independently."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from embedforge import Embedder
from embedforge.errors import InputError, ModelLoadError
from embedforge.pooling import last_token_pool

TASK = "Given a web search query, retrieve relevant passages that answer the query"
TEXTS = [
    "What is the capital of China?",
    "Explain gravity",
    "The capital of China is Beijing.",
    ("Gravity is a force that attracts two bodies towards each other. It gives weight to physical objects and "
    "is responsible for the movement of planets around the sun."),
    "短文本",
]


# --- the official code, transcribed from the Qwen3-Embedding model card (transformers usage) ----------


def official_last_token_pool(last_hidden_states, attention_mask):
    left_padding = attention_mask[:, -1].sum() == attention_mask.shape[0]
    if left_padding:
        return last_hidden_states[:, -1]
    sequence_lengths = attention_mask.sum(dim=1) - 1
    batch_size = last_hidden_states.shape[0]
    return last_hidden_states[torch.arange(batch_size), sequence_lengths]


def official_get_detailed_instruct(task_description: str, query: str) -> str:
    return f"Instruct: {task_description}\nQuery:{query}"


def official_embed(folder, texts, post_processor_appends_eos: bool, max_length=8192):
    """Current card code when the tokenizer appends EOS; the first card's manual `eod_id` append otherwise."""
    from transformers import AutoModel, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder, padding_side="left")
    model = AutoModel.from_pretrained(folder).eval()
    if post_processor_appends_eos:
        batch_dict = tokenizer(texts, padding=True, truncation=True, max_length=max_length, return_tensors="pt")
    else:
        eod_id = tokenizer.convert_tokens_to_ids("<|endoftext|>")
        batch_dict = tokenizer(texts, padding=False, truncation=True, max_length=max_length - 2)
        for seq, att in zip(batch_dict["input_ids"], batch_dict["attention_mask"]):
            seq.append(eod_id)
            att.append(1)
        batch_dict = tokenizer.pad(batch_dict, padding=True, return_tensors="pt")
    with torch.no_grad():
        outputs = model(**batch_dict)
    embeddings = official_last_token_pool(outputs.last_hidden_state, batch_dict["attention_mask"])
    return F.normalize(embeddings, p=2, dim=1).numpy()


@pytest.fixture(scope="module", params=["eos_postprocessor", "plain_tokenizer"])
def variant(request, tiny_qwen3_embedder, tiny_qwen3_embedder_noeos):
    if request.param == "eos_postprocessor":
        return tiny_qwen3_embedder, True
    return tiny_qwen3_embedder_noeos, False


@pytest.mark.parametrize("instruction", [None, TASK])
def test_encode_matches_official_card_code(variant, instruction):
    folder, appends = variant
    queries = [official_get_detailed_instruct(instruction, t) if instruction else t for t in TEXTS]
    expected = official_embed(str(folder), queries, appends)
    got = Embedder.from_pretrained(folder).encode(TEXTS, instruction=instruction, batch_size=8)
    assert got.dtype == np.float32
    np.testing.assert_allclose(got, expected, atol=1e-4)


def test_both_tokenizer_variants_give_identical_ids_with_one_eos(tiny_qwen3_embedder, tiny_qwen3_embedder_noeos):
    a = Embedder.from_pretrained(tiny_qwen3_embedder).tokenize(TEXTS + ["ends with eos<|endoftext|>"], instruction=TASK)
    b = Embedder.from_pretrained(tiny_qwen3_embedder_noeos).tokenize(TEXTS + ["ends with eos<|endoftext|>"],
                                                                     instruction=TASK)
    assert torch.equal(a["input_ids"], b["input_ids"])
    eos = 151643
    for ids, mask in zip(a["input_ids"], a["attention_mask"]):
        real = ids[mask.bool()].tolist()
        assert real[-1] == eos and real.count(eos) == 1, real


def test_batched_mixed_lengths_equal_one_at_a_time_and_keep_order(tiny_qwen3_embedder):
    emb = Embedder.from_pretrained(tiny_qwen3_embedder)
    batched = emb.encode(TEXTS, batch_size=16)
    single = np.stack([emb.encode([t])[0] for t in TEXTS])
    np.testing.assert_allclose(batched, single, atol=1e-5)
    assert np.abs(batched[0] - batched[1]).max() > 1e-3  # the rows are really different texts


def test_right_padding_gives_the_same_vectors_as_left(tiny_qwen3_embedder):
    left = Embedder.from_pretrained(tiny_qwen3_embedder)
    right = Embedder.from_pretrained(tiny_qwen3_embedder)
    right.spec.padding_side = "right"
    np.testing.assert_allclose(left.encode(TEXTS), right.encode(TEXTS), atol=1e-5)


def test_last_token_pool_under_both_padding_sides():
    hidden = torch.arange(2 * 4 * 3, dtype=torch.float32).reshape(2, 4, 3)
    left = torch.tensor([[0, 0, 1, 1], [1, 1, 1, 1]])
    right = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1]])
    assert torch.equal(last_token_pool(hidden, left), hidden[[0, 1], [3, 3]])
    assert torch.equal(last_token_pool(hidden, right), hidden[[0, 1], [1, 3]])


@pytest.mark.parametrize("dim", [8, 16, 63])
def test_matryoshka_dim_is_truncate_then_renormalise(tiny_qwen3_embedder, dim):
    emb = Embedder.from_pretrained(tiny_qwen3_embedder)
    full = emb.encode(TEXTS)
    cut = emb.encode(TEXTS, dim=dim)
    ref = full[:, :dim] / np.linalg.norm(full[:, :dim], axis=1, keepdims=True)
    assert cut.shape == (len(TEXTS), dim)
    np.testing.assert_allclose(cut, ref, atol=1e-5)


def test_minilm_folder_matches_sentence_transformers(minilm):
    from sentence_transformers import SentenceTransformer

    expected = SentenceTransformer(str(minilm), device="cpu").encode(TEXTS, normalize_embeddings=True)
    emb = Embedder.from_pretrained(minilm)
    assert emb.spec.pooling == "mean" and not emb.spec.append_eos
    np.testing.assert_allclose(emb.encode(TEXTS), expected, atol=1e-5)


def test_saved_embedder_loads_in_sentence_transformers_with_same_vectors(tiny_qwen3_embedder_noeos, tmp_path):
    from sentence_transformers import SentenceTransformer

    emb = Embedder.from_pretrained(tiny_qwen3_embedder_noeos)
    emb.save_pretrained(tmp_path / "saved", default_instruction=TASK)
    again = Embedder.from_pretrained(tmp_path / "saved")
    np.testing.assert_allclose(again.encode(TEXTS, instruction=TASK), emb.encode(TEXTS, instruction=TASK), atol=1e-6)
    np.testing.assert_allclose(again.encode(TEXTS, prompt_name="query"), emb.encode(TEXTS, instruction=TASK),
                               atol=1e-6)
    st = SentenceTransformer(str(tmp_path / "saved"), device="cpu")
    assert st.prompts["query"] == f"Instruct: {TASK}\nQuery:"


def test_causal_lm_without_chat_template_pools_its_last_real_token(tiny_qwen3_lm):
    # A causal LM is not an embedder yet: its EOS (often the pretraining document separator) carries
    # almost nothing of the text, so the state of the last real token is pooled, as sentence-transformers'
    # lasttoken pooling does (a chat LLM is embedded as a chat turn: test_core_st_surface.py).
    from transformers import AutoModel, AutoTokenizer

    emb = Embedder.from_pretrained(tiny_qwen3_lm, dtype="float32")
    assert not emb.spec.append_eos and not emb.spec.chat_template
    texts = ["a short one", "a somewhat longer text about embeddings and pooling"]
    got = emb.encode(texts)
    tok = AutoTokenizer.from_pretrained(tiny_qwen3_lm)
    assert not tok.chat_template
    model = AutoModel.from_pretrained(tiny_qwen3_lm, dtype=torch.float32).eval()
    rows = []
    for t in texts:
        ids = torch.tensor([tok(t)["input_ids"]])
        assert ids[0, -1] != tok.eos_token_id
        with torch.no_grad():
            rows.append(F.normalize(model(input_ids=ids).last_hidden_state[0, -1], dim=0).numpy())
    np.testing.assert_allclose(got, np.stack(rows), atol=1e-5)  # float32, a 2-layer model, one padded batch


# --- bad input ---------------------------------------------------------------------------------


def test_empty_list_gives_empty_matrix(tiny_qwen3_embedder):
    emb = Embedder.from_pretrained(tiny_qwen3_embedder)
    assert emb.encode([]).shape == (0, emb.dimension)
    assert emb.encode([], dim=8).shape == (0, 8)


@pytest.mark.parametrize("texts,message", [(["ok", ""], r"texts\[1\]: empty string"),
                                            (["ok", 3], r"texts\[1\]: expected a string, got int")])
def test_bad_rows_are_named(tiny_qwen3_embedder, texts, message):
    with pytest.raises(InputError, match=message):
        Embedder.from_pretrained(tiny_qwen3_embedder).encode(texts)


def test_single_string_gives_one_vector(tiny_qwen3_embedder):
    # sentence-transformers' convention (a single string used to be refused)
    emb = Embedder.from_pretrained(tiny_qwen3_embedder)
    np.testing.assert_array_equal(emb.encode("one string"), emb.encode(["one string"])[0])


def test_text_longer_than_max_length_is_truncated_with_warning(tiny_qwen3_embedder):
    emb = Embedder.from_pretrained(tiny_qwen3_embedder, max_length=16)
    long_text = "word " * 200
    with pytest.warns(UserWarning, match="truncated"):
        features = emb.tokenize([long_text])
    assert features["input_ids"].shape[1] == 16 and features["input_ids"][0, -1] == 151643
    with pytest.warns(UserWarning):
        assert emb.encode([long_text]).shape == (1, emb.dimension)


def test_bad_dim_is_refused(tiny_qwen3_embedder):
    with pytest.raises(InputError, match="dim must be"):
        Embedder.from_pretrained(tiny_qwen3_embedder).encode(["x"], dim=10_000)


def test_unknown_model_path_is_a_clear_error(tmp_path):
    with pytest.raises(ModelLoadError, match="no such model folder"):
        Embedder.from_pretrained(tmp_path / "does-not-exist")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ModelLoadError, match="no config.json"):
        Embedder.from_pretrained(empty)


@pytest.mark.parametrize("which", ["tiny_qwen3_embedder", "minilm", "smollm2"])
def test_a_huge_text_is_cut_before_tokenizing_with_the_ids_of_the_whole_text(which, request, monkeypatch):
    """A 20 MB line costs what its first tokens cost (the tokenizer never sees more than
    CHARS_PER_TOKEN_BOUND characters per kept token), and the ids are those of the whole text truncated."""
    import embedforge.embedder
    from embedforge.embedder import CHARS_PER_TOKEN_BOUND

    emb = Embedder.from_pretrained(request.getfixturevalue(which), dtype="float32")
    seen = []
    real = emb.tokenizer.__class__.__call__

    def spy(self, text, *args, **kwargs):
        seen.extend(len(t) for t in ([text] if isinstance(text, str) else text))
        return real(self, text, *args, **kwargs)

    medium = "alpha beta gamma, delta! " * 2_000  # 50k characters
    huge = medium * 400  # 20 MB
    with monkeypatch.context() as patch:  # the reference: the whole text tokenized, then truncated
        patch.setattr(embedforge.embedder, "CHARS_PER_TOKEN_BOUND", 10**9)
        with pytest.warns(UserWarning, match="truncated"):
            want = emb.token_ids([medium], max_length=64)
    try:
        type(emb.tokenizer).__call__ = spy
        with pytest.warns(UserWarning, match="truncated"):
            got = emb.token_ids([huge], max_length=64)
    finally:
        type(emb.tokenizer).__call__ = real
    assert got == want and len(got[0]) == 64
    assert seen and max(seen) <= CHARS_PER_TOKEN_BOUND * 64 + 1000  # + the chat template around the text


def test_a_saved_model_never_names_remote_code(tiny_qwen3_embedder, tmp_path):
    """A source whose config names remote code (`auto_map`) loads with the native class; what we save
    (train checkpoints and final models go through save_pretrained) ships no `*.py`, so names none."""
    import shutil

    source = tmp_path / "source"
    shutil.copytree(tiny_qwen3_embedder, source)
    config = json.loads((source / "config.json").read_text())
    config["auto_map"] = {"AutoModel": "modeling_custom.CustomModel"}
    (source / "config.json").write_text(json.dumps(config))
    saved = Embedder.from_pretrained(source).save_pretrained(tmp_path / "saved")
    assert "auto_map" not in json.loads((saved / "config.json").read_text())
    assert not list(saved.glob("*.py"))

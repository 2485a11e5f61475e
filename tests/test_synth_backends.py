"""Local backends: batched, left-padded generation equals one-at-a-time generation; missing pieces
(chat template, vLLM) fail with a message that says what to do."""

from __future__ import annotations

import json
import shutil

import pytest

from embedforge.data_synth.backends import make_backend
from embedforge.data_synth.backends.base import GenerationParams
from embedforge.errors import ConfigError, ModelLoadError

CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


@pytest.fixture(scope="module")
def chat_lm(tiny_qwen3_lm, tmp_path_factory):
    folder = tmp_path_factory.mktemp("chat") / "lm"
    shutil.copytree(tiny_qwen3_lm, folder)
    config_path = folder / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config["chat_template"] = CHAT_TEMPLATE
    config_path.write_text(json.dumps(config))
    return folder


def test_batched_greedy_generation_equals_single(chat_lm):
    backend = make_backend("transformers", str(chat_lm), batch_size=4, device="cpu", dtype="float32")
    conversations = [
        [{"role": "user", "content": "short"}],
        [
            {"role": "system", "content": "a much longer system prompt that forces padding in the batch"},
            {"role": "user", "content": "and a longer question as well, with more tokens"},
        ],
        [{"role": "user", "content": "a third one of middling length"}],
    ]
    params = GenerationParams(temperature=0.0, max_new_tokens=8)
    batched = [r.text for r in backend.generate(conversations, params, seeds=[1, 2, 3])]
    single = [backend.generate([c], params, seeds=[s])[0].text for c, s in zip(conversations, [1, 2, 3])]
    assert batched == single
    assert all(r.ok for r in backend.generate(conversations, params))


def test_sampling_is_repeatable_with_the_same_seeds(chat_lm):
    backend = make_backend("transformers", str(chat_lm), batch_size=2, device="cpu", dtype="float32")
    conversations = [[{"role": "user", "content": "hello"}], [{"role": "user", "content": "world"}]]
    params = GenerationParams(temperature=1.0, max_new_tokens=6)
    first = [r.text for r in backend.generate(conversations, params, seeds=[7, 8])]
    again = [r.text for r in backend.generate(conversations, params, seeds=[7, 8])]
    assert first == again


def test_a_model_without_chat_template_is_refused(tiny_qwen3_lm):
    with pytest.raises(ModelLoadError, match="chat template"):
        make_backend("transformers", str(tiny_qwen3_lm))


def test_vllm_missing_says_how_to_install():
    pytest.importorskip("torch")
    try:
        import vllm  # noqa: F401
    except ImportError:
        with pytest.raises(ModelLoadError, match=r"pip install 'embedforge\[vllm\]'"):
            make_backend("vllm", "any/model")
    else:
        pytest.skip("vLLM is installed here")


def test_unknown_backend():
    with pytest.raises(ConfigError, match="unknown backend"):
        make_backend("llamacpp", "m")


# --- schema-constrained decoding and the shared prompt prefix -----------------------------------

SMALL_SCHEMA = {
    "type": "object",
    "properties": {"query": {"type": "string", "minLength": 1, "maxLength": 40},
                   "kind": {"type": "string", "enum": ["question", "keywords"]}},
    "required": ["query", "kind"],
    "additionalProperties": False,
}


def test_a_random_model_writes_valid_json_of_the_schema_under_the_grammar(chat_lm):
    """A randomly initialised model never writes JSON by chance; under the grammar every reply is
    JSON of the schema (checked by json.loads and an independent hand check of the schema)."""
    backend = make_backend("transformers", str(chat_lm), batch_size=4, device="cpu", dtype="float32")
    conversations = [[{"role": "user", "content": f"write a query number {i}"}] for i in range(4)]
    free = backend.generate(conversations, GenerationParams(temperature=1.0, max_new_tokens=40), seeds=[1, 2, 3, 4])
    assert not any(r.text.lstrip().startswith("{") for r in free)
    params = GenerationParams(temperature=1.0, max_new_tokens=96, json_schema=json.dumps(SMALL_SCHEMA))
    for seeds in ([1, 2, 3, 4], [5, 6, 7, 8]):
        for result in backend.generate(conversations, params, seeds=seeds):
            obj = json.loads(result.text)
            assert set(obj) == {"query", "kind"} and obj["kind"] in ("question", "keywords")
            assert isinstance(obj["query"], str) and 1 <= len(obj["query"]) <= 40


def test_the_shared_prefix_cache_gives_the_logits_of_each_prompt_alone(chat_lm):
    import torch

    backend = make_backend("transformers", str(chat_lm), batch_size=4, device="cpu", dtype="float32")
    system = "You write search queries for a collection of documents about many topics. " * 3
    conversations = [[{"role": "system", "content": system}, {"role": "user", "content": text}]
                     for text in ("short", "a much longer question with many more tokens in it", "middling one")]
    rows = [
        backend.tokenizer(backend.tokenizer.apply_chat_template(c, tokenize=False, add_generation_prompt=True),
                          add_special_tokens=False)["input_ids"]
        for c in conversations
    ]
    ids, mask, cache = backend._inputs(rows)
    assert cache is not None and cache.get_seq_length() >= 32  # the prefix was shared
    start = cache.get_seq_length()
    positions = (mask.cumsum(-1) - 1).clamp(min=0)[:, start:]  # what `generate` derives from the mask
    with torch.inference_mode():
        shared = backend.lm(ids[:, start:], attention_mask=mask, position_ids=positions,
                            past_key_values=cache).logits[:, -1]
        for i, row in enumerate(rows):
            alone = backend.lm(torch.tensor([row])).logits[0, -1]
            # float32 through 2 layers: the cached and uncached paths differ only by summation order
            torch.testing.assert_close(shared[i], alone, atol=1e-4, rtol=1e-4)
    greedy = GenerationParams(temperature=0.0, max_new_tokens=6)
    batched = [r.text for r in backend.generate(conversations, greedy)]
    assert batched == [backend.generate([c], greedy)[0].text for c in conversations]  # one prompt: no sharing


def test_shared_prefix_length_leaves_each_row_a_token():
    from embedforge.data_synth.backends.transformers_backend import shared_prefix_length

    assert shared_prefix_length([[1, 2, 3, 4], [1, 2, 3, 5], [1, 2, 9]]) == 2
    assert shared_prefix_length([[1, 2, 3], [1, 2, 3]]) == 2
    assert shared_prefix_length([[7, 8]]) == 1 and shared_prefix_length([]) == 0


def test_vllm_gets_structured_outputs_in_the_parameters_its_version_names():
    from types import SimpleNamespace

    from embedforge.data_synth.backends.vllm_backend import structured_output_kwargs

    class Params:
        def __init__(self, **kw):
            self.kw = kw

    text = json.dumps(SMALL_SCHEMA)
    new = structured_output_kwargs(text, SimpleNamespace(StructuredOutputsParams=Params, GuidedDecodingParams=Params))
    assert list(new) == ["structured_outputs"] and new["structured_outputs"].kw == {"json": SMALL_SCHEMA}
    old = structured_output_kwargs(text, SimpleNamespace(GuidedDecodingParams=Params))
    assert list(old) == ["guided_decoding"] and old["guided_decoding"].kw == {"json": SMALL_SCHEMA}
    assert structured_output_kwargs(None, SimpleNamespace()) == {}
    with pytest.raises(ModelLoadError, match="structured outputs"):
        structured_output_kwargs(text, SimpleNamespace())

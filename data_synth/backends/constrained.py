"""Schema-constrained decoding for local generation: at every step the tokens that would take the
reply off valid JSON of the schema are masked out, so a finished reply parses and validates by
construction, whatever the size of the model.

The grammar engine is llguidance: one small wheel with no dependencies, token masks computed in
Rust from the tokenizer's own vocabulary, and the engine vLLM, SGLang and llama.cpp also offer for
structured outputs. The alternatives weighed: xgrammar 0.2 has CPU wheels and a transformers path
too, but installs triton and apache-tvm-ffi with it (hundreds of MB on a CPU-only install);
lm-format-enforcer walks its token trie in Python at every step. The mask is applied here with
plain torch (llguidance's own helper compiles a kernel with torch.compile, which a CPU-only
machine need not be able to do).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from embedforge.errors import ModelLoadError

# The separators the prompts' worked examples use (json.dumps defaults): a small model copies the
# layout it was shown, and a grammar that allowed any whitespace would let it pad a reply with it.
JSON_LAYOUT = {"whitespace_flexible": False, "key_separator": ": ", "item_separator": ", "}


def grammar_for(json_schema: str | dict[str, Any]) -> str:
    """An llguidance grammar for a JSON Schema, with the compact layout above."""
    import llguidance

    schema = json.loads(json_schema) if isinstance(json_schema, str) else dict(json_schema)
    return llguidance.LLMatcher.grammar_from_json_schema(schema, defaults=JSON_LAYOUT)


def llg_tokenizer(hf_tokenizer, vocab_size: int):
    """The llguidance view of a fast Hugging Face tokenizer (about a second to build: build once)."""
    try:
        import llguidance.hf
    except ImportError:
        raise ModelLoadError(
            "schema-constrained decoding with transformers needs llguidance: pip install llguidance "
            "(or set constrained_decoding: false)"
        ) from None
    return llguidance.hf.from_tokenizer(hf_tokenizer, n_vocab=vocab_size)


class SchemaLogitsProcessor:
    """A transformers logits processor: one grammar matcher per batch row.

    Rows are told apart by position in the batch; `prompt_length` is the width of the prompt
    block, so the processor knows which column holds each row's newest token. A row whose matcher
    has finished (the object is closed) may only end.
    """

    def __init__(self, tokenizer, grammar: str, batch_size: int, prompt_length: int,
                 eos_token_ids: Sequence[int]):
        import llguidance

        self.matchers = [llguidance.LLMatcher(tokenizer, grammar) for _ in range(batch_size)]
        for matcher in self.matchers[:1]:
            if matcher.is_error():
                raise ValueError(f"invalid JSON schema for constrained decoding: {matcher.get_error()}")
        self.prompt_length = prompt_length
        self.eos = list(eos_token_ids)
        self.finished = [False] * batch_size

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        vocab = scores.shape[-1]
        allowed = np.zeros((len(self.matchers), vocab), dtype=bool)
        generated = input_ids.shape[1] - self.prompt_length
        for i, matcher in enumerate(self.matchers):
            if generated > 0 and not self.finished[i]:
                token = int(input_ids[i, -1])
                if token in self.eos or matcher.is_stopped() or not matcher.consume_token(token):
                    self.finished[i] = True
            if self.finished[i] or matcher.is_stopped() or matcher.is_error():
                allowed[i, self.eos] = True
                continue
            bits = np.unpackbits(np.frombuffer(matcher.compute_bitmask(), dtype=np.uint8), bitorder="little")
            width = min(vocab, bits.size)
            allowed[i, :width] = bits[:width].astype(bool)
        mask = torch.from_numpy(allowed).to(scores.device)
        return scores.masked_fill(~mask, float("-inf"))

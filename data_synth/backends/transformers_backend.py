"""Local generation with transformers: chat template, left padding, batched sampling, seeded,
schema-constrained decoding, and the shared prompt prefix computed once per batch.

Left padding keeps every prompt's last token at the end of the row, which is where `generate`
continues from; right padding would make the shorter prompts continue after pad tokens.

Every prompt of one template starts with the same system message and worked examples; on a CPU
that prefix costs more than the passage itself. When the prompts of a batch share at least
`MIN_SHARED_PREFIX` tokens, the prefix is run once and its key/value cache repeated over the
batch; each row's own tokens follow, left-padded after the prefix. Positions come from the
attention mask, so every row sees exactly the positions and context it would see alone.
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence

from embedforge.data_synth.backends.base import GenerationParams, Messages, Result
from embedforge.errors import ModelLoadError

MIN_SHARED_PREFIX = 32  # tokens; below this the extra forward pass is not worth it


def _cache_argument() -> str:
    """`generate`'s name for a ready cache: `cache` from transformers 5, `past_key_values` before."""
    import transformers

    return "cache" if int(transformers.__version__.split(".")[0]) >= 5 else "past_key_values"


class RowSampler:
    """Sampling as a logits processor for greedy `generate`: each row adds Gumbel noise drawn from its
    own generator (seeded by its passage), so argmax picks a sample of the warped distribution and a
    row's reply does not depend on the rows it is batched with (a resumed run batches differently)."""

    def __init__(self, seeds: Sequence[int]):
        import torch

        self.generators = [torch.Generator().manual_seed(int(seed)) for seed in seeds]

    def __call__(self, input_ids, scores):
        import torch

        uniform = torch.stack([torch.rand(scores.shape[1], generator=g, dtype=torch.float64)
                               for g in self.generators]).clamp_(min=1e-300)
        gumbel = -torch.log(-torch.log(uniform))
        return scores + gumbel.to(device=scores.device, dtype=scores.dtype)


def shared_prefix_length(rows: Sequence[Sequence[int]]) -> int:
    """Length of the longest common prefix of token rows, leaving every row at least one own token."""
    if not rows:
        return 0
    first, limit = rows[0], min(len(r) for r in rows) - 1
    n = 0
    while n < limit and all(r[n] == first[n] for r in rows):
        n += 1
    return n


class TransformersBackend:
    name = "transformers"

    def __init__(
        self,
        model: str | os.PathLike,
        *,
        device: str | None = None,
        dtype: str = "auto",
        batch_size: int = 8,
        trust_remote_code: bool = False,
        share_prefix: bool = True,
    ):
        from embedforge.modeling import load_causal_lm, load_tokenizer

        self.model = str(model)
        self.batch_size = batch_size
        self.share_prefix = share_prefix
        self.tokenizer = load_tokenizer(model, padding_side="left", trust_remote_code=trust_remote_code)
        if not self.tokenizer.chat_template:
            raise ModelLoadError(f"{model}: the tokenizer has no chat template; use an instruct/chat model")
        self.lm = load_causal_lm(model, dtype=dtype, device=device, trust_remote_code=trust_remote_code)
        self.lm.eval()
        self.num_parameters = sum(p.numel() for p in self.lm.parameters())
        self.tokens_generated = 0  # new tokens, all rows, for throughput reports
        self.generate_seconds = 0.0
        self._grammar_tokenizer = None
        self._grammars: dict[str, str] = {}

    def _eos_ids(self) -> list[int]:
        eos = self.lm.generation_config.eos_token_id
        ids = eos if isinstance(eos, list) else [eos]
        ids = [i for i in ids if i is not None] or [self.tokenizer.eos_token_id]
        return ids

    def _processors(self, params: GenerationParams, rows: int, prompt_length: int) -> list:
        if params.json_schema is None:
            return []
        from embedforge.data_synth.backends.constrained import (
            SchemaLogitsProcessor,
            grammar_for,
            llg_tokenizer,
        )

        if self._grammar_tokenizer is None:
            vocab = self.lm.get_output_embeddings().weight.shape[0]
            self._grammar_tokenizer = llg_tokenizer(self.tokenizer, vocab)
        grammar = self._grammars.get(params.json_schema)
        if grammar is None:
            grammar = self._grammars[params.json_schema] = grammar_for(params.json_schema)
        return [SchemaLogitsProcessor(self._grammar_tokenizer, grammar, rows, prompt_length, self._eos_ids())]

    def _inputs(self, rows: list[list[int]]):
        """input_ids, attention_mask and a prefix cache (or None) for one batch of token rows."""
        import torch

        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self._eos_ids()[0]
        shared = shared_prefix_length(rows) if self.share_prefix and len(rows) > 1 else 0
        if shared < MIN_SHARED_PREFIX:
            shared = 0
        own = [r[shared:] for r in rows]
        width = max(len(r) for r in own)
        ids = torch.tensor([rows[0][:shared] + [pad] * (width - len(r)) + r for r in own], device=self.lm.device)
        mask = torch.tensor([[1] * shared + [0] * (width - len(r)) + [1] * len(r) for r in own],
                            device=self.lm.device)
        cache = None
        if shared:
            with torch.inference_mode():
                cache = self.lm(ids[:1, :shared], use_cache=True).past_key_values
            cache.batch_repeat_interleave(len(rows))
        return ids, mask, cache

    def generate(
        self, batch: Sequence[Messages], params: GenerationParams, seeds: Sequence[int] | None = None
    ) -> list[Result]:
        import torch
        from transformers import LogitsProcessorList, TemperatureLogitsWarper, TopPLogitsWarper

        seeds = list(seeds) if seeds is not None else [0] * len(batch)
        results: list[Result] = []
        for start in range(0, len(batch), self.batch_size):
            chunk = list(batch[start : start + self.batch_size])
            # the chat template already holds any BOS; adding special tokens again would double it
            rows = [
                self.tokenizer(
                    self.tokenizer.apply_chat_template(m, tokenize=False, add_generation_prompt=True),
                    add_special_tokens=False,
                )["input_ids"]
                for m in chunk
            ]
            began = time.monotonic()
            ids, mask, cache = self._inputs(rows)
            processors = self._processors(params, len(rows), ids.shape[1])
            if params.temperature > 0:  # warp, then each row samples with its own generator
                processors += [TemperatureLogitsWarper(params.temperature)]
                if params.top_p is not None and params.top_p < 1:
                    processors += [TopPLogitsWarper(params.top_p)]
                processors += [RowSampler(seeds[start : start + self.batch_size])]
            with torch.inference_mode():
                out = self.lm.generate(
                    input_ids=ids,
                    attention_mask=mask,
                    **({_cache_argument(): cache} if cache is not None else {}),
                    max_new_tokens=params.max_new_tokens,
                    do_sample=False,
                    temperature=None,
                    top_p=None,
                    top_k=None,
                    pad_token_id=self.tokenizer.pad_token_id,
                    logits_processor=LogitsProcessorList(processors),
                )
            new = out[:, ids.shape[1] :]
            texts = self.tokenizer.batch_decode(new, skip_special_tokens=True)
            latency = time.monotonic() - began
            self.generate_seconds += latency
            self.tokens_generated += int((new != self.tokenizer.pad_token_id).sum()) if (
                self.tokenizer.pad_token_id is not None) else new.numel()
            results.extend(Result(text, latency_s=latency) for text in texts)
        return results

    def close(self) -> None:
        self.lm = None

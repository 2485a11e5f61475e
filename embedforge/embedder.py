"""`Embedder`: text -> L2-normalised vectors, with Qwen3-Embedding conventions by default.

Decoder embedders (Qwen3-Embedding and models trained like it) embed with the last token's state
after an `<|endoftext|>` appended exactly once, whichever tokenizer is handed in (the released
Qwen3-Embedding tokenizer appends it itself, base Qwen3 tokenizers do not). A chat LLM that is not an
embedder yet (SmolLM2-Instruct) embeds each text as one user turn of its chat template, as
sentence-transformers does; another causal LM pools its last real token.
Encoders use the pooling their sentence-transformers folder declares, or mean pooling.
The same `tokenize` + `embed` pair serves inference, training and export, so they cannot drift.
Decoders can also run padding-free: `tokenize(..., packing=True)` packs several texts per row
(embedforge/packing.py) and `embed` reads each text's vector at its own last token.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from embedforge import modeling
from embedforge.errors import InputError, ModelLoadError
from embedforge.packing import (
    Packing,
    backbone_config,
    choose_packing,
    is_packed,
    needs_single_row,
    pack,
    plan_forwards,
    plan_rows,
    pool_packed,
    why_not_packable,
)
from embedforge.pooling import POOLING_MODES, pool, truncate_and_normalize
from embedforge.templates import query_prompt

logger = logging.getLogger(__name__)

QWEN_EOS = "<|endoftext|>"
PRECISIONS = ("float32", "int8", "uint8", "binary", "ubinary")
# Texts are cut to this many characters per token kept before tokenizing, so a 50 MB line costs what its
# first tokens cost; a cut text that gives fewer tokens than are kept (no real text does) is tokenized whole.
CHARS_PER_TOKEN_BOUND = 64
# sentence-transformers (6 and later) renders text through the chat template when a folder declares
# the message modality: the same user turn our Embedder builds for a chat-template spec.
CHAT_MODALITIES = {"modality_config": {
    "text": {"method": "forward", "method_output_name": "last_hidden_state"},
    "message": {"method": "forward", "method_output_name": "last_hidden_state", "format": "flat"},
}, "module_output_name": "token_embeddings"}


@dataclass
class EmbedderSpec:
    """How a backbone turns text into one vector; saved beside the weights so a reload agrees."""

    pooling: str = "lasttoken"
    append_eos: bool = True
    eos_token: str | None = QWEN_EOS
    padding_side: str = "left"
    max_length: int = 8192
    prompts: dict[str, str] = field(default_factory=dict)
    matryoshka_dims: list[int] = field(default_factory=list)
    # Wrap each text as one user turn of the tokenizer's chat template and pool the turn's last token,
    # as sentence-transformers does for a chat LLM (None: decide from the tokenizer). Only without
    # append_eos, which is the report's convention for embedders (EOS appended, pooled there).
    chat_template: bool | None = False

    def __post_init__(self):
        if self.pooling not in POOLING_MODES:
            raise ModelLoadError(f"unknown pooling {self.pooling!r}; expected one of {POOLING_MODES}")


def quantize_embeddings(vectors: np.ndarray, precision: str) -> np.ndarray:
    """sentence-transformers' embedding quantization: int8/uint8 buckets between each dimension's
    min and max over these rows (255 steps, floor), binary/ubinary sign bits packed 8 per byte."""
    if precision.endswith("int8"):
        if len(vectors) < 2:
            raise InputError(f"{precision} ranges need at least 2 embeddings to calibrate on")
        starts = vectors.min(axis=0)
        steps = (vectors.max(axis=0) - starts) / 255
        steps = np.where(steps == 0, 1, steps)
        buckets = np.clip(np.floor((vectors - starts) / steps), 0, 255)
        return (buckets - 128).astype(np.int8) if precision == "int8" else buckets.astype(np.uint8)
    packed = np.packbits(vectors > 0, axis=-1)
    return (packed - 128).astype(np.int8) if precision == "binary" else packed


def check_texts(texts: Any, what: str = "texts") -> list[str]:
    """A list of non-empty strings, or an InputError naming the first bad row."""
    if isinstance(texts, str):
        raise InputError(f"{what} must be a list of strings, got a single string (wrap it in a list)")
    texts = list(texts)
    for i, text in enumerate(texts):
        if not isinstance(text, str):
            raise InputError(f"{what}[{i}]: expected a string, got {type(text).__name__}")
        if not text.strip():
            raise InputError(f"{what}[{i}]: empty string")
    return texts


def _read_sentence_transformers_layout(source: str) -> tuple[str, EmbedderSpec] | None:
    """(transformer subfolder, spec) from a sentence-transformers folder's modules.json, or None."""
    modules = modeling.read_json_if_exists(source, "modules.json")
    if not modules:
        return None
    transformer = next((m for m in modules if m["type"].endswith("Transformer")), None)
    pooling_module = next((m for m in modules if m["type"].endswith("Pooling")), None)
    if transformer is None:
        raise ModelLoadError(f"{source}: modules.json has no Transformer module")
    sub = transformer.get("path", "")
    st_cfg = modeling.read_json_if_exists(source, os.path.join(sub, "sentence_bert_config.json") if sub else
                                          "sentence_bert_config.json") or {}
    mode = "mean"
    if pooling_module is not None:
        pcfg = modeling.read_json_if_exists(source, f"{pooling_module['path']}/config.json") or {}
        if pcfg.get("pooling_mode_lasttoken"):
            mode = "lasttoken"
        elif pcfg.get("pooling_mode_cls_token"):
            mode = "cls"
        elif pcfg.get("pooling_mode_mean_tokens"):
            mode = "mean"
        else:
            raise ModelLoadError(f"{source}: pooling {pcfg} is not supported (lasttoken, mean or cls)")
    extra = modeling.read_json_if_exists(source, "config_sentence_transformers.json") or {}
    own = modeling.read_json_if_exists(source, "embedforge.json") or {}
    spec = EmbedderSpec(
        pooling=mode,
        append_eos=bool(own.get("append_eos", mode == "lasttoken")),
        eos_token=own.get("eos_token", QWEN_EOS),
        padding_side=own.get("padding_side", "left" if mode == "lasttoken" else "right"),
        max_length=int(st_cfg.get("max_seq_length") or 8192),
        prompts=dict(extra.get("prompts") or {}),
        matryoshka_dims=list(own.get("matryoshka_dims") or []),
        chat_template=bool(own.get("chat_template", False)),
    )
    return sub, spec


def infer_spec(source: str) -> tuple[str, EmbedderSpec]:
    """Read the layout of a model folder or Hub id: sentence-transformers, or plain transformers."""
    layout = _read_sentence_transformers_layout(source)
    if layout is not None:
        return layout
    config = modeling.read_model_config(source)
    own = modeling.read_json_if_exists(source, "embedforge.json") or {}
    if own:
        return "", EmbedderSpec(**own)
    if modeling.is_decoder_config(config):
        # A causal language model (SmolLM2, a Qwen3 base) is not an embedder yet. Its EOS is often the
        # pretraining document separator, whose state ignores the text, and contrastive training from
        # it collapses (bench/results/train_decoder_vs_st.md). As sentence-transformers does, the text
        # becomes one user turn of its chat template when it has one, pooled at the turn's last token,
        # else its last real token is pooled. A bare decoder body (Qwen3Model, the layout of
        # Qwen3-Embedding) is an embedder: EOS appended once, pooled there.
        archs = config.get("architectures") or []
        if any(a.endswith("ForCausalLM") for a in archs):
            return "", EmbedderSpec(append_eos=False, chat_template=None)
        return "", EmbedderSpec()
    return "", EmbedderSpec(pooling="mean", append_eos=False, eos_token=None, padding_side="right", max_length=512)


class Embedder:
    """Encode texts into L2-normalised vectors.

    Example:
        >>> emb = Embedder.from_pretrained("Qwen/Qwen3-Embedding-0.6B")
        >>> q = emb.encode(["what is slerp?"], instruction="Given a web search query, retrieve ...")
        >>> d = emb.encode(["Slerp interpolates on the sphere..."], dim=256)
    """

    def __init__(self, model: torch.nn.Module, tokenizer, spec: EmbedderSpec, *, name: str = ""):
        self.model = model
        self.tokenizer = tokenizer
        self.spec = spec
        self.name = name
        self.tokenizer.padding_side = spec.padding_side
        self._padding_reasons: set[str] = set()  # why packing fell back, each logged once
        self._eos_ids: dict[str | None, int] = {}
        if spec.chat_template is None:
            spec.chat_template = bool(getattr(tokenizer, "chat_template", None)) and not spec.append_eos
        if spec.append_eos:
            self._eos_id  # noqa: B018 - fail at load, not at the first batch, when there is no EOS to pool on

    @classmethod
    def from_pretrained(
        cls,
        name_or_path: str | os.PathLike,
        *,
        dtype: str | torch.dtype | None = "auto",
        device: str | torch.device | None = None,
        attn_implementation: str | None = "sdpa",
        max_length: int | None = None,
        pooling: str | None = None,
        trust_remote_code: bool = False,
    ) -> Embedder:
        """Load from a Hub id, a model folder, a sentence-transformers folder or a LoRA adapter folder."""
        source = modeling.check_model_source(name_or_path)
        base = modeling.adapter_base(source)
        sub, spec = infer_spec(base or source)
        own = modeling.read_json_if_exists(source, "embedforge.json") if base else None
        if own:
            spec = EmbedderSpec(**own)
        if max_length is not None:
            spec.max_length = max_length
        if pooling is not None:
            spec = EmbedderSpec(**{**asdict(spec), "pooling": pooling})
        weights = os.path.join(source, sub) if sub else source
        model = modeling.load_backbone(weights, dtype=dtype, device=device, attn_implementation=attn_implementation,
                                       trust_remote_code=trust_remote_code)
        model.eval()
        tokenizer = modeling.load_tokenizer(weights, padding_side=spec.padding_side,
                                            trust_remote_code=trust_remote_code)
        return cls(model, tokenizer, spec, name=str(name_or_path))

    # --- the two differentiable steps shared by inference, training and export -----------------

    @property
    def _eos_id(self) -> int | None:
        """The token appended to decoder inputs and pooled (None when the spec appends none). Read
        from the spec each time: training may switch a loaded model's pooling (TrainConfig.append_eos)."""
        if not self.spec.append_eos:
            return None
        if self.spec.eos_token not in self._eos_ids:
            wanted = self.spec.eos_token
            eos = wanted if wanted in self.tokenizer.get_vocab() else self.tokenizer.eos_token
            if eos is None:
                raise ModelLoadError(f"{self.name}: tokenizer has no {wanted!r} and no eos_token to pool on")
            self._eos_ids[wanted] = self._eos_ids[eos] = self.tokenizer.convert_tokens_to_ids(eos)
            self.spec.eos_token = eos
        return self._eos_ids[self.spec.eos_token]

    @functools.cached_property
    def _prefix_ids(self) -> list[int]:
        return self._special_prefix()

    def _special_prefix(self) -> list[int]:
        """Tokens the tokenizer puts before the text (a BOS for Llama-style tokenizers; none for Qwen)."""
        probe = "hello"
        full = self.tokenizer(probe)["input_ids"]
        bare = self.tokenizer(probe, add_special_tokens=False)["input_ids"]
        for start in range(len(full) - len(bare) + 1):
            if full[start:start + len(bare)] == bare:
                return full[:start]
        return []

    def tokenize(
        self, texts: Sequence[str], instruction: str | None = None, max_length: int | None = None, *,
        packing: Packing = False,
    ) -> dict[str, torch.Tensor]:
        """Model inputs for a batch, instruction applied, EOS appended exactly once: token ids and
        attention mask, or packed rows (see `batch`)."""
        return self.batch(self.token_ids(texts, instruction, max_length), packing=packing)

    def batch(self, rows: list[list[int]], packing: Packing = False) -> dict[str, torch.Tensor]:
        """Model inputs for token-id rows: padded, or packed (several texts per row, no padding
        between them) when `packing` is True or "auto" and the model can pack. "auto" packs only when
        that leaves fewer positions to compute than padding to the longest row; a model that cannot
        pack (encoders) gets padded rows and one log line. `embed` takes either."""
        if not self._packs(packing):
            return self._pad(rows)
        lengths = [len(r) for r in rows]
        single_row = needs_single_row(self.model)
        plan = None if single_row else plan_rows(lengths)
        packed_slots = sum(lengths) if single_row else len(plan) * max(lengths)
        if packing == "auto" and packed_slots >= len(rows) * max(lengths):
            return self._pad(rows)
        return pack(rows, pad_id=self._pad_id, single_row=single_row, rows=plan)

    def _packs(self, requested: Packing) -> bool:
        ok, reason = choose_packing(requested, self.model)
        if reason is not None and reason not in self._padding_reasons:
            self._padding_reasons.add(reason)
            level = logging.WARNING if requested is True else logging.INFO
            logger.log(level, "%s: padded batches, not packed: %s", self.name or "embedder", reason)
        return ok

    @property
    def _pad_id(self) -> int:
        return self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self._eos_id

    def token_ids(
        self, texts: Sequence[str], instruction: str | Sequence[str | None] | None = None,
        max_length: int | None = None, *, prompt: str | None = None,
    ) -> list[list[int]]:
        """Unpadded ids per text, truncated to max_length (with a warning) and EOS-terminated for decoders.

        `instruction` (one, or one per text) becomes the Qwen3 query prompt `Instruct: ...\nQuery:`;
        `prompt` is a literal one. A prompt precedes the text, or, for a chat-template spec, is the
        system turn before the text's user turn (where sentence-transformers puts a prompt too)."""
        max_length = max_length or self.spec.max_length
        prompts = self._prompts(len(texts), instruction, prompt)
        if self.spec.chat_template and not self.spec.append_eos:
            return self._chat_rows(list(texts), prompts, max_length)
        formatted = [(p or "") + t for p, t in zip(prompts, texts)]
        if not self.spec.append_eos:  # encoders: the tokenizer's own special tokens ([CLS] ... [SEP])
            cap = CHARS_PER_TOKEN_BOUND * max_length
            batch = self.tokenizer([t[:cap] for t in formatted], truncation=True, max_length=max_length)
            rows, encodings = batch["input_ids"], batch.encodings or []  # fast tokenizers report overflow
            cut = [len(t) > cap for t in formatted]
            for i in (i for i, c in enumerate(cut) if c and len(rows[i]) < max_length):
                rows[i] = self.tokenizer(formatted[i], truncation=True, max_length=max_length)["input_ids"]
            overflow = [bool(e.overflowing) for e in encodings] or [False] * len(rows)
            self._warn_truncated(sum(c or o for c, o in zip(cut, overflow)), max_length)
            return rows
        budget = max_length - len(self._prefix_ids) - 1
        if budget < 1:
            raise InputError(f"max_length={max_length} leaves no room for text")
        rows, truncated, eos = [], 0, self._eos_id
        for ids in self._ids(formatted, budget + 1, add_special_tokens=False):
            while ids and ids[-1] == eos:  # the text itself ended in EOS: keep one
                ids = ids[:-1]
            if len(ids) > budget:
                ids, truncated = ids[:budget], truncated + 1
            rows.append(self._prefix_ids + ids + [eos])
        self._warn_truncated(truncated, max_length)
        return rows

    def _ids(self, texts: list[str], keep: int, **kwargs: Any) -> list[list[int]]:
        """Token ids of each text, of which at least the first `keep` are exact (CHARS_PER_TOKEN_BOUND)."""
        cap = CHARS_PER_TOKEN_BOUND * max(keep, 1)
        rows = self.tokenizer([t[:cap] for t in texts], **kwargs)["input_ids"]
        for i, text in enumerate(texts):
            if len(text) > cap and len(rows[i]) < keep:
                rows[i] = self.tokenizer(text, **kwargs)["input_ids"]
        return rows

    @staticmethod
    def _prompts(n: int, instruction: str | Sequence[str | None] | None, prompt: str | None) -> list[str | None]:
        if prompt is not None and instruction is not None:
            raise InputError("pass either a prompt/prompt_name or an instruction, not both")
        if prompt is not None:
            return [prompt or None] * n
        instructions = [instruction] * n if instruction is None or isinstance(instruction, str) else list(instruction)
        if len(instructions) != n:
            raise InputError(f"{len(instructions)} instructions for {n} texts")
        return [query_prompt(i) if i else None for i in instructions]

    def _chat_rows(self, texts: list[str], prompts: list[str | None], max_length: int) -> list[list[int]]:
        """Each text as one user turn of the chat template (after a system turn holding its prompt,
        if any), tokenized as rendered: the ids sentence-transformers feeds. An over-long text is cut,
        never the template around it: the pooled token is the turn's last."""
        cap = CHARS_PER_TOKEN_BOUND * max_length
        texts = [t if len(t) <= cap else t[:cap] if len(self._ids([t], max_length)[0]) >= max_length else t
                 for t in texts]
        conversations = [([{"role": "system", "content": p}] if p else []) + [{"role": "user", "content": t}]
                         for p, t in zip(prompts, texts)]
        rendered = self.tokenizer.apply_chat_template(conversations, tokenize=False, add_generation_prompt=False)
        rows, truncated = [], 0
        for conversation, text, ids in zip(conversations, texts,
                                           self.tokenizer(rendered, add_special_tokens=False)["input_ids"]):
            if len(ids) > max_length:
                before, after = self._turn_around(conversation[:-1])
                budget = max_length - len(before) - len(after)
                if budget < 1:
                    raise InputError(f"max_length={max_length} leaves no room for text inside the chat template")
                ids = before + self.tokenizer(text, add_special_tokens=False)["input_ids"][:budget] + after
                truncated += 1
            rows.append(ids)
        self._warn_truncated(truncated, max_length)
        return rows

    def _turn_around(self, history: list[dict[str, str]]) -> tuple[list[int], list[int]]:
        """Token ids before and after the text of a user turn that follows `history`."""
        marker = "\u2063EMBEDFORGE\u2063"
        rendered = self.tokenizer.apply_chat_template([*history, {"role": "user", "content": marker}],
                                                      tokenize=False, add_generation_prompt=False)
        if rendered.count(marker) != 1:
            raise ModelLoadError(f"{self.name}: the chat template does not render a user turn's text once")
        before, after = rendered.split(marker)
        return (self.tokenizer(before, add_special_tokens=False)["input_ids"],
                self.tokenizer(after, add_special_tokens=False)["input_ids"])

    def _pad(self, rows: list[list[int]]) -> dict[str, torch.Tensor]:
        width = max(len(r) for r in rows)
        ids = torch.full((len(rows), width), self._pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, row in enumerate(rows):
            if self.spec.padding_side == "left":
                ids[i, width - len(row):], mask[i, width - len(row):] = torch.tensor(row), 1
            else:
                ids[i, :len(row)], mask[i, :len(row)] = torch.tensor(row), 1
        return {"input_ids": ids, "attention_mask": mask}

    @staticmethod
    def _warn_truncated(count: int, max_length: int) -> None:
        if count:
            warnings.warn(f"{count} text(s) longer than max_length={max_length} tokens were truncated", stacklevel=3)

    def embed(self, features: dict[str, torch.Tensor]) -> torch.Tensor:
        """Pooled, L2-normalised float32 embeddings at full width, one per text in the order the
        features were made (padded or packed); differentiable outside no_grad."""
        device = self.device
        if is_packed(features):
            reason = why_not_packable(self.model)
            if reason is not None:
                raise InputError(f"packed features for a model that cannot pack: {reason}")
            # No KV cache: with one, transformers ignores the packing and texts attend across a row.
            hidden = self.model(input_ids=features["input_ids"].to(device),
                                position_ids=features["position_ids"].to(device), use_cache=False).last_hidden_state
            pooled = pool_packed(hidden, features, self.spec.pooling)
        else:
            features = {k: v.to(device) for k, v in features.items()}
            extra = {"use_cache": False} if self._is_decoder else {}  # a cache only holds memory here
            hidden = self.model(**features, **extra).last_hidden_state
            pooled = pool(hidden, features["attention_mask"], self.spec.pooling)
        return F.normalize(pooled.float(), p=2, dim=-1)

    @property
    def _is_decoder(self) -> bool:
        return getattr(backbone_config(self.model), "model_type", None) in modeling.DECODER_MODEL_TYPES

    # --- inference ----------------------------------------------------------------------------

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dimension(self) -> int:
        return int(self.model.config.hidden_size)

    def encode(
        self,
        texts: str | Sequence[str],
        prompt_name: str | None = None,
        prompt: str | None = None,
        batch_size: int = 32,
        show_progress_bar: bool | None = None,
        output_value: str | None = "sentence_embedding",
        precision: str = "float32",
        convert_to_numpy: bool = True,
        convert_to_tensor: bool = False,
        device: str | torch.device | None = None,
        normalize_embeddings: bool = False,
        truncate_dim: int | None = None,
        *,
        instruction: str | None = None,
        dim: int | None = None,
        max_length: int | None = None,
        show_progress: bool | None = None,
        packing: Packing = "auto",
    ) -> np.ndarray | torch.Tensor | list[torch.Tensor]:
        """Embed texts; rows come back in input order, L2-normalised.

        The keywords are sentence-transformers' `encode`, with the same meanings, so code written
        for a `SentenceTransformer` runs unchanged; a single string gives a single vector.

        Args:
            prompt_name: a prompt stored with the model ("query", "document"); `prompt`: a literal prefix.
            precision: "float32", or quantized "int8" / "uint8" (ranges calibrated on these rows, as
                sentence-transformers does) / "binary" / "ubinary" (sign bits packed 8 per byte).
            normalize_embeddings: vectors are always unit length at full width (the pooling ends in a
                normalisation); with `truncate_dim` this renormalises the truncated vectors.
            truncate_dim: keep the first `truncate_dim` coordinates (not renormalised, as in
                sentence-transformers, unless normalize_embeddings).
            instruction: Qwen3 query instruction, formatted `Instruct: {instruction}\nQuery:{text}`.
            dim: Matryoshka width, the Qwen3 convention: truncate to `dim`, then renormalise.
            max_length: tokens per text (default: the model's).
            show_progress: alias of show_progress_bar.
            packing: decoders only. False: forwards of `batch_size` texts padded to the longest;
                True: the same forwards with the shortest texts moved into their padding (several
                texts per row, each attending only to itself), so there are fewer forwards and none
                larger; "auto" (default): packed when that computes fewer positions. The vectors are
                the same either way (float32: within rounding). Encoders always pad.
        """
        single = isinstance(texts, str)
        texts = check_texts([texts] if single else texts)
        if output_value != "sentence_embedding":
            raise InputError(f"output_value={output_value!r} is not supported; embedforge returns sentence embeddings")
        if precision not in PRECISIONS:
            raise InputError(f"precision must be one of {PRECISIONS}, got {precision!r}")
        if batch_size < 1:
            raise InputError(f"batch_size must be a positive integer, got {batch_size}")
        if prompt_name is not None and prompt is None:
            if prompt_name not in self.spec.prompts:
                raise InputError(f"unknown prompt_name {prompt_name!r}; this model has {sorted(self.spec.prompts)}")
            prompt = self.spec.prompts[prompt_name]
        width = dim if dim is not None else truncate_dim
        if width is not None and not 0 < width <= self.dimension:
            raise InputError(f"dim must be in 1..{self.dimension}, got {width}")
        renormalise = dim is not None or normalize_embeddings
        if device is not None and torch.device(device) != self.device:
            self.model.to(device)
        vectors = self._encode_float(texts, instruction, prompt or None, width, renormalise, batch_size, max_length,
                                     bool(show_progress if show_progress is not None else show_progress_bar), packing)
        if precision != "float32":
            vectors = quantize_embeddings(vectors, precision)
        if convert_to_tensor:
            result: np.ndarray | torch.Tensor | list[torch.Tensor] = torch.from_numpy(vectors)
        elif convert_to_numpy:
            result = vectors
        else:
            result = list(torch.from_numpy(vectors))
        return result[0] if single else result

    def encode_query(self, texts: str | Sequence[str], **kwargs: Any):
        """`encode` with the model's "query" prompt, when it has one (sentence-transformers' convention)."""
        if "prompt" not in kwargs and "prompt_name" not in kwargs and "query" in self.spec.prompts:
            kwargs["prompt_name"] = "query"
        return self.encode(texts, **kwargs)

    def encode_document(self, texts: str | Sequence[str], **kwargs: Any):
        """`encode` with the model's document prompt ("document", "passage" or "corpus"), when it has one."""
        if "prompt" not in kwargs and "prompt_name" not in kwargs:
            name = next((n for n in ("document", "passage", "corpus") if n in self.spec.prompts), None)
            if name is not None:
                kwargs["prompt_name"] = name
        return self.encode(texts, **kwargs)

    def _encode_float(self, texts: list[str], instruction: str | None, prompt: str | None, width: int | None,
                      renormalise: bool, batch_size: int, max_length: int | None, show_progress: bool,
                      packing: Packing) -> np.ndarray:
        out = np.zeros((len(texts), width or self.dimension), dtype=np.float32)
        if not texts:
            return out
        # Tokenize once and batch by token count (not characters, as sentence-transformers does):
        # each batch then pads to nearly its own length.
        rows = self.token_ids(texts, instruction, max_length, prompt=prompt)
        order = sorted(range(len(rows)), key=lambda i: -len(rows[i]))
        forwards = self._forwards(rows, order, batch_size, packing)
        if show_progress:
            from tqdm.auto import tqdm

            forwards = tqdm(forwards, desc="encode", unit="batch")
        with torch.inference_mode():
            for group, features in forwards:
                vectors = self.embed(features)
                if width is not None:
                    vectors = truncate_and_normalize(vectors, width) if renormalise else vectors[:, :width]
                out[group] = vectors.cpu().numpy()
        return out

    def _forwards(self, rows: list[list[int]], order: list[int], batch_size: int,
                  packing: Packing) -> list[tuple[list[int], dict[str, torch.Tensor]]]:
        """(text indices, features) of each forward, longest texts first. Padded: `batch_size` texts.
        Packed: the same forwards with the shortest texts moved into their padding (`plan_forwards`),
        so no forward is larger than the padded one and there are fewer of them."""
        padded = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
        if not self._packs(packing):
            return [(group, self._pad([rows[i] for i in group])) for group in padded]
        lengths = [len(rows[i]) for i in order]
        plans = plan_forwards(lengths, batch_size, single_row=needs_single_row(self.model))
        packed_slots = sum(len(plan) * max(sum(lengths[i] for i in row) for row in plan) for plan in plans)
        padded_slots = sum(len(group) * len(rows[group[0]]) for group in padded)
        if packing == "auto" and packed_slots >= padded_slots:
            return [(group, self._pad([rows[i] for i in group])) for group in padded]
        forwards = []
        for plan in plans:
            group = [order[i] for row in plan for i in row]
            local, at = [], 0
            for row in plan:
                local.append(list(range(at, at + len(row))))
                at += len(row)
            forwards.append((group, pack([rows[i] for i in group], pad_id=self._pad_id, rows=local)))
        return forwards

    def similarity(self, a: np.ndarray | torch.Tensor, b: np.ndarray | torch.Tensor) -> torch.Tensor:
        """Cosine similarity matrix of two sets of vectors (sentence-transformers' `similarity`)."""
        a, b = torch.as_tensor(np.asarray(a) if isinstance(a, list) else a), torch.as_tensor(b)
        a, b = a.reshape(-1, a.shape[-1]).float(), b.reshape(-1, b.shape[-1]).float()
        return F.normalize(a, dim=-1) @ F.normalize(b, dim=-1).T

    def get_sentence_embedding_dimension(self) -> int:
        return self.dimension

    # --- saving -------------------------------------------------------------------------------

    def save_pretrained(self, folder: str | os.PathLike, *, default_instruction: str | None = None) -> Path:
        """Write a sentence-transformers layout (Transformer -> Pooling -> Normalize) that
        `Embedder.from_pretrained` and `SentenceTransformer` both load with the same pooling."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        self.model.save_pretrained(folder, safe_serialization=True)
        self.tokenizer.save_pretrained(folder)
        modeling.strip_auto_map(folder)  # remote code is never saved beside the weights
        write_sentence_transformers_config(folder, self.spec, self.dimension, default_instruction)
        return folder


def write_sentence_transformers_config(
    folder: Path, spec: EmbedderSpec, dimension: int, default_instruction: str | None = None
) -> None:
    """modules.json, pooling config, prompts and our own spec (EOS token, Matryoshka dims)."""
    modules = [
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
        {"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"},
    ]
    pooling = {
        "word_embedding_dimension": dimension,
        "pooling_mode_cls_token": spec.pooling == "cls",
        "pooling_mode_mean_tokens": spec.pooling == "mean",
        "pooling_mode_max_tokens": False,
        "pooling_mode_mean_sqrt_len_tokens": False,
        "pooling_mode_weightedmean_tokens": False,
        "pooling_mode_lasttoken": spec.pooling == "lasttoken",
        "include_prompt": True,
    }
    prompts = dict(spec.prompts)
    if default_instruction:
        prompts = {"query": query_prompt(default_instruction), "document": ""}
    (folder / "1_Pooling").mkdir(exist_ok=True)
    (folder / "2_Normalize").mkdir(exist_ok=True)
    files = {
        "modules.json": modules,
        "1_Pooling/config.json": pooling,
        "sentence_bert_config.json": {"max_seq_length": spec.max_length, "do_lower_case": False}
        | (CHAT_MODALITIES if spec.chat_template and not spec.append_eos else {}),
        "config_sentence_transformers.json": {
            "prompts": prompts,
            "default_prompt_name": None,
            "similarity_fn_name": "cosine",
        },
        "embedforge.json": asdict(spec) | {"prompts": prompts},
    }
    for name, obj in files.items():
        (folder / name).write_text(json.dumps(obj, indent=2) + "\n", encoding="utf-8")

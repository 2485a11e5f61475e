"""`Reranker`: p(yes) for (query, document) pairs with the official Qwen3-Reranker template.

The score is softmax over (logit_no, logit_yes) at the last position, read for yes. Only that one
position's logits are computed (`logits_to_keep=1`): the full-vocabulary logits of every position
cost about ten times more. Truncation cuts the document, never the template suffix the score is
read after. A sequence-classification export (one logit = yes - no) loads too.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from embedforge import modeling
from embedforge.embedder import check_texts
from embedforge.errors import InputError, ModelLoadError
from embedforge.templates import (
    RERANKER_NO,
    RERANKER_PREFIX,
    RERANKER_SUFFIX,
    RERANKER_YES,
    format_reranker_body,
)


def _has_lm_head(config: dict) -> bool:
    """A decoder whose checkpoint carries its LM head (a *ForCausalLM), or ties it to the embeddings."""
    archs = config.get("architectures") or []
    return modeling.is_decoder_config(config) and (
        any(a.endswith("ForCausalLM") for a in archs) or bool(config.get("tie_word_embeddings")))


class Reranker:
    """Score documents against a query with a yes/no LLM judge.

    Example:
        >>> rr = Reranker.from_pretrained("Qwen/Qwen3-Reranker-0.6B")
        >>> rr.score("what is slerp?", ["Slerp interpolates on the sphere.", "Paris is in France."])
        array([0.93, 0.01], dtype=float32)
    """

    def __init__(self, model: torch.nn.Module, tokenizer, *, max_length: int = 8192, name: str = ""):
        self.model = model
        self.tokenizer = tokenizer
        self.tokenizer.padding_side = "left"
        self.max_length = max_length
        self.name = name
        self.is_seq_cls = type(model).__name__.endswith("ForSequenceClassification")
        self.yes_id = self._single_token_id(RERANKER_YES)
        self.no_id = self._single_token_id(RERANKER_NO)
        self.prefix_ids = tokenizer(RERANKER_PREFIX, add_special_tokens=False)["input_ids"]
        self.suffix_ids = tokenizer(RERANKER_SUFFIX, add_special_tokens=False)["input_ids"]

    def _single_token_id(self, word: str) -> int:
        ids = self.tokenizer(word, add_special_tokens=False)["input_ids"]
        if len(ids) != 1:
            raise ModelLoadError(f"{self.name}: {word!r} is not a single token in this tokenizer ({ids})")
        return ids[0]

    @classmethod
    def from_pretrained(
        cls,
        name_or_path: str | os.PathLike,
        *,
        dtype: str | torch.dtype | None = "auto",
        device: str | torch.device | None = None,
        attn_implementation: str | None = "sdpa",
        max_length: int = 8192,
        trust_remote_code: bool = False,
    ) -> Reranker:
        """Load a causal LM (the official form, or any chat LLM as an untrained judge), a LoRA
        adapter folder, or a one-logit sequence-classification export."""
        source = modeling.check_model_source(name_or_path)
        config = modeling.read_model_config(source)
        archs = config.get("architectures") or []
        if any(a.endswith("ForSequenceClassification") for a in archs):
            model = _load_seq_cls(source, dtype=dtype, device=device, attn_implementation=attn_implementation,
                                  trust_remote_code=trust_remote_code)
        elif not _has_lm_head(config):
            raise ModelLoadError(
                f"{name_or_path}: not a yes/no reranker ({', '.join(archs) or config.get('model_type')}): a reranker "
                "is a causal LM (Qwen3-Reranker, a chat LLM) or a one-logit sequence-classification export; "
                "scoring with a randomly initialised LM head would give meaningless scores")
        else:
            model = modeling.load_causal_lm(source, dtype=dtype, device=device,
                                            attn_implementation=attn_implementation,
                                            trust_remote_code=trust_remote_code)
        model.eval()
        tokenizer = modeling.load_tokenizer(source, padding_side="left", trust_remote_code=trust_remote_code)
        return cls(model, tokenizer, max_length=max_length, name=str(name_or_path))

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def tokenize_pairs(
        self,
        queries: Sequence[str],
        documents: Sequence[str],
        instructions: Sequence[str | None] | str | None = None,
        max_length: int | None = None,
    ) -> dict[str, torch.Tensor]:
        """prefix + body + suffix per pair, left padded; an over-long body loses its end (the document)."""
        max_length = max_length or self.max_length
        if len(queries) != len(documents):
            raise InputError(f"{len(queries)} queries but {len(documents)} documents")
        if instructions is None or isinstance(instructions, str):
            instructions = [instructions] * len(queries)
        bodies = [format_reranker_body(q, d, i) for q, d, i in zip(queries, documents, instructions)]
        budget = max_length - len(self.prefix_ids) - len(self.suffix_ids)
        if budget < 1:
            raise InputError(f"max_length={max_length} is shorter than the reranker template")
        rows, truncated = [], 0
        for ids in self.tokenizer(bodies, add_special_tokens=False)["input_ids"]:
            if len(ids) > budget:
                ids, truncated = ids[:budget], truncated + 1
            rows.append(self.prefix_ids + ids + self.suffix_ids)
        if truncated:
            warnings.warn(f"{truncated} pair(s) longer than max_length={max_length} had the document truncated",
                          stacklevel=2)
        width = max(len(r) for r in rows)
        ids = torch.full((len(rows), width), self.tokenizer.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, row in enumerate(rows):
            ids[i, width - len(row):], mask[i, width - len(row):] = torch.tensor(row), 1
        return {"input_ids": ids, "attention_mask": mask}

    def yes_no_logits(self, features: dict[str, torch.Tensor]) -> torch.Tensor:
        """[B, 2] float32 logits (no, yes) at the last position; differentiable outside no_grad.

        A sequence-classification model has one logit s = yes - no; it is returned as (0, s),
        which gives the same softmax.
        """
        features = {k: v.to(self.device) for k, v in features.items()}
        if self.is_seq_cls:
            score = self.model(**features).logits[:, 0].float()
            return torch.stack([torch.zeros_like(score), score], dim=1)
        logits = self.model(**features, logits_to_keep=1).logits[:, -1, :]
        return logits[:, [self.no_id, self.yes_id]].float()

    def score(
        self,
        query: str | Sequence[str],
        documents: Sequence[str],
        instruction: str | None = None,
        batch_size: int = 16,
        max_length: int | None = None,
        show_progress: bool = False,
    ) -> np.ndarray:
        """p(yes) for each document (one query for all, or one query per document)."""
        documents = check_texts(documents, "documents")
        queries = [query] * len(documents) if isinstance(query, str) else check_texts(query, "queries")
        if isinstance(query, str) and not query.strip():
            raise InputError("query: empty string")
        out = np.zeros(len(documents), dtype=np.float32)
        if not documents:
            return out
        order = sorted(range(len(documents)), key=lambda i: -(len(documents[i]) + len(queries[i])))
        batches = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
        if show_progress:
            from tqdm.auto import tqdm

            batches = tqdm(batches, desc="rerank", unit="batch")
        with torch.inference_mode():
            for batch in batches:
                features = self.tokenize_pairs([queries[i] for i in batch], [documents[i] for i in batch],
                                               instruction, max_length)
                probs = torch.softmax(self.yes_no_logits(features), dim=-1)[:, 1]
                out[batch] = probs.cpu().numpy()
        return out

    def save_pretrained(self, folder: str | os.PathLike) -> Path:
        folder = Path(folder)
        self.model.save_pretrained(folder, safe_serialization=True)
        self.tokenizer.save_pretrained(folder)
        modeling.strip_auto_map(folder)  # remote code is never saved beside the weights
        return folder


def _load_seq_cls(source: str, *, dtype, device, attn_implementation, trust_remote_code):
    from transformers import AutoModelForSequenceClassification

    dev = modeling.resolve_device(device)
    try:
        model = AutoModelForSequenceClassification.from_pretrained(
            source, dtype=modeling.resolve_dtype(dtype, dev), attn_implementation=attn_implementation,
            use_safetensors=True, trust_remote_code=trust_remote_code,
        )
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"{source}: cannot load sequence-classification model ({exc})") from None
    if model.config.num_labels != 1:
        raise ModelLoadError(f"{source}: expected a one-logit reranker head, found {model.config.num_labels} labels")
    return model.to(dev)

"""An `Embedder` as an mteb 2 model, with the official Qwen3 task instructions.

mteb is optional and imported on use (`pip install 'embedforge[mteb]'`). The wrapper follows
mteb 2's `EncoderProtocol`: `encode(inputs: DataLoader[BatchedInput], *, task_metadata, hf_split,
hf_subset, prompt_type)`, `similarity`, `similarity_pairwise` and `mteb_model_meta`.

mteb caches results under `<cache>/results/<model name>/<revision>/`, and reuses a cached score
whenever name and revision match. The meta therefore carries a revision derived from the weights
actually loaded (`model_fingerprint`), and the width and instruction settings as mteb
`experiment_kwargs`, so two models, or one model at two widths, can never share a cache entry.

Which instruction each call gets is `embedforge.eval.qwen3_prompts.qwen3_instruction` (the
official evaluation's rule and table); `task_instructions` entries take precedence over the
table. Models trained without instructions (encoders such as MiniLM) get none, unless forced.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Iterable, Mapping
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np

from embedforge.errors import ConfigError, InputError
from embedforge.eval.qwen3_prompts import TASK_PROMPTS, qwen3_instruction
from embedforge.eval.retrieval import default_query_instruction


def import_mteb():
    try:
        import mteb
    except ImportError:
        raise ConfigError("mteb is not installed; install it with: pip install 'embedforge[mteb]'") from None
    return mteb


def _texts_from(inputs: Any) -> list[str]:
    """Texts from mteb 2's DataLoader of BatchedInput dicts (the `text` field holds a document's
    title and body already joined, a query's instruction-free text)."""
    if isinstance(inputs, str):
        raise InputError("expected a DataLoader of batches, got a single string")
    texts: list[str] = []
    for batch in inputs:
        if not isinstance(batch, Mapping) or "text" not in batch:
            raise InputError(f"expected batch dicts with a 'text' field, got {type(batch).__name__}")
        texts.extend(batch["text"])
    return texts


def _task_prompt(task_metadata: Any) -> str | Mapping[str, str] | None:
    """The task's own prompt: its metadata's, else its task class's default (mteb's own fallback)."""
    if getattr(task_metadata, "prompt", None):
        return task_metadata.prompt
    from mteb.abstasks.abstask import get_abstask_prompt

    return get_abstask_prompt(task_metadata.name) or None


def model_fingerprint(embedder: Any) -> str:
    """sha256 of the loaded weights (names, dtypes, shapes, bytes) and the embedding spec."""
    import torch

    digest = hashlib.sha256()
    spec = getattr(embedder, "spec", None)
    digest.update(json.dumps(asdict(spec) if spec is not None else {}, sort_keys=True).encode())
    for name, tensor in embedder.model.state_dict().items():
        data = tensor.detach().cpu().contiguous()
        digest.update(f"{name}|{data.dtype}|{tuple(data.shape)}|".encode())
        digest.update(data.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def mteb_name(source: str | os.PathLike) -> str:
    """`org/name` as mteb requires: a Hub id as it is, a local folder as `local/<folder name>`,
    any other label as `local/<label>` with characters unsafe in a path replaced."""
    text = str(source).rstrip("/")
    if os.path.exists(text):
        text = Path(text).resolve().name
    elif re.fullmatch(r"[\w.-]+/[\w.-]+", text):
        return text
    return "local/" + (re.sub(r"[^\w.-]+", "_", text).strip("_") or "model")


class MtebEncoder:
    """Make an embedforge `Embedder` evaluable by mteb 2.

    Args:
        embedder: an `Embedder` (anything with `encode(texts, instruction=, dim=, batch_size=)`,
            `model`, `spec`, `dimension`).
        dim: Matryoshka width for every task (None = full).
        task_instructions: task name -> instruction, taking precedence over the Qwen3 table.
        use_instructions: None = only when the model takes instructions (an LLM embedder or a
            stored `Instruct:` prompt); True/False to force.
        name: the model's name in mteb (default: from the embedder's source, see `mteb_name`).

    Example:
        >>> import mteb
        >>> model = MtebEncoder(Embedder.from_pretrained("out/merged"), dim=256)
        >>> mteb.evaluate(model, tasks=mteb.get_tasks(tasks=["SciFact"]))
    """

    def __init__(
        self,
        embedder: Any,
        *,
        dim: int | None = None,
        task_instructions: Mapping[str, str] | None = None,
        use_instructions: bool | None = None,
        batch_size: int = 32,
        show_progress: bool = False,
        name: str | None = None,
    ):
        self.embedder = embedder
        self.dim = dim
        self.task_instructions = dict(task_instructions or {})
        self.use_instructions = (default_query_instruction(embedder) is not None
                                 if use_instructions is None else use_instructions)
        self.batch_size = batch_size
        self.show_progress = show_progress
        self.name = name or mteb_name(getattr(embedder, "name", "") or "model")
        self._meta = None

    def instruction_for(self, task_name: str, task_type: str, prompt_type: Any = None,
                        task_prompt: str | Mapping[str, str] | None = None) -> str | None:
        """The instruction for one encode call, or None for none."""
        if not self.use_instructions:
            return None
        table = {**TASK_PROMPTS, **self.task_instructions}
        return qwen3_instruction(task_name, task_type, prompt_type, task_prompt, table=table)

    @property
    def mteb_model_meta(self):
        """mteb's ModelMeta: a unique name, the weights' fingerprint as revision, the settings as
        experiment kwargs (built once; needs mteb)."""
        if self._meta is None:
            import_mteb()
            from mteb.models.model_meta import ModelMeta

            model = self.embedder.model
            experiment = {"dim": self.dim, "instructions": "qwen3" if self.use_instructions else "none"}
            if self.task_instructions:
                overrides = json.dumps(self.task_instructions, sort_keys=True).encode()
                experiment["task_instructions"] = hashlib.sha256(overrides).hexdigest()[:12]
            self._meta = ModelMeta(
                loader=None, name=self.name, revision=model_fingerprint(self.embedder)[:20],
                release_date=None, languages=None,
                n_parameters=sum(p.numel() for p in model.parameters()), memory_usage_mb=None,
                max_tokens=getattr(self.embedder.spec, "max_length", None),
                embed_dim=self.dim or self.embedder.dimension, license=None, open_weights=None,
                public_training_code=None, public_training_data=None, framework=["PyTorch"],
                similarity_fn_name="cosine", use_instructions=self.use_instructions, training_datasets=None,
                experiment_kwargs={k: v for k, v in experiment.items() if v is not None},
            )
        return self._meta

    def encode(self, inputs: Iterable[Any], *, task_metadata: Any, hf_split: str | None = None,
               hf_subset: str | None = None, prompt_type: Any = None, **kwargs: Any) -> np.ndarray:
        """Embeddings (float32, L2-normalised, `dim` wide) of the inputs, in order."""
        instruction = self.instruction_for(task_metadata.name, task_metadata.type, prompt_type,
                                           _task_prompt(task_metadata))
        texts = _texts_from(inputs)
        if not texts:
            return np.zeros((0, self.dim or self.embedder.dimension), dtype=np.float32)
        return self.embedder.encode(texts, instruction=instruction, dim=self.dim,
                                    batch_size=kwargs.get("batch_size") or self.batch_size,
                                    show_progress=self.show_progress)

    def similarity(self, embeddings1: Any, embeddings2: Any):
        """Cosine similarity matrix, computed by mteb's own function."""
        from mteb.similarity_functions import cos_sim

        return cos_sim(embeddings1, embeddings2)

    def similarity_pairwise(self, embeddings1: Any, embeddings2: Any):
        from mteb.similarity_functions import pairwise_cos_sim

        return pairwise_cos_sim(embeddings1, embeddings2)

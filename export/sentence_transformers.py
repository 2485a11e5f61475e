"""Embedder export: one folder that sentence-transformers, plain transformers, vLLM and TEI all load
to the same vectors as `Embedder.encode`.

Layout (the released Qwen3-Embedding layout): weights + config at the root, `modules.json` with
Transformer -> Pooling (lasttoken, include_prompt) -> Normalize, `config_sentence_transformers.json`
with `prompts = {"query": "Instruct: ...\\nQuery:", "document": ""}` and cosine similarity, the
pooling token baked into `tokenizer.json` (see tokenizer_files), left padding in
`tokenizer_config.json`, and the Matryoshka widths in `config.json` (`matryoshka_dimensions`,
`is_matryoshka`: what vLLM reads for its `dimensions` request field) and in `embedforge.json`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from embedforge.errors import ConfigError
from embedforge.export import tokenizer_files
from embedforge.templates import DEFAULT_RETRIEVAL_INSTRUCTION

if TYPE_CHECKING:
    from embedforge.embedder import Embedder


def check_matryoshka_dims(dims: list[int] | None, dimension: int) -> list[int]:
    """Distinct widths in 1..dimension, largest first (the order sentence-transformers' MatryoshkaLoss uses)."""
    dims = sorted(set(dims or []), reverse=True)
    bad = [d for d in dims if not 0 < d <= dimension]
    if bad:
        raise ConfigError(f"matryoshka dims {bad} are outside 1..{dimension} (the model's embedding width)")
    return dims


def causal_lm_architecture(architectures: list[str]) -> list[str]:
    """`Qwen3Model` -> `Qwen3ForCausalLM`, the name the released Qwen3-Embedding config carries.

    vLLM registers no `Qwen3Model` embedding class; it turns `*ForCausalLM` into an embedding model
    (`--runner pooling`) and loads weights saved with or without the `model.` prefix. transformers'
    `AutoModel` and sentence-transformers pick the class from `model_type`, so they are unaffected.
    """
    import transformers

    renamed = []
    for name in architectures:
        candidate = name[: -len("Model")] + "ForCausalLM" if name.endswith("Model") else name
        renamed.append(candidate if hasattr(transformers, candidate) else name)
    return renamed


def max_sequence_length(embedder: Embedder) -> int:
    """`max_seq_length` for sentence-transformers, vLLM and TEI: the model's own limit, never more
    positions than the backbone has (`max_position_embeddings`)."""
    positions = getattr(embedder.model.config, "max_position_embeddings", None)
    return min(embedder.spec.max_length, int(positions)) if positions else embedder.spec.max_length


def query_instruction(embedder: Embedder, default_instruction: str | None) -> str | None:
    """The instruction behind the `query` prompt: the given one, else the model's own, else (for a
    last-token decoder) the Qwen3 default retrieval instruction."""
    if default_instruction:
        return default_instruction
    if embedder.spec.prompts.get("query"):
        return None  # keep the stored prompt as it is
    return DEFAULT_RETRIEVAL_INSTRUCTION if embedder.spec.pooling == "lasttoken" else None


def write_embedder_folder(
    embedder: Embedder,
    folder: str | Path,
    *,
    default_instruction: str | None = None,
    matryoshka_dims: list[int] | None = None,
) -> dict[str, Any]:
    """Write the export into an existing (temporary) folder; returns facts for the report and card."""
    folder = Path(folder)
    dims = check_matryoshka_dims(matryoshka_dims or embedder.spec.matryoshka_dims, embedder.dimension)
    embedder.spec.matryoshka_dims = dims
    embedder.spec.max_length = max_sequence_length(embedder)
    embedder.save_pretrained(folder, default_instruction=query_instruction(embedder, default_instruction))

    config_path = folder / "config.json"
    config = json.loads(config_path.read_text(encoding="utf-8"))
    if embedder.spec.pooling == "lasttoken":
        config["architectures"] = causal_lm_architecture(config.get("architectures") or [])
    if dims:
        config["matryoshka_dimensions"] = dims
        config["is_matryoshka"] = True
    config_path.write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")

    eos_action = None
    if embedder.spec.append_eos:
        eos_action = tokenizer_files.bake_eos(folder, embedder.tokenizer, embedder.spec.eos_token)
    tokenizer_files.clean_tokenizer_config(folder, padding_side=embedder.spec.padding_side)
    prompts = json.loads((folder / "config_sentence_transformers.json").read_text(encoding="utf-8"))["prompts"]
    return {
        "architectures": config.get("architectures"),
        "pooling": embedder.spec.pooling,
        "eos_token": embedder.spec.eos_token if embedder.spec.append_eos else None,
        "eos_post_processor": eos_action,
        "padding_side": embedder.spec.padding_side,
        "prompts": prompts,
        "matryoshka_dims": dims,
        "dimension": embedder.dimension,
        "max_length": embedder.spec.max_length,
    }

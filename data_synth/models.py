"""Model names as a data-stage config holds them: `builtin:smollm2` and `builtin:minilm` are the
offline models that ship through PyPI; anything else is a folder or a Hub id."""

from __future__ import annotations

BUILTIN_MODELS = {"builtin:smollm2": "smollm2_folder", "builtin:minilm": "minilm_folder"}


def resolve_model(name: str) -> str:
    """`builtin:smollm2` / `builtin:minilm` -> their offline folders; anything else unchanged."""
    if name in BUILTIN_MODELS:
        from embedforge import offline_models

        return str(getattr(offline_models, BUILTIN_MODELS[name])())
    return name


def load_embedder(name: str, device: str | None = None):
    from embedforge.embedder import Embedder

    return Embedder.from_pretrained(resolve_model(name), device=device)

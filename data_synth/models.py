"""Models as a data-stage config names them: `builtin:smollm2` and `builtin:minilm` are resolved by the
core (embedforge.offline_models); anything else is a folder or a Hub id."""

from __future__ import annotations

from embedforge.offline_models import resolve_model

__all__ = ["load_embedder", "resolve_model"]


def load_embedder(name: str, device: str | None = None):
    from embedforge.embedder import Embedder

    return Embedder.from_pretrained(name, device=device)

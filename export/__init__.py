"""Export: serving folders for embedders (sentence-transformers / transformers / vLLM / TEI, plus
ONNX and GGUF files) and rerankers (causal and sequence-classification), checked by reloading, with
a model card rendered from the provenance trail and an optional Hub push.

`export(ExportConfig(...)) -> ExportOutcome` is the one entry point; the CLI wraps it.
"""

from __future__ import annotations

import importlib

from embedforge.stage_module import make_callable

# Loaded on first use: `embedforge --help` imports the export CLI, which must not pull in torch.
_EXPORTS = {"ExportConfig": "config", "ExportOutcome": "stage", "export": "stage"}
__all__ = ["ExportConfig", "ExportOutcome", "export"]


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"embedforge.export.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module 'embedforge.export' has no attribute {name!r}")


make_callable(__name__, "export", "stage")

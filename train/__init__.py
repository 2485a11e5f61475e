"""Training: the embedding task (Qwen3 improved InfoNCE + Matryoshka, GradCache, cross-process
gather) and the yes/no reranker, LoRA or full, one process or many under `accelerate launch`.

`train(TrainConfig(...)) -> TrainResult` is the stage; `embedforge.train(config)` calls it too.
"""

from __future__ import annotations

import importlib

from embedforge.stage_module import make_callable

# Loaded on first use: `embedforge --help` imports the train CLI, which must not pull in torch.
_EXPORTS = {"TrainConfig": "config", "DatasetSettings": "config", "TrainResult": "trainer", "train": "trainer"}
__all__ = ["DatasetSettings", "TrainConfig", "TrainResult", "train"]


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"embedforge.train.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module 'embedforge.train' has no attribute {name!r}")


make_callable(__name__, "train", "trainer")

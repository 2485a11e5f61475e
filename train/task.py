"""What an embedder run and a reranker run do differently, behind one interface.

The Trainer (train/trainer.py) owns what every run shares: the accelerator, the loop, checkpoints,
logging, signals, evaluation and export. A `TrainingTask` owns the rest: which model class is
trained, the settings it resolves from the model, its loss and the forward/backward of one step,
how its model folder is written, and its default evaluator. `make_task(config)` picks the task.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

import torch

from embedforge.train.config import TrainConfig
from embedforge.train.defaults import default_lr
from embedforge.train.sampler import Batch

# (loss on this process, loss statistics, tokens forwarded on this process)
StepResult = tuple[torch.Tensor, dict[str, torch.Tensor], int]


class StepRuntime(Protocol):
    """What a task's step needs from the Trainer running it."""

    cfg: TrainConfig
    accelerator: Any
    holder: Any

    @property
    def local_rows(self) -> tuple[int, int]:
        """[start, stop) of this process's rows in the global batch."""

    def check_finite(self, loss: torch.Tensor, batch: Batch) -> None:
        """Raise (on every process) when the loss is not finite on any process."""

    def accumulating(self) -> contextlib.AbstractContextManager:
        """A context whose backward passes accumulate gradients without cross-process sync."""


class TrainingTask:
    """The per-task half of a run; subclasses implement every method that raises here."""

    name = ""

    def load(self, cfg: TrainConfig, device) -> Any:
        """The Embedder or Reranker whose `.model` is trained (tokenisation, pooling, head with it)."""
        raise NotImplementedError

    def load_backbone(self, cfg: TrainConfig, path: str) -> torch.nn.Module:
        """The bare backbone at `path` on the CPU (the LoRA merge and the export of sharded weights)."""
        raise NotImplementedError

    def resolve(self, cfg: TrainConfig, holder, sources=()) -> tuple[TrainConfig, list[str]]:
        """Settings this task chooses from the loaded model and the training rows, with one line each saying why."""
        return cfg, []

    def likely_causes(self, cfg: TrainConfig, holder) -> list[str]:
        """What most often makes this configuration collapse, most likely first (collapse guard)."""
        return self._lr_cause(cfg, holder)

    def prepare(self, cfg: TrainConfig, holder) -> None:
        """Check the settings against the model and build the loss (before the model is wrapped)."""

    def default_evaluator(self, cfg: TrainConfig) -> Callable[[Any], dict[str, float]] | None:
        """The evaluator built from `cfg.eval` when the caller passed none."""
        return None

    def step(self, run: StepRuntime, batch: Batch) -> StepResult:
        """Forward and backward of this process's share of one global batch; gradients are left in
        `.grad`, the optimizer is not stepped."""
        raise NotImplementedError

    def save(self, cfg: TrainConfig, holder, folder: Path) -> None:
        """Write `holder` (with its trained backbone) as a model folder that loads back."""
        holder.save_pretrained(folder)

    def save_adapter_extras(self, holder, adapter_dir: Path) -> None:
        """Files an adapter folder needs beside peft's to load alone."""

    @staticmethod
    def _lr_cause(cfg: TrainConfig, holder) -> list[str]:
        usual = default_lr(cfg.method, sum(p.numel() for p in holder.model.parameters()))
        if cfg.lr is not None and cfg.lr > 2 * usual:
            return [f"lr {cfg.lr:g} is high for {cfg.method} fine-tuning of this model (default {usual:g})"]
        return []


def make_task(cfg: TrainConfig) -> TrainingTask:
    if cfg.task == "embedding":
        from embedforge.train.task_embedding import EmbeddingTask

        return EmbeddingTask()
    from embedforge.train.task_reranker import RerankerTask

    return RerankerTask()

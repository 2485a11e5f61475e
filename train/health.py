"""Is a contrastive run learning? The collapse guard reads the loss statistics of each logged step
and says, once, when training is producing nothing useful, with the likely causes.

Two signatures, both read from `qwen3_infonce` statistics averaged over a window of steps:

* collapse: every text embeds to about the same vector. The positive similarity is high
  (`pos_sim` >= `collapse_pos_sim`) and the kept candidates score about as high
  (`pos_sim - neg_sim` < `collapse_margin`). A base LM pooled at a token whose state ignores the
  text (a document-separator EOS) starts near this point and full fine-tuning drives it there.
* loss at chance: the loss stays within `chance_ratio` of ln(1 + candidates), the value of a
  uniform guess, at the end of the run.

A run that takes no optimizer step is reported too. Warnings go to the log when they are first seen
and into `TrainResult.warnings`, so the pipeline's summary and manifest carry them.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, field
from typing import Any

# Thresholds: cosines of L2-normalised float32 embeddings. Untrained SmolLM2-135M on real German ->
# English pairs: positives 0.70 vs in-batch negatives 0.61 pooled at the last real token, 0.80 vs 0.79
# pooled at an appended <|endoftext|>; the latter went to pos_sim 0.99 within 3 steps of full
# fine-tuning with loss at ln(candidates) (bench/train_decoder_ablation.py). A 0.02 margin at
# pos_sim >= 0.9 is well below every learning run and above a collapsed one.
COLLAPSE_POS_SIM = 0.9
COLLAPSE_MARGIN = 0.02
CHANCE_RATIO = 0.97


def _stat(record: dict[str, Any], name: str) -> float | None:
    """A statistic at full width: plain, or the widest Matryoshka width's `name@D`."""
    if name in record:
        return float(record[name])
    widths = [int(key.split("@", 1)[1]) for key in record if key.startswith(f"{name}@")]
    return float(record[f"{name}@{max(widths)}"]) if widths else None


@dataclass
class CollapseGuard:
    """Feed it each logged step's record (`update`), then `finish` at the end of the run.

    causes: likely causes to name in a warning, most likely first (the trainer knows the pooling,
        learning rate and loss it runs with).
    window: steps averaged before judging (a single noisy batch is no signature).
    """

    causes: list[str] = field(default_factory=list)
    window: int = 5
    collapse_pos_sim: float = COLLAPSE_POS_SIM
    collapse_margin: float = COLLAPSE_MARGIN
    chance_ratio: float = CHANCE_RATIO
    warnings: list[str] = field(default_factory=list)
    _recent: deque = field(default_factory=deque, repr=False)
    _collapsed_at: int | None = None

    def _because(self) -> str:
        return f" Likely cause: {'; or '.join(self.causes)}." if self.causes else ""

    def update(self, step: int, record: dict[str, Any]) -> list[str]:
        """Record one step; returns the warnings this step raised (each kind is raised once)."""
        values = {name: _stat(record, name) for name in ("loss", "pos_sim", "neg_sim", "chance_loss")}
        if any(v is None or not math.isfinite(v) for v in values.values()):
            return []
        self._recent.append(values)
        while len(self._recent) > self.window:
            self._recent.popleft()
        if len(self._recent) < self.window or self._collapsed_at is not None:
            return []
        pos = sum(v["pos_sim"] for v in self._recent) / self.window
        neg = sum(v["neg_sim"] for v in self._recent) / self.window
        if pos >= self.collapse_pos_sim and pos - neg < self.collapse_margin:
            self._collapsed_at = step
            message = (f"embeddings collapsed by step {step}: positive similarity {pos:.3f}, negatives {neg:.3f} "
                       f"(margin {pos - neg:.3f}); every text embeds to about the same vector and the loss "
                       f"carries no signal.{self._because()}")
            self.warnings.append(message)
            return [message]
        return []

    def finish(self, steps: int) -> list[str]:
        """End-of-run checks: no step taken, loss still at chance. Returns the new warnings."""
        new: list[str] = []
        if steps == 0:
            new.append("training took no optimizer step: the model is the base model")
        elif self._recent:
            loss = sum(v["loss"] for v in self._recent) / len(self._recent)
            chance = sum(v["chance_loss"] for v in self._recent) / len(self._recent)
            if chance > 0 and loss >= self.chance_ratio * chance:
                new.append(f"loss at chance after {steps} steps: {loss:.3f} against ln(1 + candidates) = "
                           f"{chance:.3f}; the model ranks positives no better than a uniform guess."
                           f"{self._because()}")
        self.warnings.extend(new)
        return new

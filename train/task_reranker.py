"""The reranker task: a causal LM trained to answer "yes" for a relevant document and "no"
otherwise, point-wise (binary cross-entropy on p(yes)) or list-wise (softmax over each group of one
positive and its negatives).

One step: this process's groups are forwarded in chunks of whole groups (`mini_batch_size` pairs at
most), each chunk's mean loss weighted by its share of the groups, so the gradient equals one
unchunked step; gradients are synchronised once, on the last chunk.
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch

from embedforge.errors import ConfigError
from embedforge.train.collate import reranker_groups
from embedforge.train.config import TrainConfig
from embedforge.train.sampler import Batch
from embedforge.train.task import StepResult, StepRuntime, TrainingTask


class RerankerTask(TrainingTask):
    name = "reranker"

    def load(self, cfg: TrainConfig, device) -> Any:
        from embedforge.reranker import Reranker

        return Reranker.from_pretrained(cfg.model, max_length=cfg.max_length, dtype=cfg.dtype, device=device,
                                        attn_implementation=cfg.attn_implementation)

    def load_backbone(self, cfg: TrainConfig, path: str) -> torch.nn.Module:
        from embedforge import modeling

        return modeling.load_causal_lm(path, dtype=cfg.dtype, device="cpu",
                                       attn_implementation=cfg.attn_implementation)

    def default_evaluator(self, cfg: TrainConfig):
        if cfg.eval.data:
            raise ConfigError("eval.data evaluates embedders; pass an evaluator for a reranker")
        return super().default_evaluator(cfg)

    def step(self, run: StepRuntime, batch: Batch) -> StepResult:
        from embedforge.train.losses import listwise_loss, pointwise_yes_no_loss

        cfg, holder = run.cfg, run.holder
        groups = reranker_groups(batch, cfg.seed).slice_groups(*run.local_rows)
        size = groups.group_size
        n_groups = len(groups.queries) // size
        per_chunk = max(1, (cfg.mini_batch_size or n_groups * size) // size)
        total, stats_sum, tokens = torch.zeros(()), {}, 0
        for start in range(0, n_groups, per_chunk):
            stop = min(start + per_chunk, n_groups)
            part = groups.slice_groups(start, stop)
            last = stop == n_groups
            with contextlib.nullcontext() if last else run.accumulating():
                features = holder.tokenize_pairs(part.queries, part.documents, part.instructions,
                                                 max_length=cfg.max_length)
                tokens += int(features["attention_mask"].sum())
                logits = holder.yes_no_logits(features)
                if cfg.loss.reranker == "pointwise":
                    labels = torch.tensor(part.labels, device=logits.device)
                    out = pointwise_yes_no_loss(logits, labels)
                else:
                    out = listwise_loss(logits, size, cfg.loss.listwise_temperature)
                run.check_finite(out.loss, batch)
                share = (stop - start) / n_groups
                run.accelerator.backward(out.loss * share)
            total = total + out.loss.detach().cpu() * share
            for key, value in out.stats.items():
                if torch.isfinite(value):
                    stats_sum[key] = stats_sum.get(key, 0.0) + value.detach().cpu() * share
        return total, stats_sum, tokens

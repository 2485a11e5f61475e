"""The embedding task: Qwen3 improved InfoNCE (+ Matryoshka) over the global batch, with GradCache
chunks and the gradient-carrying cross-process gather.

One step: this process's rows are tokenised in length-sorted chunks; when they fit one forward the
loss is computed directly, otherwise GradCache (train/gradcache.py) embeds every chunk without
graph, takes the gradient of the full-batch loss with respect to the embeddings, and re-forwards
each chunk with it. The loss gathers every process's embeddings with gradient
(train/distributed.py), so W processes compute the one-process loss on the global batch.
"""

from __future__ import annotations

import functools
import warnings
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from embedforge.errors import ConfigError
from embedforge.io import write_json
from embedforge.train.collate import contrastive_texts
from embedforge.train.config import TrainConfig
from embedforge.train.sampler import Batch
from embedforge.train.task import StepResult, StepRuntime, TrainingTask


class EmbeddingTask(TrainingTask):
    name = "embedding"

    def __init__(self) -> None:
        self.loss_fn = None
        self.max_tokens: int | None = None

    def load(self, cfg: TrainConfig, device) -> Any:
        from embedforge.embedder import Embedder

        return Embedder.from_pretrained(cfg.model, dtype=cfg.dtype, device=device,
                                        attn_implementation=cfg.attn_implementation)

    def load_backbone(self, cfg: TrainConfig, path: str) -> torch.nn.Module:
        from embedforge import modeling

        return modeling.load_backbone(path, dtype=cfg.dtype, device="cpu", attn_implementation=cfg.attn_implementation)

    def resolve(self, cfg: TrainConfig, holder) -> tuple[TrainConfig, list[str]]:
        """Where a decoder embedding is read: the appended EOS or the last real token (see
        TrainConfig.append_eos). Set on the holder's spec, so training, checkpoints and the exported
        embedforge.json agree."""
        from embedforge import modeling

        decisions = self._forward_budget(cfg, holder)
        spec = getattr(holder, "spec", None)
        if spec is None or spec.pooling != "lasttoken":
            return cfg, decisions
        wanted, why = cfg.append_eos, "append_eos"
        if wanted is None:
            source = str(cfg.model)
            if any(modeling.read_json_if_exists(source, name) for name in ("modules.json", "embedforge.json")):
                wanted, why = spec.append_eos, "as the embedder folder declares"
            else:
                wanted, why = False, "a language model that is not an embedder yet: its EOS state ignores the text"
        spec.append_eos = wanted
        where = f"the appended {spec.eos_token!r}" if wanted else "the last real token"
        return cfg.model_copy(update={"append_eos": wanted}), [*decisions, f"pooling at {where} ({why})"]

    def _forward_budget(self, cfg: TrainConfig, holder) -> list[str]:
        """Tokens per forward: as configured, or derived from the memory free now (train/chunking.py)."""
        from embedforge.train.chunking import forward_token_budget

        if cfg.max_tokens_per_forward != "auto":
            self.max_tokens = cfg.max_tokens_per_forward
            return [] if self.max_tokens is None else [f"at most {self.max_tokens} tokens per forward"]
        dtype = next(holder.model.parameters()).dtype
        self.max_tokens, why = forward_token_budget(holder.model.config, cfg.max_length, dtype, holder.device)
        return [why]

    def likely_causes(self, cfg: TrainConfig, holder) -> list[str]:
        causes = []
        spec = getattr(holder, "spec", None)
        if spec is not None and spec.pooling == "lasttoken" and spec.append_eos:
            causes.append(f"pooling at the appended {spec.eos_token!r}: in a language model that was not trained "
                          "as an embedder it is a document separator whose state ignores the text (pool the last "
                          "real token: embedforge.json append_eos false)")
        causes += self._lr_cause(cfg, holder)
        if cfg.loss.margin is not None:
            causes.append(f"the false-negative margin {cfg.loss.margin} masks most candidates when the base model "
                          "scores every pair alike (metric masked_margin); try loss.preset infonce")
        return causes

    def prepare(self, cfg: TrainConfig, holder) -> None:
        from embedforge.train.losses import MatryoshkaLoss, Qwen3InfoNCEConfig, qwen3_infonce

        if cfg.batch_size < 2 and not any(d.num_negatives for d in cfg.data):
            raise ConfigError("batch_size 1 without hard negatives leaves the loss no negative to learn from")
        lc = cfg.loss
        dims = lc.matryoshka_dims
        if dims and max(dims) > holder.dimension:
            raise ConfigError(f"loss.matryoshka_dims: {max(dims)} exceeds the model's embedding width "
                              f"{holder.dimension}")
        infonce = Qwen3InfoNCEConfig(
            temperature=lc.temperature, use_hard_negatives="hard" in lc.terms, use_qq="qq" in lc.terms,
            use_dd="dd" in lc.terms, use_qd="qd" in lc.terms, margin=lc.margin, mask_duplicates=lc.mask_duplicates,
            exempt_hard_negatives_from_margin=lc.exempt_hard_negatives_from_margin,
        )
        self.loss_fn = MatryoshkaLoss(functools.partial(qwen3_infonce, cfg=infonce), dims=dims,
                                      weights=lc.matryoshka_weights)
        if dims:
            holder.spec.matryoshka_dims = list(dims)

    def default_evaluator(self, cfg: TrainConfig):
        if not cfg.eval.data:
            return None
        from embedforge.eval.retrieval import make_dev_evaluator

        return make_dev_evaluator(cfg.eval.data, instruction=cfg.eval.instruction, dim=cfg.eval.dim,
                                  split=cfg.eval.split, batch_size=cfg.eval.batch_size)

    def step(self, run: StepRuntime, batch: Batch) -> StepResult:
        from embedforge.packing import real_tokens
        from embedforge.train.chunking import plan_chunks
        from embedforge.train.distributed import gather_embedding_batch
        from embedforge.train.gradcache import gradcache_step
        from embedforge.train.losses import EmbeddingBatch, LossOutput, text_hashes

        cfg, holder = run.cfg, run.holder
        texts = contrastive_texts(batch, cfg.seed).slice(*run.local_rows)
        n, k = len(texts.queries), texts.k
        negatives = [neg for row in texts.negatives for neg in row]
        neg_slots = torch.tensor([i * k + j for i, row in enumerate(texts.negatives) for j in range(len(row))],
                                 dtype=torch.long)
        flat = texts.queries + texts.positives + negatives
        ids = text_hashes(flat)
        with warnings.catch_warnings():  # counted in the step's metrics instead of a warning per step
            warnings.filterwarnings("ignore", message=r".*longer than max_length", category=UserWarning)
            rows = holder.token_ids(flat, instruction=texts.instructions + [None] * (len(flat) - n),
                                    max_length=cfg.max_length)
        truncated = {"truncated_texts": float(sum(len(r) >= cfg.max_length for r in rows))}
        # Length-grouped chunks: texts sorted by token count, so each forward pads (or packs) as little as possible.
        order = sorted(range(len(flat)), key=lambda i: (len(rows[i]), i))
        chunks = plan_chunks(order, [len(r) for r in rows], self.max_tokens, cfg.mini_batch_size)
        features = [holder.batch([rows[i] for i in c], packing=cfg.packing) for c in chunks]
        tokens = sum(real_tokens(f) for f in features)
        inverse = torch.empty(len(flat), dtype=torch.long)
        inverse[torch.tensor(order)] = torch.arange(len(flat))

        def loss_fn(embeddings: dict[str, torch.Tensor]) -> LossOutput:
            e = embeddings["texts"][inverse.to(embeddings["texts"].device)]
            device, dim = e.device, e.shape[1]
            d_neg = neg_mask = neg_ids = None
            if k:
                slots = neg_slots.to(device)
                d_neg = e.new_zeros(n * k, dim).index_copy(0, slots, e[2 * n:]).view(n, k, dim)
                neg_mask = torch.zeros(n * k, dtype=torch.bool, device=device).index_fill(0, slots, True).view(n, k)
                neg_ids = torch.zeros(n * k, dtype=torch.long, device=device)
                neg_ids = neg_ids.index_copy(0, slots, ids[2 * n:].to(device)).view(n, k)
            local = EmbeddingBatch(q=e[:n], d_pos=e[n:2 * n], d_neg=d_neg, neg_mask=neg_mask,
                                   q_ids=ids[:n].to(device), pos_ids=ids[n:2 * n].to(device), neg_ids=neg_ids)
            gathered = gather_embedding_batch(local)
            out = self.loss_fn(gathered.pool, anchors=gathered.anchors)
            run.check_finite(out.loss, batch)
            return LossOutput(out.loss * gathered.loss_scale, out.stats)

        if len(features) == 1:  # the whole local batch fits one forward: no GradCache detour
            out = loss_fn({"texts": holder.embed(features[0])})
            run.accelerator.backward(out.loss)
            return out.loss.detach(), {**out.stats, **truncated}, tokens
        out = gradcache_step(holder.embed, {"texts": features}, loss_fn,
                             backward_fn=run.accelerator.backward, no_sync=run.accumulating)
        return out.loss, {**out.stats, **truncated}, tokens

    def save(self, cfg: TrainConfig, holder, folder: Path) -> None:
        instructions = {d.instruction for d in cfg.data if d.instruction}
        holder.save_pretrained(folder, default_instruction=instructions.pop() if len(instructions) == 1 else None)

    def save_adapter_extras(self, holder, adapter_dir: Path) -> None:
        write_json(adapter_dir / "embedforge.json", asdict(holder.spec))

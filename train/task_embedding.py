"""The embedding task: Qwen3 improved InfoNCE (+ Matryoshka) over the global batch, with GradCache
chunks and the gradient-carrying cross-process gather.

One step: this process's rows are tokenised in length-sorted chunks; when they fit one forward the
loss is computed directly, otherwise GradCache (train/gradcache.py) embeds every chunk without
graph, takes the gradient of the full-batch loss with respect to the embeddings, and re-forwards
each chunk with it. The loss gathers every process's embeddings with gradient
(train/distributed.py), so W processes compute the one-process loss on the global batch.

With `loss.distill`, a reranker teacher's distillation loss (train/distill.py) on the rows'
`teacher_scores` is added: it is a mean over rows with no cross-row term, so each process takes it
over its own rows of the gathered pool (its anchors), like the InfoNCE, and the same loss scale and
gradient average give the one-process loss. GradCache calls the same loss function, so chunked
steps distil too.
"""

from __future__ import annotations

import functools
import math
import warnings
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch

from embedforge.errors import ConfigError
from embedforge.io import write_json
from embedforge.train.collate import ContrastiveTexts, contrastive_texts
from embedforge.train.config import TrainConfig
from embedforge.train.sampler import Batch
from embedforge.train.sources import Source
from embedforge.train.task import StepResult, StepRuntime, TrainingTask

# teacher_temperature auto: rows sampled from the training data, and texts per no-grad forward.
TEACHER_TEMPERATURE_ROWS = 128
TEACHER_TEMPERATURE_FORWARD = 32


class EmbeddingTask(TrainingTask):
    name = "embedding"

    def __init__(self) -> None:
        self.loss_fn = None
        self.distill_fn = None
        self.max_tokens: int | None = None

    def load(self, cfg: TrainConfig, device) -> Any:
        from embedforge.embedder import Embedder

        return Embedder.from_pretrained(cfg.model, dtype=cfg.dtype, device=device,
                                        attn_implementation=cfg.attn_implementation)

    def load_backbone(self, cfg: TrainConfig, path: str) -> torch.nn.Module:
        from embedforge import modeling

        return modeling.load_backbone(path, dtype=cfg.dtype, device="cpu", attn_implementation=cfg.attn_implementation)

    def resolve(self, cfg: TrainConfig, holder, sources: Sequence[Source] = ()) -> tuple[TrainConfig, list[str]]:
        """Tokens per forward; where a decoder embedding is read (`_pooling`); the distillation's
        teacher temperature when it is auto, from the training rows (`sources`) and the base model
        pooled as training will pool it."""
        decisions = self._forward_budget(cfg, holder)
        cfg, decisions = self._pooling(cfg, holder, decisions)
        return self._teacher_temperature(cfg, holder, sources, decisions)

    @staticmethod
    def _pooling(cfg: TrainConfig, holder, decisions: list[str]) -> tuple[TrainConfig, list[str]]:
        """Where a decoder embedding is read: the appended EOS or the last real token (see
        TrainConfig.append_eos). Set on the holder's spec, so training, checkpoints and the exported
        embedforge.json agree."""
        from embedforge import modeling

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
        where = (f"the appended {spec.eos_token!r}" if wanted else
                 "the last token of its chat turn" if spec.chat_template else "the last real token")
        return cfg.model_copy(update={"append_eos": wanted}), [*decisions, f"pooling at {where} ({why})"]

    def _teacher_temperature(self, cfg: TrainConfig, holder, sources: Sequence[Source],
                             decisions: list[str]) -> tuple[TrainConfig, list[str]]:
        """loss.distill.teacher_temperature auto: std(teacher margins) / std(base student margins) over
        the usable pairs of up to TEACHER_TEMPERATURE_ROWS training rows (seeded), the student's margins
        in the logits the loss trains (cos / loss.temperature). Computed before any step, so a resumed
        run derives the same number; the run's config records it."""
        from embedforge.train.distill import matching_teacher_temperature, usable_margins

        distill = cfg.loss.distill
        if distill is None or distill.teacher_temperature != "auto":
            return cfg, decisions
        if not sources:
            raise ConfigError("loss.distill.teacher_temperature auto needs the training rows at setup; set a number")
        rows, instructions, negatives = _sample_rows(sources, cfg.seed)
        batch, teacher = _embed_rows(holder, rows, instructions, negatives, cfg.max_length)
        teacher_margins, student_margins = usable_margins(batch, teacher, temperature=cfg.loss.temperature)
        try:
            value = matching_teacher_temperature(teacher_margins, student_margins)
        except ValueError as exc:
            raise ConfigError(f"loss.distill.teacher_temperature auto: {len(rows)} sampled training rows give "
                              f"{teacher_margins.numel()} teacher-scored pairs: {exc}; rows need teacher_scores "
                              "(data_synth.mine with a teacher), or set a number") from None
        loss = cfg.loss.model_copy(update={"distill": distill.model_copy(update={"teacher_temperature": value})})
        why = (f"distill teacher_temperature {value:.4g}: std of {teacher_margins.numel()} teacher margins over std "
               f"of the base model's (cos/{cfg.loss.temperature:g}) on {len(rows)} sampled training rows")
        return cfg.model_copy(update={"loss": loss}), [*decisions, why]

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
        self.distill_fn = None
        if lc.distill is not None:
            from embedforge.train.distill import DISTILL_LOSSES

            if lc.distill.teacher_temperature == "auto":
                raise ConfigError("loss.distill.teacher_temperature auto was not resolved: the trainer passes the "
                                  "training rows to EmbeddingTask.resolve")
            self.distill_fn = functools.partial(DISTILL_LOSSES[lc.distill.kind], temperature=lc.temperature,
                                                teacher_temperature=lc.distill.teacher_temperature)
        if dims:
            holder.spec.matryoshka_dims = list(dims)

    def default_evaluator(self, cfg: TrainConfig):
        if not cfg.eval.data:
            return None
        from embedforge.eval.retrieval import make_dev_evaluator

        return make_dev_evaluator(cfg.eval.data, instruction=cfg.eval.instruction, dim=cfg.eval.dim,
                                  split=cfg.eval.split, batch_size=cfg.eval.batch_size)

    def step(self, run: StepRuntime, batch: Batch) -> StepResult:
        from accelerate.utils import DistributedType

        from embedforge.packing import choose_packing, real_tokens
        from embedforge.train.chunking import padded_positions, plan_chunks, plan_padded_chunks
        from embedforge.train.distributed import gather_embedding_batch
        from embedforge.train.gradcache import gradcache_step
        from embedforge.train.losses import EmbeddingBatch, LossOutput, text_hashes

        cfg, holder = run.cfg, run.holder
        everyone = contrastive_texts(batch, cfg.seed)
        texts = everyone.slice(*run.local_rows)
        # The global batch's teacher scores [N, 1 + K], rows in the gathered pool's order.
        teacher = _teacher_tensor(everyone) if self.distill_fn is not None else None
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
        # Length-grouped chunks: texts sorted by token count, so each forward pads (or packs) as little as
        # possible. Packed chunks waste nothing, so they are only cut to the budget; padded ones are cut
        # where that saves more padding than a forward costs, and forwarded at once when they fit together.
        order = sorted(range(len(flat)), key=lambda i: (len(rows[i]), i))
        lengths = [len(r) for r in rows]
        packs = choose_packing(cfg.packing, holder.model)[0]
        # DeepSpeed and FSDP engines expect one forward per backward: they keep the plain greedy plan.
        direct = run.accelerator.distributed_type not in (DistributedType.DEEPSPEED, DistributedType.FSDP)
        plan = plan_padded_chunks if direct and not packs else plan_chunks
        chunks = plan(order, lengths, self.max_tokens, cfg.mini_batch_size)
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
            if teacher is not None:
                out = self._add_distillation(cfg, out, gathered, teacher)
            run.check_finite(out.loss, batch)
            return LossOutput(out.loss * gathered.loss_scale, out.stats)

        at_once = direct and cfg.mini_batch_size is None and (
            self.max_tokens is None or padded_positions(chunks, lengths) <= self.max_tokens)
        if len(features) == 1 or at_once:  # the whole local batch fits in memory: no GradCache detour
            out = loss_fn({"texts": torch.cat([holder.embed(f) for f in features])})
            run.accelerator.backward(out.loss)
            return out.loss.detach(), {**out.stats, **truncated}, tokens
        out = gradcache_step(holder.embed, {"texts": features}, loss_fn,
                             backward_fn=run.accelerator.backward, no_sync=run.accumulating)
        return out.loss, {**out.stats, **truncated}, tokens

    def _add_distillation(self, cfg: TrainConfig, infonce, gathered, teacher: torch.Tensor):
        """InfoNCE (unless loss.distill.infonce is false) + weight * distillation on this process's rows
        of the pool; both parts in the stats (`infonce_loss`, `distill_loss`, `distill_*`)."""
        from embedforge.train.losses import EmbeddingBatch, LossOutput

        pool, own = gathered.pool, gathered.anchors
        if teacher.shape != (pool.size, 1 + pool.num_negatives):
            raise RuntimeError(f"teacher scores {tuple(teacher.shape)} do not match the gathered batch "
                               f"[{pool.size}, {1 + pool.num_negatives}]")
        rows = EmbeddingBatch(q=pool.q[own], d_pos=pool.d_pos[own],
                              d_neg=None if pool.d_neg is None else pool.d_neg[own],
                              neg_mask=None if pool.neg_mask is None else pool.neg_mask[own])
        distilled = self.distill_fn(rows, teacher[own].to(pool.q.device))
        weighted = cfg.loss.distill.weight * distilled.loss
        loss = infonce.loss + weighted if cfg.loss.distill.infonce else weighted
        stats = {**infonce.stats, "infonce_loss": infonce.loss.detach().float(),
                 "distill_loss": distilled.loss.detach().float(),
                 **{f"distill_{key}": value for key, value in distilled.stats.items()}}
        return LossOutput(loss, stats)

    def save(self, cfg: TrainConfig, holder, folder: Path) -> None:
        instructions = {d.instruction for d in cfg.data if d.instruction}
        holder.save_pretrained(folder, default_instruction=instructions.pop() if len(instructions) == 1 else None)

    def save_adapter_extras(self, holder, adapter_dir: Path) -> None:
        write_json(adapter_dir / "embedforge.json", asdict(holder.spec))


def _teacher_tensor(texts: ContrastiveTexts) -> torch.Tensor:
    """[N, 1 + K] float32: each row's scores (positive first), NaN-padded like the negatives."""
    out = torch.full((len(texts.queries), 1 + texts.k), math.nan)
    for i, scores in enumerate(texts.teacher_scores):
        out[i, :len(scores)] = torch.tensor(scores, dtype=torch.float32)
    return out


def _sample_rows(sources: Sequence[Source], seed: int) -> tuple[list, list[str | None], list[int]]:
    """Up to TEACHER_TEMPERATURE_ROWS rows drawn without replacement over all sources (seeded), with
    the instruction and the number of negatives each is trained with."""
    sizes = np.array([len(s) for s in sources])
    total = int(sizes.sum())
    picks = np.sort(np.random.default_rng([seed, 59]).choice(total, size=min(total, TEACHER_TEMPERATURE_ROWS),
                                                             replace=False))
    starts = np.concatenate([[0], np.cumsum(sizes)[:-1]])
    rows, instructions, negatives = [], [], []
    for p in picks.tolist():
        k = int(np.searchsorted(starts, p, side="right")) - 1
        source = sources[k]
        row = source.row(p - int(starts[k]))
        rows.append(row)
        instructions.append(row.instruction if row.instruction is not None else source.instruction)
        negatives.append(source.num_negatives)
    return rows, instructions, negatives


def _embed_rows(holder, rows: list, instructions: list[str | None], negatives: list[int], max_length: int):
    """The rows' embeddings by the model as it is now (no gradient) as an EmbeddingBatch, and their
    teacher scores [N, 1 + K]; each row keeps its first `negatives[i]` negatives."""
    from embedforge.train.losses import EmbeddingBatch

    negs = [list(row.negatives[:limit]) for row, limit in zip(rows, negatives)]
    n, k = len(rows), max((len(x) for x in negs), default=0)
    flat = [r.query for r in rows] + [r.positive for r in rows] + [t for x in negs for t in x]
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*longer than max_length", category=UserWarning)
        ids = holder.token_ids(flat, instruction=[*instructions, *[None] * (len(flat) - n)], max_length=max_length)
    parts = []
    with torch.no_grad():
        for start in range(0, len(ids), TEACHER_TEMPERATURE_FORWARD):
            parts.append(holder.embed(holder.batch(ids[start:start + TEACHER_TEMPERATURE_FORWARD])).cpu())
    e = torch.cat(parts)
    d_neg = torch.zeros(n, k, e.shape[1])
    mask = torch.zeros(n, k, dtype=torch.bool)
    teacher = torch.full((n, 1 + k), math.nan)
    at = 2 * n
    for i, (row, x) in enumerate(zip(rows, negs)):
        d_neg[i, :len(x)] = e[at:at + len(x)]
        mask[i, :len(x)] = True
        at += len(x)
        if row.teacher_scores is not None:
            teacher[i, :1 + len(x)] = torch.tensor(row.teacher_scores[:1 + len(x)])
    batch = EmbeddingBatch(q=e[:n], d_pos=e[n:2 * n], d_neg=d_neg if k else None, neg_mask=mask if k else None)
    return batch, teacher

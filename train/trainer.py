"""The training loop: embedders (Qwen3 InfoNCE + Matryoshka) and yes/no rerankers, one code path
for one process, DDP, DeepSpeed ZeRO and FSDP.

Why not `transformers.Trainer`: our step is not "forward a batch, backward a loss". A contrastive
step embeds a whole global batch in chunks without graph (GradCache), gathers every process's
embeddings with gradient, computes one loss over the full batch, then re-forwards each chunk with
its cached gradient, with gradient sync only on the last chunk; batches come one source at a time
from a temperature-mixing sampler whose state is part of the checkpoint. HF Trainer's
`compute_loss` hook sees one micro-batch and syncs on its own schedule, so all of that would be
fought rather than used. We use accelerate directly: it prepares model, optimizer and scheduler
for every launcher, saves and restores their state, and we never parse launcher flags.

Global batch convention: `batch_size` rows are drawn per step; process r of W trains rows
[r·B/W, (r+1)·B/W) and the gathered loss equals the one-process loss on all B rows (see
train/distributed.py), so W processes end with the weights of one process on the same batches.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import json
import logging
import os
import signal
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from pydantic import Field

from embedforge.errors import ConfigError, EmbedforgeError
from embedforge.io import atomic_dir, write_json
from embedforge.outcome import StageOutcome
from embedforge.train import checkpoint as ckpt
from embedforge.train.config import TrainConfig
from embedforge.train.data import Batch, MixingSampler, contrastive_texts, load_sources, reranker_groups
from embedforge.train.defaults import default_lr
from embedforge.train.health import CollapseGuard

logger = logging.getLogger(__name__)

METRICS_FILE = "metrics.jsonl"
RESULT_FILE = "train_result.json"
# Settings that fix the data order and the parameter shapes: a checkpoint only resumes a run that agrees.
RESUME_KEYS = ("model", "task", "method", "lora", "batch_size", "seed", "data", "mixing_temperature")


class NonFiniteLossError(EmbedforgeError):
    """The loss became NaN or infinite; raised before the optimizer step, so the weights are intact."""


class TrainResult(StageOutcome):
    """What a run did: `output` is the final model folder (the output folder while none is written);
    `decisions` are the settings chosen for the recipe and why; `warnings` say when the run produced
    nothing useful (collapsed embeddings, loss at chance, no step). Also written to
    OUTPUT_DIR/train_result.json."""

    output_dir: str
    steps: int
    total_steps: int
    final_dir: str | None = None
    interrupted: bool = False
    best_metric: float | None = None
    best_dir: str | None = None
    last_metrics: dict[str, float | int | str] = Field(default_factory=dict)
    decisions: list[str] = Field(default_factory=list)


def train(config: TrainConfig, *, evaluator: Callable[[Any], dict[str, float]] | None = None,
          inline_data: dict[str, Any] | None = None) -> TrainResult:
    """Run (or resume) the training described by `config`; see `Trainer`."""
    return Trainer(config, evaluator=evaluator, inline_data=inline_data).run()


class Trainer:
    """One training run.

    Args:
        config: the recipe.
        evaluator: `evaluator(embedder) -> {"dev_ndcg_at_10": ...}`; default: built from
            `config.eval.data` (a BEIR folder) with `embedforge.eval.retrieval.make_dev_evaluator`.
        inline_data: dataset path -> list of dicts or `datasets.Dataset`, instead of reading files.
    """

    def __init__(self, config: TrainConfig, *, evaluator=None, inline_data: dict[str, Any] | None = None):
        self.cfg = config
        self.evaluator = evaluator
        self.inline_data = inline_data
        self.output_dir = Path(config.output_dir)
        self._stop_signal: int | None = None

    # --- setup ------------------------------------------------------------------------------------

    def _build_accelerator(self):
        from accelerate import Accelerator, DataLoaderConfiguration
        from accelerate.utils import DistributedDataParallelKwargs, InitProcessGroupKwargs

        trackers = [t for t in self.cfg.report_to if t != "jsonl"]
        for name in trackers:
            try:
                __import__(name if name != "tensorboard" else "torch.utils.tensorboard")
            except ImportError:
                raise ConfigError(f"report_to: {name} is not installed (pip install {name})") from None
        if int(os.environ.get("WORLD_SIZE", "1")) == 1:
            # accelerate keeps one process-wide state and refuses a second Accelerator with another
            # precision; a single process may run several trainings (notebooks, tests, sweeps).
            from accelerate.state import AcceleratorState

            AcceleratorState._reset_state()
        handlers = [DistributedDataParallelKwargs(find_unused_parameters=False)]
        cpu = False
        if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.accelerator.is_available():
            # Several processes without a GPU (tests, CPU clusters): accelerate sets up gloo only when
            # told `cpu=True` (DDP), or given the backend (DeepSpeed, which ignores `cpu`); otherwise
            # every process would silently train alone on the full batch.
            if os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true":
                handlers.append(InitProcessGroupKwargs(backend="gloo"))
            else:
                cpu = True
        return Accelerator(
            cpu=cpu,
            mixed_precision=self.cfg.mixed_precision,
            log_with=trackers or None,
            project_dir=str(self.output_dir),
            # One global batch per step, split over processes: the scheduler steps once per step.
            dataloader_config=DataLoaderConfiguration(split_batches=True),
            kwargs_handlers=handlers,
        )

    def _load_holder(self, device):
        """The Embedder or Reranker whose `.model` is trained (tokenisation and pooling come with it)."""
        cfg = self.cfg
        kwargs = {"dtype": cfg.dtype, "device": device, "attn_implementation": cfg.attn_implementation}
        if cfg.task == "embedding":
            from embedforge.embedder import Embedder

            return Embedder.from_pretrained(cfg.model, **kwargs)
        from embedforge.reranker import Reranker

        return Reranker.from_pretrained(cfg.model, max_length=cfg.max_length, **kwargs)

    def _resolve_defaults(self, world: int) -> None:
        """Fill what the recipe left open (method, lr, batch cap, steps, warmup) and log why."""
        from embedforge.train.defaults import resolve

        parameters = sum(p.numel() for p in self.holder.model.parameters())
        sizes = {source.name: len(source) for source in self.sources}

        def batches_per_epoch(batch_size: int) -> int:
            return MixingSampler(self.sources, batch_size, self.cfg.mixing_temperature, self.cfg.seed).batches_per_epoch

        self.cfg, self.total_steps, self.decisions = resolve(
            self.cfg, parameters=parameters, source_sizes=sizes, world=world, batches_per_epoch=batches_per_epoch)
        pooling = self._resolve_pooling()
        if pooling:
            self.decisions.append(pooling)
        for line in self.decisions:
            logger.info("schedule: %s", line)
        self.guard = CollapseGuard(causes=self._likely_causes())

    def _resolve_pooling(self) -> str | None:
        """Where a decoder embedding is read: the appended EOS or the last real token (see
        TrainConfig.append_eos). Set on the holder's spec, so training, checkpoints and the exported
        embedforge.json agree."""
        from embedforge import modeling

        spec = getattr(self.holder, "spec", None)
        if self.cfg.task != "embedding" or spec is None or spec.pooling != "lasttoken":
            return None
        wanted, why = self.cfg.append_eos, "append_eos"
        if wanted is None:
            source = str(self.cfg.model)
            if any(modeling.read_json_if_exists(source, name) for name in ("modules.json", "embedforge.json")):
                wanted, why = spec.append_eos, "as the embedder folder declares"
            else:
                wanted, why = False, "a language model that is not an embedder yet: its EOS state ignores the text"
        spec.append_eos = wanted
        where = f"the appended {spec.eos_token!r}" if wanted else "the last real token"
        self.cfg = self.cfg.model_copy(update={"append_eos": wanted})
        return f"pooling at {where} ({why})"

    def _likely_causes(self) -> list[str]:
        """What most often makes this configuration collapse, for the collapse guard's warning."""
        cfg, causes = self.cfg, []
        spec = getattr(self.holder, "spec", None)
        if cfg.task == "embedding" and spec is not None and spec.pooling == "lasttoken" and spec.append_eos:
            causes.append(f"pooling at the appended {spec.eos_token!r}: in a language model that was not trained "
                          "as an embedder it is a document separator whose state ignores the text (pool the last "
                          "real token: embedforge.json append_eos false)")
        usual = default_lr(cfg.method, sum(p.numel() for p in self.holder.model.parameters()))
        if cfg.lr is not None and cfg.lr > 2 * usual:
            causes.append(f"lr {cfg.lr:g} is high for {cfg.method} fine-tuning of this model (default {usual:g})")
        if cfg.task == "embedding" and cfg.loss.margin is not None:
            causes.append(f"the false-negative margin {cfg.loss.margin} masks most candidates when the base model "
                          "scores every pair alike (metric masked_margin); try loss.preset infonce")
        return causes

    def _make_trainable(self, module: torch.nn.Module) -> torch.nn.Module:
        cfg = self.cfg
        if cfg.gradient_checkpointing:
            module.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if hasattr(module, "config") and hasattr(module.config, "use_cache"):
            module.config.use_cache = False
        if cfg.method == "lora":
            from peft import LoraConfig, get_peft_model

            base_path = getattr(module.config, "_name_or_path", "") or cfg.model
            lora = LoraConfig(r=cfg.lora.rank, lora_alpha=cfg.lora.alpha, lora_dropout=cfg.lora.dropout,
                              target_modules=cfg.lora.target_modules, bias="none")
            module = get_peft_model(module, lora)
            # The exported adapter must find its base from any working directory.
            module.peft_config["default"].base_model_name_or_path = (
                os.path.abspath(base_path) if os.path.isdir(base_path) else base_path)
        # Encoders' pooler (BERT, MiniLM) is never used by the embedding: without a gradient it would
        # also stop DDP, which requires every trainable parameter to receive one.
        for name, param in module.named_parameters():
            if ".pooler." in f".{name}":
                param.requires_grad_(False)
        module.train()
        return module

    def _configure_deepspeed(self, local_batch: int) -> None:
        """accelerate fills DeepSpeed's `auto` batch keys from a dataloader; we have our own sampler."""
        from accelerate.utils import DistributedType

        if self.accelerator.distributed_type != DistributedType.DEEPSPEED:
            return
        ds = self.accelerator.state.deepspeed_plugin.deepspeed_config
        ds["train_micro_batch_size_per_gpu"] = local_batch
        ds["train_batch_size"] = local_batch * self.accelerator.num_processes
        ds["gradient_accumulation_steps"] = 1
        if ds.get("gradient_clipping", "auto") == "auto":
            ds["gradient_clipping"] = self.cfg.max_grad_norm or 0.0

    def _build_loss(self, dimension: int):
        from embedforge.train.losses import MatryoshkaLoss, Qwen3InfoNCEConfig, qwen3_infonce

        lc = self.cfg.loss
        dims = lc.matryoshka_dims
        if dims and max(dims) > dimension:
            raise ConfigError(f"loss.matryoshka_dims: {max(dims)} exceeds the model's embedding width {dimension}")
        infonce = Qwen3InfoNCEConfig(
            temperature=lc.temperature, use_hard_negatives="hard" in lc.terms, use_qq="qq" in lc.terms,
            use_dd="dd" in lc.terms, use_qd="qd" in lc.terms, margin=lc.margin, mask_duplicates=lc.mask_duplicates,
            exempt_hard_negatives_from_margin=lc.exempt_hard_negatives_from_margin,
        )
        return MatryoshkaLoss(functools.partial(qwen3_infonce, cfg=infonce), dims=dims, weights=lc.matryoshka_weights)

    def setup(self) -> None:
        """Accelerator, data, model, optimizer and scheduler (called by `run`; public for inspection)."""
        from accelerate.utils import DistributedType, set_seed
        from transformers import get_scheduler

        self.accelerator = acc = self._build_accelerator()
        world = acc.num_processes
        if self.cfg.batch_size % world:
            raise ConfigError(f"batch_size {self.cfg.batch_size} must be divisible by the number of processes "
                              f"({world})")
        self.rank = acc.process_index
        self.sharded = acc.distributed_type == DistributedType.FSDP or (
            acc.distributed_type == DistributedType.DEEPSPEED and acc.state.deepspeed_plugin.zero_stage == 3)
        self.sources, self.reports = load_sources(self.cfg.data, self.inline_data)

        set_seed(self.cfg.seed)  # the same LoRA initialisation on every process and every attempt
        self.holder = self._load_holder(acc.device)
        self._resolve_defaults(world)
        cfg = self.cfg
        if cfg.task == "embedding" and cfg.batch_size < 2 and not any(d.num_negatives for d in cfg.data):
            raise ConfigError("batch_size 1 without hard negatives leaves the loss no negative to learn from")
        self.local_batch = cfg.batch_size // world
        self.sampler = MixingSampler(self.sources, cfg.batch_size, cfg.mixing_temperature, cfg.seed)
        self.tokenizer = self.holder.tokenizer
        self.weights_path = getattr(self.holder.model.config, "_name_or_path", "") or cfg.model
        if cfg.task == "embedding":
            self.loss_fn = self._build_loss(self.holder.dimension)
            if cfg.loss.matryoshka_dims:
                self.holder.spec.matryoshka_dims = list(cfg.loss.matryoshka_dims)
        module = self._make_trainable(self.holder.model)
        params = [p for p in module.parameters() if p.requires_grad]
        trainable, total = sum(p.numel() for p in params), sum(p.numel() for p in module.parameters())
        logger.info("%s: %s fine-tuning, %d of %d parameters trainable (%.2f%%)", cfg.model, cfg.method, trainable,
                    total, 100 * trainable / max(total, 1))
        optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
        scheduler = get_scheduler(cfg.scheduler, optimizer, num_warmup_steps=cfg.warmup_steps,
                                  num_training_steps=self.total_steps)
        self._configure_deepspeed(self.local_batch)
        self.model, self.optimizer, self.scheduler = acc.prepare(module, optimizer, scheduler)
        self.holder.model = self.model  # forward through the wrapper: DDP/DeepSpeed hooks must see it
        ckpt.register_trainable_only_hooks(acc, self.model)
        if self.evaluator is None and cfg.eval.data:
            if cfg.task != "embedding":
                raise ConfigError("eval.data evaluates embedders; pass an evaluator for a reranker")
            from embedforge.eval.retrieval import make_dev_evaluator

            self.evaluator = make_dev_evaluator(cfg.eval.data, instruction=cfg.eval.instruction, dim=cfg.eval.dim,
                                                split=cfg.eval.split, batch_size=cfg.eval.batch_size)

    # --- gradient bookkeeping ---------------------------------------------------------------------

    @contextlib.contextmanager
    def _accumulating(self):
        """Backward passes inside accumulate gradients without cross-process sync: DDP's no_sync, and
        for DeepSpeed a non-boundary micro-step (accelerate passes `sync_gradients` to the engine as
        its accumulation boundary, and would otherwise step the optimizer after every chunk)."""
        state = self.accelerator.gradient_state
        previous = state.sync_gradients
        state._set_sync_gradients(False)  # what accelerate's own `accumulate()` does
        try:
            with self.accelerator.no_sync(self.model):
                yield
        finally:
            state._set_sync_gradients(previous)

    def _any_process(self, flag: bool) -> bool:
        """True when `flag` is True on any process (a collective when distributed)."""
        if self.accelerator.num_processes == 1:
            return flag
        value = torch.tensor([1.0 if flag else 0.0], device=self.accelerator.device)
        return bool(self.accelerator.reduce(value, reduction="sum").item() > 0)

    def _check_finite(self, loss: torch.Tensor, batch: Batch) -> None:
        if self._any_process(not bool(torch.isfinite(loss.detach()).all())):
            raise NonFiniteLossError(
                f"step {batch.index + 1}: loss is {loss.detach().float().item()} (non-finite on at least one "
                f"process) on a batch of dataset {batch.source!r}: rows {batch.where()}; stopped before the "
                "optimizer step")

    # --- one step ---------------------------------------------------------------------------------

    def backward(self, batch: Batch) -> tuple[torch.Tensor, dict[str, torch.Tensor], int]:
        """Forward and backward of one global batch (this process's share): leaves the gradients in
        `.grad` without stepping the optimizer. Returns (loss, stats, tokens on this process)."""
        if self.cfg.task == "embedding":
            return self._embedding_step(batch)
        return self._reranker_step(batch)

    def _embedding_step(self, batch: Batch) -> tuple[torch.Tensor, dict[str, torch.Tensor], int]:
        from embedforge.train.distributed import gather_embedding_batch
        from embedforge.train.gradcache import gradcache_step
        from embedforge.train.losses import EmbeddingBatch, LossOutput, text_hashes

        cfg = self.cfg
        lo = self.rank * self.local_batch
        texts = contrastive_texts(batch, cfg.seed).slice(lo, lo + self.local_batch)
        n, k = len(texts.queries), texts.k
        negatives = [neg for row in texts.negatives for neg in row]
        neg_slots = torch.tensor([i * k + j for i, row in enumerate(texts.negatives) for j in range(len(row))],
                                 dtype=torch.long)
        flat = texts.queries + texts.positives + negatives
        ids = text_hashes(texts.raw_queries + texts.positives + negatives)
        # Length-grouped chunks: texts sorted by token count, so each forward pads as little as possible.
        lengths = [len(t) for t in self.tokenizer(flat, add_special_tokens=False)["input_ids"]]
        order = sorted(range(len(flat)), key=lambda i: (lengths[i], i))
        chunk = cfg.mini_batch_size or len(flat)
        chunks = [order[i:i + chunk] for i in range(0, len(order), chunk)]
        features = [self.holder.tokenize([flat[i] for i in c], max_length=cfg.max_length) for c in chunks]
        tokens = sum(int(f["attention_mask"].sum()) for f in features)
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
            self._check_finite(out.loss, batch)
            return LossOutput(out.loss * gathered.loss_scale, out.stats)

        if len(features) == 1:  # the whole local batch fits one forward: no GradCache detour
            out = loss_fn({"texts": self.holder.embed(features[0])})
            self.accelerator.backward(out.loss)
            return out.loss.detach(), out.stats, tokens
        out = gradcache_step(self.holder.embed, {"texts": features}, loss_fn,
                             backward_fn=self.accelerator.backward, no_sync=self._accumulating)
        return out.loss, out.stats, tokens

    def _reranker_step(self, batch: Batch) -> tuple[torch.Tensor, dict[str, torch.Tensor], int]:
        from embedforge.train.losses import listwise_loss, pointwise_yes_no_loss

        cfg = self.cfg
        lo = self.rank * self.local_batch
        groups = reranker_groups(batch, cfg.seed).slice_groups(lo, lo + self.local_batch)
        size = groups.group_size
        n_groups = len(groups.queries) // size
        per_chunk = max(1, (cfg.mini_batch_size or n_groups * size) // size)
        total, stats_sum, tokens = torch.zeros(()), {}, 0
        for start in range(0, n_groups, per_chunk):
            stop = min(start + per_chunk, n_groups)
            part = groups.slice_groups(start, stop)
            last = stop == n_groups
            with contextlib.nullcontext() if last else self._accumulating():
                features = self.holder.tokenize_pairs(part.queries, part.documents, part.instructions,
                                                      max_length=cfg.max_length)
                tokens += int(features["attention_mask"].sum())
                logits = self.holder.yes_no_logits(features)
                if cfg.loss.reranker == "pointwise":
                    labels = torch.tensor(part.labels, device=logits.device)
                    out = pointwise_yes_no_loss(logits, labels)
                else:
                    out = listwise_loss(logits, size, cfg.loss.listwise_temperature)
                self._check_finite(out.loss, batch)
                share = (stop - start) / n_groups
                self.accelerator.backward(out.loss * share)
            total = total + out.loss.detach().cpu() * share
            for key, value in out.stats.items():
                if torch.isfinite(value):
                    stats_sum[key] = stats_sum.get(key, 0.0) + value.detach().cpu() * share
        return total, stats_sum, tokens

    # --- the loop ---------------------------------------------------------------------------------

    def _fingerprint(self) -> dict[str, Any]:
        dumped = self.cfg.model_dump(mode="json")
        return {key: dumped[key] for key in RESUME_KEYS}

    def _trainer_state(self, step: int, sampler_state: dict[str, Any]) -> dict[str, Any]:
        return {"step": step, "total_steps": self.total_steps, "sampler": sampler_state,
                "best_metric": self.best_metric, "config": self._fingerprint()}

    def _resume(self) -> int:
        cfg, acc = self.cfg, self.accelerator
        if acc.is_main_process:
            ckpt.remove_incomplete(self.output_dir)
        acc.wait_for_everyone()
        if cfg.resume == "never":
            if ckpt.complete_checkpoints(self.output_dir):
                raise ConfigError(f"{self.output_dir} holds checkpoints; use resume: auto or another output_dir")
            return 0
        folder = ckpt.latest_checkpoint(self.output_dir) if cfg.resume == "auto" else Path(cfg.resume)
        if folder is None:
            return 0
        state = ckpt.read_trainer_state(folder)
        mine = self._fingerprint()
        changed = [k for k in RESUME_KEYS if state["config"].get(k) != mine[k]]
        if changed:
            raise ConfigError(f"{folder} was written with different {', '.join(changed)}; resume with the same "
                              "recipe or set resume: never with a new output_dir")
        ckpt.load_checkpoint(acc, folder)
        self.sampler.load_state_dict(state["sampler"])
        self.best_metric = state.get("best_metric")
        logger.info("resumed from %s at step %d", folder, state["step"])
        if acc.is_main_process:
            _truncate_metrics(self.output_dir / METRICS_FILE, state["step"])
        return int(state["step"])

    def _save(self, step: int, sampler_state: dict[str, Any]) -> Path:
        return ckpt.save_checkpoint(self.accelerator, self.output_dir, step, self._trainer_state(step, sampler_state),
                                    keep=self.cfg.save_total_limit,
                                    write_extra=self._checkpoint_model if self.cfg.checkpoint_model else None)

    def _on_signal(self, signum, frame) -> None:
        self._stop_signal = signum
        logger.warning("received signal %d: stopping after this step with a checkpoint", signum)

    def run(self) -> TrainResult:
        self.setup()
        cfg, acc = self.cfg, self.accelerator
        self.best_metric: float | None = None
        if acc.is_main_process:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            write_json(self.output_dir / "train_config.json", cfg.model_dump(mode="json"))
            write_json(self.output_dir / "data_report.json", [asdict(r) for r in self.reports])
        step = self._resume()
        if step == 0 and acc.is_main_process:  # a fresh start: lines of an earlier attempt do not belong here
            _truncate_metrics(self.output_dir / METRICS_FILE, 0)
        if "wandb" in cfg.report_to or "tensorboard" in cfg.report_to:
            acc.init_trackers(cfg.project, config=cfg.model_dump(mode="json"))
        previous = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
        for s in previous:
            signal.signal(s, self._on_signal)
        try:
            result = self._loop(step)
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)
            for source in self.sources:
                getattr(source.rows, "close", lambda: None)()
            acc.end_training()
        return result

    def _loop(self, step: int) -> TrainResult:
        from tqdm.auto import tqdm

        cfg, acc = self.cfg, self.accelerator
        result = TrainResult(output=str(self.output_dir), output_dir=str(self.output_dir), steps=step,
                             total_steps=self.total_steps, decisions=list(self.decisions))
        bar = tqdm(total=self.total_steps, initial=step, desc="train", unit="step",
                   disable=not (cfg.progress_bar and acc.is_local_main_process))
        params = [p for p in self.model.parameters() if p.requires_grad]
        started, last_saved = time.perf_counter(), (step or None)  # a resumed step has its checkpoint
        while step < self.total_steps:
            sampler_state = copy.deepcopy(self.sampler.state_dict())
            batch = self.sampler.next_batch()
            t0 = time.perf_counter()
            try:
                loss, stats, tokens = self.backward(batch)
            except NonFiniteLossError:
                self.optimizer.zero_grad(set_to_none=True)
                if step > 0 and last_saved != step:
                    self._save(step, sampler_state)  # the last good weights, loadable to inspect or resume
                raise
            grad_norm = None
            if cfg.max_grad_norm:
                grad_norm = acc.clip_grad_norm_(params, cfg.max_grad_norm)
            self.optimizer.step()
            self.scheduler.step()
            self.optimizer.zero_grad(set_to_none=True)
            step += 1
            bar.update(1)
            if step % cfg.logging_steps == 0 or step == self.total_steps:
                record = self._log(step, batch, loss, stats, tokens, grad_norm, time.perf_counter() - t0,
                                   time.perf_counter() - started)
                bar.set_postfix(loss=f"{record['loss']:.4f}")
                result.last_metrics = record
                for message in self.guard.update(step, record):
                    result.warn(message)
            evaluate_now = cfg.eval.steps and step % cfg.eval.steps == 0 and step < self.total_steps
            if evaluate_now and self.evaluator is not None:
                self._evaluate(step, result)
            if self._any_process(self._stop_signal is not None):
                self._save(step, self.sampler.state_dict())
                result.steps, result.interrupted = step, True
                bar.close()
                return self._finish(result)
            if cfg.save_steps and step % cfg.save_steps == 0:
                self._save(step, self.sampler.state_dict())
                last_saved = step
        bar.close()
        if cfg.save_steps and last_saved != step:
            self._save(step, self.sampler.state_dict())
        if self.evaluator is not None:
            self._evaluate(step, result)
        result.steps = step
        result.final_dir = result.output = str(self.export(self.output_dir / "final"))
        result.best_metric = self.best_metric
        if (self.output_dir / "best").exists():
            result.best_dir = str(self.output_dir / "best")
        for message in self.guard.finish(step):
            result.warn(message)
        return self._finish(result)

    def _finish(self, result: TrainResult) -> TrainResult:
        """Write the run's summary beside its metrics (main process)."""
        if self.accelerator.is_main_process:
            write_json(self.output_dir / RESULT_FILE, result.model_dump(mode="json"))
        return result

    def _log(self, step, batch, loss, stats, tokens, grad_norm, step_s, elapsed_s) -> dict[str, Any]:
        acc = self.accelerator
        local = torch.tensor([float(loss), float(tokens)], dtype=torch.float64, device=acc.device)
        summed = acc.reduce(local, reduction="sum") if acc.num_processes > 1 else local
        record: dict[str, Any] = {
            "step": step,
            "loss": float(summed[0]) / acc.num_processes,
            "lr": float(self.scheduler.get_last_lr()[0]),
            "source": batch.source,
            "tokens": int(summed[1]),
            "tokens_per_s": float(summed[1]) / max(step_s, 1e-9),
            "step_s": step_s,
            "elapsed_s": elapsed_s,
        }
        if grad_norm is not None:
            record["grad_norm"] = float(grad_norm)
        record.update({k: float(v) for k, v in stats.items()})
        if acc.is_main_process:
            with open(self.output_dir / METRICS_FILE, "a", encoding="utf-8") as fh:
                fh.write(json.dumps(record) + "\n")
        if any(t in self.cfg.report_to for t in ("wandb", "tensorboard")):
            acc.log({k: v for k, v in record.items() if isinstance(v, (int, float))}, step=step)
        return record

    # --- evaluation and export ----------------------------------------------------------------------

    def _inference_view(self):
        """The trained model as a plain Embedder/Reranker (eval mode is the evaluator's job). Sharded
        weights (FSDP, ZeRO-3) are only whole inside their wrapper's forward, so it stays wrapped."""
        holder = copy.copy(self.holder)
        holder.model = self.model if self.sharded else self.accelerator.unwrap_model(self.model)
        return holder

    def _evaluate(self, step: int, result: TrainResult) -> None:
        from accelerate.utils import broadcast_object_list

        acc = self.accelerator
        metrics: dict[str, float] | None = None
        if self.sharded or acc.is_main_process:  # sharded weights need every process in the forward
            metrics = {k: float(v) for k, v in self.evaluator(self._inference_view()).items()}
        if acc.num_processes > 1:
            metrics = broadcast_object_list([metrics])[0]
        key = self.cfg.eval.metric if self.cfg.eval.metric in metrics else f"dev_{self.cfg.eval.metric}"
        if key not in metrics:
            raise ConfigError(f"eval.metric {self.cfg.eval.metric!r} not among the evaluator's {sorted(metrics)}")
        value = metrics[key]
        improved = self.best_metric is None or value > self.best_metric
        if acc.is_main_process:
            with open(self.output_dir / METRICS_FILE, "a", encoding="utf-8") as fh:
                fh.write(json.dumps({"step": step, "eval": metrics, "best": improved}) + "\n")
        logger.info("step %d: %s = %.4f%s", step, key, value, " (best)" if improved else "")
        result.last_metrics = {**result.last_metrics, **metrics}
        if improved:
            self.best_metric = value
            self.export(self.output_dir / "best", extra={"step": step, "metrics": metrics})
        result.best_metric = self.best_metric

    def export(self, folder: Path, extra: dict[str, Any] | None = None) -> Path:
        """Write a model folder `Embedder`/`Reranker.from_pretrained` loads, atomically (collective).

        LoRA: the adapter goes to `folder/adapter`, and `folder` holds the base with the adapter
        merged (loaded back from the adapter folder, which also proves the adapter loads)."""
        state_dict = self._full_state_dict()
        if self.accelerator.is_main_process:
            with atomic_dir(folder, overwrite=True) as tmp:
                self._write_model(tmp, state_dict, merge=True)
                provenance = {"recipe": self.cfg.model_dump(mode="json"),
                              "data": [asdict(r) for r in self.reports], **(extra or {})}
                write_json(tmp / "embedforge_train.json", provenance)
        self.accelerator.wait_for_everyone()
        return folder

    def _checkpoint_model(self, checkpoint_tmp: Path) -> None:
        """A loadable model inside a checkpoint being written (collective): the adapter alone for
        LoRA, the full model otherwise. Checkpoints can then be loaded, evaluated and slerp-merged
        (report stage 3) without the optimizer state around them."""
        state_dict = self._full_state_dict()
        if self.accelerator.is_main_process:
            self._write_model(checkpoint_tmp / "model", state_dict, merge=False)

    def _full_state_dict(self):
        """Gathered weights when they are sharded (FSDP, ZeRO-3; every process must call), else None."""
        return self.accelerator.get_state_dict(self.model) if self.sharded else None

    def _write_model(self, folder: Path, state_dict, merge: bool) -> None:
        cfg = self.cfg
        unwrapped = self.accelerator.unwrap_model(self.model)
        if cfg.method == "lora":
            adapter_dir = folder / "adapter" if merge else folder
            self._save_adapter(unwrapped, adapter_dir, state_dict)
            if not merge:
                return
            from embedforge import modeling

            load = modeling.load_backbone if cfg.task == "embedding" else modeling.load_causal_lm
            backbone = load(str(adapter_dir), dtype=cfg.dtype, device="cpu", attn_implementation=cfg.attn_implementation)
        elif state_dict is not None:
            backbone = self._fresh_backbone()
            backbone.load_state_dict(state_dict)
        else:
            backbone = unwrapped
        holder = copy.copy(self.holder)
        holder.model = backbone
        if cfg.task == "embedding":
            holder.save_pretrained(folder, default_instruction=self._default_instruction())
        else:
            holder.save_pretrained(folder)

    def _default_instruction(self) -> str | None:
        instructions = {d.instruction for d in self.cfg.data if d.instruction}
        return instructions.pop() if len(instructions) == 1 else None

    def _fresh_backbone(self):
        from embedforge import modeling

        load = modeling.load_backbone if self.cfg.task == "embedding" else modeling.load_causal_lm
        return load(self.weights_path, dtype=self.cfg.dtype, device="cpu", attn_implementation=self.cfg.attn_implementation)

    def _save_adapter(self, peft_model, adapter_dir: Path, state_dict) -> None:
        """A peft adapter folder that also loads alone: tokenizer and embedding spec beside it."""
        peft_model.save_pretrained(adapter_dir, state_dict=state_dict, safe_serialization=True)
        self.tokenizer.save_pretrained(adapter_dir)
        if self.cfg.task == "embedding":
            write_json(adapter_dir / "embedforge.json", asdict(self.holder.spec))


def _truncate_metrics(path: Path, step: int) -> None:
    """Drop metric lines past `step` (written by an attempt that died after its last checkpoint)."""
    if not path.exists():
        return
    keep = [line for line in path.read_text(encoding="utf-8").splitlines()
            if line.strip() and json.loads(line).get("step", 0) <= step]
    from embedforge.io import atomic_path

    with atomic_path(path) as tmp:
        tmp.write_text("".join(line + "\n" for line in keep), encoding="utf-8")

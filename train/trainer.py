"""The training loop: embedders (Qwen3 InfoNCE + Matryoshka) and yes/no rerankers, one code path
for one process, DDP, DeepSpeed ZeRO and FSDP. What differs per task (model class, loss, one step's
forward and backward, the saved folder) is a `TrainingTask` (train/task.py); everything else, the
loop, checkpoints, logging, signals, evaluation and export, is here.

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
import json
import logging
import os
import signal
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from pydantic import Field

from embedforge.errors import ConfigError, EmbedforgeError
from embedforge.io import atomic_dir, atomic_path, check_output, disk_errors, output_lock, write_json
from embedforge.outcome import StageOutcome
from embedforge.train import checkpoint as ckpt
from embedforge.train.config import TrainConfig
from embedforge.train.health import CollapseGuard
from embedforge.train.memory import memory_record, steady_cpu_allocator
from embedforge.train.sampler import Batch, MixingSampler
from embedforge.train.sources import load_sources
from embedforge.train.task import make_task

logger = logging.getLogger(__name__)

METRICS_FILE = "metrics.jsonl"
RESULT_FILE = "train_result.json"
CONFIG_FILE = "train_config.json"
DATA_REPORT_FILE = "data_report.json"
# Settings that fix the data order and the parameter shapes: a checkpoint only resumes a run that agrees.
RESUME_KEYS = ("model", "task", "method", "lora", "batch_size", "seed", "data", "mixing_temperature")


class NonFiniteLossError(EmbedforgeError):
    """The loss became NaN or infinite; raised before the optimizer step, so the weights are intact."""


class NonFiniteWeightsError(EmbedforgeError):
    """The weights became NaN or infinite after an optimizer step; raised instead of saving them."""


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
        evaluator: `evaluator(model) -> {"dev_ndcg_at_10": ...}`; default: the task's, built from
            `config.eval` (for embedders a BEIR folder, `embedforge.eval.retrieval.make_dev_evaluator`).
        inline_data: dataset path -> list of dicts or `datasets.Dataset`, instead of reading files.
    """

    def __init__(self, config: TrainConfig, *, evaluator=None, inline_data: dict[str, Any] | None = None):
        self.cfg = config
        self.task = make_task(config)
        self.evaluator = evaluator
        self.inline_data = inline_data
        self.output_dir = Path(config.output_dir)
        self.accelerator = None
        self._stop_signal: int | None = None
        self._recorded = False

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
            if os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true":
                # accelerate selects FSDP only on an accelerator (state.py); on CPU it would train DDP.
                raise ConfigError("FSDP needs a GPU or another accelerator (accelerate runs an FSDP config on CPU as "
                                  "plain DDP); on CPU launch with --multi_gpu (DDP) or a DeepSpeed config")
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

    def _resolve_defaults(self, world: int) -> None:
        """Fill what the recipe left open (method, lr, batch cap, steps, warmup, the task's own
        settings) and log why."""
        from embedforge.train.defaults import resolve

        parameters = sum(_numel(p) for p in self.holder.model.parameters())
        sizes = {source.name: len(source) for source in self.sources}

        def batches_per_epoch(batch_size: int) -> int:
            return MixingSampler(self.sources, batch_size, self.cfg.mixing_temperature, self.cfg.seed).batches_per_epoch

        self.cfg, self.total_steps, self.decisions = resolve(
            self.cfg, parameters=parameters, source_sizes=sizes, world=world, batches_per_epoch=batches_per_epoch)
        self.cfg, task_decisions = self.task.resolve(self.cfg, self.holder, self.sources)
        self.decisions += task_decisions
        for line in self.decisions:
            logger.info("schedule: %s", line)
        self.guard = CollapseGuard(causes=self.task.likely_causes(self.cfg, self.holder))

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

    def setup(self) -> None:
        """Accelerator, data, model, optimizer and scheduler (called by `run`; public for inspection)."""
        from accelerate.utils import DistributedType, set_seed
        from transformers import get_scheduler

        if self.accelerator is None:
            self.accelerator = self._build_accelerator()
        acc = self.accelerator
        world = acc.num_processes
        if self.cfg.batch_size % world:
            raise ConfigError(f"batch_size {self.cfg.batch_size} must be divisible by the number of processes "
                              f"({world})")
        self.rank = acc.process_index
        self.sharded = acc.distributed_type == DistributedType.FSDP or (
            acc.distributed_type == DistributedType.DEEPSPEED and acc.state.deepspeed_plugin.zero_stage == 3)
        self.sources, self.reports = load_sources(self.cfg.data, self.inline_data)

        set_seed(self.cfg.seed)  # the same LoRA initialisation on every process and every attempt
        allocator = steady_cpu_allocator() if acc.device.type == "cpu" else None
        self.holder = self.task.load(self.cfg, acc.device)
        self._resolve_defaults(world)
        if allocator:
            self.decisions.append(allocator)
            logger.info("memory: %s", allocator)
        cfg = self.cfg
        self.task.prepare(cfg, self.holder)
        self.local_batch = cfg.batch_size // world
        self.sampler = MixingSampler(self.sources, cfg.batch_size, cfg.mixing_temperature, cfg.seed)
        self.tokenizer = self.holder.tokenizer
        self.weights_path = getattr(self.holder.model.config, "_name_or_path", "") or cfg.model
        module = self._make_trainable(self.holder.model)
        params = [p for p in module.parameters() if p.requires_grad]
        trainable, total = sum(_numel(p) for p in params), sum(_numel(p) for p in module.parameters())
        logger.info("%s: %s fine-tuning, %d of %d parameters trainable (%.2f%%)", cfg.model, cfg.method, trainable,
                    total, 100 * trainable / max(total, 1))
        optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
        scheduler = get_scheduler(cfg.scheduler, optimizer, num_warmup_steps=cfg.warmup_steps,
                                  num_training_steps=self.total_steps)
        self._configure_deepspeed(self.local_batch)
        self.model, self.optimizer, self.scheduler = acc.prepare(module, optimizer, scheduler)
        self.holder.model = self.model  # forward through the wrapper: DDP/DeepSpeed hooks must see it
        ckpt.register_trainable_only_hooks(acc, self.model)
        if self.evaluator is None:
            self.evaluator = self.task.default_evaluator(cfg)

    # --- what a task's step uses (train/task.py StepRuntime) -----------------------------------------

    @property
    def local_rows(self) -> tuple[int, int]:
        start = self.rank * self.local_batch
        return start, start + self.local_batch

    @contextlib.contextmanager
    def accumulating(self) -> Iterator[None]:
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

    def check_finite(self, loss: torch.Tensor, batch: Batch) -> None:
        if self._any_process(not bool(torch.isfinite(loss.detach()).all())):
            raise NonFiniteLossError(
                f"step {batch.index + 1}: loss is {loss.detach().float().item()} (non-finite on at least one "
                f"process) on a batch of dataset {batch.source!r}: rows {batch.where()}; stopped before the "
                "optimizer step")

    def _any_process(self, flag: bool) -> bool:
        """True when `flag` is True on any process (a collective when distributed)."""
        if self.accelerator.num_processes == 1:
            return flag
        value = torch.tensor([1.0 if flag else 0.0], device=self.accelerator.device)
        return bool(self.accelerator.reduce(value, reduction="sum").item() > 0)

    def _main_says(self, value: Any) -> Any:
        """The main process's `value`, on every process (a collective when distributed)."""
        if self.accelerator.num_processes == 1:
            return value
        from accelerate.utils import broadcast_object_list

        return broadcast_object_list([value])[0]

    # --- one step ---------------------------------------------------------------------------------

    def backward(self, batch: Batch) -> tuple[torch.Tensor, dict[str, torch.Tensor], int]:
        """Forward and backward of one global batch (this process's share): leaves the gradients in
        `.grad` without stepping the optimizer. Returns (loss, stats, tokens on this process)."""
        return self.task.step(self, batch)

    def _check_finite_weights(self, step: int) -> None:
        """Refuse to save or export weights that an optimizer step made NaN or infinite (collective)."""
        bad = [name for name, p in self.model.named_parameters() if p.requires_grad and not bool(torch.isfinite(p).all())]
        if self._any_process(bool(bad)):
            where = f"e.g. {', '.join(bad[:3])}" if bad else "on another process"
            last = ckpt.latest_checkpoint(self.output_dir)
            raise NonFiniteWeightsError(
                f"step {step}: the trained weights are NaN or infinite after the optimizer step ({where}); nothing "
                f"saved; the last complete checkpoint is {last or 'none'}; lower lr or max_grad_norm")

    # --- the loop ---------------------------------------------------------------------------------

    def _fingerprint(self) -> dict[str, Any]:
        dumped = self.cfg.model_dump(mode="json")
        return {key: dumped[key] for key in RESUME_KEYS}

    def _trainer_state(self, step: int, sampler_state: dict[str, Any]) -> dict[str, Any]:
        return {"step": step, "total_steps": self.total_steps, "sampler": sampler_state,
                "best_metric": self.best_metric, "config": self._fingerprint()}

    def _resume(self) -> int:
        cfg, acc = self.cfg, self.accelerator
        foreign = self._main_says([p.name for p in ckpt.foreign_checkpoints(self.output_dir)]
                                  if acc.is_main_process else None)
        if foreign:
            raise ConfigError(f"{self.output_dir}: {', '.join(foreign)} not written by embedforge (no COMPLETE "
                              "marker); move it away or choose another output_dir")
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

    def _record_run(self) -> None:
        """The run's concrete config and data report, written beside its first durable output (a
        checkpoint or the final model), so a run that failed before either leaves no record that
        looks like a run."""
        if self._recorded or not self.accelerator.is_main_process:
            return
        write_json(self.output_dir / CONFIG_FILE, self.cfg.model_dump(mode="json"))
        write_json(self.output_dir / DATA_REPORT_FILE, [asdict(r) for r in self.reports])
        self._recorded = True

    def _save(self, step: int, sampler_state: dict[str, Any]) -> Path:
        self._check_finite_weights(step)
        folder = ckpt.save_checkpoint(self.accelerator, self.output_dir, step,
                                      self._trainer_state(step, sampler_state), keep=self.cfg.save_total_limit,
                                      write_extra=self._checkpoint_model if self.cfg.checkpoint_model else None)
        self._record_run()
        return folder

    def _on_signal(self, signum, frame) -> None:
        self._stop_signal = signum
        logger.warning("received signal %d: stopping after this step with a checkpoint", signum)

    @contextlib.contextmanager
    def _exclusive_output(self) -> Iterator[None]:
        """One run per output folder: the main process holds `embedforge.io.output_lock` for the whole
        run (one lock for all the processes of a launch, so they never refuse each other); when it
        is refused, every process stops with its message."""
        acc = self.accelerator
        with contextlib.ExitStack() as stack:
            refusal = None
            if acc.is_main_process:
                try:
                    stack.enter_context(output_lock(self.output_dir))
                except ConfigError as exc:
                    refusal = str(exc)
            refusal = self._main_says(refusal)
            if refusal:
                raise ConfigError(refusal)
            yield

    def run(self) -> TrainResult:
        cfg = self.cfg
        check_output(cfg.output_dir, [d.path for d in cfg.data if d.path not in (self.inline_data or {})]
                     + [cfg.model], resumable=True)
        self.accelerator = self._build_accelerator()
        with self._exclusive_output():
            return self._run()

    def _run(self) -> TrainResult:
        self.setup()
        cfg, acc = self.cfg, self.accelerator
        self.best_metric: float | None = None
        if acc.is_main_process:
            self.output_dir.mkdir(parents=True, exist_ok=True)
        step = self._resume()
        if step == 0 and acc.is_main_process:  # a fresh start: lines of an earlier attempt do not belong here
            _truncate_metrics(self.output_dir / METRICS_FILE, 0)
        if "wandb" in cfg.report_to or "tensorboard" in cfg.report_to:
            # wandb writes its run folder under `dir` (default: the working directory).
            acc.init_trackers(cfg.project, config=cfg.model_dump(mode="json"),
                              init_kwargs={"wandb": {"dir": str(self.output_dir)}})
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
                    # The last good weights, loadable to inspect or resume, when they are finite.
                    with contextlib.suppress(NonFiniteWeightsError):
                        self._save(step, sampler_state)
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
        self._check_finite_weights(step)
        result.final_dir = result.output = str(self.export(self.output_dir / "final"))
        self._record_run()
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
        record.update(memory_record(acc.device))
        if acc.is_main_process:
            _append_line(self.output_dir / METRICS_FILE, record)
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
        acc = self.accelerator
        metrics: dict[str, float] | None = None
        if self.sharded or acc.is_main_process:  # sharded weights need every process in the forward
            metrics = {k: float(v) for k, v in self.evaluator(self._inference_view()).items()}
        metrics = self._main_says(metrics)
        key = self.cfg.eval.metric if self.cfg.eval.metric in metrics else f"dev_{self.cfg.eval.metric}"
        if key not in metrics:
            raise ConfigError(f"eval.metric {self.cfg.eval.metric!r} not among the evaluator's {sorted(metrics)}")
        value = metrics[key]
        improved = self.best_metric is None or value > self.best_metric
        if acc.is_main_process:
            _append_line(self.output_dir / METRICS_FILE, {"step": step, "eval": metrics, "best": improved})
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
        without the optimizer state around them."""
        state_dict = self._full_state_dict()
        if self.accelerator.is_main_process:
            self._write_model(checkpoint_tmp / "model", state_dict, merge=False)

    def _full_state_dict(self):
        """Gathered weights when they are sharded (FSDP, ZeRO-3; every process must call), else None."""
        return self.accelerator.get_state_dict(self.model) if self.sharded else None

    @contextlib.contextmanager
    def _plain_loading(self) -> Iterator[None]:
        """transformers builds every model under deepspeed.zero.Init (a collective) while accelerate has a
        ZeRO-3 config registered, whatever zero3_init_flag says; the export loads one on the main process
        alone, which would wait forever for the others."""
        from accelerate.utils import DistributedType

        if self.accelerator.distributed_type != DistributedType.DEEPSPEED:
            yield
            return
        from transformers.integrations import unset_hf_deepspeed_config

        unset_hf_deepspeed_config()
        try:
            yield
        finally:
            self.accelerator.state.deepspeed_plugin.set_deepspeed_weakref()

    def _write_model(self, folder: Path, state_dict, merge: bool) -> None:
        with self._plain_loading():
            self._write_model_files(folder, state_dict, merge)

    def _write_model_files(self, folder: Path, state_dict, merge: bool) -> None:
        cfg = self.cfg
        unwrapped = self.accelerator.unwrap_model(self.model)
        if cfg.method == "lora":
            adapter_dir = folder / "adapter" if merge else folder
            self._save_adapter(unwrapped, adapter_dir, state_dict)
            if not merge:
                return
            backbone = self.task.load_backbone(cfg, str(adapter_dir))
        elif state_dict is not None:
            backbone = self.task.load_backbone(cfg, self.weights_path)
            backbone.load_state_dict(state_dict)
        else:
            backbone = unwrapped
        holder = copy.copy(self.holder)
        holder.model = backbone
        self.task.save(cfg, holder, folder)

    def _save_adapter(self, peft_model, adapter_dir: Path, state_dict) -> None:
        """A peft adapter folder that also loads alone: tokenizer and task files beside it."""
        peft_model.save_pretrained(adapter_dir, state_dict=state_dict, safe_serialization=True)
        self.tokenizer.save_pretrained(adapter_dir)
        self.task.save_adapter_extras(self.holder, adapter_dir)


def _numel(param: torch.nn.Parameter) -> int:
    """A parameter's size, also when ZeRO-3 has partitioned it (its data is then an empty placeholder)."""
    return getattr(param, "ds_numel", None) or param.numel()


def _append_line(path: Path, record: dict[str, Any]) -> None:
    with disk_errors(path), open(path, "a", encoding="utf-8") as fh:
        fh.write(json.dumps(record) + "\n")


def _truncate_metrics(path: Path, step: int) -> None:
    """Drop metric lines past `step` (written by an attempt that died after its last checkpoint)."""
    if not path.exists():
        return
    keep = [line for line in path.read_text(encoding="utf-8").splitlines()
            if line.strip() and json.loads(line).get("step", 0) <= step]
    with atomic_path(path) as tmp:
        tmp.write_text("".join(line + "\n" for line in keep), encoding="utf-8")

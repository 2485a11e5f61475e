"""Settings a recipe leaves open, chosen from the model and the data, each with the reason logged.

`resolve` turns the recipe into the run's concrete config (what `train_config.json`, checkpoints and
provenance record) and a list of one-line decisions:

* method `auto`: full fine-tuning up to `full_max_parameters` backbone parameters, LoRA above;
* `lr` unset: by method and size (`default_lr`);
* `batch_size` larger than the smallest dataset: capped to it (rounded down to a multiple of the
  process count), so a small dataset trains instead of failing;
* no `max_steps`: epochs over the data, and at least `min_steps`;
* `warmup_steps` unset: WARMUP_FRACTION of the planned steps.

The values are the best of a measured sweep on real held-out pairs (bench/train_defaults_sweep.py,
bench/results/train_defaults_sweep.md).
"""

from __future__ import annotations

import math

from embedforge.errors import ConfigError
from embedforge.train.config import TrainConfig

# Full fine-tuning: 5e-5 measured best for all-MiniLM-L6-v2 (22M); SmolLM2-135M learned at 2e-5 and
# larger models take smaller steps (ms-swift's Qwen3-Embedding-4B full recipe: 6e-6).
LR_BY_METHOD = {"full": 5e-5, "lora": 2e-4}
LARGE_FULL_LR, LARGE_FROM_PARAMETERS = 2e-5, 100_000_000
WARMUP_FRACTION = 0.1


def default_lr(method: str, parameters: int) -> float:
    if method == "full" and parameters >= LARGE_FROM_PARAMETERS:
        return LARGE_FULL_LR
    return LR_BY_METHOD[method]


def resolve_method(cfg: TrainConfig, parameters: int) -> tuple[str, str | None]:
    """(method, reason or None when the recipe chose it)."""
    if cfg.method != "auto":
        return cfg.method, None
    if parameters <= cfg.full_max_parameters:
        return "full", (f"method full: {parameters / 1e6:.0f}M parameters <= full_max_parameters "
                        f"{cfg.full_max_parameters / 1e6:.0f}M")
    return "lora", (f"method lora: {parameters / 1e6:.0f}M parameters > full_max_parameters "
                    f"{cfg.full_max_parameters / 1e6:.0f}M")


def resolve_batch_size(cfg: TrainConfig, source_sizes: dict[str, int], world: int) -> tuple[int, str | None]:
    """The global batch, capped to the smallest source (every batch comes from one source)."""
    smallest_name, smallest = min(source_sizes.items(), key=lambda item: item[1])
    if cfg.batch_size <= smallest:
        return cfg.batch_size, None
    capped = smallest - smallest % world
    if capped < 1:
        raise ConfigError(f"dataset {smallest_name!r} has {smallest} usable rows: too few for a contrastive batch "
                          f"over {world} process(es)")
    return capped, (f"batch_size {capped}: capped from {cfg.batch_size} to the {smallest} rows of dataset "
                    f"{smallest_name!r}")


def resolve_steps(cfg: TrainConfig, batches_per_epoch: int) -> tuple[int, str]:
    """Planned optimizer steps and why."""
    if cfg.max_steps:
        return cfg.max_steps, f"{cfg.max_steps} steps: max_steps"
    by_epochs = max(1, math.ceil(cfg.epochs * batches_per_epoch))
    if by_epochs >= cfg.min_steps:
        return by_epochs, f"{by_epochs} steps: {cfg.epochs:g} epoch(s) of {batches_per_epoch} batches"
    epochs = cfg.min_steps / max(batches_per_epoch, 1)
    return cfg.min_steps, (f"{cfg.min_steps} steps: min_steps, since {cfg.epochs:g} epoch(s) of {batches_per_epoch} "
                           f"batch(es) would be {by_epochs}; that is {epochs:.1f} passes over the data")


def resolve(cfg: TrainConfig, *, parameters: int, source_sizes: dict[str, int], world: int,
            batches_per_epoch) -> tuple[TrainConfig, int, list[str]]:
    """(concrete config, planned steps, decisions). `batches_per_epoch(batch_size)` counts the batches
    of one pass at a given batch size (the sampler's rule)."""
    decisions: list[str] = []
    method, why = resolve_method(cfg, parameters)
    if why:
        decisions.append(why)
    batch_size, why = resolve_batch_size(cfg, source_sizes, world)
    if why:
        decisions.append(why)
    steps, why = resolve_steps(cfg.model_copy(update={"batch_size": batch_size}), batches_per_epoch(batch_size))
    decisions.append(why)
    lr = cfg.lr
    if lr is None:
        lr = default_lr(method, parameters)
        decisions.append(f"lr {lr:g}: default for {method} fine-tuning of {parameters / 1e6:.0f}M parameters")
    warmup = cfg.warmup_steps
    if warmup is None:
        warmup = int(WARMUP_FRACTION * steps)  # rounded down: a 1-step run must not spend its step at lr 0
        decisions.append(f"warmup {warmup} steps: {WARMUP_FRACTION:.0%} of {steps}")
    resolved = cfg.model_copy(update={"method": method, "batch_size": batch_size, "lr": lr, "warmup_steps": warmup,
                                      "max_steps": steps})
    return resolved, steps, decisions

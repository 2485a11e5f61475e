"""`TrainConfig`: the typed recipe of one training run (YAML file + flags + `--set a.b=c`).

Every key has a default except `model`, `data` and `output_dir`, so a run works from flags alone:
`embedforge train --model M --data train.jsonl --output DIR`.
"""

from __future__ import annotations

import os
from typing import Literal

from pydantic import ConfigDict, Field, field_validator, model_validator

from embedforge.config import StrictModel, load_config

LOSS_TERMS = ("hard", "qq", "dd", "qd")


class FiniteModel(StrictModel):
    """A train config section whose numbers must be finite: `lr: .inf` or a NaN temperature would
    train to NaN weights."""

    model_config = ConfigDict(allow_inf_nan=False)


class LoraSettings(FiniteModel):
    """peft LoRA; `target_modules: all-linear` adapts every linear layer except the output head."""

    rank: int = Field(16, gt=0)
    alpha: float = Field(32.0, gt=0)
    dropout: float = Field(0.0, ge=0, lt=1)
    target_modules: str | list[str] = "all-linear"


class DatasetSettings(FiniteModel):
    """One training file or dataset. Rows carry `query`, `positive`, optional `negatives` (list of
    strings), `instruction` and `dataset`; rows with different `dataset` values become separate
    mixing sources (each batch comes from one source).

    path: a .jsonl file, a .parquet file, a folder written by `datasets.Dataset.save_to_disk`, or
        `hf:NAME[:SPLIT]` for a Hub dataset (memory-mapped by `datasets`).
    name: source name (default: the row's `dataset` field, else the file name without extension).
    instruction: query instruction for rows that carry none (null: queries go in bare).
    num_negatives: hard negatives per row in a batch; rows with more are subsampled, rows with fewer
        are padded and masked. 0 disables hard negatives for this dataset.
    weight: multiplies the source size before the mixing temperature is applied.
    """

    path: str
    name: str | None = None
    instruction: str | None = None
    num_negatives: int = Field(7, ge=0)
    weight: float = Field(1.0, gt=0)


LOSS_PRESETS: dict[str, dict] = {
    # In-batch InfoNCE (sentence-transformers' MNRL objective): each query against its positive, its
    # hard negatives and every other row's documents. The default: measured best on real held-out
    # pairs for an encoder and a decoder (bench/results/train_defaults_sweep.md).
    "infonce": {"terms": ["hard", "qd"], "margin": None, "temperature": 0.05},
    # The Qwen3-Embedding report's Eq. 1: all four terms, false-negative margin 0.1, ms-swift's tau 0.1.
    "qwen3": {"terms": list(LOSS_TERMS), "margin": 0.1, "temperature": 0.1},
}


class DistillSettings(FiniteModel):
    """Distillation from a reranker teacher into the embedder (GPL-style pseudo-labels), added to the
    InfoNCE. It reads each row's `teacher_scores` (data_synth.mine with a teacher writes them); rows
    or scores without them contribute nothing to this term. Losses and their scales: train/distill.py."""

    kind: Literal["margin_mse", "kl"] = Field(
        description="margin_mse: the student's margin (positive minus each hard negative, in cos/tau logits) "
        "regresses onto the teacher's (Hofstaetter et al. 2020, GPL's objective), so the teacher's graded view of "
        "how much better the positive is reaches the student; kl: KL(teacher || student) over each row's positive "
        "and hard negatives (RocketQAv2), which matches only the teacher's ranking distribution")
    weight: float = Field(1.0, gt=0, description="multiplies the distillation loss before it is added to the "
                          "InfoNCE: margin-MSE grows with the square of the margins, so 1 / variance of the scaled "
                          "teacher margins puts it on the InfoNCE's scale (bench/distill_gpl.py); KL is already on "
                          "it at 1")
    teacher_temperature: float | Literal["auto"] = Field(
        "auto", description="T_t, teacher score units per student logit (the teacher's scores are divided by it): "
        "a reranker's log-odds margins are routinely 5-10 while cos/tau margins are a few units. auto: at setup, "
        "std(teacher margins) / std(base student margins) over the usable pairs of a seeded sample of training "
        "rows (train.distill.matching_teacher_temperature), logged with the other decisions")
    infonce: bool = Field(True, description="false: train on the distillation loss alone (GPL's objective); the "
                          "InfoNCE is still computed, without gradient, for the log and the collapse guard")

    @field_validator("teacher_temperature")
    @classmethod
    def _positive(cls, value: float | str) -> float | str:
        if not isinstance(value, str) and not value > 0:
            raise ValueError("must be > 0 or auto")
        return value


class LossSettings(FiniteModel):
    """Embedding: Qwen3 improved InfoNCE (+ Matryoshka). Reranker: point-wise or list-wise yes/no.

    `preset` fills `terms`, `margin` and `temperature` where the recipe does not set them:
    `infonce` (default) or `qwen3` (report Eq. 1); an explicit key always wins, so
    `{preset: qwen3, temperature: 0.05}` is Eq. 1 at tau 0.05."""

    preset: Literal["infonce", "qwen3"] = Field(
        "infonce", description="infonce: terms [hard, qd], no margin, tau 0.05; qwen3: Eq. 1, margin 0.1, tau 0.1")
    temperature: float = Field(0.05, gt=0)
    terms: list[Literal["hard", "qq", "dd", "qd"]] = Field(default_factory=lambda: ["hard", "qd"])
    margin: float | None = None
    mask_duplicates: bool = True
    exempt_hard_negatives_from_margin: bool = False
    matryoshka_dims: list[int] | None = None
    matryoshka_weights: list[float] | None = None
    distill: DistillSettings | None = Field(
        None, description="embedding task: add a reranker teacher's distillation loss (rows' teacher_scores); "
        "null: InfoNCE only. Applies to the full-width embeddings, not to each Matryoshka width")
    reranker: Literal["pointwise", "listwise"] = "pointwise"
    listwise_temperature: float = Field(1.0, gt=0)

    @model_validator(mode="after")
    def _apply_preset(self) -> LossSettings:
        for key, value in LOSS_PRESETS[self.preset].items():
            if key not in self.model_fields_set:
                self.__dict__[key] = list(value) if isinstance(value, list) else value  # no re-validation loop
        return self

    @model_validator(mode="after")
    def _matryoshka_pairs(self) -> LossSettings:
        if self.matryoshka_weights is not None and (
            self.matryoshka_dims is None or len(self.matryoshka_weights) != len(self.matryoshka_dims)
        ):
            raise ValueError("matryoshka_weights needs matryoshka_dims with one weight per width")
        return self


class EvalSettings(FiniteModel):
    """Periodic retrieval evaluation on a BEIR folder; the best model is exported to DIR/best."""

    data: str | None = None
    split: str = "dev"
    steps: int = Field(0, ge=0, description="evaluate every N steps (0: only at the end)")
    metric: str = "ndcg_at_10"
    instruction: str | None = None
    dim: int | None = None
    batch_size: int = Field(32, gt=0)


class TrainConfig(FiniteModel):
    """A training run. `batch_size` is the GLOBAL contrastive batch in rows (query + positive +
    negatives), split evenly over processes; `mini_batch_size` (texts per forward, GradCache) bounds
    memory, so the batch is limited by time, not memory."""

    model: str
    task: Literal["embedding", "reranker"] = "embedding"
    data: list[DatasetSettings] = Field(min_length=1)
    output_dir: str
    method: Literal["auto", "lora", "full"] = Field(
        "auto", description="auto: full fine-tuning up to full_max_parameters backbone parameters, LoRA above "
        "(full fine-tuning learned more than LoRA r16 for MiniLM at the same steps, bench/results/train_defaults_sweep.md; "
        "AdamW's state makes full fine-tuning cost ~16 bytes a parameter)")
    full_max_parameters: int = Field(1_000_000_000, gt=0, description="largest backbone that method auto fine-tunes "
                                     "fully")
    lora: LoraSettings = Field(default_factory=LoraSettings)
    loss: LossSettings = Field(default_factory=LossSettings)

    batch_size: int = Field(32, gt=0, description="global rows per step; capped to the smallest dataset, so a small "
                            "one still trains (the cap is logged)")
    mini_batch_size: int | None = Field(None, gt=0, description="at most this many texts per forward")
    max_tokens_per_forward: int | Literal["auto"] | None = Field(
        "auto", description="at most this many padded tokens per forward; a larger step runs in chunks with "
        "GradCache (the same gradients); auto: half the memory free at start over an estimate of the "
        "activations a token keeps (train/chunking.py); null: no limit")
    max_length: int = Field(512, gt=0)
    packing: bool | Literal["auto"] = Field(
        "auto", description="decoders: put short texts into the padding of long ones (each attends only to "
        "itself), same loss and gradients with fewer positions computed; auto packs when that computes fewer "
        "positions; encoders always pad")
    mixing_temperature: float = Field(1.0, gt=0)

    lr: float | None = Field(None, gt=0, description="peak learning rate; null: by method and size (full 5e-5, 2e-5 from "
                             "100M parameters; lora 2e-4), see bench/results/train_defaults_sweep.md")
    weight_decay: float = Field(0.0, ge=0)
    scheduler: Literal["linear", "cosine", "constant", "constant_with_warmup"] = "linear"
    warmup_steps: int | None = Field(None, ge=0, description="null: 10% of the planned steps")
    max_steps: int | None = Field(None, gt=0, description="planned steps; null: epochs over the data, at least "
                                  "min_steps")
    epochs: float = Field(1.0, gt=0)
    min_steps: int = Field(50, ge=1, description="without max_steps, train at least this many steps (more epochs "
                           "over small data): one epoch of 40 rows is 1 step, which learns nothing")
    max_grad_norm: float | None = Field(1.0, gt=0)

    append_eos: bool | None = Field(
        None, description="decoders with last-token pooling: pool at an appended EOS (true) or at the last real token "
        "(false). null: what an embedder folder declares (Qwen3-Embedding: EOS); for a language model that is not an "
        "embedder yet, false: its EOS is a document separator whose state ignores the text, and training from it "
        "collapses (bench/train_decoder_ablation.py)")
    dtype: Literal["float32", "bfloat16", "auto"] = "float32"
    mixed_precision: Literal["no", "bf16", "fp16"] | None = None
    attn_implementation: Literal["sdpa", "eager", "flash_attention_2"] = "sdpa"
    gradient_checkpointing: bool = False

    save_steps: int = Field(500, ge=0)
    save_total_limit: int = Field(2, ge=1)
    checkpoint_model: bool = Field(True, description="also write a loadable model (LoRA: the adapter) into each "
                                   "checkpoint, CHECKPOINT/model, for merging checkpoints and evaluating them")
    logging_steps: int = Field(1, gt=0)
    report_to: list[Literal["jsonl", "wandb", "tensorboard"]] = Field(default_factory=lambda: ["jsonl"])
    project: str = "embedforge"
    progress_bar: bool = True
    eval: EvalSettings = Field(default_factory=EvalSettings)

    seed: int = 42
    resume: str = Field("auto", description="auto (latest complete checkpoint), never, or a checkpoint folder")

    @field_validator("output_dir", "model")
    @classmethod
    def _not_blank(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("must not be empty")
        return value

    @model_validator(mode="after")
    def _consistent(self) -> TrainConfig:
        names = [d.name for d in self.data if d.name]
        if len(names) != len(set(names)):
            raise ValueError(f"dataset names must be unique, got {names}")
        if self.task == "embedding" and self.loss.matryoshka_dims and any(d <= 0 for d in self.loss.matryoshka_dims):
            raise ValueError("matryoshka_dims must be positive")
        if self.task != "embedding" and self.loss.distill is not None:
            raise ValueError("loss.distill trains an embedder from a reranker teacher; the reranker task has none")
        return self


def load_train_config(path: str | os.PathLike | None = None, overrides: list[str] | None = None,
                      flags: dict | None = None) -> TrainConfig:
    """Recipe YAML (optional) < flags < `--set` overrides, validated with file and key in errors."""
    return load_config(TrainConfig, path, overrides=overrides, base=flags or {})

"""`MergeConfig`: what to merge and how, validated where it is built.

The input and output folders may be left unset so that a recipe can embed this class and let the
pipeline fill them in; `merge()` then refuses to run until they are set (`check_ready`).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from embedforge.config import StrictModel
from embedforge.errors import ConfigError
from embedforge.merge.schedule import Schedule, TSchedule
from embedforge.merge.weights import DOT_THRESHOLD, normalize_weights

METHODS = ("slerp", "lerp", "linear")
DEFAULT_MAX_SHARD_BYTES = 4 * 1024**3
DTYPE_NAMES = ("float32", "bfloat16", "float16")
_SIZE_UNITS = {"KIB": 1024, "MIB": 1024**2, "GIB": 1024**3, "KB": 10**3, "MB": 10**6, "GB": 10**9, "B": 1}

Anchors = float | str | list[float]


def parse_size(text: str | int) -> int:
    """'4GB', '500MB', '2GiB' or a byte count -> bytes (decimal units, as transformers uses them)."""
    if isinstance(text, int):
        size = text
    else:
        value = str(text).strip().upper()
        number, factor = value, 1
        for unit, unit_factor in _SIZE_UNITS.items():
            if value.endswith(unit):
                number, factor = value[: -len(unit)], unit_factor
                break
        try:
            size = int(float(number) * factor)
        except ValueError:
            raise ValueError(f"cannot read size {text!r}; use e.g. 4GB or 500MB") from None
    if size <= 0:
        raise ValueError(f"size must be positive, got {text!r}")
    return size


def _same_path(a: str, b: str) -> bool:
    return Path(a).resolve() == Path(b).resolve()


class MergeConfig(StrictModel):
    """What to merge and how.

    - slerp: two models at t, or N models as a weighted spherical average;
    - lerp: two models, (1 - t) A + t B;
    - linear: the weighted average of N >= 1 models (one LoRA adapter alone: folded into its base).

    With `base`, the merge combines the deltas model - base: the variant in which slerp differs
    from lerp for checkpoints of one run. Building the config checks everything that does not
    touch the disk and raises `ConfigError`; `merge()` checks the folders.

    Example:
        >>> MergeConfig(models=["ckpt-1000", "ckpt-2000"], base="base", t=0.5, output="merged")
    """

    models: list[str] = Field(default_factory=list, description="checkpoint folders or peft LoRA adapter folders")
    output: str | None = Field(None, description="folder to create (required unless dry_run)")
    method: Literal["slerp", "lerp", "linear"] = Field("slerp", description="slerp, lerp or linear")
    t: Anchors | None = Field(None, description="weight of the second model: 0.5, or anchors over depth '0,0.5,1' "
                                                "(unset: 0.5 when weights are not given either)")
    weights: list[float] | None = Field(None, description="one non-negative weight per model (excludes t)")
    base: str | None = Field(None, description="common starting checkpoint: merge the deltas from it")
    schedule_attention: Anchors | None = Field(None, description="t anchors over depth for attention tensors")
    schedule_mlp: Anchors | None = Field(None, description="t anchors over depth for MLP tensors")
    dtype: Literal["float32", "bfloat16", "float16"] | None = Field(None, description="output dtype "
                                                                                      "(unset: the first model's)")
    lora_base: str | None = Field(None, description="base folder for LoRA adapters (unset: their recorded base)")
    overwrite: bool = Field(False, description="replace an existing output folder")
    max_shard_bytes: int = Field(DEFAULT_MAX_SHARD_BYTES, description="largest output shard, bytes or 4GB/500MB")
    dot_threshold: float = Field(DOT_THRESHOLD, description="|cos| above which slerp is lerp")
    report: str | None = Field(None, description="also write the merge report (JSON) here")
    dry_run: bool = Field(False, description="only report the cosines; write no model")
    show_progress: bool = Field(True, description="progress bar")


    @field_validator("models", mode="before")
    @classmethod
    def _model_paths(cls, value: Any) -> Any:
        if isinstance(value, (str, os.PathLike)):
            return [os.fspath(value)]
        return [os.fspath(v) if isinstance(v, os.PathLike) else v for v in value] if value is not None else value

    @field_validator("output", "base", "lora_base", "report", mode="before")
    @classmethod
    def _path(cls, value: Any) -> Any:
        return os.fspath(value) if isinstance(value, os.PathLike) else value

    @field_validator("method", mode="before")
    @classmethod
    def _known_method(cls, value: Any) -> Any:
        if value not in METHODS:
            raise ValueError(f"unknown merge method {value!r}; choose one of {', '.join(METHODS)}")
        return value

    @field_validator("dtype", mode="before")
    @classmethod
    def _known_dtype(cls, value: Any) -> Any:
        if value is not None and value not in DTYPE_NAMES:
            raise ValueError(f"unknown dtype {value!r}; choose one of {', '.join(DTYPE_NAMES)}")
        return value

    @field_validator("max_shard_bytes", mode="before")
    @classmethod
    def _size(cls, value: Any) -> int:
        return parse_size(value)

    @field_validator("t", "schedule_attention", "schedule_mlp")
    @classmethod
    def _anchors(cls, value: Anchors | None) -> Anchors | None:
        if value is not None:
            try:
                Schedule.parse(value)
            except ConfigError as exc:
                raise ValueError(str(exc)) from None
        return value

    @field_validator("weights")
    @classmethod
    def _weights(cls, value: list[float] | None) -> list[float] | None:
        if value is not None:
            normalize_weights(value)  # raises ValueError on negative or all-zero weights
        return value

    @field_validator("dot_threshold")
    @classmethod
    def _threshold(cls, value: float) -> float:
        if not 0.0 < value <= 1.0:
            raise ValueError(f"dot_threshold must lie in (0, 1], got {value}")
        return value

    @model_validator(mode="after")
    def _consistent(self) -> MergeConfig:
        n = len(self.models)
        if self.t is not None and self.weights is not None:
            raise ValueError("give either t or weights, not both")
        scheduled = self.t is not None or self.schedule_attention is not None or self.schedule_mlp is not None
        if scheduled and self.weights is not None:
            raise ValueError("layer schedules and weights cannot be combined")
        if n:  # unset in a recipe until the pipeline fills it in
            if self.method == "lerp" and n != 2:
                raise ValueError(f"lerp merges exactly two models, got {n}; use method linear for more")
            if self.method == "slerp" and n < 2:
                raise ValueError("slerp needs at least two models")
            if self.weights is not None and len(self.weights) != n:
                raise ValueError(f"{len(self.weights)} weights for {n} models")
            if scheduled and n != 2:
                raise ValueError(f"t and layer schedules need exactly two models (got {n}); use weights instead")
        self._output_is_not_an_input()
        return self


    def _output_is_not_an_input(self) -> None:
        if self.output is None:
            return
        inputs = [*self.models, *([self.base] if self.base else []), *([self.lora_base] if self.lora_base else [])]
        if any(_same_path(self.output, p) for p in inputs):
            raise ValueError(f"the output folder {self.output} is one of the inputs; choose another")
        if self.report is not None and any(_same_path(self.report, p) for p in inputs):
            raise ValueError(f"the report file {self.report} is one of the inputs; choose another")

    def check_ready(self) -> None:
        """The checks that need the inputs and output set (a recipe may leave them to the pipeline)."""
        if not self.models:
            raise ConfigError("merge: no models to merge (set `models`)")
        if self.output is None and not self.dry_run:
            raise ConfigError("merge: an output folder is required (set `output`, or `dry_run`)")
        try:
            self._output_is_not_an_input()
        except ValueError as exc:
            raise ConfigError(f"merge: {exc}") from None

    def normalized_weights(self) -> list[float] | None:
        return normalize_weights(self.weights) if self.weights is not None else None

    def t_schedule(self) -> TSchedule | None:
        """The per-tensor t for two models, or None when N-model weights are used."""
        if self.weights is not None or len(self.models) != 2:
            return None
        parse = Schedule.parse
        return TSchedule(
            default=parse(0.5 if self.t is None else self.t),
            attention=parse(self.schedule_attention) if self.schedule_attention is not None else None,
            mlp=parse(self.schedule_mlp) if self.schedule_mlp is not None else None,
        )

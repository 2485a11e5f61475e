"""The merge stage: several checkpoints (full folders or LoRA adapters) in, one model folder out.

`merge` streams tensor by tensor: for each tensor name it reads that tensor from every
input, computes the merge coefficients from their Gram matrix (methods.py), writes the result into
the output shard (stream.py), records the cosines (diagnostics.py), and lets go of it. The output
folder appears only when complete (embedforge.io.atomic_dir).
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from pydantic import Field

from embedforge.errors import InputError
from embedforge.io import atomic_dir, output_lock, publishable, write_json
from embedforge.merge import methods
from embedforge.merge.config import MergeConfig
from embedforge.merge.diagnostics import CosineTracker
from embedforge.merge.lora import LoraCheckpoint, is_lora_adapter, resolve_lora_base
from embedforge.merge.schedule import TSchedule, num_layers
from embedforge.merge.stream import (
    SafetensorsCheckpoint,
    ShardedWriter,
    TensorInfo,
    TensorSource,
    check_compatible,
    copy_support_files,
)
from embedforge.outcome import StageOutcome
from embedforge.provenance import read_provenance, write_provenance

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
REPORT_NAME = "merge_report.json"


class MergeOutcome(StageOutcome):
    """What was merged, where it went, and how alike the inputs were (see diagnostics.py)."""

    output: str | None = Field(None, description="the merged model folder; None for a dry run")
    method: str
    models: list[str]
    base: str | None
    weights: list[float] | None = Field(description="normalised to sum to 1; None when t is used")
    t: dict[str, Any] | None = Field(description="anchors of the default, attention and MLP schedules")
    dtype: str | None
    tensors: int
    parameters: int
    bytes_written: int
    files: list[str]
    slerp_fallback_fraction: float | None = Field(
        description="share of parameters where slerp fell back to lerp (None for lerp/linear)")
    dropped_remote_code: list[str] = Field(default_factory=list)
    seconds: float
    cosines: dict[str, Any]

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")


def open_model(path: Path, lora_base: Path | None = None) -> TensorSource:
    """A checkpoint folder, or a LoRA adapter folder applied to its base on the fly."""
    if is_lora_adapter(path):
        return LoraCheckpoint(path, SafetensorsCheckpoint(resolve_lora_base(path, lora_base)))
    return SafetensorsCheckpoint(path)


def _merge_tensor(
    name: str,
    tensors: list[torch.Tensor],
    base: torch.Tensor | None,
    weights: list[float],
    config: MergeConfig,
    out_dtype: torch.dtype,
    tracker: CosineTracker,
    sources: Sequence[TensorSource],
) -> tuple[torch.Tensor, bool]:
    """One merged tensor and whether slerp fell back to linear on it."""
    if not tensors[0].is_floating_point():
        for source, tensor in zip(sources[1:], tensors[1:]):
            if not torch.equal(tensor, tensors[0]):
                raise InputError(
                    f"non-float tensor {name!r} differs from {sources[0].path}; it cannot be averaged",
                    path=str(source.path),
                )
        return tensors[0], False
    gram = methods.gram_matrix(tensors, base=base)
    tracker.add(name, gram, tensors[0].numel())
    fallback = False
    if config.method == "slerp":
        coefficients, fallback = methods.spherical_coefficients(
            weights, gram, dot_threshold=config.dot_threshold
        )
    else:
        coefficients = weights
    if base is not None:
        return methods.combine(
            [base, *tensors], methods.with_base(coefficients), out_dtype=out_dtype
        ), fallback
    return methods.combine(tensors, coefficients, out_dtype=out_dtype), fallback


def merge(config: MergeConfig, on_tensor: Callable[[str], None] | None = None) -> MergeOutcome:
    """Merge `config.models` into `config.output`; `on_tensor(name)` is called after each tensor.

    The output folder appears only when complete; it holds the merged weights, the first model's
    config and tokenizer files (never its remote code), `merge_report.json` and `provenance.json`
    (the inputs' trail plus this merge).

    Example:
        >>> outcome = merge(MergeConfig(models=["ckpt-1000", "ckpt-2000"], base="base", t=0.5, output="merged"))
        >>> outcome.cosines["parallel_fraction"]  # share of parameters where slerp was just lerp
    """
    if config.output is None or config.dry_run:
        return _merge(config, on_tensor)
    with output_lock(config.output):  # one writer per output: a second merge into it is refused
        return _merge(config, on_tensor)


def _merge(config: MergeConfig, on_tensor: Callable[[str], None] | None) -> MergeOutcome:
    config.check_ready()
    started = time.perf_counter()
    output = Path(config.output) if config.output is not None else None
    if output is not None and not config.dry_run and output.exists() and not config.overwrite:
        raise InputError("output folder exists; pass --overwrite to replace it", path=str(output))
    lora_base = Path(config.lora_base) if config.lora_base is not None else None
    sources = [open_model(Path(path), lora_base) for path in config.models]
    base_source = open_model(Path(config.base), lora_base) if config.base is not None else None
    warnings = check_compatible([*sources, *([base_source] if base_source is not None else [])])
    lora_bases = sorted({str(s.base.path.resolve()) for s in sources if isinstance(s, LoraCheckpoint)})
    if len(lora_bases) > 1:
        warnings.append(f"the LoRA adapters were applied to different base folders: {', '.join(lora_bases)}")
    infos = sources[0].infos()
    n_layers = num_layers(infos)
    schedule = config.t_schedule()
    weights = config.normalized_weights()
    out_dtype = DTYPES[config.dtype] if config.dtype else None
    out_infos = [
        TensorInfo(
            name,
            info.shape,
            out_dtype if out_dtype is not None and info.dtype.is_floating_point else info.dtype,
        )
        for name, info in infos.items()
    ]
    tracker = CosineTracker(
        list(config.models),
        compared="deltas from base" if base_source is not None else "weights",
        dot_threshold=config.dot_threshold,
    )

    def run(writer: ShardedWriter | None) -> int:
        """Merge every tensor; returns the number of parameters where slerp fell back to lerp."""
        from tqdm.auto import tqdm

        fallback_parameters = 0
        for info in tqdm(out_infos, desc="merge", unit="tensor", disable=not config.show_progress):
            tensors = [source.read(info.name) for source in sources]
            base = base_source.read(info.name) if base_source is not None else None
            if schedule is not None:
                t = schedule.t_for(info.name, n_layers)
                tensor_weights = [1.0 - t, t]
            else:
                tensor_weights = weights if weights is not None else [1.0 / len(sources)] * len(sources)
            merged, fallback = _merge_tensor(
                info.name, tensors, base, tensor_weights, config, info.dtype, tracker, sources
            )
            fallback_parameters += merged.numel() if fallback else 0
            if writer is not None:
                writer.write(info.name, merged)
            del tensors, base, merged
            if on_tensor is not None:
                on_tensor(info.name)
        return fallback_parameters

    def outcome(files: list[str], bytes_written: int, fallback_parameters: int, dropped: list[str]) -> MergeOutcome:
        return _outcome(config, schedule, weights, tracker, files, bytes_written, fallback_parameters,
                        started, warnings, out_infos, dropped)

    if config.dry_run:
        result = outcome([], 0, run(None), [])
    else:
        with atomic_dir(output, overwrite=config.overwrite) as tmp:
            with ShardedWriter(tmp, out_infos, config.max_shard_bytes) as writer:
                fallback_parameters = run(writer)
                files = writer.finish()
            copied = copy_support_files(sources[0].support_dir, tmp)
            warnings += copied.notes
            if copied.dropped_remote_code:
                warnings.append(f"remote code of {sources[0].support_dir} not copied "
                                f"({', '.join(copied.dropped_remote_code)}); the merged model loads without it")
            if config.dtype is not None:
                _set_config_dtype(tmp / "config.json", config.dtype)
            result = outcome(files, writer.bytes_written, fallback_parameters, copied.dropped_remote_code)
            write_json(tmp / REPORT_NAME, result.to_dict())
            previous = read_provenance(*config.models, config.base)
            write_provenance(tmp, previous, "merge", **provenance_record(result))
            publishable(tmp)
    if config.report is not None:
        write_json(config.report, result.to_dict())
        os.chmod(config.report, 0o644)
    return result


def provenance_record(outcome: MergeOutcome) -> dict[str, Any]:
    """The merge's entry in the data trail: the recipe, not the per-tensor diagnostics."""
    return {
        "method": outcome.method,
        "t": outcome.t,
        "weights": outcome.weights,
        "models": outcome.models,
        "base": outcome.base,
        "dtype": outcome.dtype,
        "parallel_fraction": outcome.cosines.get("parallel_fraction"),
        "slerp_fallback_fraction": outcome.slerp_fallback_fraction,
        "warnings": outcome.warnings,
    }


def _set_config_dtype(path: Path, dtype: str) -> None:
    if not path.exists():
        return
    config = json.loads(path.read_text(encoding="utf-8"))
    config["dtype"] = dtype
    if "torch_dtype" in config:
        config["torch_dtype"] = dtype
    path.write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")


def _outcome(
    config: MergeConfig,
    schedule: TSchedule | None,
    weights: list[float] | None,
    tracker: CosineTracker,
    files: list[str],
    bytes_written: int,
    fallback_parameters: int,
    started: float,
    warnings: list[str],
    infos: list[TensorInfo],
    dropped_remote_code: list[str],
) -> MergeOutcome:
    cosines = tracker.summary()
    parameters = sum(info.numel for info in infos)
    if config.method == "slerp" and config.base is None and cosines["parallel_fraction"] > 0.5:
        warnings = [
            *warnings,
            (
                f"slerp equals lerp on {cosines['parallel_fraction']:.0%} of parameters: the checkpoints are nearly "
                "parallel; pass --base <their common starting checkpoint> to slerp the deltas instead"
            ),
        ]
    return MergeOutcome(
        method=config.method,
        models=list(config.models),
        base=config.base,
        output=None if config.dry_run else config.output,
        weights=weights,
        t=(
            {
                "default": list(schedule.default.anchors),
                "attention": list(schedule.attention.anchors) if schedule.attention else None,
                "mlp": list(schedule.mlp.anchors) if schedule.mlp else None,
            }
            if schedule is not None
            else None
        ),
        dtype=config.dtype,
        tensors=len(infos),
        parameters=parameters,
        bytes_written=bytes_written,
        files=files,
        slerp_fallback_fraction=(
            round(fallback_parameters / max(parameters, 1), 6) if config.method == "slerp" else None
        ),
        dropped_remote_code=dropped_remote_code,
        seconds=round(time.perf_counter() - started, 3),
        cosines=cosines,
        warnings=list(warnings),
    )

"""`embedforge filter`: read synthesis output, run the quality gates in order (cheap lexical gates
first, teacher gates last), and write kept rows, dropped rows with reasons, and the coverage report."""

from __future__ import annotations

import json
import os
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import Field, field_validator

from embedforge.config import StrictModel
from embedforge.data_synth.contamination import ContaminationIndex, contamination_gate
from embedforge.data_synth.gates import (
    GateResult,
    Row,
    copy_gate,
    cosine_gate,
    instruction_aware,
    near_duplicate_gate,
    roundtrip_gate,
)
from embedforge.data_synth.report import coverage_markdown
from embedforge.errors import ConfigError, InputError
from embedforge.io import atomic_dir, check_output, iter_jsonl, output_lock, read_json_file, require_str
from embedforge.outcome import StageOutcome
from embedforge.provenance import read_provenance, write_provenance

# A gate that drops more than this share of the rows it sees is named in a warning.
HEAVY_DROP = 0.9


class FilterConfig(StrictModel):
    """Everything `filter_pairs` needs; paths are filled by the caller (the CLI or a recipe)."""

    input: list[str] | None = Field(default=None, description="synth output folder(s) or JSONL file(s)")
    output: str | None = Field(default=None, description="output folder")
    overwrite: bool = Field(default=False, description="replace an existing output folder")
    teacher: str | None = Field(default=None, description="teacher embedder for the cosine and round-trip gates")
    device: str | None = None
    copy_max_ratio: float | None = Field(default=0.6, ge=0, le=1, description="None disables the copy gate")
    copy_ngram: int = Field(default=4, ge=1)
    near_dup_threshold: float | None = Field(default=0.85, gt=0, le=1)
    eval_sets: list[str] = Field(default_factory=list, description="BEIR folders / JSONL / text files")
    contamination_ngram: int = Field(default=13, ge=1)
    cosine_threshold: float | str | None = Field(
        default="auto",
        description="teacher cosine gate: a number, 'auto' (a percentile of the teacher's scores of queries "
        "against passages not theirs) or none",
    )
    cosine_percentile: float = Field(default=95.0, gt=0, lt=100, description="the percentile 'auto' uses")
    roundtrip_k: int | None = Field(default=10, ge=1)
    teacher_instructions: bool | None = Field(
        default=None, description="embed queries with their instruction; default: only if the teacher is "
        "instruction-aware (last-token pooling or a stored query prompt)"
    )
    batch_size: int = Field(default=32, ge=1)

    @field_validator("cosine_threshold", mode="before")
    @classmethod
    def _threshold(cls, value):
        if isinstance(value, str) and value.strip().lower() != "auto":
            try:
                value = float(value)
            except ValueError:
                raise ValueError("expected a number, 'auto' or none") from None
        if isinstance(value, str):
            return "auto"
        if value is not None and not -1 <= float(value) <= 1:
            raise ValueError("a cosine threshold lies in [-1, 1]")
        return value


@dataclass
class GateCounts:
    """What the gates did: the kept rows, the dropped ones with reasons, and per-gate counts."""

    kept: list[Row]
    dropped: list[tuple[Row, str]] = field(default_factory=list)
    drops: dict[str, Counter] = field(default_factory=dict)  # gate -> Counter of reason kinds
    rows_in: int = 0
    order: list[tuple[str, int, int]] = field(default_factory=list)  # (gate, rows in, rows out)
    thresholds: dict[str, float] = field(default_factory=dict)  # calibrated values
    notes: list[str] = field(default_factory=list)

    def emptied_by(self) -> str | None:
        """The gate that dropped the last rows, when none are left."""
        if self.kept or not self.rows_in:
            return None
        return next((gate for gate, n_in, n_out in self.order if n_in and not n_out), None)


class FilterOutcome(StageOutcome):
    """What `filter_pairs` kept (`output` is the folder) and what each gate dropped."""

    rows_in: int = 0
    rows_kept: int = 0
    dropped: dict[str, int] = Field(default_factory=dict)
    cosine_threshold: float | None = None
    teacher_instructions: bool | None = None
    emptied_by: str | None = None


def read_pairs(inputs: Sequence[str | os.PathLike]) -> tuple[list[Row], list[dict[str, Any]]]:
    """Rows from synthesis output folders (their `pairs-*.jsonl` shards), filter output folders (their
    `pairs.jsonl`, not `dropped.jsonl`) or JSONL files, and the run
    reports found in the folders' manifests. A row of the wrong shape is named by file, line and field."""
    rows: list[Row] = []
    reports: list[dict[str, Any]] = []
    for source in inputs:
        source = Path(source)
        if source.is_dir():
            # synth shards, else a filter output's pairs.jsonl (never its dropped.jsonl), else any JSONL
            files = (sorted(source.glob("pairs-*.jsonl")) or sorted(source.glob("pairs.jsonl"))
                     or [p for p in sorted(source.glob("*.jsonl")) if not p.name.startswith("dropped")])
            if not files:
                raise InputError("no pairs-*.jsonl shards in this folder", path=str(source))
            for manifest in sorted(source.glob("manifest-*.json")):
                report = read_json_file(manifest)
                if not isinstance(report, dict) or not isinstance(report.get("report"), dict):
                    raise InputError("not a synth manifest (no 'report')", path=str(manifest), field="report")
                reports.append(report["report"])
        else:
            files = [source]
        for path in files:
            for line, obj in iter_jsonl(path):
                check_pair(obj, str(path), line)
                rows.append(obj)
    return rows, reports


def check_pair(obj: dict[str, Any], path: str, line: int) -> None:
    """The fields a training pair must have, of the types training reads (embedforge.train.data)."""
    for name in ("query", "positive"):
        require_str(obj, name, path=path, line=line)
    negatives = obj.get("negatives")
    if negatives is not None:
        if not isinstance(negatives, list):
            raise InputError(f"expected a list of strings, got {type(negatives).__name__}", path=path, line=line,
                             field="negatives")
        for k, negative in enumerate(negatives):
            if not isinstance(negative, str):
                raise InputError(f"element {k}: expected a string, got {type(negative).__name__}", path=path,
                                 line=line, field="negatives")
    for name in ("instruction", "dataset", "task"):
        value = obj.get(name)
        if value is not None and not isinstance(value, str):
            raise InputError(f"expected a string or null, got {type(value).__name__}", path=path, line=line,
                             field=name)


def needs_teacher(config: FilterConfig) -> bool:
    return config.cosine_threshold is not None or config.roundtrip_k is not None


def filter_rows(rows: Sequence[Row], config: FilterConfig, embedder=None) -> GateCounts:
    """Run the gates in order over `rows`; `embedder` is the teacher (needed by the model gates)."""
    if needs_teacher(config) and embedder is None:
        raise ConfigError(
            "the cosine and round-trip gates need a teacher embedder (--teacher), "
            "or disable them (--threshold none --roundtrip-k none)"
        )
    outcome = GateCounts(kept=list(rows), rows_in=len(rows))
    instructions = teacher_instructions(config, embedder)

    def apply(result: GateResult) -> None:
        outcome.order.append((result.name, len(outcome.kept), len(result.kept)))
        outcome.kept = result.kept
        outcome.dropped.extend(result.dropped)
        outcome.drops[result.name] = Counter(reason.split(":")[0] for _, reason in result.dropped)
        if result.threshold is not None:
            outcome.thresholds[result.name] = result.threshold
        if result.note:
            outcome.notes.append(f"{result.name}: {result.note}")

    if config.copy_max_ratio is not None:
        apply(copy_gate(outcome.kept, config.copy_max_ratio, config.copy_ngram))
    if config.eval_sets:
        index = ContaminationIndex.from_paths(config.eval_sets, n=config.contamination_ngram)
        apply(contamination_gate(outcome.kept, index))
    if config.near_dup_threshold is not None:
        apply(near_duplicate_gate(outcome.kept, config.near_dup_threshold))
    if config.cosine_threshold is not None:
        auto = config.cosine_threshold == "auto"
        apply(
            cosine_gate(
                outcome.kept,
                embedder,
                None if auto else config.cosine_threshold,
                instructions,
                config.batch_size,
                percentile=config.cosine_percentile,
            )
        )
    if config.roundtrip_k is not None:
        apply(roundtrip_gate(outcome.kept, embedder, config.roundtrip_k, instructions, batch_size=config.batch_size))
    return outcome


def teacher_instructions(config: FilterConfig, embedder) -> bool:
    """Whether queries go to the teacher with their instruction (see FilterConfig)."""
    if config.teacher_instructions is not None:
        return config.teacher_instructions
    return embedder is not None and instruction_aware(embedder)


def write_filter_output(
    folder: str | os.PathLike,
    outcome: GateCounts,
    config: FilterConfig,
    run_reports: Sequence[dict[str, Any]] = (),
    overwrite: bool = False,
    trail: Callable[[Path], Any] | None = None,
) -> Path:
    """pairs.jsonl (kept), dropped.jsonl (with `drop_reason`), coverage.md, filter_report.json and,
    through `trail(folder)`, the provenance: all appear together or not at all."""
    with atomic_dir(folder, overwrite=overwrite) as tmp:
        with open(tmp / "pairs.jsonl", "w", encoding="utf-8") as fh:
            fh.writelines(json.dumps(row, ensure_ascii=False) + "\n" for row in outcome.kept)
        with open(tmp / "dropped.jsonl", "w", encoding="utf-8") as fh:
            fh.writelines(
                json.dumps({**row, "drop_reason": reason}, ensure_ascii=False) + "\n"
                for row, reason in outcome.dropped
            )
        (tmp / "coverage.md").write_text(
            coverage_markdown(
                outcome.kept,
                title="Synthetic data coverage (after the quality gates)",
                run_reports=run_reports,
                gate_drops=outcome.drops,
                rows_before_gates=outcome.rows_in,
                gate_thresholds=outcome.thresholds,
            ),
            encoding="utf-8",
        )
        summary = {
            "rows_in": outcome.rows_in,
            "rows_kept": len(outcome.kept),
            "dropped": {gate: dict(c) for gate, c in outcome.drops.items()},
            "gates": [{"gate": g, "rows_in": a, "rows_out": b} for g, a, b in outcome.order],
            "thresholds": outcome.thresholds,
            "config": config.model_dump(),
            "generation": list(run_reports),
        }
        (tmp / "filter_report.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
        if trail is not None:
            trail(tmp)
    return Path(folder)


def filter_pairs(config: FilterConfig) -> FilterOutcome:
    """Apply the quality gates to synthesised pairs and write kept rows, dropped rows with their
    reasons, the coverage report and `filter_report.json` into `config.output`.

    A run that keeps nothing, or a gate that drops most rows, is not an error: it is a warning in
    the outcome, naming the gate (and the threshold it used).
    """
    if not config.input:
        raise ConfigError("filter_pairs: `input` is not set (synth output folder(s) or JSONL file(s))")
    if not config.output:
        raise ConfigError("filter_pairs: `output` is not set (the folder to write kept pairs into)")
    if needs_teacher(config) and not config.teacher:
        raise ConfigError(
            "--teacher is required for the cosine and round-trip gates "
            "(or pass --threshold none --roundtrip-k none)"
        )
    check_output(config.output, [*config.input, *config.eval_sets, config.teacher], overwrite=config.overwrite)
    with output_lock(config.output):
        rows, reports = read_pairs(config.input)  # bad input fails before a teacher loads
        if not rows:
            raise InputError("no rows to filter", path=", ".join(config.input))
        embedder = None
        if config.teacher:
            from embedforge.data_synth.models import load_embedder

            embedder = load_embedder(config.teacher, config.device)
        counts = filter_rows(rows, config, embedder)
        outcome = FilterOutcome(
            output=config.output,
            rows_in=counts.rows_in,
            rows_kept=len(counts.kept),
            dropped={gate: sum(c.values()) for gate, c in counts.drops.items()},
            cosine_threshold=counts.thresholds.get("cosine"),
            teacher_instructions=teacher_instructions(config, embedder) if embedder is not None else None,
            emptied_by=counts.emptied_by(),
        )
        for note in counts.notes:
            outcome.warn(f"filter: {note}")
        _warn(outcome, counts)
        previous = read_provenance(*config.input)

        def trail(folder: Path) -> None:
            write_provenance(
                folder, previous, "filter",
                teacher=config.teacher,
                teacher_instructions=outcome.teacher_instructions,
                gates=[{"gate": g, "rows_in": a, "rows_out": b, "threshold": counts.thresholds.get(g)}
                       for g, a, b in counts.order],
                rows_in=counts.rows_in,
                rows_kept=len(counts.kept),
                warnings=outcome.warnings,
            )

        write_filter_output(config.output, counts, config, reports, overwrite=config.overwrite, trail=trail)
    return outcome


def _warn(outcome: FilterOutcome, counts: GateCounts) -> None:
    def gate_text(gate: str) -> str:
        used = counts.thresholds.get(gate)
        return f"{gate} gate (threshold {used:g})" if used is not None else f"{gate} gate"

    if outcome.rows_kept == 0:
        outcome.warn(f"filter kept 0 of {outcome.rows_in} rows: the {gate_text(outcome.emptied_by)} dropped "
                     "the last ones" if outcome.emptied_by else f"filter kept 0 of {outcome.rows_in} rows")
        return
    for gate, n_in, n_out in counts.order:
        if n_in and (n_in - n_out) / n_in > HEAVY_DROP:
            outcome.warn(f"filter: the {gate_text(gate)} dropped {n_in - n_out} of {n_in} rows")

"""Coverage report (markdown): how the synthetic rows spread over tasks, question types,
difficulties, languages and personas, what the generator failed on, and what each gate dropped.
A skewed mix (every query a `keywords` query, one persona chosen for everything) shows here
before it shows in a trained model.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Sequence
from typing import Any

from embedforge.data_synth.quality import quality_markdown

Row = dict[str, Any]
DIMENSIONS = (
    ("task", lambda r: r.get("task")),
    ("question type", lambda r: r.get("provenance", {}).get("sampled", {}).get("question_type")),
    ("difficulty", lambda r: r.get("provenance", {}).get("sampled", {}).get("difficulty")),
    ("language", lambda r: r.get("language")),
    (
        "persona",
        lambda r: (
            r.get("provenance", {}).get("sampled", {}).get("persona_id")
            or ("(free character)" if r.get("provenance", {}).get("sampled", {}).get("character") else None)
        ),
    ),
    ("length (words asked)", lambda r: r.get("provenance", {}).get("sampled", {}).get("length")),
)


def count_by(rows: Iterable[Row], key) -> Counter:
    return Counter(v for v in (key(r) for r in rows) if v is not None)


def _table(title: str, counts: Counter, total: int, limit: int = 25) -> list[str]:
    lines = [f"### {title}", "", f"| {title} | rows | share |", "|---|---:|---:|"]
    items = sorted(counts.items(), key=lambda kv: (-kv[1], str(kv[0])))
    for value, n in items[:limit]:
        lines.append(f"| {value} | {n} | {n / max(total, 1):.1%} |")
    if len(items) > limit:
        rest = sum(n for _, n in items[limit:])
        lines.append(f"| ({len(items) - limit} more) | {rest} | {rest / max(total, 1):.1%} |")
    return lines + [""]


def coverage_markdown(
    rows: Sequence[Row],
    *,
    title: str = "Synthetic data coverage",
    run_reports: Sequence[dict[str, Any]] = (),
    gate_drops: dict[str, Counter] | None = None,
    rows_before_gates: int | None = None,
    quality: dict[str, Any] | None = None,
    gate_thresholds: dict[str, float] | None = None,
) -> str:
    lines = [
        f"# {title}",
        "",
        f"Rows: **{len(rows)}**"
        + (f" kept of {rows_before_gates} before the quality gates" if rows_before_gates is not None else ""),
        "",
    ]
    lines += ["## Coverage", ""]
    for name, key in DIMENSIONS:
        counts = count_by(rows, key)
        if counts:
            lines += _table(name, counts, len(rows))
    if run_reports:
        lines += [
            "## Generation",
            "",
            (
                "| shard | passages | rows | failed | pending | invalid replies | "
                "transport failures | status |"
            ),
            "|---|---:|---:|---:|---:|---|---|---|",
        ]
        for rep in run_reports:
            lines.append(
                f"| {rep['shard']} | {rep['passages_in_shard']} | {rep['rows_written']} | "
                f"{sum(rep['passages_failed'].values())} | {rep['pending']} | "
                f"{_fmt(rep['invalid_outputs'])} | "
                f"{_fmt(rep['transport_failures'])} | {rep['status']} |"
            )
        failed = Counter()
        for rep in run_reports:
            failed.update(rep["passages_failed"])
        lines += [""]
        if failed:
            lines += _table("passages given up, by cause", failed, sum(failed.values()))
    if gate_drops:
        lines += ["## Quality gates", "", "| gate | dropped |", "|---|---:|"]
        for gate, reasons in gate_drops.items():
            used = (gate_thresholds or {}).get(gate)
            lines.append(f"| {gate}{f' (threshold {used:g})' if used is not None else ''} | "
                         f"{sum(reasons.values())} |")
        lines.append("")
    lines += quality_markdown(quality or {})
    return "\n".join(lines).rstrip() + "\n"


def _fmt(counts: dict[str, int]) -> str:
    return ", ".join(f"{k} {v}" for k, v in sorted(counts.items())) or "-"

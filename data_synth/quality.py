"""What a synthesis run produced, in numbers a user can act on: how often the generator's replies
were valid JSON of the schema, how many queries are on topic (the teacher finds their passage),
duplicates, and the spread of lengths and query types.

The on-topic rate is a round trip: a query is on topic when a teacher embedder ranks its own
passage in the top `k` among all passages of the run. Random queries would score about
k / passages; the summary states that baseline next to the rate.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from typing import Any

import numpy as np

from embedforge.data_synth.corpus import normalize_text
from embedforge.data_synth.gates import Row, instruction_aware, near_duplicate_gate, positive_ranks

# Reply failures that mean "not JSON of the schema" (a wrong-language reply is valid JSON).
NOT_SCHEMA_VALID = ("empty_output", "refusal", "malformed_json", "schema_invalid")
LENGTH_BUCKETS = ((1, 3), (4, 6), (7, 10), (11, 15), (16, 25), (26, None))


def schema_valid_rate(run_reports: Sequence[dict[str, Any]]) -> tuple[float | None, int]:
    """(share of received replies that were JSON of the schema, replies received) over the shards."""
    replies = invalid = 0
    for rep in run_reports:
        replies += rep.get("llm_calls", 0) - sum(rep.get("transport_failures", {}).values())
        invalid += sum(v for k, v in rep.get("invalid_outputs", {}).items() if k in NOT_SCHEMA_VALID)
    return (None if replies == 0 else round(1 - invalid / replies, 4)), replies


def _label(low: int, high: int | None) -> str:
    return f"{low}+" if high is None else f"{low}-{high}"


def _bucket(words: int) -> str:
    return next(_label(lo, hi) for lo, hi in LENGTH_BUCKETS if hi is None or words <= hi)


def length_spread(queries: Sequence[str]) -> dict[str, Any]:
    """Words per query: min, median, mean, max and a histogram."""
    if not queries:
        return {}
    words = np.array([len(q.split()) for q in queries])
    counts = Counter(_bucket(int(w)) for w in words)
    return {
        "min": int(words.min()),
        "median": float(np.median(words)),
        "mean": round(float(words.mean()), 2),
        "max": int(words.max()),
        "buckets": {label: counts.get(label, 0) for label in (_label(*b) for b in LENGTH_BUCKETS)},
    }


def on_topic(rows: Sequence[Row], embedder, k: int = 10, batch_size: int = 32) -> dict[str, Any]:
    """Round trip of the retrieval rows: the share whose passage the teacher ranks in its top k."""
    retrieval = [r for r in rows if r.get("task", "retrieval") == "retrieval"]
    if not retrieval:
        return {}
    ranks = np.array(positive_ranks(retrieval, embedder, instruction_aware(embedder), batch_size=batch_size))
    passages = len({r["positive"] for r in retrieval})
    return {
        "on_topic_rate": round(float((ranks < k).mean()), 4),
        "on_topic_k": k,
        "on_topic_random_baseline": round(min(k, passages) / passages, 4),
        "mrr": round(float((1.0 / (ranks + 1)).mean()), 4),
        "judged_queries": len(ranks),
        "judged_passages": passages,
        "judge": getattr(embedder, "name", ""),
    }


def quality_summary(
    rows: Sequence[Row],
    run_reports: Sequence[dict[str, Any]] = (),
    embedder=None,
    k: int = 10,
    near_dup_threshold: float = 0.85,
) -> dict[str, Any]:
    """Schema-valid rate, on-topic rate (with an embedder), duplicates, length and type spread."""
    valid, replies = schema_valid_rate(run_reports)
    queries = [r["query"] for r in rows]
    normalised = Counter(normalize_text(q) for q in queries)
    near = near_duplicate_gate([{"query": q} for q in queries], near_dup_threshold) if queries else None
    out: dict[str, Any] = {
        "rows": len(rows),
        "passages_with_rows": len({r.get("passage_id", r.get("positive")) for r in rows}),
        "replies": replies,
        "schema_valid_rate": valid,
        "exact_duplicate_queries": sum(n - 1 for n in normalised.values()),
        "near_duplicate_queries": len(near.dropped) if near else 0,
        "query_words": length_spread(queries),
        "question_types": dict(Counter(
            r.get("provenance", {}).get("sampled", {}).get("question_type") or "(none)" for r in rows
        )),
    }
    if embedder is not None:
        out.update(on_topic(rows, embedder, k))
    return out


def quality_markdown(summary: dict[str, Any]) -> list[str]:
    """The summary as markdown lines (a section of coverage.md)."""
    if not summary:
        return []
    lines = ["## Quality", "", "| measure | value |", "|---|---:|"]
    if summary.get("schema_valid_rate") is not None:
        lines.append(f"| schema-valid replies | {summary['schema_valid_rate']:.1%} of {summary['replies']} |")
    if "on_topic_rate" in summary:
        lines.append(
            f"| on topic (teacher top-{summary['on_topic_k']} of {summary['judged_passages']} passages) | "
            f"{summary['on_topic_rate']:.1%} (random: {summary['on_topic_random_baseline']:.1%}) |"
        )
        lines.append(f"| round-trip MRR | {summary['mrr']:.3f} |")
    lines.append(f"| exact duplicate queries | {summary['exact_duplicate_queries']} |")
    lines.append(f"| near-duplicate queries | {summary['near_duplicate_queries']} |")
    words = summary.get("query_words") or {}
    if words:
        lines.append(f"| query words (min / median / max) | {words['min']} / {words['median']:g} / {words['max']} |")
        lines += ["", "| query words | rows |", "|---|---:|"]
        lines += [f"| {bucket} | {n} |" for bucket, n in words["buckets"].items()]
    return lines + [""]

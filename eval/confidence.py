"""The numbers printed next to a score: its interval, and its paired comparison with a baseline.

Both read the per-query metrics a results file stores (`per_query`: query id -> metric -> value),
so any two results on the same queries can be compared after the fact, and the same seed always
gives the same numbers (`embedforge eval --baselines` and `embedforge report` agree).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from pydantic import BaseModel, ConfigDict

from embedforge.eval.metrics import METRIC_KEYS
from embedforge.eval.stats import (
    CONFIDENCE,
    N_RESAMPLES,
    SEED,
    aligned,
    bootstrap_ci,
    paired_bootstrap_ci,
    paired_randomisation_test,
)

PerQuery = Mapping[str, Mapping[str, float]]


class Interval(BaseModel):
    """A mean over queries and its percentile bootstrap interval."""

    model_config = ConfigDict(extra="forbid")

    mean: float
    low: float
    high: float


class Comparison(BaseModel):
    """This result minus a baseline on the same queries, for one metric."""

    model_config = ConfigDict(extra="forbid")

    baseline: str
    metric: str
    delta: float
    low: float
    high: float
    p_value: float
    n_queries: int


def interval_of(per_query: PerQuery, metric: str, confidence: float = CONFIDENCE,
                n_resamples: int = N_RESAMPLES, seed: int = SEED) -> Interval:
    values = [per_query[q][metric] for q in sorted(per_query)]
    low, high = bootstrap_ci(values, confidence, n_resamples, seed)
    return Interval(mean=sum(values) / len(values), low=low, high=high)


def intervals(per_query: PerQuery, metrics: Sequence[str] = METRIC_KEYS, confidence: float = CONFIDENCE,
              n_resamples: int = N_RESAMPLES, seed: int = SEED) -> dict[str, Interval]:
    """{metric: Interval} over the queries of `per_query` (sorted by id, so the order is fixed)."""
    return {m: interval_of(per_query, m, confidence, n_resamples, seed) for m in metrics}


def compare(per_query: PerQuery, baseline: PerQuery, metric: str, baseline_name: str,
            confidence: float = CONFIDENCE, n_resamples: int = N_RESAMPLES, seed: int = SEED) -> Comparison:
    """Mean difference, its paired bootstrap interval and the two-sided randomisation p-value."""
    ours, theirs = aligned(per_query, baseline, metric)
    low, high = paired_bootstrap_ci(ours, theirs, confidence, n_resamples, seed)
    return Comparison(baseline=baseline_name, metric=metric, delta=float((ours - theirs).mean()), low=low,
                      high=high, p_value=paired_randomisation_test(ours, theirs, n_resamples, seed),
                      n_queries=len(ours))


def method_note(confidence: float = CONFIDENCE, n_resamples: int = N_RESAMPLES, seed: int = SEED) -> dict[str, Any]:
    """How the intervals and p-values were computed, recorded beside them."""
    return {
        "interval": f"{confidence:.0%} percentile bootstrap over queries",
        "comparison": "paired bootstrap interval of the mean per-query difference; two-sided paired "
                      "randomisation (sign-flip) test, exact when 2**queries <= resamples",
        "random_baseline": "exact expectation under a uniformly random ranking of the corpus",
        "confidence": confidence,
        "n_resamples": n_resamples,
        "seed": seed,
    }

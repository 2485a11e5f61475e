"""The score a uniformly random ranking of the whole corpus gets, computed exactly.

A score means little without the floor it must clear: on 32 passages a random ranking already
gets about 0.14 nDCG@10 for one relevant passage. For each query with N documents in the corpus,
R relevant ones (grade >= 1) and gains g_d (grades > 0), a random permutation puts a uniformly
random document at each rank i, and any two ranks hold a uniformly random pair, so:

* E[DCG@k]      = sum_{i <= min(k, N)} (sum_d g_d / N) / log2(i + 1); nDCG divides by the ideal DCG.
* E[Recall@k]   = min(k, N) / N.
* E[RR@k]       = sum_{r <= k} (1/r) P(first relevant at rank r),
  P(first at r) = R / (N - r + 1) * prod_{j < r - 1} (N - R - j) / (N - j).
* E[AP@k]       = (1/R) sum_{i <= min(k, N)} (1/i) [R/N + (i - 1) R (R - 1) / (N (N - 1))]
  (precision at i times relevance at i, expanded into pairs of ranks).

Metric semantics are those of embedforge.eval.metrics (trec_eval): a query without relevant
documents scores 0, and the mean is over the queries of the qrels.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

from embedforge.errors import InputError
from embedforge.eval.metrics import METRIC_KEYS, RELEVANCE_LEVEL, dcg


def expected_dcg(gains: list[float], n_docs: int, k: int) -> float:
    mean_gain = sum(g for g in gains if g > 0) / n_docs
    return sum(mean_gain / math.log2(i + 1) for i in range(1, min(k, n_docs) + 1))


def expected_ndcg(judged: Mapping[str, int], n_docs: int, k: int) -> float:
    gains = sorted((float(g) for g in judged.values() if g > 0), reverse=True)
    ideal = dcg(gains, k)
    return expected_dcg(gains, n_docs, k) / ideal if ideal > 0 else 0.0


def expected_recall(num_relevant: int, n_docs: int, k: int) -> float:
    return min(k, n_docs) / n_docs if num_relevant else 0.0


def expected_reciprocal_rank(num_relevant: int, n_docs: int, k: int) -> float:
    total, none_yet = 0.0, 1.0  # none_yet: P(no relevant document in the first r - 1 ranks)
    for r in range(1, min(k, n_docs - num_relevant + 1) + 1):
        total += none_yet * num_relevant / (n_docs - r + 1) / r
        none_yet *= (n_docs - num_relevant - r + 1) / (n_docs - r + 1)
    return total if num_relevant else 0.0


def expected_average_precision(num_relevant: int, n_docs: int, k: int) -> float:
    if not num_relevant:
        return 0.0
    pair = num_relevant * (num_relevant - 1) / (n_docs * (n_docs - 1)) if n_docs > 1 else 0.0
    return sum((num_relevant / n_docs + (i - 1) * pair) / i for i in range(1, min(k, n_docs) + 1)) / num_relevant


def expected_query_metrics(judged: Mapping[str, int], n_docs: int) -> dict[str, float]:
    """The five headline metrics of one query under a uniformly random ranking of n_docs documents."""
    relevant = sum(1 for g in judged.values() if g >= RELEVANCE_LEVEL)
    return {
        "ndcg_at_10": expected_ndcg(judged, n_docs, 10),
        "mrr_at_10": expected_reciprocal_rank(relevant, n_docs, 10),
        "recall_at_10": expected_recall(relevant, n_docs, 10),
        "recall_at_100": expected_recall(relevant, n_docs, 100),
        "map_at_100": expected_average_precision(relevant, n_docs, 100),
    }


def random_ranking_baseline(qrels: Mapping[str, Mapping[str, int]], n_docs: int) -> dict[str, float]:
    """Mean over the qrels' queries of each metric's exact expectation under a random ranking."""
    if not qrels:
        raise InputError("qrels are empty: nothing to evaluate")
    largest = max(len(judged) for judged in qrels.values())
    if n_docs < largest:
        raise InputError(f"n_docs={n_docs} is smaller than a query's {largest} judged documents")
    per_query = [expected_query_metrics(judged, n_docs) for judged in qrels.values()]
    return {key: sum(m[key] for m in per_query) / len(per_query) for key in METRIC_KEYS}

"""Intervals, paired tests and the random-ranking baseline, each held against an independent
reference: scipy.stats.bootstrap and scipy.stats.permutation_test on the same per-query numbers,
exhaustive enumeration of rankings, and a Monte Carlo simulation with trec_eval-exact metrics."""

from __future__ import annotations

import math
from itertools import permutations

import numpy as np
import pytest
from scipy import stats as sps

from embedforge.errors import InputError
from embedforge.eval.metrics import METRIC_KEYS, query_metrics
from embedforge.eval.random_ranking import expected_query_metrics, random_ranking_baseline
from embedforge.eval.stats import _BINOMIAL_COST, bootstrap_ci, paired_bootstrap_ci, paired_randomisation_test

Z = sps.norm.ppf(0.975)


def ndcg_like(n: int, seed: int, shift: float = 0.0, max_rank: int = 10) -> np.ndarray:
    """Per-query scores shaped like nDCG@10: a third at 0, the rest 1/log2(rank + 1) of a rank in 1..max_rank."""
    rng = np.random.default_rng(seed)
    ranks = rng.integers(1, max_rank + 1, size=n)
    values = np.where(rng.random(n) < 0.33 - shift, 0.0, 1.0 / np.log2(ranks + 1))
    return values


def by_value(values: np.ndarray) -> bool:
    """Whether embedforge.eval.stats resamples these values by distinct value (else query by query)."""
    return np.unique(values[values != 0]).size * _BINOMIAL_COST < values.size


# 200 queries with 11 distinct values: resampled query by query; 1,000 queries with 4 distinct values
# (differences: 7): resampled by value. Both routes must give scipy's answer.
SIZES = pytest.mark.parametrize("n,max_rank", [(200, 10), (1_000, 3)])


def quantile_tolerance(values: np.ndarray, n_resamples: int) -> float:
    """4 standard errors of the difference of two independent Monte Carlo estimates of a 2.5%
    percentile of the bootstrap means. The bootstrap distribution of a mean of n >= 100 values is
    close to normal with sd s/sqrt(n); a sample quantile of B draws has standard error
    sqrt(q(1-q)/B) / density(quantile)."""
    sd = values.std() / math.sqrt(len(values))
    se = math.sqrt(0.025 * 0.975 / n_resamples) / (sps.norm.pdf(Z) / sd)
    return 4 * math.sqrt(2) * se


@SIZES
def test_bootstrap_interval_matches_scipy_percentile_bootstrap(n, max_rank):
    x = ndcg_like(n, seed=0, max_rank=max_rank)
    assert by_value(x) == (n > 200)
    ours = bootstrap_ci(x, confidence=0.95, n_resamples=20_000, seed=1)
    ref = sps.bootstrap((x,), np.mean, confidence_level=0.95, n_resamples=20_000, method="percentile",
                        rng=np.random.default_rng(7)).confidence_interval
    tol = quantile_tolerance(x, 20_000)
    assert ours[0] == pytest.approx(ref.low, abs=tol) and ours[1] == pytest.approx(ref.high, abs=tol)
    assert ours[0] < x.mean() < ours[1]
    assert bootstrap_ci(x, n_resamples=2_000, seed=3) == bootstrap_ci(x, n_resamples=2_000, seed=3)  # seeded


@SIZES
def test_paired_bootstrap_interval_matches_scipy_paired_bootstrap(n, max_rank):
    a, b = ndcg_like(n, seed=1, shift=0.1, max_rank=max_rank), ndcg_like(n, seed=2, max_rank=max_rank)
    assert by_value(a - b) == (n > 200)
    ours = paired_bootstrap_ci(a, b, n_resamples=20_000, seed=0)
    ref = sps.bootstrap((a, b), lambda x, y, axis: np.mean(x - y, axis=axis), paired=True, vectorized=True,
                        n_resamples=20_000, method="percentile", rng=np.random.default_rng(5)).confidence_interval
    tol = quantile_tolerance(a - b, 20_000)
    assert ours[0] == pytest.approx(ref.low, abs=tol) and ours[1] == pytest.approx(ref.high, abs=tol)


def scipy_sign_flip_p(a, b, n_resamples, seed=0):
    return sps.permutation_test((a - b,), lambda d, axis: np.mean(d, axis=axis), permutation_type="samples",
                                alternative="two-sided", vectorized=True, n_resamples=n_resamples,
                                rng=np.random.default_rng(seed)).pvalue


def test_randomisation_test_is_exact_like_scipy_on_small_query_sets():
    # 12 queries: 4,096 sign patterns <= 10,000 resamples, so both enumerate them all (exact test);
    # zero differences and tied magnitudes included, as retrieval metrics produce them.
    a = np.array([1.0, 0.5, 0.0, 0.63, 1.0, 0.0, 0.43, 0.5, 1.0, 0.0, 0.39, 0.5])
    b = np.array([0.5, 0.5, 0.0, 0.43, 0.63, 0.0, 0.5, 0.0, 1.0, 0.39, 0.0, 0.0])
    assert paired_randomisation_test(a, b, n_resamples=10_000) == pytest.approx(scipy_sign_flip_p(a, b, 10_000),
                                                                                abs=1e-12)
    assert paired_randomisation_test(a, a) == 1.0  # identical systems: nothing to detect


@pytest.mark.parametrize("n,max_rank,shift", [(200, 10, 0.05), (1_000, 3, 0.03)])
def test_randomisation_test_agrees_with_scipy_by_monte_carlo(n, max_rank, shift):
    a, b = ndcg_like(n, seed=3, shift=shift, max_rank=max_rank), ndcg_like(n, seed=4, max_rank=max_rank)
    assert by_value(a - b) == (n > 200)
    ours = paired_randomisation_test(a, b, n_resamples=20_000, seed=0)
    ref = scipy_sign_flip_p(a, b, 20_000, seed=11)
    # Two independent Monte Carlo estimates of one p-value: each has sd sqrt(p(1-p)/B).
    assert 0.001 < ref < 0.999
    assert ours == pytest.approx(ref, abs=4 * math.sqrt(2 * ref * (1 - ref) / 20_000))


def test_statistics_refuse_bad_input():
    with pytest.raises(InputError, match="non-empty"):
        bootstrap_ci([])
    with pytest.raises(InputError, match="differ in length"):
        paired_randomisation_test([1.0, 0.0], [1.0])
    with pytest.raises(InputError, match="confidence"):
        bootstrap_ci([1.0, 0.0], confidence=1.5)


# --- the random-ranking baseline -------------------------------------------------------------------


def exhaustive(judged: dict[str, int], n_docs: int) -> dict[str, float]:
    """Mean metrics over every placement of the judged documents among n_docs ranks: all orders of
    the judged documents over all rank sets, the other documents unjudged (gain 0)."""
    docs = list(judged)
    totals = dict.fromkeys(METRIC_KEYS, 0.0)
    count = 0
    for positions in permutations(range(n_docs), len(docs)):
        scores = {f"u{i}": -float(i) for i in range(n_docs) if i not in positions}
        scores.update({d: -float(p) for d, p in zip(docs, positions)})
        for key, value in query_metrics(scores, judged).items():
            totals[key] += value
        count += 1
    return {key: total / count for key, total in totals.items()}


@pytest.mark.parametrize("judged,n_docs", [
    ({"a": 1}, 32),                       # one relevant among 32: the demo's case (about 0.14 nDCG@10)
    ({"a": 2, "b": 1}, 14),               # graded gains
    ({"a": 1, "b": 1, "c": 0}, 12),       # a judged non-relevant document
    ({"a": 1, "b": 1, "c": 1}, 11),       # recall@10 and AP cut by k
])
def test_random_baseline_equals_exhaustive_enumeration(judged, n_docs):
    assert expected_query_metrics(judged, n_docs) == pytest.approx(exhaustive(judged, n_docs), abs=1e-12)


def test_random_baseline_matches_monte_carlo_over_a_mixed_query_set():
    n_docs = 40
    qrels = {"q1": {"d1": 1}, "q2": {"d2": 2, "d3": 1}, "q3": {"d4": 1, "d5": 1, "d6": 1, "d7": 0},
             "q4": {"d8": 0}, "q5": {f"d{i}": 1 for i in range(10, 22)}}
    rng = np.random.default_rng(0)
    doc_ids = [f"d{i}" for i in range(n_docs)]
    draws = 3_000
    means = np.zeros((draws, len(METRIC_KEYS)))
    for t in range(draws):
        per_query = [query_metrics(dict(zip(doc_ids, rng.random(n_docs))), judged) for judged in qrels.values()]
        means[t] = [np.mean([m[k] for m in per_query]) for k in METRIC_KEYS]
    exact = random_ranking_baseline(qrels, n_docs)
    simulated, se = means.mean(axis=0), means.std(axis=0) / math.sqrt(draws)
    for i, key in enumerate(METRIC_KEYS):
        # 4.5 standard errors; a metric that no draw can change (R@100 with 40 documents) has se 0,
        # so float summation noise is allowed on top.
        assert exact[key] == pytest.approx(simulated[i], abs=4.5 * se[i] + 1e-12), key


def test_random_baseline_refuses_a_corpus_smaller_than_the_judgments():
    with pytest.raises(InputError, match="smaller"):
        random_ranking_baseline({"q": {"a": 1, "b": 1}}, 1)

"""How sure a score is: a percentile bootstrap over queries, and a paired randomisation test.

A retrieval score is a mean over queries, so its uncertainty comes from which queries were
asked. Both procedures resample queries (never documents) and are seeded, so the same per-query
numbers always give the same interval and p-value.

* `bootstrap_ci`: resample the queries with replacement `n_resamples` times and take the
  (1 - confidence)/2 and (1 + confidence)/2 percentiles of the resampled means (the percentile
  bootstrap; scipy.stats.bootstrap(method="percentile") computes the same interval).
* `paired_bootstrap_ci`: the same interval for the mean per-query difference of two systems.
* `paired_randomisation_test`: two-sided sign-flip test of "the two systems are exchangeable on
  every query": each per-query difference keeps or flips its sign at random and the p-value is
  the share of flipped means at least as far from 0 as the observed one. When 2**n <= n_resamples
  all 2**n sign patterns are enumerated (an exact test); otherwise the Monte Carlo estimate is
  (hits + 1) / (n_resamples + 1), which never reports p = 0 (scipy.stats.permutation_test with
  permutation_type="samples" is the same test).

Retrieval metrics take few distinct values (MRR@10 at most 11), so both procedures draw the
resamples by value rather than by query when that is cheaper: a bootstrap resample's counts of
each distinct value are multinomial, and a sign-flip of the c queries sharing one difference
keeps a binomial(c, 1/2) number of them positive. These are the same distributions as resampling
query by query, drawn with cost O(distinct values) instead of O(queries) per resample.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from itertools import product

import numpy as np

from embedforge.errors import InputError

CONFIDENCE = 0.95
N_RESAMPLES = 10_000
SEED = 0
_CHUNK_CELLS = 4_000_000  # resampled values held at once: bounds memory for large query sets
_MAX_EXACT = 20  # 2**20 sign patterns of 20 queries: the largest exact test held in memory
_BINOMIAL_COST = 25  # one binomial draw costs about as much as this many per-query draws


def _as_values(values: Sequence[float] | np.ndarray, what: str = "values") -> np.ndarray:
    array = np.asarray(values, dtype=np.float64)
    if array.ndim != 1 or array.size == 0:
        raise InputError(f"{what}: expected a non-empty list of per-query numbers")
    if not np.isfinite(array).all():
        raise InputError(f"{what}: per-query numbers must be finite")
    return array


def _check(confidence: float, n_resamples: int) -> None:
    if not 0 < confidence < 1:
        raise InputError(f"confidence must be in (0, 1), got {confidence}")
    if n_resamples < 1:
        raise InputError(f"n_resamples must be >= 1, got {n_resamples}")


def bootstrap_means(values: Sequence[float] | np.ndarray, n_resamples: int = N_RESAMPLES,
                    seed: int = SEED) -> np.ndarray:
    """Means of `n_resamples` resamples (with replacement, same size) of the values."""
    values = _as_values(values)
    rng = np.random.default_rng(seed)
    n = values.size
    levels, counts = np.unique(values, return_counts=True)
    by_value = levels.size * _BINOMIAL_COST < n
    chunk = max(1, _CHUNK_CELLS // (levels.size if by_value else n))
    means = np.empty(n_resamples, dtype=np.float64)
    for start in range(0, n_resamples, chunk):
        rows = min(chunk, n_resamples - start)
        if by_value:
            means[start:start + rows] = rng.multinomial(n, counts / n, size=rows) @ levels / n
        else:
            means[start:start + rows] = values[rng.integers(0, n, size=(rows, n))].mean(axis=1)
    return means


def bootstrap_ci(values: Sequence[float] | np.ndarray, confidence: float = CONFIDENCE,
                 n_resamples: int = N_RESAMPLES, seed: int = SEED) -> tuple[float, float]:
    """(low, high): percentile bootstrap interval of the mean over queries."""
    _check(confidence, n_resamples)
    means = bootstrap_means(values, n_resamples, seed)
    alpha = (1 - confidence) / 2
    low, high = np.percentile(means, [100 * alpha, 100 * (1 - alpha)])
    return float(low), float(high)


def paired_bootstrap_ci(a: Sequence[float] | np.ndarray, b: Sequence[float] | np.ndarray,
                        confidence: float = CONFIDENCE, n_resamples: int = N_RESAMPLES,
                        seed: int = SEED) -> tuple[float, float]:
    """(low, high): percentile bootstrap interval of mean(a - b), queries resampled as pairs."""
    return bootstrap_ci(_differences(a, b), confidence, n_resamples, seed)


def _differences(a, b) -> np.ndarray:
    a, b = _as_values(a, "a"), _as_values(b, "b")
    if a.shape != b.shape:
        raise InputError(f"paired samples differ in length: {a.size} and {b.size}")
    return a - b


def paired_randomisation_test(a: Sequence[float] | np.ndarray, b: Sequence[float] | np.ndarray,
                              n_resamples: int = N_RESAMPLES, seed: int = SEED) -> float:
    """Two-sided p-value of the sign-flip test on the per-query differences a - b."""
    _check(0.5, n_resamples)
    diffs = _differences(a, b)
    n = diffs.size
    observed = abs(diffs.mean())
    # Differences are sums of a few float terms: a flipped mean equal to the observed one in exact
    # arithmetic may differ from it in the last bits, so ties are compared with a relative slack.
    slack = 100 * np.finfo(np.float64).eps * max(observed, 1e-300)
    if n <= _MAX_EXACT and 2 ** n <= n_resamples:  # every sign pattern once: the exact test
        signs = np.array(list(product((1.0, -1.0), repeat=n)))
        flipped = np.abs(signs @ diffs / n)
        return float(np.count_nonzero(flipped >= observed - slack) / len(signs))
    rng = np.random.default_rng(seed)
    levels, counts = np.unique(diffs[diffs != 0], return_counts=True)  # a zero difference never moves
    by_value = levels.size * _BINOMIAL_COST < n
    chunk = max(1, _CHUNK_CELLS // max(1, levels.size if by_value else n))
    hits = 0
    for start in range(0, n_resamples, chunk):
        rows = min(chunk, n_resamples - start)
        if by_value:
            flipped = (2 * rng.binomial(counts, 0.5, size=(rows, levels.size)) - counts) @ levels / n
        else:
            flipped = (rng.integers(0, 2, size=(rows, n)) * 2.0 - 1.0) @ diffs / n
        hits += int(np.count_nonzero(np.abs(flipped) >= observed - slack))
    return (hits + 1) / (n_resamples + 1)


def aligned(per_query: Mapping[str, Mapping[str, float]], baseline: Mapping[str, Mapping[str, float]],
            metric: str) -> tuple[np.ndarray, np.ndarray]:
    """The metric of both systems on the same queries, in one order; the query sets must agree."""
    ours, theirs = set(per_query), set(baseline)
    if ours != theirs:
        raise InputError(f"paired comparison needs the same queries: {len(ours)} here, {len(theirs)} in the "
                         f"baseline, {len(ours & theirs)} in common")
    ids = sorted(ours)
    try:
        return (np.array([per_query[q][metric] for q in ids], dtype=np.float64),
                np.array([baseline[q][metric] for q in ids], dtype=np.float64))
    except KeyError:
        raise InputError(f"per-query results lack {metric!r}", field="per_query") from None

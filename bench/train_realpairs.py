"""Shared by the training-quality benchmarks: real pairs with a disjoint real test set, per-query
nDCG@10 of any encoder, bootstrap intervals and paired tests.

Data: German -> English message pairs from the gettext catalogs installed under /usr/share/locale
(`embedforge.eval.real_data.gettext_bitext`): translations written by people, not by this project.
The query is the German message, its one relevant passage the English original. Training rows and
test queries are disjoint slices of one seeded shuffle; the test corpus holds the test queries'
passages plus further English messages none of which is a training positive.
"""

from __future__ import annotations

import json
import math
import os
import platform
from pathlib import Path
from typing import Any

import numpy as np

RESULTS = Path(os.environ.get("EMBEDFORGE_BENCH_RESULTS") or Path(__file__).resolve().parent / "results")


def gettext_pairs(n_train: int, n_test: int, n_docs: int, seed: int = 0):
    """(train rows, BeirData test set) from one shuffle of the German catalogs."""
    from embedforge.eval.beir import BeirData
    from embedforge.eval.real_data import gettext_bitext

    if n_docs < n_test:
        raise ValueError(f"test corpus ({n_docs}) must hold at least the {n_test} relevant passages")
    english, german, source = gettext_bitext("de", n=n_train + n_docs, seed=seed)
    rows = [{"query": g, "positive": e} for g, e in zip(german[:n_train], english[:n_train])]
    test_en, test_de = english[n_train:], german[n_train:]
    queries = {f"q{i}": test_de[i] for i in range(n_test)}
    corpus = {f"d{i}": test_en[i] for i in range(n_docs)}
    qrels = {f"q{i}": {f"d{i}": 1} for i in range(n_test)}
    return rows, BeirData(queries, corpus, qrels, source=f"{source}, seed {seed}")


def per_query_ndcg(encode, test) -> dict[str, float]:
    """nDCG@10 of each test query (trec_eval semantics), given `encode(texts, is_query) -> [n, d]`
    L2-normalised rows. The same scoring for every library under comparison."""
    from embedforge.eval.metrics import evaluate_run

    query_ids, doc_ids = list(test.queries), sorted(test.corpus, reverse=True)
    q = np.asarray(encode([test.queries[i] for i in query_ids], True), dtype=np.float32)
    d = np.asarray(encode([test.corpus[i] for i in doc_ids], False), dtype=np.float32)
    scores = q @ d.T
    top = np.argsort(-scores, axis=1, kind="stable")[:, :100]
    run = {qid: {doc_ids[j]: float(scores[i, j]) for j in top[i]} for i, qid in enumerate(query_ids)}
    _, by_query = evaluate_run(test.qrels, run)
    return {qid: by_query[qid]["ndcg_at_10"] for qid in query_ids}


def random_ndcg_at_10(n_docs: int) -> float:
    """Expected nDCG@10 of a uniformly random ranking with one relevant passage among n_docs."""
    return sum(1 / math.log2(rank + 1) for rank in range(1, 11)) / n_docs


def bootstrap_ci(values: np.ndarray, resamples: int = 10000, seed: int = 0) -> tuple[float, float]:
    """95% percentile bootstrap interval of the mean over queries."""
    rng = np.random.default_rng(seed)
    means = values[rng.integers(0, len(values), size=(resamples, len(values)))].mean(axis=1)
    return float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5))


def paired_test(a: np.ndarray, b: np.ndarray, resamples: int = 10000, seed: int = 0) -> dict[str, float]:
    """Is mean(a - b) > 0 over the same queries? Paired bootstrap (one-sided p: share of resampled
    means <= 0) and a sign-flip randomisation test (two-sided p)."""
    rng = np.random.default_rng(seed)
    diff = np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)
    boot = diff[rng.integers(0, len(diff), size=(resamples, len(diff)))].mean(axis=1)
    flips = rng.choice([-1.0, 1.0], size=(resamples, len(diff)))
    null = np.abs((flips * diff).mean(axis=1))
    return {"mean_diff": float(diff.mean()), "ci95": [float(np.percentile(boot, 2.5)), float(np.percentile(boot, 97.5))],
            "p_bootstrap_one_sided": float((boot <= 0).mean()),
            "p_randomization_two_sided": float((null >= abs(diff.mean()) - 1e-12).mean())}


def summary(values: dict[str, float]) -> dict[str, Any]:
    arr = np.array(list(values.values()))
    low, high = bootstrap_ci(arr)
    return {"ndcg_at_10": float(arr.mean()), "ci95": [low, high], "n_queries": len(arr)}


def machine(threads: int) -> dict[str, str]:
    import torch

    cpu = platform.processor() or "cpu"
    if os.path.exists("/proc/cpuinfo"):
        names = [line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                 if line.startswith("model name")]
        cpu = f"{names[0]} x{len(names)}" if names else cpu
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else f"CPU {cpu}"
    return {"description": f"{device}, torch {torch.__version__}, {threads} thread(s)", "threads": str(threads),
            "python": platform.python_version()}


def write_results(name: str, obj: dict, markdown: str) -> None:
    from embedforge.io import atomic_path

    RESULTS.mkdir(parents=True, exist_ok=True)
    with atomic_path(RESULTS / f"{name}.json") as tmp:
        tmp.write_text(json.dumps(obj, indent=2) + "\n", encoding="utf-8")
    with atomic_path(RESULTS / f"{name}.md") as tmp:
        tmp.write_text(markdown, encoding="utf-8")


def embedforge_embedder(path: str, max_length: int):
    """`Embedder.from_pretrained`, pooled where embedforge trains: the folder's embedforge.json
    `append_eos` when it has one, else (a plain language model) the last real token.

    Until embedforge/embedder.py reads `append_eos` from embedforge.json inside a
    sentence-transformers folder and defaults plain decoders to the last real token, this applies
    those two rules here; once it does, this is a no-op."""
    from embedforge import Embedder

    embedder = Embedder.from_pretrained(path, dtype="float32", device="cpu", max_length=max_length)
    own = Path(path) / "embedforge.json"
    if embedder.spec.pooling == "lasttoken":
        embedder.spec.append_eos = bool(json.loads(own.read_text())["append_eos"]) if own.exists() else False
    return embedder

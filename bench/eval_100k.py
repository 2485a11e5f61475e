"""Benchmark: retrieval evaluation over 100k real short passages on CPU, time and peak memory.

Data: gettext messages installed on this machine (/usr/share/locale): query = an English
message, relevant = its translations (de, fr, es, it, pt_BR, nl) among 100k translated messages
(embedforge.eval.real_data.gettext_cross_lingual_retrieval). The whole `evaluate_retrieval`
runs once with all-MiniLM-L6-v2 (encode + search + metrics), recording its phase timings and the
process's peak RSS. Then the search + metrics part is re-run on the SAME embeddings in fresh
processes, ours against peers, each reporting its time and peak memory above the loaded
embeddings:

* ours: embedforge.eval.search.exact_search (blocked, never the Q x N matrix) + metrics
* faiss IndexFlatIP (exact)
* sentence-transformers util.semantic_search (chunked torch top-k)
* the naive full Q x N score matrix + argpartition (what we avoid)
* metrics: ours vs pytrec_eval on the same top-100 run

    python bench/eval_100k.py               # ~15 min on 1 CPU thread (the MiniLM encode dominates)
    python bench/eval_100k.py --random      # random embeddings instead of MiniLM: search + metrics only
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

RESULTS = Path(os.environ.get("EMBEDFORGE_BENCH_RESULTS") or Path(__file__).parent / "results")
K = 100


def rss_mb() -> float:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class KeepingEncoder:
    """Passes encode through to the embedder and keeps the last two outputs (queries, corpus)."""

    def __init__(self, embedder):
        self.embedder, self.spec, self.outputs = embedder, embedder.spec, []

    def encode(self, texts, **kwargs):
        out = self.embedder.encode(texts, **kwargs)
        self.outputs.append(out)
        return out


def worker(method: str, folder: Path) -> dict:
    """One search (+ metrics) method on saved embeddings, in its own process."""
    import faiss  # noqa: F401  every library is imported before the baseline is taken
    import pytrec_eval
    import sentence_transformers.util  # noqa: F401
    import torch

    import embedforge.eval.metrics
    import embedforge.eval.search  # noqa: F401

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    q = np.load(folder / "queries.npy")
    d = np.load(folder / "corpus.npy")
    meta = json.loads((folder / "meta.json").read_text())
    doc_ids, query_ids, qrels = meta["doc_ids"], meta["query_ids"], meta["qrels"]
    base = rss_mb()
    start = time.perf_counter()
    if method == "ours":
        from embedforge.eval.search import exact_search

        r = exact_search(q, d, K, device="cpu")
        scores, idx = r.scores, r.indices
    elif method == "faiss-flat":
        from embedforge.eval.search import faiss_search

        r = faiss_search(q, d, K)
        scores, idx = r.scores, r.indices
    elif method == "sentence-transformers":
        from sentence_transformers.util import semantic_search

        hits = semantic_search(torch.from_numpy(q), torch.from_numpy(d), top_k=K)
        idx = np.array([[h["corpus_id"] for h in row] for row in hits])
        scores = np.array([[h["score"] for h in row] for row in hits])
    elif method == "full-matrix":
        full = q @ d.T
        idx = np.argpartition(-full, K, axis=1)[:, :K]
        scores = np.take_along_axis(full, idx, 1)
    else:
        raise SystemExit(f"unknown method {method}")
    search_s = time.perf_counter() - start
    run = {qid: {doc_ids[j]: float(s) for s, j in zip(scores[i], idx[i])} for i, qid in enumerate(query_ids)}
    start = time.perf_counter()
    if method == "ours":
        from embedforge.eval.metrics import evaluate_run

        metrics, _ = evaluate_run(qrels, run)
    else:
        import pytrec_eval

        per_query = pytrec_eval.RelevanceEvaluator(qrels, {"ndcg_cut.10", "recall.100"}).evaluate(run)
        metrics = {"ndcg_at_10": float(np.mean([m["ndcg_cut_10"] for m in per_query.values()])),
                   "recall_at_100": float(np.mean([m["recall_100"] for m in per_query.values()]))}
    metrics_s = time.perf_counter() - start
    return {"method": method, "search_s": search_s, "metrics_s": metrics_s,
            "peak_extra_mb": peak_rss_mb() - base, "metrics": metrics}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--docs", type=int, default=100_000)
    parser.add_argument("--queries", type=int, default=1000)
    parser.add_argument("--random", action="store_true", help="random embeddings (skip the MiniLM encode)")
    parser.add_argument("--max-length", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--emb-dir", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker, Path(args.emb_dir))))
        return

    import torch

    from embedforge import __version__
    from embedforge.eval.real_data import gettext_cross_lingual_retrieval
    from embedforge.eval.retrieval import evaluate_retrieval

    t = time.perf_counter()
    data = gettext_cross_lingual_retrieval(n_docs=args.docs, n_queries=args.queries, seed=0)
    build_s = time.perf_counter() - t
    rss_data = rss_mb()
    if args.random:
        rng = np.random.default_rng(0)
        doc_ids = sorted(data.corpus, reverse=True)
        emb = {d: i for i, d in enumerate(doc_ids)}
        corpus = rng.standard_normal((len(doc_ids), 384)).astype(np.float32)
        corpus /= np.linalg.norm(corpus, axis=1, keepdims=True)
        query_ids = list(data.queries)
        queries = np.stack([corpus[[emb[d] for d in data.qrels[q]]].mean(0) for q in query_ids])
        queries += 0.05 * rng.standard_normal(queries.shape).astype(np.float32)
        queries /= np.linalg.norm(queries, axis=1, keepdims=True)
        model, end_to_end = "random 384-d (relevant docs planted near the query)", None
    else:
        from embedforge import Embedder
        from embedforge.offline_models import minilm_folder

        model = "all-MiniLM-L6-v2"
        encoder = KeepingEncoder(Embedder.from_pretrained(minilm_folder(), device="cpu", dtype="float32",
                                                          max_length=args.max_length))
        rss_model = rss_mb()
        result = evaluate_retrieval(encoder, data, batch_size=args.batch_size, show_progress=True)
        queries, corpus = encoder.outputs
        query_ids, doc_ids = list(data.queries), sorted(data.corpus, reverse=True)
        end_to_end = {"metrics": result["metrics"], "timings": result["timings"],
                      "rss_after_data_mb": rss_data, "rss_after_model_mb": rss_model,
                      "process_peak_rss_mb": peak_rss_mb()}
        print(json.dumps(end_to_end))

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        np.save(folder / "queries.npy", queries)
        np.save(folder / "corpus.npy", corpus)
        (folder / "meta.json").write_text(json.dumps({"doc_ids": doc_ids, "query_ids": query_ids,
                                                      "qrels": data.qrels}))
        for method in ("ours", "faiss-flat", "sentence-transformers", "full-matrix"):
            out = subprocess.run([sys.executable, __file__, "--worker", method, "--emb-dir", tmp],
                                 capture_output=True, text=True, check=True)
            rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
            print(json.dumps(rows[-1]))

    ours = rows[0]
    result = {
        "benchmark": "eval_100k", "device": "cpu", "cpu": platform.processor() or platform.machine(),
        "threads": int(os.environ.get("OMP_NUM_THREADS", "0")) or torch.get_num_threads(),
        "torch": torch.__version__, "embedforge": __version__, "model": model, "data": data.source,
        "n_docs": len(data.corpus), "n_queries": len(data.queries), "k": K, "build_data_s": build_s,
        "end_to_end": end_to_end, "search_and_metrics": rows,
        "ratios_vs_ours": {r["method"]: {"search_time": r["search_s"] / ours["search_s"],
                                         "peak_extra_memory": r["peak_extra_mb"] / max(ours["peak_extra_mb"], 1e-9)}
                           for r in rows[1:]},
    }
    RESULTS.mkdir(exist_ok=True)
    tag = "random" if args.random else "minilm"
    (RESULTS / f"eval_100k_{tag}.json").write_text(json.dumps(result, indent=2) + "\n")
    lines = [(f"# Retrieval eval of {len(data.corpus):,} passages x {len(data.queries):,} queries on CPU "
              f"({result['threads']} thread(s), torch {torch.__version__})"), "",
             f"Data: {data.source}. Model: {model}."]
    if end_to_end:
        t = end_to_end["timings"]
        m = end_to_end["metrics"]
        lines += ["", "## End to end (`evaluate_retrieval`, one process)", "",
                  "| phase | seconds |", "|---|---:|",
                  f"| build data | {build_s:.1f} |", f"| encode queries | {t['encode_queries_s']:.1f} |",
                  f"| encode corpus | {t['encode_corpus_s']:.1f} |", f"| search (exact, top-100) | {t['search_s']:.1f} |",
                  f"| metrics | {t['metrics_s']:.2f} |", f"| total | {t['total_s']:.1f} |", "",
                  (f"Peak RSS of the whole process: {end_to_end['process_peak_rss_mb']:.0f} MB "
                   f"(after loading data {end_to_end['rss_after_data_mb']:.0f} MB, after the model "
                   f"{end_to_end['rss_after_model_mb']:.0f} MB). nDCG@10 {100 * m['ndcg_at_10']:.2f}, "
                   f"MRR@10 {100 * m['mrr_at_10']:.2f}, R@100 {100 * m['recall_at_100']:.2f}.")]
    lines += ["", "## Search + metrics on the same embeddings (fresh process each)", "",
              "| method | search s | metrics s | peak memory above the embeddings (MB) | nDCG@10 | search time vs ours |",
              "|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        ratio = r["search_s"] / ours["search_s"]
        lines.append(f"| {r['method']} | {r['search_s']:.2f} | {r['metrics_s']:.2f} | {r['peak_extra_mb']:.0f} | "
                     f"{100 * r['metrics']['ndcg_at_10']:.2f} | {ratio:.2f}x |")
    lines += ["", ("Metrics: ours = embedforge.eval.metrics; the peers' = pytrec_eval on their own top-100. "
                   "The full-matrix row holds the Q x N float32 scores that the blocked search never builds.")]
    (RESULTS / f"eval_100k_{tag}.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()

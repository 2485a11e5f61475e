"""Benchmark: retrieval and bitext evaluation on real text nobody in this project wrote.

* Retrieval: Python standard library code search (docstring summary -> function source without
  its docstring), built by embedforge.eval.real_data.stdlib_code_search.
* Bitext mining: gettext catalogs of this machine (/usr/share/locale: coreutils, apt, git, ...)
  and CLDR territory/language names shipped by the PyPI package `babel`.

Models: all-MiniLM-L6-v2 (fast, a trained embedder) and SmolLM2-135M-Instruct (slow: a chat LLM
used untrained as a last-token embedder; its scores are a floor, not a claim). Each retrieval
score comes with its 95% bootstrap interval over queries and the exact score of a random ranking.
The peer: for MiniLM, sentence-transformers + pytrec_eval compute nDCG@10 independently in the
same run; the table gives the difference and the time ratio. Writes
bench/results/eval_real.{json,md} (or to --results-dir).

    python bench/eval_real.py                 # both models (SmolLM2 takes ~10 min on 2 CPU cores)
    python bench/eval_real.py --skip-smollm2
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from embedforge import Embedder, __version__
from embedforge.errors import InputError
from embedforge.eval.beir import write_beir
from embedforge.eval.confidence import intervals
from embedforge.eval.random_ranking import random_ranking_baseline
from embedforge.eval.real_data import cldr_bitext, gettext_bitext, stdlib_code_search
from embedforge.eval.retrieval import evaluate_retrieval
from embedforge.eval.tasks import evaluate_bitext
from embedforge.offline_models import minilm_folder, smollm2_folder

RESULTS = Path(os.environ.get("EMBEDFORGE_BENCH_RESULTS") or Path(__file__).parent / "results")
SMOLLM2_NOTE = (
    "SmolLM2 is a chat LLM used untrained as a last-token embedder: near-chance scores are expected "
    "(R@100 by chance = 100 / docs); it shows the decoder path end to end (instruction on queries, EOS "
    "appended once, last-token pooling) and is the floor that `embedforge train` has to lift."
)
CODE_INSTRUCTION = "Given a description of a Python function, retrieve the function's source code"


def peer_ndcg(folder: str, beir_dir: Path, max_length: int, batch_size: int) -> tuple[float, float]:
    """nDCG@10 by sentence-transformers + pytrec_eval, written without embedforge.eval."""
    import pytrec_eval
    from sentence_transformers import SentenceTransformer

    start = time.perf_counter()
    st = SentenceTransformer(folder, device="cpu")
    st.max_seq_length = max_length
    corpus = [json.loads(line) for line in (beir_dir / "corpus.jsonl").read_text().splitlines()]
    queries = {r["_id"]: r["text"] for r in map(json.loads, (beir_dir / "queries.jsonl").read_text().splitlines())}
    qrels: dict[str, dict[str, int]] = {}
    for line in (beir_dir / "qrels" / "test.tsv").read_text().splitlines()[1:]:
        q, d, s = line.split("\t")
        qrels.setdefault(q, {})[d] = int(s)
    docs = st.encode([(r["title"] + " " + r["text"]).strip() for r in corpus], batch_size=batch_size,
                     normalize_embeddings=True)
    q_ids = list(qrels)
    qs = st.encode([queries[q] for q in q_ids], batch_size=batch_size, normalize_embeddings=True)
    sims = qs @ docs.T
    run = {q: {r["_id"]: float(s) for r, s in zip(corpus, sims[i])} for i, q in enumerate(q_ids)}
    scores = pytrec_eval.RelevanceEvaluator(qrels, {"ndcg_cut.10"}).evaluate(run)
    return float(np.mean([s["ndcg_cut_10"] for s in scores.values()])), time.perf_counter() - start


def bitext_sets(n: int) -> list[tuple[str, list[str], list[str], str]]:
    sets = []
    for lang in ("de", "fr", "ja"):
        try:
            src, tgt, desc = gettext_bitext(lang, n=n, seed=0)
            sets.append((f"gettext en-{lang}", src, tgt, desc))
        except InputError as exc:  # catalogs differ between machines: say so, do not fail
            print(f"skip gettext {lang}: {exc}")
    for lang in ("de", "fr", "ja"):
        src, tgt, desc = cldr_bitext(lang, n=n, seed=0)
        sets.append((f"CLDR names en-{lang}", src, tgt, desc))
    return sets


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--queries", type=int, default=200)
    parser.add_argument("--docs", type=int, default=1000)
    parser.add_argument("--pairs", type=int, default=200, help="pairs per bitext set")
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--skip-smollm2", action="store_true")
    parser.add_argument("--results-dir", type=Path, default=RESULTS)
    args = parser.parse_args()

    data = stdlib_code_search(n_queries=args.queries, n_docs=args.docs, seed=0, max_chars=1500)
    bitext = bitext_sets(args.pairs)
    models = [("all-MiniLM-L6-v2", str(minilm_folder()), None)]
    if not args.skip_smollm2:
        models.append(("SmolLM2-135M-Instruct (untrained, last token)", str(smollm2_folder()), CODE_INSTRUCTION))
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        beir_dir = write_beir(Path(tmp) / "stdlib", data)
        for label, folder, instruction in models:
            embedder = Embedder.from_pretrained(folder, device="cpu", dtype="float32", max_length=args.max_length)
            result = evaluate_retrieval(embedder, beir_dir, instruction=instruction, batch_size=args.batch_size,
                                        per_query=True, show_progress=True)
            row = {"model": label, "task": "retrieval", "data": "Python stdlib code search",
                   "source": data.source, "n_queries": result["n_queries"], "n_docs": result["n_docs"],
                   "instruction": result["instruction"], "metrics": result["metrics"],
                   "intervals": {m: i.model_dump() for m, i in intervals(result["per_query"]).items()},
                   "random_baseline": random_ranking_baseline(data.qrels, result["n_docs"]),
                   "seconds": result["timings"]["total_s"]}
            if folder == str(minilm_folder()):
                ndcg, seconds = peer_ndcg(folder, beir_dir, args.max_length, args.batch_size)
                row["peer"] = {"name": "sentence-transformers + pytrec_eval", "ndcg_at_10": ndcg, "seconds": seconds,
                               "ndcg_difference": result["metrics"]["ndcg_at_10"] - ndcg,
                               "time_ratio_peer_over_ours": seconds / result["timings"]["total_s"]}
            rows.append(row)
            print(json.dumps(row))
            for name, src, tgt, desc in bitext:
                start = time.perf_counter()
                out = evaluate_bitext(embedder, src, tgt, batch_size=args.batch_size)
                rows.append({"model": label, "task": "bitext", "data": name, "source": desc, "n_pairs": len(src),
                             "instruction": out["instruction"],
                             "metrics": {"accuracy": out["accuracy"], "f1": out["f1"]},
                             "seconds": time.perf_counter() - start})
                print(json.dumps(rows[-1]))
            del embedder

    result = {"benchmark": "eval_real", "device": "cpu", "cpu": platform.processor() or platform.machine(),
              "threads": torch.get_num_threads(), "torch": torch.__version__, "python": platform.python_version(),
              "embedforge": __version__, "max_length": args.max_length, "rows": rows}
    args.results_dir.mkdir(parents=True, exist_ok=True)
    (args.results_dir / "eval_real.json").write_text(json.dumps(result, indent=2, ensure_ascii=False) + "\n")
    lines = [(f"# Evaluation on real text (CPU, {result['threads']} threads, torch {torch.__version__}, "
              f"max_length {args.max_length})"), "",
             "## Retrieval: Python stdlib code search (docstring summary -> function source)", "",
             ("| model | queries | docs | instruction | nDCG@10 [95% CI] | random | MRR@10 | R@10 | R@100 | MAP@100 "
             "| seconds |"),
             "|---|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        if r["task"] == "retrieval":
            m, ci = r["metrics"], r["intervals"]["ndcg_at_10"]
            lines.append(f"| {r['model']} | {r['n_queries']} | {r['n_docs']} | {r['instruction'] or 'none'} | "
                         f"{100 * m['ndcg_at_10']:.2f} [{100 * ci['low']:.2f}, {100 * ci['high']:.2f}] | "
                         f"{100 * r['random_baseline']['ndcg_at_10']:.2f} | {100 * m['mrr_at_10']:.2f} | "
                         f"{100 * m['recall_at_10']:.2f} | {100 * m['recall_at_100']:.2f} | "
                         f"{100 * m['map_at_100']:.2f} | {r['seconds']:.1f} |")
    if any("SmolLM2" in r["model"] for r in rows):
        lines += ["", SMOLLM2_NOTE]
    peers = [r for r in rows if "peer" in r]
    if peers:
        lines += ["", "Peer check (same run): " + "; ".join(
            f"{r['model']}: sentence-transformers + pytrec_eval nDCG@10 = {100 * r['peer']['ndcg_at_10']:.2f} "
            f"(difference {r['peer']['ndcg_difference']:+.2e}), peer time / ours = "
            f"{r['peer']['time_ratio_peer_over_ours']:.2f}x" for r in peers)]
    lines += ["", "## Bitext mining (nearest neighbour by cosine; gold = the aligned sentence)", "",
              "| model | data | pairs | accuracy | F1 | seconds |", "|---|---|---:|---:|---:|---:|"]
    for r in rows:
        if r["task"] == "bitext":
            lines.append(f"| {r['model']} | {r['data']} | {r['n_pairs']} | {100 * r['metrics']['accuracy']:.2f} | "
                         f"{100 * r['metrics']['f1']:.2f} | {r['seconds']:.1f} |")
    lines += ["", "Sources: " + data.source + "; " + "; ".join(sorted({r['source'] for r in rows
                                                                        if r['task'] == 'bitext'}))]
    lines += ["", ("95% CI: percentile bootstrap over queries (10,000 resamples, seed 0); random: exact expected "
              "nDCG@10 of a uniformly random ranking of the corpus.")]
    (args.results_dir / "eval_real.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()

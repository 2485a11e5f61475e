"""Benchmark: a real mteb 2 run through embedforge's wrapper, next to sentence-transformers.

The task is a local BEIR folder of real text nobody in this project wrote (Python standard library
code search: docstring summary -> function source), evaluated by mteb's own retrieval evaluator
as a custom task, with no Hub access. The same all-MiniLM-L6-v2 folder runs as an embedforge
`Embedder` wrapped by `MtebEncoder` and as a `SentenceTransformer` handed to mteb directly; the
table gives both score sets and their difference, plus embedforge's own trec_eval transcription
on the same folder. Timings are those of one run on a shared machine: not a speed claim.
Writes bench/results/eval_mteb.{json,md} (or to --results-dir).

    python bench/eval_mteb.py
    python bench/eval_mteb.py --queries 50 --docs 200 --results-dir /tmp/bench   # a quick check
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import tempfile
import time
from pathlib import Path

import torch

from embedforge import __version__
from embedforge.embedder import Embedder
from embedforge.eval.beir import write_beir
from embedforge.eval.mteb_adapter import MtebEncoder
from embedforge.eval.mteb_tasks import local_retrieval_task, run_mteb
from embedforge.eval.real_data import stdlib_code_search
from embedforge.eval.retrieval import evaluate_retrieval
from embedforge.offline_models import minilm_folder

RESULTS = Path(os.environ.get("EMBEDFORGE_BENCH_RESULTS") or Path(__file__).parent / "results")
SHOWN = ("ndcg_at_1", "ndcg_at_10", "ndcg_at_100", "map_at_10", "mrr_at_10", "recall_at_10", "recall_at_100",
         "precision_at_1")


def main() -> None:
    import mteb
    from sentence_transformers import SentenceTransformer

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--queries", type=int, default=200)
    parser.add_argument("--docs", type=int, default=1000)
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--results-dir", type=Path, default=RESULTS)
    args = parser.parse_args()

    data = stdlib_code_search(n_queries=args.queries, n_docs=args.docs, seed=0, max_chars=1500)
    folder = str(minilm_folder())
    with tempfile.TemporaryDirectory() as tmp:
        beir_dir = write_beir(Path(tmp) / "stdlib-code-search", data)
        embedder = Embedder.from_pretrained(folder, device="cpu", dtype="float32", max_length=args.max_length)
        encoder = MtebEncoder(embedder, batch_size=args.batch_size, name="local/all-MiniLM-L6-v2")
        start = time.perf_counter()
        ours = run_mteb(encoder, [str(beir_dir)], Path(tmp) / "mteb")["stdlib-code-search"]
        ours_s = time.perf_counter() - start
        meta = encoder.mteb_model_meta
        direct = evaluate_retrieval(embedder, beir_dir, batch_size=args.batch_size)["metrics"]["ndcg_at_10"]

        st = SentenceTransformer(folder, device="cpu")
        st.max_seq_length = args.max_length
        start = time.perf_counter()
        (reference,) = mteb.evaluate(st, tasks=[local_retrieval_task(beir_dir)], cache=None, show_progress_bar=False,
                                     encode_kwargs={"batch_size": args.batch_size}).task_results
        st_s = time.perf_counter() - start
    mine, theirs = ours["scores"]["test"][0], reference.to_dict()["scores"]["test"][0]
    keys = [k for k in theirs if isinstance(theirs[k], float) and not math.isnan(theirs[k])]
    largest = max(abs(mine[k] - theirs[k]) for k in keys)
    result = {
        "benchmark": "eval_mteb", "device": "cpu", "threads": torch.get_num_threads(), "torch": torch.__version__,
        "python": platform.python_version(), "cpu": platform.processor() or platform.machine(),
        "embedforge": __version__, "mteb": mteb.__version__, "max_length": args.max_length,
        "data": data.source, "n_queries": len(data.queries), "n_docs": len(data.corpus),
        "model_meta": {"name": meta.name, "revision": meta.revision, "experiment": meta.experiment_name},
        "embedforge_wrapper": {k: mine[k] for k in keys}, "sentence_transformers": {k: theirs[k] for k in keys},
        "largest_difference": largest, "scores_compared": len(keys),
        "embedforge_trec_eval_ndcg_at_10": direct, "seconds": {"wrapper": ours_s, "sentence_transformers": st_s},
    }
    args.results_dir.mkdir(parents=True, exist_ok=True)
    (args.results_dir / "eval_mteb.json").write_text(json.dumps(result, indent=2) + "\n")
    lines = [(f"# mteb {mteb.__version__} through embedforge's wrapper vs sentence-transformers "
             f"(CPU, {result['threads']} threads, max_length {args.max_length})"), "",
             (f"Task: local BEIR folder, {result['n_queries']} queries over {result['n_docs']} documents "
             f"({data.source}), evaluated by mteb's own retrieval evaluator; model all-MiniLM-L6-v2."), "",
             "| score | embedforge wrapper | sentence-transformers | difference |", "|---|---:|---:|---:|"]
    lines += [f"| {k} | {mine[k]:.5f} | {theirs[k]:.5f} | {mine[k] - theirs[k]:+.5f} |" for k in SHOWN if k in keys]
    lines += ["", f"All {len(keys)} scores mteb reports: largest difference {largest:.1e} (mteb rounds to 5 decimals).",
              f"embedforge's own trec_eval transcription on the same folder: nDCG@10 = {direct:.5f}.",
              (f"mteb model meta: name `{meta.name}`, revision `{meta.revision}` (sha256 of the loaded weights and "
              f"spec), experiment `{meta.experiment_name}`."),
              (f"Seconds (one run on a shared machine, not a speed claim): wrapper {ours_s:.1f}, "
              f"sentence-transformers {st_s:.1f}.")]
    (args.results_dir / "eval_mteb.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()

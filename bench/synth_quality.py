"""How good are SmolLM2-135M-Instruct's synthetic queries on real text, and what does a passage cost?

Corpus: the Python reference manual shipped with CPython (`pydoc_data.topics`), cut into 80-word
passages (the demo's chunking), N passages evenly spaced over the manual (default 120).
Each row of the table is one synthesis run over the same passages, scored the same way:

- schema-valid rate: replies that were JSON of the prompt's schema, over all replies received;
- on-topic rate: the share of queries whose own passage all-MiniLM-L6-v2 ranks in its top 10
  among ALL N passages (the same candidate set for every row; random: 10 / N), and the MRR;
- rows, passages with at least one row, exact and near-duplicate queries, words per query, query
  types, and the rows the default filter keeps (copy, near-duplicate, calibrated cosine and round
  trip gates with MiniLM as teacher);
- cost: wall seconds and CPU seconds per passage (CPU time is what a single idle core would take;
  wall time depends on what else ran), generated tokens per second.

    python bench/synth_quality.py --run after                 # synthesise with today's defaults, then score
    python bench/synth_quality.py --score DIR --label before  # score an existing synth output folder
    python bench/synth_quality.py --passages 8 --run after    # a quick check that it works
Results: bench/results/synth_quality.{json,md}; each --run/--score adds or replaces its row.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import time
from pathlib import Path

RESULTS = Path(os.environ.get("EMBEDFORGE_BENCH_RESULTS") or Path(__file__).parent / "results")
WORDS_PER_PASSAGE = 80
TOP_K = 10


def build_passages(path: Path, n: int) -> Path:
    """N 80-word passages of the Python reference manual, evenly spaced, as JSONL (id, text)."""
    from pydoc_data.topics import topics

    from embedforge.data_synth.corpus import load_corpus
    from embedforge.io import write_jsonl

    docs = path.parent / "pydoc-topics.jsonl"
    write_jsonl(docs, ({"id": k, "text": t} for k, t in sorted(topics.items())))
    passages = load_corpus(docs, chunk_tokens=WORDS_PER_PASSAGE, overlap=0)
    step = len(passages) / n
    chosen = [passages[int(i * step)] for i in range(n)]
    write_jsonl(path, ({"id": p.id, "text": p.text} for p in chosen))
    return path


def run_after(corpus: Path, out: Path, batch_size: int, max_attempts: int) -> dict:
    """Today's synthesis defaults for a small local generator (strategy auto -> one_call)."""
    from embedforge.data_synth import SynthConfig, synthesize

    config = SynthConfig(corpus=str(corpus), output=str(out), model="builtin:smollm2", chunk_tokens=None,
                         batch_size=batch_size, max_attempts=max_attempts, judge=None)
    cpu0, wall0 = time.process_time(), time.monotonic()
    outcome = synthesize(config)
    cpu, wall = time.process_time() - cpu0, time.monotonic() - wall0
    return {
        "command": f"synthesize(SynthConfig(model='builtin:smollm2', batch_size={batch_size}, "
                   f"max_attempts={max_attempts}, chunk_tokens=None))",
        "strategy": outcome.strategy,
        "decoding": outcome.decoding,
        "wall_s": round(wall, 1),
        "cpu_s": round(cpu, 1),
        "tokens_per_s": outcome.tokens_per_second,
    }


def score(folder: Path, corpus: Path) -> dict:
    """The measures of the module docstring for one synth output folder."""
    import numpy as np

    from embedforge.data_synth.filtering import FilterConfig, filter_rows
    from embedforge.data_synth.gates import positive_ranks
    from embedforge.data_synth.models import load_embedder
    from embedforge.data_synth.quality import quality_summary
    from embedforge.data_synth.shards import read_finished_rows
    from embedforge.io import iter_jsonl

    rows = [r for p in sorted(folder.glob("pairs-*.jsonl")) for r in read_finished_rows(p)]
    reports = [json.loads(m.read_text())["report"] for m in sorted(folder.glob("manifest-*.json"))]
    manifest = json.loads(next(folder.glob("manifest-*.json")).read_text())
    passages = [obj["text"] for _, obj in iter_jsonl(corpus)]
    teacher = load_embedder("builtin:minilm")
    summary = quality_summary(rows, reports)
    clean = [{k: v for k, v in r.items() if k != "quality"} for r in rows]
    ranks = np.array(positive_ranks(clean, teacher, use_instructions=False, extra_documents=passages))
    kept = filter_rows([dict(r) for r in clean], FilterConfig(teacher="builtin:minilm"), teacher)
    seconds = sum(rep.get("seconds", 0) for rep in reports)
    return {
        "passages": len(passages),
        "rows": len(rows),
        "passages_with_rows": summary["passages_with_rows"],
        "llm_calls": sum(rep.get("llm_calls", 0) for rep in reports),
        "replies": summary["replies"],
        "schema_valid_rate": summary["schema_valid_rate"],
        "invalid_replies": {k: v for rep in reports for k, v in rep.get("invalid_outputs", {}).items()},
        "passages_failed": {k: v for rep in reports for k, v in rep.get("passages_failed", {}).items()},
        "on_topic_rate": round(float((ranks < TOP_K).mean()), 4) if len(ranks) else None,
        "on_topic_random_baseline": round(min(TOP_K, len(passages)) / len(passages), 4),
        "mrr": round(float((1.0 / (ranks + 1)).mean()), 4) if len(ranks) else None,
        "on_topic_passages": len({r["positive"] for r, k in zip(rows, ranks) if k < TOP_K}),
        "exact_duplicate_queries": summary["exact_duplicate_queries"],
        "near_duplicate_queries": summary["near_duplicate_queries"],
        "query_words": summary["query_words"],
        "question_types": summary["question_types"],
        "kept_by_default_filter": len(kept.kept),
        "filter_drops": {gate: sum(c.values()) for gate, c in kept.drops.items()},
        "filter_cosine_threshold": kept.thresholds.get("cosine"),
        "generation_s": round(seconds, 1),
        "seconds_per_passage": round(seconds / len(passages), 2),
        "strategy": manifest.get("strategy", "persona"),
        "decoding": manifest.get("decoding", "prompt"),
        "sampling": manifest.get("sampling") or {k: manifest["config"].get(k)
                                                 for k in ("temperature", "top_p", "max_new_tokens")},
        "examples": [(r["passage_id"], r["query"]) for r in rows[:: max(1, len(rows) // 8)]][:8],
    }


def markdown(result: dict) -> str:
    rows = result["rows"]
    lines = [
        "# SmolLM2-135M-Instruct as generator: schema-valid and on-topic rates, cost per passage",
        "",
        (f"Corpus: {result['corpus']}. Judge for on topic: all-MiniLM-L6-v2, the query's passage in its top "
        f"{TOP_K} among all passages. Machine: {result['machine']}. Timings were taken on a shared machine "
        "(other jobs running, see `load_average`): CPU seconds per passage (one thread) are the comparable "
        "cost, wall seconds are not."),
        "",
        ("| run | strategy / decoding | passages | rows (passages with rows) | schema-valid | on topic "
        "(random) | MRR | dup / near-dup | words median | kept by default filter | CPU s / passage | "
        "wall s / passage | tokens/s |"),
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for label, row in rows.items():
        cpu = row.get("cpu_s_per_passage")
        lines.append(
            f"| {label} | {row['strategy']} / {row['decoding']} | {row['passages']} | {row['rows']} "
            f"({row['passages_with_rows']}) | {row['schema_valid_rate']:.1%} of {row['replies']} | "
            f"{row['on_topic_rate']:.1%} ({row['on_topic_random_baseline']:.1%}) | {row['mrr']:.3f} | "
            f"{row['exact_duplicate_queries']} / {row['near_duplicate_queries']} | "
            f"{row['query_words'].get('median', 0):g} | {row['kept_by_default_filter']} | "
            f"{'-' if cpu is None else f'{cpu:.2f}'} | {row['wall_s_per_passage']:.2f} | "
            f"{row.get('tokens_per_s') or '-'} |"
        )
    lines += ["", "Settings and commands:", ""]
    for label, row in rows.items():
        lines.append(f"- **{label}**: {row.get('command', '')}; sampling {row['sampling']}; invalid replies "
                     f"{row['invalid_replies'] or 'none'}; passages given up {row['passages_failed'] or 'none'}; "
                     f"query types {row['question_types']}; filter drops {row['filter_drops']} (cosine "
                     f"threshold {row['filter_cosine_threshold']}).")
    lines += ["", "Example queries (passage id: query):", ""]
    for label, row in rows.items():
        lines.append(f"- **{label}**: " + "; ".join(f"`{pid}`: {q!r}" for pid, q in row["examples"]))
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--passages", type=int, default=120)
    parser.add_argument("--work", default="/tmp/embedforge-synth-quality")
    parser.add_argument("--run", choices=["after"], help="synthesise with today's defaults, then score")
    parser.add_argument("--score", help="score this existing synth output folder instead")
    parser.add_argument("--label", default=None, help="row label (default: the --run name)")
    parser.add_argument("--command", default="", help="--score: the command that produced the folder")
    parser.add_argument("--cpu-s", type=float, default=None, help="--score: CPU seconds the run took (from `time`)")
    parser.add_argument("--wall-s", type=float, default=None, help="--score: wall seconds the run took")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--max-attempts", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--output", default=str(RESULTS / "synth_quality"))
    args = parser.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    import torch

    torch.set_num_threads(args.threads)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    corpus = work / f"passages-{args.passages}.jsonl"
    if not corpus.exists():
        build_passages(corpus, args.passages)
    label = args.label or args.run or "scored"
    if args.run:
        out = work / f"{label}-{args.passages}"
        timing = run_after(corpus, out, args.batch_size, args.max_attempts)
        row = {**score(out, corpus), **timing}
    elif args.score:
        row = {**score(Path(args.score), corpus), "command": args.command, "cpu_s": args.cpu_s,
               "wall_s": args.wall_s}
    else:
        parser.error("give --run after or --score DIR")
    row["wall_s_per_passage"] = round((row.get("wall_s") or row["generation_s"]) / row["passages"], 2)
    row["cpu_s_per_passage"] = None if row.get("cpu_s") is None else round(row["cpu_s"] / row["passages"], 2)
    row["threads"] = args.threads
    row["load_average"] = os.getloadavg()
    path = Path(args.output)
    result = json.loads(path.with_suffix(".json").read_text()) if path.with_suffix(".json").exists() else {}
    result.update({
        "corpus": f"pydoc_data.topics (CPython {platform.python_version()}), {args.passages} passages of "
                  f"{WORDS_PER_PASSAGE} words",
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch threads "
                   f"{args.threads}",
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
    })
    result.setdefault("rows", {})[label] = row
    path.parent.mkdir(parents=True, exist_ok=True)
    path.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    path.with_suffix(".md").write_text(markdown(result))
    print(markdown(result))


if __name__ == "__main__":
    main()

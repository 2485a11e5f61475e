"""Hard-negative mining on 100k short passages on CPU: time and peak memory of `embedforge mine`
against sentence-transformers' `mine_hard_negatives` (the peer), same model, data and settings.

Each side runs in its own subprocess so peak RSS is its own (os.wait4). The corpus holds
case/spacing variants of 1% of the positives, to count how often a miner returns a duplicate of
the positive as a "negative".

    python bench/mine_100k.py                      # 100k passages, 1000 queries, tiny Qwen3, 1 thread
    python bench/mine_100k.py --model minilm --n-corpus 20000

The default embedder is a 2-layer, 64-wide random-weight Qwen3 with the real Qwen tokenizer (mean
pooling, saved in sentence-transformers layout so the peer loads the same model): on a shared 2-core
CPU, all-MiniLM-L6-v2 embeds ~60 short texts/s, i.e. ~30 min per side for 100k passages. The model
is identical on both sides, so the comparison is of the mining machinery (chunked embedding, index,
search, filtering); `--model minilm` measures with a real encoder.
Results: bench/results/mine_100k.{json,md}
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SUBJECTS = [
    "The farmer",
    "A nurse",
    "The old bridge",
    "Our cat",
    "The river",
    "A violinist",
    "The volcano",
    "My bank",
    "The tennis coach",
    "A rocket",
    "The baker",
    "A judge",
    "The museum",
    "A student",
    "The glacier",
]
VERBS = [
    "repairs",
    "watches",
    "floods",
    "paints",
    "feeds",
    "measures",
    "sells",
    "visits",
    "cleans",
    "studies",
]
OBJECTS = [
    "the red barn",
    "a broken fence",
    "the night sky",
    "fresh bread",
    "the city walls",
    "old maps",
    "wild horses",
    "a tax form",
    "the school garden",
    "copper pipes",
    "a chess set",
    "the harbour",
]
WHEN = [
    "every spring",
    "after the storm",
    "on Sundays",
    "before dawn",
    "in winter",
    "twice a year",
    "at noon",
]
PLACES = [
    "in Lyon",
    "near Oslo",
    "in a small village",
    "by the sea",
    "in the mountains",
    "downtown",
    "in Kyoto",
]


def build_data(folder: Path, n_corpus: int, n_queries: int, seed: int = 0) -> dict:
    rng = random.Random(seed)
    texts, seen = [], set()
    while len(texts) < n_corpus:
        t = (
            f"{rng.choice(SUBJECTS)} {rng.choice(VERBS)} {rng.choice(OBJECTS)} {rng.choice(WHEN)} "
            f"{rng.choice(PLACES)}, case {rng.randrange(10**6)}."
        )
        if t not in seen:
            seen.add(t)
            texts.append(t)
    positives = rng.sample(range(n_corpus), n_queries)
    pairs = []
    for i in positives:
        # a query close to its positive under any embedder (the tiny model's weights are random), so
        # the positive ranks near the top and the rank range below it holds real candidates
        pairs.append({"query": "find " + texts[i].lower().rstrip("."), "positive": texts[i]})
    # duplicates of 1% of the positives: same text up to case and spacing
    dups = [texts[i].upper().replace(" ", "  ") for i in positives[: max(1, n_queries // 100)]]
    corpus = texts + dups
    rng.shuffle(corpus)
    with open(folder / "corpus.jsonl", "w", encoding="utf-8") as fh:
        for j, t in enumerate(corpus):
            fh.write(json.dumps({"id": j, "text": t}) + "\n")
    with open(folder / "pairs.jsonl", "w", encoding="utf-8") as fh:
        fh.writelines(json.dumps(row) + "\n" for row in pairs)
    return {"corpus": len(corpus), "queries": len(pairs), "duplicates_of_positives": len(dups)}


def prepare_model(kind: str, folder: Path) -> tuple[str, str]:
    """(path, description) of the embedder both sides load."""
    if kind == "minilm":
        from embedforge.offline_models import minilm_folder

        return str(minilm_folder()), "all-MiniLM-L6-v2"
    from embedforge.embedder import Embedder
    from embedforge.offline_models import build_tiny_qwen3

    raw = build_tiny_qwen3(folder / "tiny-raw", eos_postprocessor=True)
    # mean pooling: a random model's last-token states are all alike (cos ~0.999), its mean-pooled
    # token embeddings behave like a lexical embedder, so neighbours and margins are meaningful
    Embedder.from_pretrained(raw, pooling="mean").save_pretrained(folder / "tiny-st")
    return str(folder / "tiny-st"), "tiny random Qwen3 (2 layers, hidden 64, Qwen BPE), mean pooling"


def violations(rows: list[dict]) -> dict:
    from embedforge.data_synth.corpus import text_hash

    same = sum(n == r["positive"] for r in rows for n in r["negatives"])
    dup = sum(text_hash(n) == text_hash(r["positive"]) for r in rows for n in r["negatives"])
    return {
        "negative_is_positive": same,
        "negative_duplicates_positive": dup,
        "negatives": sum(len(r["negatives"]) for r in rows),
        "rows_short": sum(len(r["negatives"]) < 7 for r in rows),
    }


def worker_ours(data: Path, out: Path, model: str) -> dict:
    from embedforge.data_synth.filtering import read_pairs
    from embedforge.data_synth.mine import MineConfig, load_mine_corpus, mine_rows

    t0 = time.monotonic()
    passages = load_mine_corpus(data / "corpus.jsonl")
    rows, _ = read_pairs([data / "pairs.jsonl"])
    load_s = time.monotonic() - t0
    config = MineConfig(
        model=model,
        num_negatives=7,
        rank_start=10,
        rank_end=100,
        margin=0.05,
        index="flat",
        chunk_size=8192,
        batch_size=256,
        max_length=64,
        use_instructions=False,
    )
    report = mine_rows(rows, passages, config, out)
    mined = [json.loads(x) for x in (out / "mined-00000-of-00001.jsonl").read_text().splitlines()]
    return {
        "load_s": load_s,
        "embed_corpus_s": report.embed_corpus_s,
        "embed_queries_s": report.embed_queries_s,
        "search_and_select_s": report.search_s,
        "mine_total_s": report.total_s,
        **violations(mined),
    }


def worker_peer(data: Path, model: str) -> dict:
    from datasets import Dataset
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.util import mine_hard_negatives

    t0 = time.monotonic()
    corpus = [json.loads(x)["text"] for x in (data / "corpus.jsonl").read_text().splitlines()]
    pairs = [json.loads(x) for x in (data / "pairs.jsonl").read_text().splitlines()]
    st = SentenceTransformer(model, device="cpu")
    st.max_seq_length = 64
    dataset = Dataset.from_dict(
        {"query": [p["query"] for p in pairs], "positive": [p["positive"] for p in pairs]}
    )
    load_s = time.monotonic() - t0
    t1 = time.monotonic()
    mined = mine_hard_negatives(
        dataset,
        st,
        corpus=corpus,
        range_min=10,
        range_max=100,
        absolute_margin=0.05,
        num_negatives=7,
        sampling_strategy="random",
        batch_size=256,
        use_faiss=True,
        output_format="n-tuple",
        verbose=False,
    )
    mine_s = time.monotonic() - t1
    cols = [c for c in mined.column_names if c.startswith("negative")]
    rows = [{"positive": r["positive"], "negatives": [r[c] for c in cols]} for r in mined]
    # n-tuple output drops queries that found fewer than K negatives
    return {"load_s": load_s, "mine_total_s": mine_s, "rows_out": len(rows), **violations(rows)}


def run_side(side: str, data: Path, out: Path, model: str, threads: int) -> dict:
    env = {
        **os.environ,
        "OMP_NUM_THREADS": str(threads),
        "MKL_NUM_THREADS": str(threads),
        "TOKENIZERS_PARALLELISM": "false",
        "HF_HUB_OFFLINE": "1",
    }
    result_file = out / f"{side}.json"
    cmd = [
        sys.executable,
        __file__,
        "--worker",
        side,
        "--data",
        str(data),
        "--work",
        str(out / side),
        "--model-path",
        model,
        "--result",
        str(result_file),
    ]
    began = time.monotonic()
    proc = subprocess.Popen(cmd, env=env)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.monotonic() - began
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"{side} worker failed with status {status}")
    result = json.loads(result_file.read_text())
    result.update(wall_s=round(wall, 2), peak_rss_mb=round(usage.ru_maxrss / 1024, 1))
    return result


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--n-corpus", type=int, default=100_000)
    parser.add_argument("--n-queries", type=int, default=1000)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--model", choices=("tiny", "minilm"), default="tiny")
    parser.add_argument("--skip-peer", action="store_true")
    parser.add_argument("--results", default=os.environ.get("EMBEDFORGE_BENCH_RESULTS") or str(Path(__file__).parent / "results"))
    parser.add_argument("--worker", choices=("ours", "peer"), help=argparse.SUPPRESS)
    parser.add_argument("--data", help=argparse.SUPPRESS)
    parser.add_argument("--work", help=argparse.SUPPRESS)
    parser.add_argument("--model-path", help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.worker:
        import torch

        torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
        data = Path(args.data)
        result = (
            worker_ours(data, Path(args.work), args.model_path)
            if args.worker == "ours"
            else worker_peer(data, args.model_path)
        )
        Path(args.result).write_text(json.dumps(result, indent=2))
        return

    with tempfile.TemporaryDirectory(prefix="mine100k-") as tmp:
        tmp = Path(tmp)
        model, model_name = prepare_model(args.model, tmp)
        sizes = build_data(tmp, args.n_corpus, args.n_queries)
        results = {"ours": run_side("ours", tmp, tmp, model, args.threads)}
        if not args.skip_peer:
            results["peer"] = run_side("peer", tmp, tmp, model, args.threads)
    record = {
        "benchmark": "mine_100k",
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "data": sizes,
        "settings": {
            "model": model_name,
            "num_negatives": 7,
            "rank_range": [10, 100],
            "margin": 0.05,
            "index": "faiss flat (exact)",
            "batch_size": 256,
            "max_length": 64,
            "threads": args.threads,
        },
        "device": f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores visible, "
        f"{args.threads} thread(s) used, machine shared with other jobs)",
        "peer": "sentence_transformers.util.mine_hard_negatives (use_faiss=True, sampling_strategy=random, "
        "absolute_margin=0.05)",
        "results": results,
    }
    if "peer" in results:
        record["ratios_ours_over_peer"] = {
            "wall_s": round(results["ours"]["wall_s"] / results["peer"]["wall_s"], 3),
            "peak_rss_mb": round(results["ours"]["peak_rss_mb"] / results["peer"]["peak_rss_mb"], 3),
        }
    out = Path(args.results)
    out.mkdir(parents=True, exist_ok=True)
    (out / "mine_100k.json").write_text(json.dumps(record, indent=2) + "\n")
    (out / "mine_100k.md").write_text(markdown(record))
    print(markdown(record))


def markdown(record: dict) -> str:
    r = record["results"]
    lines = [
        f"# Hard-negative mining, {record['data']['corpus']:,} passages, {record['data']['queries']} queries",
        "",
        f"{record['date']}; {record['device']}.",
        f"Settings: {json.dumps(record['settings'])}.",
        f"Peer: {record['peer']}.",
        "",
        (
            "| miner | wall s | peak RSS MB | negatives | rows short of K | negative == positive | "
            "negative duplicates positive |"
        ),
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for name, res in r.items():
        lines.append(
            f"| {name} | {res['wall_s']} | {res['peak_rss_mb']} | {res['negatives']} | {res['rows_short']} | "
            f"{res['negative_is_positive']} | {res['negative_duplicates_positive']} |"
        )
    if "ratios_ours_over_peer" in record:
        ratios = record["ratios_ours_over_peer"]
        lines += ["", f"Ours / peer: wall time x{ratios['wall_s']}, peak memory x{ratios['peak_rss_mb']}."]
    ours = r["ours"]
    lines += [
        "",
        (
            f"Ours, split: corpus embedding {ours['embed_corpus_s']:.1f} s, query embedding "
            f"{ours['embed_queries_s']:.1f} s, faiss search + selection {ours['search_and_select_s']:.1f} s."
        ),
        f"The corpus holds {record['data']['duplicates_of_positives']} case/spacing duplicates of positives.",
    ]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()

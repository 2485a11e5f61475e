"""Benchmark: training speed and memory on real data with long-tailed lengths, embedforge packed vs
padded vs sentence-transformers, same batches.

Data: Python standard-library code search, docstring summary -> function source (a few tokens to
`--max-length`), the long tail a padded batch pays for. Every side trains the same global batches
(in-batch negatives only, temperature 0.05 = MNRL's scale 20, AdamW, full fine-tuning) in its own
fresh process:

  * embedforge-packed: `embedforge.train`'s step with `packing: true` (decoders: texts concatenated,
    block-diagonal attention, no pad positions computed);
  * embedforge-padded: the same step with `packing: false` (chunks of similar length, padded);
  * sentence-transformers: `MultipleNegativesRankingLoss(scale=20)`, one forward per column padded to
    its longest text, as `SentenceTransformerTrainer` runs it.

Both embedforge sides run with their defaults otherwise (the token budget per forward is derived from
free memory). Reported per side: non-padding tokens/s over the timed steps, the process's peak RSS
(weights, optimizer state and the steps, what a user sees in `top`) and the peak above the level at
the first timed step; median of `--repeats` fresh processes, alternating. Ratios are against
sentence-transformers in the same run. Encoders (MiniLM) cannot pack and run padded only.

    python bench/train_long_tail.py                 # tiny Qwen3, SmolLM2, MiniLM; ~12 min on 2 idle cores
    python bench/train_long_tail.py --models tiny --steps 2 --repeats 1 --results-dir /tmp/x   # smoke
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

from train import PeakRSS, machine, model_folder

IMPLS = ("embedforge-packed", "embedforge-padded", "sentence-transformers")
DECODERS = {"tiny", "smollm2"}


def code_pairs(n: int, max_chars: int) -> list[dict]:
    from embedforge.eval.real_data import stdlib_code_search

    data = stdlib_code_search(n_queries=n, n_docs=n, seed=0, max_chars=max_chars)
    return [{"query": text, "positive": data.corpus[next(iter(data.qrels[qid]))]} for qid, text in data.queries.items()]


def global_batches(rows: list[dict], batch_size: int, steps: int) -> list[list[dict]]:
    import random

    order = list(range(len(rows)))
    random.Random(0).shuffle(order)
    return [[rows[i] for i in order[s * batch_size:(s + 1) * batch_size]] for s in range(steps)]


def embedforge_step(args, rows):
    from embedforge.train.config import TrainConfig
    from embedforge.train.data import Batch, PairRow
    from embedforge.train.trainer import Trainer

    cfg = TrainConfig.model_validate({
        "model": args.model, "method": "full", "output_dir": tempfile.mkdtemp(), "progress_bar": False,
        "data": [{"path": "bench", "num_negatives": 0}], "batch_size": args.batch_size, "lr": 1e-5,
        "max_length": args.max_length, "max_grad_norm": None, "scheduler": "constant",
        "packing": args.impl == "embedforge-packed", "loss": {"preset": "infonce", "temperature": 0.05},
    })
    trainer = Trainer(cfg, inline_data={"bench": rows})
    trainer.setup()
    counter = iter(range(10**9))

    def run(batch):
        pairs = [PairRow(r["query"], r["positive"], ()) for r in batch]
        _, _, tokens = trainer.backward(Batch(next(counter), "bench", pairs, None, 0))
        trainer.optimizer.step()
        trainer.optimizer.zero_grad(set_to_none=True)
        return tokens

    return run


def st_step(args, rows):
    import torch
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.losses import MultipleNegativesRankingLoss

    model = SentenceTransformer(args.model, device="cpu")
    model.max_seq_length = args.max_length
    model.train()
    loss = MultipleNegativesRankingLoss(model, scale=20.0)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)

    def run(batch):
        columns = [[r["query"] for r in batch], [r["positive"] for r in batch]]
        features = [dict(model.tokenize(col)) for col in columns]
        tokens = sum(int(f["attention_mask"].sum()) for f in features)
        loss(features, None).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return tokens

    return run


def worker(args) -> dict:
    import torch

    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    rows = code_pairs(args.rows, args.max_chars)
    batches = global_batches(rows, args.batch_size, args.warmup + args.steps)
    run = (st_step if args.impl == "sentence-transformers" else embedforge_step)(args, rows)
    times, tokens, meter = [], 0, None
    for i, batch in enumerate(batches):
        if i == args.warmup:
            meter = PeakRSS().__enter__()
        start = time.perf_counter()
        n = run(batch)
        if i >= args.warmup:
            times.append(time.perf_counter() - start)
            tokens += n
    meter.__exit__(None, None, None)
    return {"impl": args.impl, "step_s": times, "tokens": tokens, "tokens_per_s": tokens / sum(times),
            "peak_step_mb": meter.delta_mb,
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def length_profile(args) -> dict:
    """Token lengths of the texts the timed steps train on (the tail padding pays for)."""
    from transformers import AutoTokenizer

    from embedforge.offline_models import minilm_folder

    rows = code_pairs(args.rows, args.max_chars)
    texts = [t for batch in global_batches(rows, args.batch_size, args.warmup + args.steps) for r in batch
             for t in (r["query"], r["positive"])]
    tokenizer = AutoTokenizer.from_pretrained(str(minilm_folder()))
    lengths = sorted(min(len(ids), args.max_length) for ids in tokenizer(texts)["input_ids"])
    pick = lambda q: lengths[min(len(lengths) - 1, int(q * len(lengths)))]
    return {"texts": len(lengths), "p10": pick(0.1), "p50": pick(0.5), "p90": pick(0.9), "max": lengths[-1],
            "padding_share_if_padded_to_max": 1 - sum(lengths) / (len(lengths) * lengths[-1])}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="tiny,smollm2,minilm")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--max-length", type=int, default=512)
    parser.add_argument("--max-chars", type=int, default=2400)
    parser.add_argument("--rows", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--results-dir", default=os.environ.get("EMBEDFORGE_BENCH_RESULTS") or str(HERE / "results"))
    parser.add_argument("--name", default="train_long_tail", help="results file name, without suffix")
    parser.add_argument("--impl", help=argparse.SUPPRESS)
    parser.add_argument("--model", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.impl:
        print(json.dumps(worker(args)))
        return 0

    workdir = Path(tempfile.mkdtemp(prefix="bench-long-tail-"))
    report = {"machine": machine(), "load_average_at_start": os.getloadavg()[0], "settings": {k: v for k, v in vars(args).items() if k not in ("impl", "model", "name")},
              "lengths": length_profile(args), "models": {}}
    forwarded = ["--steps", str(args.steps), "--warmup", str(args.warmup), "--batch-size", str(args.batch_size),
                 "--max-length", str(args.max_length), "--max-chars", str(args.max_chars), "--rows", str(args.rows),
                 "--threads", str(args.threads)]
    for name in args.models.split(","):
        folder = model_folder(name, workdir)
        impls = [i for i in IMPLS if name in DECODERS or i != "embedforge-packed"]
        runs: dict[str, list[dict]] = {impl: [] for impl in impls}
        for _ in range(args.repeats):
            for impl in impls:
                done = subprocess.run([sys.executable, __file__, "--impl", impl, "--model", folder, *forwarded],
                                      capture_output=True, text=True, check=False,
                                      env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})
                if done.returncode:
                    raise SystemExit(f"{name} {impl}:\n{done.stderr[-4000:]}")
                runs[impl].append(json.loads(done.stdout.strip().splitlines()[-1]))
                print(f"{name} {impl}: {runs[impl][-1]['tokens_per_s']:.0f} tok/s, "
                      f"peak RSS {runs[impl][-1]['peak_rss_mb']:.0f} MB", flush=True)
        summary = {impl: {key: statistics.median(r[key] for r in rs)
                          for key in ("tokens_per_s", "peak_rss_mb", "peak_step_mb")} | {"tokens": rs[0]["tokens"]}
                   for impl, rs in runs.items()}
        st = summary["sentence-transformers"]
        for impl, s in summary.items():
            s["speed_vs_st"] = s["tokens_per_s"] / st["tokens_per_s"]
            s["peak_rss_vs_st"] = s["peak_rss_mb"] / st["peak_rss_mb"]
        report["models"][name] = {"summary": summary, "runs": runs}
    out = Path(args.results_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{args.name}.json").write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    (out / f"{args.name}.md").write_text(markdown(report), encoding="utf-8")
    print(markdown(report))
    return 0


def markdown(report: dict) -> str:
    s, lengths = report["settings"], report["lengths"]
    lines = [
        "# Training on long-tailed real data: packed vs padded vs sentence-transformers",
        "",
        (f"Machine: {report['machine']['description']}, {s['threads']} torch thread(s), load average "
         f"{report['load_average_at_start']:.2f} at start. "
         f"Data: stdlib code search (docstring summary -> function source), {s['steps']} timed steps of "
         f"{s['batch_size']} pairs after {s['warmup']} warm-up, max length {s['max_length']}; text lengths in "
         f"MiniLM tokens p10 {lengths['p10']}, p50 {lengths['p50']}, p90 {lengths['p90']}, max {lengths['max']} "
         f"({100 * lengths['padding_share_if_padded_to_max']:.0f}% of positions would be padding at the longest). "
         f"Full fine-tuning, in-batch InfoNCE at tau 0.05 (= MNRL scale 20), AdamW. Median of {s['repeats']} "
         "fresh processes per side, alternating. tok/s counts non-padding tokens; peak RSS is the process's "
         "high-water mark (weights + optimizer + steps); step peak is above the level at the first timed step."),
        "",
        "| model | side | tok/s | speed vs ST | peak RSS MB | RSS vs ST | step peak MB |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for name, block in report["models"].items():
        for impl, r in block["summary"].items():
            lines.append(f"| {name} | {impl} | {r['tokens_per_s']:.0f} | {r['speed_vs_st']:.2f}x | "
                         f"{r['peak_rss_mb']:.0f} | {r['peak_rss_vs_st']:.2f}x | {r['peak_step_mb']:.0f} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())

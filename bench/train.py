"""Training benchmarks for `embedforge.train`.

speed:   tokens/s and peak memory of one contrastive training step (GradCache + Matryoshka, hard
         negatives) against sentence-transformers' CachedMultipleNegativesRankingLoss wrapped in
         MatryoshkaLoss: same model, same batches (drawn once by our sampler and handed to both),
         same negatives, mini-batch size, widths, optimizer (AdamW) and max length. Each side runs in
         its own fresh process, alternating, several repeats; medians are reported.
quality: held-out nDCG@10 before and after fine-tuning on Python standard-library code search
         (docstring summary -> function body), training and test packages disjoint.

    python bench/train.py speed   [--models tiny,minilm] [--steps 6] [--repeats 3]
    python bench/train.py quality [--model minilm|smollm2|PATH] [--steps N] [--lora]

Results: bench/results/train_speed.{json,md}, bench/results/train_quality_<model>.{json,md}.
The loss on our side is restricted to the terms MNRL has (query against every positive and hard
negative, temperature 0.05 = MNRL scale 20, no margin mask), so both compute the same objective.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import sysconfig
import tempfile
import threading
import time
from pathlib import Path

RESULTS = Path(os.environ.get("EMBEDFORGE_BENCH_RESULTS") or Path(__file__).resolve().parent / "results")
HELD_OUT_PACKAGES = ["asyncio", "email", "json", "logging", "http", "urllib", "xml", "concurrent", "importlib",
                     "unittest"]


# --- data ---------------------------------------------------------------------------------------


def stdlib_packages() -> list[str]:
    root = Path(sysconfig.get_paths()["stdlib"])
    modules = {p.stem for p in root.glob("*.py")}
    modules |= {p.name for p in root.iterdir() if p.is_dir() and (p / "__init__.py").exists()}
    return sorted(modules)


def stdlib_rows(n: int, negatives: int, max_chars: int) -> list[dict]:
    """Training pairs from the non-held-out stdlib packages; negatives are other functions' code."""
    import random

    from embedforge.eval.real_data import stdlib_code_search

    packages = [p for p in stdlib_packages() if p not in HELD_OUT_PACKAGES]
    data = stdlib_code_search(n_queries=n, n_docs=n, packages=packages, seed=0, max_chars=max_chars)
    rows = [{"query": text, "positive": data.corpus[next(iter(data.qrels[qid]))]} for qid, text in data.queries.items()]
    rng = random.Random(0)
    for i, row in enumerate(rows):
        others = [rows[j]["positive"] for j in rng.sample(range(len(rows)), negatives + 1) if j != i]
        row["negatives"] = others[:negatives]
    return rows


# --- models -------------------------------------------------------------------------------------


def model_folder(name: str, workdir: Path) -> str:
    """A sentence-transformers folder both libraries load with the same pooling."""
    from embedforge import Embedder
    from embedforge.offline_models import build_tiny_qwen3, minilm_folder, smollm2_folder

    if name == "minilm":
        return str(minilm_folder())
    if name == "tiny":
        raw = build_tiny_qwen3(workdir / "tiny-qwen3-raw", eos_postprocessor=True)
    elif name == "smollm2":
        raw = smollm2_folder()
    else:
        return name
    folder = workdir / f"{name}-st"
    if not (folder / "modules.json").exists():
        Embedder.from_pretrained(raw, dtype="float32", device="cpu").save_pretrained(folder)
    return str(folder)


# --- speed: one worker process per measurement --------------------------------------------------


class PeakRSS:
    """Peak resident memory of this process while the block runs (sampled every 2 ms), above the
    memory at entry; on CUDA, torch's peak allocation above the allocation at entry."""

    def __init__(self):
        import psutil

        self.process = psutil.Process()
        self.peak = self.base = 0
        self._stop = threading.Event()

    def _sample(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, self.process.memory_info().rss)
            time.sleep(0.002)

    def __enter__(self):
        import torch

        self.cuda = torch.cuda.is_available()
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated()
        else:
            self.base = self.peak = self.process.memory_info().rss
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc):
        import torch

        if self.cuda:
            torch.cuda.synchronize()
            self.peak = torch.cuda.max_memory_allocated()
        else:
            self._stop.set()
            self._thread.join()
        self.delta_mb = (self.peak - self.base) / 2**20


def draw_batches(rows: list[dict], batch_size: int, steps: int, negatives: int) -> list[list[dict]]:
    """The global batches our sampler serves (one source, seeded): both sides train on these."""
    from embedforge.train.config import DatasetSettings
    from embedforge.train.data import MixingSampler, choose_negatives, load_sources

    sources, _ = load_sources([DatasetSettings(path="bench", num_negatives=negatives)], {"bench": rows})
    sampler = MixingSampler(sources, batch_size, seed=0)
    batches = []
    for _ in range(steps):
        batch = sampler.next_batch()
        negs = choose_negatives(batch, seed=0)
        batches.append([{"query": r.query, "positive": r.positive, "negatives": n} for r, n in zip(batch.rows, negs)])
    return batches


def worker(args) -> dict:
    import torch

    torch.manual_seed(0)
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    rows = stdlib_rows(args.rows, args.negatives, args.max_chars)
    batches = draw_batches(rows, args.batch_size, args.warmup + args.steps, args.negatives)
    step = ours_step if args.impl == "embedforge" else st_step
    run = step(args, rows)
    times, tokens = [], 0
    for i, batch in enumerate(batches):
        if i == args.warmup:
            meter = PeakRSS().__enter__()
        start = time.perf_counter()
        n_tokens = run(batch)
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        if i >= args.warmup:
            times.append(time.perf_counter() - start)
            tokens += n_tokens
    meter.__exit__(None, None, None)
    return {"impl": args.impl, "model": args.model, "step_s": times, "tokens": tokens,
            "tokens_per_s": tokens / sum(times), "peak_step_mb": meter.delta_mb}


def ours_step(args, rows):
    import tempfile as tf

    from embedforge.train.config import TrainConfig
    from embedforge.train.data import Batch, PairRow
    from embedforge.train.trainer import Trainer

    cfg = TrainConfig.model_validate({
        "model": args.model, "method": "full", "output_dir": tf.mkdtemp(), "progress_bar": False,
        "data": [{"path": "bench", "num_negatives": args.negatives}], "batch_size": args.batch_size,
        "mini_batch_size": args.mini_batch_size, "max_length": args.max_length, "lr": 1e-5, "max_grad_norm": None,
        "scheduler": "constant", "loss": {"temperature": 0.05, "terms": ["hard", "qd"], "margin": None,
                                          "mask_duplicates": False, "matryoshka_dims": args.dims},
    })
    trainer = Trainer(cfg, inline_data={"bench": rows})
    trainer.setup()
    counter = iter(range(10**9))

    def run(batch):
        rows_ = [PairRow(r["query"], r["positive"], tuple(r["negatives"])) for r in batch]
        _, _, tokens = trainer.backward(Batch(next(counter), "bench", rows_, None, args.negatives))
        trainer.optimizer.step()
        trainer.optimizer.zero_grad(set_to_none=True)
        return tokens

    return run


def st_step(args, rows):
    import torch
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.losses import CachedMultipleNegativesRankingLoss, MatryoshkaLoss

    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = SentenceTransformer(args.model, device=device)
    model.max_seq_length = args.max_length
    model.train()
    base = CachedMultipleNegativesRankingLoss(model, scale=20.0, mini_batch_size=args.mini_batch_size)
    loss = MatryoshkaLoss(model, base, matryoshka_dims=args.dims)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)

    def run(batch):
        columns = [[r["query"] for r in batch], [r["positive"] for r in batch]]
        columns += [[r["negatives"][k] for r in batch] for k in range(args.negatives)]
        features = [{k: v.to(device) for k, v in model.tokenize(col).items() if hasattr(v, "to")} for col in columns]
        tokens = sum(int(f["attention_mask"].sum()) for f in features)
        value = loss(features, None)
        value.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return tokens

    return run


def speed(args) -> None:
    workdir = Path(tempfile.mkdtemp(prefix="bench-train-"))
    results = []
    for name in args.models.split(","):
        folder = model_folder(name, workdir)
        dims = [int(d) for d in args.dims.split(",")] if name != "tiny" else [16, 32, 64]
        runs = {"embedforge": [], "sentence-transformers": []}
        for _ in range(args.repeats):
            for impl, done_runs in runs.items():
                command = [sys.executable, __file__, "_worker", "--impl", impl, "--model", folder,
                           "--dims", ",".join(map(str, dims)), *forwarded(args)]
                done = subprocess.run(command, capture_output=True, text=True, check=False)
                if done.returncode:
                    raise SystemExit(done.stderr[-4000:])
                done_runs.append(json.loads(done.stdout.strip().splitlines()[-1]))
        ours, theirs = runs["embedforge"], runs["sentence-transformers"]
        row = {
            "model": name,
            "embedforge_tokens_per_s": statistics.median(r["tokens_per_s"] for r in ours),
            "st_tokens_per_s": statistics.median(r["tokens_per_s"] for r in theirs),
            "embedforge_peak_step_mb": statistics.median(r["peak_step_mb"] for r in ours),
            "st_peak_step_mb": statistics.median(r["peak_step_mb"] for r in theirs),
            "tokens_per_step": ours[0]["tokens"] / args.steps,
            "st_tokens_per_step": theirs[0]["tokens"] / args.steps,
            "runs": runs,
        }
        row["speed_ratio"] = row["embedforge_tokens_per_s"] / row["st_tokens_per_s"]
        row["memory_ratio"] = row["st_peak_step_mb"] / max(row["embedforge_peak_step_mb"], 1e-9)
        results.append(row)
        print(f"{name}: {row['speed_ratio']:.2f}x tokens/s, peak step memory {row['embedforge_peak_step_mb']:.0f} MB "
              f"vs {row['st_peak_step_mb']:.0f} MB")
    write_results("train_speed", {"settings": vars(args), "machine": machine(), "results": results},
                  speed_markdown(args, results))


def forwarded(args) -> list[str]:
    keys = ("steps", "warmup", "batch_size", "mini_batch_size", "negatives", "max_length", "rows", "max_chars")
    out = []
    for key in keys:
        out += [f"--{key.replace('_', '-')}", str(getattr(args, key))]
    return out


def speed_markdown(args, results) -> str:
    lines = [
        "# Training step speed and memory: embedforge vs sentence-transformers",
        "",
        (f"Machine: {machine()['description']}. Same model, same batches (stdlib code search, {args.negatives} "
         f"negative(s) per row), batch {args.batch_size} rows, GradCache mini-batch {args.mini_batch_size}, "
         f"max length {args.max_length}, AdamW, Matryoshka widths; {args.steps} timed steps after {args.warmup} "
         f"warm-up, median of {args.repeats} fresh processes per side, alternating."),
        ("sentence-transformers: `MatryoshkaLoss(CachedMultipleNegativesRankingLoss(scale=20))`; embedforge: the "
         "Qwen3 InfoNCE restricted to MNRL's terms (hard + q-d, tau 0.05, no margin mask) with GradCache."),
        "Peak step memory: peak RSS (CPU) or peak CUDA allocation above the level before the timed steps.",
        "",
        "| model | embedforge tok/s | ST tok/s | speed ratio (>= 1 is ours faster) | embedforge peak MB | ST peak MB |",
        "|---|---|---|---|---|---|",
    ]
    for r in results:
        lines.append(f"| {r['model']} | {r['embedforge_tokens_per_s']:.0f} | {r['st_tokens_per_s']:.0f} | "
                     f"{r['speed_ratio']:.2f}x | {r['embedforge_peak_step_mb']:.0f} | {r['st_peak_step_mb']:.0f} |")
    lines += ["", "Both sides count the same non-padding tokens per step (tokens_per_step in the JSON)."]
    return "\n".join(lines) + "\n"


# --- quality ------------------------------------------------------------------------------------


def quality(args) -> None:
    import torch

    from embedforge import Embedder
    from embedforge.eval.real_data import stdlib_code_search
    from embedforge.eval.retrieval import evaluate_retrieval
    from embedforge.train.config import TrainConfig
    from embedforge.train.trainer import train

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    workdir = Path(tempfile.mkdtemp(prefix="bench-train-quality-"))
    folder = model_folder(args.model, workdir)
    test = stdlib_code_search(n_queries=args.test_queries, n_docs=args.test_docs, packages=HELD_OUT_PACKAGES,
                              seed=0, max_chars=args.max_chars)
    rows = stdlib_rows(args.rows, args.negatives, args.max_chars)

    def evaluate(path) -> dict:
        embedder = Embedder.from_pretrained(path, max_length=args.max_length)
        return evaluate_retrieval(embedder, test, instruction=args.instruction, batch_size=16)["metrics"]

    started = time.perf_counter()
    before = evaluate(folder)
    cfg = TrainConfig.model_validate({
        "model": folder, "method": "lora" if args.lora else "full", "output_dir": str(workdir / "out"),
        "data": [{"path": "stdlib", "num_negatives": args.negatives, "instruction": args.instruction}],
        "batch_size": args.batch_size, "mini_batch_size": args.mini_batch_size, "max_steps": args.steps,
        "lr": args.lr, "warmup_steps": max(1, args.steps // 10), "max_length": args.max_length, "save_steps": 0,
        "progress_bar": False, "lora": {"rank": 16, "alpha": 32},
        "loss": {"temperature": args.temperature, "terms": args.terms.split(","),
                 "margin": None if args.margin.lower() == "none" else float(args.margin)},
    })
    t = time.perf_counter()
    result = train(cfg, inline_data={"stdlib": rows})
    train_s = time.perf_counter() - t
    after = evaluate(result.final_dir)
    report = {
        "model": args.model, "method": cfg.method, "machine": machine(), "settings": vars(args),
        "test": {"queries": len(test.queries), "docs": len(test.corpus), "packages": HELD_OUT_PACKAGES},
        "train_rows": len(rows), "before": before, "after": after, "train_s": train_s,
        "total_s": time.perf_counter() - started,
    }
    name = f"train_quality_{Path(args.model).name}"
    lines = [
        f"# Fine-tuning {args.model} ({cfg.method}) on stdlib code search",
        "",
        (f"Machine: {machine()['description']}. Train: {len(rows)} docstring->function pairs from stdlib packages "
         f"other than {', '.join(HELD_OUT_PACKAGES)}; test: {len(test.queries)} queries over {len(test.corpus)} "
         f"functions of those held-out packages. {args.steps} steps, batch {args.batch_size}, {args.negatives} "
         f"negative(s), lr {args.lr}, max length {args.max_length}, loss terms {args.terms}, margin {args.margin}, "
         f"temperature {args.temperature}; training took {train_s:.0f} s."),
        "",
        "| metric | before | after |",
        "|---|---|---|",
    ]
    lines += [f"| {k} | {before[k]:.4f} | {after[k]:.4f} |" for k in before]
    write_results(name, report, "\n".join(lines) + "\n")
    print(f"nDCG@10 {before['ndcg_at_10']:.4f} -> {after['ndcg_at_10']:.4f} in {train_s:.0f} s")


# --- shared -------------------------------------------------------------------------------------


def machine() -> dict:
    import torch

    if torch.cuda.is_available():
        device = torch.cuda.get_device_name(0)
    else:
        cpu = platform.processor() or "cpu"
        if os.path.exists("/proc/cpuinfo"):
            lines = Path("/proc/cpuinfo").read_text().splitlines()
            names = [line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")]
            cpu = f"{names[0]} x{len(names)}" if names else cpu
        device = f"CPU {cpu}"
    threads = os.environ.get("OMP_NUM_THREADS", "unset")
    return {"description": f"{device}, torch {torch.__version__}, OMP_NUM_THREADS={threads}",
            "python": platform.python_version()}


def write_results(name: str, obj: dict, markdown: str) -> None:
    from embedforge.io import atomic_path

    RESULTS.mkdir(parents=True, exist_ok=True)
    with atomic_path(RESULTS / f"{name}.json") as tmp:
        tmp.write_text(json.dumps(obj, indent=2) + "\n", encoding="utf-8")
    with atomic_path(RESULTS / f"{name}.md") as tmp:
        tmp.write_text(markdown, encoding="utf-8")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--steps", type=int, default=6)
    common.add_argument("--batch-size", type=int, default=32)
    common.add_argument("--mini-batch-size", type=int, default=16)
    common.add_argument("--negatives", type=int, default=1)
    common.add_argument("--max-length", type=int, default=128)
    common.add_argument("--rows", type=int, default=512)
    common.add_argument("--max-chars", type=int, default=600)
    p = sub.add_parser("speed", parents=[common])
    p.add_argument("--models", default="tiny,minilm")
    p.add_argument("--dims", default="384,128,64", help="Matryoshka widths for MiniLM (tiny uses 64,32,16)")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--repeats", type=int, default=3)
    p = sub.add_parser("_worker", parents=[common])
    p.add_argument("--impl", required=True)
    p.add_argument("--model", required=True)
    p.add_argument("--dims", required=True)
    p.add_argument("--warmup", type=int, default=1)
    p = sub.add_parser("quality", parents=[common])
    p.add_argument("--model", default="minilm")
    p.add_argument("--lora", action="store_true")
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--temperature", type=float, default=0.05)
    p.add_argument("--instruction", default=None)
    p.add_argument("--terms", default="hard,qq,dd,qd", help="Qwen3 InfoNCE terms (hard,qd = plain InfoNCE)")
    p.add_argument("--margin", default="0.1", help="false-negative margin, or none")
    p.add_argument("--test-queries", type=int, default=100)
    p.add_argument("--test-docs", type=int, default=300)
    args = parser.parse_args()
    if args.command == "_worker":
        args.dims = [int(d) for d in args.dims.split(",")]
        print(json.dumps(worker(args)))
    elif args.command == "speed":
        speed(args)
    else:
        quality(args)


if __name__ == "__main__":
    main()

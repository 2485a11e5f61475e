"""One entry point for every benchmark: `python bench/run.py [NAME ...] [--quick]`; `--gpu [--dry-run]`
runs the one-shot GPU check (bench/gpu.sh).

Each benchmark is its own script (run alone for its full options) and writes JSON + markdown into
bench/results/, each result a ratio against the peer a user would otherwise pick, measured in the
same run, with the device named. CPU and GPU results go to separate files. `--quick` runs write to
/tmp/embedforge-bench-quick instead, so a smoke run never replaces a reported result.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).parent

QUICK_RESULTS = "/tmp/embedforge-bench-quick"  # where --quick runs write (every bench reads EMBEDFORGE_BENCH_RESULTS)
# name: (script, peer, quick arguments for a smoke run)
BENCHMARKS = {
    "encode": ("encode.py", "sentence-transformers encode", ["--texts", "128", "--repeats", "1"]),
    "train": ("train.py", "sentence-transformers Cached MNRL + Matryoshka", ["speed", "--steps", "2"]),
    "synth": ("synth_http.py", "openai client, sequential", ["--levels", "1", "8"]),
    "mine": ("mine_100k.py", "sentence-transformers mine_hard_negatives", ["--n-corpus", "10000"]),
    "merge": ("merge_memory.py", "mergekit / load-everything", ["--layers", "1", "--hidden", "1024",
                                                                "--intermediate", "3072"]),
    "eval": ("eval_100k.py", "sentence-transformers semantic_search", ["--random", "--docs", "10000"]),
    "eval-real": ("eval_real.py", "sentence-transformers + pytrec_eval", ["--skip-smollm2", "--queries", "50",
                                                                          "--docs", "200"]),
    "eval-mteb": ("eval_mteb.py", "sentence-transformers through mteb", ["--queries", "50", "--docs", "200"]),
    "export-onnx": ("export_onnx.py", "sentence-transformers encode (torch)", ["--model", "tiny", "--texts", "32",
                                                                              "--repeats", "1", "--queries", "100"]),
    "train-decoder": ("train_decoder_vs_st.py", "sentence-transformers MNRL on SmolLM2", ["--steps", "4",
                                                                                        "--batch-size", "8",
                                                                                        "--test-docs", "400"]),
    "train-defaults": ("train_defaults_sweep.py", "plain in-batch InfoNCE loop", ["--models", "minilm", "--steps",
                                                                                 "10", "--only", "defaults"]),
    "domain-adaptation": ("domain_adaptation.py", "base model and first-sentence pseudo-queries",
                          ["--passages", "12", "--steps", "3", "--corpora", "python-docstrings"]),
    "distill-gpl": ("distill_gpl.py", "InfoNCE alone", ["--passages", "12", "--steps", "3"]),
    "train-long-tail": ("train_long_tail.py", "sentence-transformers MNRL, same batches",
                        ["--models", "tiny", "--steps", "1", "--repeats", "1", "--batch-size", "8"]),
    "train-memory": ("train_memory.py", "the trainer without the allocator fix",
                     ["--steps", "3", "--pairs", "200"]),
}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("names", nargs="*", metavar="NAME", help=f"benchmarks to run: {', '.join(BENCHMARKS)} (default: all)")
    parser.add_argument("--quick", action="store_true", help="small sizes: a smoke run, not numbers to report")
    parser.add_argument("--gpu", action="store_true", help="the one-shot GPU check, bench/gpu.sh (results in "
                        "bench/results/gpu/)")
    parser.add_argument("--dry-run", action="store_true", help="with --gpu: the same check on the CPU, tiny shapes")
    args = parser.parse_args()
    if args.gpu:
        command = ["bash", str(HERE / "gpu.sh"), *(["--dry-run"] if args.dry_run else [])]
        return subprocess.run(command, check=False).returncode
    unknown = sorted(set(args.names) - set(BENCHMARKS))
    if unknown:
        parser.error(f"unknown benchmark(s) {unknown}; choose from {list(BENCHMARKS)}")
    failed = []
    for name in args.names or list(BENCHMARKS):
        script, peer, quick = BENCHMARKS[name]
        cmd = [sys.executable, str(HERE / script), *(quick if args.quick else [])]
        env = dict(os.environ)
        if args.quick:  # smoke runs must not overwrite the reported results
            env["EMBEDFORGE_BENCH_RESULTS"] = QUICK_RESULTS
        print(f"== {name}: {script} (peer: {peer})", flush=True)
        start = time.time()
        if subprocess.run(cmd, check=False, env=env).returncode != 0:
            failed.append(name)
        print(f"== {name}: {time.time() - start:.0f}s", flush=True)
    if failed:
        print(f"failed: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

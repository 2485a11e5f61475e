"""Benchmark: resident memory step by step while `embedforge.train` runs on real short pairs.

The scenario users reported growing from 4.5 GB to 11.5 GB: all-MiniLM-L6-v2, LoRA, batch 32, 2,500
German->English gettext message pairs, 80 steps. Each variant runs in a fresh process and reads the
`rss_mb` / `peak_rss_mb` the trainer writes into metrics.jsonl at every step, plus the process's
memory before training (imports, data) and after setup (weights, optimizer), so the step's own share
is visible:

  * default:      the trainer as shipped (length-grouped chunks, glibc mmap threshold fixed on CPU);
  * no-allocator: the same without the mmap-threshold fix (`steady_cpu_allocator` disabled).

    python bench/train_memory.py                 # ~3 min on 2 idle cores
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
VARIANTS = ("default", "no-allocator")


def worker(args) -> dict:
    import psutil
    import torch

    torch.set_num_threads(args.threads)
    from embedforge.eval.real_data import gettext_bitext
    from embedforge.offline_models import minilm_folder
    from embedforge.train import trainer
    from embedforge.train.config import TrainConfig

    if args.variant == "no-allocator":
        trainer.steady_cpu_allocator = lambda: None
    source, target, _ = gettext_bitext("de", n=args.pairs, seed=0)
    rows = [{"query": s, "positive": t} for s, t in zip(source, target)]
    out = Path(tempfile.mkdtemp(prefix="bench-train-memory-"))
    before = psutil.Process().memory_info().rss / 2**20
    cfg = TrainConfig.model_validate({
        "model": str(minilm_folder()), "method": args.method, "output_dir": str(out), "progress_bar": False,
        "data": [{"path": "pairs"}], "batch_size": args.batch_size, "max_steps": args.steps, "save_steps": 0,
        "logging_steps": 1})
    marks: dict[str, float] = {}
    setup = trainer.Trainer.setup

    def measured_setup(self):
        setup(self)
        marks["after_setup"] = psutil.Process().memory_info().rss / 2**20

    trainer.Trainer.setup = measured_setup
    run = trainer.Trainer(cfg, inline_data={"pairs": rows})
    started = time.perf_counter()
    run.run()
    seconds = time.perf_counter() - started
    after_setup = marks["after_setup"]
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return {"variant": args.variant, "rss_before_mb": before, "rss_after_setup_mb": after_setup,
            "rss_mb": [r["rss_mb"] for r in records], "peak_rss_mb": [r["peak_rss_mb"] for r in records],
            "tokens": [r["tokens"] for r in records], "seconds": seconds, "decisions": run.decisions}


def markdown(report: dict) -> str:
    s = report["settings"]
    lines = [
        "# Resident memory per training step (all-MiniLM-L6-v2, real short pairs)",
        "",
        (f"Machine: {report['machine']}, {s['threads']} torch thread(s), load average {report['load_average']:.2f} "
         f"at start. {s['method']} fine-tuning, batch {s['batch_size']}, {s['pairs']} German->English gettext "
         f"pairs, {s['steps']} steps, trainer defaults otherwise; each variant in a fresh process. RSS in MB, read by "
         "the trainer at each step (metrics.jsonl `rss_mb`, `peak_rss_mb`)."),
        "",
        "| variant | before training | after setup | step 1 | step 10 | step 40 | last step | peak | s |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in report["runs"]:
        rss = r["rss_mb"]
        lines.append(f"| {r['variant']} | {r['rss_before_mb']:.0f} | {r['rss_after_setup_mb']:.0f} | {rss[0]:.0f} | "
                     f"{rss[min(9, len(rss) - 1)]:.0f} | {rss[min(39, len(rss) - 1)]:.0f} | {rss[-1]:.0f} | "
                     f"{max(r['peak_rss_mb']):.0f} | {r['seconds']:.0f} |")
    tokens = report["runs"][0]["tokens"]
    lines += ["", f"Tokens per step (real, unpadded): {min(tokens)}-{max(tokens)}."]
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=80)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--pairs", type=int, default=2500)
    parser.add_argument("--method", default="lora", choices=["lora", "full"])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--results-dir", default=os.environ.get("EMBEDFORGE_BENCH_RESULTS") or str(HERE / "results"))
    parser.add_argument("--variant", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.variant:
        print(json.dumps(worker(args)))
        return 0
    import platform

    settings = {k: v for k, v in vars(args).items() if k not in ("variant", "results_dir")}
    report = {"machine": f"CPU {platform.machine()}", "load_average": os.getloadavg()[0], "settings": settings,
              "runs": []}
    for variant in VARIANTS:
        command = [sys.executable, __file__, "--variant", variant, "--steps", str(args.steps), "--batch-size",
                   str(args.batch_size), "--pairs", str(args.pairs), "--method", args.method, "--threads",
                   str(args.threads)]
        done = subprocess.run(command, capture_output=True, text=True, check=False,
                              env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})
        if done.returncode:
            raise SystemExit(done.stderr[-4000:])
        report["runs"].append(json.loads(done.stdout.strip().splitlines()[-1]))
    out = Path(args.results_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "train_memory.json").write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    (out / "train_memory.md").write_text(markdown(report), encoding="utf-8")
    print(markdown(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())

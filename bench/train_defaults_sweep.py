"""The measurement behind `embedforge train`'s defaults (train/defaults.py, train/config.py).

A small grid per backbone, each configuration trained from the same base on the same real pairs for
the same budget and scored on the same unseen real queries (bench/train_realpairs.py: German ->
English gettext messages), with a 95% bootstrap interval and a paired test against the base:
  * method: full fine-tuning vs LoRA r16 (alpha 32);
  * learning rate per method;
  * loss: in-batch InfoNCE (preset infonce: terms hard + q-d, tau 0.05, no margin) vs the report's
    Eq. 1 (preset qwen3: q-q, d-d, q-d_j, margin 0.1, tau 0.1) and Eq. 1 at tau 0.05;
  * the defaults as they were before this sweep (LoRA r16, lr 1e-4, Eq. 1, tau 0.1, no warmup);
  * schedule on small data: 40 rows planned as one epoch of batch 32 (1 step) vs min_steps.
Each configuration runs in its own process (no state leaks between runs).

    python bench/train_defaults_sweep.py [--models minilm,smollm2] [--steps 60] [--threads 1]

Results: bench/results/train_defaults_sweep.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from train_realpairs import (
    RESULTS,
    embedforge_embedder,
    gettext_pairs,
    machine,
    paired_test,
    per_query_ndcg,
    random_ndcg_at_10,
    summary,
    write_results,
)

OLD_DEFAULTS = {"method": "lora", "lr": 1e-4, "warmup_steps": 0, "loss": {"preset": "qwen3"}}
GRIDS = {
    "minilm": {
        "defaults: full, lr 5e-5, infonce (tau 0.05), warmup 10%": {},
        "old defaults (lora r16, lr 1e-4, Eq. 1, tau 0.1)": OLD_DEFAULTS,
        "full, lr 5e-5, Eq. 1 (tau 0.1)": {"method": "full", "lr": 5e-5, "loss": {"preset": "qwen3"}},
        "lora, lr 2e-4, infonce": {"method": "lora", "lr": 2e-4},
        "full, lr 5e-5, Eq. 1 at tau 0.05": {"method": "full", "lr": 5e-5,
                                             "loss": {"preset": "qwen3", "temperature": 0.05}},
        "full, lr 2e-5, infonce": {"method": "full", "lr": 2e-5},
        "full, lr 1e-4, infonce": {"method": "full", "lr": 1e-4},
        "lora, lr 5e-4, infonce": {"method": "lora", "lr": 5e-4},
    },
    "smollm2": {
        "old defaults (lora r16, lr 1e-4, Eq. 1, tau 0.1)": OLD_DEFAULTS,
        "full, lr 2e-5, infonce": {"method": "full", "lr": 2e-5},
        "defaults: full, lr 5e-5, infonce (tau 0.05), warmup 10%": {},
        "full, lr 5e-5, Eq. 1 (tau 0.1)": {"method": "full", "lr": 5e-5, "loss": {"preset": "qwen3"}},
        "lora, lr 2e-4, infonce": {"method": "lora", "lr": 2e-4},
    },
}
# Small data: 40 rows, no max_steps. Before: one epoch of batch 32 = 1 step; now min_steps.
SCHEDULE = {"40 rows, one epoch (1 step, as before)": {"rows": 40, "max_steps": None, "min_steps": 1,
                                                         "warmup_steps": 0},
            "40 rows, defaults (min_steps)": {"rows": 40, "max_steps": None}}


def folder_of(name: str) -> str:
    from embedforge.offline_models import minilm_folder, smollm2_folder

    return str({"minilm": minilm_folder, "smollm2": smollm2_folder}[name]())


def run_one(args) -> dict:
    """One configuration (the child process): train, then per-query nDCG@10 of the final model."""
    import torch

    from embedforge.train.config import TrainConfig
    from embedforge.train.trainer import train

    torch.set_num_threads(args.threads)
    overrides = json.loads(args.overrides)
    rows, test = gettext_pairs(args.train_rows, args.test_queries, args.test_docs, args.seed)
    rows = rows[:overrides.pop("rows", len(rows))]
    values = {"model": folder_of(args.model), "output_dir": tempfile.mkdtemp(prefix="sweep-"),
              "data": [{"path": "pairs"}], "max_length": args.max_length, "save_steps": 0, "progress_bar": False,
              "seed": args.seed, "max_steps": args.steps}
    for key, value in overrides.items():
        values[key] = {**values.get(key, {}), **value} if isinstance(value, dict) else value
    started = time.perf_counter()
    result = train(TrainConfig.model_validate(values), inline_data={"pairs": rows})
    train_s = time.perf_counter() - started
    scores = per_query_ndcg(lambda texts, q: embedforge_embedder(result.final_dir, args.max_length).encode(texts),
                            test)
    return {"scores": scores, "steps": result.steps, "decisions": result.decisions, "warnings": result.warnings,
            "train_s": train_s, "last": {k: result.last_metrics.get(k) for k in ("loss", "pos_sim", "neg_sim")}}


def base_scores(args, name: str) -> dict[str, float]:
    _, test = gettext_pairs(args.train_rows, args.test_queries, args.test_docs, args.seed)
    embedder = embedforge_embedder(folder_of(name), args.max_length)
    return per_query_ndcg(lambda texts, q: embedder.encode(texts), test)


def child(args, model: str, overrides: dict) -> dict:
    command = [sys.executable, __file__, "_one", "--model", model, "--overrides", json.dumps(overrides),
               *[f"--{k.replace('_', '-')}={getattr(args, k)}" for k in
                 ("steps", "train_rows", "test_queries", "test_docs", "max_length", "threads", "seed")]]
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode:
        raise SystemExit(f"{model} {overrides}: {done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("command", nargs="?", default="sweep", choices=["sweep", "_one"])
    parser.add_argument("--models", default="minilm,smollm2")
    parser.add_argument("--model", default="minilm")
    parser.add_argument("--overrides", default="{}")
    parser.add_argument("--only", default="", help="comma-separated substrings: run only matching configurations")
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--train-rows", type=int, default=1920)
    parser.add_argument("--test-queries", type=int, default=200)
    parser.add_argument("--test-docs", type=int, default=1000)
    parser.add_argument("--max-length", type=int, default=64)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-schedule", action="store_true", help="skip the small-data schedule rows")
    args = parser.parse_args()
    if args.command == "_one":
        print(json.dumps(run_one(args)))
        return
    import torch

    torch.set_num_threads(args.threads)
    previous = RESULTS / "train_defaults_sweep.json"
    report = json.loads(previous.read_text()) if previous.exists() else {"models": {}}
    report.update({"machine": machine(args.threads), "settings": vars(args)})
    for model in args.models.split(","):
        entry = report["models"].setdefault(model, {"runs": {}})
        base = base_scores(args, model)
        entry["base"] = summary(base)
        grid = dict(GRIDS[model])
        if model == "minilm" and not args.no_schedule:  # after the first two rows: the cheapest question
            names = list(grid)
            grid = {**{n: grid[n] for n in names[:2]}, **SCHEDULE, **{n: grid[n] for n in names[2:]}}
        for name, overrides in grid.items():
            if args.only and not any(part in name for part in args.only.split(",")):
                continue
            t = time.perf_counter()
            out = child(args, model, overrides)
            ids = list(base)
            after = np.array([out["scores"][q] for q in ids])
            entry["runs"][name] = {"overrides": overrides, **summary(out["scores"]),
                                   "gain": paired_test(after, np.array([base[q] for q in ids])),
                                   **{k: out[k] for k in ("steps", "decisions", "warnings", "train_s", "last")}}
            print(f"{model} | {name}: {entry['base']['ndcg_at_10']:.3f} -> {entry['runs'][name]['ndcg_at_10']:.3f} "
                  f"({time.perf_counter() - t:.0f} s)", flush=True)
            report["random_ndcg_at_10"] = random_ndcg_at_10(args.test_docs)
            write_results("train_defaults_sweep", report, markdown(report))


def markdown(r: dict) -> str:
    s = r["settings"]
    lines = [
        "# Training defaults, chosen by measurement",
        "",
        (f"Machine: {r['machine']['description']}. Each row: the base model trained with one configuration for "
         f"{s['steps']} steps of 32 (unless the row says otherwise) on {s['train_rows']} real German -> English "
         f"gettext message pairs, then nDCG@10 on {s['test_queries']} unseen real queries over {s['test_docs']} "
         f"passages (95% bootstrap CI; gain: paired bootstrap against the base, one-sided p). Random ranking: "
         f"{r.get('random_ndcg_at_10', 0):.4f}. Script: bench/train_defaults_sweep.py."),
    ]
    for model, entry in r["models"].items():
        base = entry["base"]
        lines += ["", f"## {model}: base nDCG@10 {base['ndcg_at_10']:.3f} [{base['ci95'][0]:.3f}, {base['ci95'][1]:.3f}]",
                  "", "| configuration | steps | nDCG@10 [95% CI] | gain [95% CI] | p | final pos_sim / neg_sim | warnings |",
                  "|---|---|---|---|---|---|---|"]
        for name, run in entry["runs"].items():
            g, last = run["gain"], run["last"]
            sims = (f"{last['pos_sim']:.2f} / {last['neg_sim']:.2f}"
                    if last.get("pos_sim") is not None and last.get("neg_sim") is not None else "")
            lines.append(f"| {name} | {run['steps']} | {run['ndcg_at_10']:.3f} [{run['ci95'][0]:.3f}, "
                         f"{run['ci95'][1]:.3f}] | {g['mean_diff']:+.3f} [{g['ci95'][0]:+.3f}, {g['ci95'][1]:+.3f}] | "
                         f"{g['p_bootstrap_one_sided']:.4f} | {sims} | {len(run['warnings'])} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()

"""`embedforge train RECIPE.yaml [flags]`: flags override the recipe, so a run also works without one.

The same parser serves `python -m embedforge.train` and `accelerate launch -m embedforge.train`.
"""

from __future__ import annotations

import argparse
import os
import sys

INTERRUPTED_EXIT_CODE = 143  # 128 + SIGTERM: stopped on request, checkpoint written, rerun to resume


def add_train_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("recipe", nargs="?", default=None, help="recipe YAML (optional when flags say enough)")
    parser.add_argument("--model", help="Hub id or local folder of the base model")
    parser.add_argument("--data", action="append", metavar="PATH",
                        help="training data: .jsonl, .parquet, a datasets folder or hf:NAME[:SPLIT]; repeat for several")
    parser.add_argument("--output", dest="output_dir", metavar="DIR", help="output folder (final model in DIR/final)")
    parser.add_argument("--task", choices=["embedding", "reranker"])
    method = parser.add_mutually_exclusive_group()
    method.add_argument("--lora", dest="method", action="store_const", const="lora", help="train LoRA adapters")
    method.add_argument("--full", dest="method", action="store_const", const="full", help="full fine-tuning")
    parser.add_argument("--max-steps", type=int)
    parser.add_argument("--batch-size", type=int, help="global contrastive batch (rows) over all processes")
    parser.add_argument("--mini-batch-size", type=int, help="texts per forward (GradCache chunk)")
    parser.add_argument("--lr", type=float)
    parser.add_argument("--strict", action="store_true",
                        help="exit with status 2 when the run produced nothing useful (collapse, loss at chance, no step)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override any recipe key, e.g. --set loss.temperature=0.05 (repeatable)")


def flags_to_config(args: argparse.Namespace) -> dict:
    keys = ("model", "output_dir", "task", "method", "max_steps", "batch_size", "mini_batch_size", "lr")
    flags = {k: getattr(args, k) for k in keys if getattr(args, k, None) is not None}
    if args.data:
        flags["data"] = [{"path": p} for p in args.data]
    return flags


def _main_process() -> bool:
    """Whether this is the process that reports (global rank 0 under accelerate launch, torchrun or
    DeepSpeed, which all set RANK), so a launch prints its summary once."""
    return int(os.environ.get("RANK", "0")) == 0


def run_train(args: argparse.Namespace) -> int:
    from embedforge.errors import EmbedforgeError
    from embedforge.train.config import load_train_config
    from embedforge.train.trainer import train

    config = load_train_config(args.recipe, overrides=args.overrides, flags=flags_to_config(args))
    result = train(config)
    say = _main_process()
    if result.interrupted:
        if say:
            print(f"embedforge train: stopped at step {result.steps}/{result.total_steps} with a checkpoint in "
                  f"{result.output_dir}; run the same command again to resume", file=sys.stderr)
        return INTERRUPTED_EXIT_CODE
    if say:
        for line in result.decisions:
            print(f"embedforge train: chose {line}", file=sys.stderr)
        print(f"embedforge train: {result.steps} steps; model in {result.final_dir}", file=sys.stderr)
        for message in result.warnings:
            print(f"embedforge train: WARNING: {message}", file=sys.stderr)
    if result.warnings and getattr(args, "strict", False):
        raise EmbedforgeError(f"stopped by --strict: {len(result.warnings)} warning(s), the first: "
                              f"{result.warnings[0]}")
    return 0


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "train", help="train an embedder or reranker (LoRA or full; DDP/DeepSpeed/FSDP via accelerate launch)",
        description="Train from a recipe YAML and/or flags. Multi-process: accelerate launch -m embedforge.train "
        "RECIPE.yaml (configs in recipes/accelerate/). Resumes from the latest complete checkpoint in the output "
        "folder; the final model goes to DIR/final.",
    )
    add_train_args(parser)
    parser.set_defaults(func=run_train)

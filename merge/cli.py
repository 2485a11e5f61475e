"""`embedforge merge`: a thin shell over `embedforge.merge.merge`; flags come from `MergeConfig`."""

from __future__ import annotations

import argparse
import sys

_EPILOG = """examples:
  embedforge merge --method slerp --models ckpt-a ckpt-b --base base-model --t 0.5 --output merged
  embedforge merge --method slerp --models a b --t 0.5 --schedule-attn 0,0.5,1 --schedule-mlp 1,0.5,0 --output m
  embedforge merge --method linear --models a b c --weights 1 1 2 --output merged
  embedforge merge --method linear --models lora-adapter --output merged   # fold a LoRA into its base
"""


def register(subparsers) -> None:
    from embedforge.config import add_config_flags
    from embedforge.merge.config import MergeConfig

    parser = subparsers.add_parser(
        "merge",
        help="merge checkpoints (slerp, lerp, weighted average; LoRA runs included)",
        description=(
            "Merge model checkpoints tensor by tensor, streaming through safetensors. Models may be "
            "full checkpoint folders or peft LoRA adapter folders (folded into their base first). "
            "Prints the cosine between the inputs per tensor group, which shows where slerp equals lerp."
        ),
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    # t and weights exclude each other; t takes one value or a comma-separated list of anchors.
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--t", dest="t", default=argparse.SUPPRESS, metavar="T",
                       help=MergeConfig.model_fields["t"].description)
    group.add_argument("--weights", dest="weights", nargs="+", type=float, default=argparse.SUPPRESS, metavar="W",
                       help=MergeConfig.model_fields["weights"].description)
    add_config_flags(parser, MergeConfig, skip=("t", "weights", "schedule_attention", "schedule_mlp"))
    for name in ("schedule_attention", "schedule_mlp"):
        flags = ["--" + name.replace("_", "-")] + (["--schedule-attn"] if name == "schedule_attention" else [])
        parser.add_argument(*flags, dest=name, default=argparse.SUPPRESS, metavar="ANCHORS",
                            help=MergeConfig.model_fields[name].description)
    parser.add_argument("--max-shard-size", dest="max_shard_bytes", default=argparse.SUPPRESS, metavar="SIZE",
                        help="largest output shard, e.g. 4GB or 500MB (same as --max-shard-bytes)")
    parser.add_argument("--quiet", dest="show_progress", action="store_false", default=argparse.SUPPRESS,
                        help="no progress bar")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from embedforge.config import config_from_args
    from embedforge.merge.config import MergeConfig
    from embedforge.merge.diagnostics import format_summary
    from embedforge.merge.stage import merge

    outcome = merge(config_from_args(MergeConfig, args))
    print(format_summary(outcome.cosines))
    for warning in outcome.warnings:
        print(f"warning: {warning}", file=sys.stderr)
    if outcome.output:
        print(f"wrote {outcome.output} ({outcome.parameters:,} parameters, {len(outcome.files)} file(s))")
    return 0

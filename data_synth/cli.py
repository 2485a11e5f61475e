"""`embedforge synth`, `embedforge filter`, `embedforge mine`: thin shells over `synthesize`,
`filter_pairs` and `mine`.

The flags come from the stage configs (`add_config_flags`), plus a few short aliases kept from
earlier releases (`--task`, `--prompts`, `--threshold`, `--copy-max`, `--near-dup`, `--range`,
`--no-instructions`). `--config` YAML < flags < `--set key=value`. Torch and the models are
imported inside the handlers so `embedforge --help` stays fast.
"""

from __future__ import annotations

import argparse
import sys

from embedforge.config import add_config_flags, config_from_args
from embedforge.data_synth.filtering import FilterConfig
from embedforge.data_synth.generate import TASKS, SynthConfig
from embedforge.data_synth.mine import MineConfig


def _rank_range(text: str) -> tuple[int, int]:
    try:
        start, end = (int(x) for x in text.split(":"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected START:END, e.g. 10:100, got {text!r}") from None
    return start, end


def _finish(outcome, args: argparse.Namespace, code: int = 0) -> int:
    """Print the outcome's warnings; under --strict a warning stops the command (exit 2)."""
    for message in outcome.warnings:
        print(f"warning: {message}", file=sys.stderr)
    if args.strict and outcome.warnings:
        from embedforge.errors import EmbedforgeError

        raise EmbedforgeError(f"stopped by --strict: {len(outcome.warnings)} warning(s), the first: "
                              f"{outcome.warnings[0]}")
    return code


def _add_strict(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--strict", action="store_true",
                        help="exit with status 2 when the stage produced nothing useful (any warning)")


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "synth",
        help="synthesise training pairs from a corpus with an LLM",
        description="Generate retrieval (one call per passage for small generators, the Qwen3 Embedding "
        "report's persona -> configuration -> query flow for capable ones), bitext, STS and classification "
        "pairs from a corpus, with replies held to their JSON schema by constrained decoding. Output: "
        "OUT/pairs-XXXXX-of-YYYYY.jsonl with provenance on every row, failed-*.jsonl, manifest-*.json, "
        "quality.json and coverage.md. Rerunning the same command resumes: finished passages are skipped.",
    )
    add_config_flags(p, SynthConfig)
    p.add_argument("--task", dest="tasks", nargs="+", choices=TASKS, default=argparse.SUPPRESS,
                   help="alias of --tasks")
    p.add_argument("--prompts", dest="prompts_dir", default=argparse.SUPPRESS, help="alias of --prompts-dir")
    _add_strict(p)
    p.set_defaults(func=run_synth)

    p = subparsers.add_parser(
        "filter",
        help="apply the quality gates to synthesised pairs",
        description="Gates, in order: copy (query repeats the passage), contamination (--eval-sets), "
        "near-duplicates, teacher cosine (default 'auto': a percentile of the teacher's own scores of queries "
        "against passages not theirs; the Qwen3 report's 0.7 is a Qwen3-Embedding cosine), round trip "
        "(positive in the teacher's top-k). Writes OUT/pairs.jsonl, dropped.jsonl (with drop_reason), "
        "coverage.md, filter_report.json.",
    )
    add_config_flags(p, FilterConfig)
    p.add_argument("--threshold", dest="cosine_threshold", default=argparse.SUPPRESS,
                   help="alias of --cosine-threshold")
    p.add_argument("--copy-max", dest="copy_max_ratio", default=argparse.SUPPRESS, help="alias of --copy-max-ratio")
    p.add_argument("--near-dup", dest="near_dup_threshold", default=argparse.SUPPRESS,
                   help="alias of --near-dup-threshold")
    _add_strict(p)
    p.set_defaults(func=run_filter)

    p = subparsers.add_parser(
        "mine",
        help="mine hard negatives for pairs from a corpus",
        description="Embed the corpus in resumable chunks, search it with faiss, sample K negatives from a "
        "rank range, drop the positive, exact duplicates and likely false negatives. Writes "
        "OUT/mined-*.jsonl rows ready for `embedforge train` (query, positive, negatives, instruction, "
        "dataset).",
    )
    add_config_flags(p, MineConfig)
    p.add_argument("--range", type=_rank_range, default=None, dest="rank_range",
                   help="raw rank range START:END (sets --rank-start and --rank-end)")
    p.add_argument("--no-instructions", dest="use_instructions", action="store_false", default=argparse.SUPPRESS,
                   help="alias of --no-use-instructions")
    _add_strict(p)
    p.set_defaults(func=run_mine)


def run_synth(args: argparse.Namespace) -> int:
    from embedforge.data_synth.synthesize import synthesize

    extra = {"progress": sys.stderr.isatty()}
    config = config_from_args(SynthConfig, args, extra=extra)
    outcome = synthesize(config)
    rate = "n/a" if outcome.schema_valid_rate is None else f"{outcome.schema_valid_rate:.0%}"
    topic = "n/a" if outcome.on_topic_rate is None else f"{outcome.on_topic_rate:.0%}"
    print(
        f"synth {config.shard_index}/{config.num_shards}: {outcome.rows} rows from {outcome.passages_with_rows} "
        f"passages, {outcome.passages_failed} passages failed, {outcome.pending} pending ({outcome.status}, "
        f"{outcome.seconds:.1f} s); strategy {outcome.strategy}, decoding {outcome.decoding}; schema-valid "
        f"{rate}, on topic {topic}; invalid replies {outcome.invalid_outputs or '{}'}, transport failures "
        f"{outcome.transport_failures or '{}'} -> {outcome.output}",
        file=sys.stderr,
    )
    return _finish(outcome, args, 1 if outcome.pending else 0)


def run_filter(args: argparse.Namespace) -> int:
    from embedforge.data_synth.filtering import filter_pairs

    outcome = filter_pairs(config_from_args(FilterConfig, args))
    drops = ", ".join(f"{gate} {n}" for gate, n in outcome.dropped.items())
    threshold = "" if outcome.cosine_threshold is None else f"; cosine threshold {outcome.cosine_threshold:g}"
    print(f"filter: kept {outcome.rows_kept} of {outcome.rows_in} rows (dropped: {drops or 'none'}{threshold}) "
          f"-> {outcome.output}", file=sys.stderr)
    return _finish(outcome, args)


def run_mine(args: argparse.Namespace) -> int:
    from embedforge.data_synth.mine import mine

    extra = {"progress": sys.stderr.isatty()}
    if args.rank_range is not None:
        extra["rank_start"], extra["rank_end"] = args.rank_range
    outcome = mine(config_from_args(MineConfig, args, extra=extra))
    print(
        f"mine: {outcome.rows} rows, {outcome.negatives} negatives ({outcome.rows_short} rows short of K), "
        f"corpus {outcome.corpus}; dropped {outcome.dropped_positive_or_duplicate} positive/duplicate, "
        f"{outcome.dropped_false_negative_margin} by margin, {outcome.dropped_reranker} by reranker; "
        f"{outcome.seconds:.1f} s -> {outcome.output}",
        file=sys.stderr,
    )
    if outcome.teacher_pair_accuracy is not None:
        print(f"mine: teacher scored {outcome.teacher_pairs_scored} pairs ({outcome.teacher_pairs_reused} reused); "
              f"positive above negative in {outcome.teacher_pair_accuracy:.0%} of pairs, "
              f"{outcome.teacher_rows_prefer_negative} rows prefer a negative, {outcome.dropped_teacher_rows} dropped",
              file=sys.stderr)
    return _finish(outcome, args)

"""`embedforge eval` and `embedforge report`: thin shells over `evaluate()` and `report()`; the flags
come from `EvalConfig` and `ReportConfig`."""

from __future__ import annotations

import argparse
import sys

_EVAL_EPILOG = """examples:
  embedforge eval --model out/base --data heldout --output r/base.json --label base
  embedforge eval --model out/merged --data heldout --output r/merged.json --label merged --baselines r/base.json
  embedforge eval --model out/merged --mteb SciFact path/to/beir-folder --output r/mteb.json
  embedforge report r/base.json r/trained.json r/merged.json --output r/report.md
"""


def _meta_pair(text: str) -> tuple[str, object]:
    if "=" not in text:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    key, value = text.split("=", 1)
    for cast in (int, float):
        try:
            return key, cast(value)
        except ValueError:
            pass
    return key, value


def register(subparsers) -> None:
    from embedforge.config import add_config_flags
    from embedforge.eval.config import EvalConfig, ReportConfig

    p = subparsers.add_parser(
        "eval", help="evaluate an embedder on a BEIR folder or mteb tasks",
        description="Retrieval on a local BEIR folder (corpus.jsonl, queries.jsonl, qrels/<split>.tsv): nDCG@10, "
        "MRR@10, Recall@10/100 and MAP@100 computed as trec_eval computes them, optionally reranking the top-k, "
        "each with the number of queries, a bootstrap interval, the random-ranking score and, against --baselines, "
        "a paired test; or mteb tasks and local BEIR folders through mteb with --mteb. Writes a results JSON.",
        epilog=_EVAL_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_config_flags(p, EvalConfig, skip=("meta",))
    p.add_argument("--meta", dest="meta_pairs", type=_meta_pair, action="append", default=[], metavar="KEY=VALUE",
                   help="extra fields recorded under 'meta' (e.g. merge_t=0.5 for the merge plot); repeatable")
    p.add_argument("--strict", action="store_true",
                   help="exit with status 2 on a warning (too few queries, a score that does not clear random)")
    p.set_defaults(func=run_eval)

    p = subparsers.add_parser(
        "report", help="compare results JSONs: intervals, paired tests, tables and plots",
        description="Results of `embedforge eval` side by side, in the order given (base, trained, merged): a "
        "summary table (score [CI], difference with the baseline [CI], p-value, queries, random-ranking score), "
        "a table of every metric and, with --plots-dir, PNG plots of score vs Matryoshka width and vs merge t.",
    )
    p.add_argument("results", nargs="+", help="results JSON files, in pipeline order")
    add_config_flags(p, ReportConfig, skip=("results",))
    p.set_defaults(func=run_report)


def run_eval(args) -> int:
    from embedforge.config import config_from_args
    from embedforge.eval.config import EvalConfig
    from embedforge.eval.stage import evaluate

    extra = {"meta": dict(args.meta_pairs)} if args.meta_pairs else None
    outcome = evaluate(config_from_args(EvalConfig, args, extra=extra))
    for warning in outcome.warnings:
        print(f"warning: {warning}", file=sys.stderr)
    print(outcome.summary(), file=sys.stderr)
    if args.strict and outcome.warnings:
        from embedforge.errors import EmbedforgeError

        raise EmbedforgeError(f"stopped by --strict: {len(outcome.warnings)} warning(s), the first: "
                              f"{outcome.warnings[0]}")
    return 0


def run_report(args) -> int:
    from embedforge.config import config_from_args
    from embedforge.eval.config import ReportConfig
    from embedforge.eval.report import report

    outcome = report(config_from_args(ReportConfig, args, extra={"results": args.results}))
    if outcome.output:
        print(f"wrote {outcome.output}" + "".join(f", {p}" for p in outcome.plots.values()), file=sys.stderr)
    else:
        print(outcome.markdown, end="")
    return 0

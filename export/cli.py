"""`embedforge export`: a thin shell over `embedforge.export.export`; flags come from `ExportConfig`."""

from __future__ import annotations

import argparse
import sys

_EPILOG = """examples:
  embedforge export --model merged --kind embedder --output out/my-embedder --matryoshka-dims 1024,512,256,128
  embedforge export --model merged --output out/e --onnx fp32 int8 --gguf f16 q8_0 --repo-id my-org/my-embedder
  embedforge export --model rr-ckpt --kind reranker --format seq-cls --output out/my-reranker
  embedforge export --model rr-ckpt --kind reranker --format causal --output out/my-reranker-causal
  embedforge export --model merged --output out/e --eval-results results/scifact.json \\
      --push-to-hub my-org/my-embedder --private

formats: embedder: sentence-transformers (also what transformers, vLLM and TEI load), plus optional
           onnx/model.onnx, onnx/model_qint8.onnx (onnxruntime, TEI's CPU image) and GGUF (llama.cpp, Ollama);
         reranker: seq-cls (default; CrossEncoder, AutoModelForSequenceClassification, vLLM; TEI refuses
           Qwen3 classifiers) or causal (the official Qwen3-Reranker form; vLLM with hf_overrides, CrossEncoder).
The folder is written only after it reloads to the source model's numbers (export_report.json); the card
(README.md) is rendered from the model's provenance.json. The Hub token comes from HF_TOKEN or
`hf auth login` and is never printed.
"""


def register(subparsers) -> None:
    from embedforge.config import add_config_flags
    from embedforge.export.config import ExportConfig

    parser = subparsers.add_parser(
        "export",
        help="write a serving folder (sentence-transformers, CrossEncoder, vLLM, TEI, ONNX, GGUF) and optionally push it",
        description=(
            "Export an embedder or a reranker into one folder that sentence-transformers, transformers, vLLM "
            "and TEI load, check it by reloading it in each, write its model card, and optionally push it to "
            "the Hugging Face Hub. Nothing is written unless every check passes."
        ),
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_config_flags(parser, ExportConfig)
    parser.set_defaults(func=run)


def run(args) -> int:
    from embedforge.config import config_from_args
    from embedforge.export.config import ExportConfig
    from embedforge.export.stage import export

    outcome = export(config_from_args(ExportConfig, args))
    print(f"wrote {outcome.output} ({len(outcome.checks)} checks passed, max |diff| {outcome.max_abs_diff:.2e})",
          file=sys.stderr)
    for warning in outcome.warnings:
        print(f"warning: {warning}", file=sys.stderr)
    if outcome.hub_url:
        print(f"pushed to {outcome.hub_url}", file=sys.stderr)
    return 0

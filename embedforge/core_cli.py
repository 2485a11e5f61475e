"""`embedforge embed` and `embedforge rerank`: the core model layer from the shell."""

from __future__ import annotations

import argparse
import json
import sys


def add_model_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="Hub id or local folder")
    parser.add_argument("--dtype", default="auto", help="auto | float32 | bfloat16 | float16")
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:1 (default: cuda if available)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--max-length", type=int, default=None, help="tokens per text (default: the model's)")


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "embed", help="embed texts into a .npy matrix",
        description="Embed the texts of a JSONL file ({\"text\": ...} rows or bare strings) into an L2-normalised "
        "float32 matrix saved as .npy, rows in input order.",
    )
    add_model_args(p)
    p.add_argument("--input", required=True, help="JSONL with a 'text' field (or bare JSON strings)")
    p.add_argument("--output", required=True, help="where to write the .npy matrix")
    p.add_argument("--field", default="text", help="JSON field holding the text (default: text)")
    p.add_argument("--instruction", default=None, help="task instruction for queries (omit for documents)")
    p.add_argument("--dim", type=int, default=None, help="Matryoshka width to truncate to")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output file")
    p.set_defaults(func=run_embed)

    p = subparsers.add_parser(
        "rerank", help="score documents against a query",
        description="Score each document of a JSONL file against one query with a Qwen3-style yes/no reranker; "
        "prints one JSON line per document (input order) with its p(yes).",
    )
    add_model_args(p)
    p.add_argument("--query", required=True)
    p.add_argument("--input", required=True, help="JSONL with a 'text' field (or bare JSON strings)")
    p.add_argument("--field", default="text")
    p.add_argument("--instruction", default=None)
    p.add_argument("--output", default=None, help="JSONL to write (default: stdout)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output file")
    p.set_defaults(func=run_rerank)


def run_embed(args) -> int:
    from embedforge.errors import InputError
    from embedforge.io import atomic_path, check_output, output_lock, read_texts

    check_output(args.output, [args.input, args.model], overwrite=args.overwrite)
    with output_lock(args.output):
        texts = read_texts(args.input, field=args.field)  # bad input fails before a model loads
        if not texts:
            raise InputError("no texts", path=args.input)
        import numpy as np

        from embedforge.embedder import Embedder

        embedder = Embedder.from_pretrained(args.model, dtype=args.dtype, device=args.device)
        vectors = embedder.encode(texts, instruction=args.instruction, dim=args.dim, batch_size=args.batch_size,
                                  max_length=args.max_length, show_progress=sys.stderr.isatty())
        with atomic_path(args.output) as tmp, open(tmp, "wb") as fh:
            np.save(fh, vectors)
    print(f"wrote {vectors.shape[0]} x {vectors.shape[1]} float32 to {args.output}", file=sys.stderr)
    return 0


def run_rerank(args) -> int:
    import contextlib

    from embedforge.errors import InputError
    from embedforge.io import atomic_path, check_output, output_lock, read_texts

    if args.output:
        check_output(args.output, [args.input, args.model], overwrite=args.overwrite)
    with output_lock(args.output) if args.output else contextlib.nullcontext():
        docs = read_texts(args.input, field=args.field)
        if not docs:
            raise InputError("no documents", path=args.input)
        from embedforge.reranker import Reranker

        reranker = Reranker.from_pretrained(args.model, dtype=args.dtype, device=args.device,
                                            **({"max_length": args.max_length} if args.max_length else {}))
        scores = reranker.score(args.query, docs, instruction=args.instruction, batch_size=args.batch_size)
        lines = [json.dumps({"index": i, "score": float(s), "text": d}, ensure_ascii=False)
                 for i, (s, d) in enumerate(zip(scores, docs))]
        if args.output:
            with atomic_path(args.output) as tmp:
                tmp.write_text("\n".join(lines) + "\n", encoding="utf-8")
            return 0
    print("\n".join(lines))
    return 0

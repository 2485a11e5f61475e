"""The export gate: reload what was written, the way each runtime would, and refuse the export
unless it gives the source model's numbers.

Embedder: `Embedder` reload parity, batched vs one-by-one, the folder's own tokenizer against
`Embedder.tokenize` (EOS exactly once), plain transformers (left and right padding for last-token
decoders, the declared side for encoders), and sentence-transformers with `prompt_name="query"`.
Reranker: reload parity, batched vs one-by-one, the shipped chat template and the query/document
template pieces (joined, and as a tokenizer pair) against `Reranker.tokenize_pairs`, plain
`AutoModelForSequenceClassification` under right padding (seq-cls), and sentence-transformers'
CrossEncoder. The results go to `export_report.json`; a failed check raises `ExportGateError`
and the temporary folder is discarded.
"""

from __future__ import annotations

import gc
import importlib.util
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F

from embedforge.errors import EmbedforgeError
from embedforge.templates import RERANKER_PREFIX, RERANKER_SUFFIX

if TYPE_CHECKING:
    from embedforge.embedder import Embedder
    from embedforge.reranker import Reranker

REPORT_FILE = "export_report.json"
PROBE_QUERIES = (
    "what is spherical linear interpolation?",
    "How do I merge two fine-tuned checkpoints without losing retrieval quality on long documents?",
    "qwen3",
)
PROBE_DOCUMENTS = (
    "Slerp interpolates between two vectors along the great circle of the sphere they lie on.",
    "Paris is the capital of France. " * 6,
    "Matryoshka embeddings keep their quality when truncated to their first coordinates.",
)


class ExportGateError(EmbedforgeError):
    """The written folder does not reproduce the source model; the export was discarded."""


@dataclass
class Check:
    name: str
    passed: bool
    detail: str
    max_abs_diff: float | None = None
    tolerance: float | None = None


def default_tolerance(dtype: torch.dtype) -> float:
    """1e-4 in float32; half precision rounds each layer, so batched and single runs drift further."""
    return 1e-4 if dtype == torch.float32 else 2e-2


def close(name: str, got: np.ndarray, want: np.ndarray, tolerance: float, detail: str) -> Check:
    diff = float(np.max(np.abs(np.asarray(got, dtype=np.float64) - np.asarray(want, dtype=np.float64))))
    return Check(name, bool(diff <= tolerance), detail, diff, tolerance)


def same_ids(name: str, got: list[list[int]], want: list[list[int]], detail: str) -> Check:
    bad = [i for i, (g, w) in enumerate(zip(got, want)) if g != w]
    if len(got) != len(want):
        bad = list(range(max(len(got), len(want))))
    return Check(name, not bad, detail + (f"; rows differing: {bad}" if bad else ""))


def unpadded(features: dict[str, torch.Tensor]) -> list[list[int]]:
    return [ids[mask.bool()].tolist() for ids, mask in zip(features["input_ids"], features["attention_mask"])]


def has_sentence_transformers() -> bool:
    return importlib.util.find_spec("sentence_transformers") is not None


# --- embedder ----------------------------------------------------------------------------------


def embedder_checks(source: Embedder, folder: Path, query_prompt: str | None, tolerance: float) -> list[Check]:
    """Compare the export in `folder` against `source` on fixed probe texts."""
    from embedforge.embedder import Embedder
    from embedforge.pooling import pool

    texts = list(PROBE_QUERIES) + list(PROBE_DOCUMENTS)
    prompts = [query_prompt] * len(PROBE_QUERIES) + [None] * len(PROBE_DOCUMENTS)
    want = np.concatenate([source.encode(list(PROBE_QUERIES), prompt=query_prompt or "", batch_size=len(texts)),
                           source.encode(list(PROBE_DOCUMENTS), batch_size=len(texts))])
    device = source.device
    dtype = next(source.model.parameters()).dtype
    exported = Embedder.from_pretrained(folder, dtype=dtype, device=device)

    def encode(embedder: Embedder, batch_size: int) -> np.ndarray:
        return np.concatenate([embedder.encode(list(PROBE_QUERIES), prompt=query_prompt or "", batch_size=batch_size),
                               embedder.encode(list(PROBE_DOCUMENTS), batch_size=batch_size)])

    checks = [
        close("reload_parity", encode(exported, len(texts)), want, tolerance,
              "Embedder.from_pretrained(export).encode vs the source model"),
        close("batch_invariance", encode(exported, 1), encode(exported, len(texts)), tolerance,
              "one text per batch vs all texts in one padded batch"),
    ]

    # What a plain transformers user feeds: the prompt before the text, or, for a chat LLM, the chat
    # template rendering a system turn (the prompt) and a user turn (the text), as sentence-transformers does.
    tokenizer = exported.tokenizer  # AutoTokenizer.from_pretrained(export), as modeling.load_tokenizer loads it
    if source.spec.chat_template:
        inputs = [tokenizer.apply_chat_template(([{"role": "system", "content": p}] if p else [])
                                                + [{"role": "user", "content": t}], tokenize=False)
                  for p, t in zip(prompts, texts)]
        encode_kwargs = {"add_special_tokens": False}
        how = "AutoTokenizer(export)(chat template: prompt as system turn, text as user turn)"
    else:
        inputs = [(p or "") + t for p, t in zip(prompts, texts)]
        encode_kwargs = {}
        how = "AutoTokenizer(export)(prompt + text)"
    plain_ids = [tokenizer(t, **encode_kwargs)["input_ids"] for t in inputs]
    source_ids = source.token_ids(list(PROBE_QUERIES), prompt=query_prompt or "") + source.token_ids(
        list(PROBE_DOCUMENTS))
    checks.append(same_ids("tokenizer_matches_embedder", plain_ids, source_ids,
                           f"{how} vs Embedder.token_ids (EOS appended exactly once where the spec appends it)"))
    if source.spec.append_eos:
        eos = tokenizer.convert_tokens_to_ids(source.spec.eos_token)
        once = all(ids[-1] == eos and (len(ids) < 2 or ids[-2] != eos) for ids in plain_ids)
        checks.append(Check("eos_exactly_once", once, f"every probe ends with one {source.spec.eos_token!r}"))

    # Decoders (RoPE, last-token pooling) must give the same vectors under either padding side;
    # encoders with absolute positions are only defined under the side they declare (right).
    sides = ("left", "right") if source.spec.pooling == "lasttoken" else (source.spec.padding_side,)
    for side in sides:
        tokenizer.padding_side = side
        features = tokenizer(inputs, padding=True, return_tensors="pt", **encode_kwargs).to(device)
        with torch.inference_mode():
            hidden = exported.model(**features).last_hidden_state
            vectors = F.normalize(pool(hidden, features["attention_mask"], source.spec.pooling).float(), dim=-1)
        checks.append(close(f"transformers_{side}_padding", vectors.cpu().numpy(), want, tolerance,
                            f"AutoTokenizer + AutoModel, {side} padding, {source.spec.pooling} pooling, L2 norm"))
    del exported, tokenizer
    gc.collect()

    if has_sentence_transformers():
        from sentence_transformers import SentenceTransformer

        model = SentenceTransformer(str(folder), device=str(device), model_kwargs={"dtype": dtype})
        got_queries = model.encode(list(PROBE_QUERIES), prompt_name="query" if query_prompt else None)
        got_documents = model.encode(list(PROBE_DOCUMENTS))
        checks.append(close("sentence_transformers_parity", np.concatenate([got_queries, got_documents]), want,
                            tolerance, "SentenceTransformer(export).encode, prompt_name='query' for queries"))
        del model
        gc.collect()
    return checks


# --- reranker ----------------------------------------------------------------------------------


def reranker_checks(source: Reranker, folder: Path, fmt: str, instruction: str, tolerance: float) -> list[Check]:
    """Compare the export in `folder` against `source` on fixed probe pairs."""
    from embedforge.reranker import Reranker

    queries = [q for q in PROBE_QUERIES for _ in PROBE_DOCUMENTS]
    documents = list(PROBE_DOCUMENTS) * len(PROBE_QUERIES)
    want = source.score(queries, documents, instruction=instruction, batch_size=len(queries))
    device = source.device
    dtype = next(source.model.parameters()).dtype
    exported = Reranker.from_pretrained(folder, dtype=dtype, device=device, max_length=source.max_length)
    checks = [
        close("reload_parity", exported.score(queries, documents, instruction=instruction, batch_size=len(queries)),
              want, tolerance, f"Reranker.from_pretrained(export) ({fmt}) p(yes) vs the source model"),
        close("batch_invariance", exported.score(queries, documents, instruction=instruction, batch_size=1),
              exported.score(queries, documents, instruction=instruction, batch_size=len(queries)), tolerance,
              "one pair per batch vs all pairs in one padded batch"),
    ]

    tokenizer = exported.tokenizer  # AutoTokenizer.from_pretrained(export)
    rendered = [
        tokenizer.apply_chat_template(
            [{"role": "system", "content": instruction}, {"role": "query", "content": q},
             {"role": "document", "content": d}], tokenize=False)
        for q, d in zip(queries, documents)
    ]
    reference = unpadded(source.tokenize_pairs(queries, documents, instruction))
    checks.append(same_ids("chat_template_matches_reranker",
                           [tokenizer(text)["input_ids"] for text in rendered], reference,
                           "tokenizer(chat_template(system, query, document)) vs Reranker.tokenize_pairs"))
    # What vLLM without a score template (text_1 + text_2) and TEI (a tokenizer pair) receive.
    firsts = [f"{RERANKER_PREFIX}<Instruct>: {instruction}\n<Query>: {q}\n" for q in queries]
    seconds = [f"<Document>: {d}{RERANKER_SUFFIX}" for d in documents]
    checks.append(same_ids("template_pieces_match_reranker",
                           [tokenizer(a + b)["input_ids"] for a, b in zip(firsts, seconds)], reference,
                           "tokenizer(query_template + document_template) vs Reranker.tokenize_pairs"))
    checks.append(same_ids("template_pair_matches_reranker",
                           [tokenizer(a, b)["input_ids"] for a, b in zip(firsts, seconds)], reference,
                           "tokenizer(query_template, document_template) as a pair vs Reranker.tokenize_pairs"))

    if fmt == "seq-cls":
        tokenizer.padding_side = "right"
        features = tokenizer(rendered, padding=True, return_tensors="pt").to(device)
        with torch.inference_mode():
            logits = exported.model(**features).logits[:, 0].float()
        checks.append(close("transformers_right_padding", torch.sigmoid(logits).cpu().numpy(), want, tolerance,
                            "AutoModelForSequenceClassification, right padding: sigmoid(logit) vs p(yes)"))
    del exported, tokenizer
    gc.collect()

    if has_sentence_transformers():
        from sentence_transformers import CrossEncoder

        model = CrossEncoder(str(folder), device=str(device), model_kwargs={"dtype": dtype})
        got = model.predict(list(zip(queries, documents)), prompt=instruction, batch_size=len(queries))
        checks.append(close("cross_encoder_parity", got, want, tolerance,
                            "CrossEncoder(export).predict(pairs, prompt=instruction) vs p(yes)"))
        del model
        gc.collect()
    return checks


def summarize(checks: list[Check]) -> dict:
    return {"passed": all(c.passed for c in checks), "checks": [asdict(c) for c in checks]}


def raise_on_failure(checks: list[Check], folder_label: str) -> None:
    failed = [c for c in checks if not c.passed]
    if failed:
        lines = "; ".join(
            f"{c.name}: {c.detail}" + (f" (max |diff| {c.max_abs_diff:.3g} > {c.tolerance:g})"
                                       if c.max_abs_diff is not None else "")
            for c in failed
        )
        raise ExportGateError(f"{folder_label}: export gate failed, nothing written: {lines}")

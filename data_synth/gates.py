"""Quality gates for synthetic pairs. Each gate takes rows and returns the kept rows and the dropped
rows with a reason, so the filter report can say why every row left.

- copy: the query mostly repeats the passage (small LLMs do this);
- near-duplicate: MinHash over character 5-grams of the query;
- contamination: see contamination.py;
- cosine: teacher similarity of query and positive below a threshold (0.7 in the Qwen3 report,
  a Qwen3-Embedding cosine). Cosines of other teachers live elsewhere (all-MiniLM-L6-v2's
  query-passage cosines sit far lower), so the threshold can come from the teacher's own scores:
  `calibrated_threshold` takes a high percentile of the cosines between queries and passages that
  are NOT theirs, i.e. a pair is kept when its passage scores above what almost no random passage
  reaches for that query;
- round trip: the positive is not in the teacher's top-k for its query among the positives.
The cheap lexical gates run first, the model gates last. Instructions are given to the teacher
only when it is instruction-aware (`instruction_aware`): an encoder such as MiniLM never saw one.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from embedforge.data_synth.corpus import normalize_text
from embedforge.templates import INSTRUCTION_SIDES

Row = dict[str, Any]
_WORD = re.compile(r"\w+", re.UNICODE)


@dataclass
class GateResult:
    name: str
    kept: list[Row]
    dropped: list[tuple[Row, str]] = field(default_factory=list)
    threshold: float | None = None  # the value a calibrated gate chose
    note: str = ""


def _quality(row: Row) -> dict[str, Any]:
    return row.setdefault("quality", {})


# --- copy ------------------------------------------------------------------------------------------


def copy_ratio(query: str, passage: str, n: int = 4) -> float:
    """Share of the query's words that sit inside a word n-gram also found in the passage.

    A query that pastes a sentence of the passage scores 1.0; a real question that shares a short
    phrase scores low. Queries shorter than n words score 0 (too short to judge).
    """
    q = [w.casefold() for w in _WORD.findall(query)]
    p = [w.casefold() for w in _WORD.findall(passage)]
    if len(q) < n:
        return 0.0
    grams = {tuple(p[i : i + n]) for i in range(len(p) - n + 1)}
    covered = np.zeros(len(q), dtype=bool)
    for i in range(len(q) - n + 1):
        if tuple(q[i : i + n]) in grams:
            covered[i : i + n] = True
    return float(covered.mean())


def copy_gate(
    rows: Sequence[Row], max_ratio: float = 0.6, n: int = 4, tasks: Sequence[str] = ("retrieval",)
) -> GateResult:
    """Drop rows whose query copies its positive passage (only tasks where the positive is the passage)."""
    result = GateResult("copy", [])
    for row in rows:
        if row.get("task", "retrieval") not in tasks:
            result.kept.append(row)
            continue
        ratio = copy_ratio(row["query"], row["positive"], n)
        _quality(row)["copy_ratio"] = round(ratio, 4)
        if ratio > max_ratio:
            result.dropped.append(
                (row, f"copy: {ratio:.2f} of the query repeats the passage (> {max_ratio})")
            )
        else:
            result.kept.append(row)
    return result


# --- near duplicates -----------------------------------------------------------------------------


def shingles(text: str, k: int = 5) -> set[str]:
    norm = normalize_text(text)
    return {norm[i : i + k] for i in range(max(1, len(norm) - k + 1))}


def jaccard(a: str, b: str, k: int = 5) -> float:
    sa, sb = shingles(a, k), shingles(b, k)
    return len(sa & sb) / len(sa | sb)


def _mix64(z: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser: a bijective, well-mixed 64-bit hash (wrapping uint64 arithmetic)."""
    with np.errstate(over="ignore"):
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


def minhash_signatures(texts: Sequence[str], num_perm: int = 128, k: int = 5, seed: int = 0) -> np.ndarray:
    """[len(texts), num_perm] uint64 MinHash signatures of character k-gram sets.

    Permutation j hashes a shingle as mix64(h XOR s_j) with random 64-bit s_j. (The textbook
    (a*x + b) mod p family underestimated the Jaccard of short texts by ~0.09 on average in our
    test; the mixer's error is ~0.01.) Written out because it is a few lines and datasketch is not
    a dependency.
    """
    salts = np.random.default_rng(seed).integers(
        0, np.iinfo(np.uint64).max, size=num_perm, dtype=np.uint64, endpoint=True
    )
    out = np.empty((len(texts), num_perm), dtype=np.uint64)
    for i, text in enumerate(texts):
        hashes = np.fromiter(
            (
                int.from_bytes(hashlib.blake2b(s.encode("utf-8"), digest_size=8).digest(), "little")
                for s in shingles(text, k)
            ),
            dtype=np.uint64,
        )
        out[i] = _mix64(hashes[:, None] ^ salts[None, :]).min(axis=0)
    return out


def near_duplicate_gate(
    rows: Sequence[Row],
    threshold: float = 0.85,
    field_name: str = "query",
    num_perm: int = 128,
    bands: int = 32,
) -> GateResult:
    """Keep the first of each group of rows whose `field_name` texts have estimated Jaccard >= threshold.

    LSH banding finds candidate pairs without comparing all pairs; each candidate is confirmed on
    the signature estimate before a row is dropped.
    """
    if num_perm % bands:
        raise ValueError(f"num_perm {num_perm} must be a multiple of bands {bands}")
    result = GateResult("near_duplicate", [])
    if not rows:
        return result
    sigs = minhash_signatures([r[field_name] for r in rows], num_perm)
    width = num_perm // bands
    buckets: dict[tuple[int, bytes], list[int]] = {}
    for i, row in enumerate(rows):
        keys = [(band, sigs[i, band * width : (band + 1) * width].tobytes()) for band in range(bands)]
        candidates = {j for key in keys for j in buckets.get(key, ())}
        best = max(candidates, key=lambda j: float(np.mean(sigs[i] == sigs[j])), default=None)
        similarity = float(np.mean(sigs[i] == sigs[best])) if best is not None else 0.0
        if best is not None and similarity >= threshold:
            result.dropped.append(
                (row, f"near_duplicate: {field_name} ~ row {best} (jaccard~{similarity:.2f})")
            )
            continue
        for key in keys:
            buckets.setdefault(key, []).append(i)
        result.kept.append(row)
    return result


# --- teacher gates ---------------------------------------------------------------------------------


def encode_rows(
    embedder, texts: Sequence[str], instructions: Sequence[str | None], batch_size: int = 32
) -> np.ndarray:
    """Embed texts, each with its own instruction (grouped so each instruction is one encode call)."""
    out = np.zeros((len(texts), embedder.dimension), dtype=np.float32)
    groups: dict[str | None, list[int]] = {}
    for i, instruction in enumerate(instructions):
        groups.setdefault(instruction, []).append(i)
    for instruction, idx in groups.items():
        out[idx] = embedder.encode([texts[i] for i in idx], instruction=instruction, batch_size=batch_size)
    return out


def instruction_aware(embedder) -> bool:
    """Whether a teacher was trained with query instructions: last-token pooling (Qwen3-Embedding,
    e5-mistral and the embedders embedforge trains) or a stored sentence-transformers query prompt.
    Mean- or CLS-pooled encoders (all-MiniLM-L6-v2, BERT-style) are not."""
    spec = getattr(embedder, "spec", None)
    if spec is None:
        return False
    return spec.pooling == "lasttoken" or bool(spec.prompts.get("query"))


def row_instructions(
    rows: Sequence[Row], use_instructions: bool = True
) -> tuple[list[str | None], list[str | None]]:
    """(query-side, document-side) instruction per row, following the official evaluation's sides."""
    if not use_instructions:
        return [None] * len(rows), [None] * len(rows)
    q = [r.get("instruction") for r in rows]
    d = [
        r.get("instruction") if INSTRUCTION_SIDES.get(r.get("task", "retrieval")) == "both" else None
        for r in rows
    ]
    return q, d


def calibrated_threshold(q: np.ndarray, p: np.ndarray, positives: Sequence[str], percentile: float = 99.0,
                         max_pairs: int = 200_000, seed: int = 0) -> float | None:
    """The `percentile` of teacher cosines between queries and passages other than their own.

    q, p: normalised query and positive vectors, one per row; `positives` the positive texts (pairs
    that share a positive text are not counted as foreign). At most `max_pairs` pairs are scored,
    sampled without a full matrix. None when every row has the same positive (nothing foreign).
    """
    index: dict[str, int] = {}
    first: list[int] = []
    for i, text in enumerate(positives):
        if text not in index:
            index[text] = len(first)
            first.append(i)
    if len(first) < 2:
        return None
    docs = p[first]
    own = np.array([index[text] for text in positives])
    rng = np.random.default_rng(seed)
    per_row = max(1, min(len(first) - 1, max_pairs // len(positives)))
    scores = []
    for i in range(len(positives)):
        others = rng.choice(len(first) - 1, size=per_row, replace=False)
        others = others + (others >= own[i])  # skip the row's own passage
        scores.append(docs[others] @ q[i])
    return float(np.percentile(np.concatenate(scores), percentile))


def cosine_gate(
    rows: Sequence[Row],
    embedder,
    threshold: float | None = 0.7,
    use_instructions: bool = True,
    batch_size: int = 32,
    percentile: float = 99.0,
) -> GateResult:
    """Keep rows whose teacher cosine(query, positive) >= threshold (report: 0.7).

    `threshold=None` calibrates it on these rows (`calibrated_threshold` at `percentile`); the
    value used is in `result.threshold`.
    """
    result = GateResult("cosine", [])
    if not rows:
        return result
    qi, di = row_instructions(rows, use_instructions)
    q = encode_rows(embedder, [r["query"] for r in rows], qi, batch_size)
    p = encode_rows(embedder, [r["positive"] for r in rows], di, batch_size)
    if threshold is None:
        threshold = calibrated_threshold(q, p, [r["positive"] for r in rows], percentile)
        if threshold is None:
            result.kept = list(rows)
            result.note = "not calibrated: every row has the same positive; gate skipped"
            return result
        threshold = round(threshold, 4)
    result.threshold = threshold
    scores = np.einsum("ij,ij->i", q, p)
    for row, score in zip(rows, scores):
        _quality(row)["teacher_cosine"] = round(float(score), 4)
        if score >= threshold:
            result.kept.append(row)
        else:
            result.dropped.append((row, f"cosine: {score:.3f} < {threshold}"))
    return result


def positive_ranks(
    rows: Sequence[Row],
    embedder,
    use_instructions: bool = True,
    extra_documents: Sequence[str] = (),
    batch_size: int = 32,
) -> list[int]:
    """The teacher's rank (0 = first) of each row's positive for its query.

    The candidates of a row are the distinct positives of its task (plus `extra_documents`, e.g.
    the corpus); ties with the positive count against it, so a rank is never flattered.
    """
    ranks = [0] * len(rows)
    by_task: dict[str, list[int]] = {}
    for i, row in enumerate(rows):
        by_task.setdefault(row.get("task", "retrieval"), []).append(i)
    for idx in by_task.values():
        task_rows = [rows[i] for i in idx]
        docs = list(dict.fromkeys([r["positive"] for r in task_rows] + list(extra_documents)))
        position = {text: j for j, text in enumerate(docs)}
        qi, di = row_instructions(task_rows, use_instructions)
        q = encode_rows(embedder, [r["query"] for r in task_rows], qi, batch_size)
        doc_instruction = di[0] if len(set(di)) == 1 else None
        d = embedder.encode(docs, instruction=doc_instruction, batch_size=batch_size)
        for start in range(0, len(task_rows), 1024):  # score a block of queries at a time, never all x all
            block = q[start : start + 1024] @ d.T
            for offset, scores in enumerate(block):
                i = start + offset
                own = scores[position[task_rows[i]["positive"]]]
                ranks[idx[i]] = int((scores > own).sum() + (scores == own).sum() - 1)
    return ranks


def roundtrip_gate(
    rows: Sequence[Row],
    embedder,
    k: int = 10,
    use_instructions: bool = True,
    extra_documents: Sequence[str] = (),
    batch_size: int = 32,
) -> GateResult:
    """Keep rows whose positive ranks in the teacher's top-k for the query (see `positive_ranks`)."""
    result = GateResult("roundtrip", [])
    ranks = positive_ranks(rows, embedder, use_instructions, extra_documents, batch_size)
    for row, rank in zip(rows, ranks):
        _quality(row)["roundtrip_rank"] = rank
        if rank < k:
            result.kept.append(row)
        else:
            result.dropped.append((row, f"roundtrip: positive ranked {rank + 1} (> top-{k})"))
    return result

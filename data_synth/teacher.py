"""Teacher scores for mined rows: a reranker's log-odds for (query, positive) and each (query, negative).

GPL-style distillation (train/distill.py) needs, for every training row, how strongly a stronger model
prefers the positive over each hard negative. The score is the reranker's log-odds of `yes`,
logit(p(yes)) = logit_yes - logit_no, read from the logits rather than from p (a float32 p near 0 or
1 loses the difference). A one-logit sequence-classification export gives that difference directly.

Template. The yes/no prompt is Qwen3-Reranker's ChatML conversation (`<|im_start|>system ...`).
Its assistant turn opens with an empty `<think>\\n\\n</think>` block, the Qwen3 convention for
"answer without thinking". A chat model of another family that speaks ChatML but was never trained
with think tags (SmolLM2: `<think>` is three ordinary tokens in its tokenizer) reads that block as
stray text right before its answer; for such a model `auto` chooses the `chatml` template, the same
conversation with a bare assistant turn, which is exactly the model's own chat format. A tokenizer
without single-token `<|im_start|>` / `<|im_end|>` does not speak ChatML at all and is refused.

Resumable: scores are cached under `<output>/teacher/<key>/part-*.json`, each part written atomically
after every `CHUNK` pairs, keyed by (instruction, query, document), so a killed or repeated run
scores only what is missing and concurrent shards never write the same file.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from embedforge.errors import EmbedforgeError, ModelLoadError
from embedforge.io import atomic_path, read_json_file
from embedforge.templates import RERANKER_SUFFIX

logger = logging.getLogger(__name__)

CHATML_SUFFIX = "<|im_end|>\n<|im_start|>assistant\n"
TEMPLATE_SUFFIXES = {"qwen3": RERANKER_SUFFIX, "chatml": CHATML_SUFFIX}
CHUNK = 512  # pairs scored between two cache writes


def choose_template(reranker, requested: str = "auto") -> str:
    """The yes/no template for this model (module docstring): `qwen3` for a sequence-classification
    export or a tokenizer with a single `<think>` token, else `chatml`."""
    if requested not in ("auto", *TEMPLATE_SUFFIXES):
        raise ValueError(f"unknown teacher template {requested!r}; choose auto, qwen3 or chatml")
    if reranker.is_seq_cls:
        return "qwen3" if requested == "auto" else requested
    tokenizer = reranker.tokenizer
    for marker in ("<|im_start|>", "<|im_end|>"):
        if len(tokenizer(marker, add_special_tokens=False)["input_ids"]) != 1:
            raise ModelLoadError(f"{reranker.name}: {marker} is not one token in this tokenizer; the yes/no "
                                 "teacher prompt is a ChatML conversation and this model does not speak it")
    if requested != "auto":
        return requested
    return "qwen3" if len(tokenizer("<think>", add_special_tokens=False)["input_ids"]) == 1 else "chatml"


class TeacherScorer:
    """Log-odds of `yes` for (query, document) pairs, in length-sorted batches, without gradient.

    Example:
        >>> scorer = TeacherScorer(Reranker.from_pretrained("Qwen/Qwen3-Reranker-0.6B"))
        >>> scorer.log_odds(["what is slerp?"] * 2, ["Slerp interpolates ...", "Paris is in France."])
        array([ 4.1, -6.3], dtype=float32)
    """

    def __init__(self, reranker, *, template: str = "auto", max_length: int = 1024, batch_size: int = 16):
        self.template = choose_template(reranker, template)
        # A copy that shares model and tokenizer: the caller's reranker keeps its own template.
        self.reranker = copy.copy(reranker)
        self.reranker.suffix_ids = reranker.tokenizer(TEMPLATE_SUFFIXES[self.template],
                                                      add_special_tokens=False)["input_ids"]
        self.max_length = max_length
        self.batch_size = batch_size

    @property
    def name(self) -> str:
        return self.reranker.name

    def log_odds(self, queries: Sequence[str], documents: Sequence[str],
                 instructions: Sequence[str | None] | None = None) -> np.ndarray:
        import torch

        instructions = list(instructions) if instructions is not None else [None] * len(queries)
        out = np.zeros(len(queries), dtype=np.float32)
        order = sorted(range(len(queries)), key=lambda i: -(len(queries[i]) + len(documents[i])))
        with torch.inference_mode():
            for start in range(0, len(order), self.batch_size):
                batch = order[start:start + self.batch_size]
                features = self.reranker.tokenize_pairs([queries[i] for i in batch], [documents[i] for i in batch],
                                                        [instructions[i] for i in batch], self.max_length)
                logits = self.reranker.yes_no_logits(features)
                out[batch] = (logits[:, 1] - logits[:, 0]).cpu().numpy()
        return out


def pair_key(instruction: str | None, query: str, document: str) -> str:
    return hashlib.sha256(json.dumps([instruction, query, document], ensure_ascii=False).encode()).hexdigest()[:24]


def cache_folder(output: str | os.PathLike, teacher: str, template: str, max_length: int) -> Path:
    """One folder per teacher identity, so scores of another model or template are never reused."""
    ident = os.path.abspath(teacher) if os.path.isdir(teacher) else teacher
    key = hashlib.sha256(json.dumps([ident, template, max_length]).encode()).hexdigest()[:16]
    return Path(output) / "teacher" / key


def load_cache(folder: Path) -> dict[str, float]:
    scores: dict[str, float] = {}
    for part in sorted(folder.glob("part-*.json")) if folder.is_dir() else ():
        scores.update(read_json_file(part))
    return scores


def _save_part(folder: Path, scores: dict[str, float]) -> None:
    name = hashlib.sha256("".join(sorted(scores)).encode()).hexdigest()[:16]
    with atomic_path(folder / f"part-{name}.json") as tmp:
        Path(tmp).write_text(json.dumps(scores), encoding="utf-8")


@dataclass
class TeacherReport:
    pairs: int = 0  # (query, document) pairs the rows need
    scored: int = 0  # computed in this run
    reused: int = 0  # found in the cache
    pair_accuracy: float | None = None  # share of (positive, negative) pairs where the positive wins
    rows_prefer_negative: int = 0  # rows where some negative outscores the positive
    dropped_rows: int = 0  # rows removed by `drop_margin`
    seconds: float = 0.0


def score_rows(rows: list[dict], scorer: TeacherScorer, folder: Path,
               drop_margin: float | None = None) -> tuple[list[dict], TeacherReport]:
    """Give every row `teacher_scores = [t(q, positive), t(q, neg_1), ...]` aligned with `negatives`.

    Returns the rows to keep (all of them unless `drop_margin` is set: then a row is dropped when the
    teacher scores one of its negatives more than `drop_margin` log-odds above its positive) and
    the counts. Pairs already in `folder`'s cache are not scored again.
    """
    began = time.monotonic()
    report = TeacherReport()
    wanted: dict[str, tuple[str | None, str, str]] = {}
    for row in rows:
        instruction = row.get("instruction")
        for doc in [row["positive"], *(row.get("negatives") or [])]:
            wanted.setdefault(pair_key(instruction, row["query"], doc), (instruction, row["query"], doc))
    report.pairs = len(wanted)
    scores = load_cache(folder)
    missing = [key for key in wanted if key not in scores]
    report.reused = report.pairs - len(missing)
    for start in range(0, len(missing), CHUNK):
        keys = missing[start:start + CHUNK]
        triples = [wanted[k] for k in keys]
        values = scorer.log_odds([t[1] for t in triples], [t[2] for t in triples], [t[0] for t in triples])
        if not np.isfinite(values).all():
            bad = triples[int(np.flatnonzero(~np.isfinite(values))[0])]
            raise EmbedforgeError(f"teacher {scorer.name} gave a non-finite score (query {bad[1][:60]!r}); "
                                  "load it in float32 (--device cpu or a float32 dtype)")
        part = {k: round(float(v), 4) for k, v in zip(keys, values)}
        _save_part(folder, part)
        scores.update(part)
        report.scored += len(keys)
        logger.info("teacher scored %d/%d pairs", start + len(keys), len(missing))
    kept, wins, comparisons = [], 0, 0
    for row in rows:
        instruction = row.get("instruction")
        row_scores = [scores[pair_key(instruction, row["query"], doc)]
                      for doc in [row["positive"], *(row.get("negatives") or [])]]
        row["teacher_scores"] = row_scores
        best_negative = max(row_scores[1:], default=None)
        wins += sum(row_scores[0] > s for s in row_scores[1:])
        comparisons += len(row_scores) - 1
        if best_negative is not None and best_negative > row_scores[0]:
            report.rows_prefer_negative += 1
            if drop_margin is not None and best_negative - row_scores[0] > drop_margin:
                report.dropped_rows += 1
                continue
        kept.append(row)
    report.pair_accuracy = round(wins / comparisons, 4) if comparisons else None
    report.seconds = time.monotonic() - began
    return kept, report

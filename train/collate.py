"""Collation: the texts of one batch as each task's loss needs them.

Embedding: queries with their instruction (applied by the embedder, as a prompt or, for a chat
LLM, as the system turn), positives, up to `num_negatives` hard negatives per row and the teacher
scores of the positive and of the negatives picked (`ContrastiveTexts`). Reranker: one group per row, the positive first and then
its negatives (`RerankerGroups`). Negatives are subsampled with a seed of (run seed, step), so one
process and several processes pick the same ones.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from embedforge.errors import InputError
from embedforge.train.sampler import Batch


@dataclass
class ContrastiveTexts:
    """Texts of one batch for the embedding loss: queries and the instruction of each (the row's,
    else its dataset's), positives; `negatives[i]` holds at most `k` texts (rows with fewer are
    padded and masked later); `teacher_scores[i]` = [t(q, positive), t(q, negatives[i][0]), ...],
    1 + len(negatives[i]) numbers, NaN where the teacher gave none (all NaN for a row without
    teacher scores)."""

    queries: list[str]
    instructions: list[str | None]
    positives: list[str]
    negatives: list[list[str]]
    k: int
    teacher_scores: list[list[float]]

    def slice(self, start: int, stop: int) -> ContrastiveTexts:
        return ContrastiveTexts(self.queries[start:stop], self.instructions[start:stop], self.positives[start:stop],
                                self.negatives[start:stop], self.k, self.teacher_scores[start:stop])


def choose_negative_indices(batch: Batch, seed: int) -> list[list[int]]:
    """Which of each row's negatives go into the batch: all when there are at most `num_negatives`,
    else a sorted subsample seeded by (seed, step), so one process and several processes pick the
    same ones."""
    rng = np.random.default_rng([seed, batch.index, 31])
    out = []
    for row in batch.rows:
        count = len(row.negatives)
        if count > batch.num_negatives:
            out.append(sorted(rng.choice(count, size=batch.num_negatives, replace=False).tolist()))
        else:
            out.append(list(range(count)))
    return out


def choose_negatives(batch: Batch, seed: int) -> list[list[str]]:
    """Up to `num_negatives` of each row's negatives (`choose_negative_indices`)."""
    picks = choose_negative_indices(batch, seed)
    return [[row.negatives[j] for j in picked] for row, picked in zip(batch.rows, picks)]


def contrastive_texts(batch: Batch, seed: int) -> ContrastiveTexts:
    picks = choose_negative_indices(batch, seed)
    negatives = [[row.negatives[j] for j in picked] for row, picked in zip(batch.rows, picks)]
    teacher = [[math.nan] * (1 + len(picked)) if row.teacher_scores is None
               else [row.teacher_scores[0], *(row.teacher_scores[1 + j] for j in picked)]
               for row, picked in zip(batch.rows, picks)]
    instructions = [r.instruction if r.instruction is not None else batch.instruction for r in batch.rows]
    k = max((len(n) for n in negatives), default=0)
    return ContrastiveTexts([r.query for r in batch.rows], [i or None for i in instructions],
                            [r.positive for r in batch.rows], negatives, k, teacher)


@dataclass
class RerankerGroups:
    """Reranker pairs grouped per row: the positive first, then `group_size - 1` negatives."""

    queries: list[str]
    documents: list[str]
    instructions: list[str | None]
    labels: list[int]
    group_size: int

    def slice_groups(self, start: int, stop: int) -> RerankerGroups:
        g = self.group_size
        return RerankerGroups(self.queries[start * g:stop * g], self.documents[start * g:stop * g],
                              self.instructions[start * g:stop * g], self.labels[start * g:stop * g], g)


def reranker_groups(batch: Batch, seed: int) -> RerankerGroups:
    """One group per row of 1 positive + K negatives, K = the batch's num_negatives (at least 1).

    A row with fewer negatives is filled with other rows' positives (in-batch negatives, taken in
    a fixed rotation), so every group has the same size and the list-wise loss stays well defined.
    """
    negatives = choose_negatives(batch, seed)
    k = max(1, batch.num_negatives)
    rows = batch.rows
    queries, documents, instructions, labels = [], [], [], []
    for i, row in enumerate(rows):
        fill = [rows[(i + j) % len(rows)].positive for j in range(1, len(rows))]
        fill = [d for d in fill if d != row.positive and d not in negatives[i]]
        group = (negatives[i] + fill)[:k]
        if len(group) < k:
            raise InputError(f"{row.where}: needs {k} negatives for the reranker and the batch cannot supply them; "
                             "add negatives or lower num_negatives")
        instruction = row.instruction if row.instruction is not None else batch.instruction
        for doc, label in [(row.positive, 1)] + [(d, 0) for d in group]:
            queries.append(row.query)
            documents.append(doc)
            instructions.append(instruction)
            labels.append(label)
    return RerankerGroups(queries, documents, instructions, labels, k + 1)

"""Training data, from files to the texts of one step; the public import point of its modules:

- `rows`: one row and its checks (file, line and field in every error);
- `stores`: random access to rows without holding them in memory (JSONL by byte offset, Arrow
  memory-mapped) and the validating pass that builds a store;
- `sources`: a recipe's datasets as mixing sources (`load_sources`);
- `sampler`: the temperature-mixing, resumable batch stream (`MixingSampler`);
- `collate`: a batch's texts for the embedding loss or the reranker groups.
"""

from __future__ import annotations

from embedforge.train.collate import (
    ContrastiveTexts,
    RerankerGroups,
    choose_negatives,
    contrastive_texts,
    reranker_groups,
)
from embedforge.train.rows import PairRow, parse_row
from embedforge.train.sampler import Batch, MixingSampler, mixing_probabilities
from embedforge.train.sources import Source, load_sources
from embedforge.train.stores import FileReport

__all__ = [
    "Batch",
    "ContrastiveTexts",
    "FileReport",
    "MixingSampler",
    "PairRow",
    "RerankerGroups",
    "Source",
    "choose_negatives",
    "contrastive_texts",
    "load_sources",
    "mixing_probabilities",
    "parse_row",
    "reranker_groups",
]

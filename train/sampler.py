"""The mixing sampler: a deterministic, resumable stream of global batches, one source per batch.

Each global batch is drawn from ONE source, chosen with probability p_i ∝ (w_i · n_i)^(1/T)
(T = 1: proportional to size, T → ∞: uniform). Within a batch no two rows share a query text or a
positive text: such a row is deferred to the source's next batch (in-batch duplicates are false
negatives). Every random choice is a pure function of (seed, step, source, epoch), so the sampler
state that resumes a run is just each source's cursor.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from embedforge.errors import InputError
from embedforge.train.rows import PairRow
from embedforge.train.sources import Source


@dataclass
class Batch:
    """One global batch: `index` is the sampler's batch counter (= the optimizer step)."""

    index: int
    source: str
    rows: list[PairRow]
    instruction: str | None
    num_negatives: int

    def where(self, limit: int = 5) -> str:
        places = [r.where for r in self.rows[:limit]]
        more = f" and {len(self.rows) - limit} more" if len(self.rows) > limit else ""
        return ", ".join(places) + more


def mixing_probabilities(sizes: Sequence[int], weights: Sequence[float], temperature: float) -> np.ndarray:
    """p_i ∝ (w_i · n_i)^(1/T)."""
    scaled = np.asarray(weights, dtype=np.float64) * np.asarray(sizes, dtype=np.float64)
    powered = scaled ** (1.0 / temperature)
    return powered / powered.sum()


class MixingSampler:
    """Deterministic, resumable stream of global batches, one source per batch (see module docstring).

    The state (`state_dict`) is the batch counter plus, per source, its epoch, position in that
    epoch's permutation and the rows deferred as in-batch duplicates.
    """

    def __init__(self, sources: list[Source], batch_size: int, temperature: float = 1.0, seed: int = 0):
        small = [f"{s.name} ({len(s)} rows)" for s in sources if len(s) < batch_size]
        if small:
            raise InputError(f"dataset smaller than one batch of {batch_size} rows: {', '.join(small)}; lower "
                             "batch_size or leave it out")
        self.sources, self.batch_size, self.seed = sources, batch_size, seed
        self.probabilities = mixing_probabilities([len(s) for s in sources], [s.weight for s in sources],
                                                  temperature)
        self._cumulative = np.cumsum(self.probabilities)
        self.batches = 0
        self.cursors = [{"epoch": 0, "pos": 0, "deferred": []} for _ in sources]
        self.dropped_duplicates = 0
        self._perm_cache: dict[int, tuple[int, np.ndarray]] = {}

    @property
    def batches_per_epoch(self) -> int:
        """Batches in one pass over all data (each source contributes n_i // batch_size)."""
        return sum(len(s) // self.batch_size for s in self.sources)

    def _permutation(self, k: int, epoch: int) -> np.ndarray:
        cached = self._perm_cache.get(k)
        if cached is None or cached[0] != epoch:
            rng = np.random.default_rng([self.seed, k, epoch, 17])
            cached = (epoch, rng.permutation(len(self.sources[k])))
            self._perm_cache[k] = cached
        return cached[1]

    def choose_source(self, index: int) -> int:
        u = np.random.default_rng([self.seed, index, 29]).random()
        return int(min(np.searchsorted(self._cumulative, u, side="right"), len(self.sources) - 1))

    def _candidates(self, k: int) -> Iterator[int]:
        """Deferred rows first, then the permutation stream (advancing the cursor as it goes)."""
        cursor = self.cursors[k]
        while cursor["deferred"]:
            yield cursor["deferred"].pop(0)
        while True:
            perm = self._permutation(k, cursor["epoch"])
            if cursor["pos"] >= len(perm):
                cursor["epoch"], cursor["pos"] = cursor["epoch"] + 1, 0
                continue
            cursor["pos"] += 1
            yield int(perm[cursor["pos"] - 1])

    def next_batch(self) -> Batch:
        k = self.choose_source(self.batches)
        source, cursor = self.sources[k], self.cursors[k]
        rows: list[PairRow] = []
        queries: set[str] = set()
        positives: set[str] = set()
        deferred: list[int] = []
        # Enough to see every row at least once even when the batch crosses into the next epoch,
        # whose permutation repeats the rows this batch already took (small data, many epochs).
        budget = 2 * len(source) + len(cursor["deferred"])
        candidates = self._candidates(k)
        for examined, i in enumerate(candidates):
            if examined > budget:
                raise InputError(f"dataset {source.name}: fewer than {self.batch_size} rows with distinct query "
                                 "and positive texts; lower batch_size or add data")
            row = source.row(i)
            if row.query in queries or row.positive in positives:
                deferred.append(i)
                continue
            rows.append(row)
            queries.add(row.query)
            positives.add(row.positive)
            if len(rows) == self.batch_size:
                break
        keep = cursor["deferred"] + deferred  # unconsumed old deferrals first, then this batch's
        if len(keep) > self.batch_size:  # bounded state: a query repeated hundreds of times loses some rows
            self.dropped_duplicates += len(keep) - self.batch_size
            keep = keep[: self.batch_size]
        cursor["deferred"] = keep
        batch = Batch(self.batches, source.name, rows, source.instruction, source.num_negatives)
        self.batches += 1
        return batch

    def state_dict(self) -> dict[str, Any]:
        return {
            "batches": self.batches,
            "cursors": {s.name: dict(c) for s, c in zip(self.sources, self.cursors)},
            "dropped_duplicates": self.dropped_duplicates,
            "seed": self.seed,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        names = [s.name for s in self.sources]
        if sorted(state["cursors"]) != sorted(names) or state.get("seed") != self.seed:
            raise InputError(f"checkpoint was written for sources {sorted(state['cursors'])} and seed "
                             f"{state.get('seed')}, this run has {sorted(names)} and seed {self.seed}")
        self.batches = int(state["batches"])
        self.cursors = [{"epoch": int(c["epoch"]), "pos": int(c["pos"]), "deferred": [int(x) for x in c["deferred"]]}
                        for c in (state["cursors"][n] for n in names)]
        self.dropped_duplicates = int(state.get("dropped_duplicates", 0))



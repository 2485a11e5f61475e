"""Training data: pair files read and checked row by row, sources mixed by temperature, one source per batch.

Reading. A row is {"query", "positive", "negatives"?, "instruction"?, "dataset"?}; other keys
(provenance, scores) are ignored. A malformed row (invalid JSON, a missing or non-string query or
positive, `negatives` that is not a list of strings) stops the run with file, line and field: a
training set with broken rows is a bug upstream, and guessing would train on it silently. Empty rows
(blank lines, empty query or positive) and duplicate (query, positive) rows are skipped, counted and
reported (`FileReport`). Negatives that are empty, repeat, or equal the row's positive are dropped
and counted too: a positive used as its own negative trains the model against itself.

Memory. Rows are never held in memory: a JSONL file is indexed by byte offset (8 bytes a row) and
read back with a seek; Parquet files and `datasets` folders are memory-mapped Arrow tables. Files
larger than RAM therefore train with full random shuffles, which an iterable stream cannot give.

Mixing. Every row belongs to one *source*: its `dataset` field, else the recipe's dataset name,
else the file name. Each global batch is drawn from ONE source, chosen with probability
p_i ∝ (w_i · n_i)^(1/T) (T = 1: proportional to size, T → ∞: uniform). Within a batch no two rows
share a query text or a positive text: such a row is deferred to the source's next batch (in-batch
duplicates are false negatives). Every random choice is a pure function of (seed, step, source,
epoch), so the sampler state that resumes a run is just each source's cursor.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from array import array
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from embedforge.errors import InputError
from embedforge.templates import format_query

logger = logging.getLogger(__name__)

ROW_FIELDS = ("query", "positive", "negatives", "instruction", "dataset")


@dataclass(frozen=True)
class PairRow:
    """One training example; `where` is "file:line" for error messages."""

    query: str
    positive: str
    negatives: tuple[str, ...] = ()
    instruction: str | None = None
    dataset: str | None = None
    where: str = ""


def _optional_str(obj: dict, name: str, path: str, line: int) -> str | None:
    value = obj.get(name)
    if value is None:
        return None
    if not isinstance(value, str):
        raise InputError(f"expected a string or null, got {type(value).__name__}", path=path, line=line, field=name)
    return value or None


def _required_str(obj: dict, name: str, path: str, line: int) -> str:
    if name not in obj:
        raise InputError("missing field", path=path, line=line, field=name)
    value = obj[name]
    if not isinstance(value, str):
        raise InputError(f"expected a string, got {type(value).__name__}", path=path, line=line, field=name)
    return value


def parse_row(obj: Any, path: str, line: int) -> tuple[PairRow | None, int]:
    """(row, negatives dropped), or (None, 0) for an empty row; malformed rows raise InputError."""
    if not isinstance(obj, dict):
        raise InputError(f"expected a JSON object, got {type(obj).__name__}", path=path, line=line)
    query = _required_str(obj, "query", path, line)
    positive = _required_str(obj, "positive", path, line)
    raw_negatives = obj.get("negatives")
    if raw_negatives is None:
        raw_negatives = []
    elif hasattr(raw_negatives, "tolist"):  # numpy arrays from Arrow
        raw_negatives = raw_negatives.tolist()
    if not isinstance(raw_negatives, (list, tuple)):
        raise InputError(f"expected a list of strings, got {type(raw_negatives).__name__}", path=path, line=line,
                         field="negatives")
    for k, neg in enumerate(raw_negatives):
        if not isinstance(neg, str):
            raise InputError(f"element {k}: expected a string, got {type(neg).__name__}", path=path, line=line,
                             field="negatives")
    instruction = _optional_str(obj, "instruction", path, line)
    dataset = _optional_str(obj, "dataset", path, line)
    if not query.strip() or not positive.strip():
        return None, 0
    kept, seen = [], {positive}
    for neg in raw_negatives:
        if neg.strip() and neg not in seen:
            kept.append(neg)
            seen.add(neg)
    row = PairRow(query, positive, tuple(kept), instruction, dataset, f"{path}:{line}")
    return row, len(raw_negatives) - len(kept)


# --- row stores: random access without holding rows in memory ---------------------------------------


class JsonlRows:
    """A JSONL file read by byte offset; `offsets[i]` is where line `lines[i]` starts."""

    def __init__(self, path: str, offsets: np.ndarray, lines: np.ndarray):
        self.path, self.offsets, self.lines = path, offsets, lines
        self._fh = None

    def __len__(self) -> int:
        return len(self.offsets)

    def __getitem__(self, i: int) -> PairRow:
        if self._fh is None:
            self._fh = open(self.path, "rb")  # noqa: SIM115 - kept open for the run's random reads
        self._fh.seek(int(self.offsets[i]))
        row, _ = parse_row(json.loads(self._fh.readline()), self.path, int(self.lines[i]))
        assert row is not None, "indexed rows were validated non-empty"
        return row

    def close(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None

    def __getstate__(self):
        return {**self.__dict__, "_fh": None}


class ArrowRows:
    """Rows of a `datasets.Dataset` (memory-mapped Arrow); errors name the row (1-based)."""

    def __init__(self, dataset, label: str, row_numbers: np.ndarray):
        self.dataset, self.label, self.row_numbers = dataset, label, row_numbers

    def __len__(self) -> int:
        return len(self.row_numbers)

    def __getitem__(self, i: int) -> PairRow:
        number = int(self.row_numbers[i])
        row, _ = parse_row(self.dataset[number - 1], self.label, number)
        assert row is not None, "indexed rows were validated non-empty"
        return row


class ListRows(ArrowRows):
    """Rows of an in-memory list of dicts (the Python API and tests); same interface as ArrowRows."""


@dataclass
class FileReport:
    """What reading one file found; written to DIR/data_report.json and logged."""

    path: str
    rows: int = 0
    kept: int = 0
    empty: int = 0
    duplicates: int = 0
    negatives_dropped: int = 0
    sources: dict[str, int] = field(default_factory=dict)


@dataclass
class Source:
    """Rows of one mixing source: `rows[indices[i]]`, with the settings of the file it came from."""

    name: str
    rows: Any
    indices: np.ndarray
    instruction: str | None = None
    num_negatives: int = 7
    weight: float = 1.0

    def __len__(self) -> int:
        return len(self.indices)

    def row(self, i: int) -> PairRow:
        return self.rows[int(self.indices[i])]


def _pair_hash(row: PairRow) -> int:
    digest = hashlib.blake2b(row.query.encode() + b"\0" + row.positive.encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little", signed=True)


def _iter_jsonl_offsets(path: str) -> Iterator[tuple[int, int, Any]]:
    """(line number, byte offset, parsed object or None for a blank line)."""
    offset = 0
    with open(path, "rb") as fh:
        for number, raw in enumerate(fh, start=1):
            start, offset = offset, offset + len(raw)
            if not raw.strip():
                yield number, start, None
                continue
            try:
                obj = json.loads(raw)
            except UnicodeDecodeError:
                raise InputError("not valid UTF-8", path=path, line=number) from None
            except json.JSONDecodeError as exc:
                raise InputError(f"invalid JSON ({exc.msg} at column {exc.colno})", path=path, line=number) from None
            yield number, start, obj


def _open_arrow(path: str):
    """A memory-mapped `datasets.Dataset`: a Parquet file, a `save_to_disk` folder, or `hf:NAME[:SPLIT]`
    from the Hugging Face Hub (or its local cache)."""
    import datasets

    if path.startswith("hf:"):
        name, _, split = path[3:].partition(":")
        try:
            return datasets.load_dataset(name, split=split or "train")
        except (OSError, ValueError) as exc:  # offline, missing, gated: say which dataset and why, in one line
            raise InputError(f"cannot load Hub dataset {name!r} ({type(exc).__name__}: {str(exc)[:200]})",
                             path=path) from None
    if os.path.isdir(path):
        try:
            ds = datasets.load_from_disk(path)
        except (FileNotFoundError, ValueError) as exc:
            raise InputError(f"not a `datasets` folder ({exc})", path=path) from None
        if isinstance(ds, datasets.DatasetDict):
            if "train" not in ds:
                raise InputError(f"DatasetDict without a 'train' split (has {list(ds)})", path=path)
            ds = ds["train"]
        return ds
    return datasets.Dataset.from_parquet(path)


def _scan(source, label: str | None):
    """One pass: validate, count empties, drop duplicates; rows are not kept."""
    import datasets

    numbers, offsets, hashes = array("q"), array("q"), array("q")
    source_codes, code_of = array("i"), {None: 0}  # the rows' `dataset` field, as small integers
    if isinstance(source, (str, os.PathLike)) and str(source).endswith(".jsonl") and not os.path.isdir(source):
        path = str(source)
        if not os.path.exists(path):
            raise InputError("file not found", path=path)
        report = FileReport(path)
        iterator = _iter_jsonl_offsets(path)
        kind = "jsonl"
    else:
        if isinstance(source, (str, os.PathLike)):
            path = str(source)
            if not path.startswith("hf:") and not os.path.exists(path):
                raise InputError("file not found", path=path)
            if not (path.startswith("hf:") or os.path.isdir(path) or path.endswith(".parquet")):
                raise InputError("expected a .jsonl or .parquet file, a `datasets` folder or hf:NAME", path=path)
            ds = _open_arrow(path)
        elif isinstance(source, datasets.Dataset):
            ds, path = source, label or "dataset"
        else:
            ds, path = list(source), label or "rows"
        report = FileReport(path)
        if isinstance(ds, datasets.Dataset):
            missing = [c for c in ("query", "positive") if c not in ds.column_names]
            if missing:
                raise InputError(f"missing column(s) {missing}; has {ds.column_names}", path=path, field=missing[0])
            ds_iter = ds.select_columns([c for c in ROW_FIELDS if c in ds.column_names])
            kind = "arrow"
        else:
            ds_iter, kind = ds, "list"
        iterator = ((i + 1, 0, obj) for i, obj in enumerate(ds_iter))
    dropped = 0
    for number, offset, obj in iterator:
        report.rows += 1
        row = None
        if obj is not None:
            row, d = parse_row(obj, path, number)
            dropped += d
        if row is None:
            report.empty += 1
            continue
        numbers.append(number)
        offsets.append(offset)
        hashes.append(_pair_hash(row))
        source_codes.append(code_of.setdefault(row.dataset, len(code_of)))
    report.negatives_dropped = dropped
    hash_arr = np.frombuffer(hashes, dtype=np.int64) if len(hashes) else np.zeros(0, dtype=np.int64)
    _, first = np.unique(hash_arr, return_index=True)
    keep = np.zeros(len(hash_arr), dtype=bool)
    keep[first] = True
    report.duplicates = int(len(hash_arr) - keep.sum())
    report.kept = int(keep.sum())
    num_arr = np.frombuffer(numbers, dtype=np.int64) if len(numbers) else np.zeros(0, dtype=np.int64)
    if kind == "jsonl":
        off_arr = np.frombuffer(offsets, dtype=np.int64) if len(offsets) else np.zeros(0, dtype=np.int64)
        store = JsonlRows(path, off_arr[keep].copy(), num_arr[keep].copy())
    else:
        store = (ArrowRows if kind == "arrow" else ListRows)(ds, path, num_arr[keep].copy())
    codes = np.frombuffer(source_codes, dtype=np.int32) if len(source_codes) else np.zeros(0, dtype=np.int32)
    return store, codes[keep], {code: name for name, code in code_of.items()}, report


def load_sources(settings: Sequence[Any], inline: dict[str, Any] | None = None) -> tuple[list[Source], list[FileReport]]:
    """Read every dataset of a recipe into mixing sources (split by the rows' `dataset` field).

    Args:
        settings: `DatasetSettings` items (path, name, instruction, num_negatives, weight).
        inline: optional path -> `datasets.Dataset` or list of dicts, for the Python API and tests.
    """
    sources: list[tuple[str, Source]] = []
    reports: list[FileReport] = []
    for spec in settings:
        given = (inline or {}).get(spec.path, spec.path)
        store, codes, names, report = _scan(given, spec.path)
        default = spec.name or Path(spec.path).name.split(".")[0]
        for code in np.unique(codes):
            name = names[int(code)] or default
            indices = np.flatnonzero(codes == code)
            if name in report.sources:  # rows naming the default source explicitly join it
                merged = next(s for p, s in sources if p == spec.path and s.name == name)
                merged.indices = np.sort(np.concatenate([merged.indices, indices]))
            else:
                sources.append((spec.path, Source(name, store, indices, spec.instruction, spec.num_negatives,
                                                  spec.weight)))
            report.sources[name] = report.sources.get(name, 0) + len(indices)
        reports.append(report)
        logger.info("%s: %d rows, %d kept, %d empty, %d duplicate, %d negatives dropped; sources %s",
                    report.path, report.rows, report.kept, report.empty, report.duplicates,
                    report.negatives_dropped, report.sources)
    if not sources:
        raise InputError("no usable rows in " + ", ".join(r.path for r in reports))
    names = [s.name for _, s in sources]
    for path, source in sources:
        if names.count(source.name) > 1:  # one source name in two files: keep them apart, say which is which
            source.name = f"{source.name}@{Path(path).name}"
    return [s for _, s in sources], reports


# --- mixing sampler -----------------------------------------------------------------------------


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


# --- collation ----------------------------------------------------------------------------------


@dataclass
class ContrastiveTexts:
    """Texts of one batch for the embedding loss: queries formatted with their instruction,
    `negatives[i]` holds at most `k` texts (rows with fewer are padded and masked later)."""

    queries: list[str]
    raw_queries: list[str]
    positives: list[str]
    negatives: list[list[str]]
    k: int

    def slice(self, start: int, stop: int) -> ContrastiveTexts:
        return ContrastiveTexts(self.queries[start:stop], self.raw_queries[start:stop], self.positives[start:stop],
                                self.negatives[start:stop], self.k)


def choose_negatives(batch: Batch, seed: int) -> list[list[str]]:
    """Up to `num_negatives` of each row's negatives; more are subsampled (seeded by step and row),
    so one process and several processes pick the same ones."""
    rng = np.random.default_rng([seed, batch.index, 31])
    out = []
    for row in batch.rows:
        negs = list(row.negatives)
        if len(negs) > batch.num_negatives:
            picked = sorted(rng.choice(len(negs), size=batch.num_negatives, replace=False).tolist())
            negs = [negs[j] for j in picked]
        out.append(negs)
    return out


def contrastive_texts(batch: Batch, seed: int) -> ContrastiveTexts:
    negatives = choose_negatives(batch, seed)
    queries = [format_query(r.query, r.instruction if r.instruction is not None else batch.instruction)
               for r in batch.rows]
    k = max((len(n) for n in negatives), default=0)
    return ContrastiveTexts(queries, [r.query for r in batch.rows], [r.positive for r in batch.rows], negatives, k)


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

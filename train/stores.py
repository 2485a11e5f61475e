"""Row stores: random access to training rows without holding them in memory, and the one pass
over a file that validates its rows and builds the store.

A JSONL file is indexed by byte offset (8 bytes a row) and read back with a seek; Parquet files and
`datasets` folders are memory-mapped Arrow tables. Files larger than RAM therefore train with full
random shuffles, which an iterable stream cannot give. Empty rows and duplicate (query, positive)
rows are left out of the index, counted in the file's `FileReport`.
"""

from __future__ import annotations

import hashlib
import json
import os
from array import array
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from embedforge.errors import InputError
from embedforge.io import decode_line, iter_raw_lines
from embedforge.train.rows import ROW_FIELDS, PairRow, parse_row


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
        line = int(self.lines[i])
        row, _ = parse_row(json.loads(decode_line(self._fh.readline(), self.path, line)), self.path, line)
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
class ScannedFile:
    """A validated file: its row store, each kept row's source code (`codes[i]` for `store[i]`,
    0 for rows without a `dataset` field), the source name of each code, and the report."""

    store: Any
    codes: np.ndarray
    names: dict[int, str | None]
    report: FileReport


def _pair_hash(row: PairRow) -> int:
    digest = hashlib.blake2b(row.query.encode() + b"\0" + row.positive.encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little", signed=True)


def _iter_jsonl_offsets(path: str) -> Iterator[tuple[int, int, Any]]:
    """(line number, byte offset, parsed object or None for a blank line); bad bytes and bad JSON
    are errors naming the line (and the byte)."""
    offset = 0
    for number, raw in iter_raw_lines(path):
        start, offset = offset, offset + len(raw)
        text = decode_line(raw, path, number)
        if not raw.strip():
            yield number, start, None
            continue
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as exc:
            raise InputError(f"invalid JSON ({exc.msg} at column {exc.colno})", path=path, line=number) from None
        except RecursionError:
            raise InputError("invalid JSON (nested too deeply)", path=path, line=number) from None
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


def _rows_of(source, label: str | None) -> tuple[str, str, Any, Iterator[tuple[int, int, Any]]]:
    """(path, kind, dataset or None, iterator of (number, byte offset, object)) for any accepted input."""
    import datasets

    if isinstance(source, (str, os.PathLike)) and str(source).endswith(".jsonl") and not os.path.isdir(source):
        path = str(source)
        if not os.path.exists(path):
            raise InputError("file not found", path=path)
        return path, "jsonl", None, _iter_jsonl_offsets(path)
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
    if isinstance(ds, datasets.Dataset):
        missing = [c for c in ("query", "positive") if c not in ds.column_names]
        if missing:
            raise InputError(f"missing column(s) {missing}; has {ds.column_names}", path=path, field=missing[0])
        columns = ds.select_columns([c for c in ROW_FIELDS if c in ds.column_names])
        return path, "arrow", ds, ((i + 1, 0, obj) for i, obj in enumerate(columns))
    return path, "list", ds, ((i + 1, 0, obj) for i, obj in enumerate(ds))


def _as_array(values: array, dtype) -> np.ndarray:
    return np.frombuffer(values, dtype=dtype) if len(values) else np.zeros(0, dtype=dtype)


def scan(source, label: str | None = None) -> ScannedFile:
    """One pass over a file, `datasets.Dataset` or list of dicts: validate every row, count empty
    rows, drop duplicate (query, positive) pairs; rows are not kept, only their places."""
    path, kind, ds, iterator = _rows_of(source, label)
    report = FileReport(path)
    numbers, offsets, hashes = array("q"), array("q"), array("q")
    source_codes, code_of = array("i"), {None: 0}  # the rows' `dataset` field, as small integers
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
    hash_arr = _as_array(hashes, np.int64)
    _, first = np.unique(hash_arr, return_index=True)
    keep = np.zeros(len(hash_arr), dtype=bool)
    keep[first] = True
    report.duplicates = int(len(hash_arr) - keep.sum())
    report.kept = int(keep.sum())
    num_arr = _as_array(numbers, np.int64)
    if kind == "jsonl":
        store = JsonlRows(path, _as_array(offsets, np.int64)[keep].copy(), num_arr[keep].copy())
    else:
        store = (ArrowRows if kind == "arrow" else ListRows)(ds, path, num_arr[keep].copy())
    codes = _as_array(source_codes, np.int32)[keep]
    return ScannedFile(store, codes, {code: name for name, code in code_of.items()}, report)

"""One training row, checked field by field.

A row is {"query", "positive", "negatives"?, "instruction"?, "dataset"?}; other keys (provenance,
scores) are ignored. A malformed row (a missing or non-string query or positive, `negatives` that is
not a list of strings) is an error naming file, line and field: a training set with broken rows is a
bug upstream, and guessing would train on it silently. A row with an empty query or positive is
empty (skipped and counted by the caller). Negatives that are empty, repeat, or equal the row's
positive are dropped and counted: a positive used as its own negative trains the model against itself.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from embedforge.errors import InputError

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



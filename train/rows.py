"""One training row, checked field by field.

A row is {"query", "positive", "negatives"?, "teacher_scores"?, "instruction"?, "dataset"?}; other
keys (provenance) are ignored. A malformed row (a missing or non-string query or positive, `negatives`
that is not a list of strings, `teacher_scores` that is not 1 + len(negatives) numbers) is an error
naming file, line and field: a training set with broken rows is a bug upstream, and guessing would
train on it silently. A row with an empty query or positive is empty (skipped and counted by the
caller). Negatives that are empty, repeat, or equal the row's positive are dropped and counted: a
positive used as its own negative trains the model against itself; their teacher scores go with them.

`teacher_scores` = [t(q, positive), t(q, negative_1), ...], a reranker's scores as data_synth.mine
writes them, read by the distillation loss (train/distill.py); null or NaN marks a score the
teacher did not give. A row without the field has no teacher scores (None).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from embedforge.errors import InputError

ROW_FIELDS = ("query", "positive", "negatives", "teacher_scores", "instruction", "dataset")


@dataclass(frozen=True)
class PairRow:
    """One training example; `where` is "file:line" for error messages."""

    query: str
    positive: str
    negatives: tuple[str, ...] = ()
    instruction: str | None = None
    dataset: str | None = None
    where: str = ""
    teacher_scores: tuple[float, ...] | None = None  # positive first, then one per negative; NaN = missing


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


def _as_float(value: Any) -> float | None:
    """A JSON number as a float; None for anything else (bools, strings, numbers beyond float)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    try:
        return float(value)
    except OverflowError:
        return None


def _teacher_scores(obj: dict, negatives: int, path: str, line: int) -> list[float] | None:
    """The row's teacher scores as floats (null -> NaN), or None when the row has none."""
    raw = obj.get("teacher_scores")
    if raw is None:
        return None
    if hasattr(raw, "tolist"):  # numpy arrays from Arrow
        raw = raw.tolist()
    if not isinstance(raw, (list, tuple)):
        raise InputError(f"expected a list of numbers, got {type(raw).__name__}", path=path, line=line,
                         field="teacher_scores")
    if len(raw) != 1 + negatives:
        raise InputError(f"expected {1 + negatives} scores (the positive's, then one per negative), got {len(raw)}",
                         path=path, line=line, field="teacher_scores")
    scores = []
    for k, value in enumerate(raw):
        number = math.nan if value is None else _as_float(value)
        if number is None or math.isinf(number):
            raise InputError(f"element {k}: expected a finite number, null or NaN, got {value!r}"[:200], path=path,
                             line=line, field="teacher_scores")
        scores.append(number)
    return scores


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
    teacher = _teacher_scores(obj, len(raw_negatives), path, line)
    instruction = _optional_str(obj, "instruction", path, line)
    dataset = _optional_str(obj, "dataset", path, line)
    if not query.strip() or not positive.strip():
        return None, 0
    kept, kept_scores, seen = [], [] if teacher is None else [teacher[0]], {positive}
    for k, neg in enumerate(raw_negatives):
        if neg.strip() and neg not in seen:
            kept.append(neg)
            seen.add(neg)
            if teacher is not None:
                kept_scores.append(teacher[1 + k])
    row = PairRow(query, positive, tuple(kept), instruction, dataset, f"{path}:{line}",
                  None if teacher is None else tuple(kept_scores))
    return row, len(raw_negatives) - len(kept)



"""The data trail: every stage appends one record to the provenance it read from its inputs.

`provenance.json` sits in a stage's output folder (or beside its output file) and holds the
ordered list of records of every stage that led to it: the corpus fingerprint, the generator and
prompt versions, gate counts, mining settings, the training config and final metrics, the merge
recipe, evaluation results with their intervals. The model card is rendered from it, so a
published model says what it was made of without anyone retyping it.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from embedforge.errors import InputError
from embedforge.io import read_json_file, write_json

FILE = "provenance.json"


def provenance_path(output: str | os.PathLike) -> Path:
    """Where a stage output's provenance lives: inside a folder, or `FILE.provenance.json` beside a
    file (several results files may share a folder)."""
    path = Path(output)
    return path / FILE if path.is_dir() or not path.suffix else path.with_name(f"{path.name}.{FILE}")


def _existing_trail(source: Path) -> Path | None:
    """A file's own trail, else the trail of the folder it was written into (a stage's output folder)."""
    for candidate in (provenance_path(source), source.parent / FILE):
        if candidate.is_file():
            return candidate
    return None


def read_provenance(*inputs: str | os.PathLike | None) -> list[dict[str, Any]]:
    """The records that led to these inputs, in stage order, each stage once (first seen wins)."""
    records: list[dict[str, Any]] = []
    seen: set[str] = set()
    for source in inputs:
        if source is None:
            continue
        path = _existing_trail(Path(source))
        if path is None:
            continue
        trail = read_json_file(path)
        if not isinstance(trail, list):
            raise InputError("expected a list of stage records", path=str(path))
        for record in trail:
            key = json.dumps(record, sort_keys=True, default=str)
            if key not in seen:
                seen.add(key)
                records.append(record)
    return records


def write_provenance(output: str | os.PathLike, previous: list[dict[str, Any]], stage: str,
                     **record: Any) -> list[dict[str, Any]]:
    """Append this stage's record to `previous` and write the trail beside `output`."""
    trail = [*previous, {"stage": stage, **record}]
    write_json(provenance_path(output), trail)
    return trail


def find_stage(trail: list[dict[str, Any]], stage: str) -> dict[str, Any] | None:
    """The last record of `stage` in a trail, or None."""
    return next((r for r in reversed(trail) if r.get("stage") == stage), None)

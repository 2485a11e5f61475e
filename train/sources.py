"""A recipe's datasets as mixing sources.

Every row belongs to one *source*: its `dataset` field, else the recipe's dataset name, else the
file name. The sampler draws each batch from one source (train/sampler.py).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from embedforge.errors import InputError
from embedforge.train.rows import PairRow
from embedforge.train.stores import FileReport, scan

logger = logging.getLogger(__name__)


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


def load_sources(settings: Sequence[Any], inline: dict[str, Any] | None = None) -> tuple[list[Source], list[FileReport]]:
    """Read every dataset of a recipe into mixing sources (split by the rows' `dataset` field).

    Args:
        settings: `DatasetSettings` items (path, name, instruction, num_negatives, weight).
        inline: optional path -> `datasets.Dataset` or list of dicts, for the Python API and tests.
    """
    sources: list[tuple[str, Source]] = []
    reports: list[FileReport] = []
    for spec in settings:
        scanned = scan((inline or {}).get(spec.path, spec.path), spec.path)
        report = scanned.report
        default = spec.name or Path(spec.path).name.split(".")[0]
        for code in np.unique(scanned.codes):
            name = scanned.names[int(code)] or default
            indices = np.flatnonzero(scanned.codes == code)
            if name in report.sources:  # rows naming the default source explicitly join it
                merged = next(s for p, s in sources if p == spec.path and s.name == name)
                merged.indices = np.sort(np.concatenate([merged.indices, indices]))
            else:
                sources.append((spec.path, Source(name, scanned.store, indices, spec.instruction, spec.num_negatives,
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

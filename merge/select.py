"""Pick t by merging at each point of a grid and scoring the result on a dev set.

The caller supplies `evaluate(model_dir) -> float` (the eval stage or the pipeline builds it, e.g.
nDCG@10 of an Embedder loaded from the folder), so this module knows nothing about metrics. Only
the best merge so far and the current candidate are on disk at any time; the winner is moved to
`config.output`, which must not exist unless `config.overwrite`.
"""

from __future__ import annotations

import math
import os
import shutil
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from embedforge.errors import ConfigError, InputError
from embedforge.io import atomic_dir, publishable, write_json
from embedforge.merge.config import MergeConfig
from embedforge.merge.stage import REPORT_NAME, MergeOutcome, merge


@dataclass
class TSelection:
    best_t: float
    best_score: float
    scores: list[tuple[float, float]]
    """(t, score) for every grid point, in grid order."""
    report: MergeOutcome
    """The merge report of the chosen model."""


def select_t(
    config: MergeConfig,
    grid: Sequence[float],
    evaluate: Callable[[Path], float],
    *,
    higher_is_better: bool = True,
) -> TSelection:
    """Merge `config.models` at each t in `grid`, score each with `evaluate`, keep the best.

    `config.t` is replaced by each grid value (attention/MLP schedules in the config still apply);
    ties go to the earlier grid point.
    """
    if len(config.models) != 2 or config.weights is not None:
        raise ConfigError("choosing t needs exactly two models and no weights")
    if not grid:
        raise ConfigError("the t grid is empty")
    if config.output is None:
        raise ConfigError("an output folder is required")
    output = Path(config.output)
    if output.exists() and not config.overwrite:
        raise InputError("output folder exists; pass --overwrite to replace it", path=str(output))
    output.parent.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=f".{output.name}.select-", dir=output.parent))
    best: tuple[float, float, Path, MergeOutcome] | None = None
    scores: list[tuple[float, float]] = []
    try:
        for t in grid:
            candidate = scratch / f"t={t:g}"
            report = merge(
                config.model_copy(
                    update={"t": float(t), "output": str(candidate), "overwrite": False, "report": None,
                            "dry_run": False}
                )
            )
            score = float(evaluate(candidate))
            if math.isnan(score):
                raise ValueError(f"evaluate returned NaN for t={t}")
            scores.append((float(t), score))
            better = best is None or (score > best[1] if higher_is_better else score < best[1])
            if better:
                if best is not None:
                    shutil.rmtree(best[2])
                best = (float(t), score, candidate, report)
            else:
                shutil.rmtree(candidate)
        assert best is not None
        report = best[3].model_copy(update={"output": str(output)})
        with atomic_dir(output, overwrite=config.overwrite) as tmp:
            for entry in best[2].iterdir():
                os.replace(entry, tmp / entry.name)
            write_json(tmp / REPORT_NAME, {**report.to_dict(), "t_selection": scores})
            publishable(tmp)
        if config.report is not None:
            write_json(config.report, {**report.to_dict(), "t_selection": scores})
            os.chmod(config.report, 0o644)
        return TSelection(best_t=best[0], best_score=best[1], scores=scores, report=report)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)

"""What every stage function returns: where it wrote, what it counted, and what a user must know.

A stage that ran but produced nothing useful (no kept rows, no negatives, a collapsed model) is not
an error by itself, yet must never pass silently: it adds a line to `warnings`. The pipeline prints
them in its summary, records them in the manifest, and stops on them under `--strict`.
"""

from __future__ import annotations

import logging
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

logger = logging.getLogger("embedforge")


class StageOutcome(BaseModel):
    """Base of the typed result of each stage function (`synthesize`, `train`, `evaluate`, ...)."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    output: str = Field(description="the stage's main output: a folder or a file")
    warnings: list[str] = Field(default_factory=list)

    def warn(self, message: str) -> None:
        """Record and log a result a user must not miss (the run still completes)."""
        logger.warning(message)
        self.warnings.append(message)

    def metrics(self) -> dict[str, Any]:
        """Flat numbers and strings of this result, for manifests and summaries."""
        return {k: v for k, v in self.model_dump(mode="json").items()
                if isinstance(v, (int, float, str)) and k != "output"}

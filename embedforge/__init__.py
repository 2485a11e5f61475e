"""embedforge: build Qwen3-style text embedders and rerankers, from a raw corpus to a published model.

The core models and one typed function per stage, each taking one config:

    from embedforge import Embedder, Reranker
    from embedforge import synthesize, filter_pairs, mine, train, merge, export, evaluate, report, run

Names are imported on first use, so `import embedforge` and `embedforge --help` stay light.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "Embedder": "embedforge.embedder",
    "Reranker": "embedforge.reranker",
    "StageOutcome": "embedforge.outcome",
    "synthesize": "embedforge.data_synth",
    "SynthConfig": "embedforge.data_synth",
    "filter_pairs": "embedforge.data_synth",
    "FilterConfig": "embedforge.data_synth",
    "mine": "embedforge.data_synth",
    "MineConfig": "embedforge.data_synth",
    "train": "embedforge.train",
    "TrainConfig": "embedforge.train",
    "merge": "embedforge.merge",
    "MergeConfig": "embedforge.merge",
    "export": "embedforge.export",
    "ExportConfig": "embedforge.export",
    "evaluate": "embedforge.eval",
    "EvalConfig": "embedforge.eval",
    "report": "embedforge.eval.report",
    "ReportConfig": "embedforge.eval",
    "run": "embedforge.pipeline",
    "Recipe": "embedforge.recipe",
}
__all__ = [  # noqa: RUF022 - grouped as in _EXPORTS
    "__version__", "Embedder", "Reranker", "StageOutcome", "synthesize", "SynthConfig", "filter_pairs",
    "FilterConfig", "mine", "MineConfig", "train", "TrainConfig", "merge", "MergeConfig", "export", "ExportConfig",
    "evaluate", "EvalConfig", "report", "ReportConfig", "run", "Recipe",
]


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'embedforge' has no attribute {name!r}")
    module = importlib.import_module(_EXPORTS[name])
    if name in ("train", "merge", "export"):
        return module  # the stage's package, callable as its function (embedforge/stage_module.py)
    return getattr(module, "run_recipe" if name == "run" else name)

"""Evaluation: BEIR retrieval with trec_eval-exact metrics, reranking, intervals and paired tests,
MTEB-style tasks, the mteb 2 wrapper, reports.

    from embedforge.eval import EvalConfig, ReportConfig, evaluate
    from embedforge.eval.report import report  # `embedforge.eval.report` is also the module's name
    base = evaluate(EvalConfig(model="base", data="heldout", output="r/base.json", label="base"))
    merged = evaluate(EvalConfig(model="merged", data="heldout", output="r/merged.json", label="merged",
                                 baselines=[base.output]))
    print(report(ReportConfig(results=[base.output, merged.output])).markdown)

Names are imported on first use, so `embedforge --help` stays fast.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "EvalConfig": "embedforge.eval.config",
    "ReportConfig": "embedforge.eval.config",
    "EvalOutcome": "embedforge.eval.stage",
    "evaluate": "embedforge.eval.stage",
    "ReportOutcome": "embedforge.eval.report",
    "MtebEncoder": "embedforge.eval.mteb_adapter",
}

__all__ = ["EvalConfig", "EvalOutcome", "MtebEncoder", "ReportConfig", "ReportOutcome", "evaluate"]


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'embedforge.eval' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)

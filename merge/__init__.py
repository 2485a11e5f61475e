"""Merging checkpoints: slerp, lerp and weighted averages, of weights or of deltas from a base,
with per-layer schedules, LoRA runs folded into their base, streamed tensor by tensor.

`merge(MergeConfig(...)) -> MergeOutcome` is the stage; the math lives in `methods`.
"""

from __future__ import annotations

import importlib

from embedforge.stage_module import make_callable

# name -> module; loaded on first use so that `embedforge --help` (which imports merge.cli) stays torch-free.
_EXPORTS = {
    "MergeConfig": "config",
    "parse_size": "config",
    "MergeOutcome": "stage",
    "merge": "stage",
    "Schedule": "schedule",
    "TSchedule": "schedule",
    "select_t": "select",
    "TSelection": "select",
    **dict.fromkeys(
        ("DOT_THRESHOLD", "combine", "gram_matrix", "lerp", "linear", "slerp", "slerp_coefficients",
         "slerp_deltas", "slerp_multi", "spherical_coefficients", "task_vectors"),
        "methods",
    ),
}
__all__ = [
    "DOT_THRESHOLD",
    "MergeConfig",
    "MergeOutcome",
    "Schedule",
    "TSchedule",
    "TSelection",
    "combine",
    "gram_matrix",
    "lerp",
    "linear",
    "merge",
    "parse_size",
    "select_t",
    "slerp",
    "slerp_coefficients",
    "slerp_deltas",
    "slerp_multi",
    "spherical_coefficients",
    "task_vectors",
]


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"embedforge.merge.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module 'embedforge.merge' has no attribute {name!r}")


make_callable(__name__, "merge", "stage")

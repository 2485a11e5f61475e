"""Stage subpackages that share their stage function's name (`embedforge.train`, `.merge`, `.export`).

`import embedforge.train` binds the package module to `embedforge.train`, which would shadow the
`train` function that `from embedforge import train` hands out: which one a user got would depend on
what was imported before. Making those package modules callable (delegating to their function) gives
the same behaviour either way: `embedforge.train(config)` trains, `embedforge.train.TrainConfig` is the
config, and `help(embedforge.train)` shows the stage.
"""

from __future__ import annotations

import importlib
import sys
import types
from typing import Any


def make_callable(package: str, function: str, module: str) -> None:
    """Let the package module `package` be called as its stage function `module.function`."""

    class StageModule(types.ModuleType):
        def __call__(self, *args: Any, **kwargs: Any) -> Any:
            return getattr(importlib.import_module(f"{package}.{module}"), function)(*args, **kwargs)

    sys.modules[package].__class__ = StageModule

"""The top-level API: every name `embedforge` advertises resolves, and the stages that share their
subpackage's name are the same callable whatever was imported first."""

from __future__ import annotations

import importlib
import subprocess
import sys

import embedforge


def test_every_advertised_name_resolves():
    for name in embedforge.__all__:
        assert getattr(embedforge, name) is not None, name


def test_stage_packages_call_their_stage_function(monkeypatch):
    for package, module, function in (("train", "trainer", "train"), ("merge", "stage", "merge"),
                                      ("export", "stage", "export")):
        seen = []
        target = importlib.import_module(f"embedforge.{package}.{module}")
        monkeypatch.setattr(target, function, lambda *a, seen=seen, **k: seen.append((a, k)) or "done")
        stage = getattr(embedforge, package)
        assert stage("config", flag=1) == "done" and seen == [(("config",), {"flag": 1})]
        assert stage is importlib.import_module(f"embedforge.{package}")


def test_the_same_object_whichever_import_comes_first():
    code = ("import embedforge.train.config; from embedforge import train; import embedforge; "
            "assert train is embedforge.train and callable(train); "
            "from embedforge.train import train as f; assert f.__module__ == 'embedforge.train.trainer'")
    subprocess.run([sys.executable, "-c", code], check=True)

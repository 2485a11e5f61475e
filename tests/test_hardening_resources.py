"""`export` and `merge` when a resource fails: the disk fills up while the output folder is written,
the source weights are truncated, the Hub cannot be reached while pushing. Each is one line naming the
resource with exit status 2, never a traceback; nothing is left at the output path, and a temporary
is only ever a `.NAME.PID.*.tmp` that does not load as a model. A failed push keeps the finished local
folder, and the token is never printed.

The full disk is simulated where the writer meets the disk: the function that writes the bytes writes
part of them (what the device took before it filled up), then raises the OSError a real write raises
(errno ENOSPC, no file name: write(2) errors carry none)."""

from __future__ import annotations

import errno
import logging
import re
import shutil
import socket
from pathlib import Path

import httpx2  # huggingface_hub >= 1 sends its requests with httpx2, so a network failure is one of its errors
import pytest
import torch

from embedforge.cli import main
from embedforge.embedder import Embedder

SECRET = "hf_resourcesTestTokenNeverPrinted0123"
TEXTS = ["a short query about valves", "the valve regulates the flow of oil through the press"]


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)


PROGRESS = re.compile(r"^[^|]*\d+%\|.*\]$")  # a tqdm bar (loading or writing weights), not a message


def one_line(err: str) -> str:
    lines = [line for line in re.split(r"[\r\n]", err) if line.strip() and not PROGRESS.match(line.strip())]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def no_space(*args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")


def assert_nothing_that_loads(parent: Path, name: str, before: set[str]) -> None:
    """Nothing at parent/name; anything new in `parent` is a temporary of ours that is no model."""
    assert not (parent / name).exists()
    temporary = re.compile(rf"^\.{re.escape(name)}\.\d+\..*\.tmp$")
    for path in parent.iterdir():
        if path.name in before:
            continue
        assert temporary.match(path.name), f"unexpected output left behind: {path}"
        with pytest.raises(Exception):  # noqa: B017 - any failure to load is right; loading is the defect
            Embedder.from_pretrained(str(path))


def fill_disk_in_write_text(monkeypatch, is_target) -> list[Path]:
    """Path.write_text writes half of its text, then the disk is full, for paths `is_target` picks."""
    write_text = Path.write_text
    hit: list[Path] = []

    def full(self, data, *args, **kwargs):
        if not is_target(self):
            return write_text(self, data, *args, **kwargs)
        hit.append(self)
        write_text(self, data[: len(data) // 2], *args, **kwargs)
        no_space()

    monkeypatch.setattr(Path, "write_text", full)
    return hit


# --- a full disk while export writes its folder -------------------------------------------------------


def fill_disk_in_export(where: str, monkeypatch) -> list[Path]:
    """Make the disk fill up at one point of the export's write; returns the paths that were hit."""
    if where == "weights":  # transformers' save_pretrained -> safetensors, the bulk of the bytes
        from transformers import modeling_utils

        save = modeling_utils.safe_save_file
        hit: list[Path] = []

        def full(tensors, filename, *args, **kwargs):
            save(tensors, filename, *args, **kwargs)
            data = Path(filename).read_bytes()
            Path(filename).write_bytes(data[: len(data) // 2])  # the device took half of it
            hit.append(Path(filename))
            no_space()

        monkeypatch.setattr(modeling_utils, "safe_save_file", full)
        return hit
    # the card, the last file before the folder is renamed into place: everything else is complete
    return fill_disk_in_write_text(monkeypatch, lambda p: p.name == "README.md")


@pytest.mark.parametrize("where", ["weights", "card"])
def test_a_full_disk_while_exporting_is_one_line_and_leaves_no_folder(where, tiny_qwen3_embedder, tmp_path,
                                                                       monkeypatch, capsys):
    hit = fill_disk_in_export(where, monkeypatch)
    out = tmp_path / "exported"
    code = main(["export", "--model", str(tiny_qwen3_embedder), "--kind", "embedder", "--output", str(out)])
    err = capsys.readouterr().err
    assert hit, f"the export never reached the {where} write: the fault was not injected"
    assert code == 2
    assert one_line(err) == (
        f"embedforge export: error: {out}: no space left on the device while writing; free space and rerun to resume")
    assert_nothing_that_loads(tmp_path, "exported", before=set())


# --- a full disk while merge writes its output ----------------------------------------------------------


@pytest.fixture
def two_models(tiny_qwen3_embedder, tmp_path):
    a = tmp_path / "a"
    shutil.copytree(tiny_qwen3_embedder, a)
    return tiny_qwen3_embedder, a


def fill_disk_in_merge(where: str, monkeypatch) -> list[Path]:
    if where == "weights":  # ShardedWriter streams tensors into a file it opened itself
        from embedforge.merge import stream

        hit: list[Path] = []

        class FillingFile:
            """A real file on a device with room for 4 KiB more."""

            def __init__(self, path, mode):
                self.fh, self.room = open(path, mode), 4096  # noqa: SIM115 - closed by close()
                hit.append(Path(path))

            def write(self, data):
                data = bytes(data)
                self.fh.write(data[: self.room])
                if len(data) > self.room:
                    self.room = 0
                    no_space()
                self.room -= len(data)
                return len(data)

            def close(self):
                self.fh.close()

        monkeypatch.setattr(stream, "open", FillingFile, raising=False)
        return hit
    # the report, after the weights, config and tokenizer are complete in the temporary folder
    return fill_disk_in_write_text(monkeypatch, lambda p: p.name.startswith(".merge_report.json."))


@pytest.mark.parametrize("where", ["weights", "report"])
def test_a_full_disk_while_merging_is_one_line_and_leaves_no_folder(where, two_models, tmp_path, monkeypatch,
                                                                     capsys):
    a, b = two_models
    before = {p.name for p in tmp_path.iterdir()}
    hit = fill_disk_in_merge(where, monkeypatch)
    out = tmp_path / "merged"
    code = main(["merge", "--models", str(a), str(b), "--weights", "1", "1", "--method", "linear", "--output",
                 str(out), "--no-show-progress"])
    err = capsys.readouterr().err
    assert hit, f"the merge never reached the {where} write: the fault was not injected"
    assert code == 2
    line = one_line(err)
    assert_nothing_that_loads(tmp_path, "merged", before)
    assert line.startswith("embedforge merge: error: ") and line.endswith(
        ": no space left on the device while writing; free space and rerun to resume"), line
    if where == "weights":  # the report case names the temporary: see the strict xfail below
        assert line == f"embedforge merge: error: {out}: no space left on the device while writing; free space " \
                       "and rerun to resume"


def test_a_full_disk_in_a_file_written_inside_an_output_folder_names_the_folder(tmp_path, monkeypatch):
    from embedforge.errors import InputError
    from embedforge.io import atomic_dir, write_json

    fill_disk_in_write_text(monkeypatch, lambda p: p.name.startswith(".report.json."))
    out = tmp_path / "folder"
    with pytest.raises(InputError) as err, atomic_dir(out) as tmp:
        write_json(tmp / "report.json", {"rows": 1})  # what export and merge do for their reports
    assert list(tmp_path.iterdir()) == []
    assert str(err.value) == f"{out}: no space left on the device while writing; free space and rerun to resume"


# --- corrupt weights given to export --------------------------------------------------------------------


@pytest.mark.parametrize("cut", ["header", "data"])
def test_truncated_safetensors_given_to_export_is_one_line_and_writes_nothing(cut, tiny_qwen3_embedder, tmp_path,
                                                                              capsys):
    model = tmp_path / "model"
    shutil.copytree(tiny_qwen3_embedder, model, ignore=shutil.ignore_patterns("model.safetensors"))
    data = (Path(tiny_qwen3_embedder) / "model.safetensors").read_bytes()
    # a kill cut the file inside its JSON header, or after the header inside the tensor bytes
    (model / "model.safetensors").write_bytes(data[:100] if cut == "header" else data[: len(data) // 2])
    before = {p.name for p in tmp_path.iterdir()}
    out = tmp_path / "exported"
    code = main(["export", "--model", str(model), "--kind", "embedder", "--output", str(out)])
    line = one_line(capsys.readouterr().err)
    assert code == 2
    # the model folder, or the weights file in it (see the strict xfail below), then what was wrong
    assert re.match(rf"embedforge export: error: {re.escape(str(model))}(/model\.safetensors)?: cannot load model \(",
                    line) and len(line) < 300, line
    assert {p.name for p in tmp_path.iterdir()} == before  # not even a temporary


def test_truncated_safetensors_given_to_export_names_the_file(tiny_qwen3_embedder, tmp_path, capsys):
    model = tmp_path / "model"
    shutil.copytree(tiny_qwen3_embedder, model, ignore=shutil.ignore_patterns("model.safetensors"))
    (model / "model.safetensors").write_bytes((Path(tiny_qwen3_embedder) / "model.safetensors").read_bytes()[:100])
    assert main(["export", "--model", str(model), "--kind", "embedder", "--output", str(tmp_path / "o")]) == 2
    assert f"{model / 'model.safetensors'}:" in one_line(capsys.readouterr().err)


# --- a Hub push that fails over the network -------------------------------------------------------------


def unreachable_hub(monkeypatch) -> None:
    """The real HfApi, pointed at a local port where nothing listens: connect(2) is refused at once."""
    from huggingface_hub import constants

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))  # bound, never listening: the port stays ours and refuses connections
    monkeypatch.setattr(constants, "ENDPOINT", f"http://127.0.0.1:{sock.getsockname()[1]}")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    return sock


def upload_cut(exception):
    """create_repo succeeds; the upload fails with `exception` (the class huggingface_hub raises)."""

    def install(monkeypatch):
        from huggingface_hub import HfApi

        monkeypatch.setattr(HfApi, "create_repo", lambda self, repo_id, **kwargs: None)

        def upload_folder(self, **kwargs):
            raise exception

        monkeypatch.setattr(HfApi, "upload_folder", upload_folder)

    return install


def _network_failures():
    return {
        "unreachable": (unreachable_hub, "ConnectError: [Errno 111] Connection refused"),
        "connection-reset": (upload_cut(httpx2.ConnectError("[Errno 104] Connection reset by peer")),
                             "ConnectError: [Errno 104] Connection reset by peer"),
    }


@pytest.mark.parametrize("failure", ["unreachable", "connection-reset"])
def test_a_push_that_fails_over_the_network_is_one_line_and_keeps_the_folder(failure, tiny_qwen3_embedder,
                                                                             tmp_path, monkeypatch, capsys, caplog):
    install, message = _network_failures()[failure]
    monkeypatch.setenv("HF_TOKEN", SECRET)
    sock = install(monkeypatch)
    caplog.set_level(logging.DEBUG)  # whatever huggingface_hub and httpx log must not hold the token either
    out = tmp_path / "exported"
    try:
        code = main(["export", "--model", str(tiny_qwen3_embedder), "--kind", "embedder", "--output", str(out),
                     "--push-to-hub", "org/name"])
    finally:
        if sock is not None:
            sock.close()
    printed = capsys.readouterr()
    assert code == 2
    line = one_line(printed.err)
    assert line.startswith("embedforge export: error: ") and message in line, line  # the repo: see the xfail below
    assert SECRET not in printed.out + printed.err + caplog.text
    # the push came after the folder was written and checked: it is complete and serves the source's vectors
    reloaded = Embedder.from_pretrained(str(out)).encode(TEXTS)
    source = Embedder.from_pretrained(str(tiny_qwen3_embedder)).encode(TEXTS)
    # float32 forward passes of a 2-layer model on the same CPU and thread count: equal to rounding
    assert abs(reloaded - source).max() < 1e-5
    assert (out / "README.md").exists() and (out / "export_report.json").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def test_a_failed_push_names_the_repo_and_the_folder_kept(tmp_path, monkeypatch):
    from embedforge.errors import EmbedforgeError
    from embedforge.export.hub import push_folder

    folder = tmp_path / "exported"
    folder.mkdir()
    (folder / "README.md").write_text("# m\n")
    (folder / "config.json").write_text("{}")
    monkeypatch.setenv("HF_TOKEN", SECRET)
    sock = unreachable_hub(monkeypatch)
    try:
        with pytest.raises(EmbedforgeError) as err:
            push_folder(folder, "org/name")
    finally:
        sock.close()
    assert "org/name" in str(err.value) and str(folder) in str(err.value) and SECRET not in str(err.value)

"""`embedforge train` as a hostile or unlucky user meets it: a folder it did not write, a second run
on the same output, a learning rate of infinity, weights that turn NaN, a full disk while a
checkpoint is written, a damaged optimizer state, a run that fails before it produced anything.
Each case fails with one line (exit 2) and leaves every file it did not write untouched."""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from train_workers.toy_data import config, write_toy

from embedforge.cli import main
from embedforge.errors import ConfigError
from embedforge.train.checkpoint import COMPLETE_MARKER, complete_checkpoints
from embedforge.train.trainer import NonFiniteWeightsError, train


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)


@pytest.fixture(scope="module")
def data_path(tmp_path_factory):
    return write_toy(tmp_path_factory.mktemp("data") / "train.jsonl", 24)


def flags(model, data, out, *extra: str) -> list[str]:
    return ["train", "--model", str(model), "--data", data, "--output", str(out), "--full", "--batch-size", "4",
            "--lr", "0.01", "--set", "progress_bar=false", "--set", "data.0.num_negatives=2", *extra]


def one_error_line(err: str) -> str:
    lines = [line for line in err.splitlines() if "error" in line]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


@pytest.mark.parametrize("resume", ["never", "auto"])
def test_a_checkpoint_folder_we_did_not_write_is_kept_and_refused(tiny_qwen3_embedder, data_path, tmp_path, capsys,
                                                                   resume):
    # Before: deleted at start with a WARNING, even with resume: never.
    out = tmp_path / "out"
    foreign = out / "checkpoint-500"
    foreign.mkdir(parents=True)
    (foreign / "model.safetensors").write_text("w")
    code = main(flags(tiny_qwen3_embedder, data_path, out, "--max-steps", "1", "--set", f"resume={resume}"))
    assert code == 2
    line = one_error_line(capsys.readouterr().err)
    assert "checkpoint-500 not written by embedforge" in line and "move it away" in line
    assert (foreign / "model.safetensors").read_text() == "w"
    assert not (out / "final").exists() and not (out / "train_config.json").exists()


def test_a_second_run_on_the_same_output_is_refused_and_the_first_is_unharmed(tiny_qwen3_embedder, data_path,
                                                                               tmp_path, capsys):
    # Before: one of the two crashed with a traceback and metrics.jsonl held more lines than steps.
    out, steps = tmp_path / "out", 12
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    first = subprocess.Popen([sys.executable, "-m", "embedforge.train", *flags(tiny_qwen3_embedder, data_path, out,
                              "--max-steps", str(steps), "--set", "save_steps=0")[1:]],
                             env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    metrics = out / "metrics.jsonl"
    deadline = time.time() + 120
    while not (metrics.exists() and metrics.read_text().strip()):  # the first run is training: it holds the lock
        assert first.poll() is None, first.stdout.read()
        assert time.time() < deadline
        time.sleep(0.02)
    assert main(flags(tiny_qwen3_embedder, data_path, out, "--max-steps", str(steps))) == 2
    line = one_error_line(capsys.readouterr().err)
    assert f"in use by pid {first.pid}" in line
    log = first.communicate(timeout=300)[0]
    assert first.returncode == 0, log
    assert [json.loads(x)["step"] for x in metrics.read_text().splitlines()] == list(range(1, steps + 1))


@pytest.mark.parametrize("key", ["lr=.inf", "loss.margin=.nan", "weight_decay=.inf"])
def test_a_non_finite_setting_fails_validation(tiny_qwen3_embedder, data_path, tmp_path, capsys, key):
    # Before: `--set lr=.inf` trained, and checkpoint-1 was marked COMPLETE with NaN weights.
    out = tmp_path / "out"
    assert main(flags(tiny_qwen3_embedder, data_path, out, "--max-steps", "2", "--set", key)) == 2
    assert f"{key.split('=')[0]}: Input should be a finite number" in one_error_line(capsys.readouterr().err)
    assert not out.exists()


def test_non_finite_weights_are_never_saved_as_a_complete_checkpoint(tiny_qwen3_embedder, data_path, tmp_path,
                                                                      monkeypatch):
    # An optimizer step that leaves a NaN in the weights while the loss of that step was finite (an
    # overflow in the update): the checkpoint of that step must not be written.
    step = torch.optim.AdamW.step

    def poisoned(self, *args, **kwargs):
        out = step(self, *args, **kwargs)
        if self.state and next(iter(self.state.values()))["step"] >= 2:
            with torch.no_grad():
                self.param_groups[0]["params"][0].view(-1)[0] = float("nan")
        return out

    monkeypatch.setattr(torch.optim.AdamW, "step", poisoned)
    out = tmp_path / "out"
    with pytest.raises(NonFiniteWeightsError, match="step 2: the trained weights are NaN or infinite") as err:
        train(config(tiny_qwen3_embedder, data_path, out, max_steps=4, save_steps=1))
    assert "the last complete checkpoint is" in str(err.value) and "checkpoint-1" in str(err.value)
    assert [s for s, _ in complete_checkpoints(out)] == [1]
    assert not any(p.name.startswith("checkpoint-2") for p in out.iterdir())


def test_a_full_disk_while_writing_a_checkpoint_is_one_line(tiny_qwen3_embedder, data_path, tmp_path, capsys,
                                                           monkeypatch):
    save = torch.save

    def disk_full(obj, f, *args, **kwargs):
        if str(f).endswith("optimizer.bin"):
            Path(f).write_bytes(b"\0" * 16)  # what the device took before it filled up
            raise OSError(errno.ENOSPC, "No space left on device")
        return save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", disk_full)
    out = tmp_path / "out"
    assert main(flags(tiny_qwen3_embedder, data_path, out, "--max-steps", "2", "--set", "save_steps=1")) == 2
    line = one_error_line(capsys.readouterr().err)
    assert "checkpoint-1.tmp: no space left on the device" in line
    assert not any(p.name.startswith("checkpoint-") for p in out.iterdir())  # the partial folder is removed
    assert not (out / "train_config.json").exists()


def test_a_damaged_optimizer_state_on_resume_is_one_line(tiny_qwen3_embedder, data_path, tmp_path, capsys):
    out = tmp_path / "out"
    args = flags(tiny_qwen3_embedder, data_path, out, "--max-steps", "2", "--set", "save_steps=1")
    assert main(args) == 0
    (out / "checkpoint-2" / "optimizer.bin").write_bytes(b"not a torch file")
    capsys.readouterr()
    assert main(args) == 2
    line = one_error_line(capsys.readouterr().err)
    assert "checkpoint-2: cannot restore this checkpoint" in line and "delete it to resume from the one before" in line


def test_a_failed_run_leaves_no_record_that_looks_like_a_run(tiny_qwen3_embedder, data_path, tmp_path):
    # Before: train_config.json and data_report.json were written before the first step.
    def no_such_metric(model):
        return {"dev_recall_at_5": 0.5}

    out = tmp_path / "out"
    with pytest.raises(ConfigError, match="eval.metric 'ndcg_at_10' not among"):
        train(config(tiny_qwen3_embedder, data_path, out, max_steps=2), evaluator=no_such_metric)
    assert not (out / "train_config.json").exists() and not (out / "data_report.json").exists()
    # A refused resume keeps the record of the run that is there (before: overwritten by the refused one).
    done = train(config(tiny_qwen3_embedder, data_path, tmp_path / "done", max_steps=1, save_steps=1))
    record = (Path(done.output_dir) / "train_config.json").read_text()
    with pytest.raises(ConfigError, match="different batch_size"):
        train(config(tiny_qwen3_embedder, data_path, tmp_path / "done", max_steps=1, batch_size=8))
    assert (Path(done.output_dir) / "train_config.json").read_text() == record
    assert json.loads(record)["batch_size"] == 4 and (tmp_path / "done" / "checkpoint-1" / COMPLETE_MARKER).exists()


def test_wandb_writes_its_run_folder_under_the_output(tiny_qwen3_embedder, data_path, tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    out = tmp_path / "out"
    train(config(tiny_qwen3_embedder, data_path, out, max_steps=1, report_to=["jsonl", "wandb"]))
    assert not (cwd / "wandb").exists()  # before: ./wandb in the working directory
    assert any((out / "wandb").glob("offline-run-*"))

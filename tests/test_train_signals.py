"""Interrupted runs, as real processes: `python -m embedforge.train` stopped by SIGTERM (it finishes
the step, writes a checkpoint and exits 143) or killed by SIGKILL (possibly in the middle of writing
a checkpoint), then started again with the same command, ends with the weights of a run that was
never interrupted."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from train_workers.toy_data import write_toy

from embedforge.train.checkpoint import COMPLETE_MARKER, complete_checkpoints
from embedforge.train.cli import INTERRUPTED_EXIT_CODE
from embedforge.train.config import load_train_config
from embedforge.train.trainer import train

STEPS = 16


def recipe(tmp_path: Path, model: Path, data: str) -> Path:
    path = tmp_path / "recipe.yaml"
    path.write_text(
        f"model: {model}\nmethod: full\nbatch_size: 4\nmax_steps: {STEPS}\nlr: 0.001\nsave_steps: 2\n"
        f"save_total_limit: 3\nprogress_bar: false\nseed: 3\ndata:\n  - path: {data}\n    num_negatives: 2\n"
    )
    return path


def launch(recipe_path: Path, out: Path) -> subprocess.Popen:
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    return subprocess.Popen([sys.executable, "-m", "embedforge.train", str(recipe_path), "--output", str(out)],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def last_step(out: Path) -> int:
    metrics = out / "metrics.jsonl"
    if not metrics.exists():
        return 0
    lines = [line for line in metrics.read_text().splitlines() if line.strip()]
    return json.loads(lines[-1])["step"] if lines else 0


def wait_until(predicate, process: subprocess.Popen, timeout: float = 120.0, every: float = 0.005) -> None:
    deadline = time.time() + timeout
    while not predicate():
        assert process.poll() is None, "the run ended before it could be interrupted:\n" + process.stdout.read()
        assert time.time() < deadline, "timed out waiting for the run"
        time.sleep(every)


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tiny_qwen3_embedder):
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("signals")
    data = write_toy(root / "train.jsonl", 48)
    path = recipe(root, tiny_qwen3_embedder, data)
    reference = train(load_train_config(path, overrides=[f"output_dir={root / 'reference'}"]))
    return path, load_file(str(Path(reference.final_dir) / "model.safetensors"))


def assert_same_weights(folder: Path, reference: dict) -> None:
    """Bitwise: a resumed run repeats the same float operations in the same order on the same machine
    and thread count (OMP_NUM_THREADS=1 here, set_num_threads(1) for the reference). No tolerance can
    stand in: Adam turns rounding noise in a near-zero gradient entry into a step of about lr (see
    test_train_distributed.py). Before: < 1e-6."""
    got = load_file(str(folder / "model.safetensors"))
    assert max((got[k] - reference[k]).abs().max().item() for k in reference) == 0


def test_sigterm_checkpoints_at_the_step_and_resumes_to_the_same_weights(setup, tmp_path):
    path, reference = setup
    out = tmp_path / "run"
    process = launch(path, out)
    wait_until(lambda: last_step(out) >= 3, process)
    process.send_signal(signal.SIGTERM)
    log = process.communicate(timeout=120)[0]
    assert process.returncode == INTERRUPTED_EXIT_CODE, log
    stopped = last_step(out)
    assert 3 <= stopped < STEPS and "run the same command again to resume" in log
    assert complete_checkpoints(out)[-1][0] == stopped  # a checkpoint exactly where it stopped
    assert not (out / "final").exists()
    resumed = launch(path, out)
    log = resumed.communicate(timeout=300)[0]
    assert resumed.returncode == 0, log
    assert_same_weights(out / "final", reference)


def test_sigkill_even_mid_checkpoint_resumes_to_the_same_weights(setup, tmp_path):
    path, reference = setup
    out = tmp_path / "run"
    process = launch(path, out)
    # Kill while a checkpoint is being written (a .tmp folder exists), once at least one is complete.
    wait_until(lambda: complete_checkpoints(out) and any(p.name.endswith(".tmp") for p in out.iterdir()), process)
    process.kill()
    process.communicate(timeout=60)
    partial = [p for p in out.iterdir() if p.name.endswith(".tmp")]
    complete = complete_checkpoints(out)
    assert complete and all((folder / COMPLETE_MARKER).exists() for _, folder in complete)
    resumed = launch(path, out)
    log = resumed.communicate(timeout=300)[0]
    assert resumed.returncode == 0, log
    assert f"resumed from {complete[-1][1]}" in log
    assert not any(p.exists() for p in partial)  # the half-written folder was discarded, never loaded
    assert_same_weights(out / "final", reference)

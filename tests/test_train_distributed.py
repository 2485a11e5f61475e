"""End-to-end multi-process training on CPU (gloo): two DDP processes launched by
`accelerate launch --multi_gpu --num_processes 2` end with the weights of one process trained on the
same global batches (cross-device negatives, GradCache and Matryoshka on). The helpers here also
serve test_train_deepspeed.py."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from train_workers.toy_data import write_toy

from embedforge.train.config import load_train_config
from embedforge.train.trainer import train

pytestmark = pytest.mark.distributed
ACCELERATE_CONFIGS = Path(__file__).resolve().parents[1] / "recipes" / "accelerate"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def accelerate_launch(launcher_args: list[str], recipe: Path, out: Path) -> str:
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    command = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "2", "--num_machines", "1",
               "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(free_port()),
               *launcher_args, "-m", "embedforge.train", str(recipe), "--output", str(out)]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=400, check=False)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-6000:]
    return done.stdout + done.stderr


def write_recipe(root: Path, model: Path, method: str, steps: int, save_steps: int) -> Path:
    data = write_toy(root / "train.jsonl", 48)
    path = root / f"{method}.yaml"
    path.write_text(
        f"model: {model}\nmethod: {method}\nlora: {{rank: 4}}\nbatch_size: 8\nmini_batch_size: 10\n"
        f"max_steps: {steps}\nlr: 0.001\nwarmup_steps: 0\nsave_steps: {save_steps}\nprogress_bar: false\nseed: 1\n"
        "loss: {preset: qwen3, matryoshka_dims: [16, 64]}\n"
        f"data:\n  - path: {data}\n    num_negatives: 2\n    instruction: Find the note\n"
    )
    return path


def reference_run(recipe: Path, out: Path):
    torch.set_num_threads(1)
    return train(load_train_config(recipe, overrides=[f"output_dir={out}"]))


def tensors(path: Path) -> dict[str, torch.Tensor]:
    return load_file(str(path))


def max_diff(a, b) -> float:
    assert set(a) == set(b)
    return max((a[k] - b[k]).abs().max().item() for k in a)


def metric_lines(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]


def assert_same_steps(one: list[dict], two: list[dict]) -> None:
    """Per step: the same tokens (the processes together saw the one-process batch), loss and
    gradient norm (of the synchronised gradient, before clipping)."""
    assert [r["step"] for r in two] == [r["step"] for r in one]  # written once, by the main process
    for a, b in zip(one, two):
        assert b["tokens"] == a["tokens"]
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-5)
        assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-4)


def test_ddp_two_processes_equal_one_process(tiny_qwen3_embedder, tmp_path):
    recipe = write_recipe(tmp_path, tiny_qwen3_embedder, "full", steps=3, save_steps=0)
    reference = reference_run(recipe, tmp_path / "one")
    accelerate_launch(["--multi_gpu"], recipe, tmp_path / "two")
    one = tensors(Path(reference.final_dir) / "model.safetensors")
    two = tensors(tmp_path / "two" / "final" / "model.safetensors")
    moved = max_diff(one, tensors(tiny_qwen3_embedder / "model.safetensors"))
    assert moved > 1e-4
    # Adam turns float-level gradient noise into small weight noise; the gradients themselves are
    # compared through their per-step norm below (Adam would hide a wrong gradient scale).
    assert max_diff(one, two) < 0.02 * moved
    assert_same_steps(metric_lines(tmp_path / "one"), metric_lines(tmp_path / "two"))

"""End-to-end multi-process training on CPU (gloo): two DDP processes launched by
`accelerate launch --multi_gpu --num_processes 2` end with the weights of one process trained on the
same global batches (cross-device negatives, GradCache and Matryoshka on), print their summary once,
and share one output lock. The helpers here also serve test_train_deepspeed.py."""

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
from train_workers.precision import UNIT_ROUNDOFF, reorder_rtol, transformer_terms
from train_workers.toy_data import write_toy

from embedforge.io import output_lock
from embedforge.train.config import load_train_config
from embedforge.train.trainer import train

pytestmark = pytest.mark.distributed
ACCELERATE_CONFIGS = Path(__file__).resolve().parents[1] / "recipes" / "accelerate"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def accelerate_launch(launcher_args: list[str], recipe: Path, out: Path, expect: int = 0) -> str:
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    command = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "2", "--num_machines", "1",
               "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(free_port()),
               *launcher_args, "-m", "embedforge.train", str(recipe), "--output", str(out)]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=400, check=False)
    assert (done.returncode == 0) == (expect == 0), done.stdout[-3000:] + done.stderr[-6000:]
    return done.stdout + done.stderr


# Adam in its linear regime, so the weights compare as the gradients do. Every gradient is clipped to
# norm CLIP, far below Adam's eps (1e-8), so each update lr * m / (sqrt(v) + eps) is lr / eps times the
# momentum m (to CLIP / eps = 1 %: sqrt(v) <= CLIP), a running average of clipped gradients. In Adam's
# usual regime an entry whose gradient is near zero is normalised to a step of about lr of either sign,
# so float32 noise of 1e-10 in that entry moves its weight by up to lr and no tolerance derived from
# precision bounds the weights (the 0.02 * moved used before failed on another machine at 0.021).
CLIP, ADAM_EPS, LR = 1e-10, 1e-8, 1.0  # a step moves the weights by at most lr * CLIP / eps = 1e-2 (norm)


def write_recipe(root: Path, model: Path, method: str, steps: int, save_steps: int) -> Path:
    data = write_toy(root / "train.jsonl", 48)
    path = root / f"{method}.yaml"
    path.write_text(
        f"model: {model}\nmethod: {method}\nlora: {{rank: 4}}\nbatch_size: 8\nmini_batch_size: 10\n"
        f"max_steps: {steps}\nlr: {LR}\nmax_grad_norm: {CLIP}\nwarmup_steps: 0\nsave_steps: {save_steps}\n"
        "progress_bar: false\nseed: 1\nloss: {preset: qwen3, matryoshka_dims: [16, 64]}\n"
        f"data:\n  - path: {data}\n    num_negatives: 2\n    instruction: Find the note\n"
    )
    return path


def reference_run(recipe: Path, out: Path):
    torch.set_num_threads(1)
    return train(load_train_config(recipe, overrides=[f"output_dir={out}"]))


def tensors(path: Path) -> dict[str, torch.Tensor]:
    return load_file(str(path))


def metric_lines(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]


def step_tolerance(model: Path, record: dict) -> float:
    """How far one step's loss or gradient norm may drift between evaluation orders: the float32
    reordering bound of a gradient over the step's tokens (train_workers/precision.py), times
    1 / temperature (0.1, preset qwen3), which scales the similarities' rounding in the loss."""
    return reorder_rtol(torch.float32, transformer_terms(record["tokens"], model)) / 0.1


def assert_same_steps(model: Path, one: list[dict], two: list[dict]) -> None:
    """Per step: the same tokens (the processes together saw the one-process batch), loss and
    gradient norm (of the synchronised gradient, before clipping)."""
    assert [r["step"] for r in two] == [r["step"] for r in one]  # written once, by the main process
    for a, b in zip(one, two):
        assert b["tokens"] == a["tokens"]
        assert b["loss"] == pytest.approx(a["loss"], rel=step_tolerance(model, a))
        assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=step_tolerance(model, a))


def assert_same_weights(model: Path, base: dict, one: dict, two: dict, records: list[dict]) -> None:
    """The weights of two runs on the same batches, in Adam's linear regime (see CLIP): each step's
    clipped gradients differ by at most 2 * step_tolerance * CLIP in norm (the vector and its norm
    each carry the reordering error), so the momenta do too and the updates by lr_t / eps times that
    (times 1 + CLIP / eps for the second moment); each step also rounds every weight once in each run
    (u * |w|). A weight difference feeding back into the next gradient is smaller still: the
    updates are 1e-2 of the weights."""
    moved = {k: one[k] - base[k] for k in one}
    lr_sum = LR * (len(records) + 1) / 2  # a linear schedule without warmup: lr, lr (T - 1) / T, ...
    drift = max(2 * step_tolerance(model, r) for r in records) * CLIP / ADAM_EPS * (1 + CLIP / ADAM_EPS) * lr_sum
    moved_weights = sum(float(one[k][moved[k] != 0].double().pow(2).sum()) for k in one) ** 0.5
    rounding = len(records) * 2 * UNIT_ROUNDOFF[torch.float32] * moved_weights
    norm_moved = sum(float(v.double().pow(2).sum()) for v in moved.values()) ** 0.5
    differ = sum(float((two[k].double() - one[k].double()).pow(2).sum()) for k in one) ** 0.5
    assert norm_moved > 100 * (drift + rounding)  # training moved the weights far beyond what the bound allows
    assert differ <= drift + rounding


def test_ddp_two_processes_equal_one_process(tiny_qwen3_embedder, tmp_path):
    recipe = write_recipe(tmp_path, tiny_qwen3_embedder, "full", steps=3, save_steps=0)
    reference = reference_run(recipe, tmp_path / "one")
    # One output, one writer: a launch whose output is held elsewhere stops on every process with the
    # holder named (no process left waiting in a collective).
    with output_lock(tmp_path / "two"):
        refused = accelerate_launch(["--multi_gpu"], recipe, tmp_path / "two", expect=2)
    # One line from each process (the launcher's own report of a failed child follows them).
    assert refused.count(f"in use by pid {os.getpid()}") == 2 and "ConfigError" not in refused
    log = accelerate_launch(["--multi_gpu"], recipe, tmp_path / "two")  # the lock is taken once, by rank 0
    assert log.count("embedforge train: 3 steps; model in") == 1  # the summary comes from the main process
    one = tensors(Path(reference.final_dir) / "model.safetensors")
    two = tensors(tmp_path / "two" / "final" / "model.safetensors")
    records = metric_lines(tmp_path / "one")
    assert_same_steps(tiny_qwen3_embedder, records, metric_lines(tmp_path / "two"))
    assert_same_weights(tiny_qwen3_embedder, tensors(tiny_qwen3_embedder / "model.safetensors"), one, two, records)


def test_a_pipeline_run_on_two_processes_ends_with_the_one_process_model(tiny_qwen3_embedder, tmp_path):
    """`embedforge run` with `train.launch.num_processes: 2` runs its train stage under `accelerate
    launch` (the command a user types) and ends with the model of a one-process pipeline run, within
    the bound of the test above."""
    import yaml

    train_section = yaml.safe_load(write_recipe(tmp_path, tiny_qwen3_embedder, "full", steps=3,
                                                save_steps=0).read_text())
    del train_section["model"]
    recipe = tmp_path / "pipeline.yaml"
    recipe.write_text(json.dumps({
        "name": "launch", "model": str(tiny_qwen3_embedder), "synth": {"enabled": False},
        "filter": {"enabled": False}, "mine": {"enabled": False}, "train": train_section,
        "merge": {"enabled": False}, "eval": {"sets": []}, "export": {"enabled": False}}))
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    launch = (f"train.launch={{num_processes: 2, extra_args: [--main_process_port, '{free_port()}', "
              "--mixed_precision, 'no', --dynamo_backend, 'no']}")
    finals = {}
    for name, extra in (("one", []), ("two", ["--set", launch])):
        done = subprocess.run([sys.executable, "-m", "embedforge", "run", str(recipe), "--workdir",
                               str(tmp_path / name), *extra], env=env, capture_output=True, text=True,
                              timeout=400, check=False)
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-6000:]
        (final,) = (tmp_path / name).glob("train-*/work/final/model.safetensors")
        finals[name] = final
    # the launched run went through the recipe file `accelerate launch` reads; the reference ran in-process
    assert list((tmp_path / "two").glob("train-*/train.yaml")) and not list((tmp_path / "one").glob("train-*/train.yaml"))
    records = metric_lines(finals["one"].parent.parent)
    assert_same_steps(tiny_qwen3_embedder, records, metric_lines(finals["two"].parent.parent))
    assert_same_weights(tiny_qwen3_embedder, tensors(tiny_qwen3_embedder / "model.safetensors"),
                        tensors(finals["one"]), tensors(finals["two"]), records)

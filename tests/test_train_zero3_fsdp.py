"""DeepSpeed ZeRO-3 and FSDP through `accelerate launch` with two CPU processes (gloo), on the same
global batches as one process (write_recipe: GradCache with 2 chunks per process, Matryoshka, cross-
process negatives), LoRA and full fine-tuning; and the multi-node accelerate config.

Tolerances: test_train_distributed.py (Adam in its linear regime, train_workers/precision.py).

The ZeRO-3 launches of both methods run at once in one fixture, and their one-process references
meanwhile, so the file costs about one launch's wall time (the machine has 2 cores). A launch that
stops making progress (a deadlock in a collective) is stopped after Launch.STALL seconds.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from test_train_deepspeed import initial_adapter
from test_train_distributed import (
    assert_same_steps,
    assert_same_weights,
    free_port,
    metric_lines,
    reference_run,
    tensors,
    write_recipe,
)

from embedforge.train.checkpoint import complete_checkpoints

pytestmark = [pytest.mark.distributed, pytest.mark.slow]
REPO = Path(__file__).resolve().parents[1]
MULTINODE = REPO / "recipes" / "accelerate" / "multinode.yaml"
STEPS, SAVE_STEPS = 4, 2
ADAPTER = "final/adapter/adapter_model.safetensors"

CPU_LAUNCH = {"compute_environment": "LOCAL_MACHINE", "mixed_precision": "no", "num_machines": 1,
              "num_processes": 2, "machine_rank": 0, "rdzv_backend": "static", "same_network": True,
              "use_cpu": True}
ZERO3 = {**CPU_LAUNCH, "distributed_type": "DEEPSPEED", "deepspeed_config": {
    "zero_stage": 3, "gradient_accumulation_steps": 1, "offload_optimizer_device": "none",
    "offload_param_device": "none", "zero3_init_flag": False, "zero3_save_16bit_model": True}}
FSDP = {**CPU_LAUNCH, "distributed_type": "FSDP", "fsdp_config": {
    "fsdp_version": 1, "fsdp_sharding_strategy": "FULL_SHARD", "fsdp_auto_wrap_policy": "TRANSFORMER_BASED_WRAP",
    "fsdp_backward_prefetch": "BACKWARD_PRE", "fsdp_state_dict_type": "FULL_STATE_DICT",
    "fsdp_offload_params": False, "fsdp_sync_module_states": True, "fsdp_use_orig_params": True,
    "fsdp_cpu_ram_efficient_loading": False}}


def write_config(folder: Path, name: str, config: dict) -> Path:
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


class Launch:
    """`accelerate launch -m embedforge.train`, its output in a file.

    A collective that one process never joins would otherwise wait out the trainer's gloo timeout
    (30 minutes): `finish` stops the launch when neither its log nor its output folder has changed
    for STALL seconds. Every phase here (start-up, a step, a checkpoint, the export of a 10M-parameter
    model) shows progress within seconds, so a stall of that length is a deadlock."""

    STALL = 90.0

    def __init__(self, config: Path, recipe: Path, out: Path):
        env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", HF_HUB_OFFLINE="1",
                   TOKENIZERS_PARALLELISM="false")
        command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config),
                   "--main_process_port", str(free_port()), "-m", "embedforge.train", str(recipe), "--output", str(out)]
        self.out, self.log_path = out, out.with_name(out.name + ".log")
        self.seen, self.since = None, time.monotonic()
        with open(self.log_path, "w") as log:
            self.process = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT)

    def _progress(self) -> tuple:
        try:
            files = [p.stat().st_mtime for p in self.out.rglob("*")] if self.out.exists() else []
        except FileNotFoundError:  # renamed or removed while listed: that is progress
            return (time.monotonic(),)
        return self.log_path.stat().st_size, len(files), max(files, default=0.0)

    def result(self) -> tuple[int, str] | None:
        """(exit code, log) once the launch ended or was stopped for a stall; None while it runs."""
        if self.process.poll() is not None:
            return self.process.returncode, self.log_path.read_text()
        now = self._progress()
        if now != self.seen:
            self.seen, self.since = now, time.monotonic()
        elif time.monotonic() - self.since > self.STALL:
            self.stop()
            return -9, self.log_path.read_text() + f"\n(no progress for {self.STALL:.0f} s: stopped)"
        return None

    def finish(self) -> tuple[int, str]:
        return finish_all([self])[0]

    def stop(self) -> None:
        """Kill the launcher and the training processes it started (torchrun puts them in sessions
        of their own, and they ignore SIGTERM until their step ends, which a deadlock never does)."""
        import psutil

        launcher = psutil.Process(self.process.pid)
        for process in [*launcher.children(recursive=True), launcher]:
            with contextlib.suppress(psutil.NoSuchProcess):
                process.kill()
        self.process.wait()


def finish_all(launches: list[Launch]) -> list[tuple[int, str]]:
    """Wait for every launch (their stalls timed side by side); (exit code, log) of each."""
    results: list[tuple[int, str] | None] = [None] * len(launches)
    while None in results:
        results = [done or launch.result() for launch, done in zip(launches, results)]
        time.sleep(1.0)
    return results


class Zero3Run:
    """One method's ZeRO-3 launch, its resumed relaunch (when the first ended) and the reference."""

    def __init__(self, root: Path, model: Path, method: str):
        self.root, self.model, self.method = root, model, method
        self.recipe = write_recipe(root, model, method, steps=STEPS, save_steps=SAVE_STEPS)
        self.out = root / "zero3"
        self.resumed = root / "zero3-resumed"
        self.code = self.resume_code = None
        self.log = self.resume_log = ""

    def summary(self, log: str) -> str:
        return f"exit {self.code}; launch log tail:\n{log[-4000:]}"


@pytest.fixture(scope="module")
def zero3_runs(tiny_qwen3_embedder, tmp_path_factory):
    pytest.importorskip("deepspeed")
    config = write_config(tmp_path_factory.mktemp("accelerate"), "zero3", ZERO3)
    runs = {m: Zero3Run(tmp_path_factory.mktemp(f"zero3-{m}"), tiny_qwen3_embedder, m) for m in ("lora", "full")}
    launched = {m: Launch(config, r.recipe, r.out) for m, r in runs.items()}
    torch.set_num_threads(1)
    for run in runs.values():  # while the launches run
        run.reference = reference_run(run.recipe, run.root / "one")
        run.records = metric_lines(run.root / "one")
    for run, (code, log) in zip(runs.values(), finish_all(list(launched.values()))):
        run.code, run.log = code, log
    relaunched = {}
    for method, run in runs.items():
        if run.code == 0:  # resume: a copy of the output with everything after step SAVE_STEPS dropped
            shutil.copytree(run.out, run.resumed)
            for name in (f"checkpoint-{STEPS}", "final"):
                shutil.rmtree(run.resumed / name)
            relaunched[method] = Launch(config, run.recipe, run.resumed)
    for method, (code, log) in zip(relaunched, finish_all(list(relaunched.values()))):
        runs[method].resume_code, runs[method].resume_log = code, log
    return runs


# Writing a model under ZeRO-3 once deadlocked: the main process alone loaded a backbone while transformers
# built it under deepspeed.zero.Init (a collective); the trainer now loads it outside that context.


@pytest.mark.parametrize("method", [
    "lora", "full"])
def test_zero3_trains_the_one_process_steps(zero3_runs, method):
    """Every step's tokens, loss and gradient norm equal the one-process run's: the ZeRO-3 engine
    under GradCache (each chunk but the last a non-boundary micro-step) runs one optimizer step per
    global batch, and the sharded gradient's norm is the whole gradient's."""
    run = zero3_runs[method]
    steps = metric_lines(run.out) if (run.out / "metrics.jsonl").exists() else []
    assert len(steps) == STEPS, run.summary(run.log)
    assert_same_steps(run.model, run.records, steps)
    assert [s for s, _ in complete_checkpoints(run.out)] == [SAVE_STEPS, STEPS]
    assert (run.out / f"checkpoint-{SAVE_STEPS}" / "pytorch_model").is_dir()  # DeepSpeed's own sharded format


@pytest.mark.parametrize("method", ["lora", "full"])
def test_zero3_final_weights_load_as_a_normal_model_equal_to_one_process(zero3_runs, method):
    """The gathered final model loads as a plain Embedder whose every tensor has the base's shape (a
    ZeRO-3 placeholder saved as is would be empty), and the trained weights (LoRA: the adapter, full:
    the model) equal the one-process run's within the Adam-linear bound."""
    from embedforge.embedder import Embedder

    run = zero3_runs[method]
    assert run.code == 0, run.summary(run.log)
    base = tensors(run.model / "model.safetensors")
    final = tensors(run.out / "final" / "model.safetensors")
    assert {k: v.shape for k, v in final.items()} == {k: v.shape for k, v in base.items()}
    Embedder.from_pretrained(run.out / "final", device="cpu")
    assert_trained_like_one_process(run, run.out)


@pytest.mark.parametrize("method", ["lora", "full"])
def test_zero3_resumes_from_its_checkpoint_to_the_one_process_weights(zero3_runs, method):
    run = zero3_runs[method]
    assert run.code == 0, run.summary(run.log)
    assert run.resume_code == 0, run.summary(run.resume_log)
    assert "resumed from" in run.resume_log and f"at step {SAVE_STEPS}" in run.resume_log
    assert_same_steps(run.model, run.records, metric_lines(run.resumed))
    assert_trained_like_one_process(run, run.resumed)


def assert_trained_like_one_process(run: Zero3Run, out: Path) -> None:
    one_dir = Path(run.reference.output_dir)
    if run.method == "lora":
        base = initial_adapter(run.recipe, run.root / "init")
        assert_same_weights(run.model, base, tensors(one_dir / ADAPTER), tensors(out / ADAPTER), run.records)
    else:
        assert_same_weights(run.model, tensors(run.model / "model.safetensors"),
                            tensors(one_dir / "final" / "model.safetensors"),
                            tensors(out / "final" / "model.safetensors"), run.records)


# ZeRO-3 partitions the weights at load, so p.numel() is 0 for a partitioned weight: the trainer counts ds_numel.
def test_zero3_counts_the_whole_model(zero3_runs, tiny_qwen3_embedder):
    run = zero3_runs["lora"]
    total = sum(t.numel() for t in tensors(tiny_qwen3_embedder / "model.safetensors").values())
    trainable = sum(t.numel() for t in initial_adapter(run.recipe, run.root / "count").values())
    assert f"{trainable} of {total + trainable} parameters trainable" in run.log, run.summary(run.log)


# FSDP cannot run on CPU: torch's FSDP1 refuses it ('FSDP needs a non-CPU accelerator device',
# torch/distributed/fsdp/_init_utils.py); torch's FSDP2 shards on CPU with gloo, but accelerate 1.15 selects FSDP
# only for accelerator processes (accelerate/state.py), so on CPU an FSDP config would silently train DDP.
# The trainer refuses it in one line instead.
def test_fsdp_on_cpu_is_refused_in_one_line_not_trained_as_ddp(tiny_qwen3_embedder, tmp_path):
    recipe = write_recipe(tmp_path, tiny_qwen3_embedder, "lora", steps=1, save_steps=0)
    for sync in (True, False):
        config = {**FSDP, "fsdp_config": {**FSDP["fsdp_config"], "fsdp_sync_module_states": sync}}
        path = write_config(tmp_path, f"fsdp-{sync}", config)
        code, log = Launch(path, recipe, tmp_path / f"fsdp-{sync}").finish()
        # Both processes refuse; the launcher stops the slower one when the first exits, so its line may be missing.
        refusals = [line for line in log.splitlines() if line.startswith("embedforge train: error:")]
        assert code != 0 and refusals and all("FSDP" in line for line in refusals), log[-4000:]
        assert not (tmp_path / f"fsdp-{sync}").exists()  # nothing trained, nothing written


def test_multinode_config_is_read_by_accelerate_as_two_machines():
    """recipes/accelerate/multinode.yaml through accelerate's own config loader, and the two commands
    its comment gives through `accelerate launch`'s own parser and validation (nothing launched)."""
    from accelerate.commands.config.config_args import load_config_from_file
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser

    config = load_config_from_file(str(MULTINODE))
    assert (config.num_machines, config.num_processes, config.machine_rank) == (2, 16, 0)
    assert config.main_process_ip and config.main_process_port and config.rdzv_backend == "static"
    commands = [line.split("$ ", 1)[1] for line in MULTINODE.read_text().splitlines() if "$ accelerate launch" in line]
    assert len(commands) == 2
    for rank, command in enumerate(commands):
        words = command.replace("recipes/accelerate/multinode.yaml", str(MULTINODE)).split()
        assert words[:2] == ["accelerate", "launch"]
        args, _, _ = _validate_launch_command(launch_command_parser().parse_args(words[2:]))
        assert (args.machine_rank, args.num_machines, args.num_processes) == (rank, 2, 16)
        assert (args.main_process_ip, args.main_process_port) == (config.main_process_ip, config.main_process_port)
        assert args.module and args.training_script == "embedforge.train"

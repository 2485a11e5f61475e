"""DeepSpeed ZeRO-2 through `accelerate launch` with two CPU processes (gloo): it trains to the
weights, losses and gradient norms of one process on the same global batches (GradCache chunks
included: each chunk but the last is a non-boundary micro-step), checkpoints in DeepSpeed's own
format, and a relaunch resumes from the checkpoint to the same end. Tolerances: see
test_train_distributed.py (Adam in its linear regime) and train_workers/precision.py."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from test_train_distributed import (
    ACCELERATE_CONFIGS,
    accelerate_launch,
    assert_same_steps,
    assert_same_weights,
    metric_lines,
    reference_run,
    tensors,
    write_recipe,
)

from embedforge.train.checkpoint import complete_checkpoints

pytestmark = pytest.mark.distributed


def test_deepspeed_zero2_trains_and_resumes_to_the_one_process_weights(tiny_qwen3_embedder, tmp_path):
    pytest.importorskip("deepspeed")
    recipe = write_recipe(tmp_path, tiny_qwen3_embedder, "lora", steps=4, save_steps=2)
    reference = reference_run(recipe, tmp_path / "one")
    out = tmp_path / "zero2"
    launcher = ["--config_file", str(ACCELERATE_CONFIGS / "deepspeed_zero2.yaml")]
    accelerate_launch(launcher, recipe, out)
    adapter = "final/adapter/adapter_model.safetensors"
    one = tensors(Path(reference.output_dir) / adapter)
    base = initial_adapter(recipe, tmp_path / "init")
    records = metric_lines(tmp_path / "one")
    assert_same_steps(tiny_qwen3_embedder, records, metric_lines(out))
    assert_same_weights(tiny_qwen3_embedder, base, one, tensors(out / adapter), records)
    assert [s for s, _ in complete_checkpoints(out)] == [2, 4]
    assert (out / "checkpoint-2" / "pytorch_model").is_dir()  # DeepSpeed's own sharded format
    # Resume: drop everything after step 2 and launch again.
    shutil.rmtree(out / "checkpoint-4")
    shutil.rmtree(out / "final")
    log = accelerate_launch(launcher, recipe, out)
    assert "resumed from" in log and "at step 2" in log
    assert_same_steps(tiny_qwen3_embedder, records, metric_lines(out))
    assert_same_weights(tiny_qwen3_embedder, base, one, tensors(out / adapter), records)


def initial_adapter(recipe: Path, out: Path) -> dict:
    """The adapter weights before the first step (peft's seeded initialisation), keyed as saved."""
    from embedforge.train.config import load_train_config
    from embedforge.train.trainer import Trainer

    trainer = Trainer(load_train_config(recipe, overrides=[f"output_dir={out}"]))
    trainer.setup()
    return {name.replace(".default", ""): p.detach().clone() for name, p in trainer.model.named_parameters()
            if p.requires_grad}

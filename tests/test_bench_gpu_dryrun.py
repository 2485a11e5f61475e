"""The one-shot GPU check cannot rot: its dry run (same script, CPU, tiny Qwen3) runs here, and the
numbers it reports rest on shape arithmetic checked against transformers' own model."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "bench"))


def test_qwen3_06b_shape_has_the_released_parameter_count():
    import torch
    from shapes import non_embedding_parameters, qwen3_config
    from transformers import Qwen3Model

    config = qwen3_config("0.6B")
    with torch.device("meta"):
        model = Qwen3Model(config)
    total = sum(p.numel() for p in model.parameters())
    assert total == 595_776_512  # Qwen3-Embedding-0.6B's safetensors (shared/reference/qwen3-recipe.md)
    assert non_embedding_parameters(config) == total - model.embed_tokens.weight.numel()


def test_training_flops_is_palm_accounting():
    from shapes import non_embedding_parameters, peak_flops, qwen3_config, training_flops

    config = qwen3_config("tiny")
    n = non_embedding_parameters(config)
    per_token_attention = 12 * 2 * 4 * 16  # layers x heads x head_dim
    assert training_flops(config, [3, 5]) == 6 * n * 8 + per_token_attention * (3 * 3 + 5 * 5)
    assert peak_flops("NVIDIA H100 80GB HBM3") == 989.4e12 and peak_flops("NVIDIA GH200 480GB") == 989.4e12
    assert peak_flops("CPU") is None


def test_gpu_check_dry_run_exercises_every_part(tmp_path):
    env = {**os.environ, "PYTHON": sys.executable, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(["bash", str(REPO / "bench" / "gpu.sh"), "--dry-run", "--out", str(tmp_path)],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=600, check=False)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    report = json.loads((tmp_path / "dryrun.json").read_text())
    parts = report["parts"]
    assert list(parts) == ["environment", "tests", "train_speed", "max_batch", "encode"]
    assert not [name for name, part in parts.items() if "error" in part or "not_run" in part]
    # the gpu-marked tests are collected and skip cleanly without CUDA
    tests = parts["tests"]
    assert tests["exit_code"] == 0 and tests["skipped"] >= 4 and tests["failed"] == 0 and tests["passed"] == 0
    train = parts["train_speed"]
    assert train["tokens"] == train["tokens_counted_by_trainer"] > 0  # both sides' tokens are the trainer's
    for side in ("embedforge", "sentence_transformers"):
        assert train[side]["tokens_per_s"] > 0 and train[side]["steps"] == train["timed_steps"]
        assert all(math.isfinite(x) for x in train[side]["loss"])
    assert all(run["fits"] for run in parts["max_batch"]["runs"])
    for workload in ("encode", "forward-backward"):
        assert parts["encode"][workload]["packed"]["note"] == ""  # the tiny Qwen3 really packs
        assert parts["encode"][workload]["packed_vs_padded"] > 0
    assert (tmp_path / "dryrun.md").read_text().startswith("# GPU check (dry run")

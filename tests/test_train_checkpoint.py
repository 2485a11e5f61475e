"""Checkpoints and recovery in one process: a resumed run ends with the uninterrupted weights
(RNG included), incomplete checkpoint folders are never loaded, a NaN loss stops with the step and
rows named and a loadable checkpoint kept, and periodic evaluation exports the best model."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file
from train_workers.toy_data import config, max_diff, toy_rows, weights, write_toy

from embedforge import Embedder
from embedforge.errors import ConfigError
from embedforge.train.checkpoint import (
    COMPLETE_MARKER,
    complete_checkpoints,
    foreign_checkpoints,
    latest_checkpoint,
    new_partial,
    read_trainer_state,
    remove_incomplete,
)
from embedforge.train.trainer import NonFiniteLossError, train


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)


@pytest.fixture(scope="module")
def data_path(tmp_path_factory):
    return write_toy(tmp_path_factory.mktemp("data") / "train.jsonl", 40)



def test_only_complete_checkpoints_count_and_only_our_own_leftovers_are_removed(tmp_path):
    for name, complete in (("checkpoint-2", True), ("checkpoint-4", True), ("checkpoint-6", False),
                           ("checkpoint-8.tmp", True), ("checkpoint-x", True)):
        (tmp_path / name).mkdir()
        (tmp_path / name / "trainer_state.json").write_text("{}")
        if complete:
            (tmp_path / name / COMPLETE_MARKER).write_text("")
    assert [s for s, _ in complete_checkpoints(tmp_path)] == [2, 4]
    assert latest_checkpoint(tmp_path) == tmp_path / "checkpoint-4"
    # Before: checkpoint-6 and checkpoint-8.tmp were deleted. Neither was written by embedforge (no
    # WRITING marker from its first moment, no COMPLETE marker): they are reported, never deleted.
    assert [p.name for p in foreign_checkpoints(tmp_path)] == ["checkpoint-6", "checkpoint-8.tmp"]
    ours = new_partial(tmp_path, 10)  # what a kill in the middle of writing checkpoint-10 leaves
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True,
                          check=True)
    hidden = tmp_path / f".checkpoint-2.{int(dead.stdout)}.deleted.tmp"  # a deletion a kill interrupted
    hidden.mkdir()
    assert sorted(p.name for p in remove_incomplete(tmp_path)) == sorted([ours.name, hidden.name])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-2", "checkpoint-4", "checkpoint-6",
                                                          "checkpoint-8.tmp", "checkpoint-x"]


def test_resume_from_a_checkpoint_ends_with_the_uninterrupted_weights(tiny_qwen3_embedder, data_path, tmp_path):
    # LoRA with dropout: the resumed run must also restore the RNG, or the dropout masks differ.
    cfg = config(tiny_qwen3_embedder, data_path, tmp_path / "out", method="lora", max_steps=6, save_steps=2,
                 save_total_limit=5, lora={"rank": 4, "dropout": 0.2}, mini_batch_size=6)
    train(cfg)
    out = tmp_path / "out"
    reference = weights(out / "final")
    assert [s for s, _ in complete_checkpoints(out)] == [2, 4, 6]
    assert (out / "checkpoint-2" / "trainable_parameters.safetensors").exists()
    assert not (out / "checkpoint-2" / "model.safetensors").exists()  # adapters only, not the frozen base
    assert read_trainer_state(out / "checkpoint-2")["sampler"]["batches"] == 2
    shutil.rmtree(out / "checkpoint-4")
    shutil.rmtree(out / "checkpoint-6")
    shutil.rmtree(out / "final")
    new_partial(out, 5)  # what a kill in the middle of writing checkpoint-5 leaves: ignored and removed
    result = train(cfg)
    assert result.steps == 6 and not (out / "checkpoint-5.tmp").exists()
    # The resumed run repeats the uninterrupted run's float operations in the same order on the same
    # machine and thread count: bitwise equal. Any tolerance would be vacuous here: Adam turns rounding
    # noise in a near-zero gradient entry into a step of about lr (see test_train_distributed.py), so
    # equality is the only check that separates an exact resume from a nearly exact one. Before: < 1e-6.
    assert max_diff(weights(out / "final"), reference) == 0
    # Each checkpoint also holds its adapter as a loadable folder (for merging checkpoints): step 6's is the final one.
    adapter = "adapter_model.safetensors"
    assert max_diff(load_file(str(out / "checkpoint-6" / "model" / adapter)),
                    load_file(str(out / "final" / "adapter" / adapter))) == 0
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4, 5, 6]
    with pytest.raises(ConfigError, match="different batch_size"):
        train(config(tiny_qwen3_embedder, data_path, out, method="lora", max_steps=6, batch_size=8,
                     lora={"rank": 4, "dropout": 0.2}))


def test_non_finite_loss_stops_naming_step_and_rows_and_keeps_a_checkpoint(tiny_qwen3_embedder, data_path, tmp_path):
    cfg = config(tiny_qwen3_embedder, data_path, tmp_path / "out", lr=1e30, max_steps=20, save_steps=100,
                 max_grad_norm=None)
    with pytest.raises(NonFiniteLossError) as err:
        train(cfg)
    message = str(err.value)
    step = int(message.split()[1].rstrip(":"))
    assert step >= 2 and "dataset 'train'" in message and "train.jsonl:" in message
    kept = complete_checkpoints(tmp_path / "out")
    assert [s for s, _ in kept] == [step - 1]
    finite = load_file(str(kept[0][1] / "model.safetensors"))
    assert all(torch.isfinite(t).all() for t in finite.values())
    # The checkpoint's model folder loads, with the same weights (lr 1e30 made them huge, not NaN: the
    # NaN appears in the next forward, which is the step the error names).
    assert Embedder.from_pretrained(kept[0][1] / "model").dimension == 64
    assert max_diff(weights(kept[0][1] / "model"), finite) == 0


def test_periodic_evaluation_exports_the_best_model(tiny_qwen3_embedder, data_path, tmp_path):
    from embedforge import Embedder
    from embedforge.eval.retrieval import make_dev_evaluator

    rows = toy_rows(12, seed=5)
    queries = {f"q{i}": r["query"] for i, r in enumerate(rows)}
    corpus = {f"d{i}": r["positive"] for i, r in enumerate(rows)}
    qrels = {f"q{i}": {f"d{i}": 1} for i in range(len(rows))}
    evaluator = make_dev_evaluator((queries, corpus, qrels), instruction="Find the note")
    calls = []

    def recording(embedder):
        metrics = evaluator(embedder)
        calls.append(metrics["dev_ndcg_at_10"])
        return metrics

    cfg = config(tiny_qwen3_embedder, data_path, tmp_path / "out", max_steps=4, eval={"steps": 2})
    result = train(cfg, evaluator=recording)
    assert len(calls) == 2  # step 2 and the end (step 4)
    assert result.best_metric == max(calls)
    best = tmp_path / "out" / "best"
    info = json.loads((best / "embedforge_train.json").read_text())
    assert info["metrics"]["dev_ndcg_at_10"] == max(calls)
    again = evaluator(Embedder.from_pretrained(best))["dev_ndcg_at_10"]
    assert again == max(calls)  # the same weights (safetensors is exact) and inputs: the same ranking, bitwise
    evals = [json.loads(line) for line in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()
             if "eval" in line]
    assert [e["step"] for e in evals] == [2, 4]

"""`embedforge train`: recipes validate, flags override the recipe, a run works from flags alone,
errors are one line with exit code 2, and the shipped tiny recipes train (LoRA reranker, bf16
embedding) into folders `Reranker` / `Embedder.from_pretrained` load."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from train_workers.precision import reorder_rtol, transformer_terms
from train_workers.toy_data import toy_rows, write_toy

from embedforge.cli import main
from embedforge.errors import ConfigError
from embedforge.train.cli import add_train_args, flags_to_config
from embedforge.train.config import load_train_config

RECIPES = Path(__file__).resolve().parents[1] / "recipes" / "tiny"


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_train_args(parser)
    return parser.parse_args(argv)


@pytest.mark.parametrize("recipe", sorted(RECIPES.glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_tiny_recipes_validate(recipe):
    cfg = load_train_config(recipe)
    assert cfg.max_steps and cfg.data and cfg.output_dir


def test_flags_and_set_override_the_recipe():
    args = parse([str(RECIPES / "embedding-qwen3-lora.yaml"), "--model", "m", "--data", "a.jsonl", "--data",
                  "b.parquet", "--output", "out", "--full", "--max-steps", "7", "--batch-size", "4", "--lr", "0.01",
                  "--set", "loss.temperature=0.05", "--set", "lora.rank=4"])
    cfg = load_train_config(args.recipe, overrides=args.overrides, flags=flags_to_config(args))
    assert (cfg.model, cfg.output_dir, cfg.method, cfg.max_steps, cfg.batch_size, cfg.lr) == ("m", "out", "full", 7,
                                                                                               4, 0.01)
    assert [d.path for d in cfg.data] == ["a.jsonl", "b.parquet"]
    assert cfg.loss.temperature == 0.05 and cfg.loss.matryoshka_dims == [64, 32, 16]  # the rest of the recipe stays
    assert cfg.lora.rank == 4 and cfg.mini_batch_size == 8
    flags_only = parse(["--model", "m", "--data", "t.jsonl", "--output", "o", "--task", "reranker", "--lora"])
    cfg = load_train_config(None, overrides=flags_only.overrides, flags=flags_to_config(flags_only))
    assert (cfg.task, cfg.method) == ("reranker", "lora")


def test_bad_recipe_keys_are_named(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("model: m\noutput_dir: o\ndata: [{path: x.jsonl, negatives: 3}]\nbatch_sise: 4\n")
    with pytest.raises(ConfigError) as err:
        load_train_config(path)
    assert "r.yaml: data.0.negatives: unknown key" in str(err.value)
    assert "r.yaml: batch_sise: unknown key" in str(err.value)


def test_cli_errors_are_one_line_with_exit_code_2(tmp_path, capsys, tiny_qwen3_embedder):
    assert main(["train", "--output", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "model: Field required" in err and "data: Field required" in err
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"query": "q"}) + "\n")
    assert main(["train", "--model", str(tiny_qwen3_embedder), "--data", str(bad), "--output", str(tmp_path / "o")]) == 2
    assert "bad.jsonl:1: field 'positive': missing field" in capsys.readouterr().err
    if not _installed("wandb"):
        code = main(["train", "--model", str(tiny_qwen3_embedder), "--data", str(bad), "--output", str(tmp_path / "o"),
                     "--set", "report_to=[wandb]"])
        assert code == 2 and "report_to: wandb is not installed" in capsys.readouterr().err


def _installed(name: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(name) is not None


def test_tiny_lora_reranker_recipe_trains_and_loads(tiny_qwen3_lm, tmp_path):
    from embedforge import Reranker

    data = write_toy(tmp_path / "pairs.jsonl", 24)
    out = tmp_path / "run"
    code = main(["train", str(RECIPES / "reranker-qwen3-lora.yaml"), "--model", str(tiny_qwen3_lm), "--data", data,
                 "--output", str(out), "--max-steps", "2", "--lr", "0.05", "--set", "save_steps=0",
                 "--set", "progress_bar=false", "--set", "max_length=96"])
    assert code == 0
    row = toy_rows(1, seed=9)[0]
    docs = [row["positive"], *row["negatives"]]
    final = Reranker.from_pretrained(out / "final", max_length=96)
    trained = final.score(row["query"], docs)
    base = Reranker.from_pretrained(tiny_qwen3_lm, max_length=96).score(row["query"], docs)
    adapter = Reranker.from_pretrained(out / "final" / "adapter", max_length=96).score(row["query"], docs)
    # Probabilities from two float32 forwards in different orders (merged weights against the adapter's
    # x W + (x A) B, rank 8 adds 8 terms), each pair tokenised with the reranker template:
    # train_workers/precision.py. Training must move the scores beyond that rounding.
    pairs = final.tokenize_pairs([row["query"]] * len(docs), docs, [None] * len(docs), max_length=96)
    atol = reorder_rtol(torch.float32, transformer_terms(pairs["input_ids"].shape[1], tiny_qwen3_lm) + 8)
    assert np.abs(trained - base).max() > atol
    assert np.allclose(trained, adapter, rtol=0, atol=atol)


def test_tiny_embedding_recipe_trains_in_bf16(tiny_qwen3_embedder, tmp_path):
    from embedforge import Embedder

    data = write_toy(tmp_path / "pairs.jsonl", 40)
    out = tmp_path / "run"
    code = main(["train", str(RECIPES / "embedding-qwen3-lora.yaml"), "--model", str(tiny_qwen3_embedder), "--data",
                 data, "--output", str(out), "--max-steps", "2", "--set", "mixed_precision=bf16",
                 "--set", "save_steps=0", "--set", "progress_bar=false"])
    assert code == 0
    losses = [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(losses) == 2 and all(np.isfinite(losses))
    vectors = Embedder.from_pretrained(out / "final").encode(["find alpha beta"])
    assert vectors.shape == (1, 64) and np.isfinite(vectors).all()


def test_wandb_writes_under_the_run_folder_and_the_run_ends_in_one_line(tiny_qwen3_embedder, tmp_path, monkeypatch,
                                                                        capsys):
    """wandb (offline) keeps its files in the run's output folder, not wherever the command was started."""
    pytest.importorskip("wandb")  # in the dev extra
    cwd = tmp_path / "started-here"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    data = write_toy(tmp_path / "pairs.jsonl", 16)
    out = tmp_path / "run"
    assert main(["train", "--model", str(tiny_qwen3_embedder), "--data", str(data), "--output", str(out),
                 "--max-steps", "2", "--batch-size", "4", "--set", "report_to=[jsonl, wandb]"]) == 0
    assert list((out / "wandb").glob("offline-run-*")), sorted(p.name for p in out.iterdir())
    assert not any(cwd.iterdir())
    captured = capsys.readouterr()
    assert (captured.out + captured.err).count("embedforge train: 2 steps; model in") == 1  # one final line

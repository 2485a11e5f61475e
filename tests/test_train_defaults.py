"""Settings chosen from the model and the data (train/defaults.py), loss presets, and the collapse
guard (train/health.py): each rule against the numbers it must produce, and the guard against a
backbone that cannot tell texts apart (it must fire) and one that learns (it must not)."""

from __future__ import annotations

import json
import math

import pytest
import torch
from train_workers.toy_data import config, write_toy

from embedforge.errors import ConfigError
from embedforge.train.config import LOSS_PRESETS, TrainConfig
from embedforge.train.defaults import LR_BY_METHOD, resolve
from embedforge.train.health import CollapseGuard
from embedforge.train.trainer import train


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)


def _cfg(**values) -> TrainConfig:
    return TrainConfig.model_validate({"model": "m", "data": [{"path": "d.jsonl"}], "output_dir": "o", **values})


def _resolve(cfg, parameters=22_000_000, sizes=None, world=1):
    sizes = sizes or {"d": 1000}
    return resolve(cfg, parameters=parameters, source_sizes=sizes, world=world,
                   batches_per_epoch=lambda b: sum(n // b for n in sizes.values()))


def test_method_auto_is_full_up_to_the_threshold_and_lora_above():
    cfg = _cfg()
    assert cfg.method == "auto" and cfg.lr is None
    small, _, why = _resolve(cfg, parameters=135_000_000)
    assert (small.method, small.lr) == ("full", 2e-5)  # full fine-tuning from 100M parameters
    assert _resolve(cfg, parameters=22_000_000)[0].lr == LR_BY_METHOD["full"]
    large, _, _ = _resolve(cfg, parameters=cfg.full_max_parameters + 1)
    assert (large.method, large.lr) == ("lora", LR_BY_METHOD["lora"])
    assert any(line.startswith("method full: 135M parameters") for line in why)
    explicit, _, why = _resolve(_cfg(method="lora", lr=3e-4), parameters=1000)
    assert (explicit.method, explicit.lr) == ("lora", 3e-4) and not any("method" in line for line in why)


def test_small_data_gets_min_steps_a_capped_batch_and_proportional_warmup():
    # 40 rows at batch 32: one epoch is 1 step; the rule plans min_steps (50) and 10% warmup.
    resolved, steps, why = _resolve(_cfg(), sizes={"synthetic": 40})
    assert (steps, resolved.max_steps, resolved.batch_size, resolved.warmup_steps) == (50, 50, 32, 5)
    assert any("min_steps" in line and "would be 1" in line for line in why)
    # 10 rows: the batch is capped to the data (rounded down to a multiple of 4 processes).
    resolved, _, why = _resolve(_cfg(), sizes={"a": 1000, "b": 10}, world=4)
    assert resolved.batch_size == 8 and any("capped from 32 to the 10 rows of dataset 'b'" in line for line in why)
    # Enough data: epochs decide; max_steps always wins.
    _, steps, _ = _resolve(_cfg(epochs=2), sizes={"d": 3200})
    assert steps == math.ceil(2 * 3200 / 32)
    _, steps, _ = _resolve(_cfg(max_steps=7, warmup_steps=0), sizes={"d": 40})
    assert steps == 7
    with pytest.raises(ConfigError, match="too few"):
        _resolve(_cfg(), sizes={"d": 3}, world=4)


def test_loss_presets_fill_only_what_the_recipe_leaves_open():
    default = _cfg().loss
    assert (default.preset, default.terms, default.margin, default.temperature) == ("infonce", ["hard", "qd"], None,
                                                                                    0.05)
    qwen3 = _cfg(loss={"preset": "qwen3"}).loss
    assert (qwen3.terms, qwen3.margin, qwen3.temperature) == (["hard", "qq", "dd", "qd"], 0.1, 0.1)
    mixed = _cfg(loss={"preset": "qwen3", "temperature": 0.05, "margin": None}).loss
    assert (mixed.terms, mixed.margin, mixed.temperature) == (LOSS_PRESETS["qwen3"]["terms"], None, 0.05)
    # A dumped config reloads to the same settings (train_config.json, checkpoints).
    assert TrainConfig.model_validate(_cfg(loss={"preset": "qwen3"}).model_dump()).loss == qwen3


def _record(pos, neg, loss, chance):
    return {"loss": loss, "pos_sim": pos, "neg_sim": neg, "chance_loss": chance}


def test_guard_flags_converged_similarities_once_and_loss_at_chance():
    guard = CollapseGuard(causes=["pooling at X"], window=3)
    assert guard.update(1, _record(0.99, 0.985, 3.8, 3.83)) == []  # one step is no signature
    assert guard.update(2, _record(0.99, 0.985, 3.8, 3.83)) == []
    fired = guard.update(3, _record(0.99, 0.985, 3.8, 3.83))
    assert len(fired) == 1 and "collapsed by step 3" in fired[0] and "Likely cause: pooling at X" in fired[0]
    assert guard.update(4, _record(0.99, 0.99, 3.8, 3.83)) == []  # said once
    final = guard.finish(4)
    assert len(final) == 1 and final[0].startswith("loss at chance after 4 steps")
    # Matryoshka stats carry a width suffix: the widest one is read.
    wide = CollapseGuard(window=1)
    assert wide.update(1, {"loss@8": 1.0, "pos_sim@64": 0.99, "neg_sim@64": 0.985, "chance_loss@64": 2.0,
                           "pos_sim@8": 0.2, "neg_sim@8": 0.1})


def test_guard_stays_quiet_on_a_learning_run_and_reports_no_step():
    guard = CollapseGuard(window=3)
    for step, (pos, neg, loss) in enumerate([(0.95, 0.80, 3.0), (0.93, 0.70, 2.0), (0.92, 0.60, 1.0)], 1):
        assert guard.update(step, _record(pos, neg, loss, 3.83)) == []
    assert guard.finish(3) == []
    assert CollapseGuard().finish(0) == ["training took no optimizer step: the model is the base model"]


def _constant_backbone(source, folder):
    """The tiny Qwen3 with every token embedding equal: every text embeds to the same vector."""
    from embedforge import Embedder

    embedder = Embedder.from_pretrained(source, dtype="float32", device="cpu")
    with torch.no_grad():
        table = embedder.model.get_input_embeddings().weight
        table.copy_(table[:1].expand_as(table))
    embedder.save_pretrained(folder)
    return folder


def test_trainer_warns_on_a_backbone_forced_to_collapse(tiny_qwen3_embedder, tmp_path):
    data = write_toy(tmp_path / "train.jsonl", 40)
    collapsed = _constant_backbone(tiny_qwen3_embedder, tmp_path / "constant")
    result = train(config(collapsed, data, tmp_path / "out", max_steps=6, lr=1e-6))
    assert any("embeddings collapsed" in w for w in result.warnings), result.warnings
    assert any(w.startswith("loss at chance") for w in result.warnings), result.warnings
    summary = json.loads((tmp_path / "out" / "train_result.json").read_text())
    assert summary["warnings"] == result.warnings and summary["output"] == result.final_dir


@pytest.mark.slow
def test_guard_is_quiet_when_a_real_encoder_learns(minilm, tmp_path):
    # Control for the test above (the random tiny Qwen3 is itself near-collapsed, pos 0.999 / neg
    # 0.998, so it cannot serve): MiniLM on the same toy rows separates positives from the start.
    data = write_toy(tmp_path / "train.jsonl", 40)
    healthy = train(config(minilm, data, tmp_path / "ok", max_steps=6, lr=5e-5))
    assert healthy.warnings == [], healthy.warnings
    assert healthy.last_metrics["pos_sim"] - healthy.last_metrics["neg_sim"] > 0.1


def test_a_dataset_smaller_than_the_batch_trains_with_the_batch_capped(tiny_qwen3_embedder, tmp_path):
    # Before: an InputError ("smaller than one batch"). Now the batch shrinks to the data and says so.
    small = write_toy(tmp_path / "small.jsonl", 3)
    result = train(config(tiny_qwen3_embedder, small, tmp_path / "a", max_steps=None, min_steps=4))
    assert result.steps == 4 == result.total_steps
    assert any("capped from 4 to the 3 rows" in line for line in result.decisions)
    recorded = json.loads((tmp_path / "a" / "train_config.json").read_text())
    assert (recorded["batch_size"], recorded["max_steps"], recorded["warmup_steps"]) == (3, 4, 0)  # 10%, rounded down


def test_a_language_model_is_pooled_at_its_last_real_token_and_an_embedder_as_it_declares(
        tiny_qwen3_embedder_noeos, tmp_path):
    from embedforge import Embedder

    data = write_toy(tmp_path / "train.jsonl", 8)
    lm = train(config(tiny_qwen3_embedder_noeos, data, tmp_path / "lm", max_steps=1))
    assert "pooling at the last real token (a language model that is not an embedder yet" in " ".join(lm.decisions)
    saved = json.loads((tmp_path / "lm" / "final" / "embedforge.json").read_text())
    assert saved["append_eos"] is False
    forced = train(config(tiny_qwen3_embedder_noeos, data, tmp_path / "eos", max_steps=1, append_eos=True))
    assert "pooling at the appended '<|endoftext|>' (append_eos)" in forced.decisions
    # A folder saved as an embedder (sentence-transformers layout, EOS pooling) keeps its convention.
    embedder_folder = Embedder.from_pretrained(tiny_qwen3_embedder_noeos).save_pretrained(tmp_path / "embedder")
    kept = train(config(embedder_folder, data, tmp_path / "kept", max_steps=1))
    assert "pooling at the appended '<|endoftext|>' (as the embedder folder declares)" in kept.decisions


def test_cli_prints_decisions_and_warnings_and_strict_fails_on_them(tiny_qwen3_embedder, tmp_path, capsys):
    from embedforge.cli import main

    data = write_toy(tmp_path / "train.jsonl", 40)
    collapsed = _constant_backbone(tiny_qwen3_embedder, tmp_path / "constant")
    flags = ["--model", str(collapsed), "--data", data, "--full", "--max-steps", "6", "--lr", "1e-6",
             "--set", "save_steps=0", "--set", "progress_bar=false"]
    assert main(["train", *flags, "--output", str(tmp_path / "a")]) == 0
    err = capsys.readouterr().err
    assert "chose 6 steps: max_steps" in err and "WARNING: embeddings collapsed" in err
    # --strict fails like every other command's (exit 2, one line); before: exit 3.
    assert main(["train", *flags, "--output", str(tmp_path / "b"), "--strict"]) == 2
    assert "error: stopped by --strict: 2 warning(s), the first: embeddings collapsed" in capsys.readouterr().err

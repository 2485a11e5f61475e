"""Merging real (tiny, random) Qwen3 checkpoints and LoRA runs, checked with transformers and peft."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from embedforge.errors import InputError
from embedforge.merge import MergeConfig
from embedforge.merge import merge as merge_checkpoints

torch.set_num_threads(1)
INPUT_IDS = torch.tensor([[151643, 9707, 11, 1879, 0, 2585, 525, 498]])


def perturbed_copy(source: Path, target: Path, seed: int, scale: float = 0.02) -> Path:
    shutil.copytree(source, target)
    g = torch.Generator().manual_seed(seed)
    tensors = load_file(target / "model.safetensors")
    tensors = {k: v + scale * torch.randn(v.shape, generator=g) for k, v in tensors.items()}
    save_file(tensors, target / "model.safetensors", metadata={"format": "pt"})
    return target


def hidden(model) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=INPUT_IDS).last_hidden_state


@pytest.fixture(scope="module")
def tiny(tiny_qwen3_embedder):
    return Path(tiny_qwen3_embedder)


def test_merged_tiny_qwen3_loads_with_transformers(tiny, tmp_path):
    from transformers import AutoModel

    a = perturbed_copy(tiny, tmp_path / "a", 1)
    b = perturbed_copy(tiny, tmp_path / "b", 2)
    out = tmp_path / "merged"
    merge_checkpoints(
        MergeConfig(
            models=[a, b], base=tiny, t=0.5, output=out, show_progress=False, max_shard_bytes=8_000_000
        )
    )
    model = AutoModel.from_pretrained(out)
    on_disk = {}
    for file in out.glob("model-*.safetensors"):
        on_disk.update(load_file(file))
    state = model.state_dict()
    assert set(on_disk) == set(load_file(tiny / "model.safetensors"))
    for name, tensor in on_disk.items():
        assert torch.equal(state[name], tensor), name  # every merged tensor reached the model
    assert torch.isfinite(hidden(model)).all()
    from transformers import AutoTokenizer

    assert AutoTokenizer.from_pretrained(out).convert_tokens_to_ids("<|endoftext|>") == 151643


def train_lora(base: Path, adapter_dir: Path, seed: int, **lora_kwargs):
    """A few optimizer steps of a LoRA run; returns the trained (unmerged) peft model."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModel

    torch.manual_seed(seed)
    model = get_peft_model(AutoModel.from_pretrained(base), LoraConfig(**lora_kwargs))
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    target = torch.randn(1, INPUT_IDS.shape[1], model.config.hidden_size)
    for _ in range(3):
        loss = (model(input_ids=INPUT_IDS).last_hidden_state - target).pow(2).mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()
    model.save_pretrained(adapter_dir)
    return model


LORA = {
    "r": 4,
    "lora_alpha": 8,
    "target_modules": [
        "q_proj",
        "k_proj",
        "v_proj",
        "o_proj",
        "gate_proj",
        "up_proj",
        "down_proj",
        "embed_tokens",
    ],
    "rank_pattern": {"layers.1.self_attn.q_proj": 2},
    "alpha_pattern": {"v_proj": 3},
    "modules_to_save": ["norm"],
}


def test_lora_run_merged_into_its_base_equals_the_trained_model(tiny, tmp_path):
    from transformers import AutoModel

    trained = train_lora(tiny, tmp_path / "adapter", seed=0, **LORA)
    produced = hidden(trained)
    report = merge_checkpoints(
        MergeConfig(
            models=[tmp_path / "adapter"], method="linear", output=tmp_path / "merged", show_progress=False
        )
    )
    assert report.tensors == len(load_file(tiny / "model.safetensors"))
    merged = AutoModel.from_pretrained(tmp_path / "merged")
    torch.testing.assert_close(hidden(merged), produced, rtol=1e-5, atol=1e-5)
    base = AutoModel.from_pretrained(tiny)
    assert (hidden(base) - produced).abs().max() > 1e-3  # training moved the model away from its base

    # tensor by tensor against peft's own merge
    reference = trained.merge_and_unload().state_dict()
    ours = load_file(tmp_path / "merged" / "model.safetensors")
    base_tensors = load_file(tiny / "model.safetensors")
    changed = 0
    for name, tensor in ours.items():
        torch.testing.assert_close(tensor, reference[name], rtol=1e-6, atol=1e-6, msg=name)
        changed += not torch.equal(tensor, base_tensors[name])
    assert changed >= 2 * 7 + 1  # every targeted projection of both layers, and the embeddings


def test_rslora_and_prefixed_base_match_peft(tiny, tmp_path):
    """rsLoRA scaling (alpha / sqrt(r)), random non-zero B from init, and a base whose tensors carry
    a `model.` prefix the adapter lacks (an adapter trained on the backbone of a *ForCausalLM folder)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModel

    torch.manual_seed(3)
    config = LoraConfig(
        r=8, lora_alpha=4, use_rslora=True, init_lora_weights=False, target_modules=["o_proj", "up_proj"]
    )
    model = get_peft_model(AutoModel.from_pretrained(tiny), config)
    model.save_pretrained(tmp_path / "adapter")
    reference = model.merge_and_unload().state_dict()

    prefixed = tmp_path / "prefixed-base"
    shutil.copytree(tiny, prefixed)
    tensors = load_file(prefixed / "model.safetensors")
    save_file(
        {f"model.{k}": v for k, v in tensors.items()},
        prefixed / "model.safetensors",
        metadata={"format": "pt"},
    )
    merge_checkpoints(
        MergeConfig(
            models=[tmp_path / "adapter"],
            method="linear",
            lora_base=prefixed,
            output=tmp_path / "merged",
            show_progress=False,
        )
    )
    ours = load_file(tmp_path / "merged" / "model.safetensors")
    assert set(ours) == {f"model.{k}" for k in tensors}
    for name, tensor in reference.items():
        torch.testing.assert_close(ours[f"model.{name}"], tensor, rtol=1e-6, atol=1e-6, msg=name)
    assert not torch.equal(ours["model.layers.0.mlp.up_proj.weight"], tensors["layers.0.mlp.up_proj.weight"])


def test_two_lora_runs_merge_like_their_merged_checkpoints(tiny, tmp_path):
    """Slerp of deltas of two LoRA runs equals the same merge of the folders peft's merge produces."""
    folders = []
    for seed in (1, 2):
        trained = train_lora(
            tiny,
            tmp_path / f"adapter{seed}",
            seed=seed,
            r=4,
            lora_alpha=8,
            target_modules=["q_proj", "v_proj", "down_proj"],
        )
        trained.merge_and_unload().save_pretrained(tmp_path / f"full{seed}")
        folders.append(tmp_path / f"full{seed}")
    kwargs = {"base": tiny, "t": 0.4, "show_progress": False}
    from_adapters = merge_checkpoints(
        MergeConfig(models=[tmp_path / "adapter1", tmp_path / "adapter2"], output=tmp_path / "m1", **kwargs)
    )
    merge_checkpoints(MergeConfig(models=folders, output=tmp_path / "m2", **kwargs))
    first, second = (
        load_file(tmp_path / "m1" / "model.safetensors"),
        load_file(tmp_path / "m2" / "model.safetensors"),
    )
    for name in first:
        torch.testing.assert_close(first[name], second[name], rtol=1e-5, atol=1e-6, msg=name)
    # untouched tensors have zero deltas (slerp falls back), targeted ones do not
    assert 0.0 < from_adapters.slerp_fallback_fraction < 1.0


def test_unsupported_or_broken_adapters_are_refused(tiny, tmp_path):
    adapter = tmp_path / "dora"
    adapter.mkdir()
    config = {
        "peft_type": "LORA",
        "use_dora": True,
        "lora_alpha": 8,
        "r": 4,
        "base_model_name_or_path": str(tiny),
    }
    (adapter / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(InputError, match="use_dora is not supported.*merge_and_unload"):
        merge_checkpoints(
            MergeConfig(models=[adapter], method="linear", output=tmp_path / "o", show_progress=False)
        )
    config.update(use_dora=False, base_model_name_or_path="Qwen/not-on-this-machine")
    (adapter / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(InputError, match="not-on-this-machine.*--lora-base"):
        merge_checkpoints(
            MergeConfig(models=[adapter], method="linear", output=tmp_path / "o", show_progress=False)
        )
    config.update(base_model_name_or_path=str(tiny))
    (adapter / "adapter_config.json").write_text(json.dumps(config))
    save_file(
        {"base_model.model.layers.0.self_attn.q_proj.lora_A.weight": torch.zeros(4, 64)},
        adapter / "adapter_model.safetensors",
    )
    with pytest.raises(InputError, match="only one of its two LoRA matrices"):
        merge_checkpoints(
            MergeConfig(models=[adapter], method="linear", output=tmp_path / "o", show_progress=False)
        )
    save_file(
        {
            "base_model.model.layers.9.mlp.up_proj.lora_A.weight": torch.zeros(4, 64),
            "base_model.model.layers.9.mlp.up_proj.lora_B.weight": torch.zeros(192, 4),
        },
        adapter / "adapter_model.safetensors",
    )
    with pytest.raises(InputError, match="no matching tensor 'layers.9.mlp.up_proj.weight'"):
        merge_checkpoints(
            MergeConfig(models=[adapter], method="linear", output=tmp_path / "o", show_progress=False)
        )
    assert not (tmp_path / "o").exists()

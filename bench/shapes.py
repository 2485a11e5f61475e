"""Qwen3 backbones of real shapes with random weights, built locally from a config (no Hub), and
the floating-point work of a training step on them (for MFU).

Shapes from the released Qwen3-Embedding config.json files (shared/reference/qwen3-recipe.md):
the 0.6B has 28 layers, hidden 1024, 16 query / 8 key-value heads of 128, MLP 3072, 151,669
vocabulary rows and 595,776,512 parameters."""

from __future__ import annotations

import os
from pathlib import Path

QWEN3_VOCAB = 151_669
QWEN3_SHAPES = {
    "0.6B": {"hidden_size": 1024, "intermediate_size": 3072, "num_hidden_layers": 28, "num_attention_heads": 16,
             "num_key_value_heads": 8, "head_dim": 128},
    "tiny": {"hidden_size": 64, "intermediate_size": 192, "num_hidden_layers": 2, "num_attention_heads": 4,
             "num_key_value_heads": 2, "head_dim": 16},
}
# Dense bf16 tensor-core peaks from the vendor datasheets (no sparsity), for MFU.
PEAK_BF16_FLOPS = {"H100": 989.4e12, "H200": 989.4e12, "A100": 312e12, "L40S": 362.05e12, "GH200": 989.4e12}


def qwen3_config(shape: str):
    from transformers import Qwen3Config

    from embedforge.offline_models import QWEN3_FIRST_SPECIAL_ID

    return Qwen3Config(
        vocab_size=QWEN3_VOCAB, max_position_embeddings=32768, rope_theta=1_000_000.0, rms_norm_eps=1e-6,
        tie_word_embeddings=True, bos_token_id=QWEN3_FIRST_SPECIAL_ID, eos_token_id=QWEN3_FIRST_SPECIAL_ID,
        pad_token_id=QWEN3_FIRST_SPECIAL_ID, **QWEN3_SHAPES[shape])


def build_qwen3_embedder(out: str | os.PathLike, shape: str, *, device: str = "cpu", seed: int = 0) -> Path:
    """A sentence-transformers + embedforge folder: random `Qwen3Model` of `shape` (float32 on disk),
    the real Qwen3 BPE appending <|endoftext|>, last-token pooling. Reused when it exists."""
    import torch
    from transformers import Qwen3Model

    from embedforge import Embedder
    from embedforge.embedder import EmbedderSpec
    from embedforge.offline_models import build_qwen_tokenizer

    out = Path(out)
    if (out / "modules.json").exists():
        return out
    torch.manual_seed(seed)
    with torch.device(device):  # initialised where it will run: seconds on a GPU for 0.6B
        model = Qwen3Model(qwen3_config(shape))
    with torch.no_grad():  # a wider spread than 0.02, so random embeddings are not all alike
        model.get_input_embeddings().weight.normal_(0, 0.5)
    tokenizer = build_qwen_tokenizer(eos_postprocessor=True)
    tokenizer.padding_side = "left"
    Embedder(model, tokenizer, EmbedderSpec(max_length=8192)).save_pretrained(out)
    return out


def non_embedding_parameters(config) -> int:
    """Parameters that do matrix work per token (the embedding lookup does none; no LM head)."""
    h, i, layers = config.hidden_size, config.intermediate_size, config.num_hidden_layers
    q, kv = config.num_attention_heads * config.head_dim, config.num_key_value_heads * config.head_dim
    per_layer = h * q + 2 * h * kv + q * h + 3 * h * i + 2 * h + 2 * config.head_dim  # + RMSNorm weights
    return layers * per_layer + h


def training_flops(config, lengths) -> float:
    """Model FLOPs of one forward + backward over texts of these token lengths, PaLM's accounting
    (Chowdhery et al. 2022, app. B): 6·N per token plus 12·layers·heads·head_dim·T per token for
    attention, with T each text's own length (padding and GradCache's extra forward not counted)."""
    n = non_embedding_parameters(config)
    attention = 12 * config.num_hidden_layers * config.num_attention_heads * config.head_dim
    return float(sum(6 * n * s + attention * s * s for s in lengths))


def peak_flops(device_name: str) -> float | None:
    for key, value in sorted(PEAK_BF16_FLOPS.items(), key=lambda kv: -len(kv[0])):
        if key in device_name:
            return value
    return None

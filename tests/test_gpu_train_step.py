"""A bf16 + SDPA training step against the float32 reference, through the public `train` API.

One step of `embedforge.train.trainer.train` on the same batch (tiny Qwen3, real BPE, stdlib
docstring pairs) in float32, then in bf16 two ways: fp32 weights under bf16 autocast
(`mixed_precision: bf16`) and bf16 weights (`dtype: bfloat16`). Step 1's loss and gradient norm
are computed from the same initial weights, so they compare directly. The CUDA variants are the
GPU check's (`gpu` marker); the CPU variants run everywhere."""

from __future__ import annotations

import math

import pytest
import torch

BF16_U = 2.0**-9  # unit roundoff of bfloat16 (8 significant bits, round to nearest)
LAYERS = 2  # the tiny Qwen3 (embedforge.offline_models.build_tiny_qwen3)
# Each layer rounds the inputs of about 9 matrix products (q, k, v, o, gate, up, down, QK^T, PV);
# backward doubles the chain. Independent roundings add in quadrature; x4 of headroom.
BF16_TOL = 4 * BF16_U * math.sqrt(9 * LAYERS * 2)

# accelerate trains on the GPU when there is one: there, the cuda variant is the check
DEVICES = [pytest.param("cpu", marks=pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA present")),
           pytest.param("cuda", marks=pytest.mark.gpu)]


@pytest.fixture(scope="module")
def pairs():
    from embedforge.builtin_data import python_docstrings

    data = python_docstrings().real_queries
    qids = sorted(data.queries)[:32]
    docs = [data.corpus[next(iter(data.qrels[q]))] for q in qids]
    return [{"query": data.queries[q], "positive": d, "negatives": [docs[(i + 1) % len(docs)]]}
            for i, (q, d) in enumerate(zip(qids, docs))]


def one_step(folder, pairs, tmp_path, device: str, dtype: str, mixed_precision: str | None) -> dict:
    from embedforge.train.config import TrainConfig
    from embedforge.train.trainer import train

    cfg = TrainConfig.model_validate({
        "model": str(folder), "method": "full", "output_dir": str(tmp_path / f"{device}-{dtype}-{mixed_precision}"),
        "data": [{"path": "pairs", "num_negatives": 1}], "batch_size": 8, "max_steps": 1, "lr": 1e-5,
        "save_steps": 0, "max_length": 96, "dtype": dtype, "mixed_precision": mixed_precision,
        "attn_implementation": "sdpa", "max_grad_norm": 1.0, "progress_bar": False,
    })
    return train(cfg, inline_data={"pairs": pairs}).last_metrics


_REFERENCES: dict[str, dict] = {}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype,mixed_precision", [("float32", "bf16"), ("bfloat16", None)])
def test_bf16_sdpa_step_matches_float32(tiny_qwen3_embedder, pairs, tmp_path, device, dtype, mixed_precision):
    if device not in _REFERENCES:
        _REFERENCES[device] = one_step(tiny_qwen3_embedder, pairs, tmp_path, device, "float32", "no")
    reference = _REFERENCES[device]
    got = one_step(tiny_qwen3_embedder, pairs, tmp_path, device, dtype, mixed_precision)
    assert got["tokens"] == reference["tokens"]  # the same batch
    for key in ("loss", "grad_norm"):
        assert math.isfinite(got[key])
        assert abs(got[key] - reference[key]) <= BF16_TOL * abs(reference[key]), key
    if device == "cuda":  # the bf16 run really rounded somewhere
        assert got["grad_norm"] != reference["grad_norm"]

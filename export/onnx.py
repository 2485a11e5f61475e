"""ONNX files of an embedder: `onnx/model.onnx` (float32) and `onnx/model_qint8.onnx` (int8 dynamic
quantization of the same graph), in the layout sentence-transformers' ONNX backend and TEI's `ort`
backend read.

The graph maps (input_ids, attention_mask) to `last_hidden_state`; pooling and normalisation stay
outside it, in `1_Pooling` / `2_Normalize`, exactly as for the PyTorch weights, so every runtime
that pools a transformer's output pools this one alike. The TorchScript exporter is used: on
transformers' masked attention the dynamo exporter specialises the mask to the trace's shapes and
returns wrong vectors for other batches. The traced attention is transformers' eager one: the SDPA
path traces to a decomposition with a NaN guard per layer that onnxruntime ran at 0.67x PyTorch's
speed (MiniLM, 2 threads), the eager one to plain MatMul / Softmax.

Each file passes a parity gate before it is kept: vectors built from onnxruntime's output (pooled
and normalised as `Embedder` does) against `Embedder.encode` on the export's probe texts.
"""

from __future__ import annotations

import copy
import math
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F

from embedforge.errors import ConfigError
from embedforge.export.gate import PROBE_DOCUMENTS, PROBE_QUERIES, Check, close, default_tolerance
from embedforge.export.onnx_int8 import INT8_STEPS

if TYPE_CHECKING:
    from embedforge.embedder import Embedder

FOLDER = "onnx"
FILES = {"fp32": "model.onnx", "int8": "model_qint8.onnx"}
OPSET = 17
QUANTIZED_OPS = ("MatMulInteger",)
MAX_PROTOBUF_BYTES = 2**31 - 1
QUANTIZATION = ("int8 products (MatMulInteger): weights int8 per output column, activations int8 per token "
                "(dynamic), SmoothQuant channel scales (alpha 0.5); embeddings, norms and attention float")


@dataclass
class ExtraFiles:
    """What an extra export (ONNX, GGUF) adds to the folder: files, gate checks, card facts."""

    files: list[str] = field(default_factory=list)
    checks: list[Check] = field(default_factory=list)
    facts: dict[str, Any] = field(default_factory=dict)


class _LastHiddenState(torch.nn.Module):
    """The traced function: the backbone's last hidden state, nothing else."""

    def __init__(self, backbone: torch.nn.Module):
        super().__init__()
        self.backbone = backbone

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.backbone(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state


def require_onnx() -> None:
    # torch.onnx.export (dynamo) builds the graph with onnxscript
    missing = [name for name in ("onnx", "onnxscript", "onnxruntime") if _find(name) is None]
    if missing:
        raise ConfigError(f"ONNX export needs {', '.join(missing)}: pip install 'embedforge[onnx]'")


def _find(module: str):
    import importlib.util

    return importlib.util.find_spec(module)


def probe_texts(embedder: Embedder) -> list[str]:
    prompt = embedder.spec.prompts.get("query") or ""
    return [prompt + q for q in PROBE_QUERIES] + list(PROBE_DOCUMENTS)


def write_fp32(embedder: Embedder, path: Path) -> None:
    """Trace the backbone in float32 on a padded batch (so the masked-attention path is the one traced)."""
    backbone = embedder.model
    if next(backbone.parameters()).dtype != torch.float32:
        backbone = copy.deepcopy(backbone).float()
    features = embedder.tokenize(["hello", "a longer text, so that the batch needs padding"])
    inputs = (features["input_ids"].to(embedder.device), features["attention_mask"].to(embedder.device))
    axes = {"input_ids": {0: "batch", 1: "sequence"}, "attention_mask": {0: "batch", 1: "sequence"},
            "last_hidden_state": {0: "batch", 1: "sequence"}}
    import warnings

    attention = backbone.config._attn_implementation
    backbone.set_attn_implementation("eager")
    try:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # tracer warnings about Python branches on shapes, reviewed in the tests
            torch.onnx.export(_LastHiddenState(backbone).eval(), inputs, str(path),
                              input_names=["input_ids", "attention_mask"], output_names=["last_hidden_state"],
                              dynamic_axes=axes, opset_version=OPSET, dynamo=False)
    finally:
        backbone.set_attn_implementation(attention)


def write_int8(embedder: Embedder, source: Path, path: Path) -> int:
    """The int8 graph of `source` (per-token int8 products, SmoothQuant scales calibrated on texts the gate
    does not use; export/onnx_int8.py); returns the number of quantized products."""
    from embedforge.export.onnx_int8 import CALIBRATION_TEXTS, quantize_graph

    calibration = []
    for text in CALIBRATION_TEXTS:
        features = embedder.tokenize([text])
        calibration.append({"input_ids": features["input_ids"].numpy(),
                            "attention_mask": features["attention_mask"].numpy()})
    return quantize_graph(source, path, calibration)


def int8_tolerance(quantized_products: int) -> float:
    """Bound on max |diff| of unit vectors after int8 quantization of weights and activations.

    Each quantized product rounds both operands to 1/127 of a row's (activation) or column's (weight)
    range, a relative error of at most about 2/127 on its output; independent errors of n products on the path add in quadrature, so the
    output vector moves by at most ~2 sqrt(n) / 127 of its norm, and no coordinate of a unit vector
    moves by more than the whole vector's error.
    """
    return 2.0 * math.sqrt(max(quantized_products, 1)) / INT8_STEPS


def onnx_vectors(path: Path, embedder: Embedder, texts: list[str], *, one_by_one: bool = False) -> np.ndarray:
    """Vectors from an ONNX file run by plain onnxruntime, pooled and normalised as `Embedder` does:
    all texts in one padded batch, or each alone."""
    import onnxruntime as ort

    from embedforge.pooling import pool

    options = ort.SessionOptions()
    options.intra_op_num_threads = max(1, torch.get_num_threads())
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    vectors = []
    for batch in ([[t] for t in texts] if one_by_one else [texts]):
        features = embedder.tokenize(batch)
        hidden = session.run(["last_hidden_state"], {"input_ids": features["input_ids"].numpy(),
                                                     "attention_mask": features["attention_mask"].numpy()})[0]
        pooled = pool(torch.from_numpy(hidden), features["attention_mask"], embedder.spec.pooling)
        vectors.append(F.normalize(pooled.float(), dim=-1).numpy())
    return np.concatenate(vectors)


def both_ways(path: Path, embedder: Embedder, texts: list[str]) -> np.ndarray:
    """Batched and one-by-one vectors stacked: the gate holds both against the reference, so a file
    whose vectors depend on their batch cannot pass."""
    return np.concatenate([onnx_vectors(path, embedder, texts), onnx_vectors(path, embedder, texts, one_by_one=True)])


def parity(name: str, got: np.ndarray, want: np.ndarray, tolerance: float, detail: str) -> tuple[Check, dict]:
    check = close(name, got, want, tolerance, detail)
    cosine = float(np.min(np.sum(got.astype(np.float64) * want.astype(np.float64), axis=1)))
    return check, {"max_abs_diff": check.max_abs_diff, "min_cosine": cosine, "tolerance": tolerance}


def export_onnx(embedder: Embedder, folder: Path, precisions: list[str]) -> ExtraFiles:
    """Write `onnx/model.onnx` and/or `onnx/model_qint8.onnx` into `folder` and gate them."""
    require_onnx()
    out = Path(folder) / FOLDER
    out.mkdir(exist_ok=True)
    texts = probe_texts(embedder)
    want = embedder.encode(texts, batch_size=len(texts))
    result = ExtraFiles()
    fp32 = out / FILES["fp32"]
    scratch = None
    if "fp32" not in precisions:  # int8 alone: quantize from a float graph that is not kept
        scratch = Path(tempfile.mkdtemp(prefix=".onnx-", dir=folder))
        fp32 = scratch / FILES["fp32"]
    try:
        write_fp32(embedder, fp32)
        if fp32.stat().st_size > MAX_PROTOBUF_BYTES:
            raise ConfigError(f"{fp32}: the graph exceeds 2 GB; ONNX export of models this large is not supported")
        if "fp32" in precisions:
            tolerance = default_tolerance(torch.float32)
            check, facts = parity("onnx_fp32_parity", both_ways(fp32, embedder, texts), np.concatenate([want, want]),
                                  tolerance, "onnxruntime(onnx/model.onnx) + pooling + L2 norm vs Embedder.encode, "
                                  "batched and one by one")
            result.checks.append(check)
            result.facts["fp32"] = {"file": f"{FOLDER}/{FILES['fp32']}", "bytes": fp32.stat().st_size, **facts}
            result.files.append(f"{FOLDER}/{FILES['fp32']}")
        if "int8" in precisions:
            int8 = out / FILES["int8"]
            products = write_int8(embedder, fp32, int8)
            tolerance = int8_tolerance(products)
            check, facts = parity("onnx_int8_parity", both_ways(int8, embedder, texts), np.concatenate([want, want]),
                                  tolerance, f"onnxruntime(onnx/model_qint8.onnx, {products} int8 products) vs "
                                  "Embedder.encode, batched and one by one")
            result.checks.append(check)
            result.facts["int8"] = {"file": f"{FOLDER}/{FILES['int8']}", "bytes": int8.stat().st_size,
                                    "quantization": QUANTIZATION,
                                    "quantized_products": products, **facts}
            result.files.append(f"{FOLDER}/{FILES['int8']}")
    finally:
        if scratch is not None:
            for path in scratch.iterdir():
                os.unlink(path)
            scratch.rmdir()
    result.checks += sentence_transformers_onnx_checks(embedder, folder, result.facts, texts, want)
    return result


def sentence_transformers_onnx_checks(embedder: Embedder, folder: Path, facts: dict[str, Any], texts: list[str],
                                      want: np.ndarray) -> list[Check]:
    """`SentenceTransformer(folder, backend="onnx")`, where its ONNX backend (optimum) is installed."""
    if _find("optimum") is None or _find("sentence_transformers") is None:
        return []
    from sentence_transformers import SentenceTransformer

    checks = []
    prompt = embedder.spec.prompts.get("query")
    for precision, info in facts.items():
        model = SentenceTransformer(str(folder), backend="onnx", device="cpu",
                                    model_kwargs={"file_name": info["file"]})
        queries = model.encode(list(PROBE_QUERIES), prompt_name="query" if prompt else None)
        documents = model.encode(list(PROBE_DOCUMENTS))
        checks.append(close(f"sentence_transformers_onnx_{precision}", np.concatenate([queries, documents]), want,
                            info["tolerance"], f"SentenceTransformer(export, backend='onnx', file_name={info['file']})"))
    return checks

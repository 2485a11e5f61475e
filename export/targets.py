"""Which serving engines load which export, read from the engines' own source.

The export checks sentence-transformers, transformers and onnxruntime by running them (the gate);
vLLM and TEI are not installable beside this project's pins, so their rows state what their source
does with the files we write, and where in the source that is decided. Rows are facts about the
engines, so they live here once and feed the model card, `export_report.json` and the README.

Sources read:
- TEI: huggingface/text-embeddings-inference @ 0d124dc (2026-07-24): `backends/candle/src/lib.rs`
  (which architectures start on which device), `backends/candle/src/models/{qwen3,flash_qwen3,
  flash_mistral}.rs` (classifier refused), `backends/ort/src/lib.rs` (ONNX: float32 only,
  `onnx/model.onnx`, `last_hidden_state` + the pooling of `1_Pooling`).
- vLLM: `vllm/model_executor/models/adapters.py` (`as_embedding_model`, `as_seq_cls_model`,
  `SequenceClassificationConfig`: `method` + `classifier_from_token` on any `*ForCausalLM`) and
  `vllm/model_executor/models/config.py` (`Qwen3ForSequenceClassificationConfig`:
  `is_original_qwen3_reranker` sets `method = from_2_way_softmax`, for Qwen3 only).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

YES, NO, PARTLY = "yes", "no", "partly"


@dataclass(frozen=True)
class Target:
    engine: str
    loads: str  # yes / no / partly
    how: str
    evidence: str  # "checked on export" or the source location that decides it


CHECKED = "checked on export (export_report.json)"
TEI_LIB = "TEI backends/candle/src/lib.rs"


def _tei_embedder(model_type: str) -> Target:
    if model_type == "qwen3":
        return Target("Text Embeddings Inference", YES, "CPU and CUDA images (Qwen3Model / FlashQwen3Model), "
                      "pooling from 1_Pooling", f"{TEI_LIB}: Config::Qwen3 arms")
    if model_type in ("llama", "mistral", "qwen2"):
        return Target("Text Embeddings Inference", PARTLY, f"CUDA image only, fp16, flash attention; the CPU "
                      f"image refuses {model_type} (\"only supported on Cuda devices in fp16 with flash attention\")",
                      f"{TEI_LIB}: Config::{model_type.capitalize()} on Device::Cpu")
    if model_type in ("bert", "roberta", "xlm-roberta", "distilbert", "mpnet", "modernbert", "nomic_bert", "gte"):
        return Target("Text Embeddings Inference", YES, "CPU and CUDA images", f"{TEI_LIB}: Config::{model_type}")
    return Target("Text Embeddings Inference", NO, f"no TEI backend for model_type {model_type!r}", TEI_LIB)


def embedder_targets(model_type: str, *, decoder: bool, onnx: list[str], gguf: list[str]) -> list[Target]:
    """Engines for an embedder folder (sentence-transformers layout) and its extra files."""
    rows = [
        Target("sentence-transformers", YES, "`SentenceTransformer(repo)`, prompts from config_sentence_transformers",
               CHECKED),
        Target("transformers", YES, "`AutoModel` + the pooling in the usage snippet", CHECKED),
        Target("vLLM", YES if decoder else PARTLY,
               "`vllm serve REPO --runner pooling`: `*ForCausalLM` becomes an embedding model, pooling and "
               "normalisation from modules.json / 1_Pooling; prompts are not applied"
               if decoder else "encoder embedders load where vLLM implements the architecture (BERT: yes)",
               "vLLM model_executor/models/adapters.py: as_embedding_model"),
        _tei_embedder(model_type),
    ]
    if "fp32" in onnx:
        rows.append(Target("onnxruntime / sentence-transformers ONNX backend", YES,
                           "`onnx/model.onnx` (float32): input_ids, attention_mask -> last_hidden_state", CHECKED))
        rows.append(Target("Text Embeddings Inference (ONNX / ort backend)", YES,
                           "`onnx/model.onnx`, float32 only; reads last_hidden_state and pools as 1_Pooling says",
                           "TEI backends/ort/src/lib.rs: new() (dtype, onnx path), embed() (last_hidden_state)"))
    if "int8" in onnx:
        rows.append(Target("onnxruntime / sentence-transformers ONNX backend (int8)", YES,
                           "`onnx/model_qint8.onnx`: pass file_name; TEI's ort backend loads only model.onnx",
                           CHECKED))
    if gguf:
        rows.append(Target("llama.cpp / Ollama", YES if decoder else NO,
                           f"GGUF ({', '.join(gguf)}): last-token pooling and the appended EOS are in the metadata "
                           "(`pooling_type`, `add_eos_token`)", "checked on export by a reference forward from "
                           "the GGUF tensors (see export_report.json)"))
    return rows


def reranker_targets(model_type: str, fmt: str) -> list[Target]:
    """Engines for a reranker folder in the given format."""
    tei_refusal = {
        "qwen3": "TEI backends/candle/src/models/qwen3.rs:412 and flash_qwen3.rs:315: "
                 "\"`classifier` model type is not supported for Qwen3\"",
        "llama": "TEI backends/candle/src/lib.rs (Llama on CPU refused) and flash_mistral.rs:252: "
                 "\"`classifier` model type is not supported for Mistral\"",
    }.get(model_type, "TEI backends/candle/src/lib.rs")
    instead = "use vLLM (`/rerank`, `/score`) or sentence-transformers' CrossEncoder instead"
    if fmt == "seq-cls":
        return [
            Target("sentence-transformers CrossEncoder", YES, "`CrossEncoder(repo).predict(pairs)`", CHECKED),
            Target("transformers", YES, "`AutoModelForSequenceClassification`, sigmoid of the one logit", CHECKED),
            Target("vLLM", YES, "`vllm serve REPO --runner pooling` + `--chat-template` with the downloaded "
                   "chat_template.jinja (else send the template pieces)", "vLLM model_executor/models/adapters.py: "
                   "as_seq_cls_model"),
            Target("Text Embeddings Inference", NO if model_type in ("qwen3", "llama", "mistral") else PARTLY,
                   f"TEI refuses decoder classifiers; {instead}", tei_refusal),
        ]
    return [
        Target("sentence-transformers CrossEncoder", YES, "loads the causal LM, scored by LogitScore(yes, no)",
               CHECKED),
        Target("transformers", YES, "`AutoModelForCausalLM`, softmax over the (no, yes) logits", CHECKED),
        Target("vLLM", YES, "`--hf-overrides` from reranker_template.json (method from_2_way_softmax)",
               "vLLM model_executor/models/adapters.py: SequenceClassificationConfig, "
               "load_weights_using_from_2_way_softmax"),
        Target("Text Embeddings Inference", NO, f"TEI serves no causal-LM rerankers; {instead}", tei_refusal),
    ]


def as_rows(targets: list[Target]) -> list[dict[str, str]]:
    return [asdict(t) for t in targets]

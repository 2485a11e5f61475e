"""The stages of `embedforge run`: each fills the wiring of its recipe section (input and output
paths, the backbone) and calls the stage's own Python function with that one config.

A recipe section is the stage's config class, so every option, check and error message is the
stage's own; these functions only connect outputs to inputs and return the stage's typed outcome.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any

from pydantic import BaseModel, Field

from embedforge.errors import EmbedforgeError, InputError
from embedforge.io import iter_jsonl, write_jsonl
from embedforge.offline_models import public_name
from embedforge.outcome import StageOutcome
from embedforge.provenance import read_provenance, write_provenance
from embedforge.recipe import Recipe


def _progress(section: BaseModel) -> bool:
    """A progress bar where a person watches (stderr is a terminal), else log lines; a recipe may say."""
    return section.progress if "progress" in section.model_fields_set else sys.stderr.isatty()


def section_config(section: BaseModel, config_cls: type[BaseModel], **wiring: Any) -> Any:
    """The stage config inside a recipe section, without the pipeline's own switches, plus wiring."""
    pipeline_only = set(type(section).model_fields) - set(config_cls.model_fields)
    values = section.model_dump(exclude=pipeline_only, exclude_unset=True)
    return config_cls.model_validate({**values, **wiring})


# --- corpus -------------------------------------------------------------------------------------


class CorpusOutcome(StageOutcome):
    passages: int
    generator_passages: int
    real_queries: str | None = None
    real_query_count: int = 0
    covered_queries: str | None = None
    covered_query_count: int = 0


def corpus_stage(recipe: Recipe, inputs: dict[str, str], out: Path) -> CorpusOutcome:
    """Passages for search and mining (all of them), passages for the generator (`max_passages`
    spread over the corpus), and the corpus's real queries as a BEIR folder when it has any."""
    from embedforge.builtin_data import load_builtin_corpus, spread
    from embedforge.data_synth.corpus import load_corpus
    from embedforge.eval.beir import BeirData, write_beir

    source, sample = recipe.corpus.path, recipe.corpus.sample
    real = real_queries = None
    if source.startswith("builtin:"):
        corpus = load_builtin_corpus(source)
        corpus = corpus.sample(sample) if sample else corpus
        passages = list(corpus.passages.items())
        description = corpus.description
        real_queries = corpus.real_queries
    else:
        chunks = load_corpus(source, chunk_tokens=recipe.corpus.chunk_tokens, overlap=recipe.corpus.overlap)
        passages = spread([(p.id, p.text) for p in chunks], sample) if sample else [(p.id, p.text) for p in chunks]
        description = source
    if not passages:
        raise InputError("the corpus holds no passages", path=source)
    if real_queries is not None:
        real = write_beir(out / "real-queries", real_queries, overwrite=True)
    write_jsonl(out / "passages.jsonl", ({"id": pid, "text": text} for pid, text in passages))
    chosen = spread(passages, recipe.corpus.max_passages) if recipe.corpus.max_passages else passages
    write_jsonl(out / "generator-passages.jsonl", ({"id": pid, "text": text} for pid, text in chosen))
    covered = None
    if real_queries is not None:  # the real queries of the generator's passages, searched over all passages
        given = {pid for pid, _ in chosen}
        qrels = {q: docs for q, docs in real_queries.qrels.items() if docs and set(docs) <= given}
        covered = write_beir(out / "covered-queries", BeirData({q: real_queries.queries[q] for q in qrels},
                                                               real_queries.corpus, qrels,
                                                               source=real_queries.source), overwrite=True)
    write_provenance(out, [], "corpus", source=source, description=description, passages=len(passages),
                     generator_passages=len(chosen),
                     real_queries=len(real_queries.queries) if real is not None else 0)
    return CorpusOutcome(output=str(out / "passages.jsonl"), passages=len(passages),
                         generator_passages=len(chosen), real_queries=str(real) if real else None,
                         real_query_count=len(real_queries.queries) if real is not None else 0,
                         covered_queries=str(covered) if covered else None,
                         covered_query_count=len(qrels) if covered else 0)



# --- data: synth, filter, split, mine -------------------------------------------------------------


def synth_stage(recipe: Recipe, inputs: dict[str, str], out: Path) -> StageOutcome:
    from embedforge.data_synth import SynthConfig, synthesize

    config = section_config(recipe.synth, SynthConfig, corpus=inputs["passages"], output=str(out / "work"),
                            model=recipe.synth.model or recipe.model, chunk_tokens=None, overlap=0,
                            progress=_progress(recipe.synth))
    outcome = synthesize(config)
    if outcome.pending:
        raise EmbedforgeError(f"synth: {outcome.pending} passages pending after transport failures; rerun to resume")
    return outcome


def filter_stage(recipe: Recipe, inputs: dict[str, str], out: Path) -> StageOutcome:
    from embedforge.data_synth import FilterConfig, filter_pairs

    eval_sets = [s for s in json.loads(inputs.get("eval_sets", "[]"))]
    config = section_config(recipe.filter, FilterConfig, input=[inputs["pairs"]], output=str(out / "work"),
                            teacher=recipe.filter.teacher or recipe.model, overwrite=True,
                            eval_sets=[*recipe.filter.eval_sets, *eval_sets])
    return filter_pairs(config)


class SplitOutcome(StageOutcome):
    train_pairs: int
    heldout: str
    heldout_queries: int


def split_stage(recipe: Recipe, inputs: dict[str, str], out: Path) -> SplitOutcome:
    """Hold out every synthetic query of a random subset of passages as an extra, SYNTHETIC
    evaluation set: those queries never reach training; their passages stay in the search corpus."""
    from embedforge.eval.beir import BeirData, write_beir

    rows = [row for _, row in iter_jsonl(inputs["pairs"]) if row.get("task", "retrieval") == "retrieval"]
    if not rows:
        raise InputError("no retrieval pairs to split", path=inputs["pairs"])
    corpus = {row["id"]: row["text"] for _, row in iter_jsonl(inputs["passages"])}
    ids = {text: pid for pid, text in corpus.items()}
    by_positive: dict[str, list[dict]] = defaultdict(list)
    for row in rows:
        by_positive[row["positive"]].append(row)
    positives = sorted(by_positive)
    random.Random(recipe.split.seed).shuffle(positives)
    n_held = max(1, round(len(positives) * recipe.split.heldout_fraction))
    held, train = positives[:n_held], positives[n_held:]
    if not train:
        raise InputError(f"only {len(positives)} passages have pairs: nothing left to train on", path=inputs["pairs"])
    for text in held:
        if text not in ids:  # a positive that is not a corpus passage joins the search corpus
            ids[text] = f"extra-{len(corpus)}"
            corpus[ids[text]] = text
    queries, qrels = {}, {}
    for text in held:
        for row in by_positive[text]:
            qid = f"q{len(queries)}"
            queries[qid], qrels[qid] = row["query"], {ids[text]: 1}
    heldout = write_beir(out / "heldout", BeirData(queries, corpus, qrels, source="synthetic held-out queries"),
                         overwrite=True)
    train_rows = [row for text in train for row in by_positive[text]]
    write_jsonl(out / "train.jsonl", train_rows)
    write_provenance(out, read_provenance(inputs["pairs"]), "split", heldout_passages=len(held),
                     heldout_queries=len(queries), train_pairs=len(train_rows))
    return SplitOutcome(output=str(out / "train.jsonl"), train_pairs=len(train_rows), heldout=str(heldout),
                        heldout_queries=len(queries))


def mine_stage(recipe: Recipe, inputs: dict[str, str], out: Path) -> StageOutcome:
    from embedforge.data_synth import MineConfig, mine

    config = section_config(recipe.mine, MineConfig, data=[inputs["train"]], corpus=inputs["passages"],
                            output=str(out / "work"), model=recipe.mine.model or recipe.model,
                            progress=_progress(recipe.mine))
    return mine(config)


# --- models: base, train, merge, export -----------------------------------------------------------


def base_stage(recipe: Recipe, inputs: dict[str, str], out: Path) -> StageOutcome:
    """The untrained backbone in the layout the trainer writes, for merging and evaluation."""
    from embedforge.io import atomic_dir

    folder = out / "model"
    with atomic_dir(folder, overwrite=True) as tmp:  # a killed save leaves no folder that loads
        if recipe.task == "embedding":
            from embedforge.embedder import Embedder

            Embedder.from_pretrained(recipe.model, dtype="float32").save_pretrained(
                tmp, default_instruction=recipe.instruction)
        else:
            from embedforge.reranker import Reranker

            Reranker.from_pretrained(recipe.model, dtype="float32").save_pretrained(tmp)
        write_provenance(tmp, [], "base", model=public_name(recipe.model))
    return StageOutcome(output=str(folder))


class TrainStageOutcome(StageOutcome):
    steps: int = 0
    checkpoints: list[str] = Field(default_factory=list)
    final_metrics: dict[str, float] = Field(default_factory=dict)


def train_stage(recipe: Recipe, inputs: dict[str, str], out: Path) -> TrainStageOutcome:
    from embedforge.train.config import TrainConfig

    section = recipe.train
    data = [d.model_dump() for d in section.data]
    if "train" in inputs:
        data.append({"path": inputs["train"], "name": "synthetic", "instruction": recipe.instruction})
    config = section_config(section, TrainConfig, model=recipe.model, task=recipe.task, data=data,
                            output_dir=str(out / "work"))
    if section.launch is not None and (section.launch.num_processes > 1 or section.launch.config_file):
        result = _launch_training(config, section.launch, out)
    else:
        from embedforge.train.trainer import train

        result = train(config)
    if getattr(result, "interrupted", False):
        raise EmbedforgeError(f"train: stopped at step {result.steps}; rerun to resume from its checkpoint")
    work = out / "work"
    checkpoints = sorted((str(p / "model") for p in work.glob("checkpoint-*")
                          if (p / "COMPLETE").exists() and (p / "model").is_dir()),
                         key=lambda path: int(Path(path).parent.name.split("-")[-1]))
    final = work / "final"
    trail = read_provenance(*(inputs.get("train"),))
    write_provenance(final, trail, "train", base_model=public_name(recipe.model),
                     config=config.model_dump(mode="json", exclude={"data"}),
                     data=[{k: v for k, v in d.items() if k != "path"} for d in data],
                     steps=result.steps, final_metrics=_numbers(result.last_metrics),
                     decisions=list(result.decisions), warnings=list(result.warnings))
    outcome = TrainStageOutcome(output=str(final), steps=result.steps, checkpoints=checkpoints,
                                final_metrics=_numbers(result.last_metrics))
    for warning in result.warnings:
        outcome.warn(warning)
    return outcome


def _numbers(metrics: dict[str, Any]) -> dict[str, float]:
    return {k: float(v) for k, v in (metrics or {}).items() if isinstance(v, (int, float))}


def _launch_training(config, launch, out: Path):
    """The train stage under `accelerate launch`, exactly as a user would run it; output streamed."""
    import yaml

    from embedforge.train.trainer import TrainResult

    recipe_file = out / "train.yaml"
    recipe_file.write_text(yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False), encoding="utf-8")
    argv = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", str(launch.num_processes)]
    if launch.config_file:
        argv += ["--config_file", str(accelerate_config(launch.config_file))]
    elif launch.num_processes > 1:
        argv += ["--multi_gpu"]
    argv += [*launch.extra_args, "-m", "embedforge.train", str(recipe_file)]
    completed = subprocess.run(argv, check=False, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    if completed.returncode != 0:
        raise EmbedforgeError(f"train: `accelerate launch` exited with {completed.returncode}; rerun to resume")
    return TrainResult.model_validate_json((Path(config.output_dir) / "train_result.json").read_text(encoding="utf-8"))


def accelerate_config(name: str) -> Path:
    """An accelerate config by path, or by its name under the shipped recipes (accelerate/ddp.yaml)."""
    from embedforge.pipeline_cli import recipes_dir

    for candidate in (Path(name), recipes_dir() / name):
        if candidate.is_file():
            return candidate
    raise InputError("no such accelerate config (a path, or one of recipes/accelerate/*.yaml)", path=name)


def merge_stage(recipe: Recipe, inputs: dict[str, str], out: Path) -> StageOutcome:
    from embedforge.merge import MergeConfig, merge

    section = recipe.merge
    if section.with_ == "base":
        wiring: dict[str, Any] = {"models": [inputs["base"], inputs["model"]]}
    else:
        wiring = {"models": [*json.loads(inputs.get("checkpoints", "[]")), inputs["model"]], "t": None,
                  "base": inputs["base"] if section.method == "slerp" else None}
    config = section_config(section, MergeConfig, output=str(out / "model"), overwrite=True,
                            report=str(out / "merge_report.json"), show_progress=False, **wiring)
    outcome = merge(config)
    if section.with_ == "base":
        # A fine-tuned model and its own base are nearly parallel, so slerp is lerp by construction;
        # the advice to slerp deltas from a common base does not apply (one of the two IS the base).
        outcome.warnings = [w for w in outcome.warnings if not w.startswith("slerp equals lerp")]
    return outcome


def export_stage(recipe: Recipe, inputs: dict[str, str], out: Path) -> StageOutcome:
    from embedforge.export import ExportConfig, export

    wiring: dict[str, Any] = {"model": inputs["model"], "output": str(out / "model"), "overwrite": True,
                              "kind": "embedder" if recipe.task == "embedding" else "reranker",
                              "eval_results": json.loads(inputs.get("eval_results", "[]")),
                              "base_model": public_name(recipe.model), "model_name": recipe.name,
                              "repo_id": recipe.export.repo_id or recipe.export.push_to_hub}
    if recipe.task == "embedding":
        wiring["default_instruction"] = recipe.export.default_instruction or recipe.instruction
    return export(section_config(recipe.export, ExportConfig, **wiring))


# --- eval -------------------------------------------------------------------------------------------


class EvalStageOutcome(StageOutcome):
    results: list[str]
    report: str
    markdown: str
    scores: dict[str, float]


def eval_stage(recipe: Recipe, inputs: dict[str, str], out: Path) -> EvalStageOutcome:
    """Every model (base first) on every set, each with intervals and a paired test against the
    base on the same queries, then one table in pipeline order."""
    from embedforge.eval import EvalConfig, ReportConfig, evaluate
    from embedforge.eval.report import report

    models: dict[str, str] = json.loads(inputs["models"])
    sets: dict[str, str] = json.loads(inputs["sets"])
    results, scores, warnings = [], {}, []
    for data_label, data in sets.items():
        base_result = None
        for label, model in models.items():
            path = out / f"{label}-{_slug(data_label)}.json"
            wiring: dict[str, Any] = {"data": data, "output": str(path), "label": f"{label} / {data_label}",
                                      "baselines": [base_result] if base_result else [], "overwrite": True}
            if recipe.task == "embedding":
                wiring |= {"model": model, "instruction": recipe.instruction or ""}
            else:
                wiring |= {"model": recipe.eval.first_stage, "reranker": model,
                           "reranker_instruction": recipe.instruction}
            outcome = evaluate(section_config(recipe.eval, EvalConfig, **wiring))
            base_result = base_result or str(path)
            results.append(str(path))
            scores[f"{label}/{data_label}/ndcg_at_10"] = outcome.ndcg_at_10
            warnings += outcome.warnings
    table = report(ReportConfig(results=results, output=str(out / "report.md"), overwrite=True))
    outcome = EvalStageOutcome(output=str(out), results=results, report=str(out / "report.md"),
                               markdown=table.markdown, scores=scores)
    for warning in warnings:
        outcome.warn(warning)
    return outcome


def _slug(text: str) -> str:
    return "".join(c if c.isalnum() or c in "-_" else "-" for c in text).strip("-")

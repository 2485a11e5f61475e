"""`evaluate(EvalConfig) -> EvalOutcome`: one model, one results file a user can believe.

Next to every retrieval score the results file holds the number of queries, a bootstrap interval
over queries, the exact score of a random ranking of the corpus, the per-query metrics, and, for
each baseline results file, the paired difference with its interval and randomisation p-value
(see embedforge.eval.confidence). mteb runs record mteb's scores and where its files went.

The model's provenance trail is read and carried into the results file, and this evaluation is
appended to it (`provenance.json` beside the results file).
"""

from __future__ import annotations

import platform
import sys
from pathlib import Path
from typing import Any

from pydantic import Field

from embedforge.errors import InputError
from embedforge.eval.beir import BeirData
from embedforge.eval.confidence import Comparison, Interval, compare, intervals, method_note
from embedforge.eval.config import EvalConfig
from embedforge.eval.metrics import METRIC_KEYS
from embedforge.io import check_output, output_lock, write_json
from embedforge.outcome import StageOutcome
from embedforge.provenance import read_provenance, write_provenance

MIN_QUERIES = 100  # fewer real queries than this cannot support a quality claim
HEADLINE = "ndcg_at_10"


class EvalOutcome(StageOutcome):
    """Scores of one evaluation, with their uncertainty (`output` is the results JSON)."""

    label: str
    n_queries: int | None = None
    n_docs: int | None = None
    ndcg_at_10: float | None = Field(None, description="the headline score (None for mteb runs)")
    scores: dict[str, float] = Field(default_factory=dict, description="mean of each metric over queries")
    intervals: dict[str, Interval] = Field(default_factory=dict)
    random_baseline: dict[str, float] = Field(default_factory=dict,
                                              description="expected score of a uniformly random ranking")
    comparisons: list[Comparison] = Field(default_factory=list)
    mteb: dict[str, float] = Field(default_factory=dict, description="mteb task -> main score")

    def versus(self, baseline: str, metric: str = HEADLINE) -> Comparison | None:
        """The paired comparison with the baseline labelled `baseline` on `metric` (one per metric)."""
        return next((c for c in self.comparisons if c.baseline == baseline and c.metric == metric), None)

    def summary(self) -> str:
        """One line: headline score [interval], each comparison, queries, random baseline."""
        if self.ndcg_at_10 is None:
            return "  ".join(f"{task}={score:.4f}" for task, score in self.mteb.items()) + f" -> {self.output}"
        ci = self.intervals[HEADLINE]
        parts = [f"{self.label}: nDCG@10 {ci.mean:.4f} [{ci.low:.4f}, {ci.high:.4f}]"]
        for c in self.comparisons:
            if c.metric == HEADLINE:
                parts.append(f"vs {c.baseline} {c.delta:+.4f} [{c.low:+.4f}, {c.high:+.4f}] p={c.p_value:.3g}")
        parts.append(f"{self.n_queries} queries, {self.n_docs} docs, random {self.random_baseline[HEADLINE]:.4f}")
        return "  ".join(parts) + f" -> {self.output}"


def _load_baseline(path: str) -> dict[str, Any]:
    from embedforge.eval.report import load_results

    (result,) = load_results([path])
    if not result.get("per_query"):
        raise InputError("no per-query metrics to pair with (evaluate it again: `embedforge eval` records them)",
                         path=path, field="per_query")
    return result


def _retrieval(config: EvalConfig, data: BeirData, embedder: Any, show_progress: bool) -> dict[str, Any]:
    from embedforge.eval.beir import fingerprint
    from embedforge.eval.random_ranking import random_ranking_baseline
    from embedforge.eval.retrieval import evaluate_retrieval

    reranker = None
    if config.reranker:
        from embedforge.reranker import Reranker

        reranker = Reranker.from_pretrained(config.reranker, dtype=config.dtype, device=config.device)
    run = evaluate_retrieval(
        embedder, data, instruction=config.instruction, dim=config.dim, reranker=reranker, top_k=config.top_k,
        batch_size=config.batch_size, search_backend=config.search_backend,
        reranker_instruction=config.reranker_instruction, per_query=True, show_progress=show_progress,
    )
    stats = config.statistics()
    run.update(
        data=config.data, split=config.split, data_fingerprint=fingerprint(config.data, config.split),
        reranker=config.reranker,
        intervals={m: i.model_dump() for m, i in intervals(run["per_query"], **stats).items()},
        random_baseline=random_ranking_baseline(data.qrels, len(data.corpus)),
        statistics=method_note(**stats),
    )
    return run


def _comparisons(config: EvalConfig, result: dict[str, Any], baselines: list[tuple[str, dict[str, Any]]],
                 ) -> list[Comparison]:
    from embedforge.eval.report import label_of

    stats = config.statistics()
    out = []
    for path, baseline in baselines:
        try:
            out += [compare(result["per_query"], baseline["per_query"], m, label_of(baseline), **stats)
                    for m in METRIC_KEYS]
        except InputError as exc:
            raise InputError(str(exc), path=path, field="per_query") from None
    return out


def _mteb(config: EvalConfig, embedder: Any, show_progress: bool) -> dict[str, Any]:
    from embedforge.eval.mteb_adapter import MtebEncoder, mteb_name
    from embedforge.eval.mteb_tasks import run_mteb
    from embedforge.eval.retrieval import resolve_instruction

    folder = config.mteb_output or str(Path(config.output).with_suffix("")) + "-mteb"
    # A local folder's queries get the instruction `--data` would give them ("" = none), so that
    # both routes score the folder alike; mteb's own tasks get the Qwen3 table's.
    instruction = resolve_instruction(embedder, config.instruction) or ""
    local = {Path(t).resolve().name: instruction for t in config.mteb if Path(t).is_dir()}
    encoder = MtebEncoder(embedder, dim=config.dim, batch_size=config.batch_size, show_progress=show_progress,
                          task_instructions={**local, **config.task_instructions},
                          use_instructions=config.use_instructions, name=mteb_name(config.label or config.model))
    scores = run_mteb(encoder, config.mteb, folder, split=config.split, show_progress=show_progress)
    meta = encoder.mteb_model_meta
    return {"mteb": scores, "mteb_output": folder, "mteb_model": {"name": meta.name, "revision": meta.revision,
                                                                  "experiment": meta.experiment_name}}


def evaluate(config: EvalConfig) -> EvalOutcome:
    """Evaluate `config.model` and write `config.output` (a results JSON) and its provenance.

    Example:
        >>> base = evaluate(EvalConfig(model="base", data="heldout", output="r/base.json", label="base"))
        >>> merged = evaluate(EvalConfig(model="out/merged", data="heldout", output="r/merged.json",
        ...                              label="merged", baselines=[base.output]))
        >>> merged.comparisons[0].p_value
    """
    config.check_ready()
    inputs = [config.data, config.model, config.reranker, *config.baselines, *(config.mteb or [])]
    check_output(config.output, inputs, overwrite=config.overwrite)
    if config.mteb_output:
        check_output(config.mteb_output, inputs, resumable=True)
    with output_lock(config.output):
        return _evaluate_locked(config)


def _evaluate_locked(config: EvalConfig) -> EvalOutcome:
    from embedforge.eval.beir import load_beir

    if config.mteb:
        from embedforge.eval.mteb_adapter import import_mteb

        import_mteb()  # fail before loading a model when mteb is missing
    # bad input fails before a model loads: the baselines, the data, every local mteb folder
    baselines = [(p, _load_baseline(p)) for p in config.baselines]
    data = load_beir(config.data, split=config.split) if config.data else None
    for task in config.mteb or []:
        if Path(task).is_dir():
            load_beir(task, split=config.split)
    import torch

    from embedforge import __version__
    from embedforge.embedder import Embedder
    from embedforge.eval.report import label_of

    show_progress = sys.stderr.isatty()
    previous = read_provenance(config.model, config.reranker)
    embedder = Embedder.from_pretrained(config.model, dtype=config.dtype, device=config.device,
                                        max_length=config.max_length)
    result: dict[str, Any] = {
        "model": config.model,
        "label": config.label,
        "dim": config.dim,
        "embedding_dim": config.dim or embedder.dimension,
        "meta": dict(config.meta),
        "embedforge_version": __version__,
        "device": str(embedder.device),
        "host": {"python": platform.python_version(), "torch": torch.__version__},
    }
    result.update(_mteb(config, embedder, show_progress) if config.mteb
                  else _retrieval(config, data, embedder, show_progress))
    label = label_of(result)
    outcome = EvalOutcome(output=config.output, label=label)
    if "metrics" in result:
        comparisons = _comparisons(config, result, baselines)
        result["comparisons"] = [c.model_dump() for c in comparisons]
        outcome = EvalOutcome(
            output=config.output, label=label, n_queries=result["n_queries"], n_docs=result["n_docs"],
            ndcg_at_10=result["metrics"][HEADLINE], scores=result["metrics"],
            intervals={m: Interval(**i) for m, i in result["intervals"].items()},
            random_baseline=result["random_baseline"], comparisons=comparisons,
        )
        _warn_weak(outcome)
        if not config.per_query:
            del result["per_query"]
    else:
        outcome.mteb = {task: s["main_score"] for task, s in result["mteb"].items()}
    result["warnings"] = list(outcome.warnings)
    result["provenance"] = previous
    write_json(config.output, result)
    write_provenance(config.output, previous, "eval", **_record(outcome, result))
    return outcome


def _warn_weak(outcome: EvalOutcome) -> None:
    if outcome.n_queries is not None and outcome.n_queries < MIN_QUERIES:
        outcome.warn(f"eval {outcome.label}: only {outcome.n_queries} queries; intervals are wide and a quality "
                     f"claim needs >= {MIN_QUERIES} real held-out queries")
    ci, chance = outcome.intervals[HEADLINE], outcome.random_baseline[HEADLINE]
    if ci.low <= chance:
        outcome.warn(f"eval {outcome.label}: nDCG@10 {ci.mean:.4f} [{ci.low:.4f}, {ci.high:.4f}] does not clear "
                     f"a random ranking ({chance:.4f})")


def _record(outcome: EvalOutcome, result: dict[str, Any]) -> dict[str, Any]:
    """This evaluation in the provenance trail: the results file's fields without the per-query
    metrics and mteb's full score tables (both stay in the results file)."""
    keep = ("model", "data", "split", "data_fingerprint", "reranker", "dim", "instruction", "n_queries", "n_docs",
            "metrics", "intervals", "random_baseline", "comparisons", "statistics", "mteb_output", "mteb_model")
    record = {"label": outcome.label, **{k: result[k] for k in keep if k in result}}
    if "mteb" in result:
        record["mteb"] = {task: {"main_score": s["main_score"], "result_file": s["result_file"]}
                          for task, s in result["mteb"].items()}
    record.update(results_file=outcome.output, warnings=list(outcome.warnings))
    return record

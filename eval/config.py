"""`EvalConfig` and `ReportConfig`: what `evaluate()` and `report()` take.

The model, data and output may be left unset so that a recipe can embed the class and let the
pipeline fill them in; `evaluate()` refuses to run until they are set (`check_ready`).
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field

from embedforge.config import StrictModel
from embedforge.errors import ConfigError
from embedforge.eval.stats import CONFIDENCE, N_RESAMPLES, SEED


class StatisticsFields(StrictModel):
    """How intervals and paired tests are computed (shared by eval and report)."""

    confidence: float = Field(CONFIDENCE, gt=0, lt=1, description="confidence level of every interval")
    n_resamples: int = Field(N_RESAMPLES, ge=100, description="bootstrap / randomisation resamples")
    seed: int = Field(SEED, description="seed of the resampling (same seed, same intervals)")

    def statistics(self) -> dict[str, float | int]:
        """confidence, n_resamples and seed, as keyword arguments of embedforge.eval.confidence."""
        return {"confidence": self.confidence, "n_resamples": self.n_resamples, "seed": self.seed}


class EvalConfig(StatisticsFields):
    """One model on a local BEIR folder (retrieval, optionally reranked) or on mteb tasks.

    Example:
        >>> evaluate(EvalConfig(model="out/merged", data="heldout", output="merged.json",
        ...                     label="merged", baselines=["base.json"]))
    """

    model: str | None = Field(None, description="embedder: Hub id or folder")
    data: str | None = Field(None, description="BEIR folder (corpus.jsonl, queries.jsonl, qrels/<split>.tsv)")
    mteb: list[str] | None = Field(None, description="mteb task names and/or local BEIR folders (instead of data)")
    output: str | None = Field(None, description="results JSON to write")
    overwrite: bool = Field(False, description="replace an existing results file")
    mteb_output: str | None = Field(None, description="folder for mteb's own result files; unset: "
                                                      "<output stem>-mteb beside output")
    split: str = Field("test", description="qrels split")
    instruction: str | None = Field(None, description="query instruction; unset: the model's own, '' for none")
    dim: int | None = Field(None, gt=0, description="Matryoshka width; unset: full")
    reranker: str | None = Field(None, description="reranker (Hub id or folder) to rescore the top-k")
    top_k: int = Field(100, gt=0, description="documents per query to rerank")
    reranker_instruction: str | None = Field(None, description="reranker instruction; unset: the query's")
    search_backend: Literal["torch", "faiss-flat", "faiss-ivf"] = Field(
        "torch", description="torch: exact blocked search, GPU when available; faiss-ivf: approximate")
    batch_size: int = Field(32, gt=0)
    dtype: str = Field("auto", description="model dtype: auto, float32, bfloat16, float16")
    device: str | None = Field(None, description="cpu, cuda, cuda:1; unset: the best available")
    max_length: int | None = Field(None, gt=0, description="token limit per text; unset: the model's")
    label: str | None = Field(None, description="name of this run in reports; unset: the model folder's name")
    meta: dict[str, Any] = Field(default_factory=dict, description="extra fields recorded under 'meta' "
                                                                   "(e.g. merge_t for the merge plot)")
    per_query: bool = Field(True, description="record per-query metrics (needed for paired comparisons)")
    baselines: list[str] = Field(default_factory=list, description="results JSONs of the same queries to compare "
                                                                   "against (paired test), e.g. the base model's")
    task_instructions: dict[str, str] = Field(default_factory=dict, description="mteb: task name -> instruction, "
                                                                                "over the Qwen3 table")
    use_instructions: bool | None = Field(None, description="mteb: instructions on or off; unset: on when the "
                                                            "model takes them")

    def check_ready(self) -> None:
        """The checks that need the inputs and output set (a recipe may leave them to the pipeline)."""
        if not self.model:
            raise ConfigError("eval: no model to evaluate (set `model`)")
        if not self.output:
            raise ConfigError("eval: no results file (set `output`)")
        if bool(self.data) == bool(self.mteb):
            raise ConfigError("eval: give exactly one of `data` (a BEIR folder) and `mteb` (tasks)")
        if self.mteb and self.reranker:
            raise ConfigError("eval: a reranker applies to `data` retrieval only, not to mteb tasks")
        if self.mteb and self.baselines:
            raise ConfigError("eval: paired comparisons need per-query results, which mteb does not keep; "
                              "evaluate the BEIR folder with `data` instead")
        if self.baselines and not self.per_query:
            raise ConfigError("eval: `baselines` need `per_query` (the comparison is paired by query)")


class ReportConfig(StatisticsFields):
    """Results files side by side, in the order given (base, trained, merged)."""

    results: list[str] = Field(default_factory=list, description="results JSON files, in pipeline order")
    output: str | None = Field(None, description="markdown file to write; unset: print")
    overwrite: bool = Field(False, description="replace an existing markdown file")
    plots_dir: str | None = Field(None, description="folder for PNG plots")
    metric: str = Field("ndcg_at_10", description="headline metric of the summary table and the plots")
    baseline: str | None = Field(None, description="label or file of the result the others are compared with; "
                                                   "unset: the first result of each data set")

    def check_ready(self) -> None:
        if not self.results:
            raise ConfigError("report: no results files (set `results`)")

"""`synthesize(config)`: the synth stage as one function, from a corpus path to training pairs,
their coverage and quality report, and the provenance record the next stage reads."""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path
from typing import Any

from pydantic import Field

from embedforge.data_synth.backends.base import Backend
from embedforge.data_synth.generate import SynthConfig, SynthesisRun, resolve_strategy
from embedforge.data_synth.models import load_embedder, resolve_model
from embedforge.data_synth.quality import quality_summary
from embedforge.data_synth.shards import claim_layout, shard_name
from embedforge.errors import ConfigError
from embedforge.io import atomic_path, check_output, output_lock, read_json_file, write_json
from embedforge.outcome import StageOutcome
from embedforge.provenance import read_provenance, write_provenance

logger = logging.getLogger("embedforge.data_synth")

# Below these a run is reported as producing little of use (a warning, never an error).
LOW_SCHEMA_VALID = 0.5
LOW_ON_TOPIC = 0.5


class SynthesisOutcome(StageOutcome):
    """What `synthesize` wrote (`output` is the folder) and how good it is."""

    rows: int = 0
    passages: int = Field(0, description="passages of this shard")
    passages_with_rows: int = 0
    passages_failed: int = 0
    pending: int = Field(0, description="passages left for a rerun (transport failures)")
    status: str = ""
    strategy: str = ""
    decoding: str = ""
    llm_calls: int = 0
    schema_valid_rate: float | None = None
    on_topic_rate: float | None = None
    seconds: float = 0.0
    seconds_per_passage: float | None = None
    tokens_per_second: float | None = Field(None, description="generated tokens per second (local backends)")
    invalid_outputs: dict[str, int] = Field(default_factory=dict)
    transport_failures: dict[str, int] = Field(default_factory=dict)
    quality: dict[str, Any] = Field(default_factory=dict)


def _required(value: str | None, name: str, what: str) -> str:
    if not value:
        raise ConfigError(f"synthesize: `{name}` is not set ({what})")
    return value


def build_backend(config: SynthConfig) -> Backend:
    """The generator backend the config names."""
    from embedforge.data_synth.backends import make_backend

    model = _required(config.model, "model", "the generator: a folder, a Hub id or a served model name")
    if config.backend == "openai":
        options: dict[str, Any] = {
            "base_url": config.base_url,
            "api_key_env": config.api_key_env,
            "concurrency": config.concurrency,
            "timeout_s": config.timeout,
            "max_retries": config.max_retries,
            "seed": config.seed,
        }
        return make_backend("openai", model, **options)
    if config.backend == "transformers":
        return make_backend("transformers", resolve_model(model), device=config.device, dtype=config.dtype,
                            batch_size=config.batch_size)
    return make_backend("vllm", resolve_model(model), dtype=config.dtype, batch_size=max(config.batch_size, 256))


def corpus_fingerprint(config: SynthConfig, passages) -> dict[str, Any]:
    """Where the passages came from and a hash of exactly which texts they were."""
    texts = hashlib.sha256()
    for p in passages:
        texts.update(p.text_hash.encode())
    return {
        "path": str(config.corpus),
        "chunk_tokens": config.chunk_tokens,
        "overlap": config.overlap,
        "tokenizer": config.tokenizer or "words",
        "passages": len(passages),
        "ids_sha256": hashlib.sha256("\n".join(p.id for p in passages).encode()).hexdigest(),
        "texts_sha256": texts.hexdigest(),
    }


def synthesize(config: SynthConfig, *, backend: Backend | None = None) -> SynthesisOutcome:
    """Write LLM-synthesised training pairs for this shard of the corpus, then the coverage and
    quality reports over every shard finished so far.

    Args:
        config: everything, paths included (`corpus`, `output` and, unless `backend` is given, `model`).
        backend: an already built generator to use instead of the one the config names: a client
            configured in code, or `backends.scripted.ScriptedBackend` to try the stage without a model.

    Rerunning with the same config resumes: finished passages are skipped. Shards of one layout may
    run at once into the same folder; a second writer of the same shard is refused.
    """
    from embedforge.data_synth.corpus import hf_spans, load_corpus, word_spans
    from embedforge.data_synth.personas import load_personas

    corpus = _required(config.corpus, "corpus", "a JSONL, Parquet file or folder of .txt/.md")
    output = Path(_required(config.output, "output", "the folder to write pairs into"))
    check_output(output, [corpus, config.personas, config.prompts_dir], resumable=True)
    spans = hf_spans(resolve_model(config.tokenizer)) if config.tokenizer else word_spans
    passages = load_corpus(corpus, chunk_tokens=config.chunk_tokens, overlap=config.overlap, spans=spans)
    personas = load_personas(config.personas)  # bad input fails before anything is written or loaded
    claim_layout(output, config.num_shards)
    lock = shard_name("manifest", config.shard_index, config.num_shards, suffix="json")
    with output_lock(output / lock):  # one writer per shard; the shards of a layout run side by side
        return _synthesize_locked(config, corpus, output, passages, personas, backend)


def _synthesize_locked(config: SynthConfig, corpus: str, output: Path, passages: list, personas: list,
                       backend: Backend | None) -> SynthesisOutcome:
    from embedforge.data_synth.personas import PersonaRetriever, hashed_bag_of_words

    owned = backend is None
    backend = backend if backend is not None else build_backend(config)
    embedders: dict[str, Any] = {}

    def embedder(name: str):
        if name not in embedders:
            embedders[name] = load_embedder(name, config.device)
        return embedders[name]

    try:
        retriever = None
        if "retrieval" in config.tasks and resolve_strategy(config.strategy, backend) == "persona":
            encode = embedder(config.persona_embedder).encode if config.persona_embedder else hashed_bag_of_words
            retriever = PersonaRetriever(personas, encode, top_k=config.persona_top_k)
        run = SynthesisRun(config, backend, output, retriever, show_progress=config.progress)
        corpus_info = corpus_fingerprint(config, passages)
        report = run.run(passages, corpus_info)
    finally:
        if owned:
            backend.close()
    # other shards may still be running: read their files without touching them
    from embedforge.data_synth.report import coverage_markdown
    from embedforge.data_synth.shards import read_finished_rows

    rows = [row for path in sorted(output.glob("pairs-*.jsonl")) for row in read_finished_rows(path)]
    reports = [read_json_file(m)["report"] for m in sorted(output.glob("manifest-*.json"))]
    quality = quality_summary(rows, reports, embedder(config.judge) if config.judge and rows else None)
    write_json(output / "quality.json", quality)
    with atomic_path(output / "coverage.md") as tmp:
        tmp.write_text(coverage_markdown(rows, title="Synthetic data coverage (before the quality gates)",
                                         run_reports=reports, quality=quality), encoding="utf-8")
    tokens = getattr(backend, "tokens_generated", None)
    gen_seconds = getattr(backend, "generate_seconds", 0.0)
    done_now = report.passages_in_shard - report.skipped_already_done - report.pending
    outcome = SynthesisOutcome(
        output=str(output),
        rows=report.rows_written,
        passages=report.passages_in_shard,
        passages_with_rows=report.passages_with_rows,
        passages_failed=sum(report.passages_failed.values()),
        pending=report.pending,
        status=report.status,
        strategy=run.strategy,
        decoding=run.decoding(),
        llm_calls=report.llm_calls,
        schema_valid_rate=quality.get("schema_valid_rate"),
        on_topic_rate=quality.get("on_topic_rate"),
        seconds=report.seconds,
        seconds_per_passage=round(report.seconds / done_now, 3) if done_now > 0 else None,
        tokens_per_second=round(tokens / gen_seconds, 2) if tokens and gen_seconds else None,
        invalid_outputs=report.invalid_outputs,
        transport_failures=report.transport_failures,
        quality=quality,
    )
    _warn(outcome, report, _generator_name(config, run))
    write_provenance(
        output,
        read_provenance(corpus),
        "synth",
        corpus=corpus_info,
        generator=run.generator_info(),
        strategy=run.strategy,
        decoding=run.decoding(),
        sampling=run.fingerprint(),
        templates=run.template_info(),
        counts={"rows": len(rows), "llm_calls": sum(r.get("llm_calls", 0) for r in reports),
                "passages_failed": sum(sum(r["passages_failed"].values()) for r in reports)},
        quality=quality,
        warnings=outcome.warnings,
    )
    return outcome


def _generator_name(config: SynthConfig, run: SynthesisRun) -> str:
    """The resource a transport failure came from: the server for HTTP, else the model."""
    info = run.generator_info()
    where = f" at {config.base_url}" if info["backend"] == "openai" else ""
    return f"{info['backend']} {info['model']}{where}"


def _warn(outcome: SynthesisOutcome, report, generator: str) -> None:
    if outcome.rows == 0:
        causes = ", ".join(f"{k} {v}" for k, v in sorted(report.passages_failed.items())) or "none"
        outcome.warn(f"synth wrote no rows ({outcome.passages} passages; failures: {causes})")
    if outcome.schema_valid_rate is not None and outcome.schema_valid_rate < LOW_SCHEMA_VALID:
        outcome.warn(f"synth: only {outcome.schema_valid_rate:.0%} of the generator's replies were valid "
                     f"JSON of the schema (decoding: {outcome.decoding}); try constrained_decoding or a "
                     "larger generator")
    rate, baseline = outcome.quality.get("on_topic_rate"), outcome.quality.get("on_topic_random_baseline")
    if rate is not None and rate < LOW_ON_TOPIC:
        outcome.warn(f"synth: only {rate:.0%} of the queries are on topic (their passage in the judge's "
                     f"top-{outcome.quality['on_topic_k']}; random: {baseline:.0%})")
    if outcome.pending:
        causes = ", ".join(f"{k} {v}" for k, v in sorted(report.transport_failures.items()))
        outcome.warn(f"synth: {outcome.pending} passages pending after transport failures ({causes}) from "
                     f"{generator}; rerun the same command to resume")

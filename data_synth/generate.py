"""The synthesis run: passages in, training pairs with provenance out, resumable and shardable.

Retrieval pairs come from one of two prompt strategies. `persona` is the Qwen3 Embedding
report's flow for capable models: call (a) picks a character from the personas retrieved for the
passage, a question type and a difficulty; call (b) writes the query. `one_call` suits small
models: one call names the passage's topic and writes several queries of different types, with
worked examples in the prompt (and their shared prefix computed once per batch). `auto` picks
`one_call` for a generator under 1B parameters, else `persona`. Bitext, STS and classification
take one call each. Every task that takes one call is a row of `SINGLE_CALL_TASKS`.

Guarantees:
- Sharding: passage p belongs to shard `hash(p.id) % num_shards`; shards are disjoint and cover
  the corpus, so any scheduler can fan out with `--shard-index/--num-shards`.
- Resume: a passage is finished once its rows (or its final content failure) are in the shard
  files; a rerun skips exactly those. An output folder holds one shard layout (`num_shards`);
  another is refused, since its shards would overlap the first's. Transport failures (server down, timeouts after retries)
  leave the passage pending for the next run instead of recording it as failed.
- Reproducibility: the task, language, length and request seeds of a passage come from
  `(seed, passage id)` alone, so they do not depend on scheduling or on the shard layout; a
  finished shard is rewritten in corpus order, so neither does the order of its rows.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import random
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from embedforge import __version__
from embedforge.config import StrictModel
from embedforge.data_synth.backends.base import Backend, GenerationParams, async_caller
from embedforge.data_synth.corpus import Passage, normalize_text, shard_of
from embedforge.data_synth.language import LANGUAGE_NAMES, is_wrong_language, language_name
from embedforge.data_synth.personas import Persona, PersonaRetriever
from embedforge.data_synth.prompt_templates import PromptTemplate, load_template
from embedforge.data_synth.schemas import OutputError, decoding_schema, parse_output
from embedforge.data_synth.shards import AppendOnlyShard, claim_layout, rewrite_in_order, shard_name
from embedforge.errors import ConfigError, InputError
from embedforge.io import read_json_file, write_json
from embedforge.templates import BITEXT_INSTRUCTION, DEFAULT_RETRIEVAL_INSTRUCTION, STS_INSTRUCTION

logger = logging.getLogger(__name__)

TASKS = ("retrieval", "bitext", "sts", "classification")
STRATEGIES = ("persona", "one_call")
SMALL_GENERATOR = 1_000_000_000  # parameters; below this `auto` chooses the one-call strategy
# Lengths in words, sampled per passage (the report samples a length into each requirement).
DEFAULT_LENGTHS = {
    "retrieval": [4, 8, 15, 25],
    "bitext": [10, 20, 40],
    "sts": [8, 15, 25],
    "classification": [15, 30, 60],
}
QUESTION_TYPE_HELP = {
    "keywords": "a few keywords, not a sentence",
    "acquire_knowledge": "a question asking for specific facts or knowledge",
    "summary": "a request for an overview or summary of the topic",
    "yes_or_no": "a question that can be answered with yes or no",
    "background": "a question about the background or context of the topic",
}


@dataclass(frozen=True)
class Sampling:
    temperature: float
    top_p: float
    max_new_tokens: int


# Sampling that suits each strategy, used where the config leaves a value unset. The persona flow
# decodes at 1.0 as the report and e5-mistral do (a capable model stays coherent and varies);
# a 135M model at 1.0 drifts off its passage, so the one-call strategy samples close to greedy,
# and its bounded JSON reply (schemas.PassageQueries) fits in 112 tokens.
STRATEGY_SAMPLING = {
    "persona": Sampling(temperature=1.0, top_p=1.0, max_new_tokens=256),
    "one_call": Sampling(temperature=0.3, top_p=0.9, max_new_tokens=112),
}


class SynthConfig(StrictModel):
    """Everything `synthesize` needs, from the corpus to the generator; recorded in the manifest.

    The paths are optional so a recipe can embed this config and let the pipeline fill them;
    `synthesize` raises a ConfigError naming any that is still missing.
    """

    # --- input and output
    corpus: str | None = Field(default=None, description="JSONL (id, text), Parquet, or a folder of .txt/.md")
    output: str | None = Field(default=None, description="output folder (created; reused to resume)")
    chunk_tokens: int | None = Field(default=256, ge=1, description="passage size in tokens; none: whole docs")
    overlap: int = Field(default=32, ge=0, description="tokens shared by consecutive passages")
    tokenizer: str | None = Field(default=None, description="tokenizer for chunking (default: whitespace words)")
    num: int | None = Field(default=None, ge=1, description="use the first N passages of the corpus")
    # --- the generator
    backend: Literal["transformers", "openai", "vllm"] = "transformers"
    model: str | None = Field(default=None, description="generator: folder / Hub id, or the served name (openai)")
    strategy: Literal["auto", "persona", "one_call"] = Field(
        default="auto", description="retrieval prompts: persona (two calls), one_call (small models), auto"
    )
    constrained_decoding: bool = Field(default=True, description="replies valid JSON of the schema by construction")
    temperature: float | None = Field(default=None, ge=0, description="default: the strategy's")
    top_p: float | None = Field(default=None, gt=0, le=1, description="default: the strategy's")
    max_new_tokens: int | None = Field(default=None, ge=1, description="default: the strategy's")
    max_attempts: int = Field(default=3, ge=1, description="LLM calls per step before a passage is given up")
    device: str | None = None
    dtype: str = "auto"
    batch_size: int = Field(default=8, ge=1, description="transformers/vllm: prompts per batch")
    base_url: str = Field(default="http://127.0.0.1:8000/v1", description="openai backend: server root")
    api_key_env: str = Field(default="OPENAI_API_KEY", description="openai backend: env var with the key")
    concurrency: int = Field(default=8, ge=1, description="openai backend: requests in flight")
    timeout: float = Field(default=120.0, gt=0, description="openai backend: seconds per request")
    max_retries: int = Field(default=4, ge=0, description="openai backend: retries per request")
    # --- what to write
    tasks: list[Literal["retrieval", "bitext", "sts", "classification"]] = Field(
        default_factory=lambda: ["retrieval"]
    )
    task_weights: list[float] | None = None
    languages: list[str] = Field(default_factory=lambda: ["en"])
    bitext_languages: list[str] = Field(
        default_factory=lambda: ["de", "es", "fr", "zh"],
        description="target languages of bitext translations",
    )
    lengths: dict[str, list[int]] = Field(
        default_factory=lambda: dict(DEFAULT_LENGTHS), description="words per task; unlisted tasks keep theirs"
    )
    seed: int = 0
    personas: str | None = Field(default=None, description='persona JSONL ({"persona": ...}); default: built-in')
    persona_embedder: str | None = Field(
        default="builtin:minilm", description="embedder that retrieves personas; none: bag of words"
    )
    persona_top_k: int = Field(default=5, ge=1)
    judge: str | None = Field(
        default="builtin:minilm", description="embedder that measures the on-topic rate; none: skip"
    )
    prompts_dir: str | None = None
    template_versions: dict[str, int] = Field(default_factory=dict)
    # --- scale
    shard_index: int = Field(default=0, ge=0)
    num_shards: int = Field(default=1, ge=1)
    max_inflight: int | None = Field(
        default=None, ge=1, description="passages in progress at once (default 64; openai: 2 x concurrency)"
    )
    max_consecutive_transport_failures: int = Field(
        default=16, ge=1, description="stop (resumably) after this many in a row"
    )
    fsync: bool = True
    progress: bool = False

    @field_validator("lengths", mode="before")
    @classmethod
    def _default_lengths(cls, value):
        return {**DEFAULT_LENGTHS, **value} if isinstance(value, dict) else value

    @field_validator("languages", "bitext_languages")
    @classmethod
    def _known_languages(cls, value: list[str]) -> list[str]:
        unknown = [v for v in value if v not in LANGUAGE_NAMES]
        if unknown or not value:
            raise ValueError(f"unknown language code(s) {unknown}; known: {sorted(LANGUAGE_NAMES)}")
        return value

    @model_validator(mode="after")
    def _consistent(self):
        if not self.tasks:
            raise ValueError("tasks: at least one task")
        if self.task_weights is not None and (
            len(self.task_weights) != len(self.tasks)
            or min(self.task_weights) < 0
            or sum(self.task_weights) <= 0
        ):
            raise ValueError("task_weights: one non-negative weight per task, not all zero")
        if self.shard_index >= self.num_shards:
            raise ValueError(f"shard_index {self.shard_index} must be < num_shards {self.num_shards}")
        for task in self.tasks:
            if not self.lengths.get(task) or min(self.lengths[task]) < 1:
                raise ValueError(f"lengths.{task}: at least one positive length in words")
        if self.chunk_tokens is not None and self.overlap >= self.chunk_tokens:
            raise ValueError(f"overlap ({self.overlap}) must be < chunk_tokens ({self.chunk_tokens})")
        return self

    def inflight(self) -> int:
        if self.max_inflight is not None:
            return self.max_inflight
        return max(8, 2 * self.concurrency) if self.backend == "openai" else 64

    def sampling(self, strategy: str) -> Sampling:
        """The strategy's sampling defaults, overridden by any value set here."""
        base = STRATEGY_SAMPLING[strategy]
        return Sampling(
            temperature=base.temperature if self.temperature is None else self.temperature,
            top_p=base.top_p if self.top_p is None else self.top_p,
            max_new_tokens=base.max_new_tokens if self.max_new_tokens is None else self.max_new_tokens,
        )


def resolve_strategy(strategy: str, backend: Backend) -> str:
    """`auto`: the one-call strategy for a generator known to be small, else the persona flow."""
    if strategy != "auto":
        return strategy
    size = getattr(backend, "num_parameters", None)
    return "one_call" if size is not None and size < SMALL_GENERATOR else "persona"


@dataclass
class PassagePlan:
    """The per-passage choices made before any LLM call (recorded as the sampled configuration)."""

    task: str
    language: str
    length: int
    seed: int


def plan_passage(passage_id: str, config: SynthConfig) -> PassagePlan:
    rng = random.Random(f"{config.seed}:{passage_id}")
    task = rng.choices(config.tasks, weights=config.task_weights)[0]
    language = rng.choice(config.bitext_languages if task == "bitext" else config.languages)
    length = rng.choice(config.lengths[task])
    return PassagePlan(task=task, language=language, length=length, seed=rng.getrandbits(31))


def select_passages(passages: Sequence[Passage], config: SynthConfig) -> list[Passage]:
    """The first `num` passages of the corpus, then this shard's share of them."""
    chosen = list(passages[: config.num] if config.num else passages)
    return [p for p in chosen if shard_of(p.id, config.num_shards) == config.shard_index]


@dataclass
class RunReport:
    """Counts for one shard, across all runs that wrote it (the run section covers this invocation)."""

    shard: str
    passages_in_shard: int = 0
    skipped_already_done: int = 0
    rows_written: int = 0
    passages_with_rows: int = 0  # a one-call passage writes several rows
    passages_failed: dict[str, int] = field(default_factory=dict)  # final content failure cause -> passages
    invalid_outputs: dict[str, int] = field(default_factory=dict)  # every rejected reply, retried or not
    transport_failures: dict[str, int] = field(default_factory=dict)  # left pending for a rerun
    pending: int = 0
    llm_calls: int = 0
    recovered_torn_bytes: int = 0
    status: str = "running"
    seconds: float = 0.0
    tasks: dict[str, int] = field(default_factory=dict)


class _ContentFailure(Exception):
    def __init__(self, cause: str, detail: str, step: str):
        super().__init__(f"{step}: {cause}: {detail}")
        self.cause, self.detail, self.step = cause, detail, step


class _TransportFailure(Exception):
    def __init__(self, cause: str, detail: str):
        super().__init__(f"{cause}: {detail}")
        self.cause = cause


class _Stop(Exception):
    """The backend looks unreachable: end the run, leaving the remaining passages pending."""


def match_persona(character: str, candidates: Sequence[Persona]) -> Persona | None:
    """The retrieved persona the LLM chose, if its character names one (small LLMs paraphrase)."""
    want = normalize_text(character).rstrip(".")
    for persona in candidates:
        have = normalize_text(persona.text).rstrip(".")
        if want == have or (len(want) > 10 and (want in have or have in want)):
            return persona
    return None


# --- tasks that take one call: a table of specs -----------------------------------------------------


def _pair(query: str, positive: str, negatives: list[str], instruction: str) -> dict[str, Any]:
    return {"query": query, "positive": positive, "negatives": negatives, "instruction": instruction}


@dataclass(frozen=True)
class CallSpec:
    """A task answered by one call: its template, the fields held to the requested language, and
    how a validated reply becomes training rows (each with what it adds to `sampled`)."""

    template: str
    language_fields: tuple[str, ...]
    rows: Callable[[Any, Passage], list[tuple[dict[str, Any], dict[str, Any]]]]


def _one_call_rows(out, passage: Passage) -> list[tuple[dict[str, Any], dict[str, Any]]]:
    rows, seen = [], set()
    for question_type, query in out.queries():
        key = normalize_text(query)
        if key in seen:  # a small model may repeat one query under two keys: keep it once
            continue
        seen.add(key)
        rows.append((_pair(query, passage.text, [], DEFAULT_RETRIEVAL_INSTRUCTION),
                     {"question_type": question_type, "topic": out.topic}))
    return rows


SINGLE_CALL_TASKS: dict[str, CallSpec] = {
    "bitext": CallSpec(
        "bitext", ("translation",),
        lambda out, _: [(_pair(out.source, out.translation, [], BITEXT_INSTRUCTION), {})],
    ),
    "sts": CallSpec(
        "sts", ("sentence", "paraphrase", "contrast"),
        lambda out, _: [(_pair(out.sentence, out.paraphrase, [out.contrast], STS_INSTRUCTION), {})],
    ),
    "classification": CallSpec(
        "classification", ("text",),
        lambda out, _: [(_pair(out.text, out.label, [out.misleading_label], out.task), {"label": out.label})],
    ),
    "retrieval_one_call": CallSpec("retrieval_one_call", ("question", "summary"), _one_call_rows),
}
PERSONA_TEMPLATES = ("retrieval_config", "retrieval_query")


def task_templates(task: str, strategy: str) -> tuple[str, ...]:
    """The templates a task uses under a strategy."""
    if task == "retrieval":
        return PERSONA_TEMPLATES if strategy == "persona" else (SINGLE_CALL_TASKS["retrieval_one_call"].template,)
    return (SINGLE_CALL_TASKS[task].template,)


def _call_spec(task: str, strategy: str) -> CallSpec | None:
    if task == "retrieval":
        return None if strategy == "persona" else SINGLE_CALL_TASKS["retrieval_one_call"]
    return SINGLE_CALL_TASKS[task]


class SynthesisRun:
    """One shard of one synthesis job. Build it, then call `run(passages)`."""

    def __init__(
        self,
        config: SynthConfig,
        backend: Backend,
        output_dir: str | Path,
        retriever: PersonaRetriever | None = None,
        show_progress: bool = False,
    ):
        self.config = config
        self.backend = backend
        self.out = Path(output_dir)
        self.show_progress = show_progress
        self.strategy = resolve_strategy(config.strategy, backend)
        self.sampling = config.sampling(self.strategy)
        if "retrieval" in config.tasks and self.strategy == "persona" and retriever is None:
            raise ConfigError("the persona strategy of the retrieval task needs a PersonaRetriever")
        self.retriever = retriever
        self.templates: dict[str, PromptTemplate] = {}
        for task in config.tasks:
            for name in task_templates(task, self.strategy):
                self.templates[name] = load_template(
                    name, config.template_versions.get(name), config.prompts_dir
                )
        tag = (config.shard_index, config.num_shards)
        self.pairs_path = self.out / shard_name("pairs", *tag)
        self.failed_path = self.out / shard_name("failed", *tag)
        self.manifest_path = self.out / shard_name("manifest", *tag, suffix="json")
        self.report = RunReport(shard=f"shard-{config.shard_index:05d}-of-{config.num_shards:05d}")
        self._invocation: dict[str, Any] = {}
        self._consecutive_transport = 0

    # --- provenance -----------------------------------------------------------------------------

    def generator_info(self) -> dict[str, str]:
        return {"backend": self.backend.name, "model": str(self.backend.model)}

    def template_info(self) -> dict[str, dict[str, Any]]:
        return {name: {"version": t.version, "sha256": t.sha} for name, t in self.templates.items()}

    def decoding(self) -> str:
        """How replies are held to their schema: grammar, server format level, or the prompt alone."""
        if not self.config.constrained_decoding:
            return "prompt"
        return getattr(self.backend, "structured_mode", "json_schema")

    def fingerprint(self) -> dict[str, Any]:
        """What must not change between a run and its resumption (else the shards would mix recipes)."""
        keep = ("tasks", "task_weights", "languages", "bitext_languages", "lengths", "num", "seed",
                "max_attempts", "persona_top_k", "num_shards", "constrained_decoding")
        return {**{k: getattr(self.config, k) for k in keep}, "strategy": self.strategy,
                **asdict(self.sampling)}

    def manifest(self, corpus_info: dict[str, Any], history: list[dict[str, Any]]) -> dict[str, Any]:
        return {
            "kind": "embedforge.synth",
            "embedforge_version": __version__,
            "generator": self.generator_info(),
            "strategy": self.strategy,
            "decoding": self.decoding(),
            "sampling": asdict(self.sampling),
            "templates": self.template_info(),
            "config": self.config.model_dump(),
            "fingerprint": self.fingerprint(),
            "corpus": corpus_info,
            "files": {"pairs": self.pairs_path.name, "failed": self.failed_path.name},
            "report": asdict(self.report),
            "runs": history,
        }

    def _check_resume(self) -> list[dict[str, Any]]:
        """History of earlier runs of this shard; refuses to resume under a different recipe."""
        if not self.manifest_path.exists():
            return []
        old = read_json_file(self.manifest_path)
        if not isinstance(old, dict):
            raise InputError("not a synth manifest (expected a JSON object)", path=str(self.manifest_path))
        changes = [k for k, v in self.fingerprint().items() if old.get("fingerprint", {}).get(k) != v]
        if old.get("generator") != self.generator_info():
            changes.append("generator")
        if old.get("templates") != self.template_info():
            changes.append("templates")
        if changes:
            raise ConfigError(
                f"{self.manifest_path}: this shard was started with different settings "
                f"({', '.join(changes)}); "
                "resume with the same settings or write to a new output folder"
            )
        return list(old.get("runs", []))

    # --- the run ----------------------------------------------------------------------------------

    def run(self, passages: Sequence[Passage], corpus_info: dict[str, Any] | None = None) -> RunReport:
        """Synthesise this shard's passages; returns the report (also written to the manifest).

        The caller holds the shard's lock (`synthesize` does); a finished run leaves its shard
        files in corpus order, whatever order the replies came in."""
        claim_layout(self.out, self.config.num_shards)
        history = self._check_resume()
        todo_all = select_passages(passages, self.config)
        pairs = AppendOnlyShard(self.pairs_path, fsync=self.config.fsync)
        failed = AppendOnlyShard(self.failed_path, fsync=self.config.fsync)
        report = self.report
        report.recovered_torn_bytes = pairs.recovered_bytes + failed.recovered_bytes
        done = {r["passage_id"] for r in pairs.rows} | {r["passage_id"] for r in failed.rows}
        report.passages_in_shard = len(todo_all)
        report.skipped_already_done = sum(p.id in done for p in todo_all)
        report.rows_written = len(pairs.rows)
        report.passages_with_rows = len({r["passage_id"] for r in pairs.rows})
        report.tasks = dict(Counter(r["task"] for r in pairs.rows))
        report.passages_failed = dict(Counter(r["cause"] for r in failed.rows))
        todo = [p for p in todo_all if p.id not in done]
        corpus_info = dict(corpus_info or {})
        corpus_info.setdefault("passages", len(passages))
        corpus_info.setdefault(
            "ids_sha256", hashlib.sha256("\n".join(p.id for p in passages).encode()).hexdigest()
        )
        self._invocation = {"started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "todo": len(todo)}
        write_json(self.manifest_path, self.manifest(corpus_info, history + [self._invocation]))
        began = time.monotonic()
        finished = False
        try:
            asyncio.run(self._run_all(todo, pairs, failed))
            finished = True
        finally:
            pairs.close()
            failed.close()
            report.seconds = round(time.monotonic() - began, 3)
            report.pending = (
                report.passages_in_shard - report.passages_with_rows - sum(report.passages_failed.values())
            )
            report.status = (
                ("complete" if report.pending == 0 else "incomplete") if finished else "interrupted"
            )
            self._invocation.update(
                {
                    "seconds": report.seconds,
                    "status": report.status,
                    "invalid_outputs": report.invalid_outputs,
                    "transport_failures": report.transport_failures,
                    "llm_calls": report.llm_calls,
                    "decoding": self.decoding(),
                }
            )
            write_json(self.manifest_path, self.manifest(corpus_info, history + [self._invocation]))
        position = {p.id: i for i, p in enumerate(passages)}
        rewrite_in_order(self.pairs_path, position)
        rewrite_in_order(self.failed_path, position)
        return report

    async def _run_all(self, todo: list[Passage], pairs: AppendOnlyShard, failed: AppendOnlyShard) -> None:
        caller = async_caller(self.backend)
        progress = None
        if self.show_progress:
            from tqdm.auto import tqdm

            progress = tqdm(total=len(todo), desc=f"synth {self.report.shard}", unit="passage")
        inflight = self.config.inflight()
        semaphore = asyncio.Semaphore(inflight)
        stopped = False
        done, started, every = 0, time.monotonic(), max(1, len(todo) // 10)

        async def one(passage: Passage, plan: PassagePlan, candidates: list[Persona]) -> None:
            nonlocal stopped, done
            async with semaphore:
                if stopped:
                    return
                try:
                    self._write(await self._synthesise(caller, passage, plan, candidates), pairs, failed)
                except _Stop:
                    stopped = True
                done += 1
                if progress is not None:
                    progress.update(1)
                elif done % every == 0 or done == len(todo):  # a log line every 10% where no bar is shown
                    rate = (time.monotonic() - started) / done
                    logger.info("synth %s: %d/%d passages, %.1f s/passage, about %.0f s left", self.report.shard,
                                done, len(todo), rate, rate * (len(todo) - done))

        try:
            chunk = max(256, 4 * inflight)  # personas are retrieved a chunk at a time
            for start in range(0, len(todo), chunk):
                part = todo[start : start + chunk]
                plans = [plan_passage(p.id, self.config) for p in part]
                personas = self._personas_for(part, plans)
                await asyncio.gather(*(one(p, pl, c) for p, pl, c in zip(part, plans, personas)))
                if stopped:
                    logger.error(
                        "backend unreachable (%d transport failures in a row); stopping. Rerun the same "
                        "command to resume: finished passages are kept.",
                        self._consecutive_transport,
                    )
                    break
        finally:
            if progress is not None:
                progress.close()
            await caller.aclose()

    def _personas_for(self, part: list[Passage], plans: list[PassagePlan]) -> list[list[Persona]]:
        need = [i for i, plan in enumerate(plans) if plan.task == "retrieval" and self.strategy == "persona"]
        out: list[list[Persona]] = [[] for _ in part]
        if need:
            for i, found in zip(need, self.retriever.retrieve([part[i].text for i in need])):
                out[i] = found
        return out

    def _write(self, record: dict[str, Any], pairs: AppendOnlyShard, failed: AppendOnlyShard) -> None:
        if record.get("status") == "pending":
            return
        if record.get("status") == "failed":
            failed.append(record)
            self.report.passages_failed[record["cause"]] = (
                self.report.passages_failed.get(record["cause"], 0) + 1
            )
            return
        rows = record["rows"]
        pairs.append_group(rows)
        self.report.rows_written += len(rows)
        self.report.passages_with_rows += 1
        task = rows[0]["task"]
        self.report.tasks[task] = self.report.tasks.get(task, 0) + len(rows)

    async def _ask(
        self,
        caller,
        template: PromptTemplate,
        values: dict[str, Any],
        seed: int,
        language: str | None,
        language_fields: Sequence[str],
        attempts: dict[str, int],
    ):
        """Call the LLM until the reply validates (at most max_attempts); the parsed output."""
        messages = template.render(**values)
        params = GenerationParams(
            self.sampling.temperature,
            self.sampling.top_p,
            self.sampling.max_new_tokens,
            json_schema=decoding_schema(template.schema) if self.config.constrained_decoding else None,
        )
        last: OutputError | None = None
        for attempt in range(self.config.max_attempts):
            attempts[template.name] = attempt + 1
            self.report.llm_calls += 1
            result = await caller.complete(messages, params, seed + 7919 * attempt)
            if not result.ok:
                self._count(self.report.transport_failures, result.error)
                self._consecutive_transport += 1
                if self._consecutive_transport >= self.config.max_consecutive_transport_failures:
                    raise _Stop()
                raise _TransportFailure(result.error, result.detail)
            self._consecutive_transport = 0
            try:
                parsed = parse_output(result.text, template.schema)
                for name in language_fields:
                    if language and is_wrong_language(getattr(parsed, name), language):
                        raise OutputError("wrong_language", f"{name} is not {language_name(language)}")
                return parsed
            except OutputError as exc:
                self._count(self.report.invalid_outputs, exc.cause)
                last = exc
        raise _ContentFailure(last.cause, last.detail, template.name)

    @staticmethod
    def _count(counter: dict[str, int], key: str) -> None:
        counter[key] = counter.get(key, 0) + 1

    async def _persona_flow(self, caller, passage: Passage, plan: PassagePlan, candidates: list[Persona],
                            sampled: dict[str, Any], attempts: dict[str, int]):
        """The report's two calls: a configuration from the retrieved personas, then the query."""
        sampled["personas"] = [p.id for p in candidates]
        persona_list = "\n".join(f"{i}. {p.text}" for i, p in enumerate(candidates, start=1))
        chosen = await self._ask(
            caller, self.templates["retrieval_config"], {"passage": passage.text, "personas": persona_list},
            plan.seed, None, (), attempts,
        )
        persona = match_persona(chosen.character, candidates)
        sampled.update(
            character=chosen.character,
            persona_id=persona.id if persona else None,
            question_type=chosen.question_type,
            difficulty=chosen.difficulty,
        )
        out = await self._ask(
            caller,
            self.templates["retrieval_query"],
            {
                "character": chosen.character,
                "passage": passage.text,
                "question_type": chosen.question_type,
                "question_type_help": QUESTION_TYPE_HELP[chosen.question_type],
                "difficulty": chosen.difficulty.replace("_", " "),
                "length": plan.length,
                "language": language_name(plan.language),
            },
            plan.seed + 1,
            plan.language,
            ("query",),
            attempts,
        )
        return [(_pair(out.query, passage.text, [], DEFAULT_RETRIEVAL_INSTRUCTION), {})]

    async def _single_call(self, caller, spec: CallSpec, passage: Passage, plan: PassagePlan,
                           attempts: dict[str, int]):
        template = self.templates[spec.template]
        values = {"passage": passage.text, "length": plan.length, "language": language_name(plan.language)}
        missing = {"passage"} - template.slots
        if missing:
            raise ConfigError(f"template {template.tag} ({template.path}) must use the slot(s) {sorted(missing)}")
        values = {k: v for k, v in values.items() if k in template.slots}
        out = await self._ask(caller, template, values, plan.seed, plan.language, spec.language_fields, attempts)
        return spec.rows(out, passage)

    async def _synthesise(
        self, caller, passage: Passage, plan: PassagePlan, candidates: list[Persona]
    ) -> dict[str, Any]:
        attempts: dict[str, int] = {}
        sampled: dict[str, Any] = {"task": plan.task, "language": plan.language, "length": plan.length}
        spec = _call_spec(plan.task, self.strategy)
        if spec is not None and "length" not in self.templates[spec.template].slots:
            del sampled["length"]  # this template asks for no length: record none
        try:
            if spec is None:
                made = await self._persona_flow(caller, passage, plan, candidates, sampled, attempts)
            else:
                made = await self._single_call(caller, spec, passage, plan, attempts)
        except _ContentFailure as failure:
            return {
                "status": "failed",
                "passage_id": passage.id,
                "task": plan.task,
                "cause": failure.cause,
                "step": failure.step,
                "detail": failure.detail,
                "provenance": self._provenance(passage, plan, sampled, attempts),
            }
        except _TransportFailure:  # not recorded: the passage stays pending for the next run
            return {"status": "pending", "passage_id": passage.id}
        rows = []
        for index, (pair, extra) in enumerate(made):
            provenance = self._provenance(passage, plan, {**sampled, **extra}, attempts)
            if len(made) > 1:
                provenance["group"] = [index, len(made)]
            rows.append({
                **pair,
                "task": plan.task,
                "dataset": f"synth-{plan.task}",
                "language": plan.language,
                "passage_id": passage.id,
                "provenance": provenance,
            })
        return {"rows": rows}

    def _provenance(
        self, passage: Passage, plan: PassagePlan, sampled: dict[str, Any], attempts: dict[str, int]
    ) -> dict[str, Any]:
        used = task_templates(plan.task, self.strategy)
        return {
            "generator": self.generator_info(),
            "strategy": self.strategy if plan.task == "retrieval" else "one_call",
            "decoding": self.decoding(),
            "templates": {n: f"{n}.v{self.templates[n].version}@{self.templates[n].sha}" for n in used},
            "sampled": sampled,
            "seed": plan.seed,
            "run_seed": self.config.seed,
            "attempts": attempts,
            "sampling": asdict(self.sampling),
            "passage": {
                "id": passage.id,
                "doc_id": passage.doc_id,
                "chunk": passage.chunk,
                "source": passage.source,
                "text_hash": passage.text_hash,
            },
            "embedforge_version": __version__,
        }

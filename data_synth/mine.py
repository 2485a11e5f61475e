"""Hard-negative mining: embed the corpus in resumable chunks, search it with faiss a batch of
queries at a time (never a full similarity matrix), sample K negatives from a rank range, and drop
likely false negatives.

A candidate is never a negative when it is the positive or the query (compared by normalised text
hash, so exact duplicates elsewhere in the corpus are caught too), when it scores within `margin`
of the positive (score > pos_score - margin; the Qwen3 loss mask corresponds to margin = -0.1), or
when an optional reranker judges it relevant.

With a `teacher` (a yes/no reranker or a sequence-classification export), every written row also
carries `teacher_scores`: the teacher's log-odds for the positive, then for each negative in order
(data_synth/teacher.py), which train/distill.py turns into a margin-MSE or KL distillation loss.

Ranks are positions in the teacher's raw ranking of the corpus (0 = most similar), counted before
any candidate is removed, so `rank_range` means the same thing whatever the filters drop.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import Field, model_validator

from embedforge.config import StrictModel
from embedforge.data_synth.corpus import Passage, text_hash
from embedforge.data_synth.gates import Row, encode_rows
from embedforge.data_synth.shards import shard_name
from embedforge.errors import ConfigError, InputError
from embedforge.io import atomic_path, check_output, output_lock, read_json_file, write_json, write_jsonl
from embedforge.offline_models import public_name
from embedforge.outcome import StageOutcome
from embedforge.provenance import read_provenance, write_provenance
from embedforge.templates import DEFAULT_RETRIEVAL_INSTRUCTION

logger = logging.getLogger(__name__)


class MineConfig(StrictModel):
    """Everything `mine` needs; the paths and the model are filled by the caller (CLI or recipe)."""

    model: str | None = Field(default=None, description="embedder used for mining")
    data: list[str] | None = Field(default=None, description="pairs JSONL file(s) or synth/filter output folder(s)")
    corpus: str | None = Field(default=None, description="JSONL (id, text), Parquet, or a folder of .txt/.md")
    output: str | None = Field(default=None, description="output folder (embedding chunks are cached inside)")
    device: str | None = None
    embed_only: bool = Field(default=False, description="only embed this shard's corpus chunks")
    progress: bool = False
    num_negatives: int = Field(default=7, ge=1)
    rank_start: int = Field(default=10, ge=0, description="skip the teacher's top results (likely positives)")
    rank_end: int = Field(default=100, ge=1, description="sample from raw ranks [rank_start, rank_end)")
    margin: float = Field(default=0.05, description="drop candidates scoring above pos_score - margin")
    index: str = Field(default="flat", pattern="^(flat|ivf)$")
    nlist: int | None = Field(default=None, ge=1, description="IVF cells (default: 4 * sqrt(corpus size))")
    nprobe: int = Field(default=16, ge=1)
    use_gpu: bool | None = None  # None: a GPU faiss index when faiss and CUDA both offer one
    chunk_size: int = Field(default=8192, ge=1, description="passages per resumable embedding chunk")
    batch_size: int = Field(default=64, ge=1)
    query_batch: int = Field(default=1024, ge=1, description="queries searched at once")
    max_length: int | None = Field(default=512, ge=8)
    dim: int | None = Field(default=None, ge=1, description="Matryoshka width for mining")
    use_instructions: bool = True
    seed: int = 0
    reranker: str | None = None
    reranker_threshold: float = Field(default=0.5, ge=0, le=1)
    teacher: str | None = Field(default=None, description="reranker whose log-odds label every (query, positive) "
                                "and (query, negative) pair as `teacher_scores`, for distillation")
    teacher_template: Literal["auto", "qwen3", "chatml"] = Field(
        default="auto", description="yes/no prompt: qwen3 (empty think block), chatml (a bare assistant turn), "
        "auto: qwen3 when the tokenizer has a <think> token")
    teacher_max_length: int = Field(default=1024, ge=32, description="token limit of a teacher prompt")
    teacher_batch_size: int = Field(default=16, ge=1)
    teacher_drop_margin: float | None = Field(
        default=None, description="drop a row whose teacher scores a negative this many log-odds above the "
        "positive; unset: keep every row (the distillation loss learns from them)")
    keep_existing_negatives: bool = True
    shard_index: int = Field(default=0, ge=0)
    num_shards: int = Field(default=1, ge=1)
    overwrite: bool = Field(default=False, description="replace mined rows made from other data or settings")

    @model_validator(mode="after")
    def _ranges(self):
        if self.rank_end <= self.rank_start:
            raise ValueError(f"rank_end ({self.rank_end}) must be > rank_start ({self.rank_start})")
        if self.shard_index >= self.num_shards:
            raise ValueError(f"shard_index {self.shard_index} must be < num_shards {self.num_shards}")
        return self


@dataclass
class MineReport:
    rows: int = 0
    corpus: int = 0
    negatives: int = 0
    rows_short: int = 0  # rows that got fewer than num_negatives
    candidates: int = 0  # corpus entries seen inside the rank range, over all rows
    dropped_positive_or_duplicate: int = 0
    dropped_false_negative_margin: int = 0
    dropped_reranker: int = 0
    teacher_pairs_scored: int = 0
    teacher_pairs_reused: int = 0
    teacher_pair_accuracy: float | None = None
    teacher_rows_prefer_negative: int = 0
    dropped_teacher_rows: int = 0
    teacher_s: float = 0.0
    chunks_computed: int = 0
    chunks_reused: int = 0
    embed_corpus_s: float = 0.0
    embed_queries_s: float = 0.0
    search_s: float = 0.0
    total_s: float = 0.0
    index: str = ""


# --- corpus embeddings in resumable chunks ------------------------------------------------------------


def cache_key(config: MineConfig, passages: Sequence[Passage]) -> str:
    """Identifies the embeddings: same model, settings and corpus texts -> same chunk files."""
    h = hashlib.sha256()
    h.update(
        json.dumps(
            [
                os.path.abspath(config.model) if os.path.isdir(config.model) else config.model,
                config.max_length,
                config.dim,
                config.chunk_size,
            ]
        ).encode()
    )
    for p in passages:
        h.update(p.text_hash.encode())
    return h.hexdigest()[:16]


def chunk_path(cache_dir: Path, index: int) -> Path:
    return cache_dir / f"chunk-{index:05d}.npy"


def embed_corpus(
    embedder,
    passages: Sequence[Passage],
    config: MineConfig,
    cache_dir: Path,
    report: MineReport,
    only_own_shard: bool = False,
    show_progress: bool = False,
) -> None:
    """Make sure every chunk's embeddings are on disk. Chunks of this shard come first (i %
    num_shards == shard_index); with only_own_shard=False the missing others are computed too."""
    cache_dir.mkdir(parents=True, exist_ok=True)
    n_chunks = (len(passages) + config.chunk_size - 1) // config.chunk_size
    order = sorted(range(n_chunks), key=lambda i: (i % config.num_shards != config.shard_index, i))
    if only_own_shard:
        order = [i for i in order if i % config.num_shards == config.shard_index]
    began = time.monotonic()
    for i in order:
        path = chunk_path(cache_dir, i)
        if path.exists():
            report.chunks_reused += 1
            continue
        texts = [p.text for p in passages[i * config.chunk_size : (i + 1) * config.chunk_size]]
        vectors = embedder.encode(
            texts,
            dim=config.dim,
            batch_size=config.batch_size,
            max_length=config.max_length,
            show_progress=show_progress,
        )
        with atomic_path(path) as tmp, open(tmp, "wb") as fh:  # a killed run leaves no half chunk
            np.save(fh, vectors.astype(np.float32))
        report.chunks_computed += 1
        logger.info("embedded corpus chunk %d/%d", i + 1, n_chunks)
    report.embed_corpus_s += time.monotonic() - began


def load_chunks(cache_dir: Path, n_passages: int, chunk_size: int):
    n_chunks = (n_passages + chunk_size - 1) // chunk_size
    for i in range(n_chunks):
        path = chunk_path(cache_dir, i)
        if not path.exists():
            raise ConfigError(f"{path}: corpus embedding chunk missing")
        yield np.load(path)


# --- faiss -------------------------------------------------------------------------------------------


def build_index(cache_dir: Path, n_passages: int, config: MineConfig, dimension: int):
    import faiss

    if config.index == "flat":
        index = faiss.IndexFlatIP(dimension)
    else:
        nlist = config.nlist or max(1, int(4 * np.sqrt(n_passages)))
        nlist = min(nlist, n_passages)
        index = faiss.IndexIVFFlat(faiss.IndexFlatIP(dimension), dimension, nlist, faiss.METRIC_INNER_PRODUCT)
        rng = np.random.default_rng(config.seed)
        # train on a sample of at most 256 vectors per cell, read chunk by chunk
        take = min(n_passages, 256 * nlist)
        picked = np.sort(rng.choice(n_passages, size=take, replace=False))
        sample, offset = [], 0
        for chunk in load_chunks(cache_dir, n_passages, config.chunk_size):
            local = picked[(picked >= offset) & (picked < offset + len(chunk))] - offset
            sample.append(chunk[local])
            offset += len(chunk)
        index.train(np.concatenate(sample))
        index.nprobe = config.nprobe
    use_gpu = config.use_gpu
    gpu_ok = hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0
    if use_gpu and not gpu_ok:
        raise ConfigError("use_gpu=True but this faiss build sees no GPU (install faiss-gpu)")
    if (use_gpu is None and gpu_ok) or use_gpu:
        index = faiss.index_cpu_to_all_gpus(index)
    for chunk in load_chunks(cache_dir, n_passages, config.chunk_size):
        index.add(np.ascontiguousarray(chunk, dtype=np.float32))
    return index


# --- selection (pure) --------------------------------------------------------------------------------


@dataclass
class Selection:
    negatives: list[int]  # corpus indices
    scores: list[float]
    ranks: list[int]
    candidates: int = 0  # corpus entries inside the rank range
    dropped_same: int = 0
    dropped_margin: int = 0
    dropped_reranker: int = 0


def select_negatives(
    ids: np.ndarray,
    scores: np.ndarray,
    pos_score: float,
    forbidden: set[str],
    corpus_hashes: Sequence[str],
    config: MineConfig,
    rng: random.Random,
    reranker_verdict=None,
) -> Selection:
    """Negatives for one query from its raw top-k (ids/scores sorted by descending score).

    reranker_verdict(list of corpus ids) -> list of bools (True = relevant, drop) is applied to the
    candidates left after the cheaper filters.
    """
    sel = Selection([], [], [])
    candidates = []
    for rank, (idx, score) in enumerate(zip(ids.tolist(), scores.tolist())):
        if idx < 0 or rank >= config.rank_end:
            break
        if rank < config.rank_start:
            continue
        sel.candidates += 1
        if corpus_hashes[idx] in forbidden:
            sel.dropped_same += 1
        elif score > pos_score - config.margin:
            sel.dropped_margin += 1
        else:
            candidates.append((idx, score, rank))
    if reranker_verdict is not None and candidates:
        relevant = reranker_verdict([c[0] for c in candidates])
        sel.dropped_reranker = sum(relevant)
        candidates = [c for c, r in zip(candidates, relevant) if not r]
    seen: set[str] = set()
    unique = []
    for c in candidates:  # the corpus was deduplicated, but a caller may pass one that was not
        if corpus_hashes[c[0]] not in seen:
            seen.add(corpus_hashes[c[0]])
            unique.append(c)
    chosen = sorted(rng.sample(unique, min(config.num_negatives, len(unique))), key=lambda c: c[2])
    sel.negatives = [c[0] for c in chosen]
    sel.scores = [round(float(c[1]), 4) for c in chosen]
    sel.ranks = [c[2] for c in chosen]
    return sel


# --- the run ---------------------------------------------------------------------------------------


def mine_rows(
    rows: Sequence[Row],
    passages: Sequence[Passage],
    config: MineConfig,
    output_dir: str | Path,
    embedder=None,
    reranker=None,
    embed_only: bool = False,
    show_progress: bool = False,
    teacher=None,
) -> MineReport:
    """Mine this shard's rows; writes `mined-XXXXX-of-YYYYY.jsonl` and a report into output_dir.

    teacher: a `data_synth.teacher.TeacherScorer`; each written row then carries `teacher_scores`.
    """
    from embedforge.embedder import Embedder

    report = MineReport(corpus=len(passages), index=config.index)
    began = time.monotonic()
    out = Path(output_dir)
    embedder = embedder or Embedder.from_pretrained(config.model)
    cache_dir = out / "embeddings" / cache_key(config, passages)
    embed_corpus(
        embedder, passages, config, cache_dir, report, only_own_shard=embed_only, show_progress=show_progress
    )
    if embed_only:
        report.total_s = time.monotonic() - began
        return report

    mine_rows = [dict(r) for i, r in enumerate(rows) if i % config.num_shards == config.shard_index]
    report.rows = len(mine_rows)
    dimension = config.dim or embedder.dimension
    index = build_index(cache_dir, len(passages), config, dimension)
    hashes = [p.text_hash for p in passages]

    t = time.monotonic()
    q_instr = [
        (r.get("instruction") or DEFAULT_RETRIEVAL_INSTRUCTION) if config.use_instructions else None
        for r in mine_rows
    ]
    queries = encode_rows(embedder, [r["query"] for r in mine_rows], q_instr, config.batch_size)
    positives = encode_rows(
        embedder, [r["positive"] for r in mine_rows], [None] * len(mine_rows), config.batch_size
    )
    if config.dim:
        queries, positives = _truncate(queries, config.dim), _truncate(positives, config.dim)
    report.embed_queries_s = time.monotonic() - t
    pos_scores = np.einsum("ij,ij->i", queries, positives)

    verdict_for = None
    if reranker is not None:

        def verdict_for(query: str):
            def verdict(ids: list[int]) -> list[bool]:
                probs = reranker.score(query, [passages[i].text for i in ids])
                return [bool(p >= config.reranker_threshold) for p in probs]

            return verdict

    t = time.monotonic()
    for start in range(0, len(mine_rows), config.query_batch):
        block = np.ascontiguousarray(queries[start : start + config.query_batch])
        scores, ids = index.search(block, config.rank_end)
        for offset in range(len(block)):
            i = start + offset
            row = mine_rows[i]
            forbidden = {text_hash(row["positive"]), text_hash(row["query"])}
            rng = random.Random(f"{config.seed}:{text_hash(row['query'])}:{text_hash(row['positive'])}")
            sel = select_negatives(
                ids[offset],
                scores[offset],
                float(pos_scores[i]),
                forbidden,
                hashes,
                config,
                rng,
                verdict_for(row["query"]) if verdict_for else None,
            )
            existing = []
            if config.keep_existing_negatives and isinstance(row.get("negatives"), list):
                existing = [
                    n for n in row["negatives"] if isinstance(n, str) and text_hash(n) not in forbidden
                ]
            existing_hashes = {text_hash(n) for n in existing}
            mined = [passages[j].text for j in sel.negatives if hashes[j] not in existing_hashes]
            row["negatives"] = existing + mined
            row.setdefault("provenance", {})["mining"] = {
                "model": config.model,
                "rank_range": [config.rank_start, config.rank_end],
                "margin": config.margin,
                "index": config.index,
                "positive_score": round(float(pos_scores[i]), 4),
                "negative_scores": sel.scores,
                "negative_ranks": sel.ranks,
                "reranker": config.reranker,
            }
            if teacher is not None:
                row["provenance"]["mining"].update(teacher=public_name(config.teacher or teacher.name),
                                                   teacher_template=teacher.template)
            report.negatives += len(mined)
            report.rows_short += len(mined) < config.num_negatives
            report.candidates += sel.candidates
            report.dropped_positive_or_duplicate += sel.dropped_same
            report.dropped_false_negative_margin += sel.dropped_margin
            report.dropped_reranker += sel.dropped_reranker
    report.search_s = time.monotonic() - t
    if teacher is not None:
        mine_rows = _teacher_scores(mine_rows, teacher, config, out, report)
    tag = (config.shard_index, config.num_shards)
    write_jsonl(out / shard_name("mined", *tag), mine_rows)
    report.total_s = time.monotonic() - began
    write_json(
        out / shard_name("mine_report", *tag, suffix="json"),
        {"report": asdict(report), "config": config.model_dump(), "cache": str(cache_dir),
         "identity": run_identity(config, rows, passages)},
    )
    return report


def _teacher_scores(rows: list[dict], teacher, config: MineConfig, out: Path, report: MineReport) -> list[dict]:
    from embedforge.data_synth.teacher import cache_folder, score_rows

    folder = cache_folder(out, config.teacher or teacher.name, teacher.template, teacher.max_length)
    kept, counts = score_rows(rows, teacher, folder, config.teacher_drop_margin)
    report.teacher_pairs_scored, report.teacher_pairs_reused = counts.scored, counts.reused
    report.teacher_pair_accuracy = counts.pair_accuracy
    report.teacher_rows_prefer_negative = counts.rows_prefer_negative
    report.dropped_teacher_rows = counts.dropped_rows
    report.teacher_s = counts.seconds
    return kept


# Settings that change how a run goes, never what it writes.
_RUN_ONLY = {"data", "corpus", "output", "device", "progress", "embed_only", "overwrite", "use_gpu", "chunk_size",
             "batch_size", "query_batch", "teacher_batch_size"}


def run_identity(config: MineConfig, rows: Sequence[Row], passages: Sequence[Passage]) -> dict[str, Any]:
    """What a shard's mined rows are a function of: the settings and the contents of data and corpus."""
    data = hashlib.sha256()
    for row in rows:
        data.update(json.dumps([row["query"], row["positive"], row.get("negatives"), row.get("instruction")],
                               ensure_ascii=False).encode())
    corpus = hashlib.sha256("\n".join(p.text_hash for p in passages).encode())
    return {"settings": config.model_dump(exclude=_RUN_ONLY), "data_sha256": data.hexdigest(),
            "corpus_sha256": corpus.hexdigest()}


def check_rerun(config: MineConfig, rows: Sequence[Row], passages: Sequence[Passage]) -> None:
    """A shard mined before from other data or settings is replaced only under `overwrite`."""
    tag = (config.shard_index, config.num_shards)
    mined = Path(config.output) / shard_name("mined", *tag)
    if config.overwrite or not mined.exists():
        return
    report_path = Path(config.output) / shard_name("mine_report", *tag, suffix="json")
    previous = read_json_file(report_path) if report_path.exists() else {}
    old = previous.get("identity") or {} if isinstance(previous, dict) else {}
    new = run_identity(config, rows, passages)
    changed = [k for k in ("data_sha256", "corpus_sha256") if old.get(k) != new[k]]
    changed += [k for k, v in new["settings"].items() if old.get("settings", {}).get(k, v) != v]
    if changed or not old:
        what = ", ".join(k.removesuffix("_sha256") for k in changed) or "unknown settings"
        raise InputError(f"holds rows mined from other inputs or settings ({what}); pass --overwrite to "
                         "replace them or choose another output", path=str(mined))


def _truncate(vectors: np.ndarray, dim: int) -> np.ndarray:
    cut = vectors[:, :dim]
    return cut / np.maximum(np.linalg.norm(cut, axis=1, keepdims=True), 1e-12)


def load_mine_corpus(path: str | os.PathLike, **kwargs: Any) -> list[Passage]:
    """Corpus passages for mining: whole documents (no chunking), exact duplicates removed."""
    from embedforge.data_synth.corpus import load_corpus

    return load_corpus(path, chunk_tokens=None, dedup=True, **kwargs)


# --- the stage function -----------------------------------------------------------------------------

SHORT_ROWS = 0.5  # warn when more than this share of the rows got fewer than K negatives
MARGIN_DROPS = 0.5  # warn when the margin dropped more than this share of the candidates
TEACHER_ACCURACY = 0.6  # warn when the teacher prefers the positive in fewer (query, positive, negative) pairs


class MineOutcome(StageOutcome):
    """What `mine` wrote (`output` is the folder) and why negatives were dropped."""

    rows: int = 0
    corpus: int = 0
    negatives: int = 0
    rows_short: int = Field(0, description="rows that got fewer than num_negatives")
    candidates: int = Field(0, description="corpus entries seen inside the rank range, over all rows")
    dropped_positive_or_duplicate: int = 0
    dropped_false_negative_margin: int = 0
    dropped_reranker: int = 0
    teacher_pairs_scored: int = Field(0, description="(query, document) pairs the teacher scored in this run")
    teacher_pairs_reused: int = Field(0, description="pairs whose teacher score came from an earlier run")
    teacher_pair_accuracy: float | None = Field(None, description="share of (positive, negative) pairs where the "
                                                "teacher scores the positive higher")
    teacher_rows_prefer_negative: int = Field(0, description="rows where the teacher scores a negative above the "
                                              "positive")
    dropped_teacher_rows: int = Field(0, description="rows dropped by teacher_drop_margin")
    files: list[str] = Field(default_factory=list, description="the mined-*.jsonl shard(s) written")
    seconds: float = 0.0


def mine(config: MineConfig) -> MineOutcome:
    """Mine hard negatives for `config.data` from `config.corpus` and write `mined-*.jsonl` rows
    (ready for training) into `config.output`.

    No negatives, many rows short of K, or a margin that dropped most candidates are not errors:
    each is a warning in the outcome that says which setting to look at.
    """
    for name, what in (("model", "the embedder to mine with"), ("corpus", "the passages to mine from"),
                       ("output", "the output folder")):
        if not getattr(config, name):
            raise ConfigError(f"mine: `{name}` is not set ({what})")
    if not config.data and not config.embed_only:
        raise ConfigError("mine: `data` is not set (pairs JSONL file(s) or synth/filter output folder(s))")
    from embedforge.data_synth.filtering import read_pairs

    check_output(config.output, [*(config.data or []), config.corpus, config.model, config.reranker,
                                 config.teacher], resumable=True)
    passages = load_mine_corpus(config.corpus)  # bad input fails before anything is written or loaded
    rows = [] if config.embed_only else read_pairs(config.data)[0]
    if not rows and not config.embed_only:
        raise InputError("no rows to mine negatives for", path=", ".join(config.data))
    with output_lock(Path(config.output) / shard_name("mined", config.shard_index, config.num_shards)):
        if not config.embed_only:
            check_rerun(config, rows, passages)
        return _mine_locked(config, rows, passages)


def _mine_locked(config: MineConfig, rows: list[Row], passages: list[Passage]) -> MineOutcome:
    from embedforge.data_synth.models import load_embedder, resolve_model

    embedder = load_embedder(config.model, config.device)
    reranker = None
    if config.reranker:
        from embedforge.reranker import Reranker

        reranker = Reranker.from_pretrained(resolve_model(config.reranker), device=config.device)
    teacher = None
    if config.teacher and not config.embed_only:
        from embedforge.data_synth.teacher import TeacherScorer
        from embedforge.reranker import Reranker

        judge = reranker if reranker is not None and config.reranker == config.teacher else \
            Reranker.from_pretrained(resolve_model(config.teacher), device=config.device)
        teacher = TeacherScorer(judge, template=config.teacher_template, max_length=config.teacher_max_length,
                                batch_size=config.teacher_batch_size)
    report = mine_rows(rows, passages, config, config.output, embedder=embedder, reranker=reranker,
                       embed_only=config.embed_only, show_progress=config.progress, teacher=teacher)
    tag = (config.shard_index, config.num_shards)
    outcome = MineOutcome(
        output=config.output,
        rows=report.rows,
        corpus=report.corpus,
        negatives=report.negatives,
        rows_short=report.rows_short,
        candidates=report.candidates,
        dropped_positive_or_duplicate=report.dropped_positive_or_duplicate,
        dropped_false_negative_margin=report.dropped_false_negative_margin,
        dropped_reranker=report.dropped_reranker,
        teacher_pairs_scored=report.teacher_pairs_scored,
        teacher_pairs_reused=report.teacher_pairs_reused,
        teacher_pair_accuracy=report.teacher_pair_accuracy,
        teacher_rows_prefer_negative=report.teacher_rows_prefer_negative,
        dropped_teacher_rows=report.dropped_teacher_rows,
        files=[] if config.embed_only else [str(Path(config.output) / shard_name("mined", *tag))],
        seconds=round(report.total_s, 3),
    )
    if not config.embed_only:
        _warn(outcome, config)
        write_provenance(
            config.output,
            read_provenance(*(config.data or []), config.corpus),
            "mine",
            model=config.model,
            teacher=None if teacher is None else {"model": public_name(config.teacher),
                                                  "template": teacher.template, "score": "log-odds of yes"},
            settings=config.model_dump(exclude={"data", "corpus", "output", "device", "progress", "overwrite"}),
            corpus=len(passages),
            counts=outcome.metrics(),
            warnings=outcome.warnings,
        )
    return outcome


def _warn(outcome: MineOutcome, config: MineConfig) -> None:
    if outcome.rows == 0:
        outcome.warn(f"mine: shard {config.shard_index} of {config.num_shards} got no rows (the data has fewer "
                     "rows than shards)")
        return
    margin_share = outcome.dropped_false_negative_margin / max(1, outcome.candidates)
    why = (f"the margin ({config.margin:g}) dropped {outcome.dropped_false_negative_margin} of "
           f"{outcome.candidates} candidates in ranks {config.rank_start}:{config.rank_end}")
    if outcome.negatives == 0:
        outcome.warn(f"mine produced 0 negatives for {outcome.rows} rows ({why}; "
                     f"{outcome.dropped_positive_or_duplicate} were the positive or a duplicate, "
                     f"corpus of {outcome.corpus}): lower the margin or widen the rank range")
        return
    if outcome.rows_short > SHORT_ROWS * outcome.rows:
        outcome.warn(f"mine: {outcome.rows_short} of {outcome.rows} rows got fewer than "
                     f"{config.num_negatives} negatives (corpus of {outcome.corpus}, ranks "
                     f"{config.rank_start}:{config.rank_end})")
    if margin_share > MARGIN_DROPS:
        outcome.warn(f"mine: {why}; the teacher scores many passages close to the positives")
    accuracy = outcome.teacher_pair_accuracy
    if accuracy is not None and accuracy < TEACHER_ACCURACY:
        outcome.warn(f"mine: the teacher {public_name(config.teacher)} scores the positive above a mined negative "
                     f"in only {accuracy:.0%} of pairs: as a distillation teacher it would mostly teach noise "
                     "(too weak a model for this data, or the wrong teacher_template)")
    if outcome.dropped_teacher_rows:
        outcome.warn(f"mine: teacher_drop_margin ({config.teacher_drop_margin:g}) dropped "
                     f"{outcome.dropped_teacher_rows} of {outcome.rows} rows")

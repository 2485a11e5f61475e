"""Load a BEIR folder (`corpus.jsonl`, `queries.jsonl`, `qrels/<split>.tsv`) and check it.

Every problem is reported with file, line and field: duplicate ids, empty texts, qrels naming an
id that is in neither file, non-integer grades. A document's text is `title + " " + text`, the
convention of BEIR and MTEB. Queries without judgments are dropped, as BEIR drops them.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

from embedforge.errors import InputError
from embedforge.io import atomic_dir, brief, iter_jsonl, iter_text_lines, require_str


@dataclass
class BeirData:
    """queries/corpus map id -> text; qrels map query id -> {doc id: grade}."""

    queries: dict[str, str]
    corpus: dict[str, str]
    qrels: dict[str, dict[str, int]]
    source: str = ""

    def __post_init__(self):
        validate(self)


def _read_id(obj: dict, path: str, line: int) -> str:
    if "_id" not in obj:
        raise InputError("missing field", path=path, line=line, field="_id")
    value = obj["_id"]
    if isinstance(value, int) and not isinstance(value, bool):
        value = str(value)
    if not isinstance(value, str) or not value.strip():
        raise InputError(f"expected a non-empty string id, got {brief(value)}", path=path, line=line, field="_id")
    return value


def read_corpus(path: str | os.PathLike) -> dict[str, str]:
    path = str(path)
    corpus: dict[str, str] = {}
    first_line: dict[str, int] = {}
    for line, obj in iter_jsonl(path):
        doc_id = _read_id(obj, path, line)
        if doc_id in corpus:
            raise InputError(f"duplicate _id {brief(doc_id)} (first at line {first_line[doc_id]})",
                             path=path, line=line, field="_id")
        title = obj.get("title") or ""
        if not isinstance(title, str):
            raise InputError(f"expected a string, got {type(title).__name__}", path=path, line=line, field="title")
        text = require_str(obj, "text", path=path, line=line, allow_empty=bool(title.strip()))
        corpus[doc_id] = f"{title} {text}".strip()
        first_line[doc_id] = line
    if not corpus:
        raise InputError("corpus is empty", path=path)
    return corpus


def read_queries(path: str | os.PathLike) -> dict[str, str]:
    path = str(path)
    queries: dict[str, str] = {}
    first_line: dict[str, int] = {}
    for line, obj in iter_jsonl(path):
        query_id = _read_id(obj, path, line)
        if query_id in queries:
            raise InputError(f"duplicate _id {brief(query_id)} (first at line {first_line[query_id]})",
                             path=path, line=line, field="_id")
        queries[query_id] = require_str(obj, "text", path=path, line=line)
        first_line[query_id] = line
    if not queries:
        raise InputError("no queries", path=path)
    return queries


def read_qrels(
    path: str | os.PathLike, queries: dict[str, str] | None = None, corpus: dict[str, str] | None = None
) -> dict[str, dict[str, int]]:
    """`query-id <TAB> corpus-id <TAB> score` rows (a header row is optional); ids are checked
    against queries and corpus when given."""
    path = str(path)
    qrels: dict[str, dict[str, int]] = {}
    seen_rows = False
    for line, raw in iter_text_lines(path):
        if not raw.strip():
            continue
        cols = raw.rstrip("\r\n").split("\t")
        if len(cols) == 4:  # TREC format: qid iteration docid grade
            cols = [cols[0], cols[2], cols[3]]
        if len(cols) != 3:
            raise InputError(f"expected 3 tab-separated columns (query-id, corpus-id, score), got {len(cols)}",
                             path=path, line=line)
        query_id, doc_id, grade_text = (c.strip() for c in cols)
        try:
            grade = int(grade_text)
        except ValueError:
            if not seen_rows and grade_text.lower() in ("score", "relevance", "grade"):
                seen_rows = True
                continue  # the header row
            raise InputError(f"relevance grade must be an integer, got {brief(grade_text)}",
                             path=path, line=line, field="score") from None
        seen_rows = True
        if not query_id or not doc_id:
            raise InputError("empty id", path=path, line=line, field="query-id" if not query_id else "corpus-id")
        if queries is not None and query_id not in queries:
            raise InputError(f"query id {brief(query_id)} is not in queries.jsonl", path=path, line=line,
                             field="query-id")
        if corpus is not None and doc_id not in corpus:
            raise InputError(f"corpus id {brief(doc_id)} is not in corpus.jsonl", path=path, line=line,
                             field="corpus-id")
        judged = qrels.setdefault(query_id, {})
        if doc_id in judged and judged[doc_id] != grade:
            raise InputError(f"({brief(query_id)}, {brief(doc_id)}) is judged twice with different grades "
                             f"({judged[doc_id]} and {grade})", path=path, line=line)
        judged[doc_id] = grade
    if not qrels:
        raise InputError("no judgments", path=path)
    return qrels


def load_beir(folder: str | os.PathLike, split: str = "test") -> BeirData:
    """Read and check a BEIR folder; queries without judgments in `split` are dropped."""
    root = Path(folder)
    if not root.is_dir():
        raise InputError("BEIR folder not found", path=str(root))
    corpus = read_corpus(root / "corpus.jsonl")
    queries = read_queries(root / "queries.jsonl")
    qrels_path = root / "qrels" / f"{split}.tsv"
    if not qrels_path.exists():
        available = sorted(p.stem for p in (root / "qrels").glob("*.tsv")) if (root / "qrels").is_dir() else []
        raise InputError(f"no qrels for split {split!r} (found: {available or 'none'})", path=str(qrels_path))
    qrels = read_qrels(qrels_path, queries, corpus)
    return BeirData({q: queries[q] for q in queries if q in qrels}, corpus, qrels, source=str(root))


def fingerprint(folder: str | os.PathLike, split: str = "test") -> str:
    """sha256 of the three files an evaluation reads (corpus, queries, qrels of `split`): two
    results are comparable query by query only when they were computed on the same bytes."""
    root = Path(folder)
    digest = hashlib.sha256()
    for path in (root / "corpus.jsonl", root / "queries.jsonl", root / "qrels" / f"{split}.tsv"):
        digest.update(f"{path.relative_to(root).as_posix()}\0".encode())
        with open(path, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


def validate(data: BeirData) -> None:
    """Checks for data built in memory (the in-training dev set), with the same messages."""
    for what, mapping in (("query", data.queries), ("document", data.corpus)):
        if not mapping:
            raise InputError(f"no {what}s")
        for key, text in mapping.items():
            if not isinstance(key, str) or not key:
                raise InputError(f"{what} id {key!r}: expected a non-empty string")
            if not isinstance(text, str) or not text.strip():
                raise InputError(f"{what} {key!r}: empty text")
    if not data.qrels:
        raise InputError("no judgments (qrels are empty)")
    for query_id, judged in data.qrels.items():
        if query_id not in data.queries:
            raise InputError(f"qrels name query id {query_id!r}, which is not among the queries")
        for doc_id, grade in judged.items():
            if doc_id not in data.corpus:
                raise InputError(f"qrels of query {query_id!r} name corpus id {doc_id!r}, which is not in the corpus")
            if isinstance(grade, bool) or not isinstance(grade, int):
                raise InputError(f"qrels ({query_id!r}, {doc_id!r}): grade must be an integer, got {grade!r}")


def write_beir(folder: str | os.PathLike, data: BeirData, split: str = "test", overwrite: bool = False) -> Path:
    """Write a BEIR folder atomically (used by the real-data builders and tests)."""
    with atomic_dir(folder, overwrite=overwrite) as tmp:
        with open(tmp / "corpus.jsonl", "w", encoding="utf-8") as fh:
            fh.writelines(json.dumps({"_id": doc_id, "title": "", "text": text}, ensure_ascii=False) + "\n" for doc_id, text in data.corpus.items())
        with open(tmp / "queries.jsonl", "w", encoding="utf-8") as fh:
            fh.writelines(json.dumps({"_id": query_id, "text": text}, ensure_ascii=False) + "\n" for query_id, text in data.queries.items())
        (tmp / "qrels").mkdir()
        with open(tmp / "qrels" / f"{split}.tsv", "w", encoding="utf-8") as fh:
            fh.write("query-id\tcorpus-id\tscore\n")
            for query_id, judged in data.qrels.items():
                fh.writelines(f"{query_id}\t{doc_id}\t{grade}\n" for doc_id, grade in judged.items())
    return Path(folder)

"""Corpus ingestion: JSONL (`id`, `text`), Parquet, or a folder of .txt/.md files, cut into
passages by tokens with overlap, deduplicated, each with an id that is stable across reruns.

Stable ids matter because a resumed or sharded synthesis run recognises its finished passages by
id: `{doc_id}#{chunk}` depends only on the document and the chunking settings, never on the order
the files were read in or on which process read them.
"""

from __future__ import annotations

import hashlib
import os
import re
import unicodedata
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from embedforge.errors import InputError
from embedforge.io import brief, iter_jsonl, read_text_file, require_str

TEXT_SUFFIXES = (".txt", ".md")
_WORD = re.compile(r"\S+")
_SPACE = re.compile(r"\s+")

# A span tokenizer returns (start, end) character offsets of each token: chunks are then exact
# substrings of the document, so a passage never gains or loses characters at its edges.
SpanTokenizer = Callable[[str], list[tuple[int, int]]]


@dataclass(frozen=True)
class Passage:
    id: str
    text: str
    doc_id: str
    chunk: int = 0
    source: str = ""

    @property
    def text_hash(self) -> str:
        return text_hash(self.text)


def normalize_text(text: str) -> str:
    """Casefolded, NFKC, whitespace collapsed: two texts equal under this are the same passage."""
    return _SPACE.sub(" ", unicodedata.normalize("NFKC", text).casefold()).strip()


def text_hash(text: str) -> str:
    return hashlib.sha1(normalize_text(text).encode("utf-8")).hexdigest()[:16]


def word_spans(text: str) -> list[tuple[int, int]]:
    """Whitespace-separated words: the default token unit when no tokenizer is named."""
    return [m.span() for m in _WORD.finditer(text)]


def hf_spans(tokenizer_path: str | os.PathLike) -> SpanTokenizer:
    """Token offsets from a Hugging Face fast tokenizer (the generator's or the embedder's)."""
    from embedforge.modeling import load_tokenizer

    tokenizer = load_tokenizer(tokenizer_path)
    if not getattr(tokenizer, "is_fast", False):
        raise InputError(f"{tokenizer_path}: chunking by tokens needs a fast tokenizer (offsets)")

    def spans(text: str) -> list[tuple[int, int]]:
        enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        return [(a, b) for a, b in enc["offset_mapping"] if b > a]

    return spans


def chunk_text(text: str, max_tokens: int, overlap: int, spans: SpanTokenizer = word_spans) -> list[str]:
    """Windows of `max_tokens` tokens, each starting `max_tokens - overlap` tokens after the last."""
    if max_tokens < 1:
        raise InputError(f"chunk size must be >= 1 token, got {max_tokens}")
    if not 0 <= overlap < max_tokens:
        raise InputError(f"overlap must be in [0, {max_tokens}), got {overlap}")
    offsets = spans(text)
    if len(offsets) <= max_tokens:
        return [text.strip()] if text.strip() else []
    stride = max_tokens - overlap
    chunks = []
    for start in range(0, len(offsets), stride):
        window = offsets[start : start + max_tokens]
        chunks.append(text[window[0][0] : window[-1][1]].strip())
        if start + max_tokens >= len(offsets):
            break
    return [c for c in chunks if c]


def iter_documents(
    path: str | os.PathLike, text_field: str = "text", id_field: str = "id"
) -> Iterator[tuple[str, str, str]]:
    """(doc_id, text, source) from a JSONL file, a Parquet file or a folder of .txt/.md files."""
    path = Path(path)
    if path.is_dir():
        yield from _iter_folder(path)
    elif not path.exists():
        raise InputError("corpus not found", path=str(path))
    elif path.suffix == ".parquet":
        yield from _iter_parquet(path, text_field, id_field)
    elif path.suffix in (".jsonl", ".json", ".ndjson"):
        yield from _iter_jsonl(path, text_field, id_field)
    elif path.suffix in TEXT_SUFFIXES:
        yield path.stem, read_text_file(path), str(path)
    else:
        raise InputError(
            "unknown corpus format; expected .jsonl, .parquet, .txt/.md or a folder", path=str(path)
        )


def _iter_jsonl(path: Path, text_field: str, id_field: str) -> Iterator[tuple[str, str, str]]:
    seen: dict[str, int] = {}
    for line, obj in iter_jsonl(path):
        doc_id = _doc_id(obj.get(id_field, obj.get("_id")), str(path), line, id_field)
        text = require_str(obj, text_field, path=str(path), line=line)
        if doc_id in seen:
            raise InputError(
                f"duplicate id {brief(doc_id)} (first at line {seen[doc_id]})",
                path=str(path),
                line=line,
                field=id_field,
            )
        seen[doc_id] = line
        title = obj.get("title")
        yield doc_id, f"{title}\n{text}" if isinstance(title, str) and title.strip() else text, str(path)


def _iter_parquet(path: Path, text_field: str, id_field: str) -> Iterator[tuple[str, str, str]]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except (pa.ArrowException, OSError) as exc:
        raise InputError(f"not a readable Parquet file ({str(exc).splitlines()[0]})", path=str(path)) from None
    if text_field not in table.column_names:
        raise InputError(
            f"no column {text_field!r} (columns: {table.column_names})", path=str(path), field=text_field
        )
    texts = _column(table, text_field, path)
    ids = _column(table, id_field, path) if id_field in table.column_names else [None] * len(texts)
    seen: set[str] = set()
    for row, (raw_id, text) in enumerate(zip(ids, texts), start=1):
        doc_id = _doc_id(raw_id, str(path), row, id_field)
        if not isinstance(text, str) or not text.strip():
            raise InputError(f"expected a non-empty string, got {type(text).__name__}", path=str(path), line=row,
                             field=text_field)
        if doc_id in seen:
            raise InputError(f"duplicate id {brief(doc_id)}", path=str(path), line=row, field=id_field)
        seen.add(doc_id)
        yield doc_id, text, str(path)


def _column(table, name: str, path: Path) -> list:
    """A column's values; a string that is not UTF-8 is named by its row (1-based, as `line`)."""
    column = table.column(name)
    try:
        return column.to_pylist()
    except UnicodeDecodeError:
        for row, value in enumerate(column, start=1):
            try:
                value.as_py()
            except UnicodeDecodeError as exc:
                raise InputError(f"not valid UTF-8 (byte 0x{exc.object[exc.start]:02x} at column {exc.start + 1})",
                                 path=str(path), line=row, field=name) from None
        raise


def _iter_folder(folder: Path) -> Iterator[tuple[str, str, str]]:
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix in TEXT_SUFFIXES)
    if not files:
        raise InputError("folder holds no .txt or .md files", path=str(folder))
    for file in files:
        text = read_text_file(file)
        if text.strip():
            yield file.relative_to(folder).as_posix(), text, str(file)


def _doc_id(raw, path: str, line: int, field: str) -> str:
    """A missing id becomes the row number, so ids stay stable as long as the file does."""
    if raw is None:
        return f"row{line}"
    if isinstance(raw, bool) or not isinstance(raw, (str, int)) or not str(raw).strip():
        raise InputError(
            f"expected a non-empty string or integer id, got {brief(raw)}", path=path, line=line, field=field
        )
    return str(raw)


def load_corpus(
    path: str | os.PathLike,
    *,
    chunk_tokens: int | None = 256,
    overlap: int = 32,
    spans: SpanTokenizer = word_spans,
    text_field: str = "text",
    id_field: str = "id",
    dedup: bool = True,
) -> list[Passage]:
    """Passages in corpus order; chunk_tokens=None keeps each document whole.

    Dedup keeps the first passage of each normalised text, so the survivor is the same on every
    rerun.
    """
    passages: list[Passage] = []
    seen: set[str] = set()
    for doc_id, text, source in iter_documents(path, text_field, id_field):
        chunks = chunk_text(text, chunk_tokens, overlap, spans) if chunk_tokens else [text.strip()]
        for index, chunk in enumerate(chunks):
            passage = Passage(id=f"{doc_id}#{index}", text=chunk, doc_id=doc_id, chunk=index, source=source)
            if dedup:
                key = passage.text_hash
                if key in seen:
                    continue
                seen.add(key)
            passages.append(passage)
    if not passages:
        raise InputError("corpus holds no text", path=str(path))
    return passages


def shard_of(passage_id: str, num_shards: int) -> int:
    """The shard a passage belongs to: a hash of its id, so shards stay fixed when the corpus grows."""
    digest = hashlib.sha1(passage_id.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") % num_shards

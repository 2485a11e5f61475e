"""Contamination check: synthetic rows must not contain text from the evaluation sets they will be
judged on. A row is contaminated when its query or positive equals an evaluation text (after
normalisation: casefolded words, punctuation ignored) or shares a word n-gram with one (13 words
by default, the GPT-3 convention).
"""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Iterable, Sequence
from pathlib import Path

from embedforge.data_synth.gates import GateResult, Row
from embedforge.errors import InputError
from embedforge.io import iter_jsonl, iter_text_lines

_WORD = re.compile(r"\w+", re.UNICODE)
_ID_KEYS = {"id", "_id", "query_id", "doc_id", "corpus-id", "query-id", "label", "score"}


def load_eval_texts(path: str | os.PathLike) -> list[str]:
    """Texts of an evaluation set: a BEIR folder (queries.jsonl + corpus.jsonl), a JSONL file (every
    string field except ids), or a text file (one text per line)."""
    path = Path(path)
    if path.is_dir():
        files = [path / name for name in ("queries.jsonl", "corpus.jsonl") if (path / name).exists()]
        if not files:
            raise InputError("expected a BEIR folder with queries.jsonl and/or corpus.jsonl", path=str(path))
        return [t for f in files for t in load_eval_texts(f)]
    if not path.exists():
        raise InputError("evaluation set not found", path=str(path))
    if path.suffix in (".jsonl", ".json", ".ndjson"):
        texts = []
        for _, obj in iter_jsonl(path):
            texts.extend(v for k, v in obj.items() if k not in _ID_KEYS and isinstance(v, str) and v.strip())
        return texts
    return [line.strip() for _, line in iter_text_lines(path) if line.strip()]


def _words(text: str) -> list[str]:
    """Casefolded words: punctuation and spacing never hide an overlap."""
    return [w.casefold() for w in _WORD.findall(text)]


def _exact_key(text: str) -> str:
    return hashlib.blake2b(" ".join(_words(text)).encode("utf-8"), digest_size=8).hexdigest()


def _ngram_hashes(text: str, n: int) -> Iterable[bytes]:
    words = _words(text)
    for i in range(len(words) - n + 1):
        yield hashlib.blake2b(" ".join(words[i : i + n]).encode("utf-8"), digest_size=8).digest()


class ContaminationIndex:
    """Exact-text and n-gram index over named evaluation sets."""

    def __init__(self, sets: dict[str, Sequence[str]], n: int = 13):
        if n < 1:
            raise InputError(f"n-gram size must be >= 1, got {n}")
        self.n = n
        self.exact: dict[str, str] = {}
        self.grams: dict[bytes, str] = {}
        for name, texts in sets.items():
            for text in texts:
                self.exact.setdefault(_exact_key(text), name)
                for gram in _ngram_hashes(text, n):
                    self.grams.setdefault(gram, name)

    @classmethod
    def from_paths(cls, paths: Sequence[str | os.PathLike], n: int = 13) -> ContaminationIndex:
        return cls({str(p): load_eval_texts(p) for p in paths}, n=n)

    def find(self, text: str) -> str | None:
        """A reason naming the evaluation set the text overlaps, or None."""
        if not _words(text):
            return None
        hit = self.exact.get(_exact_key(text))
        if hit:
            return f"equals a text of {hit}"
        for gram in _ngram_hashes(text, self.n):
            if gram in self.grams:
                return f"shares a {self.n}-gram with {self.grams[gram]}"
        return None


def contamination_gate(
    rows: Sequence[Row], index: ContaminationIndex, fields: Sequence[str] = ("query", "positive")
) -> GateResult:
    result = GateResult("contamination", [])
    for row in rows:
        reason = next((f"contamination: {f} {r}" for f in fields if (r := index.find(row[f]))), None)
        if reason:
            result.dropped.append((row, reason))
        else:
            result.kept.append(row)
    return result

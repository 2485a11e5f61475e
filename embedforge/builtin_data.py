"""Corpora that ship with the machine, each paired with REAL human-written queries.

Domain adaptation must be judged on queries people wrote, never on the generator's own. These
corpora make that possible offline: the pipeline's generator only ever sees the passages, and
the human-written text that plays the query is held out for evaluation.

* `python-docstrings`: every documented public function and class of the Python standard library
  whose docstring has a summary and a body. Passage = `module.name` + the docstring body; real
  query = the summary paragraph (what its author wrote to say what it does). The passage never
  contains the summary.
* `debian-packages`: the packages installed on a Debian-based machine (`/var/lib/dpkg/status`).
  Passage = the extended description; real query = the one-line synopsis. A different domain
  (system software in prose), used as the general-ability check after domain training.
* `python-docs`: the Python reference manual's topics (pydoc_data); no real queries.

Every builder is deterministic: same Python / same machine, same data.
"""

from __future__ import annotations

import ast
import re
import sysconfig
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from embedforge.errors import InputError
from embedforge.eval.beir import BeirData

_WS = re.compile(r"\s+")
_SKIP_STDLIB = {"test", "tests", "idlelib", "lib2to3", "site-packages", "dist-packages", "turtledemo",
                "ensurepip", "__pycache__", "__phello__"}
DPKG_STATUS = Path("/var/lib/dpkg/status")


@dataclass
class BuiltinCorpus:
    """Passages for the pipeline, and (when the corpus has them) the real queries held out from it."""

    name: str
    description: str
    passages: dict[str, str]
    real_queries: BeirData | None = None

    def sample(self, n: int) -> BuiltinCorpus:
        """`n` passages spread evenly over the corpus, with the real queries whose relevant passages
        are all among them (searched over those passages)."""
        kept = dict(spread(list(self.passages.items()), n))
        real = self.real_queries
        if real is not None:
            qrels = {q: docs for q, docs in real.qrels.items() if docs and set(docs) <= kept.keys()}
            real = BeirData({q: real.queries[q] for q in qrels}, {d: t for d, t in real.corpus.items() if d in kept},
                            qrels, source=real.source)
        return BuiltinCorpus(self.name, f"{self.description} ({len(kept)} of {len(self.passages)} passages)",
                             kept, real)


def spread(items: list, n: int) -> list:
    """n items evenly spaced over the list: a small sample still covers every part of the corpus."""
    if n >= len(items):
        return items
    step = len(items) / n
    return [items[int(i * step)] for i in range(n)]


def python_docstrings(stdlib: str | Path | None = None, min_body_words: int = 25) -> BuiltinCorpus:
    """Standard-library docstrings: passage = qualified name + body, real query = summary."""
    root = Path(stdlib or sysconfig.get_paths()["stdlib"])
    if not root.is_dir():
        raise InputError("Python standard library folder not found", path=str(root))
    found: list[tuple[str, str, str]] = []
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root)
        module = ".".join(rel.with_suffix("").parts).removesuffix(".__init__")
        if _SKIP_STDLIB & set(rel.parts) or any(part.startswith("_") for part in module.split(".")):
            continue
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, SyntaxError, ValueError):
            continue
        for node in ast.walk(tree):
            if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                continue
            if node.name.startswith("_"):
                continue
            doc = ast.get_docstring(node, clean=True)
            paragraphs = [p.strip() for p in (doc or "").split("\n\n") if p.strip()]
            if len(paragraphs) < 2:
                continue
            summary, body = _WS.sub(" ", paragraphs[0]), "\n\n".join(paragraphs[1:])
            if len(summary.split()) < 4 or len(body.split()) < min_body_words:
                continue
            found.append((f"{module}.{node.name}", summary, body))
    # A summary shared by several docstrings has no single answer; a repeated body is one passage.
    summaries = Counter(summary for _, summary, _ in found)
    bodies = Counter(body for _, _, body in found)
    passages, queries, qrels = {}, {}, {}
    for name, summary, body in found:
        if summaries[summary] > 1 or bodies[body] > 1 or name in passages:
            continue
        passages[name] = f"{name}\n{body}"
        queries[f"q:{name}"] = summary
        qrels[f"q:{name}"] = {name: 1}
    if len(queries) < 100:
        raise InputError(f"only {len(queries)} usable docstrings (need 100 or more)", path=str(root))
    source = f"docstrings of the Python {sysconfig.get_python_version()} standard library in {root}"
    return BuiltinCorpus("python-docstrings", source, passages,
                         BeirData(queries, dict(passages), qrels, source=source))


def debian_packages(status: str | Path = DPKG_STATUS, min_words: int = 20) -> BuiltinCorpus:
    """Installed Debian packages: passage = extended description, real query = the synopsis."""
    path = Path(status)
    if not path.is_file():
        raise InputError("no Debian package database (not a Debian-based system)", path=str(path))
    found: list[tuple[str, str, str]] = []
    for block in path.read_text(encoding="utf-8", errors="replace").split("\n\n"):
        package = re.search(r"^Package: (\S+)", block, re.MULTILINE)
        description = re.search(r"^Description: (.*)\n((?: .*(?:\n|$))*)", block, re.MULTILINE)
        if not package or not description:
            continue
        lines = [line[1:] for line in description.group(2).splitlines()]
        body = "\n".join("" if line.strip() == "." else line for line in lines).strip()
        synopsis = description.group(1).strip()
        if len(synopsis.split()) >= 3 and len(body.split()) >= min_words:
            found.append((package.group(1), synopsis, body))
    synopses = Counter(s for _, s, _ in found)
    bodies = Counter(b for _, _, b in found)
    passages, queries, qrels = {}, {}, {}
    for name, synopsis, body in found:
        if synopses[synopsis] > 1 or bodies[body] > 1 or name in passages:
            continue
        passages[name] = body
        queries[f"q:{name}"] = synopsis
        qrels[f"q:{name}"] = {name: 1}
    if len(queries) < 100:
        raise InputError(f"only {len(queries)} usable package descriptions (need 100 or more)", path=str(path))
    source = f"descriptions of the {len(passages)} Debian packages installed on this machine ({path})"
    return BuiltinCorpus("debian-packages", source, passages, BeirData(queries, dict(passages), qrels, source=source))


def python_reference_manual() -> BuiltinCorpus:
    """The Python reference manual's topics (pydoc_data, shipped with every CPython); no real queries."""
    from pydoc_data.topics import topics

    return BuiltinCorpus("python-docs", "the Python reference manual (pydoc_data.topics)", dict(sorted(topics.items())))


BUILTIN_CORPORA = {
    "python-docstrings": python_docstrings,
    "debian-packages": debian_packages,
    "python-docs": python_reference_manual,
}


def load_builtin_corpus(name: str) -> BuiltinCorpus:
    """`builtin:NAME` -> the corpus; an unknown name lists the known ones."""
    key = name.removeprefix("builtin:")
    if key not in BUILTIN_CORPORA:
        raise InputError(f"unknown built-in corpus {name!r}; known: "
                         + ", ".join(f"builtin:{k}" for k in BUILTIN_CORPORA))
    return BUILTIN_CORPORA[key]()

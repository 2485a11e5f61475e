"""Every command over the bad-input corpus (tests/data/bad/): exit status 2, one line on stderr that
names the file (and line and field where there is one), no traceback, no warning logged, nothing
written. The commands run in-process through `embedforge.cli.main`, exactly as the console script
calls it; no case gets as far as loading a model (the model paths do not exist, so a case that
slipped past its reader would fail on the model instead and name the wrong file)."""

from __future__ import annotations

import json
import logging
import re
import shutil
from pathlib import Path

import pytest

from embedforge.cli import main

BAD = Path(__file__).parent / "data" / "bad"
HUGE_LINE_BYTES = 3 << 19  # 1.5 MiB against a cap set to 1 MiB below
GOOD_PAIRS = [{"query": "what does slerp do", "positive": "Slerp interpolates along the great circle."},
              {"query": "capital of France", "positive": "Paris is the capital of France."}]


def huge_line(tmp: Path) -> Path:
    """One JSON line longer than the cap: refused before it is held in memory."""
    path = tmp / "huge.jsonl"
    path.write_bytes(b'{"text": "' + b"a" * HUGE_LINE_BYTES + b'"}\n')
    return path


def huge_id(tmp: Path, key: str) -> Path:
    """A valid line under the cap whose id is 300 kB of the wrong type: the message must stay short."""
    path = tmp / "huge_id.jsonl"
    path.write_text(json.dumps({key: ["x" * 300_000], "text": "t"}) + "\n")
    return path


def parquet_not_utf8(tmp: Path) -> Path:
    """A Parquet string column whose second value is not UTF-8 (as a careless writer leaves it)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    raw = pa.array([b"fine text", b"caf\xe9"], type=pa.binary())
    texts = pa.Array.from_buffers(pa.string(), 2, raw.buffers())  # no validation: the bytes stay
    path = tmp / "bad.parquet"
    pq.write_table(pa.table({"id": ["d1", "d2"], "text": texts}), path)
    return path


def txt_folder(tmp: Path) -> Path:
    folder = tmp / "docs"
    folder.mkdir()
    (folder / "a.txt").write_text("A good document.\n")
    shutil.copy(BAD / "doc_not_utf8.txt", folder / "doc_not_utf8.txt")
    return folder


def beir(tmp: Path, **swap: Path) -> Path:
    """The valid BEIR folder with one file replaced (`corpus`, `queries`, `qrels`)."""
    folder = tmp / "beir"
    shutil.copytree(BAD / "beir", folder)
    names = {"corpus": "corpus.jsonl", "queries": "queries.jsonl", "qrels": "qrels/test.tsv"}
    for key, source in swap.items():
        shutil.copy(source, folder / names[key])
    return folder


def good_pairs(tmp: Path) -> Path:
    path = tmp / "good_pairs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in GOOD_PAIRS))
    return path


# --- how each command is called (argv, the output it must not write) --------------------------------


def embed(tmp, source):
    out = tmp / "out.npy"
    return ["embed", "--model", str(tmp / "no-model"), "--input", str(source), "--output", str(out)], out


def rerank(tmp, source):
    out = tmp / "out.jsonl"
    return ["rerank", "--model", str(tmp / "no-model"), "--query", "q", "--input", str(source), "--output",
            str(out)], out


def synth(tmp, source, *extra):
    out = tmp / "out"
    return ["synth", "--corpus", str(source), "--output", str(out), "--backend", "openai", "--model", "unused",
            "--judge", "none", "--persona-embedder", "none", *extra], out


def filter_(tmp, source, *extra):
    out = tmp / "out"
    return ["filter", "--input", str(source), "--output", str(out), "--threshold", "none", "--roundtrip-k",
            "none", *extra], out


def mine(tmp, data, corpus=BAD / "beir" / "corpus.jsonl"):
    out = tmp / "out"
    return ["mine", "--model", str(tmp / "no-model"), "--data", str(data), "--corpus", str(corpus), "--output",
            str(out)], out


def eval_(tmp, data, *extra):
    out = tmp / "out.json"
    return ["eval", "--model", str(tmp / "no-model"), "--data", str(data), "--output", str(out), *extra], out


def report(tmp, results):
    out = tmp / "report.md"
    return ["report", str(results), "--output", str(out)], out


TEXT_CASES = [
    ("truncated", lambda t: BAD / "texts_truncated.jsonl", r"texts_truncated\.jsonl:2: invalid JSON"),
    ("not_utf8", lambda t: BAD / "texts_not_utf8.jsonl", r"texts_not_utf8\.jsonl:2: not valid UTF-8 \(byte 0xe9"),
    ("wrong_types", lambda t: BAD / "texts_wrong_types.jsonl",
     r"texts_wrong_types\.jsonl:2: field 'text': expected a string, got int"),
    ("huge_line", huge_line, r"huge\.jsonl:1: line longer than 1 MiB"),
]
PAIR_CASES = [
    ("truncated", lambda t: BAD / "pairs_truncated.jsonl", r"pairs_truncated\.jsonl:2: invalid JSON"),
    ("not_utf8", lambda t: BAD / "pairs_not_utf8.jsonl", r"pairs_not_utf8\.jsonl:2: not valid UTF-8 \(byte 0xef"),
    ("wrong_types", lambda t: BAD / "pairs_wrong_types.jsonl",
     r"pairs_wrong_types\.jsonl:2: field 'negatives': expected a list of strings, got str"),
    ("empty", lambda t: BAD / "empty.jsonl", r"empty\.jsonl: no rows"),
    ("huge_line", huge_line, r"huge\.jsonl:1: line longer than 1 MiB"),
]

CASES = [
    *[(f"embed-{name}", lambda t, f=f: embed(t, f(t)), want) for name, f, want in TEXT_CASES],
    ("embed-empty", lambda t: embed(t, BAD / "empty.jsonl"), r"empty\.jsonl: no texts"),
    *[(f"rerank-{name}", lambda t, f=f: rerank(t, f(t)), want) for name, f, want in TEXT_CASES],
    ("rerank-empty", lambda t: rerank(t, BAD / "empty.jsonl"), r"empty\.jsonl: no documents"),
    *[(f"synth-{name}", lambda t, f=f: synth(t, f(t)), want) for name, f, want in TEXT_CASES],
    ("synth-empty", lambda t: synth(t, BAD / "empty.jsonl"), r"empty\.jsonl: corpus holds no text"),
    ("synth-huge_id", lambda t: synth(t, huge_id(t, "id")),
     r"huge_id\.jsonl:1: field 'id': expected a non-empty string or integer id, got \['xxx"),
    ("synth-txt_folder_not_utf8", lambda t: synth(t, txt_folder(t)),
     r"doc_not_utf8\.txt:2: not valid UTF-8 \(byte 0x93 at column 18\)"),
    ("synth-txt_file_not_utf8", lambda t: synth(t, BAD / "doc_not_utf8.txt"), r"doc_not_utf8\.txt:2: not valid UTF-8"),
    ("synth-parquet_not_utf8", lambda t: synth(t, parquet_not_utf8(t)),
     r"bad\.parquet:2: field 'text': not valid UTF-8 \(byte 0xe9"),
    ("synth-config_not_utf8", lambda t: synth(t, BAD / "beir" / "corpus.jsonl", "--config",
                                              str(BAD / "config_not_utf8.yaml")),
     r"config_not_utf8\.yaml:2: not valid UTF-8"),
    ("synth-personas_not_utf8", lambda t: synth(t, BAD / "beir" / "corpus.jsonl", "--personas",
                                                str(BAD / "texts_not_utf8.jsonl")),
     r"texts_not_utf8\.jsonl:2: not valid UTF-8"),
    *[(f"filter-{name}", lambda t, f=f: filter_(t, f(t)), want) for name, f, want in PAIR_CASES],
    ("filter-eval_set_not_utf8", lambda t: filter_(t, good_pairs(t), "--eval-sets", str(BAD / "doc_not_utf8.txt")),
     r"doc_not_utf8\.txt:2: not valid UTF-8"),
    ("filter-config_not_utf8", lambda t: filter_(t, good_pairs(t), "--config", str(BAD / "config_not_utf8.yaml")),
     r"config_not_utf8\.yaml:2: not valid UTF-8"),
    *[(f"mine-{name}", lambda t, f=f: mine(t, f(t)), want) for name, f, want in PAIR_CASES],
    ("mine-corpus_not_utf8", lambda t: mine(t, good_pairs(t), BAD / "texts_not_utf8.jsonl"),
     r"texts_not_utf8\.jsonl:2: not valid UTF-8"),
    ("mine-corpus_empty", lambda t: mine(t, good_pairs(t), BAD / "empty.jsonl"), r"empty\.jsonl: corpus holds no text"),
    ("eval-corpus_truncated", lambda t: eval_(t, beir(t, corpus=BAD / "texts_truncated.jsonl")),
     r"corpus\.jsonl:2: invalid JSON"),
    ("eval-queries_not_utf8", lambda t: eval_(t, beir(t, queries=BAD / "texts_not_utf8.jsonl")),
     r"queries\.jsonl:2: not valid UTF-8"),
    ("eval-corpus_wrong_types", lambda t: eval_(t, beir(t, corpus=BAD / "beir_corpus_wrong_types.jsonl")),
     r"corpus\.jsonl:2: field '_id': expected a non-empty string id"),
    ("eval-corpus_empty", lambda t: eval_(t, beir(t, corpus=BAD / "empty.jsonl")), r"corpus\.jsonl: corpus is empty"),
    ("eval-corpus_huge_line", lambda t: eval_(t, beir(t, corpus=huge_line(t))), r"corpus\.jsonl:1: line longer than"),
    ("eval-corpus_huge_id", lambda t: eval_(t, beir(t, corpus=huge_id(t, "_id"))),
     r"corpus\.jsonl:1: field '_id': expected a non-empty string id, got \['xxx"),
    ("eval-qrels_not_utf8", lambda t: eval_(t, beir(t, qrels=BAD / "qrels_not_utf8.tsv")),
     r"test\.tsv:3: not valid UTF-8 \(byte 0xff"),
    ("eval-qrels_unknown_ids", lambda t: eval_(t, beir(t, qrels=BAD / "qrels_unknown_ids.tsv")),
     r"test\.tsv:3: field 'corpus-id': corpus id 'c99' is not in corpus\.jsonl"),
    ("eval-baseline_not_utf8", lambda t: eval_(t, beir(t), "--baselines", str(BAD / "results_not_utf8.json")),
     r"results_not_utf8\.json:2: not valid UTF-8"),
    ("eval-baseline_truncated", lambda t: eval_(t, beir(t), "--baselines", str(BAD / "results_truncated.json")),
     r"results_truncated\.json:1: invalid JSON"),
    ("eval-config_not_utf8", lambda t: eval_(t, beir(t), "--config", str(BAD / "config_not_utf8.yaml")),
     r"config_not_utf8\.yaml:2: not valid UTF-8"),
    ("report-truncated", lambda t: report(t, BAD / "results_truncated.json"), r"results_truncated\.json:1: invalid JSON"),
    ("report-not_utf8", lambda t: report(t, BAD / "results_not_utf8.json"), r"results_not_utf8\.json:2: not valid UTF-8"),
    ("run-recipe_not_utf8", lambda t: (["run", str(BAD / "config_not_utf8.yaml"), "--dry-run"], None),
     r"config_not_utf8\.yaml:2: not valid UTF-8"),
]


@pytest.mark.parametrize("make,expected", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_is_one_line_naming_the_file_and_writes_nothing(make, expected, tmp_path, monkeypatch, capsys,
                                                                  caplog):
    monkeypatch.setenv("EMBEDFORGE_MAX_LINE_MB", "1")
    argv, output = make(tmp_path)
    with caplog.at_level(logging.WARNING):
        code = main(argv)
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2, err
    assert len(lines) == 1 and "Traceback" not in err, err
    assert lines[0].startswith(f"embedforge {argv[0]}: error: "), lines[0]
    assert re.search(expected, lines[0]), lines[0]
    assert len(lines[0]) < 400  # a megabyte line is never echoed
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING], caplog.records
    if output is not None:
        assert not output.exists()

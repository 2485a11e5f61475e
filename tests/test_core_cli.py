"""The core CLI: embed and rerank end to end, --help everywhere, one-line errors for bad input."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from embedforge import Embedder, Reranker
from embedforge.cli import build_parser, main


def write_lines(path, rows):
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n", encoding="utf-8")
    return path


def subcommands():
    parser = build_parser()
    action = next(a for a in parser._actions if a.dest == "command")
    return sorted(action.choices)


def test_every_command_has_help(capsys):
    names = subcommands()
    assert {"embed", "rerank"} <= set(names)
    for name in names:
        with pytest.raises(SystemExit) as exc:
            main([name, "--help"])
        assert exc.value.code == 0
        assert f"usage: embedforge {name}" in capsys.readouterr().out


def test_embed_writes_the_same_vectors_as_the_api(tiny_qwen3_embedder, tmp_path):
    data = write_lines(tmp_path / "texts.jsonl", [{"text": "first text"}, "a bare string row", {"text": "third"}])
    out = tmp_path / "vectors.npy"
    assert main(["embed", "--model", str(tiny_qwen3_embedder), "--input", str(data), "--output", str(out),
                 "--instruction", "find it", "--dim", "32"]) == 0
    expected = Embedder.from_pretrained(tiny_qwen3_embedder).encode(
        ["first text", "a bare string row", "third"], instruction="find it", dim=32)
    np.testing.assert_allclose(np.load(out), expected, atol=1e-6)


def test_rerank_prints_one_score_per_document_in_order(tiny_qwen3_lm, tmp_path, capsys):
    data = write_lines(tmp_path / "docs.jsonl", [{"text": "Beijing is the capital."}, {"text": "Cats purr."}])
    assert main(["rerank", "--model", str(tiny_qwen3_lm), "--query", "capital of China?", "--input", str(data)]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    expected = Reranker.from_pretrained(tiny_qwen3_lm).score("capital of China?", ["Beijing is the capital.",
                                                                                   "Cats purr."])
    assert [r["index"] for r in rows] == [0, 1]
    np.testing.assert_allclose([r["score"] for r in rows], expected, atol=1e-6)


@pytest.mark.parametrize(
    "rows,message",
    [
        ([{"text": "ok"}, {"body": "x"}], "texts.jsonl:2: field 'text': missing field"),
        ([{"text": "ok"}, {"text": 7}], "texts.jsonl:2: field 'text': expected a string, got int"),
        ([{"text": "ok"}, {"text": "  "}], "texts.jsonl:2: field 'text': empty string"),
    ],
)
def test_bad_rows_name_file_line_and_field(tiny_qwen3_embedder, tmp_path, capsys, rows, message):
    data = write_lines(tmp_path / "texts.jsonl", rows)
    out = tmp_path / "v.npy"
    assert main(["embed", "--model", str(tiny_qwen3_embedder), "--input", str(data), "--output", str(out)]) == 2
    assert message in capsys.readouterr().err
    assert not out.exists()


def test_invalid_json_line_is_named(tiny_qwen3_embedder, tmp_path, capsys):
    data = tmp_path / "texts.jsonl"
    data.write_text('{"text": "ok"}\n{"text": oops}\n')
    assert main(["embed", "--model", str(tiny_qwen3_embedder), "--input", str(data), "--output",
                 str(tmp_path / "v.npy")]) == 2
    assert "texts.jsonl:2: invalid JSON" in capsys.readouterr().err


def test_unknown_model_is_one_line_without_traceback(tmp_path):
    data = write_lines(tmp_path / "texts.jsonl", [{"text": "hello"}])
    proc = subprocess.run(
        [sys.executable, "-m", "embedforge.cli", "embed", "--model", str(tmp_path / "missing-model"), "--input",
         str(data), "--output", str(tmp_path / "v.npy")],
        check=False, capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert "missing-model: no such model folder" in proc.stderr


def test_every_subpackage_imports_from_outside_the_repo(tmp_path):
    modules = ["embedforge", "embedforge.train", "embedforge.data_synth", "embedforge.data_synth.backends",
               "embedforge.merge", "embedforge.export", "embedforge.eval"]
    code = "import importlib, sys; [importlib.import_module(m) for m in sys.argv[1:]]; " \
           "import embedforge.pipeline_cli as p; assert (p.recipes_dir() / p.DEMO_RECIPE).is_file()"
    proc = subprocess.run([sys.executable, "-c", code, *modules], check=False, cwd=tmp_path, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr

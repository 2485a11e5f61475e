"""One output discipline for the data, eval and core commands: one writer per output, never over an
input, an existing output replaced only under --overwrite (resumable folders resume), and one shard
layout per synth folder."""

from __future__ import annotations

import json
import os
import re
import shutil
import threading
from pathlib import Path

import pytest

from embedforge.cli import main
from embedforge.data_synth import SynthConfig, synthesize
from embedforge.data_synth.backends.scripted import ScriptedBackend
from embedforge.errors import ConfigError
from embedforge.io import output_lock

BAD = Path(__file__).parent / "data" / "bad"
BEIR = BAD / "beir"  # a valid BEIR folder


def write_jsonl(path: Path, rows) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def texts(tmp: Path) -> Path:
    return write_jsonl(tmp / "texts.jsonl", [{"text": "Slerp interpolates."}, {"text": "Paris is in France."}])


def pairs(tmp: Path, n: int = 2, name: str = "pairs.jsonl") -> Path:
    return write_jsonl(tmp / name, [{"query": f"question {i} about valves", "positive": f"Valve {i} regulates flow."}
                                    for i in range(n)])


def one_call_reply(messages, call):
    n = re.search(r"passage (\d+)", messages[-1]["content"])[1]
    return json.dumps({"topic": f"t{n}", "question": f"what does part {n} do?", "keywords": f"part {n}",
                       "summary": f"part {n} overview"})


class Small(ScriptedBackend):
    num_parameters = 135_000_000  # the one-call strategy, as for SmolLM2


def corpus(tmp: Path, n: int = 8) -> Path:
    return write_jsonl(tmp / "corpus.jsonl", [{"id": f"d{i}", "text": f"passage {i} about part {i}."}
                                              for i in range(n)])


def one_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


# --- one writer per output ---------------------------------------------------------------------------

# (command, argv, the path whose lock a running writer holds)
WRITERS = {
    "embed": lambda t: (["embed", "--model", str(t / "m"), "--input", str(texts(t)), "--output", str(t / "v.npy")],
                        t / "v.npy"),
    "rerank": lambda t: (["rerank", "--model", str(t / "m"), "--query", "q", "--input", str(texts(t)), "--output",
                          str(t / "s.jsonl")], t / "s.jsonl"),
    "synth": lambda t: (["synth", "--corpus", str(corpus(t)), "--output", str(t / "S"), "--backend", "openai",
                         "--model", "x", "--judge", "none"], t / "S" / "manifest-00000-of-00001.json"),
    "filter": lambda t: (["filter", "--input", str(pairs(t)), "--output", str(t / "F"), "--threshold", "none",
                          "--roundtrip-k", "none"], t / "F"),
    "mine": lambda t: (["mine", "--model", str(t / "m"), "--data", str(pairs(t)), "--corpus", str(corpus(t)),
                        "--output", str(t / "N")], t / "N" / "mined-00000-of-00001.jsonl"),
    "eval": lambda t: (["eval", "--model", str(t / "m"), "--data", str(BEIR), "--output", str(t / "r.json")],
                       t / "r.json"),
    "merge": lambda t: (["merge", "--models", str(t / "m"), str(t / "m"), "--t", "0.5", "--output", str(t / "M")],
                        t / "M"),
    "export": lambda t: (["export", "--model", str(t / "m"), "--output", str(t / "E")], t / "E"),
}


@pytest.mark.parametrize("command", sorted(WRITERS))
def test_a_second_writer_is_refused_in_one_line_before_any_work(command, tmp_path, capsys):
    argv, held = WRITERS[command](tmp_path)
    with output_lock(held):  # the first writer, still running
        assert main(argv) == 2
    line = one_line(capsys.readouterr().err)
    assert line.startswith(f"embedforge {command}: error: ") and f"in use by pid {os.getpid()} on " in line, line
    assert not held.exists()


def test_two_synth_runs_at_once_generate_each_passage_once(tmp_path):
    source = corpus(tmp_path, 6)
    config = SynthConfig(corpus=str(source), output=str(tmp_path / "S"), judge=None)
    started, release = threading.Event(), threading.Event()

    def slow(messages, call):
        started.set()
        release.wait(30)
        return one_call_reply(messages, call)

    first = Small(slow)
    worker = threading.Thread(target=synthesize, args=(config,), kwargs={"backend": first})
    worker.start()
    try:
        assert started.wait(30)
        second = Small(one_call_reply)
        with pytest.raises(ConfigError, match=r"manifest-00000-of-00001\.json: in use by pid"):
            synthesize(config, backend=second)
    finally:
        release.set()
        worker.join(60)
    assert second.calls == [] and len(first.calls) == 6
    rows = [json.loads(line) for line in (tmp_path / "S" / "pairs-00000-of-00001.jsonl").read_text().splitlines()]
    assert sorted({r["passage_id"] for r in rows}) == [f"d{i}#0" for i in range(6)] and len(rows) == 18


def test_shards_of_one_layout_still_run_side_by_side(tmp_path):
    source = corpus(tmp_path, 8)
    out = tmp_path / "S"
    with output_lock(out / "manifest-00000-of-00002.json"):  # shard 0 running
        outcome = synthesize(SynthConfig(corpus=str(source), output=str(out), judge=None, shard_index=1, num_shards=2),
                             backend=Small(one_call_reply))
    assert outcome.status == "complete" and outcome.passages > 0


# --- never over an input; an existing output only under --overwrite ----------------------------------


def test_eval_refuses_to_write_its_results_over_its_data(tmp_path, capsys):
    data = shutil.copytree(BEIR, tmp_path / "beir")
    before = (data / "corpus.jsonl").read_bytes()
    for extra in ([], ["--overwrite"]):
        assert main(["eval", "--model", str(tmp_path / "m"), "--data", str(data), "--output",
                     str(data / "corpus.jsonl"), *extra]) == 2
        line = one_line(capsys.readouterr().err)
        assert f"corpus.jsonl: output would write over the input {data}" in line
    assert (data / "corpus.jsonl").read_bytes() == before


@pytest.mark.parametrize("command", ["embed", "rerank"])
def test_embed_and_rerank_refuse_to_write_over_their_input(command, tmp_path, capsys):
    source = texts(tmp_path)
    before = source.read_bytes()
    extra = ["--query", "q"] if command == "rerank" else []
    assert main([command, "--model", str(tmp_path / "m"), "--input", str(source), "--output", str(source),
                 "--overwrite", *extra]) == 2
    assert "texts.jsonl: output would write over the input" in one_line(capsys.readouterr().err)
    assert source.read_bytes() == before


@pytest.mark.parametrize("command", ["filter", "mine"])
def test_filter_and_mine_refuse_an_output_inside_their_input(command, tmp_path, capsys):
    folder = tmp_path / "synth"
    folder.mkdir()
    source = pairs(folder, name="pairs-00000-of-00001.jsonl")
    argv = {"filter": ["filter", "--input", str(folder), "--output", str(folder / "F"), "--threshold", "none",
                       "--roundtrip-k", "none", "--overwrite"],
            "mine": ["mine", "--model", str(tmp_path / "m"), "--data", str(folder), "--corpus", str(corpus(tmp_path)),
                     "--output", str(folder / "N")]}[command]
    assert main(argv) == 2
    assert "output would write over the input" in one_line(capsys.readouterr().err)
    assert sorted(p.name for p in folder.iterdir()) == [source.name]


def test_existing_outputs_are_replaced_only_under_overwrite(tiny_qwen3_embedder, tiny_qwen3_lm, tmp_path, capsys):
    source = texts(tmp_path)
    results = tmp_path / "r.json"
    runs = {
        "embed": (["embed", "--model", str(tiny_qwen3_embedder), "--input", str(source), "--output"], tmp_path / "v.npy"),
        "rerank": (["rerank", "--model", str(tiny_qwen3_lm), "--query", "q", "--input", str(source), "--output"],
                   tmp_path / "s.jsonl"),
        "eval": (["eval", "--model", str(tiny_qwen3_embedder), "--data", str(BEIR), "--output"], results),
        "filter": (["filter", "--input", str(pairs(tmp_path)), "--threshold", "none", "--roundtrip-k", "none",
                    "--output"], tmp_path / "F"),
    }
    for command, (argv, out) in runs.items():
        if command == "filter":
            out.mkdir()
            (out / "pairs.jsonl").write_text("old\n")
            old = out / "pairs.jsonl"
        else:
            out.write_text("old\n")
            old = out
        assert main([*argv, str(out)]) == 2, command
        assert "output exists; pass --overwrite to replace it" in one_line(capsys.readouterr().err), command
        assert old.read_text() == "old\n"
        assert main([*argv, str(out), "--overwrite"]) == 0, command
        assert old.read_bytes() != b"old\n", command
        capsys.readouterr()
    report = tmp_path / "report.md"
    report.write_text("old\n")
    assert main(["report", str(results), "--output", str(report)]) == 2
    assert "report.md: output exists" in one_line(capsys.readouterr().err)
    assert main(["report", str(results), "--output", str(report), "--overwrite"]) == 0
    assert "nDCG@10" in report.read_text()


def test_mine_resumes_the_same_run_and_refuses_rows_from_other_inputs(tiny_qwen3_embedder, tmp_path, capsys):
    source = corpus(tmp_path, 30)
    first = pairs(tmp_path, 3)
    out = tmp_path / "N"
    mined = out / "mined-00000-of-00001.jsonl"
    argv = ["mine", "--model", str(tiny_qwen3_embedder), "--corpus", str(source), "--output", str(out),
            "--num-negatives", "2", "--range", "0:20", "--margin", "-1"]
    assert main([*argv, "--data", str(first)]) == 0
    rows = mined.read_bytes()
    assert main([*argv, "--data", str(first)]) == 0  # the same inputs: it resumes (embeddings cached)
    assert mined.read_bytes() == rows
    capsys.readouterr()
    other = pairs(tmp_path, 4, name="other.jsonl")
    assert main([*argv, "--data", str(other)]) == 2
    assert "mined-00000-of-00001.jsonl: holds rows mined from other inputs or settings (data)" in one_line(
        capsys.readouterr().err)
    assert main([*argv[:-1], "-0.5", "--data", str(first)]) == 2
    assert "(margin)" in one_line(capsys.readouterr().err)
    assert mined.read_bytes() == rows
    assert main([*argv, "--data", str(other), "--overwrite"]) == 0
    assert len(mined.read_text().splitlines()) == 4


# --- one shard layout per synth folder ----------------------------------------------------------------


def test_synth_refuses_another_shard_layout_in_one_line(tmp_path, capsys):
    source = corpus(tmp_path, 16)
    out = tmp_path / "S"
    backend = Small(one_call_reply)
    synthesize(SynthConfig(corpus=str(source), output=str(out), judge=None), backend=backend)
    files = sorted(p.name for p in out.iterdir())
    for index in (0, 1):
        assert main(["synth", "--corpus", str(source), "--output", str(out), "--backend", "openai", "--model", "x",
                     "--judge", "none", "--num-shards", "2", "--shard-index", str(index)]) == 2
        line = one_line(capsys.readouterr().err)
        assert "holds the shards of a 1-shard layout (*-of-00001.*), not 2; resume with --num-shards 1" in line
    with pytest.raises(ConfigError, match="1-shard layout"):
        synthesize(SynthConfig(corpus=str(source), output=str(out), judge=None, num_shards=4), backend=backend)
    assert sorted(p.name for p in out.iterdir()) == files and len(backend.calls) == 16
    rows = (out / "pairs-00000-of-00001.jsonl").read_text().splitlines()
    assert len(rows) == 48


def test_a_folder_from_before_the_layout_record_is_recognised_by_its_file_names(tmp_path):
    out = tmp_path / "S"
    out.mkdir()
    (out / "pairs-00001-of-00003.jsonl").write_text("")
    with pytest.raises(ConfigError, match="3-shard layout"):
        synthesize(SynthConfig(corpus=str(corpus(tmp_path)), output=str(out), judge=None),
                   backend=Small(one_call_reply))

"""Real-model runs (slow): SmolLM2-135M-Instruct through the transformers backend, and through
`transformers serve` on 127.0.0.1 with the server killed mid-run and the run resumed."""

from __future__ import annotations

import json
import threading
import time

import pytest

from embedforge.data_synth.schemas import RetrievalQuery

pytestmark = pytest.mark.slow

PASSAGES = [
    (
        "photosynthesis",
        (
            "Photosynthesis is the process by which green plants use sunlight, water and carbon dioxide "
            "to make glucose and release oxygen. It takes place in the chloroplasts of leaf cells."
        ),
    ),
    (
        "volcano",
        (
            "A volcano is an opening in the Earth's crust through which molten rock, ash and gases escape. "
            "Most volcanoes form where tectonic plates meet."
        ),
    ),
    (
        "bread",
        (
            "Bread rises because yeast ferments sugars in the dough and releases carbon dioxide, which is "
            "trapped by the gluten network."
        ),
    ),
    (
        "chess",
        (
            "In chess, castling is a special move of the king and a rook; it is allowed only if neither "
            "piece "
            "has moved and the king is not in check."
        ),
    ),
    (
        "tides",
        (
            "Tides are caused mainly by the gravitational pull of the Moon on the oceans, with a smaller "
            "contribution from the Sun."
        ),
    ),
    (
        "violin",
        "The violin has four strings tuned in perfect fifths and is played with a bow strung with horsehair.",
    ),
]


def write_corpus(path, n):
    path.write_text(
        "".join(json.dumps({"id": i, "text": t}) + "\n" for i, t in PASSAGES[:n]), encoding="utf-8"
    )
    return path


def read(path):
    return [json.loads(x) for x in path.read_text().splitlines()] if path.exists() else []


def check_rows(rows, model, strategy="persona"):
    for row in rows:
        RetrievalQuery.model_validate({"query": row["query"]})
        prov = row["provenance"]
        assert prov["generator"]["model"] == str(model)
        if strategy == "persona":
            assert set(prov["templates"]) == {"retrieval_config", "retrieval_query"}
            assert {"question_type", "difficulty", "character", "personas", "length", "language"} <= set(
                prov["sampled"]
            )
        else:
            assert set(prov["templates"]) == {"retrieval_one_call"} and prov["strategy"] == "one_call"
            assert {"question_type", "topic", "language"} <= set(prov["sampled"])
        assert isinstance(prov["seed"], int)


def test_smollm2_on_cpu_end_to_end(tmp_path, smollm2, minilm):
    from embedforge.cli import main

    corpus = write_corpus(tmp_path / "corpus.jsonl", 2)
    out = tmp_path / "synth"
    began = time.monotonic()
    code = main(
        [
            "synth",
            "--corpus",
            str(corpus),
            "--backend",
            "transformers",
            "--model",
            str(smollm2),
            "--output",
            str(out),
            "--batch-size",
            "2",
            "--persona-embedder",
            str(minilm),
            "--max-attempts",
            "2",
        ]
    )
    synth_s = time.monotonic() - began
    assert code == 0
    rows = read(out / "pairs-00000-of-00001.jsonl")
    failed = read(out / "failed-00000-of-00001.jsonl")
    assert len({r["passage_id"] for r in rows}) + len(failed) == 2
    assert rows, f"SmolLM2 produced no valid pair: {failed}"
    # a 135M generator gets the one-call strategy, and under the grammar every reply is schema-valid
    check_rows(rows, smollm2, strategy="one_call")
    quality = json.loads((out / "quality.json").read_text())
    assert quality["schema_valid_rate"] == 1.0 and not failed
    assert "## Generation" in (out / "coverage.md").read_text()

    filtered = tmp_path / "filtered"
    assert (
        main(
            [
                "filter",
                "--input",
                str(out),
                "--output",
                str(filtered),
                "--teacher",
                str(minilm),
                "--no-teacher-instructions",
                "--roundtrip-k",
                "1",
            ]
        )
        == 0
    )
    report = json.loads((filtered / "filter_report.json").read_text())
    kept, dropped = read(filtered / "pairs.jsonl"), read(filtered / "dropped.jsonl")
    assert len(kept) + len(dropped) == len(rows) == report["rows_in"]
    assert all("teacher_cosine" in r["quality"] for r in kept)
    coverage = (filtered / "coverage.md").read_text()
    assert "## Quality gates" in coverage and f"kept of {len(rows)}" in coverage
    print(f"SmolLM2 synth of 2 passages: {synth_s:.1f} s; kept {len(kept)}/{len(rows)}")


def test_transformers_serve_killed_mid_run_then_resumed(tmp_path, smollm2):
    from embedforge.data_synth.backends.local_server import LocalServer, free_port, transformers_serve_command
    from embedforge.data_synth.backends.openai_http import OpenAIHTTPBackend
    from embedforge.data_synth.corpus import load_corpus
    from embedforge.data_synth.generate import SynthConfig, SynthesisRun
    from embedforge.data_synth.personas import PersonaRetriever, load_personas

    passages = load_corpus(write_corpus(tmp_path / "corpus.jsonl", 4))
    retriever = PersonaRetriever(load_personas())
    config = SynthConfig(
        max_new_tokens=40,
        temperature=0.7,
        max_attempts=2,
        max_inflight=2,
        max_consecutive_transport_failures=2,
    )
    out = tmp_path / "out"
    pairs_path = out / "pairs-00000-of-00001.jsonl"

    def backend(url, retries=1):
        return OpenAIHTTPBackend(
            str(smollm2),
            url,
            concurrency=2,
            timeout_s=120,
            max_retries=retries,
            backoff_base_s=0.2,
            backoff_max_s=0.5,
            api_key_env=None,
        )

    port = free_port()
    server = LocalServer(
        transformers_serve_command(smollm2, "127.0.0.1", port), port, log_path=tmp_path / "s1.log"
    )
    result = {}
    with server:
        run = SynthesisRun(config, backend(server.base_url), out, retriever)
        thread = threading.Thread(target=lambda: result.setdefault("report", run.run(passages)))
        thread.start()
        deadline = time.monotonic() + 240
        while (
            not read(pairs_path)
            and not read(out / "failed-00000-of-00001.jsonl")
            and time.monotonic() < deadline
        ):
            time.sleep(0.2)
        server.kill()  # by PID, mid-run
        thread.join(timeout=120)
    assert not thread.is_alive()
    first = result["report"]
    assert first.status == "incomplete" and first.pending > 0, server.log_tail()
    assert first.transport_failures.get("connection_error", 0) >= 1
    before = pairs_path.read_text()

    port = free_port()
    with LocalServer(
        transformers_serve_command(smollm2, "127.0.0.1", port), port, log_path=tmp_path / "s2.log"
    ) as s2:
        # retries: a loaded CI machine can time a CPU generation out; the resume is what is tested here
        second_run = SynthesisRun(config, backend(s2.base_url, retries=3), out, retriever)
        second = second_run.run(passages)
    assert second.status == "complete" and second.pending == 0
    # the requests carried response_format json_schema and the server took them (it ignores the field)
    assert second_run.decoding() == "json_schema"
    assert second.skipped_already_done == len(passages) - first.pending
    after = pairs_path.read_text()
    # earlier rows kept byte for byte; a finished shard is rewritten in corpus order
    assert set(before.splitlines()) <= set(after.splitlines())
    order = {p.id: i for i, p in enumerate(passages)}
    assert [order[r["passage_id"]] for r in read(pairs_path)] == sorted(order[r["passage_id"]] for r in read(pairs_path))
    rows, failed = read(pairs_path), read(out / "failed-00000-of-00001.jsonl")
    ids = [r["passage_id"] for r in rows] + [f["passage_id"] for f in failed]
    assert sorted(ids) == sorted(p.id for p in passages)  # nothing lost, nothing twice
    check_rows(rows, smollm2)
    manifest = json.loads((out / "manifest-00000-of-00001.json").read_text())
    assert [r["status"] for r in manifest["runs"]] == ["incomplete", "complete"]

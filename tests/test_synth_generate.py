"""The synthesis run with a scripted backend: every failure mode counted, resume after a crash or
a torn write without loss or duplication, disjoint shards, provenance and manifest."""

from __future__ import annotations

import json
import re
import threading
from collections import Counter

import numpy as np
import pytest

from embedforge.data_synth.backends.scripted import TIMEOUT, Failure, ScriptedBackend
from embedforge.data_synth.corpus import Passage
from embedforge.data_synth.generate import SynthConfig, SynthesisRun, plan_passage, select_passages
from embedforge.data_synth.personas import PersonaRetriever, hashed_bag_of_words, load_personas
from embedforge.errors import ConfigError
from embedforge.templates import DEFAULT_RETRIEVAL_INSTRUCTION, STS_INSTRUCTION


def config_reply(user: str) -> str:
    """Chooses the second persona listed in the prompt, as an LLM would by name."""
    second = re.search(r"^2\. (.+)$", user, re.MULTILINE).group(1)
    return json.dumps({"character": second, "question_type": "acquire_knowledge", "difficulty": "university"})


CASE_REPLIES = {
    "ok": '{"query": "which medicines interact badly with each other"}',
    "malformed": '{"query": "which medicines',
    "wrongfields": '{"question": "which medicines interact"}',
    "empty": "",
    "refusal": "I'm sorry, but as an AI I cannot write that query.",
    "wronglang": '{"query": "quels médicaments sont dangereux avec les autres"}',
    "timeout": TIMEOUT,
}


def passages(cases):
    return [
        Passage(
            id=f"{case}-{i}#0",
            text=f"case={case} passage number {i} about medicine dosage.",
            doc_id=f"{case}-{i}",
        )
        for i, case in enumerate(cases)
    ]


def case_of(messages):
    return re.search(r"case=(\w+)", messages[-1]["content"]).group(1)


class Script:
    """Replies by case; `retry` fails once with malformed JSON, then succeeds; `heal` makes timeouts pass."""

    def __init__(self, heal=False):
        self.heal = heal
        self.seen: dict[str, int] = {}
        self.lock = threading.Lock()

    def __call__(self, messages, call):
        user = messages[-1]["content"]
        case = case_of(messages)
        if "People who might search" in user:
            return config_reply(user)
        with self.lock:
            self.seen[user] = self.seen.get(user, 0) + 1
            nth = self.seen[user]
        if case == "retry":
            return CASE_REPLIES["malformed"] if nth == 1 else CASE_REPLIES["ok"]
        if case == "timeout" and self.heal:
            return CASE_REPLIES["ok"]
        return CASE_REPLIES[case]


@pytest.fixture(scope="module")
def retriever():
    return PersonaRetriever(load_personas(), hashed_bag_of_words)


def read(path):
    return (
        [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()] if path.exists() else []
    )


def test_every_failure_mode_is_counted_and_timeouts_resume(tmp_path, retriever):
    cases = ["ok", "ok", "malformed", "wrongfields", "empty", "refusal", "wronglang", "timeout", "retry"]
    corpus = passages(cases)
    config = SynthConfig(max_attempts=3)
    report = SynthesisRun(config, ScriptedBackend(Script()), tmp_path, retriever).run(corpus)

    assert report.invalid_outputs == {
        "malformed_json": 3 + 1,
        "schema_invalid": 3,
        "empty_output": 3,
        "refusal": 3,
        "wrong_language": 3,
    }
    assert report.passages_failed == {
        "malformed_json": 1,
        "schema_invalid": 1,
        "empty_output": 1,
        "refusal": 1,
        "wrong_language": 1,
    }
    assert report.transport_failures == {"timeout": 1}
    assert (report.rows_written, report.pending, report.status) == (3, 1, "incomplete")
    rows = read(tmp_path / "pairs-00000-of-00001.jsonl")
    assert sorted(r["passage_id"] for r in rows) == ["ok-0#0", "ok-1#0", "retry-8#0"]
    retried = next(r for r in rows if r["passage_id"] == "retry-8#0")
    assert retried["provenance"]["attempts"] == {"retrieval_config": 1, "retrieval_query": 2}
    failed = read(tmp_path / "failed-00000-of-00001.jsonl")
    assert {f["passage_id"]: f["cause"] for f in failed}["refusal-5#0"] == "refusal"
    manifest = json.loads((tmp_path / "manifest-00000-of-00001.json").read_text())
    assert manifest["report"]["transport_failures"] == {"timeout": 1}
    assert manifest["runs"][0]["status"] == "incomplete"

    # rerun: only the pending passage is asked again; nothing duplicated, failures not retried
    backend = ScriptedBackend(Script(heal=True))
    report2 = SynthesisRun(config, backend, tmp_path, retriever).run(corpus)
    assert len(backend.calls) == 2 and all("case=timeout" in m[-1]["content"] for m in backend.calls)
    assert (report2.skipped_already_done, report2.rows_written, report2.pending, report2.status) == (
        8,
        4,
        0,
        "complete",
    )
    ids = [r["passage_id"] for r in read(tmp_path / "pairs-00000-of-00001.jsonl")]
    assert len(ids) == len(set(ids)) == 4
    manifest = json.loads((tmp_path / "manifest-00000-of-00001.json").read_text())
    assert [r["status"] for r in manifest["runs"]] == ["incomplete", "complete"]


def test_rows_carry_the_training_fields_and_full_provenance(tmp_path, retriever):
    corpus = passages(["ok"])
    SynthesisRun(SynthConfig(seed=3), ScriptedBackend(Script(), model="gen-x"), tmp_path, retriever).run(
        corpus
    )
    row = read(tmp_path / "pairs-00000-of-00001.jsonl")[0]
    assert row["query"] == "which medicines interact badly with each other"
    assert row["positive"] == corpus[0].text
    assert row["negatives"] == [] and row["instruction"] == DEFAULT_RETRIEVAL_INSTRUCTION
    assert (row["task"], row["dataset"], row["language"]) == ("retrieval", "synth-retrieval", "en")
    prov = row["provenance"]
    plan = plan_passage(corpus[0].id, SynthConfig(seed=3))
    assert prov["generator"] == {"backend": "scripted", "model": "gen-x"}
    assert set(prov["templates"]) == {"retrieval_config", "retrieval_query"}
    assert prov["templates"]["retrieval_query"].startswith("retrieval_query.v1@")
    assert prov["seed"] == plan.seed and prov["run_seed"] == 3
    sampled = prov["sampled"]
    assert sampled["length"] == plan.length and sampled["question_type"] == "acquire_knowledge"
    assert sampled["difficulty"] == "university" and len(sampled["personas"]) == 5
    second = retriever.retrieve([corpus[0].text])[0][1]
    assert sampled["persona_id"] == second.id and sampled["character"] == second.text
    assert sampled["personas"] == [p.id for p in retriever.retrieve([corpus[0].text])[0]]
    assert prov["passage"]["text_hash"] == corpus[0].text_hash


def test_the_two_stage_prompts_carry_personas_and_requirement(tmp_path, retriever):
    backend = ScriptedBackend(Script())
    corpus = passages(["ok"])
    SynthesisRun(SynthConfig(), backend, tmp_path, retriever).run(corpus)
    first, second = (m[-1]["content"] for m in backend.calls)
    expected = retriever.retrieve([corpus[0].text])[0]
    assert [line.split(". ", 1)[1] for line in first.splitlines() if re.match(r"^\d\. ", line)] == [
        p.text for p in expected
    ]
    assert second.startswith(f"You are {expected[1].text}.")
    plan = plan_passage(corpus[0].id, SynthConfig())
    assert f"about {plan.length} words" in second and "language: English" in second
    assert "question type: acquire_knowledge" in second and "difficulty: university" in second


def test_crash_mid_run_then_resume_loses_and_duplicates_nothing(tmp_path, retriever):
    corpus = passages(["ok"] * 30)

    class Crash(RuntimeError):
        pass

    def crashing(messages, call):
        if call >= 25:
            raise Crash("machine lost")
        return Script()(messages, call)

    config = SynthConfig(max_inflight=4)
    with pytest.raises(Crash):
        SynthesisRun(config, ScriptedBackend(crashing, batch_size=4), tmp_path, retriever).run(corpus)
    before = (tmp_path / "pairs-00000-of-00001.jsonl").read_text()
    assert 0 < before.count("\n") < 30
    manifest = json.loads((tmp_path / "manifest-00000-of-00001.json").read_text())
    assert manifest["runs"][-1]["status"] == "interrupted"

    SynthesisRun(config, ScriptedBackend(Script(), batch_size=4), tmp_path, retriever).run(corpus)
    after = (tmp_path / "pairs-00000-of-00001.jsonl").read_text()
    assert after.startswith(before)  # earlier rows untouched
    ids = [json.loads(line)["passage_id"] for line in after.splitlines()]
    assert sorted(ids) == sorted(p.id for p in corpus)


def test_a_torn_last_line_is_cut_and_its_passage_redone(tmp_path, retriever):
    corpus = passages(["ok"] * 5)
    config = SynthConfig()
    SynthesisRun(config, ScriptedBackend(Script()), tmp_path, retriever).run(corpus)
    path = tmp_path / "pairs-00000-of-00001.jsonl"
    lines = path.read_text().splitlines(keepends=True)
    torn = json.loads(lines[-1])["passage_id"]
    path.write_text("".join(lines[:-1]) + lines[-1][: len(lines[-1]) // 2])  # a kill mid-write
    backend = ScriptedBackend(Script())
    report = SynthesisRun(config, backend, tmp_path, retriever).run(corpus)
    assert report.recovered_torn_bytes == len(lines[-1]) // 2
    torn_text = next(p.text for p in corpus if p.id == torn)
    assert len(backend.calls) == 2 and all(torn_text in m[-1]["content"] for m in backend.calls)
    rows = read(path)
    assert sorted(r["passage_id"] for r in rows) == sorted(p.id for p in corpus)


def test_shards_are_disjoint_and_cover_the_corpus(tmp_path, retriever):
    corpus = passages(["ok"] * 40)
    seen = []
    for shard in range(3):
        config = SynthConfig(shard_index=shard, num_shards=3)
        SynthesisRun(config, ScriptedBackend(Script()), tmp_path, retriever).run(corpus)
        seen.append({r["passage_id"] for r in read(tmp_path / f"pairs-{shard:05d}-of-00003.jsonl")})
        assert seen[-1] == {p.id for p in select_passages(corpus, config)}
    assert all(s for s in seen)
    assert set().union(*seen) == {p.id for p in corpus} and sum(map(len, seen)) == 40
    assert len(list(tmp_path.glob("manifest-*-of-00003.json"))) == 3


def test_num_takes_the_first_passages_before_sharding():
    corpus = passages(["ok"] * 20)
    union = set()
    for shard in range(2):
        union |= {p.id for p in select_passages(corpus, SynthConfig(num=7, shard_index=shard, num_shards=2))}
    assert union == {p.id for p in corpus[:7]}


def test_resuming_with_other_settings_is_refused(tmp_path, retriever):
    corpus = passages(["ok"])
    SynthesisRun(SynthConfig(seed=1), ScriptedBackend(Script()), tmp_path, retriever).run(corpus)
    with pytest.raises(ConfigError, match="seed"):
        SynthesisRun(SynthConfig(seed=2), ScriptedBackend(Script()), tmp_path, retriever).run(corpus)
    with pytest.raises(ConfigError, match="generator"):
        SynthesisRun(SynthConfig(seed=1), ScriptedBackend(Script(), model="other"), tmp_path, retriever).run(
            corpus
        )


def test_a_dead_backend_stops_the_run_early_and_resumably(tmp_path, retriever):
    corpus = passages(["ok"] * 50)
    backend = ScriptedBackend(lambda m, c: Failure("connection_error"), batch_size=2)
    config = SynthConfig(max_inflight=2, max_consecutive_transport_failures=4)
    report = SynthesisRun(config, backend, tmp_path, retriever).run(corpus)
    assert report.status == "incomplete" and report.pending == 50 and report.rows_written == 0
    assert len(backend.calls) < 10
    assert report.transport_failures["connection_error"] == len(backend.calls)


def test_all_task_types_map_to_training_rows(tmp_path, retriever):
    def script(messages, call):
        system = messages[0]["content"]
        if "translator" in system:
            return '{"source": "Dosage matters.", "translation": "Die Dosierung ist wichtig und nicht egal."}'
        if "similarity" in system:
            return (
                '{"sentence": "Dosage matters.", "paraphrase": "The dose is important.", '
                '"contrast": "Dosage is irrelevant."}'
            )
        if "classification" in system:
            return (
                '{"task": "Classify medical texts by topic", "text": "Take two pills daily.", '
                '"label": "dosage", "misleading_label": "diagnosis"}'
            )
        return Script()(messages, call)

    config = SynthConfig(tasks=["retrieval", "bitext", "sts", "classification"], bitext_languages=["de"])
    corpus = passages(["ok"] * 24)
    report = SynthesisRun(config, ScriptedBackend(script), tmp_path, retriever).run(corpus)
    rows = read(tmp_path / "pairs-00000-of-00001.jsonl")
    assert report.rows_written == 24 and set(report.tasks) == {"retrieval", "bitext", "sts", "classification"}
    by_task = {r["task"]: r for r in rows}
    assert by_task["sts"]["negatives"] == ["Dosage is irrelevant."]
    assert by_task["sts"]["instruction"] == STS_INSTRUCTION
    assert by_task["bitext"]["language"] == "de" and by_task["bitext"]["positive"].startswith("Die Dosierung")
    cls = by_task["classification"]
    assert (cls["query"], cls["positive"], cls["negatives"], cls["instruction"]) == (
        "Take two pills daily.",
        "dosage",
        ["diagnosis"],
        "Classify medical texts by topic",
    )
    assert {r["task"] for r in rows} == {plan_passage(p.id, config).task for p in corpus}


def test_local_backends_receive_full_batches(tmp_path, retriever):
    sizes = []

    class Recording(ScriptedBackend):
        def generate(self, batch, params, seeds=None):
            sizes.append(len(batch))
            return super().generate(batch, params, seeds)

    SynthesisRun(SynthConfig(), Recording(Script(), batch_size=8), tmp_path, retriever).run(
        passages(["ok"] * 16)
    )
    assert max(sizes) == 8 and sum(sizes) == 32 and len(sizes) <= 6


def test_persona_retrieval_matches_a_brute_force_reference(minilm):
    from sentence_transformers import SentenceTransformer

    from embedforge.embedder import Embedder

    personas = load_personas()
    docs = [
        "The dosage of antibiotics for children depends on body weight.",
        "Crop rotation keeps the soil fertile and reduces pests.",
        "The Roman legions built roads across the empire.",
    ]
    found = PersonaRetriever(personas, Embedder.from_pretrained(minilm).encode, top_k=5).retrieve(docs)
    st = SentenceTransformer(str(minilm), device="cpu")
    scores = (
        st.encode(docs, normalize_embeddings=True)
        @ st.encode([p.text for p in personas], normalize_embeddings=True).T
    )
    for row, got in zip(scores, found):
        assert [p.id for p in got] == [personas[j].id for j in np.argsort(-row)[:5]]
    assert "farmer" in found[1][0].text.lower() or "gardener" in found[1][0].text.lower()


def test_reading_a_live_shard_ignores_its_partial_line_and_leaves_it_alone(tmp_path):
    from embedforge.data_synth.shards import read_finished_rows

    path = tmp_path / "pairs-00000-of-00002.jsonl"
    content = '{"passage_id": "a"}\n{"passage_id": "b", "query": "\u2028 line sep"}\n{"passage_id": "c", "qu'
    path.write_text(content, encoding="utf-8")
    assert [r["passage_id"] for r in read_finished_rows(path)] == ["a", "b"]
    assert path.read_text(encoding="utf-8") == content


# --- the one-call strategy, groups of rows, the stage function -----------------------------------

ONE_CALL_REPLY = json.dumps({
    "topic": "medicine dosage",
    "question": "how is a medicine dose chosen?",
    "keywords": "medicine dosage",
    "summary": "medicine dosage",  # a repeat of the keywords: kept once
})


class SmallScripted(ScriptedBackend):
    num_parameters = 135_000_000  # what the transformers backend reports for SmolLM2-135M


def one_call_script(messages, call):
    assert "Name the topic of the passage" in messages[-1]["content"]
    return ONE_CALL_REPLY


def test_auto_strategy_gives_small_generators_one_call_with_several_queries(tmp_path):
    backend = SmallScripted(one_call_script)
    corpus = passages(["ok"] * 3)
    run = SynthesisRun(SynthConfig(), backend, tmp_path)  # no persona retriever needed
    report = run.run(corpus)
    assert run.strategy == "one_call" and len(backend.calls) == 3
    rows = read(tmp_path / "pairs-00000-of-00001.jsonl")
    assert report.rows_written == len(rows) == 6 and report.passages_with_rows == 3 and report.pending == 0
    first = [r for r in rows if r["passage_id"] == corpus[0].id]
    assert [r["query"] for r in first] == ["how is a medicine dose chosen?", "medicine dosage"]
    assert [r["provenance"]["sampled"]["question_type"] for r in first] == ["acquire_knowledge", "keywords"]
    assert [r["provenance"]["group"] for r in first] == [[0, 2], [1, 2]]
    prov = first[0]["provenance"]
    assert prov["strategy"] == "one_call" and set(prov["templates"]) == {"retrieval_one_call"}
    assert "length" not in prov["sampled"] and prov["sampling"]["temperature"] == 0.3
    assert SynthesisRun(SynthConfig(), ScriptedBackend(Script()), tmp_path / "x", retriever_for_test()).strategy == (
        "persona")  # a backend of unknown size keeps the report's flow


def retriever_for_test():
    return PersonaRetriever(load_personas(), hashed_bag_of_words)


def test_a_group_cut_by_a_kill_is_removed_and_its_passage_redone(tmp_path):
    corpus = passages(["ok"] * 3)
    SynthesisRun(SynthConfig(), SmallScripted(one_call_script), tmp_path).run(corpus)
    path = tmp_path / "pairs-00000-of-00001.jsonl"
    lines = path.read_text().splitlines(keepends=True)
    torn = json.loads(lines[-1])["passage_id"]
    path.write_text("".join(lines[:-1]))  # the kill came after the group's first line
    backend = SmallScripted(one_call_script)
    report = SynthesisRun(SynthConfig(), backend, tmp_path).run(corpus)
    assert report.recovered_torn_bytes == len(lines[-2]) and len(backend.calls) == 1
    assert next(p.text for p in corpus if p.id == torn) in backend.calls[0][-1]["content"]
    rows = read(path)
    assert len(rows) == 6 and Counter(r["passage_id"] for r in rows) == {p.id: 2 for p in corpus}


def test_synthesize_writes_rows_reports_and_provenance(tmp_path):
    from embedforge.data_synth import SynthConfig as Exported
    from embedforge.data_synth import synthesize

    assert Exported is SynthConfig
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"id": f"d{i}", "text": f"case=ok text {i} on medicine dosage."}) + "\n"
                              for i in range(4)))
    config = SynthConfig(corpus=str(corpus), output=str(tmp_path / "out"), judge=None)
    outcome = synthesize(config, backend=SmallScripted(one_call_script))
    assert (outcome.rows, outcome.passages, outcome.passages_with_rows, outcome.status) == (8, 4, 4, "complete")
    assert outcome.strategy == "one_call" and outcome.schema_valid_rate == 1.0 and not outcome.warnings
    quality = json.loads((tmp_path / "out" / "quality.json").read_text())
    assert quality["question_types"] == {"acquire_knowledge": 4, "keywords": 4}
    assert quality["exact_duplicate_queries"] == 6  # four passages, the same two queries
    trail = json.loads((tmp_path / "out" / "provenance.json").read_text())
    record = trail[-1]
    assert record["stage"] == "synth" and record["strategy"] == "one_call"
    assert record["corpus"]["passages"] == 4 and len(record["corpus"]["texts_sha256"]) == 64
    assert record["templates"]["retrieval_one_call"]["version"] == 1
    assert "## Quality" in (tmp_path / "out" / "coverage.md").read_text()


def test_synthesize_warns_when_nothing_came_out_and_names_missing_paths(tmp_path):
    from embedforge.data_synth import synthesize

    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text(json.dumps({"id": "d", "text": "case=ok a passage"}) + "\n")
    outcome = synthesize(SynthConfig(corpus=str(corpus), output=str(tmp_path / "out"), judge=None,
                                     max_attempts=2), backend=SmallScripted(lambda m, c: "no json here"))
    assert outcome.rows == 0 and outcome.schema_valid_rate == 0.0
    assert any("wrote no rows" in w and "malformed_json 1" in w for w in outcome.warnings)
    assert any("valid JSON of the schema" in w for w in outcome.warnings)
    with pytest.raises(ConfigError, match="`corpus` is not set"):
        synthesize(SynthConfig(output=str(tmp_path / "o")), backend=SmallScripted(one_call_script))
    with pytest.raises(ConfigError, match="`model` is not set"):
        synthesize(SynthConfig(corpus=str(corpus), output=str(tmp_path / "o")))


def test_synth_flags_and_their_short_aliases_fill_the_config(tmp_path):
    import argparse

    from embedforge.config import config_from_args
    from embedforge.data_synth.cli import register

    parser = argparse.ArgumentParser()
    register(parser.add_subparsers())
    args = parser.parse_args(["synth", "--corpus", "c.jsonl", "--output", "out", "--model", "m", "--task", "sts",
                              "bitext", "--prompts", str(tmp_path), "--chunk-tokens", "none", "--strategy",
                              "persona", "--no-constrained-decoding", "--set", "lengths.sts=[5]"])
    config = config_from_args(SynthConfig, args)
    assert (config.corpus, config.output, config.model, config.tasks) == ("c.jsonl", "out", "m", ["sts", "bitext"])
    assert config.prompts_dir == str(tmp_path) and config.chunk_tokens is None and config.strategy == "persona"
    assert config.constrained_decoding is False and config.lengths["sts"] == [5]

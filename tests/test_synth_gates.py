"""Quality gates held against independent references: exact Jaccard for MinHash, sentence-
transformers for the teacher cosine, a brute-force ranking for the round trip, Counter for the
coverage report; and the `embedforge filter` command end to end."""

from __future__ import annotations

import itertools
import json
import random
from collections import Counter

import numpy as np
import pytest

from embedforge.data_synth.contamination import ContaminationIndex, contamination_gate, load_eval_texts
from embedforge.data_synth.gates import (
    copy_gate,
    copy_ratio,
    cosine_gate,
    jaccard,
    minhash_signatures,
    near_duplicate_gate,
    roundtrip_gate,
)
from embedforge.data_synth.report import coverage_markdown

PASSAGE = (
    "The mitochondria is the powerhouse of the cell. It produces energy in the form of ATP through "
    "cellular respiration, which uses oxygen and glucose."
)


@pytest.fixture(scope="module")
def teacher(minilm):
    from embedforge.embedder import Embedder

    return Embedder.from_pretrained(minilm)


@pytest.fixture(scope="module")
def st_model(minilm):
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(str(minilm), device="cpu")


def test_copy_ratio_by_hand():
    # query words: what(0) produces energy in the form of atp(7) -> "produces energy in the form of ATP"
    # holds the passage 4-grams covering words 1..7, so 7 of 8 words are covered
    assert copy_ratio("what produces energy in the form of ATP", PASSAGE) == pytest.approx(7 / 8)
    assert copy_ratio("how do cells make energy from sugar", PASSAGE) == 0.0
    assert copy_ratio("mitochondria energy", PASSAGE) == 0.0  # shorter than n: not judged


def test_copy_gate_drops_pasted_queries_only():
    rows = [
        {
            "query": "It produces energy in the form of ATP through cellular respiration",
            "positive": PASSAGE,
            "task": "retrieval",
        },
        {"query": "why are mitochondria called the powerhouse", "positive": PASSAGE, "task": "retrieval"},
        {
            "query": "It produces energy in the form of ATP through cellular respiration",
            "positive": PASSAGE,
            "task": "sts",
        },
    ]
    result = copy_gate(rows, max_ratio=0.6)
    assert [r["query"] for r in result.kept] == [rows[1]["query"], rows[2]["query"]]
    assert result.dropped[0][1].startswith("copy: 1.00")


def test_minhash_estimates_the_exact_jaccard():
    rng = random.Random(0)
    words = [
        "alpha",
        "beta",
        "gamma",
        "delta",
        "epsilon",
        "zeta",
        "eta",
        "theta",
        "iota",
        "kappa",
        "lambda",
        "mu",
    ]
    texts = [" ".join(rng.choices(words, k=rng.randint(4, 10))) for _ in range(30)]
    sigs = minhash_signatures(texts, num_perm=256)
    errors = [
        abs(float(np.mean(sigs[i] == sigs[j])) - jaccard(texts[i], texts[j]))
        for i, j in itertools.combinations(range(len(texts)), 2)
    ]
    assert np.mean(errors) < 0.03 and max(errors) < 0.15


def test_near_duplicate_gate_keeps_the_first_of_each_group():
    rows = [
        {"query": q}
        for q in [
            "how do mitochondria produce energy",
            "How do mitochondria produce energy?",
            "what is the capital of france",
            "how do mitochondria produce  energy!!",
            "what do ribosomes do",
        ]
    ]
    result = near_duplicate_gate(rows, threshold=0.8)
    assert [r["query"] for r in result.kept] == [rows[0]["query"], rows[2]["query"], rows[4]["query"]]
    assert len(result.dropped) == 2 and all("near_duplicate" in reason for _, reason in result.dropped)


def test_contamination_exact_and_ngram(tmp_path):
    beir = tmp_path / "beir"
    beir.mkdir()
    (beir / "queries.jsonl").write_text(
        json.dumps({"_id": "q1", "text": "What is the capital of France?"}) + "\n"
    )
    (beir / "corpus.jsonl").write_text(
        json.dumps(
            {
                "_id": "d1",
                "title": "",
                "text": "Paris is the capital and most populous city of France with an "
                "estimated population of two million residents in 2023",
            }
        )
        + "\n"
    )
    assert len(load_eval_texts(beir)) == 2
    index = ContaminationIndex.from_paths([beir], n=13)
    rows = [
        {"query": "what is the capital of  france?", "positive": "x"},
        {
            "query": "tell me about paris",
            "positive": "Paris is the capital and most populous city of France "
            "with an estimated population of many people",
        },
        {"query": "clean query about rivers", "positive": "Rivers flow to the sea."},
    ]
    result = contamination_gate(rows, index)
    assert [r["query"] for r in result.kept] == ["clean query about rivers"]
    reasons = [reason for _, reason in result.dropped]
    assert "query equals a text of" in reasons[0] and "positive shares a 13-gram" in reasons[1]


def test_cosine_gate_matches_sentence_transformers(teacher, st_model):
    rows = [
        {"query": "how do cells make energy", "positive": PASSAGE},
        {"query": "best pizza in naples", "positive": PASSAGE},
        {"query": "the powerhouse of the cell", "positive": PASSAGE},
    ]
    reference = np.einsum(
        "ij,ij->i",
        st_model.encode([r["query"] for r in rows], normalize_embeddings=True),
        st_model.encode([r["positive"] for r in rows], normalize_embeddings=True),
    )
    # between the lowest two scores, never on one: the gate agrees with the reference to 1e-3, not exactly
    low, second = sorted(reference)[:2]
    assert second - low > 2e-3
    threshold = float(low + second) / 2
    result = cosine_gate(rows, teacher, threshold=threshold, use_instructions=False)
    got = [r["quality"]["teacher_cosine"] for r in rows]
    np.testing.assert_allclose(got, reference, atol=1e-3)
    assert [r["query"] for r in result.kept] == [
        r["query"] for r, s in zip(rows, reference) if s >= threshold
    ]
    assert len(result.dropped) == 1


def test_roundtrip_gate_matches_a_brute_force_rank(teacher, st_model):
    docs = [
        "Mitochondria make ATP for the cell.",
        "Paris is the capital of France.",
        "Volcanoes erupt when magma rises.",
        "The violin has four strings.",
    ]
    queries = ["how do cells get energy", "capital city of france", "violin strings", "what is a tuba"]
    rows = [{"query": q, "positive": d, "task": "retrieval"} for q, d in zip(queries, docs)]
    q = st_model.encode(queries, normalize_embeddings=True)
    d = st_model.encode(docs, normalize_embeddings=True)
    scores = q @ d.T
    ranks = [int((scores[i] > scores[i, i]).sum()) for i in range(len(rows))]
    result = roundtrip_gate(rows, teacher, k=1, use_instructions=False)
    assert [r["quality"]["roundtrip_rank"] for r in rows] == ranks
    assert [r["query"] for r in result.kept] == [qq for qq, rank in zip(queries, ranks) if rank < 1]
    assert ranks[1] == 0 and ranks[2] > 0  # "violin strings" -> the "Volcanoes" doc is assigned to it


def test_coverage_report_counts_match_the_rows():
    rng = random.Random(1)
    rows = []
    for _ in range(40):
        rows.append(
            {
                "task": rng.choice(["retrieval", "sts"]),
                "language": rng.choice(["en", "de"]),
                "provenance": {
                    "sampled": {
                        "question_type": rng.choice(["keywords", "summary"]),
                        "difficulty": "phd",
                        "persona_id": rng.choice(["p001", "p002"]),
                        "character": "x",
                        "length": 8,
                    }
                },
            }
        )
    md = coverage_markdown(rows, gate_drops={"copy": Counter({"copy": 3})}, rows_before_gates=43)
    for key, value in Counter(r["task"] for r in rows).items():
        assert f"| {key} | {value} | {value / 40:.1%} |" in md
    for key, value in Counter(r["provenance"]["sampled"]["persona_id"] for r in rows).items():
        assert f"| {key} | {value} |" in md
    assert "kept of 43" in md and "| copy | 3 |" in md and "### difficulty" in md


def test_filter_command_end_to_end(tmp_path, minilm):
    from embedforge.cli import main

    synth = tmp_path / "synth"
    synth.mkdir()
    rows = [
        {"query": "how do cells make energy", "positive": PASSAGE, "task": "retrieval"},
        {"query": "how do cells make energy?", "positive": PASSAGE + " Also fats.", "task": "retrieval"},
        {
            "query": "It produces energy in the form of ATP through cellular respiration",
            "positive": PASSAGE,
            "task": "retrieval",
        },
        {"query": "pizza toppings in naples", "positive": PASSAGE, "task": "retrieval"},
        {
            "query": "what is the capital of france",
            "positive": "Paris, on the Seine, is famous for its museums.",
            "task": "retrieval",
        },
    ]
    (synth / "pairs-00000-of-00001.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "eval.jsonl").write_text(
        json.dumps({"id": "1", "query": "What is the capital of France?"}) + "\n"
    )
    out = tmp_path / "filtered"
    code = main(
        [
            "filter",
            "--input",
            str(synth),
            "--output",
            str(out),
            "--teacher",
            str(minilm),
            "--threshold",
            "0.3",
            "--roundtrip-k",
            "none",
            "--eval-sets",
            str(tmp_path / "eval.jsonl"),
            "--no-teacher-instructions",
        ]
    )
    assert code == 0
    kept = [json.loads(x) for x in (out / "pairs.jsonl").read_text().splitlines()]
    dropped = [json.loads(x) for x in (out / "dropped.jsonl").read_text().splitlines()]
    assert [r["query"] for r in kept] == ["how do cells make energy"]
    assert sorted(d["drop_reason"].split(":")[0] for d in dropped) == [
        "contamination",
        "copy",
        "cosine",
        "near_duplicate",
    ]
    report = json.loads((out / "filter_report.json").read_text())
    assert report["rows_in"] == 5 and report["rows_kept"] == 1 and "roundtrip" not in report["dropped"]
    assert "kept of 5" in (out / "coverage.md").read_text()
    assert (
        main(["filter", "--input", str(synth), "--output", str(out), "--threshold", "0.3"]) == 2
    )  # no teacher
    # the filter's folder, given to the next stage (mine), yields the kept rows only, never dropped.jsonl
    from embedforge.data_synth.filtering import read_pairs

    assert [r["query"] for r in read_pairs([out])[0]] == ["how do cells make energy"]


# --- calibration to the teacher, stage function, quality report -------------------------------------


def test_calibrated_threshold_is_the_percentile_of_foreign_pairs():
    from embedforge.data_synth.gates import calibrated_threshold

    rng = np.random.default_rng(0)
    q = rng.normal(size=(30, 8)).astype(np.float32)
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    docs = rng.normal(size=(10, 8)).astype(np.float32)
    docs /= np.linalg.norm(docs, axis=1, keepdims=True)
    own = [i % 10 for i in range(30)]  # three queries per passage
    positives = [f"passage {j}" for j in own]
    scores = q @ docs.T
    foreign = np.concatenate([np.delete(scores[i], own[i]) for i in range(30)])
    got = calibrated_threshold(q, docs[own], positives, percentile=95.0)  # all 9 foreign per row fit
    assert got == pytest.approx(float(np.percentile(foreign, 95.0)), abs=1e-6)
    assert calibrated_threshold(q[:3], docs[[0, 0, 0]], ["same"] * 3) is None


def test_only_instruction_aware_teachers_get_instructions(teacher, tiny_qwen3_embedder):
    from embedforge.data_synth.gates import instruction_aware
    from embedforge.embedder import Embedder

    assert not instruction_aware(teacher)  # all-MiniLM-L6-v2: mean pooling, no query prompt
    assert instruction_aware(Embedder.from_pretrained(tiny_qwen3_embedder))  # Qwen3 layout: last-token pooling


def write_synth(folder, rows):
    folder.mkdir()
    (folder / "pairs-00000-of-00001.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return folder


def test_filter_pairs_names_the_gate_that_emptied_it(tmp_path, minilm):
    from embedforge.data_synth import FilterConfig, filter_pairs

    rows = [{"query": q, "positive": PASSAGE, "task": "retrieval"} for q in
            ("how do cells make energy", "best pizza in naples")]
    synth = write_synth(tmp_path / "synth", rows)
    outcome = filter_pairs(FilterConfig(input=[str(synth)], output=str(tmp_path / "f"), teacher=str(minilm),
                                        cosine_threshold=0.99, roundtrip_k=None))
    assert (outcome.rows_in, outcome.rows_kept, outcome.emptied_by) == (2, 0, "cosine")
    assert outcome.warnings == ["filter kept 0 of 2 rows: the cosine gate (threshold 0.99) dropped the last ones"]
    assert outcome.teacher_instructions is False  # MiniLM is not instruction-aware
    trail = json.loads((tmp_path / "f" / "provenance.json").read_text())
    assert trail[-1]["gates"][-1] == {"gate": "cosine", "rows_in": 2, "rows_out": 0, "threshold": 0.99}
    with pytest.raises(Exception, match="`output` is not set"):
        filter_pairs(FilterConfig(input=[str(synth)], teacher=str(minilm)))


def test_auto_threshold_comes_from_the_teachers_scores(tmp_path, minilm, teacher):
    from embedforge.data_synth import FilterConfig, filter_pairs
    from embedforge.data_synth.gates import calibrated_threshold

    docs = ["Mitochondria make ATP for the cell.", "Paris is the capital of France.",
            "Volcanoes erupt when magma rises.", "The violin has four strings.", "Bread rises with yeast."]
    queries = ["how do cells get energy", "capital city of france", "why do volcanoes erupt",
               "how many strings does a violin have", "a quantum field theory of gravity"]
    rows = [{"query": q, "positive": d, "task": "retrieval"} for q, d in zip(queries, docs)]
    synth = write_synth(tmp_path / "synth", rows)
    outcome = filter_pairs(FilterConfig(input=[str(synth)], output=str(tmp_path / "f"), teacher=str(minilm),
                                        roundtrip_k=None, copy_max_ratio=None, near_dup_threshold=None))
    q = teacher.encode(queries)
    p = teacher.encode(docs)
    expected = round(calibrated_threshold(q, p, docs, 95.0), 4)
    assert outcome.cosine_threshold == pytest.approx(expected, abs=1e-3)
    kept = [json.loads(x)["query"] for x in (tmp_path / "f" / "pairs.jsonl").read_text().splitlines()]
    own = np.einsum("ij,ij->i", q, p)
    assert kept == [qq for qq, s in zip(queries, own) if s >= outcome.cosine_threshold]
    assert "a quantum field theory of gravity" not in kept and len(kept) >= 3


def test_quality_summary_against_direct_counts(teacher):
    from embedforge.data_synth.quality import quality_summary

    docs = ["Mitochondria make ATP for the cell.", "Paris is the capital of France."]
    rows = [
        {"query": "how do cells get energy", "positive": docs[0], "passage_id": "a",
         "provenance": {"sampled": {"question_type": "acquire_knowledge"}}},
        {"query": "How do cells get energy", "positive": docs[0], "passage_id": "a",
         "provenance": {"sampled": {"question_type": "keywords"}}},
        {"query": "capital of france paris city", "positive": docs[1], "passage_id": "b",
         "provenance": {"sampled": {"question_type": "keywords"}}},
    ]
    reports = [{"llm_calls": 10, "transport_failures": {"timeout": 2},
                "invalid_outputs": {"malformed_json": 1, "schema_invalid": 1, "wrong_language": 3}}]
    summary = quality_summary(rows, reports, teacher, k=1)
    assert summary["schema_valid_rate"] == pytest.approx(1 - 2 / 8) and summary["replies"] == 8
    assert summary["exact_duplicate_queries"] == 1 and summary["passages_with_rows"] == 2
    assert summary["question_types"] == {"acquire_knowledge": 1, "keywords": 2}
    assert summary["query_words"]["min"] == 5 and summary["query_words"]["max"] == 5
    q, d = teacher.encode([r["query"] for r in rows]), teacher.encode(docs)
    own = [0, 0, 1]
    ranks = [int((q[i] @ d.T > q[i] @ d[own[i]]).sum()) for i in range(3)]
    assert summary["on_topic_rate"] == pytest.approx(np.mean([r < 1 for r in ranks]))
    assert summary["on_topic_random_baseline"] == 0.5

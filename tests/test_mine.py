"""Hard-negative mining against a brute-force reference built with sentence-transformers; the
positive and its duplicates never come back; chunks resume; shards and IVF agree with flat search."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest

from embedforge.data_synth.corpus import Passage, text_hash
from embedforge.data_synth.mine import MineConfig, mine_rows

TOPICS = ["cats", "dogs", "rockets", "bread", "rivers", "chess", "violins", "taxes", "volcanoes", "tennis"]
ADJ = ["small", "old", "famous", "strange", "red", "quiet", "fast", "cheap", "modern", "rare"]


def make_corpus(n=160, seed=0):
    rng = random.Random(seed)
    texts = []
    while len(texts) < n:
        t = (
            f"The {rng.choice(ADJ)} {rng.choice(TOPICS)} near the {rng.choice(ADJ)} {rng.choice(TOPICS)} "
            f"number {len(texts)}."
        )
        texts.append(t)
    return [Passage(id=f"d{i}#0", text=t, doc_id=f"d{i}") for i, t in enumerate(texts)]


def make_rows(passages, n=12):
    return [
        {
            "query": f"tell me about {p.text.split()[2]} {p.text.split()[1]}",
            "positive": p.text,
            "instruction": "Find the sentence",
            "dataset": "toy",
        }
        for p in passages[:n]
    ]


@pytest.fixture(scope="module")
def embedder(minilm):
    from embedforge.embedder import Embedder

    return Embedder.from_pretrained(minilm)


@pytest.fixture(scope="module")
def reference(minilm):
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(str(minilm), device="cpu")


def cfg(minilm, **kw):
    base = {
        "model": str(minilm),
        "num_negatives": 4,
        "rank_start": 2,
        "rank_end": 40,
        "margin": 0.02,
        "chunk_size": 50,
        "use_instructions": False,
    }
    base.update(kw)
    return MineConfig(**base)


def read(path):
    return [json.loads(x) for x in path.read_text().splitlines()]


def test_negatives_follow_the_brute_force_ranking(tmp_path, minilm, embedder, reference):
    passages = make_corpus()
    rows = make_rows(passages)
    config = cfg(minilm)
    report = mine_rows(rows, passages, config, tmp_path, embedder=embedder)
    out = read(tmp_path / "mined-00000-of-00001.jsonl")
    q = reference.encode([r["query"] for r in rows], normalize_embeddings=True)
    d = reference.encode([p.text for p in passages], normalize_embeddings=True)
    pos = reference.encode([r["positive"] for r in rows], normalize_embeddings=True)
    text_to_index = {p.text: i for i, p in enumerate(passages)}
    for i, row in enumerate(out):
        scores = q[i] @ d.T
        order = np.argsort(-scores, kind="stable")
        pos_score = float(q[i] @ pos[i])
        allowed = {
            int(j)
            for rank, j in enumerate(order)
            if config.rank_start <= rank < config.rank_end
            and passages[j].text != rows[i]["positive"]
            and scores[j] <= pos_score - config.margin
        }
        got = [text_to_index[t] for t in row["negatives"]]
        assert set(got) <= allowed
        assert len(got) == min(config.num_negatives, len(allowed))
        mining = row["provenance"]["mining"]
        np.testing.assert_allclose(mining["negative_scores"], scores[got], atol=2e-3)
        assert mining["positive_score"] == pytest.approx(pos_score, abs=2e-3)
        assert (row["query"], row["instruction"], row["dataset"]) == (
            rows[i]["query"],
            "Find the sentence",
            "toy",
        )
    assert report.rows == 12 and report.negatives == sum(len(r["negatives"]) for r in out)


def test_never_the_positive_nor_a_duplicate_of_it(tmp_path, minilm, embedder):
    passages = make_corpus(60)
    rows = make_rows(passages, 6)
    # a duplicate that differs only in case and spacing, as a second document of the corpus
    passages.append(
        Passage(id="dup#0", text="  " + passages[0].text.upper().replace(" ", "  "), doc_id="dup")
    )
    assert text_hash(passages[-1].text) == text_hash(passages[0].text)
    config = cfg(minilm, rank_start=0, rank_end=61, margin=-10.0, num_negatives=60)  # margin off, take all
    report = mine_rows(rows, passages, config, tmp_path, embedder=embedder)
    for row in read(tmp_path / "mined-00000-of-00001.jsonl"):
        hashes = {text_hash(n) for n in row["negatives"]}
        assert text_hash(row["positive"]) not in hashes and text_hash(row["query"]) not in hashes
        assert len(hashes) == len(row["negatives"])  # no repeats
        assert len(row["negatives"]) >= 60 - 2
    assert report.dropped_positive_or_duplicate >= 6 + 1


def test_margin_drops_candidates_close_to_the_positive(tmp_path, minilm, embedder):
    passages = make_corpus()
    rows = make_rows(passages)
    mine_rows(rows, passages, cfg(minilm, rank_start=0, margin=0.1), tmp_path, embedder=embedder)
    for row in read(tmp_path / "mined-00000-of-00001.jsonl"):
        m = row["provenance"]["mining"]
        assert all(s <= m["positive_score"] - 0.1 + 1e-6 for s in m["negative_scores"])


def test_embedding_chunks_resume(tmp_path, minilm, embedder):
    passages = make_corpus()
    rows = make_rows(passages)
    first = mine_rows(rows, passages, cfg(minilm), tmp_path, embedder=embedder)
    before = read(tmp_path / "mined-00000-of-00001.jsonl")
    assert (first.chunks_computed, first.chunks_reused) == (4, 0)
    chunk = next((tmp_path / "embeddings").glob("*/chunk-00002.npy"))
    chunk.unlink()
    second = mine_rows(rows, passages, cfg(minilm), tmp_path, embedder=embedder)
    assert (second.chunks_computed, second.chunks_reused) == (1, 3)
    assert read(tmp_path / "mined-00000-of-00001.jsonl") == before


def test_shards_and_embed_only_fan_out(tmp_path, minilm, embedder):
    passages = make_corpus()
    rows = make_rows(passages)
    whole = tmp_path / "whole"
    mine_rows(rows, passages, cfg(minilm), whole, embedder=embedder)
    expected = {
        r["query"] + r["positive"]: r["negatives"] for r in read(whole / "mined-00000-of-00001.jsonl")
    }
    split = tmp_path / "split"
    e0 = mine_rows(
        [], passages, cfg(minilm, shard_index=0, num_shards=2), split, embedder=embedder, embed_only=True
    )
    assert e0.chunks_computed == 2  # chunks 0 and 2 of 4
    got = {}
    for shard in range(2):
        rep = mine_rows(rows, passages, cfg(minilm, shard_index=shard, num_shards=2), split, embedder=embedder)
        got.update(
            {
                r["query"] + r["positive"]: r["negatives"]
                for r in read(split / f"mined-{shard:05d}-of-00002.jsonl")
            }
        )
        assert rep.rows == 6
    assert got == expected


def test_ivf_with_all_cells_probed_equals_flat(tmp_path, minilm, embedder):
    passages = make_corpus()
    rows = make_rows(passages)
    mine_rows(rows, passages, cfg(minilm), tmp_path / "flat", embedder=embedder)
    mine_rows(rows, passages, cfg(minilm, index="ivf", nlist=8, nprobe=8), tmp_path / "ivf", embedder=embedder)
    flat = [r["negatives"] for r in read(tmp_path / "flat" / "mined-00000-of-00001.jsonl")]
    ivf = [r["negatives"] for r in read(tmp_path / "ivf" / "mined-00000-of-00001.jsonl")]
    assert flat == ivf


def test_reranker_verdict_drops_exactly_the_candidates_it_judges_relevant(
    tmp_path, minilm, embedder, tiny_qwen3_lm
):
    from embedforge.reranker import Reranker

    reranker = Reranker.from_pretrained(tiny_qwen3_lm)
    passages = make_corpus(40)
    rows = make_rows(passages, 3)
    all_probs = [reranker.score(r["query"], [p.text for p in passages]) for r in rows]
    threshold = float(np.median(np.concatenate(all_probs)))
    config = cfg(
        minilm,
        rank_start=0,
        rank_end=40,
        margin=-10.0,
        num_negatives=40,
        reranker=str(tiny_qwen3_lm),
        reranker_threshold=threshold,
    )
    report = mine_rows(rows, passages, config, tmp_path, embedder=embedder, reranker=reranker)
    text_to_index = {p.text: i for i, p in enumerate(passages)}
    expected_drops = 0
    for row, probs in zip(read(tmp_path / "mined-00000-of-00001.jsonl"), all_probs):
        candidates = [i for i, p in enumerate(passages) if p.text != row["positive"]]
        relevant = {i for i in candidates if probs[i] >= threshold}
        expected_drops += len(relevant)
        assert {text_to_index[t] for t in row["negatives"]} == set(candidates) - relevant
    assert report.dropped_reranker == expected_drops > 0


def test_mine_command(tmp_path, minilm):
    from embedforge.cli import main

    passages = make_corpus(80)
    (tmp_path / "corpus.jsonl").write_text(
        "".join(json.dumps({"id": p.doc_id, "text": p.text}) + "\n" for p in passages)
    )
    (tmp_path / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in make_rows(passages, 5)))
    code = main(
        [
            "mine",
            "--model",
            str(minilm),
            "--data",
            str(tmp_path / "pairs.jsonl"),
            "--corpus",
            str(tmp_path / "corpus.jsonl"),
            "--output",
            str(tmp_path / "out"),
            "--num-negatives",
            "3",
            "--range",
            "1:30",
            "--no-instructions",
        ]
    )
    assert code == 0
    rows = read(tmp_path / "out" / "mined-00000-of-00001.jsonl")
    assert len(rows) == 5 and all(len(r["negatives"]) == 3 for r in rows)
    assert (
        main(
            [
                "mine",
                "--model",
                str(minilm),
                "--data",
                str(tmp_path / "pairs.jsonl"),
                "--corpus",
                str(tmp_path / "corpus.jsonl"),
                "--output",
                str(tmp_path / "o2"),
                "--range",
                "30:10",
            ]
        )
        == 2
    )


def test_mine_function_warns_when_the_margin_leaves_no_negatives(tmp_path, minilm, capsys):
    from embedforge.cli import main
    from embedforge.data_synth import MineConfig as Exported
    from embedforge.data_synth import mine

    assert Exported is MineConfig
    passages = make_corpus(60)
    (tmp_path / "corpus.jsonl").write_text(
        "".join(json.dumps({"id": p.doc_id, "text": p.text}) + "\n" for p in passages)
    )
    (tmp_path / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in make_rows(passages, 4)))
    common = {"model": str(minilm), "data": [str(tmp_path / "pairs.jsonl")], "corpus": str(tmp_path / "corpus.jsonl"),
              "num_negatives": 3, "rank_start": 0, "rank_end": 20, "use_instructions": False}
    outcome = mine(MineConfig(output=str(tmp_path / "none"), margin=5.0, **common))  # nothing scores pos - 5
    assert outcome.rows == 4 and outcome.negatives == 0
    assert outcome.dropped_false_negative_margin == outcome.candidates - outcome.dropped_positive_or_duplicate
    assert len(outcome.warnings) == 1 and outcome.warnings[0].startswith("mine produced 0 negatives for 4 rows")
    assert "the margin (5) dropped" in outcome.warnings[0]
    trail = json.loads((tmp_path / "none" / "provenance.json").read_text())
    assert trail[-1]["stage"] == "mine" and trail[-1]["settings"]["margin"] == 5.0
    fine = mine(MineConfig(output=str(tmp_path / "ok"), margin=-10.0, **common))
    assert fine.negatives == 12 and fine.warnings == [] and fine.files == [str(tmp_path / "ok" / "mined-00000-of-00001.jsonl")]
    code = main(["mine", "--model", str(minilm), "--data", str(tmp_path / "pairs.jsonl"), "--corpus",
                 str(tmp_path / "corpus.jsonl"), "--output", str(tmp_path / "cli"), "--margin", "5",
                 "--range", "0:20", "--no-instructions"])
    assert code == 0 and "warning: mine produced 0 negatives" in capsys.readouterr().err
    with pytest.raises(Exception, match="`corpus` is not set"):
        mine(MineConfig(model=str(minilm), output=str(tmp_path / "x"), data=[str(tmp_path / "pairs.jsonl")]))

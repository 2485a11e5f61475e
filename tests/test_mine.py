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


# --- teacher scores (data_synth/teacher.py) ------------------------------------------------------------


def reference_log_odds(folder, prompt_ids_list):
    """logit(yes) - logit(no) at the last position, one unpadded sequence at a time, with plain transformers."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval()
    yes, no = tokenizer.convert_tokens_to_ids("yes"), tokenizer.convert_tokens_to_ids("no")
    out = []
    with torch.no_grad():
        for ids in prompt_ids_list:
            logits = model(input_ids=torch.tensor([ids])).logits[0, -1]
            out.append(float(logits[yes] - logits[no]))
    return np.array(out), model.config


def official_qwen3_prompt(tokenizer, query, document, instruction=None):
    """The Qwen3-Reranker model card's prompt: prefix + body + suffix, each tokenised on its own."""
    prefix = ("<|im_start|>system\nJudge whether the Document meets the requirements based on the Query and the "
              'Instruct provided. Note that the answer can only be "yes" or "no".<|im_end|>\n<|im_start|>user\n')
    suffix = "<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n"
    instruction = instruction or "Given a web search query, retrieve relevant passages that answer the query"
    body = f"<Instruct>: {instruction}\n<Query>: {query}\n<Document>: {document}"
    return [tokenizer.encode(part, add_special_tokens=False) for part in (prefix, body, suffix)]


def padded_batch_tolerance(config, scores):
    """A left-padded batch and a single sequence differ only by float32 reassociation: about eps32 per
    accumulated term, over `hidden` terms per product and `layers` layers, relative to the logits."""
    eps = np.finfo(np.float32).eps
    return 4 * config.num_hidden_layers * config.hidden_size * eps * max(1.0, float(np.abs(scores).max()))


@pytest.fixture(scope="module")
def tiny_teacher(tiny_qwen3_lm):
    from embedforge.data_synth.teacher import TeacherScorer
    from embedforge.reranker import Reranker

    return TeacherScorer(Reranker.from_pretrained(tiny_qwen3_lm, dtype="float32"), batch_size=3)


def test_teacher_scores_align_with_negatives_and_equal_the_model_card_log_odds(tmp_path, minilm, embedder,
                                                                             tiny_qwen3_lm, tiny_teacher):
    from transformers import AutoTokenizer

    passages = make_corpus(40)
    rows = make_rows(passages, 4)
    rows[0]["negatives"] = ["An existing negative about nothing in particular."]
    config = cfg(minilm, num_negatives=3, margin=-10.0, teacher=str(tiny_qwen3_lm))
    report = mine_rows(rows, passages, config, tmp_path, embedder=embedder, teacher=tiny_teacher)
    out = read(tmp_path / "mined-00000-of-00001.jsonl")
    assert tiny_teacher.template == "qwen3"  # the real Qwen BPE has a <think> token
    tokenizer = AutoTokenizer.from_pretrained(str(tiny_qwen3_lm))
    prompts, got = [], []
    for row in out:
        docs = [row["positive"], *row["negatives"]]
        assert len(row["teacher_scores"]) == len(docs) == (5 if row is out[0] else 4)  # row 0 kept its own
        for doc in docs:
            prefix, body, suffix = official_qwen3_prompt(tokenizer, row["query"], doc, row["instruction"])
            prompts.append(prefix + body + suffix)
        got += row["teacher_scores"]
        assert row["provenance"]["mining"]["teacher"] == str(tiny_qwen3_lm)
        assert row["provenance"]["mining"]["teacher_template"] == "qwen3"
    assert out[0]["negatives"][0] == "An existing negative about nothing in particular."
    expected, model_config = reference_log_odds(tiny_qwen3_lm, prompts)
    # 1e-4: the cache rounds scores to 4 decimals
    np.testing.assert_allclose(got, expected, atol=padded_batch_tolerance(model_config, expected) + 1e-4)
    assert report.teacher_pairs_scored == len(set(map(tuple, prompts))) and report.teacher_pairs_reused == 0
    wins = sum(r["teacher_scores"][0] > s for r in out for s in r["teacher_scores"][1:])
    assert report.teacher_pair_accuracy == pytest.approx(wins / 13, abs=1e-4)
    assert report.teacher_rows_prefer_negative == sum(max(r["teacher_scores"][1:]) > r["teacher_scores"][0]
                                                      for r in out)


def test_teacher_scores_resume_from_the_cache(tmp_path, minilm, embedder, tiny_qwen3_lm, tiny_teacher):
    from embedforge.data_synth import teacher as teacher_module

    passages = make_corpus(40)
    rows = make_rows(passages, 5)
    config = cfg(minilm, num_negatives=3, margin=-10.0, teacher=str(tiny_qwen3_lm))
    first = mine_rows(rows, passages, config, tmp_path / "a", embedder=embedder, teacher=tiny_teacher)
    scores = [r["teacher_scores"] for r in read(tmp_path / "a" / "mined-00000-of-00001.jsonl")]
    again = mine_rows(rows, passages, config, tmp_path / "a", embedder=embedder, teacher=tiny_teacher)
    assert (again.teacher_pairs_scored, again.teacher_pairs_reused) == (0, first.teacher_pairs_scored)
    assert [r["teacher_scores"] for r in read(tmp_path / "a" / "mined-00000-of-00001.jsonl")] == scores
    # a run killed after its first cache part: only the pairs of the later parts are scored again
    parts = sorted((tmp_path / "a" / "teacher").glob("*/part-*.json"))
    assert len(parts) == 1 and first.teacher_pairs_scored == 20
    original_chunk = teacher_module.CHUNK
    try:
        teacher_module.CHUNK = 8
        for part in parts:
            part.unlink()
        mine_rows(rows[:2], passages, config, tmp_path / "a", embedder=embedder, teacher=tiny_teacher)
        resumed = mine_rows(rows, passages, config, tmp_path / "a", embedder=embedder, teacher=tiny_teacher)
    finally:
        teacher_module.CHUNK = original_chunk
    assert (resumed.teacher_pairs_scored, resumed.teacher_pairs_reused) == (12, 8)
    assert [r["teacher_scores"] for r in read(tmp_path / "a" / "mined-00000-of-00001.jsonl")] == scores


def test_teacher_drop_margin_drops_exactly_the_rows_whose_negative_wins_by_more(tmp_path, minilm, embedder,
                                                                               tiny_qwen3_lm, tiny_teacher):
    passages = make_corpus(40)
    rows = make_rows(passages, 8)
    keep_all = cfg(minilm, num_negatives=4, margin=-10.0, teacher=str(tiny_qwen3_lm))
    report = mine_rows(rows, passages, keep_all, tmp_path / "all", embedder=embedder, teacher=tiny_teacher)
    everything = read(tmp_path / "all" / "mined-00000-of-00001.jsonl")
    assert len(everything) == 8 and report.dropped_teacher_rows == 0
    gaps = [max(r["teacher_scores"][1:]) - r["teacher_scores"][0] for r in everything]
    threshold = float(np.median(gaps))
    dropping = keep_all.model_copy(update={"teacher_drop_margin": threshold})
    report = mine_rows(rows, passages, dropping, tmp_path / "drop", embedder=embedder, teacher=tiny_teacher)
    kept = read(tmp_path / "drop" / "mined-00000-of-00001.jsonl")
    assert [r["query"] for r in kept] == [r["query"] for r, g in zip(everything, gaps) if g <= threshold]
    assert report.dropped_teacher_rows == sum(g > threshold for g in gaps) > 0
    assert report.teacher_rows_prefer_negative == sum(g > 0 for g in gaps)


def test_mine_stage_records_the_teacher_and_refuses_a_changed_one(tmp_path, minilm, tiny_qwen3_lm,
                                                                  tiny_qwen3_embedder, capsys):
    from embedforge.cli import main
    from embedforge.data_synth import mine

    passages = make_corpus(40)
    (tmp_path / "corpus.jsonl").write_text(
        "".join(json.dumps({"id": p.doc_id, "text": p.text}) + "\n" for p in passages))
    (tmp_path / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in make_rows(passages, 3)))
    args = ["mine", "--model", str(minilm), "--data", str(tmp_path / "pairs.jsonl"), "--corpus",
            str(tmp_path / "corpus.jsonl"), "--output", str(tmp_path / "out"), "--num-negatives", "2",
            "--range", "0:20", "--margin", "-10", "--no-instructions", "--teacher", str(tiny_qwen3_lm)]
    assert main(args) == 0
    assert "mine: teacher scored 9 pairs (0 reused)" in capsys.readouterr().err
    rows = read(tmp_path / "out" / "mined-00000-of-00001.jsonl")
    assert all(len(r["teacher_scores"]) == 3 for r in rows)
    trail = json.loads((tmp_path / "out" / "provenance.json").read_text())
    assert trail[-1]["teacher"] == {"model": str(tiny_qwen3_lm), "template": "qwen3", "score": "log-odds of yes"}
    common = {"model": str(minilm), "data": [str(tmp_path / "pairs.jsonl")], "corpus": str(tmp_path / "corpus.jsonl"),
              "output": str(tmp_path / "out"), "num_negatives": 2, "rank_start": 0, "rank_end": 20, "margin": -10.0,
              "use_instructions": False}
    with pytest.raises(Exception, match=r"settings \(teacher\)"):
        mine(MineConfig(teacher=str(tiny_qwen3_embedder), **common))  # another teacher: rerun needs --overwrite
    with pytest.raises(Exception, match="not a yes/no reranker"):
        mine(MineConfig(teacher=str(minilm), overwrite=True, **common))


def test_a_random_teacher_is_flagged_when_it_prefers_the_negatives(tmp_path, minilm, tiny_qwen3_lm):
    from embedforge.data_synth.mine import MineOutcome, _warn

    outcome = MineOutcome(output=str(tmp_path), rows=10, negatives=30, candidates=40, teacher_pair_accuracy=0.4)
    _warn(outcome, cfg(minilm, teacher=str(tiny_qwen3_lm)))
    assert len(outcome.warnings) == 1 and "in only 40% of pairs" in outcome.warnings[0]


def test_template_choice_needs_chatml_and_follows_the_think_token(minilm, tiny_qwen3_lm):
    from types import SimpleNamespace

    from transformers import AutoTokenizer

    from embedforge.data_synth.teacher import choose_template
    from embedforge.errors import ModelLoadError
    from embedforge.reranker import Reranker

    assert choose_template(Reranker.from_pretrained(tiny_qwen3_lm)) == "qwen3"
    assert choose_template(Reranker.from_pretrained(tiny_qwen3_lm), "chatml") == "chatml"
    bert = SimpleNamespace(tokenizer=AutoTokenizer.from_pretrained(str(minilm)), is_seq_cls=False, name="bert")
    with pytest.raises(ModelLoadError, match="<|im_start|> is not one token"):
        choose_template(bert)


@pytest.mark.slow
def test_smollm2_teacher_uses_its_own_chat_format(smollm2):
    """SmolLM2 speaks ChatML without think tags: `auto` picks the bare assistant turn, and the prompt
    is token for token what SmolLM2's own chat template makes of the same system and user turns."""
    from transformers import AutoTokenizer

    from embedforge.data_synth.teacher import TeacherScorer
    from embedforge.reranker import Reranker
    from embedforge.templates import RERANKER_SYSTEM, format_reranker_body

    scorer = TeacherScorer(Reranker.from_pretrained(smollm2, dtype="float32"))
    assert scorer.template == "chatml"
    tokenizer = AutoTokenizer.from_pretrained(str(smollm2))
    assert len(tokenizer.encode("<think>", add_special_tokens=False)) > 1
    assert [tokenizer.encode(w, add_special_tokens=False) for w in ("yes", "no")] == [[10407], [4607]]
    pairs = [("How do I read a file line by line?", "Iterate over the file object: each step yields one line."),
             ("How do I read a file line by line?", "Paris is the capital of France.")]
    prompts = []
    for query, doc in pairs:
        text = tokenizer.apply_chat_template(
            [{"role": "system", "content": RERANKER_SYSTEM}, {"role": "user", "content": format_reranker_body(query, doc)}],
            add_generation_prompt=True, tokenize=False)
        prompts.append(tokenizer.encode(text, add_special_tokens=False))
    features = scorer.reranker.tokenize_pairs([q for q, _ in pairs], [d for _, d in pairs])
    for ids, mask, want in zip(features["input_ids"], features["attention_mask"], prompts):
        assert ids[mask.bool()].tolist() == want
    expected, model_config = reference_log_odds(smollm2, prompts)
    got = scorer.log_odds([q for q, _ in pairs], [d for _, d in pairs])
    np.testing.assert_allclose(got, expected, atol=padded_batch_tolerance(model_config, expected))

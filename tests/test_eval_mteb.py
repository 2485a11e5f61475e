"""The mteb wrapper run through the real mteb 2 on a local BEIR folder: it gives the scores
sentence-transformers gives through mteb's own evaluation, its cache entries never collide with
another model's, the Qwen3 instruction rule reaches the right side, and `embedforge eval --mteb`
writes mteb's files where asked. The instruction rule itself is checked case by case against the
official evaluation code's branches (QwenLM/Qwen3-Embedding, evaluation/qwen3_embedding_model.py)."""

from __future__ import annotations

import json
import math
import sys

import pytest
import torch

from embedforge.errors import ConfigError
from embedforge.eval.mteb_adapter import MtebEncoder, model_fingerprint, mteb_name
from embedforge.eval.qwen3_prompts import RETRIEVAL_FALLBACK, TASK_PROMPTS, qwen3_instruction
from embedforge.templates import BITEXT_INSTRUCTION, STS_INSTRUCTION

# --- the official instruction rule, branch by branch ---------------------------------------------


def test_retrieval_tasks_instruct_queries_only():
    claim = "Given a scientific claim, retrieve documents that support or refute the claim"
    assert qwen3_instruction("SciFact", "Retrieval", "query") == claim
    assert qwen3_instruction("SciFact", "Retrieval", "document") is None
    assert qwen3_instruction("SciFact", "Retrieval", "passage") is None  # mteb 1's name for the side


def test_a_per_side_table_entry_makes_the_task_symmetric():
    refute = "Given a claim, find documents that refute the claim"
    assert qwen3_instruction("ArguAna", "Retrieval", "query") == refute
    assert qwen3_instruction("ArguAna", "Retrieval", "document") == refute


def test_sts_and_pair_classification_always_use_the_similarity_instruction():
    assert TASK_PROMPTS["Ocnli"] == "Retrieve semantically similar text."  # the table's entry is overridden
    assert qwen3_instruction("Ocnli", "PairClassification", None) == STS_INSTRUCTION
    assert qwen3_instruction("STS12", "STS", "query") == STS_INSTRUCTION
    assert qwen3_instruction("SomeNewSTS", "STS", "document", "a task prompt") == STS_INSTRUCTION


def test_other_task_types_instruct_both_sides_with_the_table():
    assert qwen3_instruction("Banking77Classification", "Classification", None) == \
        "Given a online banking query, find the corresponding intents"
    assert qwen3_instruction("AskUbuntuDupQuestions", "Reranking", "document") == \
        "Retrieve duplicate questions from AskUbuntu forum"
    assert qwen3_instruction("BornholmBitextMining", "BitextMining", None) == "Retrieve parallel sentences."


def test_tasks_outside_the_table_use_their_own_prompt_or_the_fallbacks():
    assert qwen3_instruction("NewRetrieval", "Retrieval", "query") == RETRIEVAL_FALLBACK
    assert qwen3_instruction("NewRetrieval", "Retrieval", "query", "Find the code") == "Find the code"
    by_side = {"query": "Find the code", "document": "Describe the code"}
    assert qwen3_instruction("NewRetrieval", "Retrieval", "document", by_side) is None  # not a table dict
    assert qwen3_instruction("NewClustering", "Clustering", "document", by_side) == "Describe the code"
    assert qwen3_instruction("NewBitext", "BitextMining", None) == BITEXT_INSTRUCTION
    assert qwen3_instruction("Local", "Retrieval", "query", table={"Local": ""}) is None  # "" = none


class SpecOnly:
    """What MtebEncoder reads to decide whether a model takes instructions."""

    def __init__(self, pooling, prompts=None):
        from types import SimpleNamespace

        self.spec = SimpleNamespace(pooling=pooling, prompts=prompts or {})


def test_encoder_models_get_no_instruction_unless_forced():
    assert MtebEncoder(SpecOnly("mean")).instruction_for("SciFact", "Retrieval", "query") is None
    assert MtebEncoder(SpecOnly("mean"), use_instructions=True).instruction_for("NFCorpus", "Retrieval", "query") \
        == "Given a question, retrieve relevant documents that best answer the question"
    llm = MtebEncoder(SpecOnly("lasttoken"), task_instructions={"NFCorpus": "Mine"})
    assert llm.instruction_for("NFCorpus", "Retrieval", "query") == "Mine"  # an override beats the table


def test_names_mteb_accepts(tmp_path):
    (tmp_path / "merged").mkdir()
    assert mteb_name(tmp_path / "merged") == "local/merged"
    assert mteb_name("Qwen/Qwen3-Embedding-0.6B") == "Qwen/Qwen3-Embedding-0.6B"
    assert mteb_name("/runs/demo/merged/") == "local/runs_demo_merged"  # not on this machine: a label
    assert mteb_name("merged / corpus") == "local/merged_corpus"


def test_cli_mteb_without_mteb_installed_says_how_to_install(monkeypatch, tmp_path, capsys):
    from embedforge.cli import main

    monkeypatch.setitem(sys.modules, "mteb", None)
    code = main(["eval", "--model", "unused", "--mteb", "SciFact", "--output", str(tmp_path / "r.json")])
    assert code == 2
    assert "mteb is not installed; install it with: pip install 'embedforge[mteb]'" in capsys.readouterr().err


# --- the real mteb on a local BEIR folder ----------------------------------------------------------

mteb = pytest.importorskip("mteb")
MAX_LENGTH = 128  # both stacks cut texts at the same 128 tokens; shorter inputs keep this file fast


@pytest.fixture(scope="module")
def beir_dir(tmp_path_factory):
    from embedforge.eval.beir import write_beir
    from embedforge.eval.real_data import stdlib_code_search

    torch.set_num_threads(1)
    data = stdlib_code_search(n_queries=24, n_docs=80, seed=1, packages=("json", "email", "logging", "argparse",
                                                                          "textwrap"), max_chars=400)
    return write_beir(tmp_path_factory.mktemp("beir") / "stdlib", data)


@pytest.fixture(scope="module")
def minilm_embedder(minilm):
    from embedforge.embedder import Embedder

    return Embedder.from_pretrained(minilm, device="cpu", dtype="float32", max_length=MAX_LENGTH)


@pytest.fixture(scope="module")
def ours(minilm_embedder, beir_dir, tmp_path_factory):
    from embedforge.eval.mteb_tasks import run_mteb

    folder = tmp_path_factory.mktemp("mteb")
    return run_mteb(MtebEncoder(minilm_embedder, name="local/minilm"), [str(beir_dir)], folder), folder


def scores_of(task_result) -> dict[str, float]:
    (scores,) = task_result.to_dict()["scores"]["test"]
    return {k: v for k, v in scores.items() if isinstance(v, float) and not math.isnan(v)}


@pytest.mark.slow
def test_wrapper_scores_equal_sentence_transformers_through_mteb(ours, beir_dir, minilm):
    from sentence_transformers import SentenceTransformer

    from embedforge.eval.mteb_tasks import local_retrieval_task

    st = SentenceTransformer(str(minilm), device="cpu")
    st.max_seq_length = MAX_LENGTH
    (reference,) = mteb.evaluate(st, tasks=[local_retrieval_task(beir_dir)], cache=None,
                                 show_progress_bar=False).task_results
    results, _ = ours
    (theirs,) = results.values()
    ref = scores_of(reference)
    got = {k: v for k, v in theirs["scores"]["test"][0].items() if k in ref}
    assert len(ref) > 40 and set(got) == set(ref)  # nDCG, MAP, recall, precision, MRR at every k
    # mteb rounds each score to 5 decimals; the two stacks' vectors differ by float32 noise, which
    # can move a score across a rounding boundary: one unit in the 5th decimal at most.
    assert got == pytest.approx(ref, abs=1e-5)
    assert 0.2 < theirs["main_score"] < 1.0  # a real model on real code search: neither trivial nor broken


@pytest.mark.slow
def test_results_land_where_asked_under_the_weights_revision(ours, minilm_embedder):
    results, folder = ours
    (entry,) = results.values()
    revision = model_fingerprint(minilm_embedder)[:20]
    path = folder / "results" / "local__minilm" / revision / "experiments" / "instructions_none" / "stdlib.json"
    assert entry["result_file"] == str(path)
    assert json.loads(path.read_text())["scores"]["test"][0]["main_score"] == pytest.approx(entry["main_score"])


@pytest.mark.slow
def test_mteb_cache_never_returns_another_models_score(ours, minilm_embedder, beir_dir, tiny_qwen3_embedder):
    """Another model under MiniLM's name, and one model at two widths, in MiniLM's cache folder:
    each gets its own score, as a run without any cache gives it (mteb reuses a result only for an
    identical revision and settings)."""
    from embedforge.embedder import Embedder
    from embedforge.eval.mteb_tasks import local_retrieval_task

    results, folder = ours
    cache = mteb.ResultCache(cache_path=folder)
    qwen = Embedder.from_pretrained(tiny_qwen3_embedder, device="cpu", dtype="float32")

    def score(embedder, cached, **kwargs):
        model = MtebEncoder(embedder, name="local/minilm", **kwargs)
        (result,) = mteb.evaluate(model, tasks=[local_retrieval_task(beir_dir)], cache=cache if cached else None,
                                  overwrite_strategy="only-missing", show_progress_bar=False).task_results
        return result.get_score()

    minilm_score = results["stdlib"]["main_score"]
    assert score(minilm_embedder, cached=True) == minilm_score  # same model and settings: the cache answers
    full = score(qwen, cached=True)
    assert full == score(qwen, cached=False) != minilm_score
    assert score(qwen, cached=True, dim=16) == score(qwen, cached=False, dim=16) != full


@pytest.mark.slow
def test_instructions_reach_queries_only_through_mteb(beir_dir, tiny_qwen3_embedder, tmp_path):
    from embedforge.embedder import Embedder
    from embedforge.eval.mteb_tasks import run_mteb

    qwen = Embedder.from_pretrained(tiny_qwen3_embedder, device="cpu", dtype="float32")
    calls = []
    encode = qwen.encode

    def spy(texts, instruction=None, **kwargs):
        calls.append((len(texts), instruction))
        return encode(texts, instruction=instruction, **kwargs)

    qwen.encode = spy
    run_mteb(MtebEncoder(qwen, task_instructions={"stdlib": "Find the function"}), [str(beir_dir)], tmp_path)
    assert sorted(calls) == [(24, "Find the function"), (80, None)]


@pytest.mark.slow
def test_cli_mteb_on_a_folder_agrees_with_the_data_route(beir_dir, minilm, tmp_path):
    """`eval --mteb FOLDER` (mteb's evaluator, pytrec_eval) and `eval --data FOLDER` (embedforge's
    trec_eval transcription) score the same rankings alike."""
    from embedforge.cli import main

    common = ["--model", str(minilm), "--device", "cpu", "--dtype", "float32", "--max-length", str(MAX_LENGTH)]
    assert main(["eval", *common, "--mteb", str(beir_dir), "--output", str(tmp_path / "m.json")]) == 0
    assert main(["eval", *common, "--data", str(beir_dir), "--output", str(tmp_path / "d.json")]) == 0
    via_mteb = json.loads((tmp_path / "m.json").read_text())
    direct = json.loads((tmp_path / "d.json").read_text())
    assert via_mteb["mteb_output"] == str(tmp_path / "m-mteb")
    assert via_mteb["mteb"]["stdlib"]["result_file"].startswith(str(tmp_path / "m-mteb" / "results"))
    assert via_mteb["mteb_model"]["revision"] and via_mteb["mteb_model"]["name"] == mteb_name(minilm)
    # mteb rounds to 5 decimals.
    assert via_mteb["mteb"]["stdlib"]["main_score"] == pytest.approx(direct["metrics"]["ndcg_at_10"], abs=6e-6)


def test_unknown_task_names_fail_with_one_line(tmp_path, monkeypatch):
    from embedforge.eval.mteb_tasks import run_mteb

    with pytest.raises(ConfigError, match="NoSuchTask"):
        run_mteb(MtebEncoder(SpecOnly("mean")), ["NoSuchTask"], tmp_path)

"""`embedforge export` end to end: the model card (YAML metadata the Hub parses, the recipe, usage
snippets that run), the Hub push with only the network calls replaced (the exact folder that
would be uploaded, the token never printed), and bad inputs: an existing output refused, and no
half-written folder when the export fails or crashes part-way."""

from __future__ import annotations

import contextlib
import io
import json
import logging
import re

import numpy as np
import pytest
import torch
import yaml

from embedforge.cli import main
from embedforge.errors import ConfigError
from embedforge.export import ExportConfig
from embedforge.export import export as run_export
from embedforge.export.hub import files_to_upload
from embedforge.export.model_card import eval_entries_from_results

SECRET = "hf_SECRETtokenVALUEthatMustNeverBePrinted"
TASK = "Given a question about model merging, retrieve passages that answer it"
CARD = {
    "model_name": "tiny-qwen3-embedding-export",
    "base_model": "Qwen/Qwen3-0.6B",
    "language": ["en"],
    "tags": ["qwen3"],
    "datasets": ["mteb/scifact"],
    "eval_results": [{"task_type": "retrieval", "dataset_name": "SciFact", "dataset_type": "mteb/scifact",
                      "dataset_split": "test", "metric_type": "ndcg_at_10", "metric_value": 0.71}],
    "recipe": {
        "data_generator": "Qwen3-32B through vLLM, persona two-call recipe",
        "data_templates": ["retrieval_config@v1", "retrieval_query@v1"],
        "losses": {"qwen3_infonce": {"temperature": 0.05, "margin": 0.1}},
        "hyperparameters": {"learning_rate": 5e-05, "lora_r": 8},
        "merge": {"method": "slerp", "t": 0.5},
    },
}
EVAL_RESULT = {"model": "x", "data": "data/nfcorpus", "split": "test",
               "metrics": {"ndcg_at_10": 0.31, "mrr_at_10": 0.5, "recall_at_10": 0.2, "recall_at_100": 0.4,
                           "map_at_100": 0.15}}
EXPECTED_FILES = [
    "1_Pooling/config.json", "README.md", "config.json", "config_sentence_transformers.json", "embedforge.json",
    "export_report.json", "model.safetensors", "modules.json", "provenance.json", "sentence_bert_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
]


class Recorder:
    """Stands in for the Hub's network calls; records what they were asked to do."""

    def __init__(self):
        self.calls = []

    def install(self, patcher):
        from huggingface_hub import HfApi

        recorder = self

        def create_repo(self, repo_id, **kwargs):
            recorder.calls.append(("create_repo", repo_id, kwargs, self.token))

        def create_branch(self, repo_id, **kwargs):
            recorder.calls.append(("create_branch", repo_id, kwargs, self.token))

        def upload_folder(self, **kwargs):
            recorder.calls.append(("upload_folder", kwargs["repo_id"], kwargs, self.token))
            return type("Commit", (), {"commit_url": f"https://huggingface.co/{kwargs['repo_id']}/commit/abc"})()

        for name, fn in (("create_repo", create_repo), ("create_branch", create_branch),
                         ("upload_folder", upload_folder)):
            patcher.setattr(HfApi, name, fn)


@pytest.fixture(scope="module")
def pushed(tiny_qwen3_embedder, tmp_path_factory):
    """One CLI export with card metadata, eval results and --push-to-hub, network calls recorded."""
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("card")
    (root / "card.json").write_text(json.dumps(CARD))
    (root / "nfcorpus.json").write_text(json.dumps(EVAL_RESULT))
    out = root / "tiny-embedder"
    recorder, stdout, stderr, logs = Recorder(), io.StringIO(), io.StringIO(), io.StringIO()
    handler = logging.StreamHandler(logs)
    logging.getLogger().addHandler(handler)
    try:
        with pytest.MonkeyPatch.context() as patcher, contextlib.redirect_stdout(stdout), \
                contextlib.redirect_stderr(stderr):
            patcher.setenv("HF_TOKEN", SECRET)
            recorder.install(patcher)
            code = main(["-v", "export", "--model", str(tiny_qwen3_embedder), "--kind", "embedder",
                         "--output", str(out), "--matryoshka-dims", "64,32", "--default-instruction", TASK,
                         "--card-metadata", str(root / "card.json"), "--eval-results", str(root / "nfcorpus.json"),
                         "--push-to-hub", "my-org/tiny-embedder", "--private", "--revision", "v1"])
    finally:
        logging.getLogger().removeHandler(handler)
    return {"out": out, "code": code, "calls": recorder.calls,
            "printed": stdout.getvalue() + stderr.getvalue() + logs.getvalue(), "source": tiny_qwen3_embedder}


def front_matter(text: str) -> dict:
    match = re.match(r"^---\n(.*?)\n---\n", text, flags=re.DOTALL)
    assert match, "README.md does not start with YAML front matter"
    return yaml.safe_load(match.group(1))


def test_model_card_metadata_parses(pushed):
    from huggingface_hub import ModelCard

    assert pushed["code"] == 0
    text = (pushed["out"] / "README.md").read_text()
    meta = front_matter(text)
    assert meta["base_model"] == "Qwen/Qwen3-0.6B"
    assert meta["library_name"] == "sentence-transformers" and meta["pipeline_tag"] == "sentence-similarity"
    assert meta["license"] == "apache-2.0" and meta["language"] == ["en"] and meta["datasets"] == ["mteb/scifact"]
    assert {"embedforge", "qwen3", "sentence-transformers"} <= set(meta["tags"])
    results = meta["model-index"][0]["results"]
    assert meta["model-index"][0]["name"] == "tiny-qwen3-embedding-export"
    scores = {(r["dataset"]["name"], m["type"]): m["value"] for r in results for m in r["metrics"]}
    assert scores[("SciFact", "ndcg_at_10")] == 0.71
    assert scores[("nfcorpus", "ndcg_at_10")] == 0.31 and scores[("nfcorpus", "map_at_100")] == 0.15
    assert ModelCard(text).data.base_model == "Qwen/Qwen3-0.6B"  # what the Hub itself reads


def test_model_card_records_the_recipe_and_usage(pushed):
    text = (pushed["out"] / "README.md").read_text()
    for fragment in ("Qwen3-32B through vLLM", "`retrieval_config@v1`", '"temperature": 0.05', "lora_r",
                     '"method": "slerp"', "[64, 32]", json.dumps(f"Instruct: {TASK}\nQuery:"),
                     "### sentence-transformers", "### transformers", "### vLLM", "--runner pooling",
                     "matryoshka_dimensions", "sentence_transformers_parity"):
        assert fragment in text, fragment


def test_model_card_transformers_snippet_runs_to_embedder_vectors(pushed, monkeypatch):
    """The card's plain-transformers code, executed as written, gives Embedder.encode's vectors."""
    from embedforge import Embedder

    text = (pushed["out"] / "README.md").read_text()
    snippet = re.search(r"### transformers\n.*?```python\n(.*?)```", text, flags=re.DOTALL).group(1)
    assert '"my-org/tiny-embedder"' in snippet  # a pushed card names the Hub repo; read it from the folder pushed
    snippet = snippet.replace('"my-org/tiny-embedder"', repr(str(pushed["out"])))
    namespace = {}
    exec(compile(snippet, "README.md", "exec"), namespace)  # noqa: S102 - the card's own code is the subject
    embedder = Embedder.from_pretrained(pushed["source"], dtype="float32", device="cpu")
    want = np.concatenate([embedder.encode(["what is slerp?"], instruction=TASK),
                           embedder.encode(["Slerp interpolates along the great circle between two vectors."])])
    np.testing.assert_allclose(namespace["vectors"].numpy(), want, atol=1e-4)


def test_push_uploads_exactly_the_finished_folder(pushed):
    out, calls = pushed["out"], pushed["calls"]
    assert [c[0] for c in calls] == ["create_repo", "create_branch", "upload_folder"]
    _, repo, kwargs, token = calls[0]
    assert repo == "my-org/tiny-embedder" and kwargs["private"] is True and kwargs["exist_ok"] is True
    assert token == SECRET  # from HF_TOKEN
    assert calls[1][2]["branch"] == "v1"
    _, repo, kwargs, _ = calls[2]
    assert kwargs["folder_path"] == str(out) and kwargs["revision"] == "v1" and repo == "my-org/tiny-embedder"
    assert files_to_upload(kwargs["folder_path"]) == EXPECTED_FILES
    assert "pushed to https://huggingface.co/my-org/tiny-embedder" in pushed["printed"]
    assert SECRET not in pushed["printed"]


def test_push_without_a_token_fails_before_any_work(minilm, tmp_path, monkeypatch):
    import huggingface_hub

    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setattr(huggingface_hub, "get_token", lambda: None)
    with pytest.raises(ConfigError, match="no Hugging Face token"):
        run_export(ExportConfig(model=str(minilm), kind="embedder", output=str(tmp_path / "o"),
                                push_to_hub="my-org/x"))
    with pytest.raises(ConfigError, match="expected ORG/NAME"):
        run_export(ExportConfig(model=str(minilm), kind="embedder", output=str(tmp_path / "o"),
                                push_to_hub="not a repo"))
    assert not list(tmp_path.iterdir())


def test_eval_results_become_model_index_entries():
    """The model-index names the data set; a local path ("data/nfcorpus") means nothing on the Hub."""
    entries = eval_entries_from_results({**EVAL_RESULT, "reranker": "rr"})
    assert {(e.task_type, e.dataset_name, e.dataset_type, e.dataset_split, e.metric_type, e.metric_value)
            for e in entries} == {("reranking", "nfcorpus", "nfcorpus", "test", k, v)
                                  for k, v in EVAL_RESULT["metrics"].items()}
    mteb = eval_entries_from_results({"mteb": {"STS12": {"main_score": 0.8}}})
    assert [(e.task_name, e.metric_type, e.metric_value) for e in mteb] == [("STS12", "main_score", 0.8)]


# --- bad inputs ---------------------------------------------------------------------------------


def test_existing_output_is_refused_untouched(minilm, tmp_path, capsys):
    out = tmp_path / "taken"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    code = main(["export", "--model", str(minilm), "--kind", "embedder", "--output", str(out)])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "output folder exists; pass --overwrite" in err and len(err.splitlines()) == 1
    assert [p.name for p in out.iterdir()] == ["keep.txt"] and len(list(tmp_path.iterdir())) == 1


def test_failed_gate_and_crash_leave_nothing_half_written(minilm, tmp_path, monkeypatch, capsys):
    from embedforge.export import model_card

    out = tmp_path / "old"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    # a real gate failure: batched and single runs differ by ~1e-8, above a 1e-12 tolerance
    code = main(["export", "--model", str(minilm), "--kind", "embedder", "--output", str(out), "--overwrite",
                 "--gate-tolerance", "1e-12"])
    assert code == 2 and "export gate failed" in capsys.readouterr().err
    assert [p.name for p in out.iterdir()] == ["keep.txt"] and len(list(tmp_path.iterdir())) == 1

    def crash(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(model_card, "write_model_card", crash)  # the last step before the folder appears
    fresh = tmp_path / "fresh"
    with pytest.raises(RuntimeError, match="disk full"):
        run_export(ExportConfig(model=str(minilm), kind="embedder", output=str(fresh)))
    assert not fresh.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["old"]

    monkeypatch.undo()
    run_export(ExportConfig(model=str(minilm), kind="embedder", output=str(out), overwrite=True))
    assert not (out / "keep.txt").exists() and (out / "README.md").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["old"]

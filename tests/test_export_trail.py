"""The model card told by the provenance trail, and the export's output discipline: never over an
input, no dangling remote code, no load-time names, files shared like folders."""

from __future__ import annotations

import json
import re
import shutil
import stat

import pytest
import torch
import yaml

from embedforge.cli import main
from embedforge.errors import ConfigError
from embedforge.export import ExportConfig, export
from embedforge.provenance import read_provenance, write_provenance

TRAIL = [  # the shapes the stages write (embedforge/stages.py, data_synth, eval/stage.py)
    {"stage": "corpus", "source": "builtin:python-docstrings", "description": "docstrings of the Python 3.11 "
     "standard library", "passages": 988, "real_queries": 988},
    {"stage": "synth", "corpus": {"path": "/runs/x/corpus/generator-passages.jsonl", "passages": 40,
                                  "texts_sha256": "5d3318c76d4a0a4eb0a1ae66c9349f0f6406b24e94aa756a"},
     "generator": {"backend": "vllm", "model": "Qwen/Qwen3-32B"}, "strategy": "two_call", "decoding": "json_schema",
     "sampling": {"tasks": ["retrieval"], "languages": ["en"]},
     "templates": {"retrieval_query": {"version": 2, "sha256": "08b3f9488b57"}},
     "counts": {"rows": 1200, "llm_calls": 800}, "quality": {"schema_valid_rate": 1.0, "on_topic_rate": 0.9667,
                                                             "on_topic_random_baseline": 0.25}, "warnings": []},
    {"stage": "filter", "teacher": "builtin:minilm", "gates": [
        {"gate": "near_duplicate", "rows_in": 1200, "rows_out": 1160, "threshold": None},
        {"gate": "cosine", "rows_in": 1160, "rows_out": 1027, "threshold": 0.2482}], "rows_in": 1200, "rows_kept": 1027},
    {"stage": "mine", "model": "builtin:minilm", "settings": {"num_negatives": 4, "rank_start": 10, "rank_end": 50,
                                                             "margin": 0.05}, "counts": {"negatives": 4000}},
    {"stage": "train", "config": {"model": "Qwen/Qwen3-0.6B", "task": "embedding", "method": "lora", "lr": 5e-5,
                                  "batch_size": 64, "lora": {"r": 16, "alpha": 32},
                                  "loss": {"temperature": 0.05, "terms": ["hard", "qq", "dd", "qd"]}},
     "data": [{"name": "synthetic"}], "steps": 300, "final_metrics": {"loss": 0.41},
     "warnings": ["loss plateaued after step 300"]},
    {"stage": "merge", "method": "slerp", "t": {"default": [0.5]}, "models": ["/runs/x/base/model",
                                                                             "/runs/x/train/work/final"]},
    {"stage": "eval", "results": [
        {"model": "/runs/x/merge/model", "data": "/runs/x/split/heldout", "n_queries": 60, "split": "test",
         "metrics": {"ndcg_at_10": 0.61}, "intervals": {"ndcg_at_10": {"mean": 0.61, "low": 0.52, "high": 0.70}}},
        {"model": "/runs/x/merge/model", "data": "/data/scifact", "data_name": "SciFact", "n_queries": 300,
         "split": "test", "metrics": {"ndcg_at_10": 0.55}, "ci95": {"ndcg_at_10": [0.51, 0.59]},
         "random_baseline": {"ndcg_at_10": 0.0123},
         "comparisons": [{"baseline": "base", "metric": "ndcg_at_10", "delta": 0.05, "low": 0.01, "high": 0.09,
                          "p_value": 0.004, "n_queries": 300}]},
    ]},
]


@pytest.fixture(scope="module")
def traced(tiny_qwen3_embedder, tmp_path_factory):
    """A model folder carrying a full trail (and a meaningless load-time name), exported once."""
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("trail")
    model = root / "model"
    shutil.copytree(tiny_qwen3_embedder, model)
    config = json.loads((model / "config.json").read_text())
    config["_model_name_or_path"] = "Smollm2 135M 8k Lc100K Mix1 Ep2"
    config["auto_map"] = {"AutoModel": "modeling_x.XModel"}
    (model / "config.json").write_text(json.dumps(config))
    write_provenance(model, TRAIL[:-1], TRAIL[-1]["stage"], **{k: v for k, v in TRAIL[-1].items() if k != "stage"})
    out = root / "model-export" / "model"
    outcome = export(ExportConfig(model=str(model), output=str(out), push_to_hub=None,
                                  repo_id="my-org/qwen3-domain-embedder"))
    return model, out, outcome


def test_card_tells_the_trail(traced):
    _, out, _ = traced
    text = (out / "README.md").read_text()
    meta = yaml.safe_load(re.match(r"^---\n(.*?)\n---\n", text, flags=re.DOTALL).group(1))
    assert text.count("\n# qwen3-domain-embedder\n") == 1 and "# model\n" not in text  # the real name
    assert meta["base_model"] == "Qwen/Qwen3-0.6B"
    assert "fine-tuned from `Qwen/Qwen3-0.6B`" in text and "Qwen3 Embedding recipe" in text
    for fragment in ("| synth: generator | `Qwen/Qwen3-32B (vllm)` |", "| synth: prompt templates | `retrieval_query@v2` |",
                     "| synth: corpus fingerprint | `5d3318c76d4a0a4e` |", "| corpus: real queries | `988` |",
                     "near_duplicate 1200→1160, cosine 1160→1027 (≥ 0.2482)", "| mine: rank range | `10–50` |",
                     "| learning rate | `5e-05` |", "| LoRA | `r 16, alpha 32` |", "| training data | `[\"synthetic\"]` |",
                     "loss plateaued after step 300", "| method | `slerp` |", "train/work/final"):
        assert fragment in text, fragment
    assert "/runs/x/corpus" not in text  # local paths do not reach the card
    assert ("| SciFact | test | 300 | nDCG@10 | 0.5500 | [0.5100, 0.5900] | 0.0123 | +0.0500 [+0.0100, +0.0900] "
            "vs base, p=0.004 |") in text
    assert "| heldout | test | 60 | nDCG@10 | 0.6100 | [0.5200, 0.7000] |  |  |" in text
    assert "heldout: only 60 queries" in text and "queries written by Qwen/Qwen3-32B (vllm)" in text
    assert "no human-written query" in text
    datasets = [r["dataset"] for r in meta["model-index"][0]["results"]]
    assert {d["name"] for d in datasets} == {"heldout", "SciFact"}
    assert all("/" not in d["type"] for d in datasets)  # a name, never a local path
    usage = text[text.index("## Usage"):]
    assert 'SentenceTransformer("my-org/qwen3-domain-embedder")' in usage and "/runs/" not in usage


def test_export_appends_its_record_and_cleans_the_config(traced):
    _model, out, outcome = traced
    trail = read_provenance(out)
    assert [r["stage"] for r in trail] == [r["stage"] for r in TRAIL] + ["export"]
    assert trail[-1]["repo_id"] == "my-org/qwen3-domain-embedder" and trail[-1]["checks_passed"] >= 5
    config = json.loads((out / "config.json").read_text())
    assert "_model_name_or_path" not in config and "auto_map" not in config
    assert not list(out.rglob("*.py"))
    assert config["rope_theta"] == config["rope_parameters"]["rope_theta"]  # transformers 4 reads only this
    assert json.loads((out / "sentence_bert_config.json").read_text())["max_seq_length"] == 4096  # positions
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in out.rglob("*")}
    assert {m for n, m in modes.items() if (out / n).is_file()} <= {0o644}
    assert outcome.output == str(out) and outcome.max_abs_diff < 1e-4


def test_card_without_training_record_claims_no_recipe(minilm, tmp_path):
    out = tmp_path / "minilm-export"
    export(ExportConfig(model=str(minilm), output=str(out)))
    text = (out / "README.md").read_text()
    assert "Qwen3 Embedding recipe" not in text and "no training record" in text.lower()
    assert "YOUR_ORG/minilm-export" in text  # no Hub id given: a placeholder, said to be one
    assert "Not evaluated" in text


def test_export_never_writes_over_its_input(minilm, tmp_path, capsys):
    model = tmp_path / "m"
    shutil.copytree(minilm, model)
    before = sorted(p.name for p in model.rglob("*"))
    assert main(["export", "--model", str(model), "--output", str(model), "--overwrite"]) == 2
    assert "would overwrite the model" in capsys.readouterr().err
    assert main(["export", "--model", str(model / "1_Pooling"), "--output", str(model), "--overwrite"]) == 2
    assert "would overwrite the model" in capsys.readouterr().err  # the output holds the input
    assert sorted(p.name for p in model.rglob("*")) == before
    results = tmp_path / "r.json"
    results.write_text("{}")
    with pytest.raises(ConfigError, match="holds the input"):
        export(ExportConfig(model=str(minilm), output=str(tmp_path), overwrite=True, eval_results=[str(results)]))
    with pytest.raises(ConfigError, match="no model to export"):
        export(ExportConfig(output=str(tmp_path / "x")))


def test_a_recipe_can_embed_the_config(tmp_path):
    from embedforge.config import validate

    section = validate(ExportConfig, {"onnx": ["int8"], "matryoshka_dims": "64,32"}, source="recipe.yaml")
    assert section.model is None and section.matryoshka_dims == [64, 32]
    with pytest.raises(ConfigError, match="recipe.yaml: onnx.0"):
        validate(ExportConfig, {"onnx": ["int4"]}, source="recipe.yaml")
    with pytest.raises(ConfigError, match="onnx and gguf exports are for embedders"):
        ExportConfig(kind="reranker", gguf=["q8_0"])

"""What a merged folder carries besides weights: no remote code, shared file modes, the data trail,
and a config that a recipe can embed with its folders left for the pipeline to fill in."""

from __future__ import annotations

import json
import stat

import pytest

from embedforge.config import validate
from embedforge.errors import ConfigError
from embedforge.merge import MergeConfig, merge
from embedforge.provenance import read_provenance, write_provenance
from tests.test_merge_stream import toy_tensors, write_checkpoint


@pytest.fixture
def two(tmp_path):
    a = write_checkpoint(tmp_path / "a", toy_tensors(1))
    b = write_checkpoint(tmp_path / "b", toy_tensors(2))
    return a, b


def test_remote_code_is_neither_copied_nor_named(tmp_path, two):
    a, b = two
    config = json.loads((a / "config.json").read_text())
    config["auto_map"] = {"AutoModel": "modeling_toy.ToyModel"}
    (a / "config.json").write_text(json.dumps(config))
    (a / "tokenizer_config.json").write_text(json.dumps({"auto_map": {"AutoTokenizer": ["tok.T", None]}, "x": 1}))
    (a / "modeling_toy.py").write_text("import os  # would run with trust_remote_code\n")
    (a / "1_Pooling").mkdir()
    (a / "1_Pooling" / "config.json").write_text("{}")
    (a / "1_Pooling" / "custom.py").write_text("")
    outcome = merge(MergeConfig(models=[a, b], t=0.5, output=tmp_path / "out", show_progress=False))
    out = tmp_path / "out"
    assert sorted(p.name for p in out.rglob("*.py")) == []
    assert "auto_map" not in json.loads((out / "config.json").read_text())
    assert json.loads((out / "tokenizer_config.json").read_text()) == {"x": 1}
    assert (out / "1_Pooling" / "config.json").exists()
    assert set(outcome.dropped_remote_code) >= {"modeling_toy.py", "1_Pooling/custom.py", "config.json: auto_map",
                                               "tokenizer_config.json: auto_map"}
    assert any("remote code" in w for w in outcome.warnings)


def test_every_output_file_is_shared_like_the_folder(tmp_path, two):
    a, b = two
    report = tmp_path / "report.json"
    merge(MergeConfig(models=[a, b], t=0.5, output=tmp_path / "out", report=report, show_progress=False))
    out = tmp_path / "out"
    assert stat.S_IMODE(out.stat().st_mode) == 0o755
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in out.rglob("*") if p.is_file()}
    assert modes and set(modes.values()) == {0o644}, modes
    assert stat.S_IMODE(report.stat().st_mode) == 0o644


def test_the_trail_of_the_inputs_continues_with_the_merge(tmp_path, two):
    a, b = two
    write_provenance(a, [{"stage": "synth", "generator": "g"}], "train", steps=3)
    write_provenance(b, [{"stage": "synth", "generator": "g"}], "train", steps=6)
    merge(MergeConfig(models=[a, b], t=0.25, output=tmp_path / "out", show_progress=False))
    trail = read_provenance(tmp_path / "out")
    assert [r["stage"] for r in trail] == ["synth", "train", "train", "merge"]
    record = trail[-1]
    assert record["method"] == "slerp" and record["t"]["default"] == [0.25]
    assert record["models"] == [str(a), str(b)]


def test_a_recipe_can_embed_the_config_without_folders(tmp_path, two):
    a, b = two
    section = validate(MergeConfig, {"method": "slerp", "t": "0,0.5,1"}, source="recipe.yaml")
    with pytest.raises(ConfigError, match="no models to merge"):
        merge(section)
    with pytest.raises(ConfigError, match="output folder is required"):
        merge(section.model_copy(update={"models": [str(a), str(b)]}))
    with pytest.raises(ConfigError, match="one of the inputs"):
        merge(section.model_copy(update={"models": [str(a), str(b)], "output": str(a)}))
    with pytest.raises(ConfigError, match=r"recipe.yaml: t: .*\[0, 1\]"):
        validate(MergeConfig, {"t": 2}, source="recipe.yaml")
    outcome = merge(section.model_copy(update={"models": [str(a), str(b)], "output": str(tmp_path / "o"),
                                               "show_progress": False}))
    assert outcome.t == {"default": [0.0, 0.5, 1.0], "attention": None, "mlp": None}
    assert outcome.output == str(tmp_path / "o") and outcome.metrics()["tensors"] == outcome.tensors


def test_cli_flags_are_derived_from_the_config(tmp_path, two, capsys):
    from embedforge.cli import main

    a, b = two
    assert main(["merge", "--models", str(a), str(b), "--weights", "1", "3", "--method", "linear",
                 "--output", str(tmp_path / "w"), "--no-show-progress", "--dtype", "float16"]) == 0
    saved = json.loads((tmp_path / "w" / "merge_report.json").read_text())
    assert saved["weights"] == [0.25, 0.75] and saved["dtype"] == "float16"
    assert main(["merge", "--models", str(a), str(b), "--output", str(tmp_path / "x"),
                 "--set", "t=0.5", "--set", "dot_threshold=2", "--quiet"]) == 2
    assert "dot_threshold must lie in (0, 1]" in capsys.readouterr().err

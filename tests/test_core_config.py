"""Config plumbing every stage shares: flags generated from the config model, layering
(YAML < flags < --set), list indices in --set, stage outcomes and the provenance trail."""

from __future__ import annotations

import argparse
from typing import Literal

import pytest
from pydantic import Field

from embedforge.config import StrictModel, add_config_flags, apply_overrides, config_from_args
from embedforge.errors import ConfigError
from embedforge.outcome import StageOutcome
from embedforge.provenance import find_stage, read_provenance, write_provenance


class Inner(StrictModel):
    x: int = 1


class Cfg(StrictModel):
    model: str = Field(description="the model")
    lr: float = 1e-4
    k: int | None = 5
    mode: Literal["a", "b"] = "a"
    flag: bool = False
    dims: list[int] | None = None
    inner: Inner = Field(default_factory=Inner)


def parse(argv):
    parser = argparse.ArgumentParser()
    add_config_flags(parser, Cfg)
    return parser, parser.parse_args(argv)


def test_flags_are_generated_from_fields_and_typed_by_the_model():
    _, args = parse(["--model", "m", "--lr", "0.5", "--k", "none", "--mode", "b", "--flag", "--dims", "8", "16"])
    cfg = config_from_args(Cfg, args)
    assert cfg == Cfg(model="m", lr=0.5, k=None, mode="b", flag=True, dims=[8, 16])


def test_flags_not_given_leave_the_defaults_and_nested_sections_come_from_set():
    _, args = parse(["--model", "m", "--set", "inner.x=7"])
    cfg = config_from_args(Cfg, args)
    assert cfg.lr == 1e-4 and cfg.k == 5 and cfg.inner.x == 7


def test_layering_yaml_then_flags_then_set(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("model: from-yaml\nlr: 0.1\nk: 3\n")
    _, args = parse(["--config", str(path), "--lr", "0.2", "--set", "k=9"])
    cfg = config_from_args(Cfg, args)
    assert (cfg.model, cfg.lr, cfg.k) == ("from-yaml", 0.2, 9)


def test_bad_choice_is_refused_by_the_parser():
    parser, _ = parse(["--model", "m"])
    with pytest.raises(SystemExit):
        parser.parse_args(["--model", "m", "--mode", "c"])


def test_unknown_key_in_set_is_named():
    _, args = parse(["--model", "m", "--set", "inner.y=1"])
    with pytest.raises(ConfigError, match="inner.y: unknown key"):
        config_from_args(Cfg, args)


def test_set_indexes_lists_and_names_a_bad_index():
    data = {"data": [{"path": "a", "n": 1}, {"path": "b", "n": 1}]}
    assert apply_overrides(data, ["data.1.n=2", "data.-2.path=z"])["data"] == [{"path": "z", "n": 1},
                                                                               {"path": "b", "n": 2}]
    with pytest.raises(ConfigError, match=r"index 2 out of range \(data has 2 item"):
        apply_overrides(data, ["data.2.n=3"])
    with pytest.raises(ConfigError, match="is a list; index it with a number"):
        apply_overrides(data, ["data.path=x"])


def test_outcome_collects_warnings_and_flat_metrics():
    class Out(StageOutcome):
        rows: int
        detail: dict = Field(default_factory=dict)

    out = Out(output="o", rows=0)
    out.warn("0 rows kept")
    assert out.warnings == ["0 rows kept"] and out.metrics() == {"rows": 0}


def test_provenance_trail_appends_and_merges_inputs(tmp_path):
    a, b, c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    for folder in (a, b, c):
        folder.mkdir()
    write_provenance(a, [], "synth", generator="g")
    write_provenance(b, read_provenance(a), "filter", kept=3)
    trail = write_provenance(c / "model.bin", read_provenance(b, a), "train", steps=10)
    assert [r["stage"] for r in trail] == ["synth", "filter", "train"]
    assert read_provenance(c / "model.bin") == trail and find_stage(trail, "filter")["kept"] == 3

"""`evaluate(EvalConfig)` and `report(ReportConfig)` on a real model and real queries: every score
comes with its query count, interval, random-ranking score and, against a baseline results file,
the paired difference and p-value; the numbers are those of the statistics functions on the
per-query metrics the file stores; the model's provenance is carried on."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from embedforge.errors import ConfigError, InputError
from embedforge.eval.beir import load_beir, write_beir
from embedforge.eval.config import EvalConfig, ReportConfig
from embedforge.eval.metrics import METRIC_KEYS
from embedforge.eval.random_ranking import random_ranking_baseline
from embedforge.eval.real_data import stdlib_code_search
from embedforge.eval.report import report
from embedforge.eval.stage import evaluate
from embedforge.eval.stats import bootstrap_ci, paired_bootstrap_ci, paired_randomisation_test
from embedforge.provenance import read_provenance

MAX_LENGTH = 64  # both runs use the same limit; short inputs keep this file fast
RESAMPLES = 2_000  # the statistics are checked against their own functions here, not for accuracy


@pytest.fixture(scope="module")
def beir_dir(tmp_path_factory):
    torch.set_num_threads(1)
    return write_beir(tmp_path_factory.mktemp("beir") / "stdlib", stdlib_code_search(
        n_queries=24, n_docs=80, seed=1, packages=("json", "email", "logging", "argparse", "textwrap"), max_chars=400))


@pytest.fixture(scope="module")
def model_dir(minilm, tmp_path_factory):
    """MiniLM with a provenance trail, as a trained model folder would have."""
    folder = tmp_path_factory.mktemp("model") / "minilm"
    shutil.copytree(minilm, folder)
    (folder / "provenance.json").write_text(json.dumps([{"stage": "train", "steps": 10}]))
    return folder


def read(path: str) -> dict:
    return json.loads(Path(path).read_text())


def config(model_dir, beir_dir, out, **kwargs):
    return EvalConfig(model=str(model_dir), data=str(beir_dir), output=str(out), device="cpu", dtype="float32",
                      max_length=MAX_LENGTH, n_resamples=RESAMPLES, **kwargs)


@pytest.fixture(scope="module")
def runs(model_dir, beir_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("results")
    base = evaluate(config(model_dir, beir_dir, out / "base.json", label="base", dim=32))
    full = evaluate(config(model_dir, beir_dir, out / "full.json", label="full", baselines=[base.output]))
    return base, full


@pytest.mark.slow
def test_every_score_comes_with_queries_interval_and_random_baseline(runs, beir_dir):
    base, _ = runs
    result = read(base.output)
    data = load_beir(beir_dir)
    assert base.n_queries == result["n_queries"] == 24 and base.n_docs == 80
    assert result["random_baseline"] == pytest.approx(random_ranking_baseline(data.qrels, 80), abs=1e-15)
    per_query = result["per_query"]
    assert set(per_query) == set(data.qrels)
    for metric in METRIC_KEYS:
        values = [per_query[q][metric] for q in sorted(per_query)]
        low, high = bootstrap_ci(values, n_resamples=RESAMPLES, seed=0)
        assert result["intervals"][metric] == pytest.approx({"mean": result["metrics"][metric], "low": low,
                                                             "high": high}, abs=1e-12)
    assert result["statistics"]["n_resamples"] == RESAMPLES and result["data_fingerprint"]
    assert base.ndcg_at_10 == result["metrics"]["ndcg_at_10"]
    assert any("only 24 queries" in w for w in base.warnings) and result["warnings"] == base.warnings


@pytest.mark.slow
def test_paired_comparison_with_a_baseline_file(runs):
    base, full = runs
    ours, theirs = (read(r.output)["per_query"] for r in (full, base))
    ids = sorted(ours)
    for comparison in full.comparisons:
        a = np.array([ours[q][comparison.metric] for q in ids])
        b = np.array([theirs[q][comparison.metric] for q in ids])
        assert comparison.baseline == "base" and comparison.n_queries == 24
        assert comparison.delta == pytest.approx(full.scores[comparison.metric] - base.scores[comparison.metric],
                                                 abs=1e-12)
        assert (comparison.low, comparison.high) == pytest.approx(
            paired_bootstrap_ci(a, b, n_resamples=RESAMPLES, seed=0), abs=1e-12)
        assert comparison.p_value == pytest.approx(paired_randomisation_test(a, b, n_resamples=RESAMPLES), abs=1e-12)
    assert [c.metric for c in full.comparisons] == list(METRIC_KEYS)
    assert "vs base" in full.summary() and "24 queries" in full.summary()


@pytest.mark.slow
def test_provenance_is_read_from_the_model_and_extended(runs, model_dir):
    _, full = runs
    result = read(full.output)
    assert result["provenance"] == [{"stage": "train", "steps": 10}]
    trail = read_provenance(full.output)
    assert [r["stage"] for r in trail] == ["train", "eval"]
    record = trail[-1]
    assert record["results_file"] == full.output and record["n_queries"] == 24 and record["label"] == "full"
    assert record["metrics"] == full.scores and "per_query" not in record
    assert record["intervals"]["ndcg_at_10"]["low"] == full.intervals["ndcg_at_10"].low
    assert record["comparisons"][0]["baseline"] == "base"
    # one comparison per metric; `versus` picks the asked one, and nothing for a label never compared with
    mrr = full.versus("base", "mrr_at_10")
    assert full.versus("base") == full.comparisons[0] and full.versus("base").metric == "ndcg_at_10"
    assert mrr.metric == "mrr_at_10" and mrr.baseline == "base" and full.versus("other") is None


@pytest.mark.slow
def test_report_in_pipeline_order_with_intervals_and_tests(runs, tmp_path):
    base, full = runs
    out = report(ReportConfig(results=[base.output, full.output], output=str(tmp_path / "r.md"),
                              n_resamples=RESAMPLES))
    lines = out.markdown.splitlines()
    assert lines[0] == "| model | data | nDCG@10 [95% CI] | Δ vs base [95% CI] | p | queries | random |"
    ci, c = full.intervals["ndcg_at_10"], full.comparisons[0]
    chance = f"{100 * full.random_baseline['ndcg_at_10']:.2f}"
    assert lines[2].startswith(f"| base | stdlib | {100 * base.intervals['ndcg_at_10'].mean:.2f} [")
    assert lines[3] == (f"| full | stdlib | {100 * ci.mean:.2f} [{100 * ci.low:.2f}, {100 * ci.high:.2f}] | "
                        f"{100 * c.delta:+.2f} [{100 * c.low:+.2f}, {100 * c.high:+.2f}] | {c.p_value:.3g} | 24 | "
                        f"{chance} |")
    assert (tmp_path / "r.md").read_text() == out.markdown
    # Naming the other result as the baseline turns the comparison around.
    swapped = report(ReportConfig(results=[base.output, full.output], baseline="full", n_resamples=RESAMPLES))
    assert "Δ vs full" in swapped.markdown and f"{-100 * c.delta:+.2f} [" in swapped.markdown


@pytest.mark.slow
def test_cli_eval_with_baselines_and_report(runs, model_dir, beir_dir, tmp_path, capsys):
    from embedforge.cli import main

    base, _ = runs
    out = tmp_path / "cli.json"
    assert main(["eval", "--model", str(model_dir), "--data", str(beir_dir), "--output", str(out), "--device", "cpu",
                 "--dtype", "float32", "--max-length", str(MAX_LENGTH), "--label", "cli", "--n-resamples",
                 str(RESAMPLES), "--baselines", base.output]) == 0
    err = capsys.readouterr().err
    assert "cli: nDCG@10" in err and "vs base" in err and "warning: eval cli: only 24 queries" in err
    assert json.loads(out.read_text())["comparisons"][0]["baseline"] == "base"
    assert main(["report", base.output, str(out), "--n-resamples", str(RESAMPLES)]) == 0
    assert "| cli | stdlib |" in capsys.readouterr().out


def test_config_names_what_is_missing(tmp_path):
    with pytest.raises(ConfigError, match="no model"):
        evaluate(EvalConfig(data="d", output="o.json"))
    with pytest.raises(ConfigError, match="exactly one of `data`"):
        evaluate(EvalConfig(model="m", output="o.json"))
    with pytest.raises(ConfigError, match="exactly one of `data`"):
        evaluate(EvalConfig(model="m", data="d", mteb=["SciFact"], output="o.json"))
    with pytest.raises(ConfigError, match="no results file"):
        evaluate(EvalConfig(model="m", data="d"))
    with pytest.raises(ConfigError, match="no results files"):
        report(ReportConfig())


def test_a_baseline_without_per_query_metrics_is_refused_before_loading_a_model(tmp_path):
    old = tmp_path / "old.json"
    old.write_text(json.dumps({"model": "m", "metrics": dict.fromkeys(METRIC_KEYS, 0.5)}))
    with pytest.raises(InputError, match=r"old.json: field 'per_query': no per-query metrics"):
        evaluate(EvalConfig(model="not-loaded", data="d", output=str(tmp_path / "o.json"), baselines=[str(old)]))


@pytest.mark.slow
def test_a_baseline_on_other_queries_is_refused(runs, model_dir, beir_dir, tmp_path):
    base, _ = runs
    other = read(base.output)
    other["per_query"].pop(min(other["per_query"]))
    (tmp_path / "other.json").write_text(json.dumps(other))
    with pytest.raises(InputError, match="same queries: 24 here, 23 in the baseline"):
        evaluate(config(model_dir, beir_dir, tmp_path / "o.json", baselines=[str(tmp_path / "other.json")]))
    assert not (tmp_path / "o.json").exists()

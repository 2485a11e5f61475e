"""`embedforge report`: markdown table of several results and PNG plots."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from embedforge.cli import main
from embedforge.errors import InputError
from embedforge.eval.report import load_results, markdown_table, write_report

KEYS = ("ndcg_at_10", "mrr_at_10", "recall_at_10", "recall_at_100", "map_at_100")


def result(model, ndcg, dim=None, merge_t=None, data="beir/scifact"):
    metrics = {k: ndcg + 0.01 * i for i, k in enumerate(KEYS)}
    return {"model": model, "data": data, "dim": dim, "embedding_dim": 1024, "metrics": metrics,
            "n_queries": 300, "n_docs": 5183, "meta": {} if merge_t is None else {"merge_t": merge_t}}


def write(tmp_path, name, obj):
    path = tmp_path / name
    path.write_text(json.dumps(obj))
    return str(path)


def test_markdown_table_compares_base_trained_merged(tmp_path):
    paths = [write(tmp_path, "base.json", result("models/base", 0.40)),
             write(tmp_path, "trained.json", result("out/trained", 0.55)),
             write(tmp_path, "merged.json", result("out/merged", 0.57, merge_t=0.5))]
    table = markdown_table(load_results(paths))
    lines = table.splitlines()
    assert lines[0] == "| model | data | dim | merge t | nDCG@10 | MRR@10 | R@10 | R@100 | MAP@100 | queries | docs |"
    assert lines[2] == "| base | scifact | full |  | 40.00 | 41.00 | 42.00 | 43.00 | 44.00 | 300 | 5183 |"
    assert lines[4] == "| merged | scifact | full | 0.5 | **57.00** | **58.00** | **59.00** | **60.00** | **61.00** | 300 | 5183 |"


def test_plots_of_score_vs_dim_and_merge_t(tmp_path):
    paths = [write(tmp_path, f"d{d}.json", result("out/merged", 0.3 + d / 4000, dim=d)) for d in (64, 256, 1024)]
    paths += [write(tmp_path, f"t{t}.json", result("out/m", 0.5 + t / 10, merge_t=t)) for t in (0.0, 0.5, 1.0)]
    out = write_report(paths, output=tmp_path / "report.md", plots_dir=tmp_path / "plots")
    assert set(out["plots"]) == {"score_vs_dim.png", "score_vs_merge_t.png"}
    for path in out["plots"].values():
        assert Path(path).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    text = (tmp_path / "report.md").read_text()
    assert "![score_vs_dim.png](plots/score_vs_dim.png)" in text


def test_no_plot_from_a_single_point(tmp_path):
    out = write_report([write(tmp_path, "a.json", result("m", 0.5, dim=64))], plots_dir=tmp_path / "p")
    assert out["plots"] == {}
    # A merge sweep at one width gives the merge plot only, not a one-width "line" of widths.
    sweep = [write(tmp_path, f"t{t}.json", result("out/m", 0.5 + t / 10, merge_t=t)) for t in (0.0, 1.0)]
    assert set(write_report(sweep, plots_dir=tmp_path / "q")["plots"]) == {"score_vs_merge_t.png"}


def test_mteb_results_get_their_own_table(tmp_path):
    obj = {"model": "out/merged", "mteb": {"SciFact": {"main_score": 0.7}, "STS12": {"main_score": 0.8}}}
    table = markdown_table(load_results([write(tmp_path, "m.json", obj)]))
    assert "| model | STS12 | SciFact |" in table and "| merged | 80.00 | 70.00 |" in table


def test_bad_results_files(tmp_path):
    with pytest.raises(InputError, match="not an embedforge results file"):
        load_results([write(tmp_path, "x.json", {"hello": 1})])
    with pytest.raises(InputError, match=r"metrics lack \['map_at_100'\]"):
        obj = result("m", 0.5)
        del obj["metrics"]["map_at_100"]
        load_results([write(tmp_path, "y.json", obj)])
    (tmp_path / "z.json").write_text("{oops")
    with pytest.raises(InputError, match=r"z.json:1: invalid JSON"):  # now with its line
        load_results([str(tmp_path / "z.json")])


def test_report_cli(tmp_path, capsys):
    paths = [write(tmp_path, "a.json", result("a", 0.1)), write(tmp_path, "b.json", result("b", 0.2))]
    assert main(["report", *paths]) == 0
    assert "| b | scifact | full |  | **20.00**" in capsys.readouterr().out
    assert main(["report", str(tmp_path / "missing.json")]) == 2
    assert "missing.json: file not found" in capsys.readouterr().err


def with_queries(model, data, values, random=0.01):
    """A result with per-query metrics (every metric equal to the query's value)."""
    per_query = {f"q{i}": dict.fromkeys(KEYS, v) for i, v in enumerate(values)}
    obj = result(model, sum(values) / len(values), data=data)
    obj["metrics"] = dict.fromkeys(KEYS, sum(values) / len(values))
    return {**obj, "n_queries": len(values), "per_query": per_query, "random_baseline": dict.fromkeys(KEYS, random)}


def test_summary_rows_keep_pipeline_order_and_pair_within_each_data_set(tmp_path):
    from embedforge.eval.confidence import compare
    from embedforge.eval.report import summary_table

    rng = np.random.default_rng(0)
    base, trained = rng.random(30).round(3).tolist(), rng.random(30).round(3).tolist()
    paths = [write(tmp_path, "b.json", with_queries("runs/base", "heldout", base)),
             write(tmp_path, "t.json", with_queries("runs/trained", "heldout", trained)),
             write(tmp_path, "g.json", with_queries("runs/base", "general", base[:10])),
             write(tmp_path, "m.json", with_queries("runs/merged", "general", trained[:10]))]
    results = load_results(paths)
    lines = summary_table(results, n_resamples=500).splitlines()
    assert [line.split(" | ")[0:2] for line in lines[2:6]] == [["| base", "heldout"], ["| trained", "heldout"],
                                                             ["| base", "general"], ["| merged", "general"]]
    c = compare(results[1]["per_query"], results[0]["per_query"], "ndcg_at_10", "base", n_resamples=500)
    assert f"| {100 * c.delta:+.2f} [{100 * c.low:+.2f}, {100 * c.high:+.2f}] | {c.p_value:.3g} | 30 | 1.00 |" \
        in lines[3]
    c = compare(results[3]["per_query"], results[2]["per_query"], "ndcg_at_10", "base", n_resamples=500)
    assert f"| {100 * c.delta:+.2f} [" in lines[5] and "| 10 |" in lines[5]  # paired with general's base
    assert lines[2].split(" | ")[3:5] == ["", ""]  # a baseline is not compared with itself


def test_summary_says_when_a_result_cannot_be_paired(tmp_path):
    from embedforge.eval.report import summary_table

    paths = [write(tmp_path, "a.json", result("a", 0.3)), write(tmp_path, "b.json", result("b", 0.4))]
    table = summary_table(load_results(paths))
    assert "| b | scifact | 40.00 | n/a (no per-query metrics) |  | 300 |  |" in table
    with pytest.raises(InputError, match="baseline 'zzz'"):
        summary_table(load_results(paths), baseline="zzz")

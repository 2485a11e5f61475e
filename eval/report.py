"""Compare results JSONs side by side: a summary table with intervals, paired tests and the random
baseline, a table of every metric, and PNG plots of score vs Matryoshka width and score vs merge t
when the results carry those fields.

A results file is what `embedforge eval` writes. Rows keep the order the files are given in (the
pipeline passes base, trained, merged). `dim` null means full width (`embedding_dim`); the merge t
is read from `meta.merge_t` (set with `embedforge eval --meta merge_t=0.5`) or a top-level `merge_t`.
"""

from __future__ import annotations

import os
from collections import defaultdict
from pathlib import Path
from typing import Any

from pydantic import Field

from embedforge.errors import InputError
from embedforge.eval.config import ReportConfig
from embedforge.eval.metrics import METRIC_KEYS
from embedforge.eval.stats import CONFIDENCE, N_RESAMPLES, SEED
from embedforge.io import atomic_path, check_output, output_lock, read_json_file
from embedforge.outcome import StageOutcome

METRIC_TITLES = {
    "ndcg_at_10": "nDCG@10",
    "mrr_at_10": "MRR@10",
    "recall_at_10": "R@10",
    "recall_at_100": "R@100",
    "map_at_100": "MAP@100",
}


def load_results(paths: list[str | os.PathLike]) -> list[dict[str, Any]]:
    results = []
    for path in paths:
        path = str(path)
        obj = read_json_file(path)
        if not isinstance(obj, dict) or not ("metrics" in obj or "mteb" in obj):
            raise InputError("not an embedforge results file (no 'metrics' or 'mteb')", path=path)
        if "metrics" in obj:
            missing = [k for k in METRIC_KEYS if k not in obj["metrics"]]
            if missing:
                raise InputError(f"metrics lack {missing}", path=path, field="metrics")
        obj["_path"] = path
        results.append(obj)
    if not results:
        raise InputError("no results files given")
    return results


def label_of(result: dict[str, Any]) -> str:
    if result.get("label"):
        return str(result["label"])
    name = Path(str(result.get("model", "?")).rstrip("/")).name or str(result.get("model"))
    if result.get("reranker"):
        name += f" + {Path(str(result['reranker']).rstrip('/')).name}@{result.get('top_k')}"
    return name


def merge_t_of(result: dict[str, Any]) -> float | None:
    value = (result.get("meta") or {}).get("merge_t", result.get("merge_t"))
    return None if value is None else float(value)


def width_of(result: dict[str, Any]) -> int | None:
    return result.get("dim") or result.get("embedding_dim")


def _data_name(result: dict[str, Any]) -> str:
    return Path(str(result.get("data", "?")).rstrip("/")).name


def markdown_table(results: list[dict[str, Any]], metrics: tuple[str, ...] = METRIC_KEYS) -> str:
    """One row per retrieval result; the best value of each metric per data set in bold."""
    rows = [r for r in results if "metrics" in r]
    lines = []
    if rows:
        best: dict[tuple[str, str], float] = {}
        for r in rows:
            for m in metrics:
                key = (_data_name(r), m)
                best[key] = max(best.get(key, float("-inf")), r["metrics"][m])
        header = ["model", "data", "dim", "merge t", *[METRIC_TITLES.get(m, m) for m in metrics], "queries", "docs"]
        lines += ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] * 4 + ["---:"] * (len(metrics) + 2)) + "|"]
        for r in rows:
            cells = [label_of(r), _data_name(r), str(r.get("dim") or "full"),
                     "" if merge_t_of(r) is None else f"{merge_t_of(r):g}"]
            for m in metrics:
                value = f"{100 * r['metrics'][m]:.2f}"
                cells.append(f"**{value}**" if len(rows) > 1 and r["metrics"][m] == best[(_data_name(r), m)] else value)
            cells += [str(r.get("n_queries", "")), str(r.get("n_docs", ""))]
            lines.append("| " + " | ".join(cells) + " |")
    mteb_rows = [r for r in results if "mteb" in r]
    if mteb_rows:
        tasks = sorted({t for r in mteb_rows for t in r["mteb"]})
        if lines:
            lines.append("")
        lines += ["| model | " + " | ".join(tasks) + " |", "|---|" + "|".join(["---:"] * len(tasks)) + "|"]
        for r in mteb_rows:
            cells = [f"{100 * r['mteb'][t]['main_score']:.2f}" if t in r["mteb"] else "" for t in tasks]
            lines.append(f"| {label_of(r)} | " + " | ".join(cells) + " |")
    lines.append("")
    lines.append("Scores x 100; retrieval metrics computed with trec_eval semantics.")
    return "\n".join(lines) + "\n"


def _series(results: list[dict[str, Any]], x_of, group_of) -> dict[str, list[tuple[float, float]]]:
    groups: dict[str, list[tuple[float, float]]] = defaultdict(list)
    for r in results:
        x = x_of(r)
        if "metrics" in r and x is not None:
            groups[group_of(r)].append((float(x), r["metrics"]))
    # A line needs two distinct x values; single points (another experiment's runs) are left out.
    return {g: sorted(points, key=lambda p: p[0]) for g, points in groups.items() if len({p[0] for p in points}) > 1}


def _plot(series, path: Path, metric: str, xlabel: str, title: str, log_x: bool = False) -> Path | None:
    if not series:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    for name, points in sorted(series.items()):
        ax.plot([p[0] for p in points], [100 * p[1][metric] for p in points], marker="o", label=name)
    if log_x:
        ax.set_xscale("log", base=2)
        ticks = sorted({p[0] for points in series.values() for p in points})
        ax.set_xticks(ticks, [f"{t:g}" for t in ticks])
    ax.set_xlabel(xlabel)
    ax.set_ylabel(METRIC_TITLES.get(metric, metric) + " x 100")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
    return path


def plot_score_vs_dim(results: list[dict[str, Any]], path: str | os.PathLike, metric: str = "ndcg_at_10") -> Path | None:
    """One line per (model, data set): score at each Matryoshka width. None if fewer than 2 widths."""
    def group(r):
        t = merge_t_of(r)
        return f"{label_of({**r, 'label': None})} / {_data_name(r)}" + ("" if t is None else f" (t={t:g})")

    series = _series(results, width_of, group)
    return _plot(series, Path(path), metric, "embedding width (Matryoshka dim)", "Score vs Matryoshka width",
                 log_x=True)


def plot_score_vs_merge_t(results: list[dict[str, Any]], path: str | os.PathLike,
                          metric: str = "ndcg_at_10") -> Path | None:
    """One line per data set (and width): score at each merge t. None if fewer than 2 points."""
    series = _series(results, merge_t_of, lambda r: f"{_data_name(r)} (dim {r.get('dim') or 'full'})")
    return _plot(series, Path(path), metric, "merge t", "Score vs merge t")


class ReportOutcome(StageOutcome):
    """The report's markdown and plots; `output` is the markdown file ("" when only returned)."""

    markdown: str
    plots: dict[str, str] = Field(default_factory=dict)


def _pct(value: float, signed: bool = False) -> str:
    return f"{100 * value:+.2f}" if signed else f"{100 * value:.2f}"


def _baseline_rows(results: list[dict[str, Any]], baseline: str | None) -> dict[str, dict[str, Any]]:
    """data set -> the result the others on it are compared with."""
    chosen: dict[str, dict[str, Any]] = {}
    for r in results:
        if baseline is not None and baseline not in (label_of(r), r["_path"]):
            continue
        chosen.setdefault(_data_name(r), r)
    if baseline is not None and not chosen:
        raise InputError(f"baseline {baseline!r} is neither the label nor the file of any result")
    for r in results:  # data sets the named baseline does not cover: their first result
        chosen.setdefault(_data_name(r), r)
    return chosen


def summary_table(results: list[dict[str, Any]], metric: str = "ndcg_at_10", baseline: str | None = None,
                  confidence: float = CONFIDENCE, n_resamples: int = N_RESAMPLES, seed: int = SEED) -> str:
    """One row per retrieval result, in the order given: score [CI], paired difference with the
    baseline of its data set [CI] and p-value, number of queries, random-ranking score."""
    from embedforge.eval.confidence import compare, interval_of

    rows = [r for r in results if "metrics" in r]
    if not rows:
        return ""
    if metric not in METRIC_KEYS:
        raise InputError(f"unknown metric {metric!r}; expected one of {METRIC_KEYS}")
    stats = {"confidence": confidence, "n_resamples": n_resamples, "seed": seed}
    bases = _baseline_rows(rows, baseline)
    names = {label_of(b) for b in bases.values()}
    title, level = METRIC_TITLES.get(metric, metric), f"{confidence:.0%}"
    against = f"Δ vs {names.pop()}" if len(names) == 1 else "Δ vs baseline"
    lines = [f"| model | data | {title} [{level} CI] | {against} [{level} CI] | p | queries | random |",
             "|---|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        base = bases[_data_name(r)]
        if r.get("per_query"):
            ci = interval_of(r["per_query"], metric, **stats)
            score = f"{_pct(ci.mean)} [{_pct(ci.low)}, {_pct(ci.high)}]"
        elif metric in (r.get("intervals") or {}):
            ci = r["intervals"][metric]
            score = f"{_pct(ci['mean'])} [{_pct(ci['low'])}, {_pct(ci['high'])}]"
        else:
            score = _pct(r["metrics"][metric])
        delta = p = ""
        if base is not r:
            if r.get("per_query") and base.get("per_query"):
                c = compare(r["per_query"], base["per_query"], metric, label_of(base), **stats).model_dump()
            else:
                c = next((c for c in r.get("comparisons", [])
                          if c["metric"] == metric and c["baseline"] == label_of(base)), None)
            if c is None:
                delta = "n/a (no per-query metrics)"
            else:
                delta = f"{_pct(c['delta'], True)} [{_pct(c['low'], True)}, {_pct(c['high'], True)}]"
                p = f"{c['p_value']:.3g}"
        chance = (r.get("random_baseline") or {}).get(metric)
        lines.append(f"| {label_of(r)} | {_data_name(r)} | {score} | {delta} | {p} | {r.get('n_queries', '')} | "
                     f"{'' if chance is None else _pct(chance)} |")
    lines += ["", (f"Scores x 100. CI: {level} percentile bootstrap over queries ({n_resamples:,} resamples, seed "
                   f"{seed}). Δ: mean per-query difference with the baseline of the same data set and its paired "
                   f"bootstrap CI; p: two-sided paired randomisation (sign-flip) test, exact when 2^queries <= "
                   f"{n_resamples:,}. random: expected score of a uniformly random ranking of the corpus (exact).")]
    return "\n".join(lines) + "\n"


def write_report(paths: list[str | os.PathLike], output: str | os.PathLike | None = None,
                 plots_dir: str | os.PathLike | None = None, metric: str = "ndcg_at_10", baseline: str | None = None,
                 confidence: float = CONFIDENCE, n_resamples: int = N_RESAMPLES, seed: int = SEED) -> dict[str, Any]:
    """Summary table, all-metrics table (to `output`, or returned) and the plots the results allow."""
    if metric not in METRIC_KEYS:
        raise InputError(f"unknown metric {metric!r}; expected one of {METRIC_KEYS}")
    results = load_results(paths)
    summary = summary_table(results, metric, baseline, confidence, n_resamples, seed)
    table = (summary + "\n" if summary else "") + markdown_table(results)
    plots = {}
    if plots_dir is not None:
        plots_dir = Path(plots_dir)
        for name, fn in (("score_vs_dim.png", plot_score_vs_dim), ("score_vs_merge_t.png", plot_score_vs_merge_t)):
            made = fn(results, plots_dir / name, metric)
            if made is not None:
                plots[name] = str(made)
        if plots:
            table += "\n" + "\n".join(f"![{n}]({os.path.relpath(p, Path(output).parent if output else '.')})"
                                      for n, p in plots.items()) + "\n"
    if output is not None:
        with atomic_path(output) as tmp:
            tmp.write_text(table, encoding="utf-8")
    return {"markdown": table, "plots": plots}


def report(config: ReportConfig) -> ReportOutcome:
    """Compare results files in the order given (base, trained, merged); see `summary_table`.

    Example:
        >>> report(ReportConfig(results=["base.json", "trained.json", "merged.json"], output="report.md"))
    """
    config.check_ready()
    if config.plots_dir:
        check_output(config.plots_dir, config.results, resumable=True)  # plots are redrawn in place
    if config.output is None:
        out = _write(config)
    else:
        check_output(config.output, config.results, overwrite=config.overwrite)
        with output_lock(config.output):
            out = _write(config)
    return ReportOutcome(output=config.output or "", markdown=out["markdown"], plots=out["plots"])


def _write(config: ReportConfig) -> dict[str, Any]:
    return write_report(config.results, output=config.output, plots_dir=config.plots_dir, metric=config.metric,
                        baseline=config.baseline, confidence=config.confidence, n_resamples=config.n_resamples,
                        seed=config.seed)

"""Benchmark: does a reranker teacher (GPL-style distillation) make SmolLM2's synthetic queries more useful?

On `builtin:python-docstrings` (passage = `module.name` + docstring body; REAL query = the docstring's
summary, written by its author and never shown to the pipeline):

  1. SmolLM2-135M-Instruct writes queries for `--passages` passages (`synthesize`, one-call strategy);
  2. the usual quality gates (`filter_pairs`, with contamination against the real queries);
  3. `mine` takes K hard negatives with the base embedder and, as teacher, SmolLM2 zero-shot as a
     yes/no reranker (`teacher=builtin:smollm2`): each row gets its log-odds for the positive and
     each negative (`teacher_scores`);
  4. all-MiniLM-L6-v2 is fine-tuned by ONE training loop (below) in several arms that differ only in
     the loss: in-batch InfoNCE alone (the trainer's default objective), InfoNCE + margin-MSE,
     InfoNCE + list-wise KL, and margin-MSE alone (GPL's own objective); same rows, same batches,
     same seed, same schedule;
  5. base and every arm are evaluated on the real queries (nDCG@10, 95% bootstrap CI, paired
     randomisation test against the base and against the InfoNCE-only arm, random-ranking baseline).

Every arm is `embedforge.train.train` with the trainer's defaults for a small encoder (full fine-tuning,
AdamW, linear schedule with 10% warmup, gradient clipping, loss preset `infonce`: hard + in-batch q->d at
tau 0.05) and the arm's `loss.distill` (kind, weight, teacher temperature, InfoNCE on or off).

Choices made without looking at the real queries: the teacher template (SmolLM2 has no `<think>`
token, so the ChatML template without the Qwen3 think block, see data_synth/teacher.py; the pair
accuracy of both templates on the synthetic rows is reported), the teacher temperature (the teacher's
margin spread matched to the base student's on the training rows, `matching_teacher_temperature`) and
the weights (KL 1; margin-MSE 1 / variance of the scaled teacher margins, so both start on the
InfoNCE's scale). The teacher's pair accuracy on real queries is reported as a diagnostic only.

    python bench/distill_gpl.py                       # ~40 min on one thread of a shared 2-core machine
    python bench/distill_gpl.py --passages 12 --steps 3 --results-dir /tmp/smoke   # a smoke run
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).parent
RESULTS = Path(os.environ.get("EMBEDFORGE_BENCH_RESULTS") or HERE / "results")
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

CORPUS = "python-docstrings"
ARMS = {  # name -> (InfoNCE on?, distillation loss or None)
    "infonce": (True, None),
    "infonce+margin_mse": (True, "margin_mse"),
    "infonce+kl": (True, "kl"),
    "margin_mse (GPL)": (False, "margin_mse"),
}


# --- data ------------------------------------------------------------------------------------------


def make_rows(args, data: dict[str, str], out: Path) -> dict:
    """synthesize -> filter -> mine with the teacher; returns the mined rows and the stage counts."""
    from embedforge.data_synth import FilterConfig, MineConfig, SynthConfig, filter_pairs, mine, synthesize
    from embedforge.io import iter_jsonl

    t0 = time.time()
    synth = synthesize(SynthConfig(corpus=data["generator"], output=str(out / "synth"), model=args.generator,
                                   strategy="one_call", chunk_tokens=None, overlap=0, batch_size=16))
    synth_s = time.time() - t0
    kept = filter_pairs(FilterConfig(input=[str(out / "synth")], output=str(out / "filtered"), teacher=args.model,
                                     eval_sets=[str(Path(data["real"]) / "queries.jsonl")], overwrite=True))
    t0 = time.time()
    mined = mine(MineConfig(data=[str(out / "filtered")], corpus=data["passages"], output=str(out / "mined"),
                            model=args.model, num_negatives=args.negatives, rank_start=5, rank_end=50,
                            max_length=args.max_length, teacher=args.teacher, use_instructions=False,
                            overwrite=True))
    mine_s = time.time() - t0
    rows = [row for path in mined.files for _, row in iter_jsonl(path)]
    return {"rows": rows, "synth": {"rows": synth.rows, "schema_valid_rate": synth.schema_valid_rate,
                                    "on_topic_rate": synth.on_topic_rate, "strategy": synth.strategy,
                                    "seconds": round(synth_s, 1)},
            "filter": {"rows_in": kept.rows_in, "rows_kept": kept.rows_kept, "dropped": kept.dropped},
            "mine": {"rows": mined.rows, "negatives": mined.negatives, "rows_short": mined.rows_short,
                     "teacher_pairs": mined.teacher_pairs_scored + mined.teacher_pairs_reused,
                     "teacher_pair_accuracy": mined.teacher_pair_accuracy,
                     "teacher_rows_prefer_negative": mined.teacher_rows_prefer_negative,
                     "warnings": mined.warnings, "seconds": round(mine_s, 1)}}


def row_tensors(rows: list[dict], k: int) -> tuple[list[list[str]], torch.Tensor, torch.Tensor]:
    """Per row [positive, negatives...] padded to 1+K texts, the neg mask [N, K], teacher [N, 1+K] (NaN pads)."""
    docs, mask, teacher = [], torch.zeros(len(rows), k, dtype=torch.bool), torch.full((len(rows), 1 + k), math.nan)
    for i, row in enumerate(rows):
        negs = row["negatives"][:k]
        docs.append([row["positive"], *negs, *[""] * (k - len(negs))])
        mask[i, :len(negs)] = True
        teacher[i, :1 + len(negs)] = torch.tensor(row["teacher_scores"][:1 + len(negs)])
    return docs, mask, teacher.double()


# --- teacher diagnostics ---------------------------------------------------------------------------


def base_margins(model: str, rows: list[dict], k: int, tau: float, max_length: int):
    """The base student's margins cos(q, d+) - cos(q, d-) / tau over the usable pairs, and the teacher's."""
    from embedforge import Embedder

    embedder = Embedder.from_pretrained(model, dtype="float32")
    docs, mask, teacher = row_tensors(rows, k)
    q = torch.from_numpy(embedder.encode([r["query"] for r in rows], max_length=max_length))
    d = torch.from_numpy(embedder.encode([t or "." for row in docs for t in row], max_length=max_length))
    cos = torch.einsum("nd,nkd->nk", q, d.view(len(rows), 1 + k, -1)).double()
    valid = mask & torch.isfinite(teacher[:, 1:]) & torch.isfinite(teacher[:, :1])
    student = ((cos[:, :1] - cos[:, 1:]) / tau)[valid]
    return student, (teacher[:, :1] - teacher[:, 1:])[valid]


def spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    from scipy.stats import spearmanr

    return float(spearmanr(a.numpy(), b.numpy()).statistic)


def template_accuracy(args, rows: list[dict], template: str) -> float:
    """Pair accuracy of the teacher under another template, on the same synthetic rows."""
    from embedforge.data_synth.models import resolve_model
    from embedforge.data_synth.teacher import TeacherScorer
    from embedforge.reranker import Reranker

    scorer = TeacherScorer(Reranker.from_pretrained(resolve_model(args.teacher), dtype="float32"), template=template)
    wins = total = 0
    for row in rows:
        docs = [row["positive"], *row["negatives"]]
        scores = scorer.log_odds([row["query"]] * len(docs), docs)
        wins += int((scores[0] > scores[1:]).sum())
        total += len(docs) - 1
    return wins / max(total, 1)


def real_query_diagnostic(args, real: str, n: int = 100) -> dict:
    """Teacher vs base embedder on REAL queries: does it put the true passage above the base model's
    best-ranked wrong passage? A diagnostic of the teacher only; nothing is chosen from it."""
    from embedforge import Embedder
    from embedforge.data_synth.models import resolve_model
    from embedforge.data_synth.teacher import TeacherScorer
    from embedforge.eval.beir import load_beir
    from embedforge.reranker import Reranker

    data = load_beir(real)
    doc_ids = list(data.corpus)
    query_ids = sorted(data.queries)[:: max(1, len(data.queries) // n)][:n]
    embedder = Embedder.from_pretrained(args.model, dtype="float32")
    d = embedder.encode([data.corpus[i] for i in doc_ids], max_length=args.max_length)
    q = embedder.encode([data.queries[i] for i in query_ids], max_length=args.max_length)
    sims = q @ d.T
    scorer = TeacherScorer(Reranker.from_pretrained(resolve_model(args.teacher), dtype="float32"))
    teacher_wins = base_wins = 0
    for row, qid in enumerate(query_ids):
        gold = next(iter(data.qrels[qid]))
        order = np.argsort(-sims[row])
        wrong = next(doc_ids[j] for j in order if doc_ids[j] != gold)
        t = scorer.log_odds([data.queries[qid]] * 2, [data.corpus[gold], data.corpus[wrong]])
        teacher_wins += int(t[0] > t[1])
        base_wins += int(sims[row, doc_ids.index(gold)] > sims[row, doc_ids.index(wrong)])
    return {"queries": len(query_ids), "teacher_pair_accuracy": teacher_wins / len(query_ids),
            "base_pair_accuracy": base_wins / len(query_ids)}


# --- training: embedforge's trainer, one config per arm -------------------------------------------


def train_arm(name: str, rows: list[dict], args, folder: Path, distill: str | None, infonce: bool,
              teacher_temperature: float, mse_weight: float) -> dict:
    """`embedforge.train.train` on the mined rows; arms differ only in `loss.distill`."""
    from embedforge.train import TrainConfig, train

    weight = {"margin_mse": mse_weight, "kl": 1.0, None: 0.0}[distill]
    loss: dict = {"preset": "infonce", "temperature": args.tau}
    if distill:
        loss["distill"] = {"kind": distill, "weight": weight, "teacher_temperature": teacher_temperature,
                           "infonce": infonce}
    config = TrainConfig.model_validate({
        "model": args.model, "method": "full", "lr": args.lr, "output_dir": str(folder), "progress_bar": False,
        "data": [{"path": "mined", "num_negatives": args.negatives, "instruction": None}],
        "batch_size": args.batch_size, "max_length": args.max_length, "max_steps": args.steps, "save_steps": 0,
        "seed": args.seed, "logging_steps": 1, "loss": loss,
    })
    began = time.time()
    result = train(config, inline_data={"mined": rows})
    log = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
    keep = ("loss", "infonce_loss", "distill_loss", "pos_sim", "neg_sim", "distill_margin_agreement",
            "distill_top1_agreement")
    print(f"[{name}] {result.steps} steps: " + " ".join(
        f"{key} {log[0][key]:.4f}->{log[-1][key]:.4f}" for key in keep if key in log[0]), flush=True)
    return {"seconds": round(time.time() - began, 1), "first": {k: log[0][k] for k in keep if k in log[0]},
            "last": {k: log[-1][k] for k in keep if k in log[-1]}, "distill_weight": weight,
            "final": result.final_dir, "warnings": result.warnings}


# --- evaluation ------------------------------------------------------------------------------------


def evaluate_models(models: dict[str, str], real: str, out: Path, args) -> list[dict]:
    from embedforge.eval import EvalConfig, evaluate

    rows, paths = [], {}
    for label, model in models.items():
        path = out / "results" / f"{label.replace(' ', '_').replace('(', '').replace(')', '')}.json"
        baselines = [str(paths[b]) for b in ("base", "infonce") if b in paths]
        outcome = evaluate(EvalConfig(model=model, data=real, output=str(path), label=label, instruction="",
                                      batch_size=64, max_length=args.max_length, overwrite=True, baselines=baselines))
        paths[label] = path
        by = {b: outcome.versus(b) for b in ("base", "infonce") if outcome.versus(b) is not None}
        rows.append({
            "model": label, "queries": outcome.n_queries, "docs": outcome.n_docs,
            "ndcg_at_10": outcome.ndcg_at_10, "ci": outcome.intervals["ndcg_at_10"].model_dump(),
            "random": outcome.random_baseline.get("ndcg_at_10"),
            "vs": {b: {"delta": c.delta, "low": c.low, "high": c.high, "p": c.p_value} for b, c in by.items()},
            "path": str(path),
        })
    return rows


def subset_rows(rows: list[dict], seen_ids: set[str]) -> dict:
    """nDCG@10 on the real queries whose passage had synthetic queries ('seen') and on the rest."""
    from embedforge.eval.stats import bootstrap_ci, paired_randomisation_test

    per = {r["model"]: json.loads(Path(r["path"]).read_text())["per_query"] for r in rows}
    out = {}
    for subset in ("seen", "unseen"):
        ids = sorted(q for q in per["base"] if (q.removeprefix("q:") in seen_ids) == (subset == "seen"))
        base = np.array([per["base"][q]["ndcg_at_10"] for q in ids])
        block = {"queries": len(ids)}
        for model, values in per.items():
            v = np.array([values[q]["ndcg_at_10"] for q in ids])
            low, high = bootstrap_ci(v)
            block[model] = {"ndcg_at_10": float(v.mean()), "ci": [low, high],
                            "delta_vs_base": float((v - base).mean()),
                            "p_vs_base": None if model == "base" else paired_randomisation_test(v, base)}
        out[subset] = block
    return out


# --- report ----------------------------------------------------------------------------------------


def markdown(report: dict) -> str:
    d = report["data"]
    t = report["teacher"]
    lines = [
        "# Reranker as teacher (GPL-style distillation) on real queries",
        "",
        (f"Device: {report['device']}; torch {report['torch']}, {report['threads']} thread(s), a shared machine "
         f"(timings are not comparable). Corpus `builtin:{CORPUS}` ({report['corpus_size']} passages); "
         f"{report['passages']} passages get SmolLM2-135M-Instruct queries ({d['synth']['strategy']} strategy). "
         f"Student {report['model_name']}; teacher {report['teacher_name']} zero-shot as a yes/no reranker "
         f"(template `{t['template']}`). {report['steps']} steps of {report['batch_size']} rows, "
         f"{report['negatives']} mined negatives per row, lr {report['lr']:g}, tau {report['tau']:g}, seed "
         f"{report['seed']}. Evaluation: the {report['rows'][0]['queries']} REAL docstring summaries (never "
         "shown to the pipeline) over all passages: nDCG@10 x 100 [95% bootstrap CI]; Δ: paired difference "
         "[95% CI], p: paired randomisation test; random: expected nDCG@10 of a random ranking."),
        "",
        "## Data and teacher",
        "",
        (f"- synthesis: {d['synth']['rows']} rows, schema-valid {d['synth']['schema_valid_rate']}, on topic "
         f"{d['synth']['on_topic_rate']}; filter kept {d['filter']['rows_kept']} of {d['filter']['rows_in']} "
         f"(drops {d['filter']['dropped']}); mine: {d['mine']['rows']} rows, {d['mine']['negatives']} negatives "
         f"({d['mine']['rows_short']} rows short of K), {d['mine']['teacher_pairs']} teacher-scored pairs."),
        (f"- teacher pair accuracy on the synthetic rows (positive scored above a mined negative): "
         f"**{t['pair_accuracy']:.3f}** with the `{t['template']}` template, {t['pair_accuracy_qwen3_template']:.3f} "
         f"with Qwen3's (think block as plain text); the base student on the same pairs: "
         f"{t['base_pair_accuracy']:.3f} (mining keeps only negatives the base scores below the positive by the "
         f"margin, so 1.0 by construction). Rows where the teacher prefers a negative: "
         f"{d['mine']['teacher_rows_prefer_negative']} of {d['mine']['rows']}."),
        (f"- teacher vs base student margins on those pairs: Spearman {t['spearman_with_base']:+.3f}; "
         f"teacher temperature T_t = {t['teacher_temperature']:.4f} (spreads matched); margin-MSE weight "
         f"{t['mse_weight']:.4f}."),
        (f"- diagnostic on {t['real']['queries']} real queries (true passage vs the base model's best-ranked "
         f"wrong passage): teacher right {t['real']['teacher_pair_accuracy']:.2f}, base embedder right "
         f"{t['real']['base_pair_accuracy']:.2f}."),
        "",
        "## Results on the real queries",
        "",
        "| model | nDCG@10 [95% CI] | Δ vs base [95% CI] | p | Δ vs infonce [95% CI] | p | random |",
        "|---|---|---|---|---|---|---|",
    ]

    def delta(row, baseline):
        c = row["vs"].get(baseline)
        if not c:
            return "", ""
        return (f"{100 * c['delta']:+.2f} [{100 * c['low']:+.2f}, {100 * c['high']:+.2f}]", f"{c['p']:.4f}")

    for row in report["rows"]:
        ci = row["ci"]
        db, pb = delta(row, "base")
        di, pi = delta(row, "infonce")
        lines.append(f"| {row['model']} | {100 * row['ndcg_at_10']:.2f} [{100 * ci['low']:.2f}, {100 * ci['high']:.2f}]"
                     f" | {db} | {pb} | {di} | {pi} | {100 * (row['random'] or 0):.2f} |")
    lines += ["", "By subset (seen: the query's passage was one of the generator's passages):", "",
              "| model | " + " | ".join(f"{s} ({report['subsets'][s]['queries']} q) nDCG@10, Δ vs base (p)"
                                       for s in ("seen", "unseen")) + " |", "|---|---|---|"]
    for row in report["rows"]:
        cells = []
        for s in ("seen", "unseen"):
            b = report["subsets"][s][row["model"]]
            p = "" if b["p_vs_base"] is None else f" (p {b['p_vs_base']:.3f})"
            cells.append(f"{100 * b['ndcg_at_10']:.2f}, {100 * b['delta_vs_base']:+.2f}{p}")
        lines.append(f"| {row['model']} | " + " | ".join(cells) + " |")
    lines += ["", "Training (first -> last step):", "", "| arm | loss | distill stats | s |", "|---|---|---|---|"]
    for name, arm in report["arms"].items():
        stats = ", ".join(f"{k} {arm['first'][k]:.3f} -> {arm['last'][k]:.3f}" for k in
                          ("distill_margin_agreement", "distill_top1_agreement", "pos_sim", "neg_sim") if k in arm["first"])
        lines.append(f"| {name} | {arm['first']['loss']:.3f} -> {arm['last']['loss']:.3f} | {stats} | "
                     f"{arm['seconds']:.0f} |")
    lines += ["", report["verdict"], ""]
    return "\n".join(lines) + "\n"


def verdict(rows: list[dict]) -> str:
    by = {r["model"]: r for r in rows}
    parts = []
    a = by["infonce"]
    ca = a["vs"]["base"]
    parts.append(f"InfoNCE alone vs the base: Δ {100 * ca['delta']:+.2f} (p {ca['p']:.4f}).")
    for name in ARMS:
        if name == "infonce":
            continue
        c = by[name]["vs"]["infonce"]
        word = ("better than" if c["delta"] > 0 else "worse than") if c["p"] < 0.05 else "not significantly different from"
        parts.append(f"{name}: {word} InfoNCE alone (Δ {100 * c['delta']:+.2f}, p {c['p']:.4f}).")
    return " ".join(parts)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="builtin:minilm")
    parser.add_argument("--generator", default="builtin:smollm2")
    parser.add_argument("--teacher", default="builtin:smollm2")
    parser.add_argument("--passages", type=int, default=150)
    parser.add_argument("--negatives", type=int, default=3)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--lr", type=float, default=5e-5)
    parser.add_argument("--tau", type=float, default=0.05)
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--workdir", default=None)
    parser.add_argument("--results-dir", default=str(RESULTS))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

    from domain_adaptation import prepare

    from embedforge import Embedder
    from embedforge.io import iter_jsonl
    from embedforge.train.distill import matching_teacher_temperature

    workdir = Path(args.workdir or f"/tmp/embedforge-bench-gpl-{os.getpid()}")
    workdir.mkdir(parents=True, exist_ok=True)
    started = time.time()
    base = workdir / "base"
    if not base.exists():
        Embedder.from_pretrained(args.model, dtype="float32").save_pretrained(base)
    data = prepare(CORPUS, workdir, args.passages)
    made = make_rows(args, data, workdir / "run")
    rows = made.pop("rows")
    student, teacher = base_margins(str(base), rows, args.negatives, args.tau, args.max_length)
    t_t = matching_teacher_temperature(teacher, student)
    mse_weight = 1.0 / float((teacher / t_t).var())
    teacher_report = {
        "template": rows[0]["provenance"]["mining"]["teacher_template"],
        "pair_accuracy": made["mine"]["teacher_pair_accuracy"],
        "pair_accuracy_qwen3_template": template_accuracy(args, rows, "qwen3"),
        "base_pair_accuracy": float((student > 0).double().mean()),
        "spearman_with_base": spearman(student, teacher),
        "teacher_temperature": t_t, "mse_weight": mse_weight,
        "real": real_query_diagnostic(args, data["real"]),
    }
    print("teacher:", json.dumps(teacher_report), flush=True)
    models = {"base": str(base)}
    arms = {}
    for name, (infonce, distill) in ARMS.items():
        arms[name] = train_arm(name, rows, args, workdir / "arms" / name.split()[0], distill, infonce, t_t,
                               mse_weight)
        models[name] = arms[name].pop("final")
    # every real query of the corpus over all of it: `seen` (the generator's passages) and `unseen` subsets
    results = evaluate_models(models, data["real-all"], workdir, args)
    seen = {row["id"] for _, row in iter_jsonl(data["generator"])}
    report = {
        "device": f"CPU {platform.processor() or platform.machine()}", "torch": torch.__version__,
        "threads": torch.get_num_threads(), "model_name": args.model, "teacher_name": args.teacher,
        "corpus_size": int(data["full_size"]), "passages": args.passages, "steps": args.steps,
        "batch_size": args.batch_size, "negatives": args.negatives, "lr": args.lr, "tau": args.tau,
        "seed": args.seed, "data": made, "teacher": teacher_report, "arms": arms, "rows": results,
        "subsets": subset_rows(results, seen), "verdict": verdict(results),
        "total_seconds": round(time.time() - started, 1),
    }
    out = Path(args.results_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "distill_gpl.json").write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    (out / "distill_gpl.md").write_text(markdown(report), encoding="utf-8")
    print(markdown(report))
    if not args.workdir:
        shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

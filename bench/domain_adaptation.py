"""Benchmark: does LLM synthesis adapt an embedder to a corpus, judged on REAL queries?

For each corpus with real human-written queries (`builtin:python-docstrings`: docstring summary ->
`module.name` + body; `builtin:debian-packages`: package synopsis -> extended description), the
same loop runs with two sources of training queries, everything else equal:

  * llm:    SmolLM2-135M-Instruct writes queries for `--passages` passages spread over the
            built-in corpus (`synthesize`), the generator budget of the demo;
  * pseudo: a non-LLM baseline, each passage's first sentence as its query (the classic
            pseudo-query of unsupervised domain adaptation);

then the same quality gates (`filter_pairs`), mined negatives (`mine`), fine-tuning (`train`), slerp
with the base (`merge`), and evaluation (`evaluate`) of base / trained / merged on the corpus's real
queries of those passages (95% bootstrap intervals, paired randomisation tests against the base and,
for LLM models, against the pseudo-query model of the same kind; random-ranking baseline) and on the
OTHER corpus's real queries, all of them (general ability). The generator never sees a
real query. Writes bench/results/domain_adaptation.{json,md}; the table says plainly when LLM
synthesis does not beat the non-LLM baseline.

    python bench/domain_adaptation.py                       # both corpora, ~40 min on 2 idle CPU cores
    python bench/domain_adaptation.py --passages 40 --corpora python-docstrings   # a smoke run
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).parent
RESULTS = Path(os.environ.get("EMBEDFORGE_BENCH_RESULTS") or HERE / "results")
sys.path.insert(0, str(HERE.parent))

CORPORA = ("python-docstrings", "debian-packages")
_SENTENCE = re.compile(r"(?<=[.!?:])\s+")


def first_sentence(passage: str, max_words: int = 30) -> str:
    """The pseudo-query: the passage's first sentence (after a `module.name` title line), capped."""
    lines = passage.strip().split("\n", 1)
    body = lines[1] if len(lines) == 2 and " " not in lines[0].strip() else passage
    sentence = _SENTENCE.split(" ".join(body.split()), maxsplit=1)[0]
    return " ".join(sentence.split()[:max_words])


def prepare(name: str, workdir: Path, passages: int) -> dict[str, str]:
    """The corpus to adapt to is the whole built-in corpus (negatives are mined from all of it); the
    generator's budget covers `passages` passages spread over it, as in the demo. In-domain set
    (`real`): the real queries of those passages, searched over the WHOLE corpus; general-ability set
    (`real-all`): every real query of the corpus, used for the other corpus's run."""
    from embedforge.builtin_data import load_builtin_corpus
    from embedforge.eval.beir import BeirData, write_beir
    from embedforge.io import write_jsonl

    corpus = load_builtin_corpus(name)
    covered = corpus.sample(passages)
    real = corpus.real_queries
    qrels = {q: docs for q, docs in covered.real_queries.qrels.items()}
    folder = workdir / name
    folder.mkdir(parents=True, exist_ok=True)
    write_jsonl(folder / "passages.jsonl", ({"id": k, "text": v} for k, v in corpus.passages.items()))
    write_jsonl(folder / "generator.jsonl", ({"id": k, "text": v} for k, v in covered.passages.items()))
    write_beir(folder / "real", BeirData({q: real.queries[q] for q in qrels}, real.corpus, qrels,
                                         source=real.source), overwrite=True)
    write_beir(folder / "real-all", real, overwrite=True)
    return {"passages": str(folder / "passages.jsonl"), "generator": str(folder / "generator.jsonl"),
            "real": str(folder / "real"), "real-all": str(folder / "real-all"), "folder": str(folder),
            "size": str(len(covered.passages)), "full_size": str(len(corpus.passages))}


def pseudo_pairs(generator_passages: str, output: Path) -> str:
    """The non-LLM baseline's pairs, in the synth stage's row format."""
    from embedforge.io import iter_jsonl, write_jsonl

    rows = []
    for _, row in iter_jsonl(generator_passages):
        query = first_sentence(row["text"])
        if len(query.split()) >= 3:
            rows.append({"query": query, "positive": row["text"], "negatives": [], "task": "retrieval",
                         "passage_id": row["id"], "provenance": {"generator": "first sentence (non-LLM)"}})
    output.mkdir(parents=True, exist_ok=True)
    write_jsonl(output / "pairs-00000-of-00001.jsonl", rows)
    return str(output)


def adapt(source: str, pairs: str, data: dict[str, str], args, out: Path) -> dict[str, str]:
    """filter -> mine -> train -> merge with the base; returns the model folders."""
    from embedforge.data_synth import FilterConfig, MineConfig, filter_pairs, mine
    from embedforge.merge import MergeConfig, merge
    from embedforge.train.config import TrainConfig
    from embedforge.train.trainer import train

    queries = str(Path(data["real"]) / "queries.jsonl")
    # The pseudo query IS a sentence of its passage: the copy gate, built to stop an LLM from copying,
    # would drop every row; the other gates apply to both sources alike.
    copy_gate = {"copy_max_ratio": None} if source == "pseudo" else {}
    kept = filter_pairs(FilterConfig(input=[pairs], output=str(out / "filtered"), teacher=args.model,
                                     eval_sets=[queries], overwrite=True, **copy_gate))
    mined = mine(MineConfig(data=[str(out / "filtered")], corpus=data["passages"], output=str(out / "mined"),
                            model=args.model, num_negatives=args.negatives, rank_start=5, rank_end=50,
                            max_length=args.max_length, overwrite=True))
    config = TrainConfig(model=args.model, output_dir=str(out / "train"), progress_bar=False,
                         data=[{"path": mined.files[0] if len(mined.files) == 1 else str(out / "mined"),
                                "num_negatives": args.negatives, "instruction": None}],
                         batch_size=args.batch_size, max_length=args.max_length, save_steps=0,
                         max_steps=args.steps)
    result = train(config)
    merged = merge(MergeConfig(models=[args.base_folder, result.final_dir], t=args.merge_t,
                               output=str(out / "merged"), overwrite=True, show_progress=False))
    return {"kept": kept.rows_kept, "rows_in": kept.rows_in, "negatives": mined.negatives,
            "steps": result.steps, "train_warnings": result.warnings, "trained": result.final_dir,
            "merged": merged.output, "source": source}


def evaluate_all(models: dict[str, str], sets: dict[str, str], out: Path, args) -> list[dict]:
    """Every model on every set, each compared with the base on the same queries, and each LLM model
    with the pseudo-query model of the same kind (trained / merged)."""
    from embedforge.eval import EvalConfig, evaluate

    rows = []
    for set_name, folder in sets.items():
        paths: dict[str, str] = {}
        for label, model in models.items():
            path = out / "results" / f"{label}-{set_name}.json"
            against = [paths["base"]] if paths else []
            pseudo = label.replace("llm-", "pseudo-")
            if label.startswith("llm-") and pseudo in paths:
                against.append(paths[pseudo])
            outcome = evaluate(EvalConfig(model=model, data=folder, output=str(path), label=label, instruction="",
                                          batch_size=64, max_length=args.max_length, overwrite=True,
                                          baselines=against))
            paths[label] = str(path)
            vs_base = outcome.versus("base")
            vs_pseudo = outcome.versus(pseudo)
            rows.append({
                "model": label, "set": set_name, "queries": outcome.n_queries, "docs": outcome.n_docs,
                "ndcg_at_10": outcome.ndcg_at_10, "ci": outcome.intervals["ndcg_at_10"].model_dump(),
                "random": outcome.random_baseline.get("ndcg_at_10"),
                "delta": vs_base.delta if vs_base else None,
                "delta_ci": [vs_base.low, vs_base.high] if vs_base else None,
                "p": vs_base.p_value if vs_base else None,
                "vs_pseudo": ({"delta": vs_pseudo.delta, "ci": [vs_pseudo.low, vs_pseudo.high],
                               "p": vs_pseudo.p_value} if vs_pseudo else None),
            })
    return rows


def markdown(report: dict) -> str:
    lines = [
        "# Domain adaptation on real queries: LLM synthesis vs a non-LLM pseudo-query baseline",
        "",
        (f"Device: {report['device']}; torch {report['torch']}, {report['threads']} thread(s). Backbone "
        f"{report['model_name']}; generator SmolLM2-135M-Instruct. Each corpus is adapted to as a whole; the "
        f"generator's budget covers {report['passages']} passages spread over it (as in the demo), negatives mined from the whole corpus; in-domain set: those passages' real queries searched over "
        "the WHOLE corpus; general ability: the other corpus whole; "
        f"batch {report['batch_size']}, {report['negatives']} mined negative(s), merge t "
        f"{report['merge_t']}. Queries are REAL (written by people), never shown to the pipeline. Each score: "
        "nDCG@10 x 100 [95% bootstrap CI]; Δ: paired difference with the base on the same queries [95% CI], "
        "p: paired randomisation test; random: expected nDCG@10 of a random ranking."),
        "",
        f"Command: `{report.get('command', 'python bench/domain_adaptation.py')}`; total {report['total_seconds'] / 60:.0f} min.",
        "",
    ]
    for corpus, block in report["corpora"].items():
        lines += [f"## {corpus}", "", (f"LLM pairs kept {block['llm']['kept']} of {block['llm']['rows_in']} "
                  f"(filter), pseudo pairs kept {block['pseudo']['kept']} of {block['pseudo']['rows_in']}; "
                  f"train steps {block['llm']['steps']} / {block['pseudo']['steps']}; synthesis "
                  f"{block['synth_seconds']:.0f} s ({block['synth']['seconds_per_passage'] or 0:.2f} s/passage), "
                  f"schema-valid {block['synth']['schema_valid_rate']}, on topic {block['synth']['on_topic_rate']}."),
                  "", ("| model | eval set | queries | nDCG@10 [95% CI] | Δ vs base [95% CI] | p | "
                       "Δ vs pseudo of the same kind [95% CI] | p | random |"),
                  "|---|---|---|---|---|---|---|---|---|"]
        for row in block["rows"]:
            ci = row["ci"]
            delta = "" if row["delta"] is None else (f"{100 * row['delta']:+.2f} [{100 * row['delta_ci'][0]:+.2f}, "
                                                     f"{100 * row['delta_ci'][1]:+.2f}]")
            p = "" if row["p"] is None else f"{row['p']:.4f}"
            v = row.get("vs_pseudo")
            vs = ("| | |" if not v else f"| {100 * v['delta']:+.2f} [{100 * v['ci'][0]:+.2f}, {100 * v['ci'][1]:+.2f}] "
                  f"| {v['p']:.4f} |")
            lines.append(f"| {row['model']} | {row['set']} | {row['queries']} | {100 * row['ndcg_at_10']:.2f} "
                         f"[{100 * ci['low']:.2f}, {100 * ci['high']:.2f}] | {delta} | {p} {vs} "
                         f"{100 * (row['random'] or 0):.2f} |")
        lines += ["", block["verdict"], ""]
    return "\n".join(lines) + "\n"


def verdict(rows: list[dict], corpus: str) -> str:
    """Whether LLM synthesis beat the base and the non-LLM baseline on the corpus's real queries."""
    own = {r["model"]: r for r in rows if r["set"] == corpus}
    best_llm = max((own[m] for m in ("llm-trained", "llm-merged")), key=lambda r: r["ndcg_at_10"])
    best_pseudo = max((own[m] for m in ("pseudo-trained", "pseudo-merged")), key=lambda r: r["ndcg_at_10"])
    parts = []
    significant = best_llm["p"] is not None and best_llm["p"] < 0.05 and best_llm["delta"] > 0
    parts.append(f"LLM synthesis ({best_llm['model']}) {'beats' if significant else 'does NOT significantly beat'} "
                 f"the base (Δ {100 * best_llm['delta']:+.2f}, p {best_llm['p']:.4f}).")
    same_kind = best_llm["vs_pseudo"]
    pseudo_kind = own[best_llm["model"].replace("llm-", "pseudo-")]
    beats = same_kind is not None and same_kind["delta"] > 0 and same_kind["p"] < 0.05
    parts.append(f"Against the non-LLM pseudo-query baseline of the same kind ({pseudo_kind['model']} "
                 f"{100 * pseudo_kind['ndcg_at_10']:.2f}; best pseudo {best_pseudo['model']} "
                 f"{100 * best_pseudo['ndcg_at_10']:.2f}): Δ {100 * same_kind['delta']:+.2f}, p {same_kind['p']:.4f}, "
                 f"{'LLM synthesis beats it' if beats else 'LLM synthesis does NOT significantly beat it'}.")
    return " ".join(parts)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--corpora", nargs="+", default=list(CORPORA), choices=CORPORA)
    parser.add_argument("--model", default="builtin:minilm")
    parser.add_argument("--generator", default="builtin:smollm2")
    parser.add_argument("--passages", type=int, default=150, help="passages per corpus that get training queries")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--negatives", type=int, default=1)
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--steps", type=int, default=None, help="training steps (default: the trainer's schedule)")
    parser.add_argument("--merge-t", type=float, default=0.7)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: all cores)")
    parser.add_argument("--workdir", default=None)
    parser.add_argument("--results-dir", default=str(RESULTS))
    parser.add_argument("--keep", action="store_true", help="keep the work folder")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

    from embedforge import Embedder
    from embedforge.data_synth import SynthConfig, synthesize

    workdir = Path(args.workdir or f"/tmp/embedforge-bench-da-{os.getpid()}")
    workdir.mkdir(parents=True, exist_ok=True)
    args.base_folder = str(workdir / "base")
    if not Path(args.base_folder).exists():
        Embedder.from_pretrained(args.model, dtype="float32").save_pretrained(args.base_folder)
    data = {name: prepare(name, workdir, args.passages) for name in args.corpora}
    started = time.time()
    report = {"device": f"CPU {platform.processor() or platform.machine()}", "torch": torch.__version__,
              "threads": torch.get_num_threads(), "model_name": args.model, "passages": args.passages,
              "batch_size": args.batch_size, "negatives": args.negatives, "merge_t": args.merge_t, "corpora": {}}
    for name in args.corpora:
        out = workdir / f"run-{name}"
        t0 = time.time()
        synth = synthesize(SynthConfig(corpus=data[name]["generator"], output=str(out / "synth"),
                                       model=args.generator, chunk_tokens=None, overlap=0, batch_size=16))
        synth_seconds = time.time() - t0
        llm = adapt("llm", str(out / "synth"), data[name], args, out / "llm")
        pseudo = adapt("pseudo", pseudo_pairs(data[name]["generator"], out / "pseudo-pairs"), data[name], args,
                       out / "pseudo")
        models = {"base": args.base_folder, "pseudo-trained": pseudo["trained"], "pseudo-merged": pseudo["merged"],
                  "llm-trained": llm["trained"], "llm-merged": llm["merged"]}
        # the adapted passages' own real queries; the other corpora whole (general ability)
        sets = {other: data[other]["real" if other == name else "real-all"] for other in args.corpora}
        rows = evaluate_all(models, sets, out, args)
        report["corpora"][name] = {
            "size": int(data[name]["size"]), "full_size": int(data[name]["full_size"]),
            "synth_seconds": synth_seconds,
            "synth": {k: getattr(synth, k) for k in ("rows", "schema_valid_rate", "on_topic_rate",
                                                      "seconds_per_passage")},
            "llm": {k: v for k, v in llm.items() if k not in ("trained", "merged")},
            "pseudo": {k: v for k, v in pseudo.items() if k not in ("trained", "merged")},
            "rows": rows, "verdict": verdict(rows, name),
        }
    report["total_seconds"] = time.time() - started
    report["command"] = "python bench/domain_adaptation.py " + " ".join(sys.argv[1:])
    results = Path(args.results_dir)
    results.mkdir(parents=True, exist_ok=True)
    (results / "domain_adaptation.json").write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    (results / "domain_adaptation.md").write_text(markdown(report), encoding="utf-8")
    print(markdown(report))
    if not args.keep and not args.workdir:
        shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

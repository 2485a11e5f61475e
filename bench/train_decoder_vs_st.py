"""A language model becomes an embedder: `embedforge train` against sentence-transformers on the
same real pairs, the same model and the same budget.

Both sides fully fine-tune SmolLM2-135M-Instruct for the same steps, batch, learning rate, warmup,
linear decay, gradient clipping (1.0) and max length, each over the same training rows once:
  * sentence-transformers: Transformer -> Pooling(lasttoken) -> Normalize, MultipleNegativesRankingLoss
    (scale 20), SentenceTransformerTrainer with its usual batch sampler;
  * embedforge: `embedforge.train.train` with every other setting at its default.
Each side's model is evaluated through its own library's encode (embedforge's `Embedder`, the
`SentenceTransformer`), scored by the same trec_eval-exact nDCG@10 on real German -> English
message pairs (bench/train_realpairs.py) that neither side trained on, before and after training:
95% bootstrap intervals, the random-ranking baseline, a paired test of each side against its base,
and a paired test of embedforge's gain against sentence-transformers' gain over the same queries.

    python bench/train_decoder_vs_st.py [--steps 30] [--batch-size 16] [--lr 2e-5] [--threads 2]

Results: bench/results/train_decoder_vs_st.{json,md}.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from train_realpairs import (
    embedforge_embedder,
    gettext_pairs,
    machine,
    paired_test,
    per_query_ndcg,
    random_ndcg_at_10,
    summary,
    write_results,
)


def st_model(folder: str, max_length: int):
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.models import Normalize, Pooling, Transformer

    transformer = Transformer(folder, max_seq_length=max_length)
    pooling = Pooling(transformer.get_word_embedding_dimension(), pooling_mode="lasttoken")
    return SentenceTransformer(modules=[transformer, pooling, Normalize()], device="cpu")


def st_encoder(model, batch_size: int):
    def encode(texts, is_query):
        return model.encode(texts, batch_size=batch_size, normalize_embeddings=True, convert_to_numpy=True)

    return encode


def ours_encoder(embedder, batch_size: int):
    def encode(texts, is_query):
        return embedder.encode(texts, batch_size=batch_size)

    return encode


def train_st(folder: str, rows: list[dict], args, out: Path):
    from datasets import Dataset
    from sentence_transformers import SentenceTransformerTrainer, SentenceTransformerTrainingArguments
    from sentence_transformers.sentence_transformer.losses import MultipleNegativesRankingLoss

    model = st_model(folder, args.max_length)
    training_args = SentenceTransformerTrainingArguments(
        output_dir=str(out), max_steps=args.steps, per_device_train_batch_size=args.batch_size,
        learning_rate=args.lr, warmup_steps=0.1, lr_scheduler_type="linear", max_grad_norm=1.0, weight_decay=0.0,
        seed=args.seed, save_strategy="no", report_to="none", logging_steps=max(1, args.steps // 10),
        dataloader_drop_last=True, use_cpu=True,
    )
    dataset = Dataset.from_list([{"anchor": r["query"], "positive": r["positive"]} for r in rows])
    trainer = SentenceTransformerTrainer(model=model, args=training_args, train_dataset=dataset,
                                         loss=MultipleNegativesRankingLoss(model, scale=20.0))
    trainer.train()
    return model


def train_ours(folder: str, rows: list[dict], args, out: Path):
    from embedforge.train.config import TrainConfig
    from embedforge.train.trainer import train

    cfg = TrainConfig.model_validate({
        "model": folder, "method": "full", "output_dir": str(out), "data": [{"path": "pairs"}],
        "max_steps": args.steps, "batch_size": args.batch_size, "lr": args.lr, "max_length": args.max_length,
        "save_steps": 0, "progress_bar": False, "seed": args.seed,
    })
    return train(cfg, inline_data={"pairs": rows})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2", help="smollm2 (offline SmolLM2-135M-Instruct) or a folder")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--lr", type=float, default=2e-5)
    parser.add_argument("--max-length", type=int, default=64)
    parser.add_argument("--test-queries", type=int, default=200)
    parser.add_argument("--test-docs", type=int, default=1000)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    from embedforge.offline_models import smollm2_folder

    folder = str(smollm2_folder()) if args.model == "smollm2" else args.model
    rows, test = gettext_pairs(args.steps * args.batch_size, args.test_queries, args.test_docs, args.seed)
    work = Path(tempfile.mkdtemp(prefix="bench-decoder-vs-st-"))
    started = time.perf_counter()
    scores, timings = {}, {}

    t = time.perf_counter()
    scores["st_before"] = per_query_ndcg(st_encoder(st_model(folder, args.max_length), 32), test)
    scores["ours_before"] = per_query_ndcg(ours_encoder(embedforge_embedder(folder, args.max_length), 32), test)
    timings["evaluate_bases_s"] = time.perf_counter() - t

    t = time.perf_counter()
    st_trained = train_st(folder, rows, args, work / "st")
    timings["train_st_s"] = time.perf_counter() - t
    scores["st_after"] = per_query_ndcg(st_encoder(st_trained, 32), test)
    del st_trained

    t = time.perf_counter()
    result = train_ours(folder, rows, args, work / "ours")
    timings["train_ours_s"] = time.perf_counter() - t
    scores["ours_after"] = per_query_ndcg(ours_encoder(embedforge_embedder(result.final_dir, args.max_length), 32),
                                          test)

    ids = list(test.queries)
    arr = {k: np.array([v[q] for q in ids]) for k, v in scores.items()}
    table = {k: summary(v) for k, v in scores.items()}
    gains = {side: paired_test(arr[f"{side}_after"], arr[f"{side}_before"]) for side in ("st", "ours")}
    versus = paired_test(arr["ours_after"] - arr["ours_before"], arr["st_after"] - arr["st_before"])
    report = {
        "model": folder, "machine": machine(args.threads), "settings": vars(args),
        "data": {"source": test.source, "train_rows": len(rows), "test_queries": len(ids), "test_docs": len(test.corpus)},
        "random_ndcg_at_10": random_ndcg_at_10(len(test.corpus)), "results": table, "gain_vs_base": gains,
        "ours_gain_minus_st_gain": versus, "embedforge_decisions": result.decisions,
        "embedforge_warnings": result.warnings, "timings_s": timings, "total_s": time.perf_counter() - started,
    }
    write_results("train_decoder_vs_st", report, markdown(report))
    print(markdown(report))


def markdown(r: dict) -> str:
    s, d, res = r["settings"], r["data"], r["results"]

    def cell(key):
        x = res[key]
        return f"{x['ndcg_at_10']:.3f} [{x['ci95'][0]:.3f}, {x['ci95'][1]:.3f}]"

    lines = [
        "# SmolLM2-135M-Instruct becomes an embedder: embedforge train vs sentence-transformers",
        "",
        (f"Machine: {r['machine']['description']}. Data: {d['source']}; {d['train_rows']} training pairs "
         f"(German message -> English original), test: {d['test_queries']} unseen real queries over "
         f"{d['test_docs']} passages. Both: full fine-tuning, {s['steps']} steps of {s['batch_size']}, lr {s['lr']}, "
         f"10% warmup, linear decay, clipping 1.0, max length {s['max_length']}. sentence-transformers: "
         "Transformer -> Pooling(lasttoken) -> Normalize, MNRL (scale 20); version 6 wraps each text in the model's "
         "chat template (system prompt, user turn) and pools its final token. embedforge: defaults "
         f"({'; '.join(r['embedforge_decisions'])})."),
        "",
        "| | nDCG@10 before [95% CI] | after [95% CI] | gain [95% CI] | p (after > before) |",
        "|---|---|---|---|---|",
    ]
    for side, name in (("st", "sentence-transformers MNRL"), ("ours", "embedforge train")):
        g = r["gain_vs_base"][side]
        lines.append(f"| {name} | {cell(side + '_before')} | {cell(side + '_after')} | {g['mean_diff']:+.3f} "
                     f"[{g['ci95'][0]:+.3f}, {g['ci95'][1]:+.3f}] | {g['p_bootstrap_one_sided']:.4f} |")
    v = r["ours_gain_minus_st_gain"]
    lines += [
        f"| random ranking | {r['random_ndcg_at_10']:.4f} | | | |",
        "",
        (f"embedforge's gain minus sentence-transformers' gain, paired over the same queries: {v['mean_diff']:+.3f} "
         f"[{v['ci95'][0]:+.3f}, {v['ci95'][1]:+.3f}], paired bootstrap p(gain_ours <= gain_st) = "
         f"{v['p_bootstrap_one_sided']:.4f}, sign-flip randomisation p (two-sided) = "
         f"{v['p_randomization_two_sided']:.4f}."),
        (f"Training time: sentence-transformers {r['timings_s']['train_st_s']:.0f} s, embedforge "
         f"{r['timings_s']['train_ours_s']:.0f} s (not a speed comparison unless the machine was idle); whole run "
         f"{r['total_s']:.0f} s."),
        f"embedforge warnings: {r['embedforge_warnings'] or 'none'}.",
    ]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()

"""Why SmolLM2 collapsed in `embedforge train`: one factor changed at a time.

Every variant fully fine-tunes SmolLM2-135M-Instruct for 30 steps of 16 real German -> English
message pairs (lr 2e-5, no warmup unless the variant says so, max length 64), then scores nDCG@10 on
200 unseen real queries over 400 passages (bench/train_realpairs.py). Factors:
  * the pooled token: an appended `<|endoftext|>` (id 0, SmolLM2's document separator; what
    `Embedder` appended for every decoder), SmolLM2's end-of-turn `<|im_end|>`, or no appended token
    (the last real token, what sentence-transformers' lasttoken pooling reads);
  * the loss: the report's Eq. 1 (q-q, d-d, q-d_j, margin 0.1, tau 0.1) or in-batch InfoNCE
    (q-d_j only, no margin, tau 0.05: MNRL's objective);
  * warmup.
The training metrics (loss, pos_sim, neg_sim per step) show whether the embeddings collapsed.
The pooled token is set on the Embedder for training and evaluation alike (a patch of the loaded
spec in the child process), so nothing else differs between variants.

    python bench/train_decoder_ablation.py [--only NAME,...] [--threads 1]

Results: bench/results/train_decoder_ablation.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from train_realpairs import RESULTS, gettext_pairs, machine, per_query_ndcg, summary, write_results

EQ1 = {"terms": ["hard", "qq", "dd", "qd"], "margin": 0.1, "temperature": 0.1}
INFONCE = {"terms": ["qd"], "margin": None, "temperature": 0.05}
NO_EOS = {"append_eos": False}
IM_END = {"eos_token": "<|im_end|>"}
VARIANTS = {
    "appended <|endoftext|>, Eq. 1": ({}, {"loss": EQ1}),
    "appended <|endoftext|>, InfoNCE": ({}, {"loss": INFONCE}),
    "appended <|endoftext|>, InfoNCE, warmup 3": ({}, {"loss": INFONCE, "warmup_steps": 3}),
    "appended <|im_end|>, InfoNCE": (IM_END, {"loss": INFONCE}),
    "last real token, Eq. 1": (NO_EOS, {"loss": EQ1}),
    "last real token, InfoNCE": (NO_EOS, {"loss": INFONCE}),
}


def pin_pooling(spec_values: dict) -> None:
    """Every Embedder built in this process pools as `spec_values` say (training and evaluation)."""
    from embedforge import embedder as module

    if not spec_values:
        return
    original = module.Embedder.__init__

    def init(self, model, tokenizer, spec, *, name=""):
        for key, value in spec_values.items():
            setattr(spec, key, value)
        original(self, model, tokenizer, spec, name=name)

    module.Embedder.__init__ = init


def run_variant(name: str, args) -> dict:
    import torch

    from embedforge import Embedder
    from embedforge.offline_models import smollm2_folder
    from embedforge.train.config import TrainConfig
    from embedforge.train.trainer import train

    torch.set_num_threads(args.threads)
    spec_values, overrides = VARIANTS[name]
    pin_pooling(spec_values)
    rows, test = gettext_pairs(2000, args.test_queries, args.test_docs)
    out = Path(tempfile.mkdtemp(prefix="ablation-"))
    cfg = TrainConfig.model_validate({
        "model": str(smollm2_folder()), "method": "full", "output_dir": str(out), "data": [{"path": "pairs"}],
        "batch_size": 16, "max_steps": 30, "lr": 2e-5, "max_length": 64, "save_steps": 0, "progress_bar": False,
        "warmup_steps": 0, "append_eos": spec_values.get("append_eos", True), **overrides,
    })
    started = time.perf_counter()
    result = train(cfg, inline_data={"pairs": rows})
    train_s = time.perf_counter() - started
    embedder = Embedder.from_pretrained(result.final_dir, dtype="float32", device="cpu", max_length=64)
    after = summary(per_query_ndcg(lambda texts, q: embedder.encode(texts, batch_size=32), test))
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if '"loss"' in x]
    trace = {key: [round(x[key], 3) for x in lines] for key in ("loss", "pos_sim", "neg_sim", "grad_norm")}
    return {"name": name, "after": after, "train_s": train_s, "trace": trace, "warnings": result.warnings}


def base_scores(args) -> dict:
    """nDCG@10 of the untrained model under each pooled token."""
    import torch

    from embedforge import Embedder
    from embedforge.offline_models import smollm2_folder

    torch.set_num_threads(args.threads)
    _, test = gettext_pairs(2000, args.test_queries, args.test_docs)
    out = {}
    for label, values in (("appended <|endoftext|>", {}), ("appended <|im_end|>", IM_END), ("last real token", NO_EOS)):
        embedder = Embedder.from_pretrained(str(smollm2_folder()), dtype="float32", device="cpu", max_length=64)
        for key, value in values.items():
            setattr(embedder.spec, key, value)
        if "eos_token" in values:
            embedder._eos_id = embedder.tokenizer.convert_tokens_to_ids(values["eos_token"])
        out[label] = summary(per_query_ndcg(lambda texts, q, e=embedder: e.encode(texts, batch_size=32), test))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("command", nargs="?", default="all", choices=["all", "_variant", "_base"])
    parser.add_argument("--name", default="")
    parser.add_argument("--only", default="", help="comma-separated variant names (default: all)")
    parser.add_argument("--test-queries", type=int, default=200)
    parser.add_argument("--test-docs", type=int, default=400)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    if args.command == "_variant":
        print(json.dumps(run_variant(args.name, args)))
        return
    if args.command == "_base":
        print(json.dumps(base_scores(args)))
        return
    previous = RESULTS / "train_decoder_ablation.json"
    report = json.loads(previous.read_text()) if previous.exists() else {"runs": {}}
    report.update({"machine": machine(args.threads), "settings": vars(args)})
    common = [f"--test-queries={args.test_queries}", f"--test-docs={args.test_docs}", f"--threads={args.threads}"]
    if "base" not in report:
        report["base"] = child([sys.executable, __file__, "_base", *common])
    names = [n for n in VARIANTS if not args.only or n in args.only.split(",")]
    for name in names:
        report["runs"][name] = child([sys.executable, __file__, "_variant", f"--name={name}", *common])
        write_results("train_decoder_ablation", report, markdown(report))
        print(f"{name}: nDCG@10 {report['runs'][name]['after']['ndcg_at_10']:.3f}", flush=True)
    write_results("train_decoder_ablation", report, markdown(report))


def child(command: list[str]) -> dict:
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode:
        raise SystemExit(done.stderr[-3000:])
    return json.loads(done.stdout.strip().splitlines()[-1])


def markdown(r: dict) -> str:
    s = r["settings"]
    lines = [
        "# SmolLM2 collapse: one factor at a time",
        "",
        (f"Machine: {r['machine']['description']}. SmolLM2-135M-Instruct, full fine-tuning, 30 steps of 16 real "
         f"German -> English message pairs, lr 2e-5, max length 64; nDCG@10 on {s['test_queries']} unseen real "
         f"queries over {s['test_docs']} passages (95% bootstrap CI). Eq. 1: q-q, d-d, q-d_j, margin 0.1, tau 0.1. "
         "InfoNCE: q-d_j, no margin, tau 0.05. Script: bench/train_decoder_ablation.py."),
        "",
        "Untrained model: " + "; ".join(f"{k} {v['ndcg_at_10']:.3f} [{v['ci95'][0]:.3f}, {v['ci95'][1]:.3f}]"
                                        for k, v in r.get("base", {}).items()) + ".",
        "",
        ("| variant | nDCG@10 after [95% CI] | loss step 1 -> last | pos_sim step 1, 5, last | neg_sim last | "
         "grad norm step 1 | collapse warning |"),
        "|---|---|---|---|---|---|---|",
    ]
    for name, run in r["runs"].items():
        t, a = run["trace"], run["after"]
        neg = f"{t['neg_sim'][-1]:.3f}" if t.get("neg_sim") else ""
        warned = "yes" if any("collapsed" in w for w in run.get("warnings", [])) else "no"
        lines.append(f"| {name} | {a['ndcg_at_10']:.3f} [{a['ci95'][0]:.3f}, {a['ci95'][1]:.3f}] | "
                     f"{t['loss'][0]:.2f} -> {t['loss'][-1]:.2f} | {t['pos_sim'][0]:.3f}, {t['pos_sim'][4]:.3f}, "
                     f"{t['pos_sim'][-1]:.3f} | {neg} | {t['grad_norm'][0]:.0f} | {warned} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()

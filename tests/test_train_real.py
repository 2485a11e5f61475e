"""A real model improves on real data nobody here wrote: MiniLM (all-MiniLM-L6-v2) fine-tuned on
Python standard-library code search (docstring summary -> function body), evaluated on held-out
stdlib packages with trec_eval-exact nDCG@10 before and after. Slow (real model on CPU)."""

from __future__ import annotations

import sysconfig
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.slow

HELD_OUT_PACKAGES = ["asyncio", "email", "json", "logging", "http", "urllib", "xml", "concurrent", "importlib",
                     "unittest"]


def stdlib_packages() -> list[str]:
    root = Path(sysconfig.get_paths()["stdlib"])
    modules = {p.stem for p in root.glob("*.py")}
    modules |= {p.name for p in root.iterdir() if p.is_dir() and (p / "__init__.py").exists()}
    return sorted(modules)


def training_rows(n: int) -> list[dict]:
    """Pairs from the packages that are NOT held out (no query or function is shared with the test)."""
    from embedforge.eval.real_data import stdlib_code_search

    packages = [p for p in stdlib_packages() if p not in HELD_OUT_PACKAGES]
    data = stdlib_code_search(n_queries=n, n_docs=n, packages=packages, seed=0, max_chars=600)
    return [{"query": text, "positive": data.corpus[next(iter(data.qrels[qid]))]} for qid, text in data.queries.items()]


def test_minilm_improves_on_held_out_stdlib_code_search(minilm, tmp_path):
    from embedforge import Embedder
    from embedforge.eval.real_data import stdlib_code_search
    from embedforge.eval.retrieval import evaluate_retrieval
    from embedforge.train.config import TrainConfig
    from embedforge.train.trainer import train

    torch.set_num_threads(1)
    test = stdlib_code_search(n_queries=100, n_docs=300, packages=HELD_OUT_PACKAGES, seed=0, max_chars=600)

    def ndcg(folder) -> float:
        embedder = Embedder.from_pretrained(folder, max_length=96)
        return evaluate_retrieval(embedder, test, batch_size=64)["metrics"]["ndcg_at_10"]

    rows = training_rows(320)
    assert not {r["query"] for r in rows} & set(test.queries.values())
    before = ndcg(minilm)
    cfg = TrainConfig.model_validate({
        "model": str(minilm), "method": "full", "output_dir": str(tmp_path / "out"),
        "data": [{"path": "stdlib", "num_negatives": 0}], "batch_size": 16, "mini_batch_size": 16,
        "max_steps": 30, "lr": 1e-4, "warmup_steps": 2, "max_length": 96, "save_steps": 0, "progress_bar": False,
        "loss": {"temperature": 0.05},
    })
    # 30 steps: at 20, dropout's draws alone moved the gain between +0.010 and +0.037 over three seeds
    # (and with how a step is cut into forwards, which changes the draws); at 30: +0.034 (seed 42, the
    # default), +0.051 (seed 0).
    result = train(cfg, inline_data={"stdlib": rows})
    after = ndcg(result.final_dir)
    print(f"held-out stdlib nDCG@10: {before:.4f} -> {after:.4f}")
    assert after > before + 0.02, (before, after)

"""Reranker distillation through the trainer (`loss.distill`): rows' `teacher_scores` are read and
checked (JSONL and Arrow), follow the subsampled negatives through collation, and one trainer step
adds `weight * distillation` to the InfoNCE exactly as train/distill.py and train/losses.py compute
it on the same embeddings (margin-MSE and KL checked against float64 transcriptions of their
formulas); GradCache chunks give the one-forward gradients; `teacher_temperature: auto` is the
spread ratio of the teacher's and the base model's margins on the training rows.

Tiny random Qwen3 only, one thread."""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from train_workers.precision import relative_error, reorder_rtol, transformer_terms
from train_workers.toy_data import config, toy_rows

from embedforge.errors import ConfigError, InputError
from embedforge.train.config import DatasetSettings
from embedforge.train.data import MixingSampler, contrastive_texts, load_sources
from embedforge.train.stores import scan
from embedforge.train.trainer import Trainer, train

TAU = 0.05  # the default loss preset's temperature (infonce)


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)


def scored_rows(n: int, negatives: int = 3, seed: int = 0) -> list[dict]:
    """toy_rows with teacher log-odds: the positive around +3, negatives around -1, one missing (None)."""
    rng = random.Random(seed + 1)
    rows = toy_rows(n, negatives, seed)
    for i, row in enumerate(rows):
        row["teacher_scores"] = [rng.gauss(3, 1.5)] + [rng.gauss(-1, 2) for _ in row["negatives"]]
        if i % 5 == 1:
            row["teacher_scores"][2] = None
    return rows


def write_jsonl(path, rows) -> str:
    with open(path, "w", encoding="utf-8") as fh:
        fh.writelines((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows)
    return str(path)


@pytest.fixture(scope="module")
def scored_path(tmp_path_factory):
    return write_jsonl(tmp_path_factory.mktemp("distill") / "scored.jsonl", scored_rows(40))


def score_of(raw: dict, text: str) -> float:
    """The teacher score a raw JSON row gives `text` (its positive or one of its negatives)."""
    if text == raw["positive"]:
        value = raw["teacher_scores"][0]
    else:
        value = raw["teacher_scores"][1 + raw["negatives"].index(text)]
    return math.nan if value is None else value


def same(a: list[float], b: list[float]) -> bool:
    return len(a) == len(b) and all((math.isnan(x) and math.isnan(y)) or x == y for x, y in zip(a, b))


# --- (a) reading and collation ---------------------------------------------------------------------


def test_teacher_scores_are_read_and_follow_the_subsampled_negatives(tmp_path):
    import datasets

    raw = [
        {"query": "q0", "positive": "p0", "negatives": ["a", "b", "c", "d", "e"], "teacher_scores": [5, 1, None, 2.5,
                                                                                                   float("nan"), -3]},
        # a repeated negative, an empty one and the positive itself are dropped with their scores
        {"query": "q1", "positive": "p1", "negatives": ["f", "f", "", "p1", "g", "h", "i"],
         "teacher_scores": [4, 0.5, 9, 9, 9, -1, -2, -4]},
        {"query": "q2", "positive": "p2", "negatives": ["j", "k", "l", "m"]},  # no teacher scores
        {"query": "q3", "positive": "p3", "negatives": ["n", "o", "p", "q"], "teacher_scores": [1, 2, 3, 4, 5]},
    ]
    expected = [(5.0, 1.0, math.nan, 2.5, math.nan, -3.0), (4.0, 0.5, -1.0, -2.0, -4.0), None,
                (1.0, 2.0, 3.0, 4.0, 5.0)]
    path = write_jsonl(tmp_path / "t.jsonl", raw)
    datasets.Dataset.from_list(raw).to_parquet(str(tmp_path / "t.parquet"))
    for source in (path, str(tmp_path / "t.parquet")):
        store = scan(source).store
        for i, want in enumerate(expected):
            got = store[i].teacher_scores
            assert (got is None) if want is None else same(list(got), list(want)), (source, i, got)

    sources, _ = load_sources([DatasetSettings(path=path, num_negatives=3)])
    sampler = MixingSampler(sources, 4, seed=7)
    by_query = {r["query"]: r for r in raw}
    subsampled = False
    for _ in range(3):
        batch = sampler.next_batch()
        texts = contrastive_texts(batch, seed=7)
        for q, pos, negs, scores in zip(texts.queries, texts.positives, texts.negatives, texts.teacher_scores):
            row = by_query[q]
            want = ([math.nan] * (1 + len(negs)) if "teacher_scores" not in row
                    else [score_of(row, t) for t in [pos, *negs]])
            assert same(scores, want), (q, negs, scores)
            subsampled |= negs != [n for n in row["negatives"] if n and n != pos][:3]
        assert [len(s) for s in texts.teacher_scores] == [1 + len(n) for n in texts.negatives]
        sliced = texts.slice(1, 3)
        assert sliced.teacher_scores == texts.teacher_scores[1:3]
    assert subsampled  # the alignment was checked on sampled negatives, not only on the first three


@pytest.mark.parametrize(("value", "message"), [
    ("x", "expected a list of numbers, got str"),
    ([1, 2], "expected 4 scores"),
    ([1, 2, "3", 4], "element 2: expected a finite number"),
    ([1, True, 3, 4], "element 1: expected a finite number"),
    ([1, 2, 3, 1e999], "element 3: expected a finite number"),
])
def test_a_bad_teacher_score_is_one_line_naming_file_line_and_field(tmp_path, value, message):
    good = scored_rows(1)[0]
    bad = {"query": "q", "positive": "p", "negatives": ["a", "b", "c"], "teacher_scores": value}
    path = write_jsonl(tmp_path / "bad.jsonl", [good, json.dumps(bad).replace("1e+999", "Infinity")])
    with pytest.raises(InputError) as info:
        load_sources([DatasetSettings(path=path)])
    text = str(info.value)
    assert "\n" not in text and text.startswith(f"{path}:2: field 'teacher_scores'") and message in text


def test_the_trainer_reports_a_bad_teacher_score_before_training(tiny_qwen3_embedder, tmp_path):
    bad = {"query": "q", "positive": "p", "negatives": ["a"], "teacher_scores": [1.0]}
    path = write_jsonl(tmp_path / "bad.jsonl", [*scored_rows(5), bad])
    with pytest.raises(InputError, match=r"bad\.jsonl:6: field 'teacher_scores': expected 2 scores"):
        train(config(tiny_qwen3_embedder, path, tmp_path / "out", loss={"distill": {"kind": "margin_mse"}}))


# --- (b) one step: loss = InfoNCE + weight * distillation -------------------------------------------


def reference_parts(trainer: Trainer, batch, raw: dict[str, dict], kind: str):
    """InfoNCE (train/losses.py) and the distillation loss transcribed in float64 from its formula,
    on embeddings of the batch's texts by the model before the step."""
    from embedforge.train.losses import EmbeddingBatch, Qwen3InfoNCEConfig, qwen3_infonce, text_hashes

    cfg, holder = trainer.cfg, trainer.holder
    texts = contrastive_texts(batch, cfg.seed)
    n, k = len(texts.queries), texts.k
    flat = texts.queries + texts.positives + [t for row in texts.negatives for t in row]
    with torch.no_grad():
        rows = holder.token_ids(flat, instruction=texts.instructions + [None] * (len(flat) - n),
                                max_length=cfg.max_length)
        e = holder.embed(holder.batch(rows))
    d_neg = torch.zeros(n, k, e.shape[1])
    mask = torch.zeros(n, k, dtype=torch.bool)
    neg_ids = torch.zeros(n, k, dtype=torch.long)
    at = 2 * n
    for i, row in enumerate(texts.negatives):
        d_neg[i, :len(row)] = e[at:at + len(row)]
        mask[i, :len(row)] = True
        neg_ids[i, :len(row)] = text_hashes(row)
        at += len(row)
    batch_e = EmbeddingBatch(q=e[:n], d_pos=e[n:2 * n], d_neg=d_neg, neg_mask=mask, q_ids=text_hashes(texts.queries),
                             pos_ids=text_hashes(texts.positives), neg_ids=neg_ids)
    infonce = qwen3_infonce(batch_e, Qwen3InfoNCEConfig(temperature=TAU, use_hard_negatives=True, use_qq=False,
                                                        use_dd=False, use_qd=True, margin=None)).loss

    t_t = cfg.loss.distill.teacher_temperature
    q = e[:n].double().numpy()
    per_row, worst = [], 0.0
    for i, (query, pos, negs) in enumerate(zip(texts.queries, texts.positives, texts.negatives)):
        docs = e[n + i:n + i + 1].double().numpy().tolist() + d_neg[i, :len(negs)].double().numpy().tolist()
        s = np.array(docs) @ q[i] / TAU  # unit vectors: cosine / tau
        t = np.array([score_of(raw[query], d) for d in [pos, *negs]]) / t_t
        keep = [j for j in range(len(negs)) if np.isfinite(t[0]) and np.isfinite(t[1 + j])]
        if kind == "margin_mse":
            diffs = [(s[0] - s[1 + j]) - (t[0] - t[1 + j]) for j in keep]
            per_row.append(np.mean(np.square(diffs)) if keep else 0.0)
            worst = max([worst, *map(abs, diffs)])
        else:
            cand = [0, *[1 + j for j in keep]]
            p_t = np.exp(t[cand] - np.logaddexp.reduce(t[cand]))
            log_ps = s[cand] - np.logaddexp.reduce(s[cand])
            per_row.append(float(np.sum(p_t * (np.log(p_t) - log_ps))))
    return float(infonce), float(np.mean(per_row)), worst, max(len(ids) for ids in rows)


@pytest.mark.parametrize(("kind", "infonce"), [("margin_mse", True), ("kl", False)])
def test_one_step_loss_is_infonce_plus_weighted_distillation(tiny_qwen3_embedder, scored_path, tmp_path, kind,
                                                             infonce):
    weight = 0.5
    cfg = config(tiny_qwen3_embedder, scored_path, tmp_path / "out", max_tokens_per_forward=None,
                 loss={"distill": {"kind": kind, "weight": weight, "teacher_temperature": 2.0, "infonce": infonce}})
    trainer = Trainer(cfg)
    trainer.setup()
    batch = trainer.sampler.next_batch()
    raw = {r["query"]: r for r in scored_rows(40)}
    ref_infonce, ref_distill, worst, longest = reference_parts(trainer, batch, raw, kind)
    loss, stats, _ = trainer.backward(batch)

    # float32 embeddings of the same texts, forwarded in another order: each entry within
    # eps = 2 gamma_n (train_workers/precision.py), so a cosine of two unit vectors of width D within
    # 2 sqrt(D) eps, and a logit (cosine / tau) within `logit`. -log softmax and the KL move by at most
    # 2 * logit (their gradients in the logits sum to <= 2 in absolute value); a squared margin
    # difference, whose margins move by <= 2 * logit, by 2 * worst * 2 * logit + (2 * logit)^2.
    eps = reorder_rtol(torch.float32, transformer_terms(longest, tiny_qwen3_embedder))
    logit = 2 * math.sqrt(trainer.holder.dimension) * eps / TAU
    tol_infonce = 2 * logit
    tol_distill = 4 * worst * logit + 4 * logit**2 if kind == "margin_mse" else 2 * logit
    assert float(stats["infonce_loss"]) == pytest.approx(ref_infonce, abs=tol_infonce)
    assert float(stats["distill_loss"]) == pytest.approx(ref_distill, abs=tol_distill)
    want = (ref_infonce if infonce else 0.0) + weight * ref_distill
    tol_total = (tol_infonce if infonce else 0.0) + weight * tol_distill
    assert weight * ref_distill > 2 * tol_total  # a dropped or unweighted distillation term would fail below
    assert float(loss) == pytest.approx(want, abs=tol_total)
    assert float(loss) == pytest.approx((float(stats["infonce_loss"]) if infonce else 0.0)
                                        + weight * float(stats["distill_loss"]), rel=1e-6)


# --- (c) GradCache chunks give the one-forward gradients ------------------------------------------------


def first_step_gradients(cfg) -> tuple[float, dict[str, torch.Tensor], int]:
    trainer = Trainer(cfg)
    trainer.setup()
    loss, _, tokens = trainer.backward(trainer.sampler.next_batch())
    grads = {n: p.grad.detach().clone() for n, p in trainer.model.named_parameters() if p.grad is not None}
    return float(loss), grads, tokens


def test_gradcache_chunks_give_the_plain_gradients_with_distillation(tiny_qwen3_embedder, scored_path, tmp_path,
                                                                     monkeypatch):
    import embedforge.train.gradcache

    chunked = []
    real = embedforge.train.gradcache.gradcache_step
    monkeypatch.setattr(embedforge.train.gradcache, "gradcache_step", lambda *a, **k: chunked.append(1) or real(*a, **k))
    base = {"method": "lora", "lora": {"rank": 4}, "packing": False, "max_tokens_per_forward": None,
            "loss": {"distill": {"kind": "margin_mse", "weight": 0.5, "teacher_temperature": 2.0}}}
    plain_loss, plain, tokens = first_step_gradients(config(tiny_qwen3_embedder, scored_path, tmp_path / "a", **base))
    # Same float32 sums in other orders (precision.py), read through 1/tau-scaled logits, as in
    # tests/test_train_trainer.py; compared over the whole gradient.
    tolerance = reorder_rtol(torch.float32, transformer_terms(tokens, tiny_qwen3_embedder)) / TAU
    _, without, _ = first_step_gradients(config(tiny_qwen3_embedder, scored_path, tmp_path / "o",
                                                **{**base, "loss": {}}))
    assert relative_error(plain, without) > 100 * tolerance  # the distillation term reaches the gradients
    assert not chunked
    for extra in ({"mini_batch_size": 3}, {"max_tokens_per_forward": 64}):
        chunked.clear()
        loss, grads, _ = first_step_gradients(config(tiny_qwen3_embedder, scored_path, tmp_path / "b",
                                                     **{**base, **extra}))
        assert chunked
        assert loss == pytest.approx(plain_loss, rel=tolerance)
        assert set(grads) == set(plain) and relative_error(plain, grads) <= tolerance


# --- teacher_temperature: auto ------------------------------------------------------------------------


def test_auto_teacher_temperature_matches_the_margin_spreads_of_the_training_rows(tiny_qwen3_embedder, scored_path,
                                                                                   tmp_path):
    from embedforge import Embedder
    from embedforge.train.task_embedding import EmbeddingTask

    cfg = config(tiny_qwen3_embedder, scored_path, tmp_path / "out", loss={"distill": {"kind": "margin_mse"}})
    sources, _ = load_sources(cfg.data)
    # float64 weights: the random tiny model's margins spread by ~1e-3 of a cosine, below a float32
    # forward's worst-case rounding bound; in float64 only `embed`'s final cast to float32 remains.
    holder = Embedder.from_pretrained(tiny_qwen3_embedder, dtype=torch.float64)
    resolved, decisions = EmbeddingTask().resolve(cfg, holder, sources)
    value = resolved.loss.distill.teacher_temperature
    assert any(line.startswith(f"distill teacher_temperature {value:.4g}") for line in decisions)

    # Reference: all 40 rows (fewer than the 128 sampled), each with its first num_negatives (2)
    # negatives, embedded by `encode`, margins in numpy float64, the ratio of sample standard deviations.
    rows, k = scored_rows(40), cfg.data[0].num_negatives
    q = holder.encode([r["query"] for r in rows], instruction=cfg.data[0].instruction)
    docs = holder.encode([d for r in rows for d in [r["positive"], *r["negatives"][:k]]]).reshape(len(rows), 1 + k, -1)
    cos = np.einsum("nd,nkd->nk", q.astype(np.float64), docs.astype(np.float64))
    teacher = np.array([[math.nan if v is None else v for v in r["teacher_scores"][:1 + k]] for r in rows])
    usable = np.isfinite(teacher[:, 1:]) & np.isfinite(teacher[:, :1])
    t_margins = (teacher[:, :1] - teacher[:, 1:])[usable]
    s_margins = ((cos[:, :1] - cos[:, 1:]) / TAU)[usable]
    expected = t_margins.std(ddof=1) / s_margins.std(ddof=1)
    # Both computations end in float64 embeddings rounded once to float32 (a relative 2^-24 per
    # entry; float64 reordering is negligible beside it): a cosine of unit vectors of width D moves by
    # <= 2 sqrt(D) 2^-24, a margin by twice that over tau, and so does the margins' std; the ratio's
    # relative error is at most that over the std (first order), doubled for the two computations.
    margin = 2 * 2 * 2 * math.sqrt(holder.dimension) * 2.0**-24 / TAU
    assert value == pytest.approx(expected, rel=margin / s_margins.std(ddof=1))


def test_auto_teacher_temperature_without_teacher_scores_says_so(tiny_qwen3_embedder, tmp_path):
    from embedforge import Embedder
    from embedforge.train.task_embedding import EmbeddingTask

    path = write_jsonl(tmp_path / "plain.jsonl", toy_rows(8))
    cfg = config(tiny_qwen3_embedder, path, tmp_path / "out", loss={"distill": {"kind": "kl"}})
    sources, _ = load_sources(cfg.data)
    with pytest.raises(ConfigError, match="8 sampled training rows give 0 teacher-scored pairs"):
        EmbeddingTask().resolve(cfg, Embedder.from_pretrained(tiny_qwen3_embedder), sources)


def test_the_trainer_resolves_auto_teacher_temperature(tiny_qwen3_embedder, scored_path, tmp_path):
    result = train(config(tiny_qwen3_embedder, scored_path, tmp_path / "out", max_steps=1,
                          loss={"distill": {"kind": "margin_mse"}}))
    assert any(line.startswith("distill teacher_temperature") for line in result.decisions)
    assert "distill_loss" in result.last_metrics and "infonce_loss" in result.last_metrics


# --- two processes: each distils its own rows of the gathered batch ---------------------------------------


@pytest.mark.distributed
def test_two_processes_distil_like_one(tiny_qwen3_embedder, tmp_path):
    """DDP on 2 CPU processes with margin-MSE on (and GradCache chunks): the loss, gradient norm and
    weights of the one-process run on the same batches, within test_train_distributed.py's bounds. A
    process pairing its rows with teacher scores of other rows of the global batch (scores not in the
    gathered order) changes the loss far beyond them."""
    from test_train_distributed import (
        accelerate_launch,
        assert_same_steps,
        assert_same_weights,
        metric_lines,
        reference_run,
        tensors,
        write_recipe,
    )

    recipe = write_recipe(tmp_path, tiny_qwen3_embedder, "full", steps=2, save_steps=0)
    write_jsonl(tmp_path / "train.jsonl", scored_rows(48))  # the recipe's data, now with teacher scores
    recipe.write_text(recipe.read_text().replace(
        "loss: {preset: qwen3, matryoshka_dims: [16, 64]}",
        "loss: {preset: qwen3, matryoshka_dims: [16, 64], distill: {kind: margin_mse, teacher_temperature: 2.0}}"))
    reference = reference_run(recipe, tmp_path / "one")
    accelerate_launch(["--multi_gpu"], recipe, tmp_path / "two")
    records = metric_lines(tmp_path / "one")
    assert all(r["distill_loss"] > 0 for r in records)
    assert_same_steps(tiny_qwen3_embedder, records, metric_lines(tmp_path / "two"))
    assert_same_weights(tiny_qwen3_embedder, tensors(tiny_qwen3_embedder / "model.safetensors"),
                        tensors(Path(reference.final_dir) / "model.safetensors"),
                        tensors(tmp_path / "two" / "final" / "model.safetensors"), records)

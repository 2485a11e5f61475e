"""The provenance trail read back for the model card: what the model was trained on, how, and how it
measured, as rows a template can print.

Each stage writes its own record (embedforge.provenance); the keys read here are the ones those
records carry. Unknown keys are still shown (flattened), so a stage that records more appears in
the card without a change here.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

from embedforge.provenance import find_stage

METRIC_TITLES = {"ndcg_at_10": "nDCG@10", "mrr_at_10": "MRR@10", "recall_at_10": "Recall@10",
                 "recall_at_100": "Recall@100", "map_at_100": "MAP@100", "main_score": "main score"}
SMALL_EVAL = 100  # fewer queries than this cannot separate models by a few points (95% CI half-width > ~0.05)


def display(value: Any, limit: int = 160) -> str:
    """A short printable form of a record value."""
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, (dict, list)):
        text = json.dumps(value, ensure_ascii=False, default=str, sort_keys=isinstance(value, dict))
    else:
        text = str(value)
    return text if len(text) <= limit else text[: limit - 1] + "…"


def flatten(record: dict[str, Any], prefix: str = "", skip: tuple[str, ...] = ("stage",)) -> list[tuple[str, str]]:
    """(dotted key, printable value) for every leaf of a record, nested dicts walked."""
    rows: list[tuple[str, str]] = []
    for key, value in record.items():
        if key in skip or value is None or value == [] or value == {}:
            continue
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            rows += flatten(value, f"{name}.", skip=())
        else:
            rows.append((name, display(value)))
    return rows


def is_hub_id(text: str | None) -> bool:
    """`org/name` that is not a local path (a Hub id the card may link)."""
    if not text or os.path.exists(text) or text.startswith(("/", ".", "~")) or "builtin:" in text:
        return False
    parts = text.split("/")
    return len(parts) == 2 and all(parts)


def short_name(path_or_id: str) -> str:
    """The last meaningful component of a model path (`runs/x/train/work/final` -> `train/work/final`)."""
    parts = [p for p in Path(str(path_or_id).rstrip("/")).parts if p not in ("/",)]
    return "/".join(parts[-3:]) if len(parts) > 1 else (parts[0] if parts else str(path_or_id))


def base_model_of(trail: list[dict[str, Any]]) -> str | None:
    """The backbone a training run started from, as recorded by train (`base_model`, else `config.model`)."""
    for record in trail:
        if record.get("stage") != "train":
            continue
        config = record.get("config") or {}
        for candidate in (record.get("base_model"), config.get("base_model"), config.get("model")):
            if candidate:
                return str(candidate)
    return None


def _short(value: Any) -> Any:
    """Local paths shortened to their last components; other values as they are."""
    if isinstance(value, str) and value.startswith(("/", "~", "./")):
        return short_name(value)
    if isinstance(value, dict):
        return {k: _short(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_short(v) for v in value]
    return value


def _get(record: dict[str, Any], *keys: str) -> Any:
    value: Any = record
    for key in keys:
        value = value.get(key) if isinstance(value, dict) else None
    return value


def _rows(pairs: list[tuple[str, Any]]) -> list[tuple[str, str]]:
    return [(label, display(_short(value))) for label, value in pairs if value not in (None, [], {}, "")]


def _gates(record: dict[str, Any]) -> str | None:
    gates = record.get("gates")
    if isinstance(gates, list):
        return ", ".join(f"{g.get('gate')} {g.get('rows_in')}→{g.get('rows_out')}"
                         + (f" (≥ {g['threshold']:.4g})" if isinstance(g.get("threshold"), (int, float)) else "")
                         for g in gates if isinstance(g, dict))
    return display(gates) if gates else None


def _summary(record: dict[str, Any]) -> list[tuple[str, str]]:
    """The few facts of a stage record a reader of the card needs, in words."""
    stage = record.get("stage")
    if stage == "corpus":
        return _rows([("corpus", record.get("description") or record.get("source")),
                      ("passages", record.get("passages")), ("real queries", record.get("real_queries"))])
    if stage == "synth":
        generator = record.get("generator")
        if isinstance(generator, dict):
            generator = f"{short_name(str(generator.get('model')))} ({generator.get('backend')})"
        templates = record.get("templates")
        if isinstance(templates, dict):
            templates = ", ".join(f"{k}@v{v.get('version')}" if isinstance(v, dict) else k for k, v in templates.items())
        quality = record.get("quality") or {}
        return _rows([
            ("generator", generator), ("prompt strategy", record.get("strategy") or record.get("prompt_strategy")),
            ("decoding", record.get("decoding")), ("prompt templates", templates),
            ("tasks", _get(record, "sampling", "tasks")), ("languages", _get(record, "sampling", "languages")),
            ("generator passages", _get(record, "corpus", "passages")),
            ("corpus fingerprint", (_get(record, "corpus", "texts_sha256") or record.get("corpus_fingerprint") or "")[:16]),
            ("synthetic pairs", _get(record, "counts", "rows") or record.get("rows")),
            ("schema-valid replies", quality.get("schema_valid_rate")),
            ("on-topic queries", f"{quality['on_topic_rate']:.2%} (random {quality.get('on_topic_random_baseline', 0):.0%})"
             if isinstance(quality.get("on_topic_rate"), (int, float)) else None),
        ])
    if stage == "filter":
        return _rows([("teacher", record.get("teacher")), ("gates (rows in→out)", _gates(record)),
                      ("pairs kept", f"{record['rows_kept']} of {record['rows_in']}"
                       if "rows_kept" in record and "rows_in" in record else None)])
    if stage == "split":
        return _rows([("held-out passages", record.get("heldout_passages")),
                      ("held-out queries", record.get("heldout_queries")), ("training pairs", record.get("train_pairs"))])
    if stage == "mine":
        settings = record.get("settings") or {}
        rank = (f"{settings['rank_start']}–{settings['rank_end']}" if "rank_start" in settings
                else settings.get("rank_range"))
        return _rows([("miner", record.get("model") or settings.get("model")),
                      ("negatives per query", settings.get("num_negatives")), ("rank range", rank),
                      ("false-negative margin", settings.get("margin")),
                      ("negatives mined", _get(record, "counts", "negatives"))])
    return flatten(_short(record), skip=("stage", "warnings"))[:12]


def data_rows(trail: list[dict[str, Any]]) -> list[tuple[str, str]]:
    """The training data: corpus, generator, prompts, gates, split, mining."""
    rows: list[tuple[str, str]] = []
    for stage in ("corpus", "synth", "filter", "split", "mine"):
        record = find_stage(trail, stage)
        if record is not None:
            rows += [(f"{stage}: {label}", value) for label, value in _summary(record)]
    return rows


def training_rows(trail: list[dict[str, Any]]) -> list[tuple[str, str]]:
    record = find_stage(trail, "train")
    if record is None:
        return []
    config = record.get("config") or {}
    loss = config.get("loss") or {}
    lora = config.get("lora") or {}
    data = record.get("data")
    return _rows([
        ("backbone", config.get("model")), ("task", config.get("task")), ("method", config.get("method")),
        ("LoRA", f"r {lora.get('r')}, alpha {lora.get('alpha', lora.get('lora_alpha'))}"
         if config.get("method") == "lora" and lora.get("r") else None),
        ("loss", ", ".join(f"{k} {v}" for k, v in loss.items() if v not in (None, [], {}))),
        ("learning rate", config.get("lr")), ("batch size", config.get("batch_size")),
        ("max length", config.get("max_length")), ("steps", record.get("steps")),
        ("training data", [d.get("name") or d for d in data] if isinstance(data, list) else data),
        ("final metrics", record.get("final_metrics")),
    ]) + ([] if config else flatten(_short(record), skip=("stage", "warnings")))


def merge_rows(trail: list[dict[str, Any]]) -> list[tuple[str, str]]:
    record = find_stage(trail, "merge")
    if record is None:
        return []
    return _rows([(key, value) for key, value in record.items() if key not in ("stage", "warnings")])


def trail_warnings(trail: list[dict[str, Any]]) -> list[str]:
    return [f"{r.get('stage')}: {w}" for r in trail for w in (r.get("warnings") or [])]


def interval(result: dict[str, Any], metric: str) -> tuple[float, float] | None:
    """The 95% interval of a metric: `ci95[metric] = [low, high]` (or `{"low", "high"}`)."""
    for key in ("ci95", "ci", "intervals"):
        table = result.get(key)
        if isinstance(table, dict) and metric in table:
            value = table[metric]
            if isinstance(value, dict):
                value = (value.get("low"), value.get("high"))
            if isinstance(value, (list, tuple)) and len(value) == 2 and all(
                    isinstance(v, (int, float)) and math.isfinite(v) for v in value):
                return float(value[0]), float(value[1])
    return None


def dataset_name(result: dict[str, Any]) -> str:
    """A data set's name, never a local path: `data_name`, else the folder's name."""
    if result.get("data_name"):
        return str(result["data_name"])
    data = str(result.get("data", "unknown")).rstrip("/")
    return Path(data).name or data


def eval_results(trail: list[dict[str, Any]], files: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Every result: those recorded by eval stages in the trail, then those given as files."""
    results: list[dict[str, Any]] = []
    for record in trail:
        if record.get("stage") != "eval":
            continue
        items = record.get("results")
        results += items if isinstance(items, list) else [{k: v for k, v in record.items() if k != "stage"}]
    results += files
    seen, unique = set(), []
    for result in results:  # an eval's record and its results file describe the same run once
        key = json.dumps([result.get("label") or result.get("model"), dataset_name(result), result.get("split"),
                          result.get("dim"), result.get("reranker"), sorted(result.get("metrics") or {}),
                          sorted(result.get("mteb") or {})], default=str)
        if key not in seen:
            seen.add(key)
            unique.append(result)
    return unique


def _comparison(result: dict[str, Any], metric: str) -> str:
    """`+0.052 [0.011, 0.094] vs base, p=0.003` from the eval's paired comparisons, or ''."""
    found = [c for c in result.get("comparisons") or [] if c.get("metric") == metric]
    return "; ".join(f"{c['delta']:+.4f} [{c['low']:+.4f}, {c['high']:+.4f}] vs {c.get('baseline', '?')}, "
                     f"p={c['p_value']:.3g}" for c in found)


def eval_rows(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per (result, metric) with query count and interval, for the card's table."""
    rows = []
    for result in results:
        label = result.get("label") or (short_name(result["model"]) if result.get("model") else "")
        for metric, value in (result.get("metrics") or {}).items():
            low_high = interval(result, metric)
            chance = (result.get("random_baseline") or {}).get(metric)
            rows.append({
                "model": label, "data": dataset_name(result), "split": result.get("split") or "",
                "queries": result.get("n_queries"), "metric": METRIC_TITLES.get(metric, metric),
                "value": f"{float(value):.4f}",
                "interval": f"[{low_high[0]:.4f}, {low_high[1]:.4f}]" if low_high else "not computed",
                "random": f"{float(chance):.4f}" if isinstance(chance, (int, float)) else "",
                "comparison": _comparison(result, metric),
            })
        for task, scores in (result.get("mteb") or {}).items():
            rows.append({"model": label, "data": task, "split": "", "queries": None, "metric": "MTEB main score",
                         "value": f"{float(scores['main_score']):.4f}", "interval": "not computed", "random": "",
                         "comparison": ""})
    return rows


def limitations(trail: list[dict[str, Any]], results: list[dict[str, Any]], facts: dict[str, Any]) -> list[str]:
    """What a reader must know before trusting the numbers, computed from the trail."""
    notes = []
    synth = find_stage(trail, "synth")
    train = find_stage(trail, "train")
    if train is None:
        notes.append("No training record: this folder's provenance has no train stage, so the card cannot say "
                     "what the model was trained on.")
    if synth is not None:
        generator = dict(_summary(synth)).get("generator") or "an LLM"
        notes.append(f"The training pairs are synthetic: queries written by {generator} from the corpus "
                     "passages; no human-written query was used in training.")
    if not results:
        notes.append("Not evaluated: no evaluation results were recorded for this model.")
    for result in results:
        n = result.get("n_queries")
        name = dataset_name(result)
        if isinstance(n, int) and n < SMALL_EVAL:
            notes.append(f"{name}: only {n} queries; differences of a few points between models are within noise.")
        if synth is not None and name == "heldout":
            notes.append("heldout: the held-out queries come from the same generator as the training queries; "
                         "they measure fit to that generator, not search quality on real users' queries.")
        if result.get("metrics") and not any(interval(result, m) for m in result["metrics"]):
            notes.append(f"{name}: no confidence interval was recorded; treat the numbers as point estimates.")
    onnx = facts.get("onnx") or {}
    if onnx.get("int8"):
        notes.append(f"onnx/model_qint8.onnx computes in int8 (weights and activations): max |diff| "
                     f"{onnx['int8']['max_abs_diff']:.3g} per coordinate and cosine >= {onnx['int8']['min_cosine']:.4f} "
                     "against the float model on the export's probe texts.")
    return list(dict.fromkeys(notes))

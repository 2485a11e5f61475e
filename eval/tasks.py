"""Non-retrieval tasks, scored the way MTEB scores them, with the official Qwen3 instruction
conventions (embedforge.templates.INSTRUCTION_SIDES):

* STS: cosine similarity of each pair, Spearman (main) and Pearson against the gold scores.
* Pair classification: cosine similarity as the score of "positive"; average precision (main),
  best accuracy and best F1 over all thresholds. MTEB also tries dot, Euclidean and Manhattan
  distances and reports the max; for L2-normalised embeddings dot and Euclidean rank pairs
  exactly as cosine does, so only Manhattan is left out here.
* Classification: logistic regression (max_iter=100) on train embeddings, accuracy (main) and
  macro F1 on test; optional undersampling to n examples per label, averaged over experiments.
* Clustering: MiniBatchKMeans with as many clusters as labels (batch 500), V-measure, averaged
  over seeds.
* Bitext mining: nearest target of each source by cosine; accuracy and weighted F1 (main), with
  the gold target of source i being target i.

scikit-learn and scipy come with the `eval` extra (`pip install 'embedforge[eval]'`); without them
these tasks say so. `instruction=None` applies the official convention when the model takes instructions (an LLM
embedder, see retrieval.default_query_instruction) and none otherwise; "" forces none.
"""

from __future__ import annotations

import importlib
from collections.abc import Sequence
from typing import Any

import numpy as np

from embedforge.errors import ConfigError, InputError
from embedforge.eval.retrieval import default_query_instruction
from embedforge.eval.search import exact_search
from embedforge.templates import INSTRUCTION_SIDES, task_instruction


def side_instructions(embedder: Any, task_type: str, instruction: str | None = None) -> tuple[str | None, str | None]:
    """(instruction of the first side, of the second side) for a task type."""
    if task_type not in INSTRUCTION_SIDES:
        raise InputError(f"unknown task type {task_type!r}; expected one of {sorted(INSTRUCTION_SIDES)}")
    if instruction == "":
        return None, None
    if instruction is None and default_query_instruction(embedder) is None:
        return None, None
    text = task_instruction(task_type, instruction)
    return (text, text) if INSTRUCTION_SIDES[task_type] == "both" else (text, None)


def _optional(module: str) -> Any:
    """A module of the `eval` extra (scikit-learn, scipy), or a ConfigError saying how to install it."""
    try:
        return importlib.import_module(module)
    except ImportError:
        package = "scipy" if module.startswith("scipy") else "scikit-learn"
        raise ConfigError(f"{package} is not installed; this evaluation needs it: "
                          "pip install 'embedforge[eval]'") from None


def _check_pairs(a: Sequence, b: Sequence, c: Sequence | None = None, what: str = "pairs") -> None:
    lengths = {len(a), len(b)} | ({len(c)} if c is not None else set())
    if len(lengths) != 1:
        raise InputError(f"{what}: inputs have different lengths {sorted(lengths)}")
    if len(a) == 0:
        raise InputError(f"{what}: no examples")


def _encode(embedder: Any, texts: Sequence[str], instruction: str | None, dim: int | None, batch_size: int):
    return embedder.encode(list(texts), instruction=instruction, dim=dim, batch_size=batch_size)


def _rowwise_cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Cosine of row i of a with row i of b, in float64 (identical pairs stay exact ties)."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    a = a / np.linalg.norm(a, axis=1, keepdims=True).clip(min=1e-12)
    b = b / np.linalg.norm(b, axis=1, keepdims=True).clip(min=1e-12)
    return (a * b).sum(axis=1)


# --- pure scoring functions ---------------------------------------------------------------------


def best_accuracy(scores: np.ndarray, labels: np.ndarray) -> tuple[float, float]:
    """(max accuracy, threshold) of predicting positive for score >= threshold."""
    scores, labels = np.asarray(scores, dtype=np.float64), np.asarray(labels).astype(bool)
    order = np.argsort(-scores, kind="stable")
    s, y = scores[order], labels[order]
    tp = np.cumsum(y)
    fp = np.cumsum(~y)
    negatives = (~y).sum()
    # A cut is valid only after the last of a run of equal scores.
    valid = np.append(s[1:] != s[:-1], True)
    correct = tp + (negatives - fp)
    best, threshold = negatives / len(y), float(s[0]) + 1.0  # predict everything negative
    if valid.any():
        i = int(np.argmax(np.where(valid, correct, -1)))
        if correct[i] / len(y) > best:
            best, threshold = correct[i] / len(y), float(s[i])
    return float(best), threshold


def best_f1(scores: np.ndarray, labels: np.ndarray) -> tuple[float, float]:
    """(max F1, threshold) of predicting positive for score >= threshold."""
    scores, labels = np.asarray(scores, dtype=np.float64), np.asarray(labels).astype(bool)
    order = np.argsort(-scores, kind="stable")
    s, y = scores[order], labels[order]
    positives = y.sum()
    if positives == 0:
        return 0.0, float(s[0]) + 1.0
    tp = np.cumsum(y)
    predicted = np.arange(1, len(y) + 1)
    f1 = 2 * tp / (predicted + positives)
    valid = np.append(s[1:] != s[:-1], True)
    i = int(np.argmax(np.where(valid, f1, -1)))
    return float(f1[i]), float(s[i])


def pair_classification_scores(scores: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    metrics = _optional("sklearn.metrics")
    labels = np.asarray(labels)
    if not set(np.unique(labels)) <= {0, 1}:
        raise InputError("pair classification labels must be 0 or 1")
    accuracy, acc_threshold = best_accuracy(scores, labels)
    f1, f1_threshold = best_f1(scores, labels)
    return {
        "ap": float(metrics.average_precision_score(labels, scores)),
        "accuracy": accuracy,
        "accuracy_threshold": acc_threshold,
        "f1": f1,
        "f1_threshold": f1_threshold,
    }


def bitext_scores(source: np.ndarray, target: np.ndarray) -> dict[str, float]:
    """Nearest target by cosine for each source; gold target of source i is row i."""
    metrics = _optional("sklearn.metrics")
    nearest = exact_search(source, target, 1).indices[:, 0]
    gold = np.arange(len(source))
    return {
        "accuracy": float((nearest == gold).mean()),
        "precision": float(metrics.precision_score(gold, nearest, average="weighted", zero_division=0)),
        "recall": float(metrics.recall_score(gold, nearest, average="weighted", zero_division=0)),
        "f1": float(metrics.f1_score(gold, nearest, average="weighted", zero_division=0)),
    }


# --- tasks on an embedder -----------------------------------------------------------------------


def evaluate_sts(embedder: Any, sentences1: Sequence[str], sentences2: Sequence[str], gold: Sequence[float],
                 *, instruction: str | None = None, dim: int | None = None, batch_size: int = 32) -> dict[str, Any]:
    stats = _optional("scipy.stats")
    _check_pairs(sentences1, sentences2, gold, "sts")
    first, second = side_instructions(embedder, "sts", instruction)
    cos = _rowwise_cosine(_encode(embedder, sentences1, first, dim, batch_size),
                          _encode(embedder, sentences2, second, dim, batch_size))
    spearman = float(stats.spearmanr(cos, gold).statistic)
    return {"main_score": spearman, "cosine_spearman": spearman,
            "cosine_pearson": float(stats.pearsonr(cos, gold).statistic),
            "instruction": first, "n": len(gold)}


def evaluate_pair_classification(embedder: Any, sentences1: Sequence[str], sentences2: Sequence[str],
                                 labels: Sequence[int], *, instruction: str | None = None, dim: int | None = None,
                                 batch_size: int = 32) -> dict[str, Any]:
    _check_pairs(sentences1, sentences2, labels, "pair classification")
    first, second = side_instructions(embedder, "pair_classification", instruction)
    cos = _rowwise_cosine(_encode(embedder, sentences1, first, dim, batch_size),
                          _encode(embedder, sentences2, second, dim, batch_size))
    scores = pair_classification_scores(cos, np.asarray(labels))
    return {"main_score": scores["ap"], **scores, "instruction": first, "n": len(labels)}


def evaluate_classification(embedder: Any, train_texts: Sequence[str], train_labels: Sequence,
                            test_texts: Sequence[str], test_labels: Sequence, *, instruction: str | None = None,
                            dim: int | None = None, batch_size: int = 32, samples_per_label: int | None = None,
                            n_experiments: int = 1, seed: int = 42) -> dict[str, Any]:
    linear_model, metrics = _optional("sklearn.linear_model"), _optional("sklearn.metrics")
    _check_pairs(train_texts, train_labels, what="classification train")
    _check_pairs(test_texts, test_labels, what="classification test")
    if len(set(train_labels)) < 2:
        raise InputError("classification needs at least two labels in the training set")
    first, _ = side_instructions(embedder, "classification", instruction)
    x_train = _encode(embedder, train_texts, first, dim, batch_size)
    x_test = _encode(embedder, test_texts, first, dim, batch_size)
    y_train, y_test = np.asarray(train_labels), np.asarray(test_labels)
    rng = np.random.default_rng(seed)
    accuracies, f1s = [], []
    for _ in range(n_experiments):
        idx = np.arange(len(y_train))
        if samples_per_label is not None:
            idx = np.concatenate([rng.permutation(np.flatnonzero(y_train == label))[:samples_per_label]
                                  for label in np.unique(y_train)])
        clf = linear_model.LogisticRegression(max_iter=100, random_state=int(rng.integers(1 << 31)))
        clf.fit(x_train[idx], y_train[idx])
        predicted = clf.predict(x_test)
        accuracies.append(metrics.accuracy_score(y_test, predicted))
        f1s.append(metrics.f1_score(y_test, predicted, average="macro"))
    return {"main_score": float(np.mean(accuracies)), "accuracy": float(np.mean(accuracies)),
            "f1_macro": float(np.mean(f1s)), "instruction": first, "n_train": len(y_train), "n_test": len(y_test)}


def evaluate_clustering(embedder: Any, texts: Sequence[str], labels: Sequence, *, instruction: str | None = None,
                        dim: int | None = None, batch_size: int = 32, n_runs: int = 3, seed: int = 42) -> dict[str, Any]:
    cluster, metrics = _optional("sklearn.cluster"), _optional("sklearn.metrics")
    _check_pairs(texts, labels, what="clustering")
    n_clusters = len(set(labels))
    if n_clusters < 2:
        raise InputError("clustering needs at least two labels")
    first, _ = side_instructions(embedder, "clustering", instruction)
    x = _encode(embedder, texts, first, dim, batch_size)
    scores = []
    for run in range(n_runs):
        kmeans = cluster.MiniBatchKMeans(n_clusters=n_clusters, batch_size=500, n_init="auto", random_state=seed + run)
        scores.append(metrics.v_measure_score(list(labels), kmeans.fit_predict(x)))
    return {"main_score": float(np.mean(scores)), "v_measure": float(np.mean(scores)),
            "v_measure_std": float(np.std(scores)), "instruction": first, "n": len(labels)}


def evaluate_bitext(embedder: Any, source: Sequence[str], target: Sequence[str], *, instruction: str | None = None,
                    dim: int | None = None, batch_size: int = 32) -> dict[str, Any]:
    _check_pairs(source, target, what="bitext")
    first, second = side_instructions(embedder, "bitext", instruction)
    scores = bitext_scores(_encode(embedder, source, first, dim, batch_size),
                           _encode(embedder, target, second, dim, batch_size))
    return {"main_score": scores["f1"], **scores, "instruction": first, "n": len(source)}

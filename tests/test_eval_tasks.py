"""Non-retrieval task scoring against brute force and scikit-learn, and the instruction sides."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
from sklearn.metrics import accuracy_score, average_precision_score, f1_score, v_measure_score

from embedforge.errors import InputError
from embedforge.eval.tasks import (
    best_accuracy,
    best_f1,
    bitext_scores,
    evaluate_bitext,
    evaluate_classification,
    evaluate_clustering,
    evaluate_pair_classification,
    side_instructions,
)
from embedforge.templates import BITEXT_INSTRUCTION, STS_INSTRUCTION


def brute_force_best(scores, labels, metric):
    """Try every threshold (each distinct score, and one above all) with sklearn's metric."""
    candidates = sorted(set(scores)) + [max(scores) + 1]
    return max(metric(labels, (np.asarray(scores) >= t).astype(int)) for t in candidates)


@pytest.mark.parametrize("seed", range(5))
def test_best_accuracy_and_f1_equal_brute_force_threshold_search(seed):
    rng = np.random.default_rng(seed)
    scores = rng.integers(0, 12, 60) / 11.0  # ties on purpose
    labels = (rng.random(60) < 0.4).astype(int)
    assert best_accuracy(scores, labels)[0] == pytest.approx(brute_force_best(scores, labels, accuracy_score))
    assert best_f1(scores, labels)[0] == pytest.approx(
        brute_force_best(scores, labels, lambda y, p: f1_score(y, p, zero_division=0)))


def test_best_threshold_is_usable():
    scores, labels = np.array([0.9, 0.8, 0.3, 0.2]), np.array([1, 1, 0, 0])
    acc, threshold = best_accuracy(scores, labels)
    assert acc == 1.0 and ((scores >= threshold) == labels.astype(bool)).all()


def test_bitext_scores_against_direct_nearest_neighbour():
    rng = np.random.default_rng(0)
    src = rng.standard_normal((50, 8)).astype(np.float32)
    tgt = src + 0.9 * rng.standard_normal((50, 8)).astype(np.float32)
    out = bitext_scores(src, tgt)
    nearest = (src @ tgt.T).argmax(1)
    assert out["accuracy"] == pytest.approx((nearest == np.arange(50)).mean())
    assert out["f1"] == pytest.approx(f1_score(np.arange(50), nearest, average="weighted", zero_division=0))
    assert 0 < out["accuracy"] < 1


class Recorder:
    """A model whose embedding is a fixed table; records the instruction of each call."""

    def __init__(self, table, pooling="lasttoken"):
        self.table, self.calls = table, []
        self.spec = SimpleNamespace(pooling=pooling, prompts={})

    def encode(self, texts, instruction=None, dim=None, batch_size=32, show_progress=False):
        self.calls.append(instruction)
        return np.stack([self.table[t] for t in texts]).astype(np.float32)


def test_instruction_sides_follow_the_official_convention():
    llm, encoder = Recorder({}), Recorder({}, pooling="mean")
    assert side_instructions(llm, "sts") == (STS_INSTRUCTION, STS_INSTRUCTION)
    assert side_instructions(llm, "pair_classification", "ignored") == (STS_INSTRUCTION, STS_INSTRUCTION)
    assert side_instructions(llm, "bitext") == (BITEXT_INSTRUCTION, BITEXT_INSTRUCTION)
    assert side_instructions(llm, "classification", "Classify the sentiment") == ("Classify the sentiment",) * 2
    assert side_instructions(llm, "retrieval", "Find code")[1] is None
    assert side_instructions(encoder, "sts") == (None, None)  # MiniLM-style models get none
    assert side_instructions(llm, "sts", "") == (None, None)
    with pytest.raises(InputError, match="unknown task type"):
        side_instructions(llm, "summarisation")


def test_pair_classification_uses_cosine_and_sklearn_ap():
    rng = np.random.default_rng(0)
    texts = [f"t{i}" for i in range(40)]
    table = {t: rng.standard_normal(6) for t in texts}
    labels = rng.integers(0, 2, 20)
    model = Recorder(table)
    out = evaluate_pair_classification(model, texts[:20], texts[20:], labels)
    a = np.stack([table[t] for t in texts[:20]]).astype(np.float32)
    b = np.stack([table[t] for t in texts[20:]]).astype(np.float32)
    cos = (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)
    assert out["ap"] == pytest.approx(average_precision_score(labels, cos))
    assert model.calls == [STS_INSTRUCTION, STS_INSTRUCTION]


def test_classification_and_clustering_on_separable_data():
    rng = np.random.default_rng(0)
    centres = rng.standard_normal((3, 16)) * 4
    table, texts, labels = {}, [], []
    for i in range(90):
        text, label = f"t{i}", i % 3
        table[text] = centres[label] + rng.standard_normal(16)
        texts.append(text)
        labels.append(label)
    model = Recorder(table)
    clf = evaluate_classification(model, texts[:60], labels[:60], texts[60:], labels[60:],
                                  instruction="Classify the topic")
    assert clf["accuracy"] == 1.0 and clf["f1_macro"] == 1.0
    assert model.calls == ["Classify the topic", "Classify the topic"]
    few = evaluate_classification(model, texts[:60], labels[:60], texts[60:], labels[60:], samples_per_label=2,
                                  n_experiments=3)
    assert 0.0 <= few["accuracy"] <= 1.0
    clu = evaluate_clustering(model, texts, labels)
    assert clu["v_measure"] == pytest.approx(1.0)
    # Labels unrelated to the vectors: V-measure is low, as sklearn says for the same clusters.
    shuffled = list(np.random.default_rng(1).permutation(labels))
    low = evaluate_clustering(model, texts, shuffled, n_runs=1)
    from sklearn.cluster import MiniBatchKMeans

    x = np.stack([table[t] for t in texts]).astype(np.float32)
    ref = v_measure_score(shuffled, MiniBatchKMeans(3, batch_size=500, n_init="auto", random_state=42).fit_predict(x))
    assert low["v_measure"] == pytest.approx(ref) and low["v_measure"] < 0.2


def test_bad_task_inputs():
    model = Recorder({"a": np.ones(2), "b": np.ones(2)})
    with pytest.raises(InputError, match="different lengths"):
        evaluate_bitext(model, ["a", "b"], ["a"])
    with pytest.raises(InputError, match="no examples"):
        evaluate_bitext(model, [], [])
    with pytest.raises(InputError, match="at least two labels"):
        evaluate_clustering(model, ["a", "b"], [0, 0])
    with pytest.raises(InputError, match="labels must be 0 or 1"):
        evaluate_pair_classification(model, ["a"], ["b"], [2])


def test_tasks_without_the_eval_extra_say_how_to_install_it(monkeypatch):
    import sys

    from embedforge.errors import ConfigError
    from embedforge.eval.tasks import evaluate_sts

    monkeypatch.setitem(sys.modules, "scipy.stats", None)  # `import scipy.stats` now fails
    with pytest.raises(ConfigError, match=r"scipy is not installed; .*pip install 'embedforge\[eval\]'"):
        evaluate_sts(SimpleNamespace(spec=None), ["a"], ["b"], [1.0])
    monkeypatch.setitem(sys.modules, "sklearn.metrics", None)
    with pytest.raises(ConfigError, match=r"scikit-learn is not installed"):
        bitext_scores(np.eye(2, dtype=np.float32), np.eye(2, dtype=np.float32))

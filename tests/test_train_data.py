"""Training data: row validation with file:line:field errors, counted empties and duplicates, the
temperature mixing sampler (against the formula and by frequency), in-batch duplicate removal,
determinism and resume of the sampler state, negative selection and reranker groups."""

from __future__ import annotations

import json
from collections import Counter

import numpy as np
import pytest
import torch
from train_workers.precision import reorder_rtol

from embedforge.errors import InputError
from embedforge.train.config import DatasetSettings
from embedforge.train.data import (
    MixingSampler,
    choose_negatives,
    contrastive_texts,
    load_sources,
    mixing_probabilities,
    reranker_groups,
)


def write_jsonl(path, rows):
    with open(path, "w", encoding="utf-8") as fh:
        fh.writelines((row if isinstance(row, str) else json.dumps(row)) + "\n" for row in rows)
    return str(path)


def pairs(n, prefix="q", negatives=2):
    return [{"query": f"{prefix} query {i}", "positive": f"{prefix} doc {i}",
             "negatives": [f"{prefix} neg {i}.{j}" for j in range(negatives)]} for i in range(n)]


# --- validation ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("row", "line_text", "field"),
    [
        ({"positive": "d"}, ":2: field 'query'", "missing field"),
        ({"query": "q", "positive": 3}, ":2: field 'positive'", "expected a string"),
        ({"query": "q", "positive": "d", "negatives": "n"}, ":2: field 'negatives'", "list of strings"),
        ({"query": "q", "positive": "d", "negatives": ["a", 5]}, ":2: field 'negatives'", "element 1"),
        ({"query": "q", "positive": "d", "instruction": 1}, ":2: field 'instruction'", "string or null"),
        ("{not json", ":2: ", "invalid JSON"),
        ("[1, 2]", ":2: ", "expected a JSON object"),
    ],
)
def test_malformed_row_is_an_error_naming_file_line_and_field(tmp_path, row, line_text, field):
    path = write_jsonl(tmp_path / "bad.jsonl", [pairs(1)[0], row])
    with pytest.raises(InputError) as err:
        load_sources([DatasetSettings(path=path)])
    assert f"bad.jsonl{line_text}" in str(err.value)
    assert field in str(err.value)


def test_empty_and_duplicate_rows_are_counted_not_fatal(tmp_path):
    rows = pairs(4) + [
        "",  # blank line
        {"query": "   ", "positive": "d"},  # empty query
        {"query": "q", "positive": ""},  # empty positive
        pairs(4)[1],  # duplicate (query, positive)
        {"query": "q query 1", "positive": "q doc 1", "negatives": ["other"]},  # duplicate pair, other negs
        {"query": "x", "positive": "y", "negatives": ["", "y", "n1", "n1", "n2"]},  # 3 negatives dropped
    ]
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    sources, reports = load_sources([DatasetSettings(path=path)])
    report = reports[0]
    assert (report.rows, report.empty, report.duplicates, report.kept) == (10, 3, 2, 5)
    assert report.negatives_dropped == 3
    assert len(sources) == 1 and len(sources[0]) == 5
    kept = [sources[0].row(i) for i in range(5)]
    assert kept[-1].negatives == ("n1", "n2")
    assert kept[0].where.endswith("d.jsonl:1") and kept[-1].where.endswith("d.jsonl:10")


def test_rows_split_into_sources_by_dataset_field_and_keep_settings(tmp_path):
    rows = [dict(r, dataset="nq") for r in pairs(3, "a")] + [dict(r, dataset="msmarco") for r in pairs(5, "b")]
    rows += pairs(2, "c")  # no dataset field: the recipe's name
    path = write_jsonl(tmp_path / "mix.jsonl", rows)
    sources, reports = load_sources([DatasetSettings(path=path, name="rest", instruction="Find it", num_negatives=1)])
    sizes = {s.name: len(s) for s in sources}
    assert sizes == {"nq": 3, "msmarco": 5, "rest": 2}
    assert reports[0].sources == sizes
    assert all(s.instruction == "Find it" and s.num_negatives == 1 for s in sources)


def test_parquet_datasets_folder_and_inline_rows_read_like_jsonl(tmp_path):
    import datasets

    rows = pairs(6) + [{"query": "q", "positive": ""}, pairs(6)[0]]
    for row in rows:
        row.setdefault("negatives", [])
    ds = datasets.Dataset.from_list(rows)
    ds.to_parquet(str(tmp_path / "d.parquet"))
    ds.save_to_disk(str(tmp_path / "folder"))
    jsonl = write_jsonl(tmp_path / "d.jsonl", rows)
    expected = None
    for path in (jsonl, str(tmp_path / "d.parquet"), str(tmp_path / "folder"), "inline"):
        inline = {"inline": rows} if path == "inline" else None
        sources, reports = load_sources([DatasetSettings(path=path, name="d")], inline)
        got = [(r.query, r.positive, r.negatives) for r in (sources[0].row(i) for i in range(len(sources[0])))]
        assert (reports[0].empty, reports[0].duplicates) == (1, 1), path
        expected = expected or got
        assert got == expected, path
    datasets.Dataset.from_list([{"q": "x", "positive": "y"}]).to_parquet(str(tmp_path / "bad.parquet"))
    with pytest.raises(InputError, match=r"bad\.parquet: field 'query'"):
        load_sources([DatasetSettings(path=str(tmp_path / "bad.parquet"))])


def test_missing_file_and_unknown_format_are_named(tmp_path):
    with pytest.raises(InputError, match="nope.jsonl: file not found"):
        load_sources([DatasetSettings(path=str(tmp_path / "nope.jsonl"))])
    (tmp_path / "x.csv").write_text("a,b\n")
    with pytest.raises(InputError, match="x.csv: expected a .jsonl or .parquet file"):
        load_sources([DatasetSettings(path=str(tmp_path / "x.csv"))])


def test_hub_dataset_that_cannot_be_loaded_is_named(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    with pytest.raises(InputError, match=r"hf:nobody/no-such-pairs: cannot load Hub dataset 'nobody/no-such-pairs'"):
        load_sources([DatasetSettings(path="hf:nobody/no-such-pairs")])


# --- mixing sampler -----------------------------------------------------------------------------


def make_sources(tmp_path, sizes, negatives=0):
    settings = []
    for k, n in enumerate(sizes):
        path = write_jsonl(tmp_path / f"s{k}.jsonl", pairs(n, f"s{k}", negatives))
        settings.append(DatasetSettings(path=path, num_negatives=negatives))
    return load_sources(settings)[0]


def test_mixing_probabilities_follow_the_temperature_formula():
    sizes, weights = [100, 400, 1600], [1.0, 1.0, 0.5]
    # float64, in two implementations (train_workers/precision.py): a product, a power (up to 4 ulp in
    # numpy's SIMD builds), a sum over the sources and a division.
    rtol = reorder_rtol(torch.float64, 1 + 4 + len(sizes) + 1)
    for temperature in (1.0, 2.0, 5.0):
        expected = [(w * n) ** (1 / temperature) for n, w in zip(sizes, weights)]
        expected = np.array(expected) / sum(expected)
        assert np.allclose(mixing_probabilities(sizes, weights, temperature), expected, rtol=rtol, atol=0)
    temperature = 1e6
    uniform = mixing_probabilities(sizes, [1, 1, 1], temperature)
    # n_i^(1/T) lies within a factor exp(ln(max n / min n) / T) of every other one, so each p_i lies
    # within (1/3)(that factor - 1) of 1/3.
    assert np.allclose(uniform, 1 / 3, rtol=0, atol=np.expm1(np.log(max(sizes) / min(sizes)) / temperature) / 3)


def test_each_batch_comes_from_one_source_at_the_temperature_frequencies(tmp_path):
    sources = make_sources(tmp_path, [20, 80])
    sampler = MixingSampler(sources, batch_size=4, temperature=2.0, seed=3)
    counts = Counter()
    for _ in range(3000):
        batch = sampler.next_batch()
        prefixes = {r.query.split()[0] for r in batch.rows}
        assert len(prefixes) == 1 and len(batch.rows) == 4
        counts[batch.source] += 1
    expected = np.sqrt([20, 80]) / np.sqrt([20, 80]).sum()  # T = 2
    observed = np.array([counts["s0"], counts["s1"]]) / 3000
    # Four binomial standard deviations of a frequency over 3000 independent draws.
    assert np.allclose(observed, expected, rtol=0, atol=4 * np.sqrt(expected * (1 - expected) / 3000))


def test_one_epoch_of_a_source_visits_every_row_once(tmp_path):
    sources = make_sources(tmp_path, [12])
    sampler = MixingSampler(sources, batch_size=4, seed=0)
    seen = [r.query for _ in range(3) for r in sampler.next_batch().rows]
    assert sorted(seen) == sorted(f"s0 query {i}" for i in range(12))


def test_in_batch_duplicates_are_deferred_not_lost(tmp_path):
    rows = [{"query": f"same {i % 3}", "positive": f"doc {i}"} for i in range(12)]  # 3 distinct queries
    rows += [{"query": f"unique {i}", "positive": "shared doc"} for i in range(3)]  # one shared positive
    rows += [{"query": f"u {i}", "positive": f"p {i}"} for i in range(9)]
    path = write_jsonl(tmp_path / "dup.jsonl", rows)
    sources, _ = load_sources([DatasetSettings(path=path)])
    sampler = MixingSampler(sources, batch_size=6, seed=1)
    served = []
    for _ in range(8):
        batch = sampler.next_batch()
        assert len({r.query for r in batch.rows}) == 6
        assert len({r.positive for r in batch.rows}) == 6
        served += [(r.query, r.positive) for r in batch.rows]
    # over 48 draws from 24 rows, every row is served (deferral does not drop rows)
    assert {(r["query"], r["positive"]) for r in rows} <= set(served)


def test_dataset_smaller_than_one_batch_is_an_error_naming_it(tmp_path):
    sources = make_sources(tmp_path, [10, 3])
    with pytest.raises(InputError, match=r"smaller than one batch of 4 rows: s1 \(3 rows\)"):
        MixingSampler(sources, batch_size=4)


def test_too_few_distinct_rows_for_a_batch_is_an_error(tmp_path):
    rows = [{"query": "same", "positive": f"doc {i}"} for i in range(8)]
    sources, _ = load_sources([DatasetSettings(path=write_jsonl(tmp_path / "s.jsonl", rows))])
    with pytest.raises(InputError, match="fewer than 4 rows with distinct query"):
        MixingSampler(sources, batch_size=4).next_batch()


def test_sampler_is_deterministic_and_resumes_from_its_json_state(tmp_path):
    sources = make_sources(tmp_path, [10, 17, 33])

    def take(sampler, n):
        return [(b.source, [r.query for r in b.rows]) for b in (sampler.next_batch() for _ in range(n))]

    full = take(MixingSampler(sources, 4, temperature=1.5, seed=7), 40)
    assert full == take(MixingSampler(sources, 4, temperature=1.5, seed=7), 40)
    assert full != take(MixingSampler(sources, 4, temperature=1.5, seed=8), 40)
    first = MixingSampler(sources, 4, temperature=1.5, seed=7)
    head = take(first, 23)
    state = json.loads(json.dumps(first.state_dict()))
    resumed = MixingSampler(sources, 4, temperature=1.5, seed=7)
    resumed.load_state_dict(state)
    assert head + take(resumed, 17) == full
    other = MixingSampler(sources[:2], 4, seed=7)
    with pytest.raises(InputError, match="checkpoint was written for sources"):
        other.load_state_dict(state)


# --- collation ----------------------------------------------------------------------------------


def test_negatives_are_subsampled_per_row_deterministically(tmp_path):
    sources = make_sources(tmp_path, [8], negatives=5)
    sources[0].num_negatives = 3
    batch = MixingSampler(sources, 4, seed=2).next_batch()
    chosen = choose_negatives(batch, seed=2)
    assert all(len(c) == 3 and set(c) <= set(r.negatives) for c, r in zip(chosen, batch.rows))
    assert chosen == choose_negatives(batch, seed=2)
    assert any(c != list(r.negatives[:3]) for c, r in zip(chosen, batch.rows))  # sampled, not the first 3


def test_contrastive_texts_apply_row_or_dataset_instruction(tmp_path):
    rows = [{"query": "a", "positive": "pa", "instruction": "Own task"}, {"query": "b", "positive": "pb"}]
    sources, _ = load_sources([DatasetSettings(path=write_jsonl(tmp_path / "i.jsonl", rows), instruction="Default")])
    batch = MixingSampler(sources, 2, seed=0).next_batch()
    texts = contrastive_texts(batch, seed=0)
    assert dict(zip(texts.queries, texts.instructions)) == {"a": "Own task", "b": "Default"}
    assert texts.k == 0 and texts.positives == [{"a": "pa", "b": "pb"}[q] for q in texts.queries]


def test_reranker_groups_put_the_positive_first_and_fill_from_the_batch(tmp_path):
    rows = [{"query": "q0", "positive": "p0", "negatives": ["n0a", "n0b"]},
            {"query": "q1", "positive": "p1", "negatives": ["n1a"]},
            {"query": "q2", "positive": "p2"}]
    sources, _ = load_sources([DatasetSettings(path=write_jsonl(tmp_path / "r.jsonl", rows), num_negatives=2)])
    batch = MixingSampler(sources, 3, seed=0).next_batch()
    groups = reranker_groups(batch, seed=0)
    assert groups.group_size == 3 and len(groups.queries) == 9
    for g in range(3):
        q = groups.queries[3 * g]
        docs = groups.documents[3 * g:3 * g + 3]
        assert groups.labels[3 * g:3 * g + 3] == [1, 0, 0]
        assert docs[0] == "p" + q[1] and docs[0] not in docs[1:]
        own = {"q0": ["n0a", "n0b"], "q1": ["n1a"], "q2": []}[q]
        assert docs[1:1 + len(own)] == own
        assert all(d.startswith("p") for d in docs[1 + len(own):])


def test_small_data_fills_every_batch_across_many_epochs(tmp_path):
    # 40 distinct rows at batch 32: a batch that crosses an epoch boundary meets rows it already
    # holds in the next epoch's permutation; it must still fill from the other distinct rows.
    rows = [{"query": f"q {i}", "positive": f"doc {i}"} for i in range(40)]
    sources, _ = load_sources([DatasetSettings(path=write_jsonl(tmp_path / "s.jsonl", rows))])
    sampler = MixingSampler(sources, batch_size=32)
    for _ in range(50):
        batch = sampler.next_batch()
        assert len(batch.rows) == 32 == len({r.query for r in batch.rows})


def test_bytes_that_are_not_utf8_name_file_line_and_byte(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_bytes(json.dumps(pairs(1)[0]).encode() + b"\n" + b'{"query": "caf\xe9", "positive": "d"}\n')
    with pytest.raises(InputError) as err:
        load_sources([DatasetSettings(path=str(path))])
    assert "bad.jsonl:2: not valid UTF-8 (byte 0xe9 at column 15)" in str(err.value)  # before: no byte, no column

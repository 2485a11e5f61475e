"""`embedforge run`: every shipped recipe validates, bad keys are named, a stopped run resumes at its stage."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from embedforge import stages
from embedforge.cli import main
from embedforge.config import load_config
from embedforge.errors import ConfigError
from embedforge.recipe import Recipe

RECIPES = sorted(p for p in (Path(__file__).parent.parent / "recipes").rglob("*.yaml") if p.parent.name != "accelerate")


def test_recipes_exist_for_every_family():
    families = {p.parent.name for p in RECIPES}
    assert {"qwen3-embedding", "qwen3-reranker", "domain-adaptation", "tiny"} <= families


def user_paths(recipe: Path, tmp_path: Path) -> list[str]:
    """`--set` overrides pointing a recipe's user data (data/...) at files that exist."""
    import yaml

    data = yaml.safe_load(recipe.read_text())
    overrides = []
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text('{"id": "a", "text": "a passage"}\n')
    if not str(data.get("corpus", {}).get("path", "builtin:")).startswith("builtin:"):
        overrides.append(f"corpus.path={corpus}")
    for i, _ in enumerate(data.get("train", {}).get("data", []) if "output_dir" not in data else []):
        overrides.append(f"train.data.{i}.path={corpus}")
    for i, name in enumerate(data.get("eval", {}).get("sets", [])):
        if name not in ("corpus", "heldout") and not name.startswith("builtin:"):
            (tmp_path / f"beir{i}").mkdir(exist_ok=True)
            overrides.append(f"eval.sets.{i}={tmp_path / f'beir{i}'}")
    return [f"--set={o}" for o in overrides]


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_every_recipe_validates(recipe, tmp_path, capsys):
    assert main(["run", str(recipe), "--dry-run", *user_paths(recipe, tmp_path)]) == 0
    assert "valid" in capsys.readouterr().out
    assert recipe.read_text().startswith("# "), "each recipe's header says what it reproduces and its hardware"


def test_dry_run_refuses_what_would_fail_later(tmp_path, capsys):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("name: x\nmodel: builtin:minilm\ncorpus: {path: nowhere/corpus.jsonl}\neval: {sets: []}\n")
    assert main(["run", str(recipe), "--dry-run"]) == 2
    assert "corpus.path: nowhere/corpus.jsonl: no such file or folder" in capsys.readouterr().err
    recipe.write_text("name: x\nmodel: builtin:minilm\nmerge: {t: 7}\n")
    assert main(["run", str(recipe), "--dry-run"]) == 2
    assert "merge.t" in capsys.readouterr().err
    recipe.write_text("name: x\nmodel: builtin:nope\n")
    assert main(["run", str(recipe), "--dry-run"]) == 2
    assert "unknown 'builtin:nope'" in capsys.readouterr().err


def test_unknown_and_mistyped_keys_are_named(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\nmodel: m\ntrian: {}\n")
    assert main(["run", str(bad), "--dry-run"]) == 2
    assert "bad.yaml: trian: unknown key" in capsys.readouterr().err
    good = RECIPES[0]
    with pytest.raises(ConfigError, match="merge.t"):
        load_config(Recipe, good, ["merge.t=[not, a, number]"])
    stage_typo = tmp_path / "stage.yaml"
    stage_typo.write_text("name: x\nmodel: m\ntrain:\n  learning_rate: 0.1\n")
    assert main(["run", str(stage_typo), "--dry-run"]) == 2
    assert "train.learning_rate: unknown key" in capsys.readouterr().err


@pytest.fixture()
def tiny_recipe(tmp_path, tiny_qwen3_embedder):
    """No LLM: given pairs -> train -> merge -> eval -> export, on the tiny Qwen3."""
    from embedforge.eval.beir import BeirData, write_beir

    topics = ["python lists", "rust ownership", "sql joins", "http caching", "git rebase", "unit tests",
              "docker images", "tcp handshake"]
    rows = [{"query": f"how do {t} work?", "positive": f"A note on {t}: what they are and how to use them."}
            for t in topics]
    train = tmp_path / "train.jsonl"
    train.write_text("".join(json.dumps(r) + "\n" for r in rows))
    beir = write_beir(tmp_path / "beir", BeirData(
        queries={f"q{i}": r["query"] for i, r in enumerate(rows)},
        corpus={f"d{i}": r["positive"] for i, r in enumerate(rows)},
        qrels={f"q{i}": {f"d{i}": 1} for i in range(len(rows))}))
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(json.dumps({
        "name": "tiny", "model": str(tiny_qwen3_embedder),
        "synth": {"enabled": False}, "filter": {"enabled": False}, "mine": {"enabled": False},
        "train": {"data": [{"path": str(train), "num_negatives": 0}], "method": "full",
                  "batch_size": 4, "max_steps": 2, "lr": 1e-3, "save_steps": 0, "max_length": 64,
                  "progress_bar": False},
        "merge": {"with": "base", "t": 0.5},
        "eval": {"sets": [str(beir)]},
    }))
    return recipe


def test_a_stopped_run_resumes_at_the_stage_it_was_in(tiny_recipe, tmp_path, monkeypatch, capsys):
    workdir = tmp_path / "work"
    real_merge = stages.merge_stage

    def crash(*args, **kwargs):
        raise KeyboardInterrupt  # what a Ctrl-C or a dying job does in the middle of a stage

    monkeypatch.setattr(stages, "merge_stage", crash)
    assert main(["run", str(tiny_recipe), "--workdir", str(workdir)]) == 130
    manifest = json.loads((workdir / "manifest.json").read_text())
    assert manifest["stages"]["train"]["status"] == "complete"
    assert manifest["stages"]["merge"]["status"] == "running"
    capsys.readouterr()

    monkeypatch.setattr(stages, "merge_stage", real_merge)
    assert main(["run", str(tiny_recipe), "--workdir", str(workdir)]) == 0
    log = capsys.readouterr().err
    for stage in ("corpus", "base", "train"):
        assert f"[{stage}] cached" in log
    for stage in ("merge", "eval", "export"):
        assert f"[{stage}] running" in log
    manifest = json.loads((workdir / "manifest.json").read_text())
    assert all(s["status"] == "complete" for s in manifest["stages"].values())
    metrics = manifest["stages"]["eval"]["outcome"]["scores"]
    assert {"base/beir/ndcg_at_10", "trained/beir/ndcg_at_10", "merged/beir/ndcg_at_10"} <= set(metrics)
    export = Path(manifest["stages"]["export"]["outcome"]["output"])
    assert (export / "modules.json").exists() and (export / "README.md").exists()

    # a changed setting invalidates that stage and everything after it, not what came before
    assert main(["run", str(tiny_recipe), "--workdir", str(workdir), "--set", "merge.t=0.25"]) == 0
    log = capsys.readouterr().err
    assert "[train] cached" in log and "[merge] running" in log


def test_corpus_sample_keeps_the_real_queries_of_the_sampled_passages(tmp_path):
    from embedforge.builtin_data import load_builtin_corpus
    from embedforge.eval.beir import load_beir

    recipe = Recipe.model_validate({"name": "s", "model": "builtin:minilm",
                                    "corpus": {"path": "builtin:python-docstrings", "sample": 50}})
    outcome = stages.corpus_stage(recipe, {}, tmp_path)
    full = load_builtin_corpus("builtin:python-docstrings")
    passages = [json.loads(line) for line in Path(outcome.output).read_text().splitlines()]
    ids = [p["id"] for p in passages]
    assert outcome.passages == len(ids) == 50 and len(set(ids)) == 50
    assert all(full.passages[p["id"]] == p["text"] for p in passages)
    assert ids[0] != ids[1] and set(ids) != set(list(full.passages)[:50])  # spread over the corpus, not its head
    real = load_beir(outcome.real_queries)
    assert set(real.corpus) == set(ids) and outcome.real_query_count == len(real.queries) > 0
    expected = {q for q, docs in full.real_queries.qrels.items() if set(docs) <= set(ids)}
    assert set(real.queries) == expected and all(real.queries[q] == full.real_queries.queries[q] for q in expected)


def test_covered_queries_are_those_of_the_generators_passages_over_the_whole_corpus(tmp_path):
    from embedforge.builtin_data import load_builtin_corpus
    from embedforge.eval.beir import load_beir

    recipe = Recipe.model_validate({"name": "c", "model": "builtin:minilm", "eval": {"sets": ["covered"]},
                                    "corpus": {"path": "builtin:python-docstrings", "max_passages": 40}})
    outcome = stages.corpus_stage(recipe, {}, tmp_path)
    full = load_builtin_corpus("builtin:python-docstrings")
    given = {json.loads(line)["id"] for line in (tmp_path / "generator-passages.jsonl").read_text().splitlines()}
    covered = load_beir(outcome.covered_queries)
    assert len(given) == 40 and set(covered.corpus) == set(full.passages)  # searched over every passage
    assert set(covered.queries) == {q for q, docs in full.real_queries.qrels.items() if set(docs) <= given}
    assert outcome.covered_query_count == len(covered.queries) > 0

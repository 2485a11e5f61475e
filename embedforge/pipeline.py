"""`embedforge run RECIPE.yaml`: compose the stage functions, cache each by a hash of its inputs and
config, and record every stage's typed outcome in a manifest.

Stages talk through files on disk. Each stage's output folder is named after the hash of
(stage name, its config, the hashes of its inputs), and is marked complete only after the stage
returns; a rerun therefore skips finished stages and restarts the one it was killed in (which
itself resumes from its own checkpoints or shards, inside a stable `work` folder).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from embedforge import __version__
from embedforge.errors import ConfigError, EmbedforgeError
from embedforge.io import read_json_file, write_json

logger = logging.getLogger(__name__)

COMPLETE = "COMPLETE.json"


def stable_hash(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:12]


def file_fingerprint(path: str | os.PathLike) -> str:
    """Content hash of a file, or of a folder's file names, sizes and mtimes (cheap for big models)."""
    path = Path(path)
    if path.is_file():
        h = hashlib.sha256()
        with open(path, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                h.update(block)
        return h.hexdigest()[:12]
    if path.is_dir():
        entries = sorted((str(p.relative_to(path)), p.stat().st_size, int(p.stat().st_mtime))
                         for p in path.rglob("*") if p.is_file())
        return stable_hash(entries)
    return stable_hash(str(path))  # a Hub id


StageFn = Callable[[dict[str, str], Path], Any]


@dataclass
class StageRun:
    name: str
    fn: StageFn
    config: dict[str, Any]
    inputs: dict[str, str]


class Pipeline:
    """Run stages in order; each is skipped when a completed run of the same hash exists.

    A stage function returns its typed outcome (a `StageOutcome`); the pipeline records its dump in
    the stage folder's COMPLETE marker and in the manifest, and hands it to the next stages."""

    def __init__(self, workdir: str | os.PathLike, recipe: dict[str, Any], *, strict: bool = False,
                 progress: Callable[[str], None] = print):
        self.workdir = Path(workdir)
        self.recipe = recipe
        self.strict = strict
        self.progress = progress
        self.manifest_path = self.workdir / "manifest.json"
        self.manifest: dict[str, Any] = {"embedforge": __version__, "recipe": recipe, "stages": {}}
        if self.manifest_path.exists():
            previous = read_json_file(self.manifest_path)
            self.manifest["stages"] = previous.get("stages", {})

    def stage_dir(self, run: StageRun) -> tuple[Path, str]:
        key = stable_hash({
            "stage": run.name,
            "config": run.config,
            "inputs": {k: file_fingerprint(v) for k, v in sorted(run.inputs.items())},
        })
        return self.workdir / f"{run.name}-{key}", key

    def run(self, run: StageRun) -> dict[str, Any]:
        out, key = self.stage_dir(run)
        done = out / COMPLETE
        if done.exists():
            record = read_json_file(done)
            self.progress(f"[{run.name}] cached ({out.name})")
            self.manifest["stages"][run.name] = record | {"cached": True}
            self._save()
            self._check(run.name, record["outcome"])
            return record["outcome"]
        out.mkdir(parents=True, exist_ok=True)
        self.progress(f"[{run.name}] running -> {out}")
        started = time.time()
        self.manifest["stages"][run.name] = {"status": "running", "dir": str(out), "key": key, "config": run.config,
                                             "inputs": run.inputs, "started": started}
        self._save()
        outcome = run.fn(run.inputs, out).model_dump(mode="json")
        record = {
            "status": "complete",
            "dir": str(out),
            "key": key,
            "config": run.config,
            "inputs": run.inputs,
            "outcome": outcome,
            "seconds": round(time.time() - started, 2),
        }
        write_json(done, record)
        self.manifest["stages"][run.name] = record
        self._save()
        self.progress(f"[{run.name}] done in {record['seconds']:.0f}s")
        self._check(run.name, outcome)
        return outcome

    def _check(self, name: str, outcome: dict[str, Any]) -> None:
        for warning in outcome.get("warnings", []):
            self.progress(f"[{name}] WARNING: {warning}")
        if self.strict and outcome.get("warnings"):
            raise EmbedforgeError(f"{name}: stopped by --strict: {'; '.join(outcome['warnings'])}")

    def warnings(self) -> list[str]:
        """Every stage's warnings, in pipeline order."""
        return [f"{name}: {w}" for name, record in self.manifest["stages"].items()
                for w in (record.get("outcome") or {}).get("warnings", [])]

    def _save(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        write_json(self.manifest_path, self.manifest)


def validate_recipe(recipe) -> None:
    """What can be checked before anything runs, beyond the schema: every path the recipe names
    exists, built-in names are known, and the stage configs the pipeline will build are valid."""
    from embedforge.builtin_data import BUILTIN_CORPORA
    from embedforge.offline_models import BUILTIN_MODELS

    def known(name: str, what: str, table) -> None:
        if name.startswith("builtin:"):
            if name.removeprefix("builtin:") not in table and name not in table:
                raise ConfigError(f"{what}: unknown {name!r}; known: {', '.join(sorted(map(str, table)))}")
        elif what.endswith("path") and not os.path.exists(name):
            raise ConfigError(f"{what}: {name}: no such file or folder")

    known(recipe.corpus.path, "corpus.path", BUILTIN_CORPORA)
    for what, name in (("model", recipe.model), ("synth.model", recipe.synth.model),
                       ("filter.teacher", recipe.filter.teacher), ("mine.model", recipe.mine.model)):
        if name and name.startswith("builtin:"):
            known(name, what, BUILTIN_MODELS)
    for i, data in enumerate(recipe.train.data):
        if not data.path.startswith("hf:"):
            known(data.path, f"train.data.{i}.path", {})
    for name in recipe.eval.sets:
        if name.startswith("builtin:"):
            known(name, "eval.sets", BUILTIN_CORPORA)
        elif name not in ("corpus", "covered", "heldout"):
            known(name, "eval.sets path", {})
    if recipe.train.launch is not None and recipe.train.launch.config_file:
        from embedforge.stages import accelerate_config

        accelerate_config(recipe.train.launch.config_file)
    for name in ("corpus", "covered"):
        if name in recipe.eval.sets and not recipe.corpus.path.startswith("builtin:"):
            raise ConfigError(f"eval.sets: `{name}` means the corpus's own real queries, which only built-in "
                              "corpora carry; list a BEIR folder of real queries instead")


def eval_sets(recipe, corpus: dict[str, Any], heldout: str | None, workdir: Path) -> dict[str, str]:
    """label -> BEIR folder for each `eval.sets` entry (real queries first, as the recipe lists them)."""
    from embedforge.builtin_data import load_builtin_corpus
    from embedforge.eval.beir import write_beir

    sets: dict[str, str] = {}
    for name in recipe.eval.sets:
        if name == "corpus":
            if not corpus.get("real_queries"):
                raise ConfigError(f"eval.sets: corpus: {recipe.corpus.path} has no real queries; list a BEIR "
                                  "folder of real queries, or `heldout` for synthetic ones")
            sets[f"{recipe.corpus.path.removeprefix('builtin:')} (real queries)"] = corpus["real_queries"]
        elif name == "covered":
            if not corpus.get("covered_queries"):
                raise ConfigError(f"eval.sets: covered: {recipe.corpus.path} has no real queries")
            sets[f"{recipe.corpus.path.removeprefix('builtin:')} (real queries, generator's passages)"] = (
                corpus["covered_queries"])
        elif name == "heldout":
            sets["heldout (synthetic queries)"] = heldout or ""
        elif name.startswith("builtin:"):
            folder = workdir / "eval-sets" / name.removeprefix("builtin:")
            if not (folder / "qrels").is_dir():
                data = load_builtin_corpus(name).real_queries
                if data is None:
                    raise ConfigError(f"eval.sets: {name} has no real queries")
                write_beir(folder, data, overwrite=True)
            sets[f"{name.removeprefix('builtin:')} (real queries)"] = str(folder)
        else:
            sets[Path(name).name] = name
    return sets


def run_recipe(recipe, *, workdir: str | os.PathLike | None = None, progress: Callable[[str], None] = print,
               strict: bool | None = None) -> dict:
    """corpus -> synth -> filter -> [split] -> mine -> base -> train -> merge -> eval -> export;
    returns the manifest (with every stage's outcome and the warnings in pipeline order)."""
    from functools import partial

    from embedforge import stages

    workdir = Path(workdir or recipe.workdir.format(name=recipe.name))
    pipe = Pipeline(workdir, recipe.model_dump(by_alias=True, mode="json"),
                    strict=recipe.strict if strict is None else strict, progress=progress)
    common = {"model": recipe.model, "task": recipe.task, "instruction": recipe.instruction}

    def step(name: str, section: Any, inputs: dict[str, str], fn) -> dict[str, Any]:
        config = common | {"section": section.model_dump(by_alias=True, mode="json") if section is not None else None}
        return pipe.run(StageRun(name, partial(fn, recipe), config, inputs))

    corpus_inputs = {} if recipe.corpus.path.startswith("builtin:") else {"corpus": recipe.corpus.path}
    corpus = step("corpus", recipe.corpus, corpus_inputs, stages.corpus_stage)
    passages = corpus["output"]
    # The contamination gate compares synthetic rows with the held-out QUERIES only: in domain
    # adaptation the search corpus is the training corpus by design.
    real_queries = [str(Path(corpus["real_queries"]) / "queries.jsonl")] if corpus.get("real_queries") else []
    train_inputs: dict[str, str] = {}
    heldout = None
    if recipe.synth.enabled:
        generator_passages = str(Path(passages).with_name("generator-passages.jsonl"))
        pairs = step("synth", recipe.synth, {"passages": generator_passages}, stages.synth_stage)["output"]
        if recipe.filter.enabled:
            filtered = step("filter", recipe.filter, {"pairs": pairs, "eval_sets": json.dumps(real_queries)},
                            stages.filter_stage)
            pairs = str(Path(filtered["output"]) / "pairs.jsonl")
        else:  # the synthetic rows as written: the pipeline synthesises in one process, so one shard file
            shards = sorted(Path(pairs).glob("pairs-*-of-*.jsonl"))
            pairs = str(shards[0]) if len(shards) == 1 else pairs
        if "heldout" in recipe.eval.sets:
            split = step("split", recipe.split, {"pairs": pairs, "passages": passages}, stages.split_stage)
            heldout, pairs = split["heldout"], split["output"]
        train_inputs = {"train": pairs}
        if recipe.mine.enabled:
            mined = step("mine", recipe.mine, {**train_inputs, "passages": passages}, stages.mine_stage)
            files = mined.get("files") or []
            train_inputs = {"train": files[0] if len(files) == 1 else mined["output"]}
    base = step("base", None, {}, stages.base_stage)["output"]
    trained = step("train", recipe.train, train_inputs, stages.train_stage)
    models = {"base": base, "trained": trained["output"]}
    if recipe.merge.enabled and recipe.task == "embedding":
        inputs = {"base": base, "model": trained["output"], "checkpoints": json.dumps(trained["checkpoints"])}
        models["merged"] = step("merge", recipe.merge, inputs, stages.merge_stage)["output"]
    final = models.get("merged", models["trained"])
    results: list[str] = []
    sets = eval_sets(recipe, corpus, heldout, workdir)
    if sets:
        inputs = {"models": json.dumps(models), "sets": json.dumps(sets)} | {f"set:{k}": v for k, v in sets.items()}
        evaluated = step("eval", recipe.eval, inputs, stages.eval_stage)
        results = evaluated["results"]
        progress("\n" + evaluated["markdown"])
    if recipe.export.enabled:
        final_label = "merged" if "merged" in models else "trained"
        final_results = [r for r in results if Path(r).name.startswith(f"{final_label}-")]
        exported = step("export", recipe.export, {"model": final, "eval_results": json.dumps(final_results)},
                        stages.export_stage)
        progress(f"exported model: {exported['output']}")
    warnings = pipe.warnings()
    if warnings:
        progress("\nwarnings, in pipeline order:\n" + "\n".join(f"  - {w}" for w in warnings))
    pipe.manifest["warnings"] = warnings
    pipe._save()
    return pipe.manifest

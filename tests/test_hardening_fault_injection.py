"""Fault injection: a tiny `embedforge run` (synth -> filter -> train -> merge -> export) is killed
with SIGKILL at chosen points of every stage, including inside synthetic-row appends, checkpoint
writes and model-folder writes, and rerun with the same command each time. Afterwards:

(a) the trained, merged and exported weights are bitwise those of a run that was never interrupted;
(b) the synthetic rows and the filtered training rows are, as multisets, those of that run (none
    duplicated, none lost);
(c) after every kill, each folder holding weights is either a named temporary (`*.tmp`, removed by
    the rerun) or complete (the same files and weights as the uninterrupted run's folder), or does
    not load as a model.

The kills are planted, not timed: `fault_workers/faulty_embedforge.py` runs the `embedforge` command
with a hook that SIGKILLs the process at the Nth time it reaches a point (EMBEDFORGE_TEST_KILL).
Every process runs on one thread (OMP_NUM_THREADS=1, torch.set_num_threads(1)), so the same float
operations happen in the same order in every run and bitwise equality is the right test: a resumed
trainer restores weights, optimizer, scheduler, RNG and sampler state exactly (see
test_train_signals.py), greedy generation does not depend on the batch a passage lands in
(test_synth_backends.py), and merge and export are deterministic functions of their inputs.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

WORKER = Path(__file__).parent / "fault_workers" / "faulty_embedforge.py"
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
TOPICS = ["python lists", "rust ownership", "sql joins", "http caching", "git rebase", "unit tests",
          "docker images", "tcp handshake"]
STEPS, SAVE_STEPS = 6, 2


def launch(args: list[str], kill: str | None = None, timeout: float = 240) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", HF_HUB_OFFLINE="1",
               TOKENIZERS_PARALLELISM="false", PYTHONUNBUFFERED="1")
    env.pop("EMBEDFORGE_TEST_KILL", None)
    if kill:
        env["EMBEDFORGE_TEST_KILL"] = kill
    return subprocess.run([sys.executable, str(WORKER), *args], env=env, capture_output=True, text=True,
                          timeout=timeout, check=False)


def killed(args: list[str], kill: str) -> None:
    """Run with the kill planted; it must have struck (a run that ends otherwise proves nothing)."""
    done = launch(args, kill)
    assert done.returncode == -signal.SIGKILL, (
        f"{kill}: exit {done.returncode}, the kill point was not reached:\n{done.stdout[-3000:]}{done.stderr[-3000:]}")


@pytest.fixture(scope="module")
def world(tmp_path_factory, tiny_qwen3_embedder, tiny_qwen3_lm):
    root = tmp_path_factory.mktemp("faults")
    chat = root / "chat-lm"
    shutil.copytree(tiny_qwen3_lm, chat)
    tokenizer_config = json.loads((chat / "tokenizer_config.json").read_text())
    (chat / "tokenizer_config.json").write_text(json.dumps(tokenizer_config | {"chat_template": CHAT_TEMPLATE}))
    corpus = root / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"id": f"d{i}", "text": f"A note on {t}: what they are and how to use "
                                          "them."}) + "\n" for i, t in enumerate(TOPICS)))
    recipe = root / "recipe.yaml"
    recipe.write_text(json.dumps({
        "name": "faults", "model": str(tiny_qwen3_embedder), "instruction": None,
        "corpus": {"path": str(corpus), "chunk_tokens": None},
        # sampled (distinct queries to train on: the random LM mostly writes "@" or "="; batches of two),
        # one passage per generator batch: a batch's random generator is
        # seeded by its members, so only then is a passage's reply independent of where a resume cut
        # the batches (test_sampled_synthesis_resumed_mid_batch_... covers batches of several)
        "synth": {"model": str(chat), "judge": None, "persona_embedder": None, "temperature": 1.0,
                  "max_new_tokens": 24, "batch_size": 1, "dtype": "float32", "device": "cpu"},
        "filter": {"near_dup_threshold": None, "copy_max_ratio": None, "cosine_threshold": None,
                   "roundtrip_k": None},
        "mine": {"enabled": False},
        "train": {"method": "full", "batch_size": 2, "max_steps": STEPS, "lr": 1e-3, "save_steps": SAVE_STEPS,
                  "save_total_limit": 10, "max_length": 32, "progress_bar": False, "seed": 3},
        "merge": {"with": "base", "t": 0.5},
        "eval": {"sets": []},
    }))
    reference = root / "reference"
    done = launch(["run", str(recipe), "--workdir", str(reference)])
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    ids = [r["passage_id"] for r in synth_rows(reference)]
    assert len(set(ids)) > len(TOPICS) // 2  # rows from most passages: a kill has something to lose
    return root, recipe, reference


# --- what the invariants read ------------------------------------------------------------------


def stage(workdir: Path, name: str) -> Path:
    found = [p for p in workdir.glob(f"{name}-*") if p.is_dir()]
    assert len(found) == 1, f"expected one {name} stage folder in {workdir}, got {found}"
    return found[0]


def counterpart(path: Path, workdir: Path, reference: Path) -> Path:
    """The same folder in the reference run: stage folders are named by a hash of their inputs, which
    for model folders includes file times, so they are matched by stage name."""
    first, *rest = path.relative_to(workdir).parts
    return stage(reference, first.rsplit("-", 1)[0]).joinpath(*rest)


def jsonl(path: Path, workdir: Path) -> list[str]:
    """Rows as text with the run's own workdir made neutral (provenance names the passages file)."""
    return [line.replace(str(workdir), "WORKDIR") for line in path.read_text().splitlines() if line.strip()]


def synth_rows(workdir: Path) -> list[dict]:
    return [json.loads(line) for shard in sorted((stage(workdir, "synth") / "work").glob("pairs-*.jsonl"))
            for line in jsonl(shard, workdir)]


def files(folder: Path) -> set[str]:
    return {str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file()}


def same_weights(folder: Path, other: Path) -> bool:
    weights = sorted(p.name for p in folder.glob("*.safetensors"))
    return bool(weights) and weights == sorted(p.name for p in other.glob("*.safetensors")) and all(
        (folder / w).read_bytes() == (other / w).read_bytes() for w in weights)


def loads(folder: Path) -> bool:
    from embedforge.embedder import Embedder

    try:
        Embedder.from_pretrained(str(folder), dtype="float32")
    except Exception:  # noqa: BLE001 - any failure to load is what a partial folder should give
        return False
    return True


def assert_no_partial_model(workdir: Path, reference: Path) -> None:
    """(c): a folder holding weights is a named temporary, or complete, or does not load."""
    for folder in sorted({p.parent for p in workdir.rglob("*.safetensors")}):
        rel = folder.relative_to(workdir)
        if any(part.endswith(".tmp") for part in rel.parts):
            continue  # a temporary, by its name; the rerun removes it
        ref = counterpart(folder, workdir, reference)
        complete = ref.is_dir() and files(folder) == files(ref) and same_weights(folder, ref)
        assert complete or not loads(folder), f"{rel}: a partial model folder that loads"


def assert_same_outputs(workdir: Path, reference: Path) -> None:
    """(a) and (b), and no temporary left behind."""
    manifest = json.loads((workdir / "manifest.json").read_text())
    assert all(s["status"] == "complete" for s in manifest["stages"].values()), manifest["stages"]
    left = [str(p.relative_to(workdir)) for p in workdir.rglob("*.tmp")]
    assert not left, f"temporaries left after the rerun: {left}"
    got = Counter(json.dumps(r, sort_keys=True) for r in synth_rows(workdir))
    want = Counter(json.dumps(r, sort_keys=True) for r in synth_rows(reference))
    assert got == want, f"synthetic rows: extra {got - want}, lost {want - got}"
    filtered = stage(workdir, "filter") / "work" / "pairs.jsonl"
    got = Counter(jsonl(filtered, workdir))
    want = Counter(jsonl(counterpart(filtered, workdir, reference), reference))
    assert got == want, f"training rows: extra {got - want}, lost {want - got}"
    for folder in (stage(workdir, "train") / "work" / "final", stage(workdir, "merge") / "model",
                   stage(workdir, "export") / "model", *sorted((stage(workdir, "train") / "work")
                                                          .glob("checkpoint-*/model"))):
        ref = counterpart(folder, workdir, reference)
        assert same_weights(folder, ref), f"{folder.relative_to(workdir)}: weights differ from the uninterrupted run"
        assert files(folder) == files(ref), f"{folder.relative_to(workdir)}: {files(folder) ^ files(ref)}"


# --- the kills ---------------------------------------------------------------------------------

# In order along one workdir: each rerun resumes what the kill before left and goes further.
CHAIN = [
    "append:3",  # synth: two passages done, killed before the third is appended
    "torn-append:3",  # synth, resumed: the third append of this attempt torn in half by the kill
    r"json:1:/synth-[^/]+/COMPLETE\.json$",  # synth finished, killed before the stage is marked done
    "metrics:3",  # train: killed after step 3, between the checkpoints of steps 2 and 4
    r"safetensors:1:/checkpoint-\d+\.tmp/",  # train, resumed from step 2: inside the checkpoint-4 weights write
    r"safetensors:1:/work/\.final\.",  # train: inside the final model's weights write
    r"json:1:/train-[^/]+/COMPLETE\.json$",  # train finished, killed before the stage is marked done
    "merge-tensor:5",  # merge: five tensors of the merged model streamed to its temporary folder
    r"rename:1:/merge-[^/]+/model$",  # merge: the complete temporary about to become merge-*/model
    r"safetensors:1:/export-[^/]+/\.model\.",  # export: inside the exported weights write
    r"rename:1:/export-[^/]+/model$",  # export: the checked folder about to become export-*/model
]


def test_killed_in_every_stage_the_rerun_ends_as_an_uninterrupted_run(world):
    root, recipe, reference = world
    workdir = root / "chain"
    args = ["run", str(recipe), "--workdir", str(workdir)]
    for kill in CHAIN:
        killed(args, kill)
        assert_no_partial_model(workdir, reference)
    done = launch(args)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert_same_outputs(workdir, reference)


def test_a_kill_while_the_base_model_is_written_leaves_no_folder_that_loads(world):
    root, recipe, reference = world
    workdir = root / "base-kill"
    for name in ("corpus", "synth", "filter"):  # finished stages, reused as a rerun would
        shutil.copytree(stage(reference, name), workdir / stage(reference, name).name)
    killed(["run", str(recipe), "--workdir", str(workdir)], "st-config:1:/base-")
    base = stage(workdir, "base")  # killed mid-save: the weights are written, in a temporary only
    assert not (base / "model").exists() and list(base.glob(".model.*.tmp/model.safetensors"))
    assert_no_partial_model(workdir, reference)


def test_sampled_synthesis_resumed_mid_batch_gives_the_rows_of_an_uninterrupted_run(world, tmp_path):
    root, _, _ = world
    args = ["synth", "--corpus", str(root / "corpus.jsonl"), "--model", str(root / "chat-lm"), "--judge", "none",
            "--persona-embedder", "none", "--temperature", "1.0", "--max-new-tokens", "24", "--batch-size", "4",
            "--dtype", "float32", "--device", "cpu", "--chunk-tokens", "none"]
    done = launch([*args, "--output", str(tmp_path / "whole")])
    assert done.returncode == 0, done.stderr[-3000:]
    killed([*args, "--output", str(tmp_path / "resumed")], "append:2")  # one row of the first batch of four
    done = launch([*args, "--output", str(tmp_path / "resumed")])
    assert done.returncode == 0, done.stderr[-3000:]

    def rows(folder: Path) -> Counter:
        return Counter(json.dumps(json.loads(line), sort_keys=True) for line in jsonl(
            folder / "pairs-00000-of-00001.jsonl", folder))

    got, want = rows(tmp_path / "resumed"), rows(tmp_path / "whole")
    assert got == want, f"synthetic rows: extra {sorted(got - want)}, lost {sorted(want - got)}"


def test_without_the_filter_the_synthetic_rows_train_as_written(world):
    """filter.enabled: false hands train the synthesis shard itself (it once handed it the folder)."""
    root, recipe, reference = world
    workdir = root / "no-filter"
    for name in ("corpus", "synth"):  # finished stages, reused as a rerun would
        shutil.copytree(stage(reference, name), workdir / stage(reference, name).name)
    done = launch(["run", str(recipe), "--workdir", str(workdir), "--set", "filter.enabled=false"])
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert not list(workdir.glob("filter-*"))
    trained = json.loads((stage(workdir, "train") / "work" / "train_result.json").read_text())
    assert trained["steps"] == STEPS

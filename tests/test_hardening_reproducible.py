"""The same recipe gives the same data: synthesis rows do not depend on the order replies arrive in.

A generator served over HTTP answers concurrent requests in whatever order they finish. Two runs
of synth + filter whose replies come back in different orders must write byte-identical pairs:
the near-duplicate gate keeps the first of two equal queries, so rows in reply order would let
the scheduler pick which passage keeps its query."""

from __future__ import annotations

import asyncio
import json
import random
import re

from embedforge.data_synth import FilterConfig, SynthConfig, filter_pairs, synthesize
from embedforge.data_synth.backends.base import Result

N_PASSAGES = 24
WORDS = ("amber", "basalt", "cobalt", "dune", "ember", "fjord", "garnet", "harbor", "indigo", "jasper", "kelp",
         "lagoon", "marble", "nectar", "onyx", "pepper", "quartz", "russet", "saffron", "tundra", "umber",
         "violet", "walnut", "yarrow")


def reply(messages) -> str:
    """Passages n and n + 6 get the same question: one of each pair is a near-duplicate."""
    n = int(re.search(r"passage number (\d+)", messages[-1]["content"])[1])
    return json.dumps({
        "topic": f"valve {n}",
        "question": f"why does the {WORDS[n % 6]} valve let {WORDS[-1 - n % 6]} oil pass?",
        "keywords": f"{WORDS[n]} gasket",
        "summary": f"an overview of {WORDS[n]} seals",
    })


class ShuffledServer:
    """A small generator behind a server that finishes requests in a seeded random order."""

    name = "scripted"
    model = "shuffled-server"
    batch_size = 1
    num_parameters = 135_000_000  # the one-call strategy, as for SmolLM2

    def __init__(self, seed: int):
        self.rng = random.Random(seed)
        self.finished: list[str] = []  # passage numbers in reply order

    def async_caller(self):
        server = self

        class Caller:
            async def complete(self, messages, params, seed):
                await asyncio.sleep(server.rng.random() * 0.02)
                text = reply(messages)
                server.finished.append(json.loads(text)["topic"])
                return Result(text)

            async def aclose(self):
                pass

        return Caller()

    def close(self):
        pass


def run_once(tmp_path, name: str, seed: int) -> tuple[bytes, bytes, list[str]]:
    corpus = tmp_path / "corpus.jsonl"
    if not corpus.exists():
        corpus.write_text("".join(json.dumps({"id": f"d{n}", "text": f"passage number {n} on hydraulic valves."})
                                  + "\n" for n in range(N_PASSAGES)))
    server = ShuffledServer(seed)
    synth_out = tmp_path / f"synth-{name}"
    outcome = synthesize(SynthConfig(corpus=str(corpus), output=str(synth_out), judge=None, max_inflight=N_PASSAGES),
                         backend=server)
    assert outcome.status == "complete" and outcome.rows == 3 * N_PASSAGES
    filtered = tmp_path / f"filter-{name}"
    kept = filter_pairs(FilterConfig(input=[str(synth_out)], output=str(filtered), cosine_threshold=None,
                                     roundtrip_k=None))
    assert kept.dropped["near_duplicate"] == N_PASSAGES - 6  # the gate had winners to choose
    return (synth_out / "pairs-00000-of-00001.jsonl").read_bytes(), (filtered / "pairs.jsonl").read_bytes(), \
        server.finished


def test_replies_in_another_order_give_byte_identical_synthetic_and_filtered_pairs(tmp_path):
    synth_a, kept_a, order_a = run_once(tmp_path, "a", seed=1)
    synth_b, kept_b, order_b = run_once(tmp_path, "b", seed=2)
    assert order_a != order_b  # the replies did arrive in different orders
    assert kept_a == kept_b  # the training data
    assert synth_a == synth_b  # and the synthetic rows themselves
    positives = [json.loads(line)["positive"] for line in kept_a.decode().splitlines()]
    questions = [p for p in positives if "passage number" in p]
    assert len(questions) == len(positives)
    # corpus order: of each pair of equal questions, the earlier passage keeps it
    winners = {json.loads(line)["passage_id"] for line in kept_a.decode().splitlines()
               if json.loads(line)["provenance"]["sampled"]["question_type"] == "acquire_knowledge"}
    assert winners == {f"d{n}#0" for n in range(6)}

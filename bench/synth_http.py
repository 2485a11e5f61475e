"""Throughput of `embedforge synth --backend openai` against a local `transformers serve` running
SmolLM2-135M-Instruct on CPU, at concurrency 1, 8 and 32, against a peer measured in the same run:
the loop most scripts write (the official `openai` client, one request at a time, the same two
prompts per passage, `json.loads` on the reply).

GPU vLLM is not measured: this machine has no GPU. On a GPU host, point --base-url at `vllm serve`
(and pass --no-server) to measure it the same way.

    python bench/synth_http.py                       # starts and stops the server itself
    python bench/synth_http.py --levels 1 8 --passages 8
    python bench/synth_http.py --continuous-batching --levels 8 32
Results: bench/results/synth_http.{json,md} (synth_http_cb.* with --continuous-batching)
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

TOPICS = [
    "Photosynthesis turns sunlight, water and carbon dioxide into glucose and oxygen in the chloroplasts.",
    "A volcano is an opening in the crust through which molten rock, ash and gases escape.",
    "Bread rises because yeast ferments sugars and releases carbon dioxide trapped by gluten.",
    "Castling moves the king two squares towards a rook, which jumps over to the other side.",
    "Tides are caused mainly by the gravitational pull of the Moon on the oceans.",
    "The violin has four strings tuned in perfect fifths and is played with a horsehair bow.",
    "Inflation is the rate at which the general level of prices for goods and services rises.",
    "Glaciers form where snow accumulates faster than it melts and compacts into ice over years.",
]


def passages(n: int):
    from embedforge.data_synth.corpus import Passage

    return [
        Passage(id=f"p{i}#0", text=f"{TOPICS[i % len(TOPICS)]} (Note {i}.)", doc_id=f"p{i}") for i in range(n)
    ]


def run_ours(base_url: str, model: str, n: int, concurrency: int, max_new_tokens: int, work: Path) -> dict:
    from embedforge.data_synth.backends.openai_http import OpenAIHTTPBackend
    from embedforge.data_synth.generate import SynthConfig, SynthesisRun
    from embedforge.data_synth.personas import PersonaRetriever, load_personas

    config = SynthConfig(
        max_new_tokens=max_new_tokens, temperature=0.7, max_attempts=2, max_inflight=concurrency
    )
    backend = OpenAIHTTPBackend(
        model, base_url, concurrency=concurrency, timeout_s=600, max_retries=2, api_key_env=None
    )
    began = time.monotonic()
    report = SynthesisRun(config, backend, work, PersonaRetriever(load_personas())).run(passages(n))
    wall = time.monotonic() - began
    return {
        "passages": n,
        "pairs": report.rows_written,
        "failed": sum(report.passages_failed.values()),
        "pending": report.pending,
        "llm_calls": report.llm_calls,
        "wall_s": round(wall, 2),
        "pairs_per_min": round(60 * report.rows_written / wall, 2),
        "passages_per_min": round(60 * (n - report.pending) / wall, 2),
        "invalid_outputs": report.invalid_outputs,
        "transport_failures": report.transport_failures,
    }


def run_peer(base_url: str, model: str, n: int, max_new_tokens: int) -> dict:
    """The common sequential script: openai client, same rendered prompts, no retries."""
    from openai import OpenAI

    from embedforge.data_synth.generate import QUESTION_TYPE_HELP, SynthConfig, plan_passage
    from embedforge.data_synth.personas import PersonaRetriever, load_personas
    from embedforge.data_synth.prompt_templates import load_template

    client = OpenAI(base_url=base_url, api_key="none", timeout=600, max_retries=0)
    retriever = PersonaRetriever(load_personas())
    config_t, query_t = load_template("retrieval_config"), load_template("retrieval_query")
    pairs = calls = 0
    began = time.monotonic()
    for passage in passages(n):
        personas = retriever.retrieve([passage.text])[0]
        plan = plan_passage(passage.id, SynthConfig())
        msgs = config_t.render(
            passage=passage.text, personas="\n".join(f"{i}. {p.text}" for i, p in enumerate(personas, 1))
        )
        calls += 1
        reply = (
            client.chat.completions.create(
                model=model, messages=msgs, temperature=0.7, max_tokens=max_new_tokens
            )
            .choices[0]
            .message.content
        )
        try:
            chosen = json.loads(reply)
            qtype = chosen["question_type"]
            msgs = query_t.render(
                character=chosen["character"],
                passage=passage.text,
                question_type=qtype,
                question_type_help=QUESTION_TYPE_HELP[qtype],
                difficulty=chosen["difficulty"],
                length=plan.length,
                language="English",
            )
        except (ValueError, KeyError, TypeError):
            continue
        calls += 1
        reply = (
            client.chat.completions.create(
                model=model, messages=msgs, temperature=0.7, max_tokens=max_new_tokens
            )
            .choices[0]
            .message.content
        )
        try:
            pairs += bool(json.loads(reply)["query"])
        except (ValueError, KeyError, TypeError):
            pass
    wall = time.monotonic() - began
    return {
        "passages": n,
        "pairs": pairs,
        "llm_calls": calls,
        "wall_s": round(wall, 2),
        "pairs_per_min": round(60 * pairs / wall, 2),
        "passages_per_min": round(60 * n / wall, 2),
    }


def warm_up(base_url: str, model: str) -> None:
    """Two untimed requests, so neither side pays for the server's first-request setup."""
    from openai import OpenAI

    client = OpenAI(base_url=base_url, api_key="none", timeout=600, max_retries=0)
    for _ in range(2):
        client.chat.completions.create(
            model=model, messages=[{"role": "user", "content": "Say hello."}], max_tokens=8
        )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--levels", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument(
        "--passages", type=int, default=None, help="passages per level (default: max(6, level))"
    )
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--base-url", default=None, help="use a running server instead of starting one")
    parser.add_argument(
        "--model", default=None, help="model name the server expects (default: SmolLM2 folder)"
    )
    parser.add_argument(
        "--continuous-batching",
        action="store_true",
        help="start the server with --continuous-batching (results go to synth_http_cb.*)",
    )
    parser.add_argument("--results", default=os.environ.get("EMBEDFORGE_BENCH_RESULTS") or str(Path(__file__).parent / "results"))
    args = parser.parse_args()

    from embedforge.data_synth.backends.local_server import LocalServer, free_port, transformers_serve_command
    from embedforge.offline_models import smollm2_folder

    model = args.model or str(smollm2_folder())
    server = None
    base_url = args.base_url
    with tempfile.TemporaryDirectory(prefix="synth-http-") as tmp:
        tmp = Path(tmp)
        if base_url is None:
            port = free_port()
            extra = ["--continuous-batching"] if args.continuous_batching else []
            server = LocalServer(
                transformers_serve_command(model, "127.0.0.1", port, extra_args=extra),
                port,
                log_path=tmp / "server.log",
            ).start()
            base_url = server.base_url
        try:
            warm_up(base_url, model)
            results = {}
            n_peer = args.passages or 6
            results["peer_sequential_openai_client"] = run_peer(base_url, model, n_peer, args.max_new_tokens)
            for level in args.levels:
                n = args.passages or max(6, level)
                results[f"ours_concurrency_{level}"] = run_ours(
                    base_url, model, n, level, args.max_new_tokens, tmp / f"c{level}"
                )
                print(level, results[f"ours_concurrency_{level}"], flush=True)
        finally:
            if server is not None:
                server.stop()
    peer_rate = results["peer_sequential_openai_client"]["passages_per_min"]
    mode = "--continuous-batching" if args.continuous_batching else "default, no continuous batching"
    name = "synth_http_cb" if args.continuous_batching else "synth_http"
    record = {
        "benchmark": "synth_http",
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "server": f"transformers serve ({mode}), SmolLM2-135M-Instruct, CPU"
        if args.base_url is None
        else f"external server at {base_url}",
        "device": f"CPU ({platform.machine()}, {os.cpu_count()} cores visible, "
        f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}, machine shared with other jobs)",
        "settings": {
            "task": "retrieval (2 calls per pair)",
            "max_new_tokens": args.max_new_tokens,
            "temperature": 0.7,
        },
        "gpu_vllm": "not measured: no GPU on this machine",
        "results": results,
        "ratios_passages_per_min_vs_peer": {
            k: round(v["passages_per_min"] / peer_rate, 3) for k, v in results.items() if k.startswith("ours")
        },
    }
    out = Path(args.results)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.json").write_text(json.dumps(record, indent=2) + "\n")
    (out / f"{name}.md").write_text(markdown(record))
    print(markdown(record))


def markdown(record: dict) -> str:
    lines = [
        "# Synthesis throughput through the HTTP backend",
        "",
        f"{record['date']}; {record['device']}.",
        f"Server: {record['server']}. Settings: {json.dumps(record['settings'])}.",
        f"GPU vLLM: {record['gpu_vllm']}.",
        "",
        "| client | passages | valid pairs | LLM calls | wall s | pairs/min | passages/min | vs peer |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    ratios = record["ratios_passages_per_min_vs_peer"]
    for name, r in record["results"].items():
        lines.append(
            f"| {name} | {r['passages']} | {r['pairs']} | {r['llm_calls']} | {r['wall_s']} | "
            f"{r['pairs_per_min']} | {r['passages_per_min']} | {ratios.get(name, 1.0)} |"
        )
    lines += [
        "",
        (
            "passages/min counts every passage finished (valid pair or given up after retries); "
            "pairs/min only valid pairs. The peer makes no retries, so it finishes failed passages sooner."
        ),
    ]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()

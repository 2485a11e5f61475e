"""Benchmark: peak memory of merging multi-GB checkpoints, streaming vs mergekit vs loading everything.

Writes synthetic Qwen3-shaped checkpoints (hidden 4096, intermediate 12288, as Qwen3-8B; a few
layers and a small vocabulary keep each near 1.7 GB in bfloat16, with 64 tensors of 8-128 MB) to
a scratch folder, then runs every merge in its own process and records that process's peak
resident memory (ru_maxrss from wait4, which counts memory-mapped file pages too) and its peak
anonymous memory (sampled from /proc every 20 ms). Peers in the same run, on the same files:

- mergekit (`mergekit-yaml`), if importable (or found under --mergekit-pythonpath), at its default
  output shard size (5B parameters, which holds the whole output here) and at 200M parameters;
- a naive baseline: `safetensors.torch.load_file` every input, merge all tensors with the same
  embedforge.merge.methods functions, `save_file` the result (what a short merge script does).

    python bench/merge_memory.py                          # ~6 GB of scratch in /tmp, deleted after
    python bench/merge_memory.py --mergekit-pythonpath /tmp/mergekit_pkgs

Results: bench/results/merge_memory.json and .md.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

RESULTS = Path(os.environ.get("EMBEDFORGE_BENCH_RESULTS") or Path(__file__).parent / "results")
MB = 1024**2


def qwen3_config(hidden: int, intermediate: int, layers: int, vocab: int) -> dict:
    return {
        "architectures": ["Qwen3ForCausalLM"],
        "model_type": "qwen3",
        "hidden_size": hidden,
        "intermediate_size": intermediate,
        "num_hidden_layers": layers,
        "num_attention_heads": hidden // 128,
        "num_key_value_heads": hidden // 512,
        "head_dim": 128,
        "vocab_size": vocab,
        "max_position_embeddings": 4096,
        "rms_norm_eps": 1e-6,
        "rope_theta": 1000000.0,
        "tie_word_embeddings": False,
        "hidden_act": "silu",
        "dtype": "bfloat16",
    }


def qwen3_shapes(config: dict) -> dict[str, tuple[int, ...]]:
    h, i, v = config["hidden_size"], config["intermediate_size"], config["vocab_size"]
    q, kv, d = config["num_attention_heads"] * 128, config["num_key_value_heads"] * 128, 128
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (v, h)}
    for layer in range(config["num_hidden_layers"]):
        p = f"model.layers.{layer}."
        shapes.update(
            {
                p + "input_layernorm.weight": (h,),
                p + "self_attn.q_proj.weight": (q, h),
                p + "self_attn.k_proj.weight": (kv, h),
                p + "self_attn.v_proj.weight": (kv, h),
                p + "self_attn.o_proj.weight": (h, q),
                p + "self_attn.q_norm.weight": (d,),
                p + "self_attn.k_norm.weight": (d,),
                p + "post_attention_layernorm.weight": (h,),
                p + "mlp.gate_proj.weight": (i, h),
                p + "mlp.up_proj.weight": (i, h),
                p + "mlp.down_proj.weight": (h, i),
            }
        )
    shapes.update({"model.norm.weight": (h,), "lm_head.weight": (v, h)})
    return shapes


def setup_stats(config: dict, shard_bytes: int) -> dict:
    """Sizes of one synthetic checkpoint, from its shapes (bfloat16: 2 bytes an element)."""
    sizes = sorted((2 * math.prod(shape) for shape in qwen3_shapes(config).values()), reverse=True)
    shards, current = 1, 0
    for size in sizes:  # the writer's greedy split (order differs, count is what is reported)
        if current and current + size > shard_bytes:
            shards, current = shards + 1, 0
        current += size
    return {
        "tensors": len(sizes),
        "bytes_per_checkpoint": sum(sizes),
        "largest_tensor_bytes": sizes[0],
        "tensors_of_64MB_or_more": sum(s >= 64 * MB for s in sizes),
    }


def worker_make(root: Path, config: dict, shard_bytes: int) -> None:
    """A random base and fine-tune-like variants (base + 2% noise), written tensor by tensor."""
    import torch

    from embedforge.merge.stream import INDEX_NAME, ShardedWriter, TensorInfo

    if all((root / name / INDEX_NAME).exists() for name in CHECKPOINTS):
        print("reused")  # written by an earlier run in this --workdir (same seed, same data)
        return
    infos = [TensorInfo(n, s, torch.bfloat16) for n, s in qwen3_shapes(config).items()]
    writers = []
    for name in CHECKPOINTS:
        shutil.rmtree(root / name, ignore_errors=True)
        (root / name).mkdir(parents=True)
        (root / name / "config.json").write_text(json.dumps(config))
        writers.append(ShardedWriter(root / name, infos, shard_bytes))
    g = torch.Generator().manual_seed(0)
    for info in infos:
        base = torch.randn(info.shape, generator=g) * 0.02
        for k, writer in enumerate(writers):
            tensor = base if k == 0 else base + 0.0004 * torch.randn(info.shape, generator=g)
            writer.write(info.name, tensor.to(torch.bfloat16))
            del tensor
        del base
    for writer in writers:
        writer.finish()


CHECKPOINTS = ("base", "m1", "m2", "m3")
SCENARIOS = {
    # name: (models, base, method, peer method in mergekit or None)
    "slerp-2": (["m1", "m2"], None, "slerp", "slerp"),
    "linear-3": (["m1", "m2", "m3"], None, "linear", "linear"),
    "slerp-deltas-3": (["m1", "m2", "m3"], "base", "slerp", None),
}


# ---------------------------------------------------------------- workers (run in a child process)


def worker_ours(root: Path, scenario: str, out: Path) -> None:
    from embedforge.merge import MergeConfig, merge

    models, base, method, _ = SCENARIOS[scenario]
    kwargs = {"t": 0.5} if method == "slerp" and len(models) == 2 else {"weights": [1.0] * len(models)}
    merge(
        MergeConfig(
            models=[root / m for m in models],
            base=root / base if base else None,
            method=method,
            output=out,
            show_progress=False,
            **kwargs,
        )
    )


def worker_naive(root: Path, scenario: str, out: Path) -> None:
    """Load every input fully, merge with the same math, save with safetensors' save_file."""
    from safetensors.torch import load_file, save_file

    from embedforge.merge import methods

    def load(folder: Path) -> dict:
        index = folder / "model.safetensors.index.json"
        files = (
            sorted(set(json.loads(index.read_text())["weight_map"].values()))
            if index.exists()
            else ["model.safetensors"]
        )
        state = {}
        for file in files:
            state.update(load_file(folder / file))
        return state

    models, base, method, _ = SCENARIOS[scenario]
    states = [load(root / m) for m in models]
    base_state = load(root / base) if base else None
    merged = {}
    for name in states[0]:
        tensors = [s[name] for s in states]
        if method == "slerp" and base_state is not None:
            coefficients, _ = methods.spherical_coefficients(
                [1.0] * len(tensors), methods.gram_matrix(tensors, base=base_state[name])
            )
            merged[name] = methods.combine([base_state[name], *tensors], methods.with_base(coefficients))
        elif method == "slerp":
            merged[name] = methods.slerp(0.5, *tensors)
        else:
            merged[name] = methods.linear(tensors, [1.0] * len(tensors))
    out.mkdir()
    save_file(merged, out / "model.safetensors", metadata={"format": "pt"})


def worker_idle() -> None:
    import safetensors  # noqa: F401
    import torch  # noqa: F401

    import embedforge.merge  # noqa: F401


# ---------------------------------------------------------------- measurement (parent process)


def measure(command: list[str], env: dict) -> dict:
    """Run a command; its peak resident memory, peak anonymous memory, and wall time.

    peak_rss_mb is ru_maxrss from wait4. Linux carries ru_maxrss across fork+exec, so a child
    reports at least its parent's resident size at the fork: this parent therefore never imports
    torch or allocates much (checkpoint writing and output comparison run in children too), and
    the VmHWM sampled from the child's own address space is recorded beside it as a check.
    """
    started = time.perf_counter()
    process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    peaks = {"RssAnon:": 0, "VmHWM:": 0}
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            try:
                for line in Path(f"/proc/{process.pid}/status").read_text().splitlines():
                    key = line.split(" ", 1)[0].split("\t", 1)[0]
                    if key in peaks:
                        peaks[key] = max(peaks[key], int(line.split()[1]) * 1024)
            except (FileNotFoundError, ProcessLookupError, ValueError):
                pass
            time.sleep(0.02)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    output = process.stdout.read().decode(errors="replace") if process.stdout else ""
    _, status, usage = os.wait4(process.pid, 0)
    process.returncode = os.waitstatus_to_exitcode(status)
    done.set()
    sampler.join()
    if process.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed ({process.returncode}):\n{output[-3000:]}")
    return {
        "peak_rss_mb": round(usage.ru_maxrss * 1024 / MB, 1),  # ru_maxrss is in KiB on Linux
        "sampled_vmhwm_mb": round(peaks["VmHWM:"] / MB, 1),
        "peak_anon_mb": round(peaks["RssAnon:"] / MB, 1),
        "seconds": round(time.perf_counter() - started, 1),
        "stdout_tail": output.strip()[-200:],
    }


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*.safetensors"))


CHECK_NAMES = (
    "lm_head.weight",
    "model.layers.1.mlp.down_proj.weight",
    "model.layers.0.self_attn.q_norm.weight",
)


def worker_diff(out_a: Path, out_b: Path) -> None:
    """Print the largest absolute difference between two outputs over a few tensors (a sanity check)."""
    from embedforge.merge.stream import SafetensorsCheckpoint

    a, b = SafetensorsCheckpoint(out_a), SafetensorsCheckpoint(out_b)
    names = [n for n in CHECK_NAMES if n in a.infos()]  # layer 1 exists unless --layers 1
    print(max(float((a.read(n).float() - b.read(n).float()).abs().max()) for n in names))


def mergekit_command(root: Path, scenario: str, out: Path, shard_size: str | None) -> list[str]:
    models, _, _, peer_method = SCENARIOS[scenario]
    lines = [f"merge_method: {peer_method}", "dtype: bfloat16"]
    if peer_method == "slerp":
        lines += [f"base_model: {root / models[0]}", "parameters:", "  t: 0.5"]
    lines.append("models:")
    for m in models:
        lines.append(f"  - model: {root / m}")
        if peer_method == "linear":
            lines += ["    parameters:", "      weight: 1.0"]
    config = root / f"mergekit-{scenario}.yml"
    config.write_text("\n".join(lines) + "\n")
    command = [
        sys.executable,
        "-m",
        "mergekit.scripts.run_yaml",
        str(config),
        str(out),
        "--no-copy-tokenizer",
        "--no-write-model-card",
        "--quiet",
    ]
    return command + (["--out-shard-size", shard_size] if shard_size else [])


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--workdir", help="scratch folder (default: a new folder in the system temp dir)")
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=4096)
    parser.add_argument("--intermediate", type=int, default=12288)
    parser.add_argument("--vocab", type=int, default=16384)
    parser.add_argument("--shard-bytes", type=int, default=1024**3, help="input shard size")
    parser.add_argument("--mergekit-pythonpath", help="folder holding mergekit if it is not importable")
    parser.add_argument("--results", default=str(RESULTS), help="folder for merge_memory.json/.md")
    parser.add_argument("--scenarios", nargs="+", default=list(SCENARIOS), choices=list(SCENARIOS))
    parser.add_argument("--worker", choices=("ours", "naive", "idle", "make", "diff"), help=argparse.SUPPRESS)
    parser.add_argument("--scenario", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()

    config = qwen3_config(args.hidden, args.intermediate, args.layers, args.vocab)
    if args.worker == "idle":
        return worker_idle()
    if args.worker == "make":
        return worker_make(Path(args.workdir), config, args.shard_bytes)
    if args.worker == "diff":
        return worker_diff(Path(args.workdir), Path(args.out))
    if args.worker:
        worker = worker_ours if args.worker == "ours" else worker_naive
        return worker(Path(args.workdir), args.scenario, Path(args.out))

    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    if args.mergekit_pythonpath:
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [args.mergekit_pythonpath, env.get("PYTHONPATH")]))
    has_mergekit = importlib.util.find_spec("mergekit") is not None or bool(
        args.mergekit_pythonpath and (Path(args.mergekit_pythonpath) / "mergekit").is_dir()
    )
    root = Path(args.workdir or tempfile.mkdtemp(prefix="embedforge-merge-bench-"))
    me = [sys.executable, str(Path(__file__).resolve())]
    sizes = [
        "--layers",
        str(args.layers),
        "--hidden",
        str(args.hidden),
        "--intermediate",
        str(args.intermediate),
        "--vocab",
        str(args.vocab),
        "--shard-bytes",
        str(args.shard_bytes),
    ]
    setup = setup_stats(config, args.shard_bytes)
    rows = []
    try:
        started = time.perf_counter()
        made = measure([*me, "--worker", "make", "--workdir", str(root), *sizes], env)
        setup["checkpoints_reused"] = made["stdout_tail"].endswith("reused")
        setup["seconds_to_write"] = (
            None if setup["checkpoints_reused"] else round(time.perf_counter() - started, 1)
        )
        print(json.dumps(setup), flush=True)
        idle = measure([*me, "--worker", "idle"], env)
        print("idle", idle, flush=True)
        for scenario in args.scenarios:
            models, base, _method, peer = SCENARIOS[scenario]
            inputs = len(models) + (1 if base else 0)
            runs: list[tuple[str, list[str] | str | None]] = [
                ("embedforge (streaming)", [*me, "--worker", "ours"]),
                ("naive load-all", [*me, "--worker", "naive"]),
            ]
            if peer and has_mergekit:
                runs += [
                    ("mergekit (default 5B-param shards)", None),
                    ("mergekit (200M-param shards)", "200M"),
                ]
            outputs = {}
            for tool, command in runs:
                out = root / f"out-{scenario}-{len(outputs)}"
                shutil.rmtree(out, ignore_errors=True)
                if command is None or isinstance(command, str):
                    command = mergekit_command(root, scenario, out, command)
                else:
                    command = [*command, "--workdir", str(root), "--scenario", scenario, "--out", str(out)]
                result = measure(command, env)
                result.pop("stdout_tail")
                row = {
                    "scenario": scenario,
                    "tool": tool,
                    "inputs": inputs,
                    "input_bytes": inputs * setup["bytes_per_checkpoint"],
                    "output_bytes": folder_bytes(out),
                    **result,
                    "peak_rss_above_idle_in_largest_tensors": round(
                        (result["peak_rss_mb"] - idle["peak_rss_mb"]) * MB / setup["largest_tensor_bytes"], 2
                    ),
                }
                outputs[tool] = out
                print(json.dumps(row), flush=True)
                rows.append(row)
            ours = outputs["embedforge (streaming)"]
            for row in rows:
                if row["scenario"] == scenario and row["tool"] != "embedforge (streaming)":
                    diff = measure(
                        [*me, "--worker", "diff", "--workdir", str(ours), "--out", str(outputs[row["tool"]])],
                        env,
                    )
                    row["max_abs_diff_vs_embedforge"] = float(diff["stdout_tail"].splitlines()[-1])
            for out in outputs.values():
                shutil.rmtree(out, ignore_errors=True)
    finally:
        if not args.workdir:
            shutil.rmtree(root, ignore_errors=True)

    for scenario in args.scenarios:
        ours = next(r for r in rows if r["scenario"] == scenario and r["tool"].startswith("embedforge"))
        for row in rows:
            if row["scenario"] == scenario:
                row["peak_rss_ratio_vs_embedforge"] = round(row["peak_rss_mb"] / ours["peak_rss_mb"], 2)
    result = {
        "benchmark": "merge_memory",
        "device": f"cpu: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
        f"{round(os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / 1024**3)} GiB RAM",
        "threads": 1,
        "mergekit": _mergekit_version(env)
        if has_mergekit
        else "not installed: compared with the naive baseline only",
        "setup": {
            **setup,
            "config": {
                k: config[k] for k in ("hidden_size", "intermediate_size", "num_hidden_layers", "vocab_size")
            },
            "dtype": "bfloat16",
        },
        "idle_process": idle,
        "rows": rows,
        "notes": [
            (
                "peak_rss_mb is ru_maxrss of the merge process (wait4): resident memory including memory-mapped "
                "file pages; sampled_vmhwm_mb is the same peak read from /proc (a check: ru_maxrss survives "
                "fork+exec, so the parent stays small); peak_anon_mb excludes file-backed pages. Sampling runs "
                "every 20 ms, so a very short spike can be missed."
            ),
            (
                "each merge runs in a fresh process with OMP_NUM_THREADS=1; inputs are in the page cache after the "
                "first run, so seconds compare compute and copying more than disk."
            ),
            (
                "mergekit 0.1.x slerps each output row separately (leading axis), embedforge the whole tensor as the "
                "recipe says; here the raw checkpoints are nearly parallel (base + 2% noise), so both fall back to "
                "lerp and should agree to bfloat16 rounding, as linear should (max_abs_diff_vs_embedforge, over 3 "
                "tensors)."
            ),
            "slerp-deltas-3 (spherical average of three deltas from a base) has no mergekit equivalent.",
            (
                "embedforge makes an extra chunked pass over every tensor for its Gram matrix (the cosine report, "
                "and the slerp angles) and computes in float32, so a linear merge can take longer than the naive "
                "baseline, which trades memory for speed."
            ),
        ],
    }
    results = Path(args.results)
    results.mkdir(parents=True, exist_ok=True)
    (results / "merge_memory.json").write_text(json.dumps(result, indent=2) + "\n")
    (results / "merge_memory.md").write_text(markdown(result))
    print(markdown(result))


def _mergekit_version(env: dict) -> str:
    out = subprocess.run(
        [sys.executable, "-c", "import importlib.metadata as m; print(m.version('mergekit'))"],
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    return f"mergekit {out.stdout.strip() or 'unknown version'}"


def markdown(result: dict) -> str:
    s = result["setup"]
    lines = [
        "# merge peak memory (synthetic Qwen3-shaped checkpoints on disk)",
        "",
        f"{result['device']}; {result['mergekit']}; threads {result['threads']}.",
        (
            f"Each checkpoint: {s['bytes_per_checkpoint'] / 1024**3:.2f} GiB bfloat16, {s['tensors']} tensors "
            f"({s['tensors_of_64MB_or_more']} of 64 MB or more, largest {s['largest_tensor_bytes'] / MB:.0f} MB). "
            f"Idle process (torch and embedforge.merge imported): {result['idle_process']['peak_rss_mb']:.0f} MB."
        ),
        "",
        (
            "| scenario | tool | inputs (GiB) | peak RSS (MB) | sampled VmHWM (MB) | peak anon (MB) "
            "| RSS above idle / largest tensor | seconds | peak RSS vs embedforge | max abs diff vs embedforge |"
        ),
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        diff = r.get("max_abs_diff_vs_embedforge")
        lines.append(
            f"| {r['scenario']} | {r['tool']} | {r['input_bytes'] / 1024**3:.1f} | {r['peak_rss_mb']:.0f} | "
            f"{r['sampled_vmhwm_mb']:.0f} | {r['peak_anon_mb']:.0f} | "
            f"{r['peak_rss_above_idle_in_largest_tensors']:.1f} | {r['seconds']:.1f} | "
            f"{r['peak_rss_ratio_vs_embedforge']:.2f}x | {'' if diff is None else f'{diff:.2e}'} |"
        )
    lines += ["", *(f"- {note}" for note in result["notes"]), ""]
    return "\n".join(lines)


if __name__ == "__main__":
    main()

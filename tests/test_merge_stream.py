"""The merge stage on small synthetic checkpoints: file layout, per-layer t end to end, cosine
reports, bad inputs, atomic output, the CLI and t selection. Checkpoints are written here with
safetensors' own `save_file`; outputs are read back with `safe_open`, so the streaming writer is
checked against the library."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from embedforge.cli import main as cli_main
from embedforge.errors import ConfigError, InputError
from embedforge.merge import MergeConfig
from embedforge.merge import merge as merge_checkpoints
from embedforge.merge.select import select_t
from embedforge.merge.stream import SafetensorsCheckpoint, ShardedWriter, TensorInfo

CONFIG = {"model_type": "toy", "architectures": ["ToyModel"], "num_hidden_layers": 3}


def toy_tensors(seed: int, *, fill: float | None = None, layers: int = 3) -> dict[str, torch.Tensor]:
    """A small transformer-shaped state dict; `fill` makes every float tensor constant."""
    g = torch.Generator().manual_seed(seed)

    def make(*shape):
        return torch.full(shape, fill) if fill is not None else torch.randn(*shape, generator=g)

    tensors = {
        "model.embed_tokens.weight": make(50, 8),
        "model.norm.weight": make(8),
        "lm_head.weight": make(50, 8),
    }
    for i in range(layers):
        tensors[f"model.layers.{i}.self_attn.q_proj.weight"] = make(8, 8)
        tensors[f"model.layers.{i}.self_attn.o_proj.weight"] = make(8, 8)
        tensors[f"model.layers.{i}.mlp.up_proj.weight"] = make(16, 8)
        tensors[f"model.layers.{i}.mlp.down_proj.weight"] = make(8, 16)
        tensors[f"model.layers.{i}.input_layernorm.weight"] = make(8)
    return tensors


def write_checkpoint(
    folder: Path, tensors: dict[str, torch.Tensor], *, shards: int = 1, config=CONFIG
) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "tokenizer.json").write_text("{}")
    names = list(tensors)
    if shards == 1:
        save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
        return folder
    weight_map = {}
    for k in range(shards):
        part = names[k::shards]
        file = f"model-{k + 1:05d}-of-{shards:05d}.safetensors"
        save_file({n: tensors[n] for n in part}, folder / file, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(part, file))
    (folder / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {}, "weight_map": weight_map})
    )
    return folder


def reference_slerp(t: float, v0: np.ndarray, v1: np.ndarray, threshold: float = 0.9995) -> np.ndarray:
    """The recipe's slerp on flattened float64 copies (as in test_merge_methods.py)."""
    a, b = v0.ravel(), v1.ravel()
    dot = float(np.clip((a / np.linalg.norm(a)) @ (b / np.linalg.norm(b)), -1.0, 1.0))
    if abs(dot) > threshold:
        return ((1 - t) * a + t * b).reshape(v0.shape)
    theta = np.arccos(dot)
    return ((np.sin((1 - t) * theta) * a + np.sin(t * theta) * b) / np.sin(theta)).reshape(v0.shape)


def read_output(folder: Path) -> dict[str, torch.Tensor]:
    index = folder / "model.safetensors.index.json"
    files = (
        set(json.loads(index.read_text())["weight_map"].values()) if index.exists() else {"model.safetensors"}
    )
    out = {}
    for file in files:
        out.update(load_file(folder / file))
    return out


def merge(tmp_path: Path, models, **kwargs):
    kwargs.setdefault("output", tmp_path / "out")
    kwargs.setdefault("show_progress", False)
    return merge_checkpoints(MergeConfig(models=models, **kwargs))


@pytest.fixture
def pair(tmp_path):
    base = toy_tensors(0)
    g = torch.Generator().manual_seed(9)
    a = {k: v + 0.01 * torch.randn(v.shape, generator=g) for k, v in base.items()}
    b = {k: v + 0.01 * torch.randn(v.shape, generator=g) for k, v in base.items()}
    return (
        write_checkpoint(tmp_path / "base", base),
        write_checkpoint(tmp_path / "a", a, shards=2),
        write_checkpoint(tmp_path / "b", b),
        base,
        a,
        b,
    )


def test_writer_produces_files_safetensors_reads(tmp_path):
    tensors = {
        "a.bf16": torch.randn(7, 3).to(torch.bfloat16),
        "b.f16": torch.randn(5).to(torch.float16),
        "c.f32": torch.randn(2, 2, 2),
        "d.i64": torch.arange(6),
        "e.bool": torch.tensor([True, False, True]),
        "f.scalar": torch.tensor(3.5),
        "g.empty": torch.zeros(0, 4),
    }
    infos = [TensorInfo(n, tuple(t.shape), t.dtype) for n, t in tensors.items()]
    for max_bytes, several in ((10**9, False), (40, True)):
        folder = tmp_path / str(max_bytes)
        folder.mkdir()
        with ShardedWriter(folder, infos, max_bytes) as writer:
            for name, tensor in tensors.items():
                writer.write(name, tensor)
            assert (len(writer.finish()) > 1) == several
        back = read_output(folder)
        assert set(back) == set(tensors)
        for name, tensor in tensors.items():
            assert back[name].dtype == tensor.dtype and torch.equal(back[name], tensor), name
        with safe_open(str(folder / writer.files[0]), "pt") as handle:
            assert handle.metadata() == {"format": "pt"}


def test_writer_refuses_out_of_plan_tensors(tmp_path):
    writer = ShardedWriter(tmp_path, [TensorInfo("x", (2,), torch.float32)])
    with pytest.raises(ValueError, match="expected tensor 'x'"):
        writer.write("x", torch.zeros(3))
    with pytest.raises(ValueError, match="only 0 of 1"):
        writer.finish()


def test_slerp_of_deltas_end_to_end_matches_per_tensor_reference(tmp_path, pair):
    base_dir, a_dir, b_dir, base, a, b = pair
    report = merge(tmp_path, [a_dir, b_dir], base=base_dir, t=0.3, max_shard_bytes=2000)
    out = read_output(tmp_path / "out")
    assert len(report.files) > 1 and (tmp_path / "out" / "model.safetensors.index.json").exists()
    for name in base:
        d0, d1 = (a[name] - base[name]).double().numpy(), (b[name] - base[name]).double().numpy()
        expected = base[name].double().numpy() + reference_slerp(0.3, d0, d1)
        np.testing.assert_allclose(out[name].double().numpy(), expected, rtol=1e-6, atol=1e-6, err_msg=name)
    assert report.cosines["compared"] == "deltas from base"
    assert report.slerp_fallback_fraction == 0.0
    assert (tmp_path / "out" / "tokenizer.json").exists() and (tmp_path / "out" / "config.json").exists()
    saved = json.loads((tmp_path / "out" / "merge_report.json").read_text())
    assert saved["method"] == "slerp" and saved["tensors"] == len(base)


def test_t0_t1_and_identical_checkpoints_reproduce_inputs(tmp_path, pair):
    base_dir, a_dir, b_dir, _base, a, b = pair
    for t, expected in ((0.0, a), (1.0, b)):
        for kwargs in ({}, {"base": base_dir}):
            merge(tmp_path, [a_dir, b_dir], t=t, overwrite=True, **kwargs)
            out = read_output(tmp_path / "out")
            assert all(torch.equal(out[n], expected[n]) for n in expected), (t, kwargs)
    twin = write_checkpoint(tmp_path / "a-copy", a)
    for method, kwargs in (("slerp", {"t": 0.37}), ("lerp", {"t": 0.37}), ("slerp", {"base": base_dir})):
        merge(tmp_path, [a_dir, twin], method=method, overwrite=True, **kwargs)
        out = read_output(tmp_path / "out")
        assert all(torch.equal(out[n], a[n]) for n in a), (method, kwargs)


def test_per_layer_schedules_end_to_end(tmp_path):
    """Constant checkpoints 1.0 and 3.0 merged with lerp give 1 + 2t: each tensor reveals its t."""
    one = write_checkpoint(tmp_path / "one", toy_tensors(0, fill=1.0))
    three = write_checkpoint(tmp_path / "three", toy_tensors(0, fill=3.0))
    merge(
        tmp_path, [one, three], method="lerp", t="0.2,0.6", schedule_attention="0,1", schedule_mlp="1,0.5,0"
    )
    out = read_output(tmp_path / "out")
    t_of = {name: float((tensor - 1.0).mean() / 2.0) for name, tensor in out.items()}
    expected = {
        "model.embed_tokens.weight": 0.2,
        "model.norm.weight": 0.6,
        "lm_head.weight": 0.6,
        "model.layers.0.self_attn.q_proj.weight": 0.0,
        "model.layers.1.self_attn.o_proj.weight": 0.5,
        "model.layers.2.self_attn.q_proj.weight": 1.0,
        "model.layers.0.mlp.up_proj.weight": 1.0,
        "model.layers.1.mlp.down_proj.weight": 0.5,
        "model.layers.2.mlp.up_proj.weight": 0.0,
        "model.layers.0.input_layernorm.weight": 0.2,
        "model.layers.1.input_layernorm.weight": 0.4,
        "model.layers.2.input_layernorm.weight": 0.6,
    }
    for name, t in expected.items():
        assert t_of[name] == pytest.approx(t, abs=1e-6), name


def test_weighted_multi_model_merge_is_order_independent(tmp_path, pair):
    _, a_dir, b_dir, _, a, b = pair
    c_dir = write_checkpoint(tmp_path / "c", toy_tensors(5))
    for method in ("linear", "slerp"):
        merge(
            tmp_path, [a_dir, b_dir, c_dir], method=method, weights=[1, 2, 3], output=tmp_path / f"{method}1"
        )
        merge(
            tmp_path, [c_dir, a_dir, b_dir], method=method, weights=[3, 1, 2], output=tmp_path / f"{method}2"
        )
        first, second = read_output(tmp_path / f"{method}1"), read_output(tmp_path / f"{method}2")
        for name in first:
            torch.testing.assert_close(first[name], second[name], rtol=1e-5, atol=1e-6)
    linear = read_output(tmp_path / "linear1")
    c = load_file(c_dir / "model.safetensors")
    for name in linear:
        torch.testing.assert_close(
            linear[name], (a[name] + 2 * b[name] + 3 * c[name]) / 6, rtol=1e-6, atol=1e-6
        )


def test_cosine_report_per_group_matches_numpy(tmp_path, pair):
    base_dir, a_dir, b_dir, _base, a, b = pair
    report = merge(tmp_path, [a_dir, b_dir], t=0.5, dry_run=True, output=None)
    assert not (tmp_path / "out").exists() and report.output is None
    cosines = report.cosines
    attention = [n for n in a if "self_attn" in n]
    va = np.concatenate([a[n].double().numpy().ravel() for n in attention])
    vb = np.concatenate([b[n].double().numpy().ravel() for n in attention])
    group = next(g for g in cosines["groups"] if g["group"] == "attention")
    assert group["cos"]["0-1"] == pytest.approx(va @ vb / np.linalg.norm(va) / np.linalg.norm(vb), abs=1e-6)
    layer1 = next(row for row in cosines["layers"] if row["layer"] == 1 and row["group"] == "mlp")
    mlp1 = [n for n in a if n.startswith("model.layers.1.mlp")]
    va = np.concatenate([a[n].double().numpy().ravel() for n in mlp1])
    vb = np.concatenate([b[n].double().numpy().ravel() for n in mlp1])
    assert layer1["cos"]["0-1"] == pytest.approx(va @ vb / np.linalg.norm(va) / np.linalg.norm(vb), abs=1e-6)
    # raw weights of one run are nearly parallel: slerp is lerp, and the report says so
    assert cosines["parallel_fraction"] > 0.9 and report.slerp_fallback_fraction > 0.9
    assert any("--base" in w for w in report.warnings)
    with_base = merge(tmp_path, [a_dir, b_dir], t=0.5, base=base_dir, dry_run=True, output=None)
    assert with_base.cosines["parallel_fraction"] == 0.0 and not with_base.warnings


def test_mismatched_shapes_names_and_architectures_are_refused(tmp_path, pair):
    _, a_dir, b_dir, _base, _, b = pair
    wide = dict(b, **{"model.layers.1.mlp.up_proj.weight": torch.zeros(17, 8)})
    with pytest.raises(
        InputError, match=r"model\.layers\.1\.mlp\.up_proj\.weight.*shape \[17, 8\].*\[16, 8\]"
    ):
        merge(tmp_path, [a_dir, write_checkpoint(tmp_path / "wide", wide)], t=0.5)
    deeper = write_checkpoint(tmp_path / "deeper", toy_tensors(1, layers=4))
    with pytest.raises(InputError, match=r"model\.layers\.3\..*is in .*deeper but not in"):
        merge(tmp_path, [a_dir, deeper], t=0.5)
    other = write_checkpoint(tmp_path / "other", b, config={**CONFIG, "model_type": "other"})
    with pytest.raises(InputError, match="different architectures"):
        merge(tmp_path, [a_dir, other], t=0.5)
    with pytest.raises(InputError, match="different architectures"):
        merge(tmp_path, [a_dir, b_dir], t=0.5, base=other)
    assert not (tmp_path / "out").exists()


def test_missing_or_broken_shards_are_refused(tmp_path, pair):
    _, a_dir, b_dir, _, _a, b = pair
    os.remove(a_dir / "model-00002-of-00002.safetensors")
    with pytest.raises(
        InputError,
        match="model-00002-of-00002.safetensors.*listed in model.safetensors.index.json is missing",
    ):
        merge(tmp_path, [a_dir, b_dir], t=0.5)
    broken = write_checkpoint(tmp_path / "broken", b)
    (broken / "model.safetensors").write_bytes((broken / "model.safetensors").read_bytes()[:100])
    with pytest.raises(InputError, match="broken.*not a readable safetensors file"):
        merge(tmp_path, [b_dir, broken], t=0.5)
    legacy = tmp_path / "legacy"
    legacy.mkdir()
    (legacy / "pytorch_model.bin").write_bytes(b"x")
    with pytest.raises(InputError, match="only safetensors"):
        merge(tmp_path, [b_dir, legacy], t=0.5)
    with pytest.raises(InputError, match="model folder not found"):
        merge(tmp_path, [b_dir, tmp_path / "nowhere"], t=0.5)
    assert not (tmp_path / "out").exists()


def test_existing_output_is_refused_unless_overwrite(tmp_path, pair):
    _, a_dir, b_dir, _, _, _ = pair
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("old")
    with pytest.raises(InputError, match="exists; pass --overwrite"):
        merge(tmp_path, [a_dir, b_dir], t=0.5)
    assert (out / "keep.txt").read_text() == "old"
    merge(tmp_path, [a_dir, b_dir], t=0.5, overwrite=True)
    assert not (out / "keep.txt").exists() and (out / "model.safetensors").exists()
    with pytest.raises(ConfigError, match="one of the inputs"):
        merge(tmp_path, [a_dir, b_dir], t=0.5, output=a_dir, overwrite=True)


def test_a_crash_mid_write_leaves_no_output(tmp_path, pair):
    _, a_dir, b_dir, _, _a, _ = pair
    seen = []

    def explode(name):
        seen.append(name)
        if len(seen) == 5:
            raise RuntimeError("disk on fire")

    before = set(os.listdir(tmp_path))
    with pytest.raises(RuntimeError, match="disk on fire"):
        merge_checkpoints(
            MergeConfig(
                models=[a_dir, b_dir],
                t=0.5,
                output=tmp_path / "out",
                show_progress=False,
                max_shard_bytes=500,
            ),
            on_tensor=explode,
        )
    assert set(os.listdir(tmp_path)) == before  # neither the output nor a temporary folder is left
    # and with an existing output and --overwrite, the old folder survives the crash intact
    merge(tmp_path, [a_dir, b_dir], t=0.5)
    old = read_output(tmp_path / "out")
    seen.clear()
    with pytest.raises(RuntimeError):
        merge_checkpoints(
            MergeConfig(
                models=[a_dir, b_dir], t=0.9, output=tmp_path / "out", overwrite=True, show_progress=False
            ),
            on_tensor=explode,
        )
    assert all(torch.equal(old[n], t) for n, t in read_output(tmp_path / "out").items())


def test_integer_tensors_are_copied_or_refused(tmp_path, pair):
    _, _, _, _, a, b = pair
    ids = torch.arange(10)
    same_a = write_checkpoint(tmp_path / "ia", {**a, "model.position_ids": ids})
    same_b = write_checkpoint(tmp_path / "ib", {**b, "model.position_ids": ids})
    merge(tmp_path, [same_a, same_b], t=0.5)
    assert torch.equal(read_output(tmp_path / "out")["model.position_ids"], ids)
    other = write_checkpoint(tmp_path / "ic", {**b, "model.position_ids": ids + 1})
    with pytest.raises(InputError, match="non-float tensor 'model.position_ids' differs"):
        merge(tmp_path, [same_a, other], t=0.5, overwrite=True)


def test_output_dtype_and_support_files(tmp_path, pair):
    _, a_dir, b_dir, _, _a, _b = pair
    (a_dir / "README.md").write_text("card of a")
    (a_dir / "optimizer.pt").write_bytes(b"state")
    (a_dir / "1_Pooling").mkdir()
    (a_dir / "1_Pooling" / "config.json").write_text("{}")
    merge(tmp_path, [a_dir, b_dir], t=0.5, dtype="bfloat16")
    out_dir = tmp_path / "out"
    assert all(t.dtype == torch.bfloat16 for t in read_output(out_dir).values())
    assert json.loads((out_dir / "config.json").read_text())["dtype"] == "bfloat16"
    assert (out_dir / "1_Pooling" / "config.json").exists() and (out_dir / "tokenizer.json").exists()
    assert not (out_dir / "README.md").exists() and not (out_dir / "optimizer.pt").exists()


def test_bad_configs_are_refused(tmp_path, pair):
    _, a_dir, b_dir, _, _, _ = pair
    c = tmp_path / "c"
    cases = [
        ({"models": [a_dir, b_dir, c], "t": 0.5}, "exactly two models"),
        ({"models": [a_dir, b_dir], "t": 0.5, "weights": [1, 1]}, "either t or weights"),
        ({"models": [a_dir, b_dir, c], "method": "lerp"}, "lerp merges exactly two"),
        ({"models": [a_dir], "method": "slerp"}, "at least two"),
        ({"models": [a_dir, b_dir], "weights": [1]}, "1 weights for 2 models"),
        ({"models": [a_dir, b_dir], "t": 1.5}, r"\[0, 1\]"),
        ({"models": [a_dir, b_dir], "method": "ties"}, "unknown merge method"),
        ({"models": [a_dir, b_dir], "dtype": "int8"}, "unknown dtype"),
    ]
    for kwargs, message in cases:
        with pytest.raises(ConfigError, match=message):
            MergeConfig(output=tmp_path / "out", **kwargs)


def test_cli_merges_and_reports(tmp_path, pair, capsys):
    base_dir, a_dir, b_dir, base, _, _ = pair
    out = tmp_path / "cli-out"
    args = [
        "merge",
        "--method",
        "slerp",
        "--models",
        str(a_dir),
        str(b_dir),
        "--base",
        str(base_dir),
        "--t",
        "0.4",
        "--output",
        str(out),
        "--report",
        str(tmp_path / "r.json"),
        "--quiet",
        "--max-shard-size",
        "2KB",
    ]
    assert cli_main(args) == 0
    printed = capsys.readouterr().out
    assert (
        "cosine between deltas from base" in printed
        and "attention" in printed
        and "slerp equals lerp on" in printed
    )
    assert json.loads((tmp_path / "r.json").read_text())["output"] == str(out)
    assert len(read_output(out)) == len(base)
    assert cli_main(args) == 2  # the output exists now
    assert "pass --overwrite" in capsys.readouterr().err
    assert cli_main([*args, "--overwrite"]) == 0
    with pytest.raises(SystemExit):  # argparse refuses --t with --weights
        cli_main(["merge", "--models", str(a_dir), str(b_dir), "--t", "0.5", "--weights", "1", "1"])
    assert (
        cli_main(["merge", "--models", str(a_dir), str(b_dir), str(base_dir), "--t", "0.5", "--output", "x"])
        == 2
    )
    assert "exactly two models" in capsys.readouterr().err


def test_select_t_picks_the_best_grid_point(tmp_path, pair):
    _, a_dir, b_dir, _, a, b = pair
    target = {n: 0.25 * a[n] + 0.75 * b[n] for n in a}

    def evaluate(folder: Path) -> float:
        merged = read_output(folder)
        return -sum(float((merged[n] - target[n]).norm()) for n in target)

    result = select_t(
        MergeConfig(models=[a_dir, b_dir], method="lerp", output=tmp_path / "best", show_progress=False),
        [0.0, 0.25, 0.5, 0.75, 1.0],
        evaluate,
    )
    assert result.best_t == 0.75 and [t for t, _ in result.scores] == [0.0, 0.25, 0.5, 0.75, 1.0]
    assert result.best_score == max(s for _, s in result.scores)
    assert evaluate(tmp_path / "best") == pytest.approx(result.best_score)
    leftovers = [p for p in os.listdir(tmp_path) if p.startswith(".")]
    assert not leftovers
    with pytest.raises(InputError, match="exists"):
        select_t(
            MergeConfig(models=[a_dir, b_dir], output=tmp_path / "best", show_progress=False), [0.5], evaluate
        )


def test_sharded_and_single_file_inputs_read_the_same(tmp_path, pair):
    _, a_dir, _, _, a, _ = pair
    sharded = SafetensorsCheckpoint(a_dir)
    assert set(sharded.infos()) == set(a)
    for name in a:
        assert torch.equal(sharded.read(name), a[name])

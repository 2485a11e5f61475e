"""Tensor-by-tensor safetensors I/O: read sharded checkpoints lazily, check that several checkpoints
line up, and write merged shards incrementally.

Memory is the point of this layer. Reading opens the shard for each tensor and closes it again:
safetensors memory-maps the file, and pages of a map that stays open count toward the process's
resident memory until it is closed, so one long-lived handle per shard grows RSS to the size of
the whole checkpoint. Writing cannot use `safetensors.torch.save_file`, which needs every tensor of
a shard in memory at once; since all output shapes and dtypes are known before the first tensor
is merged, the writer lays out each shard's header up front and then appends tensor bytes as
they arrive. The files are plain safetensors (checked against `safetensors.safe_open` and
transformers in the tests).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import struct
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, Protocol

import torch
from safetensors import SafetensorError, safe_open
from typing_extensions import Self

from embedforge import modeling
from embedforge.errors import InputError
from embedforge.merge.config import DEFAULT_MAX_SHARD_BYTES

WEIGHTS_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"

# safetensors dtype codes <-> torch dtypes (the subset checkpoints use).
_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
_CODES = {dtype: code for code, dtype in _DTYPES.items()}

# Files in a model folder that are weights or training state, never copied into a merged model.
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".gguf")
_SKIPPED_FILES = {
    "trainer_state.json",
    "provenance.json",  # the merge writes the trail of all its inputs itself
    "merge_report.json",
    "adapter_config.json",
    "README.md",
    INDEX_NAME,
    "pytorch_model.bin.index.json",
}
# Config keys that legitimately differ between checkpoints of one architecture.
_VOLATILE_CONFIG_KEYS = {"_name_or_path", "transformers_version", "torch_dtype", "dtype", "use_cache"}


@dataclass(frozen=True)
class TensorInfo:
    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.numel * self.dtype.itemsize


class TensorSource(Protocol):
    """What the merge reads: a checkpoint folder, or a LoRA adapter applied to its base on the fly."""

    path: Path
    """The folder named in error messages and reports."""
    support_dir: Path
    """The folder whose config and tokenizer files a merged model copies."""

    @property
    def config(self) -> dict[str, Any] | None: ...

    def infos(self) -> dict[str, TensorInfo]:
        """Every tensor, in storage order."""
        ...

    def read(self, name: str) -> torch.Tensor: ...


def read_config(folder: Path) -> dict[str, Any] | None:
    path = folder / "config.json"
    if not path.exists():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise InputError(f"invalid JSON ({exc.msg} at line {exc.lineno})", path=str(path)) from None


def read_header(shard: Path) -> dict[str, TensorInfo]:
    """Names, shapes and dtypes of the tensors in one safetensors file, without reading the data."""
    if not shard.is_file():
        raise InputError("safetensors file not found", path=str(shard))
    try:
        with safe_open(str(shard), framework="pt", device="cpu") as handle:
            infos = {}
            for name in handle.keys():  # noqa: SIM118 - safe_open is not iterable
                view = handle.get_slice(name)
                code = view.get_dtype()
                if code not in _DTYPES:
                    raise InputError(f"tensor {name!r} has unsupported dtype {code}", path=str(shard))
                infos[name] = TensorInfo(name, tuple(view.get_shape()), _DTYPES[code])
            return infos
    except SafetensorError as exc:
        raise InputError(f"not a readable safetensors file ({exc})", path=str(shard)) from None


class SafetensorsCheckpoint:
    """A model folder holding `model.safetensors` or shards listed in `model.safetensors.index.json`."""

    def __init__(self, folder: str | os.PathLike):
        self.path = Path(folder)
        self.support_dir = self.path
        if not self.path.is_dir():
            raise InputError("model folder not found", path=str(self.path))
        self._config = read_config(self.path)
        self._shard_of: dict[str, Path] = {}
        self._infos: dict[str, TensorInfo] = {}
        index = self.path / INDEX_NAME
        if index.exists():
            self._load_index(index)
        elif (self.path / WEIGHTS_NAME).exists():
            shard = self.path / WEIGHTS_NAME
            self._infos = read_header(shard)
            self._shard_of = dict.fromkeys(self._infos, shard)
        else:
            found = sorted(
                p.name for p in self.path.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".safetensors")
            )
            hint = f" (found {', '.join(found)}; only safetensors checkpoints are read)" if found else ""
            raise InputError(f"no {WEIGHTS_NAME} or {INDEX_NAME}{hint}", path=str(self.path))
        if not self._infos:
            raise InputError("checkpoint holds no tensors", path=str(self.path))

    def _load_index(self, index: Path) -> None:
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        except json.JSONDecodeError as exc:
            raise InputError(f"invalid JSON ({exc.msg} at line {exc.lineno})", path=str(index)) from None
        except (KeyError, TypeError):
            raise InputError("missing 'weight_map'", path=str(index), field="weight_map") from None
        if not isinstance(weight_map, dict) or not weight_map:
            raise InputError("'weight_map' must be a non-empty object", path=str(index), field="weight_map")
        headers: dict[str, dict[str, TensorInfo]] = {}
        for shard_name in dict.fromkeys(weight_map.values()):  # shard order as first listed
            shard = self.path / str(shard_name)
            if not shard.is_file():
                raise InputError(f"shard {shard_name!r} listed in {INDEX_NAME} is missing", path=str(shard))
            headers[shard_name] = read_header(shard)
        for shard_name, header in headers.items():
            for name, info in header.items():
                if weight_map.get(name) == shard_name:
                    self._infos[name] = info
                    self._shard_of[name] = self.path / shard_name
        missing = [name for name in weight_map if name not in self._infos]
        if missing:
            raise InputError(
                f"tensor {missing[0]!r} is mapped to shard {weight_map[missing[0]]!r}, which does not contain it"
                + (f" ({len(missing) - 1} more)" if len(missing) > 1 else ""),
                path=str(index),
            )

    @property
    def config(self) -> dict[str, Any] | None:
        return self._config

    def infos(self) -> dict[str, TensorInfo]:
        return self._infos

    def read(self, name: str) -> torch.Tensor:
        # Open per tensor so the memory map is released as soon as the tensor is (see module doc).
        shard = self._shard_of[name]
        try:
            with safe_open(str(shard), framework="pt", device="cpu") as handle:
                return handle.get_tensor(name)
        except SafetensorError as exc:
            raise InputError(f"cannot read tensor {name!r} ({exc})", path=str(shard)) from None


def _architecture(config: dict[str, Any] | None) -> tuple[Any, ...] | None:
    if config is None:
        return None
    return (config.get("model_type"), tuple(config.get("architectures") or ()))


def check_compatible(sources: Sequence[TensorSource]) -> list[str]:
    """Raise InputError unless all sources share architecture, tensor names and shapes.

    Returns warnings about config values that differ without changing any shape (e.g. rope_theta).
    """
    first = sources[0]
    first_infos = first.infos()
    warnings: list[str] = []
    for other in sources[1:]:
        arch_a, arch_b = _architecture(first.config), _architecture(other.config)
        if arch_a is not None and arch_b is not None and arch_a != arch_b:
            raise InputError(
                f"architecture {arch_b[0]} {list(arch_b[1])} differs from {arch_a[0]} {list(arch_a[1])} "
                f"of {first.path}; checkpoints of different architectures cannot be merged",
                path=str(other.path),
            )
        infos = other.infos()
        only_first = [n for n in first_infos if n not in infos]
        only_other = [n for n in infos if n not in first_infos]
        if only_first or only_other:
            name, holder, lacker = (
                (only_first[0], first.path, other.path)
                if only_first
                else (only_other[0], other.path, first.path)
            )
            more = len(only_first) + len(only_other) - 1
            raise InputError(
                f"tensor {name!r} is in {holder} but not in {lacker}"
                + (f" ({more} more tensors differ)" if more else "")
                + "; checkpoints of different architectures cannot be merged",
                path=str(lacker),
            )
        for name, info in first_infos.items():
            theirs = infos[name]
            if theirs.shape != info.shape:
                raise InputError(
                    f"tensor {name!r} has shape {list(theirs.shape)} here but {list(info.shape)} in {first.path}",
                    path=str(other.path),
                )
            if info.dtype.is_floating_point != theirs.dtype.is_floating_point:
                raise InputError(
                    f"tensor {name!r} is {theirs.dtype} here but {info.dtype} in {first.path}",
                    path=str(other.path),
                )
        if first.config is not None and other.config is not None:
            keys = sorted(
                k
                for k in set(first.config) | set(other.config)
                if k not in _VOLATILE_CONFIG_KEYS and first.config.get(k) != other.config.get(k)
            )
            if keys:
                warnings.append(f"config of {other.path} differs from {first.path} in: {', '.join(keys)}")
    return warnings


def plan_shards(infos: Iterable[TensorInfo], max_shard_bytes: int) -> list[list[TensorInfo]]:
    """Consecutive groups of tensors, each under max_shard_bytes unless a single tensor is larger."""
    shards: list[list[TensorInfo]] = [[]]
    size = 0
    for info in infos:
        if shards[-1] and size + info.nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(info)
        size += info.nbytes
    return shards


def _header_bytes(infos: Sequence[TensorInfo]) -> bytes:
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for info in infos:
        if info.dtype not in _CODES:
            raise ValueError(f"cannot store dtype {info.dtype} of {info.name!r} in safetensors")
        header[info.name] = {
            "dtype": _CODES[info.dtype],
            "shape": list(info.shape),
            "data_offsets": [offset, offset + info.nbytes],
        }
        offset += info.nbytes
    encoded = json.dumps(header, separators=(",", ":")).encode("utf-8")
    encoded += b" " * (-len(encoded) % 8)  # the data section starts 8-byte aligned, as safetensors writes it
    return struct.pack("<Q", len(encoded)) + encoded


class ShardedWriter:
    """Writes tensors, in the planned order, into safetensors shards in `folder`.

    One shard is written as `model.safetensors`; several as `model-0000i-of-0000n.safetensors`
    plus `model.safetensors.index.json`, the layout transformers' `save_pretrained` produces.
    """

    def __init__(
        self, folder: Path, infos: Sequence[TensorInfo], max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES
    ):
        if max_shard_bytes <= 0:
            raise ValueError("max_shard_bytes must be positive")
        self.folder = Path(folder)
        self.shards = plan_shards(infos, max_shard_bytes)
        count = len(self.shards)
        self.files = (
            [WEIGHTS_NAME]
            if count == 1
            else [f"model-{i + 1:05d}-of-{count:05d}.safetensors" for i in range(count)]
        )
        self._queue = [(shard_index, info) for shard_index, shard in enumerate(self.shards) for info in shard]
        self._position = 0
        self._handle: BinaryIO | None = None
        self.bytes_written = 0

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info: object) -> None:
        if self._handle is not None:
            self._handle.close()
            self._handle = None

    def write(self, name: str, tensor: torch.Tensor) -> None:
        if self._position >= len(self._queue):
            raise ValueError(f"unexpected tensor {name!r}: every planned tensor has been written")
        shard_index, info = self._queue[self._position]
        if name != info.name or tuple(tensor.shape) != info.shape or tensor.dtype != info.dtype:
            raise ValueError(
                f"expected tensor {info.name!r} {list(info.shape)} {info.dtype}, "
                f"got {name!r} {list(tensor.shape)} {tensor.dtype}"
            )
        if self._handle is None:
            self._handle = open(self.folder / self.files[shard_index], "wb")  # noqa: SIM115 - spans write() calls; closed by finish of shard or __exit__
            self._handle.write(_header_bytes(self.shards[shard_index]))
        data = tensor.detach().to("cpu").contiguous().reshape(-1)
        if data.numel():
            self._handle.write(memoryview(data.view(torch.uint8).numpy()))
        self.bytes_written += info.nbytes
        self._position += 1
        last_of_shard = self._position == len(self._queue) or self._queue[self._position][0] != shard_index
        if last_of_shard:
            self._handle.close()
            self._handle = None

    def finish(self) -> list[str]:
        """Check every tensor was written, write the index when sharded; returns the weight files."""
        if self._position != len(self._queue):
            raise ValueError(f"only {self._position} of {len(self._queue)} tensors were written")
        if len(self.files) > 1:
            weight_map = {info.name: self.files[i] for i, shard in enumerate(self.shards) for info in shard}
            index = {"metadata": {"total_size": self.bytes_written}, "weight_map": weight_map}
            (self.folder / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")
        return list(self.files)


@dataclass
class CopiedSupport:
    notes: list[str]
    """Sub-folders holding weights of their own, copied from the first model rather than merged."""
    dropped_remote_code: list[str]
    """Python files not copied, and the JSON files whose `auto_map` (which names them) was removed."""


def copy_support_files(source: Path, destination: Path) -> CopiedSupport:
    """Copy config, tokenizer and module files: everything but weights, training state and remote code.

    Remote code (`*.py` and the `auto_map` entries that name it) is never copied: embedforge loads
    models without `trust_remote_code`, and a merged model must not carry code nobody reviewed.
    """
    notes: list[str] = []
    dropped: list[str] = []
    for entry in sorted(source.iterdir()):
        name = entry.name
        if name.startswith((".", "checkpoint-")) or name == "__pycache__":
            continue
        if entry.is_dir():
            shutil.copytree(entry, destination / name, ignore=shutil.ignore_patterns("*.py", "__pycache__"))
            dropped += sorted(str(p.relative_to(source)) for p in entry.rglob("*.py"))
            if any(p.suffix in _WEIGHT_SUFFIXES for p in entry.rglob("*")):
                notes.append(f"{name}/ holds weights; copied from {source}, not merged")
        elif name.endswith(".py"):
            dropped.append(name)
        elif (
            name not in _SKIPPED_FILES
            and not name.endswith(_WEIGHT_SUFFIXES)
            and not name.startswith(("optimizer", "scheduler", "rng_state", "training_args"))
        ):
            shutil.copy2(entry, destination / name)
    dropped += modeling.strip_auto_map(destination)
    return CopiedSupport(notes, dropped)



"""`ExportConfig`: one export, validated where it is built.

`model` and `output` may be left unset so that a recipe can embed this class and let the pipeline
fill them in; `export()` refuses to run until they are set (`check_ready`).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from embedforge.config import StrictModel
from embedforge.errors import ConfigError

FORMATS = {"embedder": ("sentence-transformers",), "reranker": ("seq-cls", "causal")}
ONNX_PRECISIONS = ("fp32", "int8")
GGUF_TYPES = ("f32", "f16", "q8_0")


class ExportConfig(StrictModel):
    """One export: the serving folder, its optional ONNX and GGUF files, the card and the Hub push.

    Example:
        >>> export(ExportConfig(model="runs/demo/merge/model", output="out/my-embedder", onnx=["fp32", "int8"],
        ...                     gguf=["f16"], repo_id="my-org/my-embedder"))
    """

    model: str | None = Field(None, description="model folder, LoRA adapter folder or Hub id")
    output: str | None = Field(None, description="folder to create")
    kind: Literal["embedder", "reranker"] = Field("embedder", description="embedder or reranker")
    format: Literal["sentence-transformers", "seq-cls", "causal"] | None = Field(
        None, description="sentence-transformers (embedder); seq-cls (reranker default) or causal")
    overwrite: bool = Field(False, description="replace an existing output folder")
    default_instruction: str | None = Field(
        None, description="instruction behind the embedder's 'query' prompt / the reranker template's default")
    matryoshka_dims: list[int] = Field(default_factory=list, description="Matryoshka widths to declare (embedders)")
    onnx: list[Literal["fp32", "int8"]] = Field(
        default_factory=list, description="also write onnx/model.onnx (fp32) and/or the int8 dynamic-quantized "
        "onnx/model_qint8.onnx (embedders)")
    gguf: list[Literal["f32", "f16", "q8_0"]] = Field(
        default_factory=list, description="also write GGUF files for llama.cpp / Ollama (decoder embedders)")
    model_name: str | None = Field(None, description="the card's title (unset: the Hub repo name)")
    base_model: str | None = Field(None, description="Hub id of the backbone, for the card (unset: read from the "
                                                     "provenance trail)")
    repo_id: str | None = Field(None, description="Hub id the card's usage snippets name (unset: push_to_hub)")
    card_metadata: str | None = Field(None, description="model card metadata JSON (CardMetadata)")
    eval_results: list[str] = Field(default_factory=list, description="`embedforge eval` results JSON files")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="auto keeps the checkpoint's dtype")
    device: str | None = Field(None, description="device for loading and checking (unset: cuda if available)")
    gate_tolerance: float | None = Field(None, gt=0, description="max |diff| the checks allow (unset: 1e-4 in "
                                                                 "float32, 2e-2 in half precision)")
    push_to_hub: str | None = Field(None, description="upload the finished folder to this Hub repo (ORG/NAME)")
    private: bool = Field(False, description="create the Hub repo private")
    revision: str | None = Field(None, description="Hub branch to push to (created if missing)")


    @field_validator("model", "output", "card_metadata", mode="before")
    @classmethod
    def _path(cls, value: Any) -> Any:
        return os.fspath(value) if isinstance(value, os.PathLike) else value

    @field_validator("eval_results", mode="before")
    @classmethod
    def _paths(cls, value: Any) -> Any:
        return [os.fspath(v) if isinstance(v, os.PathLike) else v for v in value] if value else value

    @field_validator("matryoshka_dims", mode="before")
    @classmethod
    def _dims(cls, value: Any) -> Any:
        """`--matryoshka-dims 1024,512,256` (the flag's comma form) as well as a list."""
        if isinstance(value, str):
            value = [value]
        if isinstance(value, list):
            parts = [p for v in value for p in (v.replace(" ", "").split(",") if isinstance(v, str) else [v])]
            try:
                return [int(p) for p in parts if p != ""]
            except ValueError:
                raise ValueError(f"expected comma-separated integers, got {value!r}") from None
        return value

    @model_validator(mode="after")
    def _consistent(self) -> ExportConfig:
        self.resolved_format()
        if self.kind == "reranker" and self.matryoshka_dims:
            raise ValueError("matryoshka_dims applies to embedders, not rerankers")
        if self.kind == "reranker" and (self.onnx or self.gguf):
            raise ValueError("onnx and gguf exports are for embedders; serve rerankers with the folder itself")
        return self

    def resolved_format(self) -> str:
        fmt = self.format or FORMATS[self.kind][0]
        if fmt not in FORMATS[self.kind]:
            raise ConfigError(f"--format {fmt!r} does not apply to --kind {self.kind}; choose one of {FORMATS[self.kind]}")
        return fmt

    def check_ready(self) -> None:
        """The checks that need the model and output set (a recipe may leave them to the pipeline)."""
        if not self.model:
            raise ConfigError("export: no model to export (set `model`, --model)")
        if not self.output:
            raise ConfigError("export: no output folder (set `output`, --output)")
        if os.path.exists(self.model) and _overlaps(Path(self.output), Path(self.model)):
            raise ConfigError(f"export: the output {self.output} would overwrite the model {self.model}; "
                              "choose another folder")
        for path in [self.card_metadata, *self.eval_results]:
            if path and _overlaps(Path(self.output), Path(path)):
                raise ConfigError(f"export: the output {self.output} holds the input {path}; choose another folder")


def _overlaps(output: Path, source: Path) -> bool:
    """True when writing `output` would replace `source` or a folder holding it."""
    out, src = output.resolve(), source.resolve()
    return out == src or out in src.parents

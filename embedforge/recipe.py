"""The recipe of `embedforge run`: one section per stage, each the stage's own config class.

A section IS the stage's config (a subclass that adds only the pipeline's switches), so a recipe can
use every option a stage has, a typo fails before anything runs, and there is one place where an
option is declared. The fields that wire stages together (input and output paths, the backbone) are
left empty in a recipe and filled by the pipeline.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator, model_validator

from embedforge.config import StrictModel
from embedforge.data_synth.filtering import FilterConfig
from embedforge.data_synth.generate import SynthConfig
from embedforge.data_synth.mine import MineConfig
from embedforge.eval.config import EvalConfig
from embedforge.export.config import ExportConfig
from embedforge.merge.config import MergeConfig
from embedforge.templates import DEFAULT_RETRIEVAL_INSTRUCTION
from embedforge.train.config import DatasetSettings, TrainConfig


class CorpusSection(StrictModel):
    """The raw corpus: a JSONL/Parquet file or a folder of .txt/.md files, cut into passages, or a
    built-in corpus (`builtin:python-docstrings` and `builtin:debian-packages` come with real
    human-written queries that the pipeline holds out for evaluation; `builtin:python-docs` has none)."""

    path: str = "builtin:python-docstrings"
    chunk_tokens: int | None = Field(256, gt=8, description="words per passage for files (null: whole documents)")
    overlap: int = Field(32, ge=0)
    sample: int | None = Field(None, gt=0, description="use N passages spread over the source as the corpus (a "
                               "quicker run); a built-in corpus keeps the real queries of those passages")
    max_passages: int | None = Field(None, gt=0, description="give the generator N passages spread over the corpus "
                                     "(the search corpus for evaluation keeps all of them)")


class SynthSection(SynthConfig):
    enabled: bool = True


class FilterSection(FilterConfig):
    enabled: bool = True


class SplitSection(StrictModel):
    """Hold out the SYNTHETIC queries of some passages as an extra evaluation set (`eval.sets:
    [heldout]`). They are the generator's own queries, so the table marks them as such; real
    held-out queries come from the corpus or from `eval.sets` folders."""

    heldout_fraction: float = Field(0.2, gt=0, lt=1)
    seed: int = 0


class MineSection(MineConfig):
    enabled: bool = True


class LaunchSettings(StrictModel):
    """Run the train stage under `accelerate launch` (several processes, DeepSpeed, FSDP), the same
    command a user types; the pipeline streams its output and a rerun resumes it."""

    num_processes: int = Field(1, ge=1)
    config_file: str | None = Field(None, description="an accelerate config (recipes/accelerate/*.yaml)")
    extra_args: list[str] = Field(default_factory=list, description="more `accelerate launch` flags")


class TrainSection(TrainConfig):
    """TrainConfig; `model`, `output_dir` and the pipeline's own data are filled in by the pipeline.
    `data` lists extra datasets (labelled pairs) mixed with the synthetic ones."""

    model: str | None = None  # type: ignore[assignment]
    output_dir: str | None = None  # type: ignore[assignment]
    data: list[DatasetSettings] = Field(default_factory=list)  # type: ignore[assignment]
    launch: LaunchSettings | None = None

    @field_validator("output_dir", "model")
    @classmethod
    def _not_blank(cls, value: str | None) -> str | None:
        if value is not None and not value.strip():
            raise ValueError("must not be empty")
        return value


class MergeSection(MergeConfig):
    """`with: base`: slerp the trained model with its base, which keeps general ability (t = the
    trained model's weight). `with: checkpoints`: the report's stage 3, a spherical average of the
    run's saved checkpoints and its final model (slerp of their deltas from the base)."""

    enabled: bool = True
    with_: Literal["base", "checkpoints"] = Field("base", alias="with")
    t: float | str | list[float] | None = 0.5


class EvalSection(EvalConfig):
    """Which sets every model (base, trained, merged) is evaluated on, each with intervals and a
    paired test against the base: `corpus` (the corpus's own real queries), `covered` (the real
    queries of the passages the generator wrote for, `corpus.max_passages`, searched over the whole
    corpus: what the adaptation targets when the generator's budget covers part of the corpus),
    `heldout` (synthetic, see split), `builtin:NAME` (a built-in corpus's real queries) or a BEIR folder."""

    sets: list[str] = Field(default_factory=lambda: ["corpus"])
    first_stage: str | None = Field(None, description="reranker recipes: the embedder whose top-k is reranked")


class ExportSection(ExportConfig):
    enabled: bool = True


class Recipe(StrictModel):
    name: str
    description: str = ""
    model: str = Field(description="the backbone: Hub id or folder; builtin:minilm, builtin:smollm2 offline")
    task: Literal["embedding", "reranker"] = "embedding"
    instruction: str | None = Field(DEFAULT_RETRIEVAL_INSTRUCTION,
                                    description="query instruction for train, eval and export (null: queries go "
                                    "in bare, for encoders never trained with instructions)")
    workdir: str = "runs/{name}"
    strict: bool = Field(False, description="stop when a stage produced nothing useful (0 rows, collapse, ...)")
    corpus: CorpusSection = Field(default_factory=CorpusSection)
    synth: SynthSection = Field(default_factory=SynthSection)
    filter: FilterSection = Field(default_factory=FilterSection)
    split: SplitSection = Field(default_factory=SplitSection)
    mine: MineSection = Field(default_factory=MineSection)
    train: TrainSection = Field(default_factory=TrainSection)
    merge: MergeSection = Field(default_factory=MergeSection)
    eval: EvalSection = Field(default_factory=EvalSection)
    export: ExportSection = Field(default_factory=ExportSection)

    @model_validator(mode="after")
    def _consistent(self) -> Recipe:
        if "heldout" in self.eval.sets and not self.synth.enabled:
            raise ValueError("eval.sets: heldout needs synth (the held-out queries are synthetic)")
        if self.task == "reranker" and not self.eval.first_stage and self.eval.sets:
            raise ValueError("eval.first_stage: a reranker recipe needs an embedder to rerank from")
        if not self.synth.enabled and not self.train.data:
            raise ValueError("train.data: with synth disabled, list the training data")
        return self

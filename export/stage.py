"""`export`: load a model, write one serving folder atomically, check it, card it, push it.

Everything is written into a temporary sibling of the output (`embedforge.io.atomic_dir`); the
folder appears under its name only after the files are written, every gate has passed and the
card is written, so an interrupted or failed export leaves nothing behind (an existing folder is
replaced only with `overwrite`, and only then; never when it is, or holds, an input).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pydantic import Field

from embedforge import __version__
from embedforge.errors import InputError
from embedforge.export.config import ExportConfig
from embedforge.io import atomic_dir, write_json
from embedforge.outcome import StageOutcome

# Keys transformers writes into config.json from where a model was loaded, meaningless once published
# (a GGUF conversion leaves e.g. "_model_name_or_path": "Smollm2 135M 8k Lc100K Mix1 Ep2").
LOAD_TIME_CONFIG_KEYS = ("_name_or_path", "_model_name_or_path", "_commit_hash")


class ExportOutcome(StageOutcome):
    """The exported folder, the gate results and where it was pushed."""

    kind: str
    format: str
    dtype: str
    checks: list[dict[str, Any]] = Field(description="every gate check: name, passed, max_abs_diff, tolerance")
    max_abs_diff: float = Field(description="the largest difference any numeric check measured")
    files: list[str] = Field(default_factory=list, description="extra serving files: ONNX, GGUF")
    hub_url: str | None = None

    @property
    def report(self) -> dict[str, Any]:
        """export_report.json as written."""
        return json.loads((Path(self.output) / "export_report.json").read_text(encoding="utf-8"))


def checkpoint_dtype(source: str, dtype: str) -> str:
    """'auto' keeps the checkpoint's dtype (a bf16 model stays bf16), float32 when it is not recorded."""
    if dtype != "auto":
        return dtype
    from embedforge import modeling

    config = modeling.read_json_if_exists(modeling.check_model_source(source), "config.json") or {}
    value = config.get("dtype") or config.get("torch_dtype") or "float32"
    return value if value in ("float32", "bfloat16", "float16") else "float32"


def gate_tolerance(config: ExportConfig, model) -> float:
    from embedforge.export.gate import default_tolerance

    if config.gate_tolerance is not None:
        return config.gate_tolerance
    return default_tolerance(next(model.model.parameters()).dtype)


def clean_config(folder: Path) -> list[str]:
    """Drop load-time keys and dangling remote-code references from the written configs, and keep
    the rope base readable by transformers 4 (returns what changed).

    transformers 5 writes the rope base only inside `rope_parameters`; transformers 4 (what
    sentence-transformers' ONNX backend, optimum, runs on) ignores that key and silently uses its
    default base of 10000, which gives other vectors. Both versions read a top-level `rope_theta`.
    """
    from embedforge.modeling import strip_auto_map

    path = folder / "config.json"
    config = json.loads(path.read_text(encoding="utf-8"))
    changed = [key for key in LOAD_TIME_CONFIG_KEYS if config.pop(key, None) is not None]
    theta = (config.get("rope_parameters") or {}).get("rope_theta")
    if theta is not None and "rope_theta" not in config:
        config["rope_theta"] = theta
        changed.append("rope_theta (from rope_parameters)")
    if changed:
        path.write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    return changed + strip_auto_map(folder)


def _model_type(folder: Path) -> str:
    return str(json.loads((folder / "config.json").read_text(encoding="utf-8")).get("model_type") or "")


def _export_embedder(config: ExportConfig, folder: Path, dtype: str, tolerance_of, name: str):
    """Write and check an embedder export (and its ONNX / GGUF files); returns (facts, checks, files, None)."""
    from embedforge.embedder import Embedder
    from embedforge.export import gate
    from embedforge.export.sentence_transformers import write_embedder_folder

    model = Embedder.from_pretrained(config.model, dtype=dtype, device=config.device)
    facts = write_embedder_folder(model, folder, default_instruction=config.default_instruction,
                                  matryoshka_dims=config.matryoshka_dims)
    facts["config_cleaned"] = clean_config(folder)
    facts["model_type"] = _model_type(folder)
    checks = gate.embedder_checks(model, folder, facts["prompts"].get("query"), tolerance_of(model))
    files: list[str] = []
    if config.onnx:
        from embedforge.export.onnx import export_onnx

        onnx = export_onnx(model, folder, config.onnx)
        checks += onnx.checks
        files += onnx.files
        facts["onnx"] = onnx.facts
    if config.gguf:
        from embedforge.export.gguf import export_gguf

        gguf = export_gguf(model, folder, config.gguf, name=name)
        checks += gguf.checks
        files += gguf.files
        facts["gguf"] = gguf.facts
    return facts, checks, files, None


def _export_reranker(config: ExportConfig, folder: Path, dtype: str, fmt: str, tolerance_of):
    """Write and check a reranker export; returns (facts, checks, files, reranker_template.json contents)."""
    from embedforge.export import gate
    from embedforge.export.reranker import TEMPLATE_FILE, write_reranker_folder
    from embedforge.reranker import Reranker

    model = Reranker.from_pretrained(config.model, dtype=dtype, device=config.device)
    facts = write_reranker_folder(model, folder, fmt=fmt, default_instruction=config.default_instruction)
    facts["config_cleaned"] = clean_config(folder)
    facts["model_type"] = _model_type(folder)
    checks = gate.reranker_checks(model, folder, fmt, facts["default_instruction"], tolerance_of(model))
    return facts, checks, [], json.loads((folder / TEMPLATE_FILE).read_text(encoding="utf-8"))


def export(config: ExportConfig) -> ExportOutcome:
    """Export `config.model` into `config.output`; raises EmbedforgeError subclasses on bad input.

    The folder holds the serving files, `export_report.json` (every gate check), `provenance.json`
    (the model's trail plus this export) and `README.md`, the model card rendered from that trail.
    """
    from embedforge.io import output_lock

    config.check_ready()
    if Path(config.output).exists() and not config.overwrite:  # refused before anything is written
        raise InputError("output folder exists; pass --overwrite to replace it", path=str(config.output))
    if config.push_to_hub:
        from embedforge.export.hub import check_repo_id, resolve_token

        check_repo_id(config.push_to_hub)
        resolve_token()  # fail before the export's work, not after
    with output_lock(config.output):  # one writer per output: a second export into it is refused
        return _export(config)


def _export(config: ExportConfig) -> ExportOutcome:
    from embedforge.export import gate, model_card
    from embedforge.io import publishable
    from embedforge.provenance import read_provenance, write_provenance

    config.check_ready()
    fmt = config.resolved_format()
    if config.push_to_hub:
        from embedforge.export.hub import check_repo_id, resolve_token

        check_repo_id(config.push_to_hub)
        resolve_token()  # fail before the export's work, not after
    trail = read_provenance(config.model, *config.eval_results)
    card = model_card.CardInputs.gather(config, trail)
    dtype = checkpoint_dtype(config.model, config.dtype)

    output = Path(config.output)
    with atomic_dir(output, overwrite=config.overwrite) as tmp:
        tolerance_of = lambda m: gate_tolerance(config, m)
        if config.kind == "embedder":
            facts, checks, files, template = _export_embedder(config, tmp, dtype, tolerance_of, card.name)
        else:
            facts, checks, files, template = _export_reranker(config, tmp, dtype, fmt, tolerance_of)
        gate.raise_on_failure(checks, str(output))
        summary = gate.summarize(checks)
        report = {
            "embedforge_version": __version__,
            "source": config.model,
            "kind": config.kind,
            "format": fmt,
            "dtype": dtype,
            "facts": facts,
            **summary,
        }
        write_json(tmp / gate.REPORT_FILE, report)
        outcome = ExportOutcome(output=str(output), kind=config.kind, format=fmt, dtype=dtype,
                                checks=summary["checks"], files=files,
                                max_abs_diff=max((c.max_abs_diff for c in checks if c.max_abs_diff is not None),
                                                 default=0.0))
        write_provenance(tmp, trail, "export", kind=config.kind, format=fmt, dtype=dtype, files=files,
                         checks_passed=len(checks), max_abs_diff=outcome.max_abs_diff,
                         repo_id=card.repo_id, onnx=facts.get("onnx"), gguf=facts.get("gguf"))
        text = model_card.render_model_card(card, facts=facts, report=report, template=template)
        model_card.write_model_card(tmp, text)
        publishable(tmp)
    for warning in card.warnings:
        outcome.warn(warning)

    if config.push_to_hub:
        from embedforge.export.hub import push_folder

        outcome.hub_url = push_folder(output, config.push_to_hub, private=config.private, revision=config.revision)
    return outcome


"""vLLM's offline engine (GPU): the fastest way to synthesise at scale on one machine.

vLLM is an optional extra (`pip install 'embedforge[vllm]'`); it is imported only when this
backend is built, so the rest of embedforge works without it. A JSON schema in the params becomes
vLLM's structured outputs, so replies are valid JSON of the schema by construction.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from embedforge.data_synth.backends.base import GenerationParams, Messages, Result
from embedforge.errors import ModelLoadError


def structured_output_kwargs(json_schema: str | None, sampling_module: Any) -> dict[str, Any]:
    """The SamplingParams keyword that makes vLLM decode under a JSON schema.

    vLLM 0.10.2 and later name it `structured_outputs=StructuredOutputsParams(json=...)`; earlier
    releases `guided_decoding=GuidedDecodingParams(json=...)`. `sampling_module` is
    `vllm.sampling_params` (passed in, so the choice is testable without vLLM).
    """
    if json_schema is None:
        return {}
    schema = json.loads(json_schema)
    if hasattr(sampling_module, "StructuredOutputsParams"):
        return {"structured_outputs": sampling_module.StructuredOutputsParams(json=schema)}
    if hasattr(sampling_module, "GuidedDecodingParams"):
        return {"guided_decoding": sampling_module.GuidedDecodingParams(json=schema)}
    raise ModelLoadError("this vLLM has no structured outputs: pip install 'vllm>=0.8'")


class VLLMBackend:
    name = "vllm"

    def __init__(
        self,
        model: str,
        *,
        batch_size: int = 512,
        dtype: str = "auto",
        tensor_parallel_size: int = 1,
        gpu_memory_utilization: float = 0.9,
        max_model_len: int | None = None,
        trust_remote_code: bool = False,
    ):
        try:
            from vllm import LLM
        except ImportError:
            raise ModelLoadError(
                "the vllm backend needs vLLM and a GPU: pip install 'embedforge[vllm]' "
                "(or use --backend openai against `vllm serve`)"
            ) from None
        self.model = model
        self.batch_size = batch_size  # vLLM schedules internally; large batches keep it busy
        self.llm = LLM(
            model=model,
            dtype=dtype,
            tensor_parallel_size=tensor_parallel_size,
            gpu_memory_utilization=gpu_memory_utilization,
            max_model_len=max_model_len,
            trust_remote_code=trust_remote_code,
        )

    def generate(
        self, batch: Sequence[Messages], params: GenerationParams, seeds: Sequence[int] | None = None
    ) -> list[Result]:
        from vllm import SamplingParams, sampling_params

        seeds = list(seeds) if seeds is not None else [None] * len(batch)
        structured = structured_output_kwargs(params.json_schema, sampling_params)
        sampling = [
            SamplingParams(
                temperature=params.temperature,
                top_p=params.top_p,
                max_tokens=params.max_new_tokens,
                seed=s,
                **structured,
            )
            for s in seeds
        ]
        outputs = self.llm.chat(list(batch), sampling_params=sampling, use_tqdm=False)
        return [Result(o.outputs[0].text if o.outputs else "") for o in outputs]

    def close(self) -> None:
        self.llm = None

"""The contract every generator backend keeps, and the adapter that lets the asynchronous run
drive a batched, synchronous backend.

A backend maps a batch of chat conversations to one `Result` each and never raises for a single
failed request: a timeout or a dropped connection comes back as `Result(error=...)`, so one bad
request costs one passage, not the run. Exceptions are kept for bugs and for missing models.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

Messages = list[dict[str, str]]


@dataclass(frozen=True)
class GenerationParams:
    """How to decode one request.

    `json_schema` (canonical JSON text of a JSON Schema, so params stay hashable and comparable)
    asks the backend to make every reply valid JSON of that schema by construction: a grammar
    mask in the transformers backend, `response_format: json_schema` over HTTP, structured
    outputs in vLLM. `json_mode` asks an HTTP server only for some JSON object.
    """

    temperature: float = 1.0  # e5-mistral and the Qwen3 report decode synthetic data at 1.0
    top_p: float = 1.0
    max_new_tokens: int = 256
    json_mode: bool = False
    json_schema: str | None = None


@dataclass
class Result:
    text: str | None
    error: str | None = None  # a schemas.TRANSPORT_FAILURES cause; None when a reply arrived
    detail: str = ""
    attempts: int = 1
    latency_s: float = 0.0

    @property
    def ok(self) -> bool:
        return self.error is None


@runtime_checkable
class Backend(Protocol):
    name: str
    model: str
    batch_size: int  # how many conversations one `generate` call should carry

    def generate(
        self, batch: Sequence[Messages], params: GenerationParams, seeds: Sequence[int] | None = None
    ) -> list[Result]:
        """One Result per conversation, in order; `seeds` (one per conversation) makes sampling repeatable."""
        ...

    def close(self) -> None: ...


class MicroBatcher:
    """Turns single asynchronous requests into `generate` batches for a synchronous backend.

    Passages run as coroutines; each awaits its next LLM call here. Requests queue until the worker
    takes up to `batch_size` of them with equal params and runs them in a thread, so a local model
    still sees full batches while the run logic stays one coroutine per passage.
    """

    def __init__(self, backend: Backend):
        self.backend = backend
        self._queue: list[tuple[Messages, GenerationParams, int, asyncio.Future]] = []
        self._worker: asyncio.Task | None = None

    async def complete(self, messages: Messages, params: GenerationParams, seed: int) -> Result:
        future = asyncio.get_running_loop().create_future()
        self._queue.append((messages, params, seed, future))
        if self._worker is None or self._worker.done():
            self._worker = asyncio.create_task(self._drain())
        return await future

    async def _drain(self) -> None:
        while self._queue:
            for _ in range(3):  # let the other coroutines reach their next request first
                await asyncio.sleep(0)
            params = self._queue[0][1]
            batch = [item for item in self._queue if item[1] == params][: max(1, self.backend.batch_size)]
            for item in batch:
                self._queue.remove(item)
            try:
                results = await asyncio.to_thread(
                    self.backend.generate, [m for m, _, _, _ in batch], params, [s for _, _, s, _ in batch]
                )
            except BaseException as exc:  # a bug or a dead model: every waiting passage sees it
                for *_, future in batch:
                    if not future.done():
                        future.set_exception(exc)
                if not isinstance(exc, Exception):
                    raise
                continue
            for (*_, future), result in zip(batch, results):
                if not future.done():
                    future.set_result(result)

    async def aclose(self) -> None:
        if self._worker is not None and not self._worker.done():
            self._worker.cancel()


class AsyncCaller(Protocol):
    async def complete(self, messages: Messages, params: GenerationParams, seed: int) -> Result: ...

    async def aclose(self) -> None: ...


def async_caller(backend: Backend) -> AsyncCaller:
    """The backend's own asynchronous client when it has one (HTTP), else a MicroBatcher."""
    native = getattr(backend, "async_caller", None)
    return native() if native is not None else MicroBatcher(backend)

"""An OpenAI-compatible chat-completions client: vLLM serve, SGLang, Ollama, DashScope, OpenRouter,
`transformers serve`.

Asynchronous with a concurrency limit; each request has a timeout and is retried with exponential
backoff and jitter on timeouts, connection errors, 5xx and 429 (honouring `Retry-After`, and
pausing every request while a rate limit is in force). Other 4xx are not retried: the request
itself is wrong. The API key is read from an environment variable and never logged or stored.

A request with a JSON schema asks for `response_format: {"type": "json_schema", ...}` (vLLM,
SGLang, OpenAI and others then decode under the schema). A server that rejects that field (400,
422 or 501) is asked again at once with `{"type": "json_object"}`, and then with no
`response_format` at all; the first rejection switches every later request, and `structured_mode`
says which level the server accepted. (`transformers serve` accepts the field and ignores it.)
"""

from __future__ import annotations

import asyncio
import email.utils
import json
import logging
import os
import random
import time
from collections.abc import Sequence
from typing import Any

import httpx

from embedforge.data_synth.backends.base import GenerationParams, Messages, Result
from embedforge.errors import ConfigError

logger = logging.getLogger(__name__)

STRUCTURED_MODES = ("json_schema", "json_object", "prompt")  # from the strictest to none
_FORMAT_REJECTED = (400, 422, 501)


def parse_retry_after(value: str | None, now: float | None = None) -> float | None:
    """Seconds to wait from a Retry-After header (delta-seconds or an HTTP date); None if absent/bad."""
    if not value:
        return None
    value = value.strip()
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - (time.time() if now is None else now))


def backoff_delay(attempt: int, base_s: float, max_s: float, rng: random.Random) -> float:
    """Exponential backoff with equal jitter: half the capped delay fixed, half random."""
    cap = min(max_s, base_s * (2**attempt))
    return cap / 2 + rng.uniform(0, cap / 2)


class OpenAIHTTPBackend:
    """Chat completions over HTTP.

    Args:
        model: the `model` field sent with each request (a served model name or folder).
        base_url: the server's OpenAI root, e.g. `http://127.0.0.1:8000/v1`.
        api_key_env: environment variable holding the key; unset means no Authorization header.
        concurrency: requests in flight at once.
        timeout_s: seconds for one request (connect + read).
        max_retries: retries after the first attempt for retryable failures.
        extra_body: more JSON fields for every request (e.g. `{"chat_template_kwargs": ...}`).
    """

    name = "openai"

    def __init__(
        self,
        model: str,
        base_url: str = "http://127.0.0.1:8000/v1",
        *,
        api_key_env: str | None = "OPENAI_API_KEY",
        concurrency: int = 8,
        timeout_s: float = 120.0,
        max_retries: int = 4,
        backoff_base_s: float = 0.5,
        backoff_max_s: float = 30.0,
        extra_body: dict[str, Any] | None = None,
        seed: int = 0,
    ):
        if concurrency < 1:
            raise ConfigError(f"concurrency must be >= 1, got {concurrency}")
        if max_retries < 0:
            raise ConfigError(f"max_retries must be >= 0, got {max_retries}")
        self.model = model
        self.url = base_url.rstrip("/") + "/chat/completions"
        self.concurrency = concurrency
        self.batch_size = concurrency
        self.timeout_s = timeout_s
        self.max_retries = max_retries
        self.backoff_base_s = backoff_base_s
        self.backoff_max_s = backoff_max_s
        self.extra_body = dict(extra_body or {})
        self._api_key_env = api_key_env
        self._rng = random.Random(seed)
        self.structured_mode = STRUCTURED_MODES[0]  # lowered when the server rejects a response_format

    def _headers(self) -> dict[str, str]:
        key = os.environ.get(self._api_key_env) if self._api_key_env else None
        return {"Authorization": f"Bearer {key}"} if key else {}

    def _body(self, messages: Messages, params: GenerationParams, seed: int | None) -> dict[str, Any]:
        body: dict[str, Any] = {
            "model": self.model,
            "messages": messages,
            "temperature": params.temperature,
            "top_p": params.top_p,
            "max_tokens": params.max_new_tokens,
            "stream": False,
        }
        if seed is not None:
            body["seed"] = seed
        response_format = self._response_format(params)
        if response_format is not None:
            body["response_format"] = response_format
        body.update(self.extra_body)
        return body

    def _response_format(self, params: GenerationParams) -> dict[str, Any] | None:
        mode = self.structured_mode
        if params.json_schema is not None and mode == "json_schema":
            schema = json.loads(params.json_schema)
            return {"type": "json_schema", "json_schema": {"name": "reply", "schema": schema, "strict": True}}
        if (params.json_schema is not None or params.json_mode) and mode != "prompt":
            return {"type": "json_object"}
        return None

    def _downgrade(self, sent: dict[str, Any], detail: str) -> bool:
        """After a rejected `response_format`, use a weaker level than the one sent (so the retry
        differs); False when what was sent is not one of ours."""
        kind = sent.get("type")
        if kind not in ("json_schema", "json_object"):
            return False
        weaker = "json_object" if kind == "json_schema" else "prompt"
        if STRUCTURED_MODES.index(weaker) > STRUCTURED_MODES.index(self.structured_mode):
            logger.warning("the server rejected response_format %s (%s); using %s from now on", kind,
                           detail[:120], weaker)
            self.structured_mode = weaker
        return True

    def async_caller(self) -> _Session:
        return _Session(self)

    def generate(
        self, batch: Sequence[Messages], params: GenerationParams, seeds: Sequence[int] | None = None
    ) -> list[Result]:
        """Synchronous entry point: the whole batch concurrently, within the concurrency limit."""
        seeds = list(seeds) if seeds is not None else [None] * len(batch)

        async def run() -> list[Result]:
            session = _Session(self)
            try:
                return list(
                    await asyncio.gather(*(session.complete(m, params, s) for m, s in zip(batch, seeds)))
                )
            finally:
                await session.aclose()

        return asyncio.run(run())

    def close(self) -> None:
        """Nothing to release: each event loop's connections close with its session."""


class _Session:
    """One event loop's connection pool, semaphore and rate-limit pause."""

    def __init__(self, backend: OpenAIHTTPBackend):
        self.backend = backend
        limits = httpx.Limits(
            max_connections=backend.concurrency, max_keepalive_connections=backend.concurrency
        )
        self.client = httpx.AsyncClient(timeout=httpx.Timeout(backend.timeout_s), limits=limits)
        self.semaphore = asyncio.Semaphore(backend.concurrency)
        self.paused_until = 0.0  # monotonic time before which nobody sends (a 429's Retry-After)

    async def aclose(self) -> None:
        await self.client.aclose()

    async def complete(self, messages: Messages, params: GenerationParams, seed: int | None) -> Result:
        backend = self.backend
        body = backend._body(messages, params, seed)
        started = time.monotonic()
        cause, detail = "connection_error", ""
        attempt = 0
        while attempt <= backend.max_retries:
            retry_after = None
            wait = self.paused_until - time.monotonic()
            if wait > 0:
                await asyncio.sleep(wait)
            async with self.semaphore:
                try:
                    response = await self.client.post(backend.url, json=body, headers=backend._headers())
                except httpx.TimeoutException:
                    cause, detail = "timeout", f"no reply within {backend.timeout_s:g} s"
                    response = None
                except httpx.TransportError as exc:
                    cause, detail = "connection_error", type(exc).__name__
                    response = None
            if response is not None:
                if response.status_code == 200:
                    return self._parse(response, attempt + 1, time.monotonic() - started)
                detail = f"HTTP {response.status_code}: {response.text[:200]}"
                if (
                    response.status_code in _FORMAT_REJECTED
                    and "response_format" in body
                    and backend._downgrade(body["response_format"], detail)
                ):
                    body = backend._body(messages, params, seed)  # the same request, a weaker format
                    continue
                if response.status_code == 429:
                    cause = "rate_limited"
                    retry_after = parse_retry_after(response.headers.get("retry-after"))
                    if retry_after is not None:
                        self.paused_until = max(self.paused_until, time.monotonic() + retry_after)
                elif response.status_code >= 500:
                    cause = "http_error"
                else:  # the request is wrong (bad model name, bad field): retrying cannot help
                    return Result(None, "http_error", detail, attempt + 1, time.monotonic() - started)
            if attempt < backend.max_retries:
                delay = (
                    retry_after
                    if retry_after is not None
                    else backoff_delay(attempt, backend.backoff_base_s, backend.backoff_max_s, backend._rng)
                )
                logger.debug("retrying after %s (%s) in %.2f s", cause, detail, delay)
                await asyncio.sleep(delay)
            attempt += 1
        return Result(None, cause, detail, backend.max_retries + 1, time.monotonic() - started)

    @staticmethod
    def _parse(response: httpx.Response, attempts: int, latency: float) -> Result:
        try:
            content = response.json()["choices"][0]["message"].get("content")
        except (ValueError, KeyError, IndexError, TypeError, AttributeError):
            return Result(
                None, "http_error", f"unexpected response body: {response.text[:200]}", attempts, latency
            )
        return Result(content or "", None, "", attempts, latency)

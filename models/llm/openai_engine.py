"""OpenAI-compatible completions engine: trtllm-serve, vLLM, the llama.cpp server.

Each prompt is one ``POST {base}/v1/completions`` with ``max_tokens=1, temperature=0,
logprobs=K``; P(yes) comes from the first token's top-K log-probabilities through the shared
``answer_tokens`` parser: ``choices[0].logprobs.top_logprobs[0]`` (token text -> logprob) in
OpenAI's format, or ``choices[0].logprobs.content[0].top_logprobs`` (a list of id, token and
logprob) from llama.cpp's own server. ``min_tokens=1`` (understood by vLLM,
trtllm-serve and the llama.cpp server) keeps a server from stopping at an end-of-sequence token
before it reports log-probabilities: the llama.cpp server returns none when the greedy token is
EOS. The reported log-probabilities are the raw ones, so this does not change P(yes).

Requests of a batch run concurrently on one pooled ``httpx.Client``; at most ``concurrency``
are in flight (a semaphore, shared by every caller of this engine). Timeouts, connection errors,
429 and 5xx are retried with exponential backoff and full jitter, other 4xx are not. The API is
synchronous: the scheduler calls it from a worker thread, never from the event loop.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import numpy as np

from models.llm.answer_tokens import p_yes_from_top_logprobs, side_of_text
from models.llm.engine import EngineError, EngineStats, check_probabilities

log = logging.getLogger(__name__)

RETRY_STATUS = frozenset({408, 429, 500, 502, 503, 504})


class OpenAIEngine:
    def __init__(
        self,
        base_url: str,
        *,
        model: str | None = None,
        api_key: str | None = None,
        top_logprobs: int = 20,
        min_tokens: int | None = 1,
        concurrency: int = 8,
        timeout_s: float = 30.0,
        connect_timeout_s: float = 5.0,
        retries: int = 3,
        backoff_s: float = 0.2,
        backoff_max_s: float = 5.0,
    ) -> None:
        base = base_url.rstrip("/")
        self.base_url = base if base.endswith("/v1") else base + "/v1"
        self.top_logprobs = top_logprobs
        self.min_tokens = min_tokens
        self.retries = retries
        self.backoff_s = backoff_s
        self.backoff_max_s = backoff_max_s
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._client = httpx.Client(
            headers=headers,
            timeout=httpx.Timeout(timeout_s, connect=connect_timeout_s),
            limits=httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency),
        )
        self._slots = threading.BoundedSemaphore(concurrency)
        self._pool = ThreadPoolExecutor(max_workers=concurrency, thread_name_prefix="openai-engine")
        self._model = model
        self.model_id = f"openai:{model}" if model else f"openai:{self.base_url}"
        self.stats = EngineStats()

    # --- HTTP -------------------------------------------------------------------------------

    def _request(self, method: str, path: str, body: dict[str, Any] | None = None) -> dict[str, Any]:
        url = self.base_url + path
        for attempt in range(self.retries + 1):
            retriable_error: str
            try:
                with self._slots:
                    response = self._client.request(method, url, json=body)
            except httpx.TimeoutException as e:
                retriable_error = f"timeout: {e!r}"
            except httpx.TransportError as e:
                retriable_error = f"connection error: {e!r}"
            else:
                if response.status_code < 400:
                    return response.json()
                detail = response.text[:300]
                if response.status_code not in RETRY_STATUS:
                    raise EngineError(f"{method} {url}: HTTP {response.status_code}: {detail}", retriable=False)
                retriable_error = f"HTTP {response.status_code}: {detail}"
            if attempt == self.retries:
                raise EngineError(
                    f"{method} {url} failed after {attempt + 1} attempts: {retriable_error}", retriable=True
                )
            delay = random.uniform(0, min(self.backoff_max_s, self.backoff_s * 2**attempt))
            log.warning("%s %s: %s; retry %d in %.2fs", method, url, retriable_error, attempt + 1, delay)
            time.sleep(delay)
        raise AssertionError("unreachable")

    @property
    def model(self) -> str:
        """The served model's id, asked from ``/v1/models`` once."""
        if self._model is None:
            data = self._request("GET", "/models").get("data") or []
            if not data:
                raise EngineError(f"{self.base_url}/models lists no model", retriable=False)
            self._model = str(data[0]["id"])
        return self._model

    def _complete(self, prompt: str, *, record: bool = True, **params: Any) -> dict[str, Any]:
        body = {"model": self.model, "prompt": prompt, "temperature": 0, **params}
        choices = (data := self._request("POST", "/completions", body)).get("choices") or []
        if not choices:
            raise EngineError(f"completion without choices: {str(data)[:300]}", retriable=False)
        usage = data.get("usage") or {}
        if record:
            self.stats.add(
                prompts=1,
                prompt_tokens=int(usage.get("prompt_tokens") or 0),
                generated_tokens=int(usage.get("completion_tokens") or 0),
            )
        return data

    def _map(self, fn, prompts: list[str]) -> list:
        if len(prompts) == 1:
            return [fn(prompts[0])]
        return list(self._pool.map(fn, prompts))

    # --- engine protocol ----------------------------------------------------------------------

    def _score_one(self, prompt: str) -> float:
        extra = {"min_tokens": self.min_tokens} if self.min_tokens else {}
        data = self._complete(prompt, max_tokens=1, logprobs=self.top_logprobs, **extra)
        choice = data["choices"][0]
        logprobs = choice.get("logprobs")
        if isinstance(logprobs, dict) and "top_logprobs" in logprobs:
            # OpenAI's completions format (vLLM, trtllm-serve, llama-cpp-python's server):
            # one {token text: logprob} dict per generated token.
            top, side_of = (logprobs["top_logprobs"] or [None])[0], None
        elif isinstance(logprobs, dict) and "content" in logprobs:
            # llama.cpp's own server (llama-server): one {"top_logprobs": [{"id", "token",
            # "logprob"}, ...]} per generated token. Keyed by id, since two ids can share a text.
            first = (logprobs["content"] or [None])[0]
            entries = (first or {}).get("top_logprobs") or []
            top = {e["id"]: e["logprob"] for e in entries} or None
            texts = {e["id"]: e["token"] for e in entries}
            side_of = lambda token_id: side_of_text(texts[token_id])  # noqa: E731
        else:
            raise EngineError("the server returned no logprobs (does it support logprobs?)", retriable=False)
        if not top:
            # Stopped before the first token (an end-of-generation token other than the one
            # min_tokens bans): no information, like a top-K list without yes or no.
            log.warning("no log-probabilities for a prompt (finish_reason=%s): P(yes)=0.5", choice.get("finish_reason"))
            return 0.5
        return p_yes_from_top_logprobs(top, side_of)

    def score(self, prompts: list[str]) -> np.ndarray:
        if not prompts:
            return np.empty(0, dtype=np.float64)
        return check_probabilities(np.array(self._map(self._score_one, prompts)), len(prompts))

    def generate(self, prompts: list[str], max_tokens: int = 64) -> list[str]:
        def one(prompt: str) -> str:
            return str(self._complete(prompt, max_tokens=max_tokens)["choices"][0].get("text") or "")

        return self._map(one, prompts)

    def count_tokens(self, prompts: list[str]) -> list[int]:
        """The server's own count: ``usage.prompt_tokens`` of a one-token completion (every
        OpenAI-compatible server reports it; tokenize endpoints differ between servers)."""

        def one(prompt: str) -> int:
            usage = self._complete(prompt, record=False, max_tokens=1).get("usage") or {}
            if "prompt_tokens" not in usage:
                raise EngineError("the server reports no usage.prompt_tokens", retriable=False)
            return int(usage["prompt_tokens"])

        return self._map(one, prompts)

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
        self._client.close()

"""An OpenAI-compatible chat client (vLLM, SGLang, `transformers serve`, hosted APIs), stdlib only.

Generation-only stages (tree creation, question writing, generative agents) can send their
prompts here instead of loading a local model: `--api_base http://host:8000/v1 --api_model NAME`,
with the key read from the environment variable named by `--api_key_env` (never from a flag, so
it does not land in logs or args files).

At most `concurrency` requests are in flight (`--api_concurrency`); a request that fails with a
connection error, a timeout (`--api_timeout_s`) or a retryable HTTP status (429, 5xx) is retried
with doubling waits, at most `--api_max_attempts` tries. `chat_each` yields every reply as soon
as it arrives, so a stage logs each one at once and a kill loses only the requests in flight.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from typing import Iterator

from .errors import InputError, StageFailed

log = logging.getLogger(__name__)

RETRYABLE = {408, 409, 429, 500, 502, 503, 504}


class APIError(StageFailed):
    """The server refused or failed a request after all retries."""


@dataclass
class ChatAPI:
    """One OpenAI-compatible endpoint and model."""

    base_url: str  # e.g. http://127.0.0.1:8000/v1
    model: str
    api_key_env: str = "OPENAI_API_KEY"
    timeout_s: float = 300.0
    max_attempts: int = 4
    concurrency: int = 8  # requests in flight at once

    def _headers(self) -> dict:
        headers = {"Content-Type": "application/json"}
        key = os.environ.get(self.api_key_env)
        if key:
            headers["Authorization"] = f"Bearer {key}"
        return headers

    def _post(self, payload: dict, stop: threading.Event | None = None, path: str = "/chat/completions") -> dict:
        url = self.base_url.rstrip("/") + path
        body = json.dumps(payload).encode("utf-8")
        stop = stop or threading.Event()
        delay = 1.0  # seconds before the second try; doubled after each failure
        for attempt in range(1, self.max_attempts + 1):
            try:
                req = urllib.request.Request(url, data=body, headers=self._headers(), method="POST")
                with urllib.request.urlopen(req, timeout=self.timeout_s) as resp:
                    return json.loads(resp.read().decode("utf-8"))
            except urllib.error.HTTPError as err:
                detail = err.read().decode("utf-8", "replace")[:300]
                if err.code not in RETRYABLE or attempt == self.max_attempts:
                    raise APIError(f"{url}: HTTP {err.code}: {detail}") from None
            except (urllib.error.URLError, TimeoutError, ConnectionError, json.JSONDecodeError) as err:
                if attempt == self.max_attempts:
                    raise APIError(f"{url}: {err} (after {attempt} tries)") from None
            log.warning("request to %s failed (attempt %d/%d); retrying in %.0fs", url, attempt, self.max_attempts, delay)
            if stop.wait(delay):  # another request of the same burst failed for good: stop retrying
                raise APIError(f"{url}: abandoned after another request failed")
            delay *= 2
        raise AssertionError("unreachable")

    def check_reachable(self) -> None:
        """`InputError` when no server answers at `base_url`: a wrong port fails before any work, not
        after the stages before this one. Any HTTP answer, even 401 or 404, counts as reachable."""
        url = self.base_url.rstrip("/") + "/models"
        try:
            req = urllib.request.Request(url, headers=self._headers())
            with urllib.request.urlopen(req, timeout=min(self.timeout_s, 30.0)):
                return
        except urllib.error.HTTPError:
            return
        except (urllib.error.URLError, TimeoutError, ConnectionError, ValueError) as err:
            reason = getattr(err, "reason", err)
            raise InputError(self.base_url, f"no OpenAI-compatible server answers there ({reason}); start it "
                                            "(e.g. vllm serve MODEL --port 8000) or fix the address") from None

    def chat(self, user_text: str, max_tokens: int, temperature: float = 0.0, seed: int | None = None,
             stop: threading.Event | None = None) -> str:
        """The assistant's reply to one user message."""
        payload = {"model": self.model, "messages": [{"role": "user", "content": user_text}],
                   "max_tokens": max_tokens, "temperature": temperature}
        if seed is not None:
            payload["seed"] = seed
        out = self._post(payload, stop)
        try:
            return out["choices"][0]["message"]["content"] or ""
        except (KeyError, IndexError, TypeError):
            raise APIError(f"unexpected response from {self.base_url}: {str(out)[:300]}") from None

    def chat_each(self, requests: list[tuple[str, int | None]], max_tokens: int,
                  temperature: float = 0.0) -> Iterator[tuple[int, str]]:
        """(index, reply) for each (user text, seed) request, in the order the replies arrive,
        `concurrency` requests in flight at once. When one fails for good, the requests not yet
        sent are cancelled, those in flight stop retrying, and the error is raised."""
        stop = threading.Event()
        pool = ThreadPoolExecutor(max_workers=max(1, self.concurrency))
        try:
            futures = {pool.submit(self.chat, text, max_tokens, temperature, seed, stop): i
                       for i, (text, seed) in enumerate(requests)}
            for future in as_completed(futures):
                yield futures[future], future.result()
        finally:
            stop.set()
            pool.shutdown(wait=False, cancel_futures=True)

    def chat_many(self, user_texts: list[str], max_tokens: int, temperature: float = 0.0,
                  seeds: list[int] | None = None) -> list[str]:
        """Replies in input order, `concurrency` requests at a time."""
        seeds = seeds or [None] * len(user_texts)
        replies = [""] * len(user_texts)
        for i, text in self.chat_each(list(zip(user_texts, seeds)), max_tokens, temperature):
            replies[i] = text
        return replies

    def post_each(self, path: str, payloads: list[dict]) -> Iterator[tuple[int, dict]]:
        """(index, response JSON) for each payload POSTed to `path` ("/chat/completions", "/completions"), in
        the order the responses arrive, with `chat_each`'s concurrency, retries and stop-on-failure."""
        stop = threading.Event()
        pool = ThreadPoolExecutor(max_workers=max(1, self.concurrency))
        try:
            futures = {pool.submit(self._post, payload, stop, path): i for i, payload in enumerate(payloads)}
            for future in as_completed(futures):
                yield futures[future], future.result()
        finally:
            stop.set()
            pool.shutdown(wait=False, cancel_futures=True)


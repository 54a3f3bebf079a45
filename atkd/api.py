"""An OpenAI-compatible chat client (vLLM, SGLang, `transformers serve`, hosted APIs), stdlib only.

Generation-only stages (tree creation, question writing, generative agents) can send their
prompts here instead of loading a local model: `--api_base http://host:8000/v1 --api_model NAME`,
with the key read from the environment variable named by `--api_key_env` (never from a flag, so
it does not land in logs or args files).
"""

from __future__ import annotations

import json
import logging
import os
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from .errors import StageFailed

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

    def _post(self, payload: dict) -> dict:
        url = self.base_url.rstrip("/") + "/chat/completions"
        headers = {"Content-Type": "application/json"}
        key = os.environ.get(self.api_key_env)
        if key:
            headers["Authorization"] = f"Bearer {key}"
        body = json.dumps(payload).encode("utf-8")
        delay = 1.0
        for attempt in range(1, self.max_attempts + 1):
            try:
                req = urllib.request.Request(url, data=body, headers=headers, method="POST")
                with urllib.request.urlopen(req, timeout=self.timeout_s) as resp:
                    return json.loads(resp.read().decode("utf-8"))
            except urllib.error.HTTPError as err:
                detail = err.read().decode("utf-8", "replace")[:300]
                if err.code not in RETRYABLE or attempt == self.max_attempts:
                    raise APIError(f"{url}: HTTP {err.code}: {detail}") from None
            except (urllib.error.URLError, TimeoutError, ConnectionError) as err:
                if attempt == self.max_attempts:
                    raise APIError(f"{url}: {err}") from None
            log.warning("request to %s failed (attempt %d/%d); retrying in %.0fs", url, attempt, self.max_attempts, delay)
            time.sleep(delay)
            delay *= 2
        raise AssertionError("unreachable")

    def chat(self, user_text: str, max_tokens: int, temperature: float = 0.0, seed: int | None = None) -> str:
        """The assistant's reply to one user message."""
        payload = {"model": self.model, "messages": [{"role": "user", "content": user_text}],
                   "max_tokens": max_tokens, "temperature": temperature}
        if seed is not None:
            payload["seed"] = seed
        out = self._post(payload)
        try:
            return out["choices"][0]["message"]["content"] or ""
        except (KeyError, IndexError, TypeError):
            raise APIError(f"unexpected response from {self.base_url}: {str(out)[:300]}") from None

    def chat_many(self, user_texts: list[str], max_tokens: int, temperature: float = 0.0,
                  seeds: list[int] | None = None) -> list[str]:
        """Replies in input order, `concurrency` requests at a time."""
        seeds = seeds or [None] * len(user_texts)
        with ThreadPoolExecutor(max_workers=max(1, self.concurrency)) as pool:
            futures = [pool.submit(self.chat, t, max_tokens, temperature, s) for t, s in zip(user_texts, seeds)]
            return [f.result() for f in futures]

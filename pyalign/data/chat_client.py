"""A small client for OpenAI-compatible chat-completions endpoints (OpenAI, vLLM, TGI, ...).

``POST {base_url}/chat/completions`` with ``{"model", "messages", "max_tokens", "temperature",
"seed"}``; the answer's ``choices[0].message.content`` is returned.

- Timeouts: connecting and every wait for the server's bytes are bounded (``timeout`` seconds).
  Standard library only (``urllib``), like the hub probe.
- Retries: connection errors, timeouts, 408, 409, 429 and 5xx are retried up to ``max_retries``
  times with exponential backoff (``backoff * 2**attempt`` seconds, at most ``max_backoff``; a
  ``Retry-After`` header in seconds is honoured); other 4xx answers fail at once.
- The API key is read from the environment variable ``api_key_env`` (never passed as an argument,
  so it does not end up in shell history, configs or logs) and sent as ``Authorization: Bearer``.
  It is never logged, printed or written: ``repr`` and error messages leave it out, and any echo
  of it in a server's error text is masked. Without the variable no Authorization header is sent
  (local servers often need none).
"""

from __future__ import annotations

import json
import logging
import os
import random
import socket
import time
import urllib.error
import urllib.request

logger = logging.getLogger("pyalign.data")
RETRIED_STATUS = {408, 409, 429, 500, 502, 503, 504}


class ChatCompletionsError(RuntimeError):
    """The endpoint failed (after the retries, or with an answer that retrying cannot fix)."""


class ChatCompletionsClient:
    def __init__(self, base_url: str, model: str, *, api_key_env: str = "OPENAI_API_KEY", timeout: float = 120.0,
                 max_retries: int = 5, backoff: float = 1.0, max_backoff: float = 30.0):
        if not isinstance(base_url, str) or not base_url.startswith(("http://", "https://")):
            raise ValueError(f"base_url: expected an http(s) URL, got {base_url!r}")
        if not isinstance(model, str) or not model:
            raise ValueError(f"model: expected the endpoint's model name, got {model!r}")
        if not timeout > 0:
            raise ValueError(f"timeout: expected seconds > 0, got {timeout!r}")
        if isinstance(max_retries, bool) or not isinstance(max_retries, int) or max_retries < 0:
            raise ValueError(f"max_retries: expected an integer >= 0, got {max_retries!r}")
        self.url = base_url.rstrip("/") + "/chat/completions"
        self.model = model
        self.api_key_env = api_key_env
        self.timeout, self.max_retries, self.backoff, self.max_backoff = timeout, max_retries, backoff, max_backoff
        self._api_key = os.environ.get(api_key_env) or None
        if self._api_key is None:
            logger.info("chat completions: $%s is not set; requests to %s go without an API key", api_key_env, self.url)

    def __repr__(self) -> str:
        key = f"${self.api_key_env} (set)" if self._api_key else f"${self.api_key_env} (unset)"
        return f"ChatCompletionsClient(url={self.url!r}, model={self.model!r}, api_key={key})"

    def describe(self) -> dict:
        """What the answers depend on (for provenance and resume checks); no key."""
        return {"kind": "chat_completions", "url": self.url, "model": self.model}

    def _mask(self, text: str) -> str:
        return text.replace(self._api_key, "***") if self._api_key else text

    def _headers(self) -> dict:
        headers = {"Content-Type": "application/json"}
        if self._api_key:
            headers["Authorization"] = f"Bearer {self._api_key}"
        return headers

    def complete(self, messages: list[dict], *, max_tokens: int = 1024, temperature: float = 0.0,
                 seed: int | None = None) -> str:
        """The assistant's answer to ``messages``."""
        body = {"model": self.model, "messages": messages, "max_tokens": max_tokens, "temperature": temperature}
        if seed is not None:
            body["seed"] = seed
        data = json.dumps(body).encode("utf-8")
        last = ""
        for attempt in range(self.max_retries + 1):
            wait = min(self.max_backoff, self.backoff * 2 ** attempt) * (1 + 0.1 * random.random())
            request = urllib.request.Request(self.url, data=data, headers=self._headers(), method="POST")
            try:
                # the timeout bounds connecting and every wait for the server's bytes
                with urllib.request.urlopen(request, timeout=self.timeout) as response:
                    return self._content(response.read())
            except urllib.error.HTTPError as error:
                text = error.read().decode("utf-8", "replace")
                last = f"HTTP {error.code}: {self._mask(text[:300])}"
                if error.code not in RETRIED_STATUS:
                    raise ChatCompletionsError(f"{self.url}: {last}") from None
                retry_after = error.headers.get("Retry-After")
                if retry_after and retry_after.replace(".", "", 1).isdigit():
                    wait = min(self.max_backoff, float(retry_after))
            except (urllib.error.URLError, TimeoutError, socket.timeout, ConnectionError) as error:
                last = type(getattr(error, "reason", error)).__name__
            if attempt < self.max_retries:
                logger.warning("chat completions: %s failed (%s); retry %d/%d in %.1f s", self.url, last,
                               attempt + 1, self.max_retries, wait)
                time.sleep(wait)
        raise ChatCompletionsError(f"{self.url}: failed after {self.max_retries + 1} attempts; last: {last}")

    def _content(self, raw: bytes) -> str:
        text = raw.decode("utf-8", "replace")
        try:
            content = json.loads(text)["choices"][0]["message"]["content"]
        except (ValueError, KeyError, IndexError, TypeError):
            raise ChatCompletionsError(f"{self.url}: not a chat-completions answer: {self._mask(text[:300])}") from None
        if not isinstance(content, str):
            raise ChatCompletionsError(f"{self.url}: choices[0].message.content is {type(content).__name__}, not text")
        return content

"""A small client of ``chatrlhf serve``: rewards from a reward model running elsewhere.

    client = RewardClient("http://127.0.0.1:8000")
    rewards = client.score(["What is 2+2?"], ["4"])          # [float]

Connection errors, timeouts and 503 answers are retried with a growing pause (scoring is
idempotent, so resending a request is safe); a 4xx answer is a mistake in the request (or a
missing or wrong API key) and raises ``ValueError`` with the server's message at once.
"""

from __future__ import annotations

import os
import time

import httpx


class RewardClient:
    """Scores (prompt, reply) items on a ``chatrlhf serve`` server.

    Args:
        base_url: e.g. "http://127.0.0.1:8000".
        timeout: seconds per HTTP request.
        retries: further attempts after a connection error, a timeout or a 503.
        backoff: seconds before the first retry, doubled each time.
        chunk: items per request; the server refuses more than its --max-items (256 by default).
        api_key: the server's --api-key, sent as ``Authorization: Bearer``; default
            $CHATRLHF_API_KEY (none when unset).
    """

    def __init__(self, base_url: str, timeout: float = 60.0, retries: int = 3, backoff: float = 0.5,
                 chunk: int = 256, api_key: str | None = None):
        self.base_url = base_url.rstrip("/")
        self.retries, self.backoff, self.chunk = retries, backoff, chunk
        api_key = api_key or os.environ.get("CHATRLHF_API_KEY")
        headers = {"authorization": f"Bearer {api_key}"} if api_key else {}
        self.http = httpx.Client(base_url=self.base_url, timeout=timeout, headers=headers)

    def score(self, prompts: list, replies: list[str], normalize: bool = False,
              allow_empty: bool = True) -> list[float]:
        """Rewards of each (prompt, reply); a prompt is text or a list of chat messages.

        ``allow_empty``: empty replies are scored. The server refuses them unless told, but a
        client mostly scores an RL policy's samples, and an empty one deserves a (low) reward,
        not an exception; False lets the server answer 422 for them."""
        if len(prompts) != len(replies):
            raise ValueError(f"{len(prompts)} prompts but {len(replies)} replies")
        rewards = []
        for start in range(0, len(prompts), self.chunk):
            items = [{"prompt": p, "reply": r}
                     for p, r in zip(prompts[start:start + self.chunk], replies[start:start + self.chunk])]
            rewards += self._post("/score", {"items": items, "normalize": normalize,
                                             "allow_empty": allow_empty})["rewards"]
        return rewards

    def compare(self, prompt, replies: list[str]) -> dict:
        """{"rewards", "ranking" (best first), "pairs": [{"a", "b", "probability"}]}."""
        return self._post("/compare", {"prompt": prompt, "replies": replies})

    def health(self) -> dict:
        return self._request("GET", "/health")

    def close(self) -> None:
        self.http.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def _post(self, path: str, body: dict) -> dict:
        return self._request("POST", path, body)

    def _request(self, method: str, path: str, body: dict | None = None) -> dict:
        pause = self.backoff
        for attempt in range(self.retries + 1):
            try:
                response = self.http.request(method, path, json=body)
            except httpx.TransportError as error:
                failure = f"{type(error).__name__}: {error}"
            else:
                if response.status_code != 503:
                    break
                failure = "503 service unavailable"
            if attempt == self.retries:
                raise ConnectionError(f"{method} {self.base_url}{path} failed {attempt + 1} times; "
                                      f"last: {failure}")
            time.sleep(pause)
            pause *= 2
        if 400 <= response.status_code < 500:
            raise ValueError(f"{self.base_url}{path}: {response.status_code} {_detail(response)}")
        response.raise_for_status()
        return response.json()


def _detail(response: httpx.Response) -> str:
    try:
        return str(response.json().get("detail", response.text))
    except ValueError:
        return response.text

"""LLM judges for `chatrlhf label`: a local causal LM, any OpenAI-compatible endpoint, a cache.

    judge = LocalJudge("smollm2-135m", cache=Cache("labels.cache.jsonl"))
    answers = judge.ask("pair", [("What is 2+2?", ("4", "5"))])   # P(first reply is better)

Both judges take the same questions and return one ``Answer`` per question:
- ``"pair"``: (prompt, (reply_a, reply_b)) -> ``value`` = P(the judge answers "A"), in [0, 1];
- ``"score"``: (prompt, (reply,)) -> ``value`` = a 0-5 score (ChatLLaMA's absolute scale).
The local judge reads the probabilities of the answer tokens after the chat-templated judging
prompt (no sampling); the HTTP judge reads the text answer, so its value is 1.0 / 0.0 (pair) or
the integer score. An answer that cannot be had (malformed, refused, HTTP errors after retries)
has ``value=None`` and a ``reason``: it is recorded as unlabelled, never guessed.
"""

from __future__ import annotations

import hashlib
import json
import random
import re
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from chatrlhf.data.records import Prompt

# Default judging prompts. MT-bench (Zheng et al., arXiv 2306.05685, fig. 5) uses the same shape:
# the question, both answers in labelled blocks, and a one-token verdict.
PAIR_TEMPLATE = (
    "Compare two responses to the conversation below. Which response is more helpful, honest "
    "and harmless?\n\n[Conversation]\n{prompt}\n\n[Response A]\n{reply_a}\n\n[Response B]\n"
    "{reply_b}\n\nAnswer with a single letter: A or B."
)
SCORE_TEMPLATE = (
    "Rate the response to the conversation below on a scale from 0 (useless or harmful) to 5 "
    "(excellent: helpful, honest and harmless).\n\n[Conversation]\n{prompt}\n\n[Response]\n"
    "{reply}\n\nAnswer with a single digit from 0 to 5."
)
CHOICES = ("A", "B")
SCORES = tuple(str(s) for s in range(6))


@dataclass
class Answer:
    """One judge answer: ``value`` (P(A) for pairs, 0-5 for scores) or None with a ``reason``."""

    value: float | None
    reason: str | None = None
    mass: float | None = None  # local judge: probability on the allowed answer tokens
    raw: str | None = None  # HTTP judge: the answer text
    cached: bool = False
    tries: int = 0


def conversation_text(prompt: Prompt) -> str:
    """A prompt as readable text inside the judging prompt: chats and HH dialogues become
    "User: ..." / "Assistant: ..." turns; plain text stays as it is."""
    from chatrlhf.policy import chat_messages

    messages = chat_messages(prompt)
    if len(messages) == 1 and messages[0]["role"] == "user":
        return messages[0]["content"]
    names = {"user": "User", "assistant": "Assistant", "system": "System"}
    return "\n".join(f"{names.get(m['role'], m['role'])}: {m['content']}" for m in messages)


def fill(template: str, kind: str, prompt: str, replies: tuple[str, ...]) -> str:
    if kind == "pair":
        return template.replace("{prompt}", prompt).replace("{reply_a}", replies[0]).replace(
            "{reply_b}", replies[1])
    return template.replace("{prompt}", prompt).replace("{reply}", replies[0])


def check_template(template: str, kind: str) -> None:
    needed = ("{prompt}", "{reply_a}", "{reply_b}") if kind == "pair" else ("{prompt}", "{reply}")
    missing = [n for n in needed if n not in template]
    if missing:
        raise ValueError(f"the {kind} template lacks {', '.join(missing)}; it needs {', '.join(needed)}")


def parse_answer(text: str, kind: str) -> float | None:
    """The verdict in an answer text, or None when there is no single clear one.

    Pair: the first word (after quotes, "Answer:", "Response") must be A or B -> 1.0 / 0.0.
    Score: the first number must be an integer 0-5 -> that number. Anything else is malformed.
    """
    head = re.sub(r"^[\s\"'*(\[]*((final\s+)?(answer|verdict)\s*[:\-]?\s*)?(response\s+)?[\"'*(\[]*",
                  "", text.strip(), flags=re.IGNORECASE)
    if kind == "pair":
        match = re.match(r"([AB])(?![A-Za-z0-9])", head)
        return None if not match else 1.0 if match.group(1) == "A" else 0.0
    match = re.match(r"(\d+(\.\d+)?)(?![\d])", head)
    if not match or match.group(2) or int(match.group(1)) > 5:
        return None
    return float(match.group(1))


class Cache:
    """Answers on disk, one JSON line per answer, keyed by judge + template + question.

    Appended and flushed as answers arrive, so an interrupted run keeps what it paid for and a
    rerun asks only what is missing. A torn last line (a crash mid-write) is ignored on reading.
    Only real verdicts are stored: failures are asked again on the next run.
    """

    def __init__(self, path: str | Path | None):
        self.path = Path(path) if path else None
        self.entries: dict[str, dict] = {}
        self.lock = threading.Lock()
        self.torn = 0
        if self.path and self.path.exists():
            for line in self.path.read_text(encoding="utf-8").splitlines():
                try:
                    entry = json.loads(line)
                    self.entries[entry["key"]] = entry
                except (json.JSONDecodeError, KeyError, TypeError):
                    self.torn += 1

    @staticmethod
    def key(*parts) -> str:
        return hashlib.sha256(json.dumps(parts, ensure_ascii=False).encode()).hexdigest()

    def get(self, key: str) -> dict | None:
        return self.entries.get(key)

    def put(self, key: str, entry: dict) -> None:
        entry = {"key": key, **entry}
        with self.lock:
            self.entries[key] = entry
            if self.path:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                with self.path.open("a", encoding="utf-8") as file:
                    file.write(json.dumps(entry, ensure_ascii=False) + "\n")


def template_id(template: str) -> str:
    return hashlib.sha256(template.encode()).hexdigest()[:12]


# ---- local judge ----------------------------------------------------------------------------

class LocalJudge:
    """A causal LM read at the answer token: P(A) vs P(B), or the distribution over 0-5.

    Args:
        name: embedded short name ('smollm2-135m'), hub id or local folder.
        max_length: tokens per judging prompt; longer questions are cut (counted in ``cut``):
            each reply keeps at most 3/8 (pairs) or 3/4 (scores) of the free room, cut from the
            right; the conversation takes the rest, cut from the left (its last turns matter).
        batch_size: questions per forward pass.
    """

    def __init__(self, name: str, templates: dict, max_length: int = 1024, batch_size: int = 8,
                 cache: Cache | None = None, dtype=None):
        # torch is imported by the local judge only: the HTTP judge and `chatrlhf label --help`
        # run without it.
        import torch

        from chatrlhf.policy import load_policy

        self.name, self.templates, self.max_length, self.batch_size = name, templates, max_length, batch_size
        self.model, self.tokenizer = load_policy(name, dtype=dtype or torch.float32)
        self.model.eval()
        self.cache = cache or Cache(None)
        self.cut = 0
        self.answer_ids = {"pair": [self._token_ids(c) for c in CHOICES],
                           "score": [self._token_ids(s) for s in SCORES]}

    def _token_ids(self, answer: str) -> list[int]:
        # "A" and " A" are different tokens in most BPE vocabularies; either is the same answer.
        ids = set()
        for text in (answer, " " + answer):
            encoded = self.tokenizer.encode(text, add_special_tokens=False)
            if len(encoded) == 1:
                ids.add(encoded[0])
        if not ids:
            raise ValueError(f"judge model {self.name}: the answer {answer!r} is not one token in its "
                             f"vocabulary, so its probability cannot be read")
        return sorted(ids)

    def _tokens(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False)

    def render(self, kind: str, prompt: str, replies: tuple[str, ...]) -> str:
        """The judging prompt as the model reads it, cut to ``max_length`` tokens."""
        template = self.templates[kind]
        overhead = len(self._tokens(self._chat(fill(template, kind, "", tuple("" for _ in replies)))))
        room = self.max_length - overhead - 1
        if room < 16:
            raise ValueError(f"judge.max_length={self.max_length} leaves no room for the question "
                             f"(the template alone takes {overhead} tokens)")
        reply_room = room * 3 // (8 if kind == "pair" else 4)
        pieces, cut = [], False
        for reply in replies:
            ids = self._tokens(reply)
            if len(ids) > reply_room:
                reply, cut = self.tokenizer.decode(ids[:reply_room]), True
            pieces.append(reply)
        prompt_ids = self._tokens(prompt)
        prompt_room = room - sum(len(self._tokens(p)) for p in pieces)
        if len(prompt_ids) > prompt_room:
            prompt, cut = self.tokenizer.decode(prompt_ids[len(prompt_ids) - prompt_room:]), True
        self.cut += cut
        return self._chat(fill(template, kind, prompt, tuple(pieces)))

    def _chat(self, content: str) -> str:
        from chatrlhf.policy import render_prompt

        return render_prompt(self.tokenizer, [{"role": "user", "content": content}])

    def ask(self, kind: str, questions: list[tuple[str, tuple[str, ...]]]) -> list[Answer]:
        """One Answer per (prompt, replies); cached answers are not recomputed."""
        texts = [self.render(kind, prompt, replies) for prompt, replies in questions]
        keys = [Cache.key("local", self.name, kind, text) for text in texts]
        answers: list[Answer | None] = [None] * len(texts)
        todo = []
        for i, key in enumerate(keys):
            hit = self.cache.get(key)
            if hit:
                answers[i] = Answer(hit["value"], mass=hit.get("mass"), cached=True)
            else:
                todo.append(i)
        todo.sort(key=lambda i: len(texts[i]))  # similar lengths together: less padding
        for start in range(0, len(todo), self.batch_size):
            chunk = todo[start:start + self.batch_size]
            for i, (value, mass) in zip(chunk, self._forward(kind, [texts[i] for i in chunk])):
                answers[i] = Answer(value, mass=mass)
                self.cache.put(keys[i], {"value": value, "mass": mass})
        return answers

    def _forward(self, kind: str, texts: list[str]) -> list[tuple[float, float]]:
        """(value, mass) per text from the next-token distribution after the judging prompt."""
        import torch

        with torch.inference_mode():
            encoded = [self._tokens(t) for t in texts]
            width = max(len(e) for e in encoded)
            pad = self.tokenizer.pad_token_id
            # Left padding puts every last token at position -1; explicit position ids keep each
            # sequence's positions as if it were alone, so padding does not change the answer.
            input_ids = torch.tensor([[pad] * (width - len(e)) + e for e in encoded])
            mask = torch.tensor([[0] * (width - len(e)) + [1] * len(e) for e in encoded])
            positions = (mask.cumsum(-1) - 1).clamp(min=0)
            device = next(self.model.parameters()).device
            logits = self.model(input_ids=input_ids.to(device), attention_mask=mask.to(device),
                                position_ids=positions.to(device), logits_to_keep=1).logits[:, -1].float()
            logps = logits.log_softmax(-1)
            # log P(answer) = logsumexp over the answer's token variants ("A", " A").
            answer_logps = torch.stack([logps[:, ids].logsumexp(-1) for ids in self.answer_ids[kind]], -1)
            mass = answer_logps.logsumexp(-1).exp()
            probabilities = answer_logps.softmax(-1)  # renormalised over the allowed answers
            if kind == "pair":
                values = probabilities[:, 0]
            else:
                values = probabilities @ torch.arange(len(SCORES), dtype=probabilities.dtype, device=device)
            return [(float(v), float(m)) for v, m in zip(values.tolist(), mass.tolist())]


# ---- OpenAI-compatible judge ----------------------------------------------------------------

class FatalHttpError(ValueError):
    """An answer that no retry will fix for any question (bad key, bad URL or model name)."""


class HttpJudge:
    """Any OpenAI-compatible ``/chat/completions`` endpoint (vLLM, llama.cpp server, hosted).

    Each question is one request at temperature 0, sent by up to ``concurrency`` threads.
    Timeouts, connection errors, 429 and 5xx are retried with exponential backoff (base
    ``backoff`` seconds, doubled per try, with jitter); malformed or refused answers are asked
    again up to ``retries`` times, then recorded unlabelled with the reason. 401/403/404 stop the
    run: every other request would fail the same way.
    """

    def __init__(self, base_url: str, model: str, templates: dict, api_key: str | None = None,
                 timeout: float = 60.0, retries: int = 3, backoff: float = 1.0, concurrency: int = 8,
                 max_tokens: int = 16, cache: Cache | None = None):
        import httpx

        self.url = base_url.rstrip("/") + "/chat/completions"
        self.model, self.templates = model, templates
        self.retries, self.backoff, self.concurrency, self.max_tokens = retries, backoff, concurrency, max_tokens
        self.cache = cache or Cache(None)
        self.cut = 0  # the server's context limit applies; nothing is cut here
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.client = httpx.Client(timeout=timeout, headers=headers,
                                   limits=httpx.Limits(max_connections=concurrency))
        self.random = random.Random(0)

    def ask(self, kind: str, questions: list[tuple[str, tuple[str, ...]]]) -> list[Answer]:
        with ThreadPoolExecutor(max_workers=self.concurrency) as pool:
            return list(pool.map(lambda q: self._ask_one(kind, *q), questions))

    def _ask_one(self, kind: str, prompt: str, replies: tuple[str, ...]) -> Answer:
        messages = [{"role": "user", "content": fill(self.templates[kind], kind, prompt, replies)}]
        key = Cache.key("http", self.model, kind, messages)
        hit = self.cache.get(key)
        if hit:
            return Answer(hit["value"], raw=hit.get("raw"), cached=True)
        body = {"model": self.model, "messages": messages, "temperature": 0,
                "max_tokens": self.max_tokens}
        reason, tries = None, 0
        for attempt in range(self.retries + 1):
            tries = attempt + 1
            if attempt:
                time.sleep(self.backoff * 2 ** (attempt - 1) * (0.5 + self.random.random()))
            text, reason = self._post(body)
            if text is None:
                if reason.startswith("HTTP 4") and not reason.startswith(("HTTP 408", "HTTP 429")):
                    break  # the request itself is wrong (e.g. too long): asking again will not help
                continue
            value = parse_answer(text, kind)
            if value is not None:
                self.cache.put(key, {"value": value, "raw": text})
                return Answer(value, raw=text, tries=tries)
            reason = f"malformed answer {text[:80]!r}"
        return Answer(None, reason=f"{reason} (after {tries} tries)", tries=tries)

    def _post(self, body: dict) -> tuple[str | None, str | None]:
        """(answer text, None) or (None, why not)."""
        import httpx

        try:
            response = self.client.post(self.url, json=body)
        except httpx.TimeoutException:
            return None, "timeout"
        except httpx.TransportError as error:
            return None, f"connection error ({type(error).__name__})"
        if response.status_code in (401, 403, 404):
            raise FatalHttpError(f"{self.url} answered HTTP {response.status_code} "
                                 f"({response.text[:200]}); check judge.base_url, judge.model and "
                                 f"the API key")
        if response.status_code != 200:
            return None, f"HTTP {response.status_code}"
        try:
            choice = response.json()["choices"][0]
            message = choice["message"]
        except (ValueError, KeyError, IndexError, TypeError):
            return None, f"malformed response body {response.text[:80]!r}"
        if message.get("refusal") or choice.get("finish_reason") == "content_filter":
            return None, f"refused ({message.get('refusal') or 'content_filter'})"
        content = message.get("content")
        if not isinstance(content, str):
            return None, "malformed response body (no message content)"
        return content, None


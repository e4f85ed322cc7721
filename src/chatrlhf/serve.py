"""Serve a reward model over HTTP: score replies, compare replies, OpenRLHF's remote reward route.

    chatrlhf serve runs/reward/model --port 8000
    curl -s localhost:8000/score -H 'Content-Type: application/json' \
        -d '{"items": [{"prompt": "Hi", "reply": "Hello!"}]}'

Routes (JSON in, JSON out; the schema is at /openapi.json, browsable at /docs):

    POST /score       {"items": [{"prompt": str | [messages], "reply": str}], "normalize": bool}
                      -> {"rewards": [float], "normalized": bool}
    POST /compare     {"prompt": str | [messages], "replies": [str, ...]}
                      -> {"rewards": [float], "ranking": [int], "pairs": [{"a", "b", "probability"}]}
    POST /get_reward  {"query": [str], "prompts": ..., "labels": ...} -> {"rewards": [float]}
    GET  /health      -> {"model", "ready", "max_length", "batching", "stats": {...}}

The model is loaded once. Texts are tokenised exactly as in training (``tokenize_groups``, the
model's max_length, prompt cut from the left), so a served reward equals ``chatrlhf reward
score``'s. Concurrent requests are micro-batched: their items wait up to ``max_wait_ms`` (or until
``max_batch`` items are queued) and go through the model together on a single worker thread,
sorted by length and split where padding would grow past ``--max-padding`` (see ``plan_passes``);
``--no-batching`` scores each request alone, for comparison.

``/get_reward`` follows OpenRLHF (``openrlhf/cli/serve_rm.py``, ``remote_rm_fn``): each query is a
whole conversation, prompt and response in one string. An HH-style text ("\\n\\nHuman: ...
\\n\\nAssistant: ...") is split at its last "\\n\\nAssistant:" into prompt and reply, as the HH
reader does for training; any other text is scored whole as the reply to an empty prompt. The
"prompts" and "labels" keys OpenRLHF may send are accepted and ignored.

What a client can hold is bounded: a body over ``--max-body-bytes`` (declared or streamed) is
answered 413, malformed JSON or a wrong type 422 naming the field; a request whose head or body
is not whole ``--read-timeout`` seconds after the connection opened (or after the head) gets 408
and its connection is closed (a silent connection is just closed); beyond ``--limit-concurrency``
open connections plus requests in progress, requests get 503 at once; an idle keep-alive
connection is closed after ``--timeout-keep-alive`` seconds. ``bench/serve_load.py --abuse``
attacks a running server this way while checking that its real clients lose nothing.
"""

from __future__ import annotations

import asyncio
import collections
import math
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Union

import torch
from fastapi import FastAPI, HTTPException, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exception_handlers import http_exception_handler
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

from chatrlhf import models
from chatrlhf.data.batching import Group, tokenize_groups
from chatrlhf.recipes.reward import score_groups

HH_ASSISTANT = "\n\nAssistant:"


# ---- request and response shapes -------------------------------------------------------------

class Message(BaseModel):
    role: str
    content: str


PromptField = Union[str, list[Message]]


class Item(BaseModel):
    model_config = ConfigDict(extra="forbid")
    prompt: PromptField = Field(description="prompt text, or chat messages ending before the reply")
    reply: str


class ScoreRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    items: list[Item]
    normalize: bool | None = Field(None, description="(r - reward_mean) / reward_std from the "
                                   "model's chatrlhf.json; default: the server's --normalize")


class ScoreResponse(BaseModel):
    rewards: list[float]
    normalized: bool


class CompareRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    prompt: PromptField
    replies: list[str] = Field(min_length=2)


class PairProbability(BaseModel):
    a: int
    b: int
    probability: float = Field(description="P(reply a better than reply b) = sigmoid(r_a - r_b)")


class CompareResponse(BaseModel):
    rewards: list[float] = Field(description="raw rewards (never normalised: they set the odds)")
    ranking: list[int] = Field(description="reply indices, best first")
    pairs: list[PairProbability] = Field(description="every pair a < b")


class GetRewardRequest(BaseModel):
    # OpenRLHF sends more keys in some versions (prompts, labels, templates, ...): ignored.
    model_config = ConfigDict(extra="ignore")
    query: list[str] = Field(description="whole conversations, prompt and response in one string")
    prompts: list | None = None
    labels: list | None = None


class GetRewardResponse(BaseModel):
    rewards: list[float]


# ---- scoring ---------------------------------------------------------------------------------

class Scorer:
    """The model, its tokenizer and settings; ``score`` runs on the one worker thread only
    (a fast tokenizer must not be used from two threads at once)."""

    def __init__(self, model_path: str, max_length: int | None = None, batch_tokens: int = 16384,
                 max_padding: float = 0.25):
        self.model, self.tokenizer = models.load_reward_model(model_path)
        self.model.eval()
        info = models.read_metadata(models.resolve(model_path))
        self.max_length = max_length or info.get("max_length", 512)
        positions = getattr(self.model.config, "max_position_embeddings", None)
        if positions and self.max_length > positions:
            # Longer inputs would index past the position table: cut them instead of failing.
            self.max_length = positions
        self.max_reply_tokens = info.get("max_reply_tokens")
        self.mean, self.std = info.get("reward_mean"), info.get("reward_std")
        self.batch_tokens, self.max_padding = batch_tokens, max_padding
        self.stats = collections.Counter(requests=0, items=0, batches=0, forward_passes=0)
        self.model.register_forward_hook(self._count_forward)

    def _count_forward(self, *_):
        self.stats["forward_passes"] += 1

    def score(self, prompts: list, replies: list[str]) -> list[float]:
        """Rewards of (prompt, reply) items, tokenised as in training."""
        groups = [Group(p, [r], [0]) for p, r in zip(prompts, replies)]
        tokenize_groups(groups, self.tokenizer, self.max_length, self.max_reply_tokens)
        rewards = [0.0] * len(groups)
        lengths = [len(g.input_ids[0]) for g in groups]
        for indices in plan_passes(lengths, self.batch_tokens, self.max_padding):
            # score_groups with no token limit: exactly one forward pass over these items.
            part = score_groups(self.model, [groups[i] for i in indices], self.tokenizer.pad_token_id,
                                batch_tokens=sys.maxsize)
            for i, reward in zip(indices, part):
                rewards[i] = reward[0]
        self.stats["batches"] += 1
        self.stats["items"] += len(groups)
        return rewards

    def normalize(self, rewards: list[float]) -> list[float]:
        return [(r - self.mean) / self.std for r in rewards]

    @property
    def can_normalize(self) -> bool:
        return self.mean is not None and bool(self.std)


def plan_passes(lengths: list[int], batch_tokens: int, max_padding: float) -> list[list[int]]:
    """Indices of the sequences of each forward pass: sorted by length, a pass closes before it
    would hold more than ``batch_tokens`` padded tokens or more than ``1 + max_padding`` times
    its real tokens.

    On CPU a pass costs about its padded tokens, so padding short texts up to a long one can
    make a merged batch slower than scoring its requests one by one; the padding bound keeps
    merging a gain. Example: lengths [10, 10, 10, 40], max_padding 0.25 -> [[0, 1, 2], [3]]
    ([10, 10, 10, 40] in one pass would be 160 padded tokens for 70 real ones).
    """
    passes, current, real = [], [], 0
    for i in sorted(range(len(lengths)), key=lambda i: lengths[i]):
        width = lengths[i]  # sorted: the widest so far, what the whole pass pads to
        padded = width * (len(current) + 1)
        if current and (padded > batch_tokens or padded > (1 + max_padding) * (real + width)):
            passes.append(current)
            current, real = [], 0
        current.append(i)
        real += width
    return passes + [current] if current else passes


@dataclass
class _Job:
    prompts: list
    replies: list[str]
    future: asyncio.Future
    arrived: float = field(default_factory=time.monotonic)


class MicroBatcher:
    """Merges the items of concurrent requests into one scoring call (its forward passes are
    planned by ``plan_passes``).

    A batch starts with the oldest waiting job and closes when ``max_batch`` items are queued or
    ``max_wait_s`` after that job arrived, whichever comes first. A request larger than
    ``max_batch`` is split into jobs of at most ``max_batch`` items.
    """

    def __init__(self, scorer: Scorer, executor: ThreadPoolExecutor, max_batch: int, max_wait_s: float):
        self.scorer, self.executor = scorer, executor
        self.max_batch, self.max_wait_s = max_batch, max_wait_s
        self.pending: collections.deque[_Job] = collections.deque()
        self.pending_items = 0
        # An Event, not an asyncio.Queue: cancelling a timed-out wait on it can lose no job.
        self.arrived = asyncio.Event()

    async def score(self, prompts: list, replies: list[str]) -> list[float]:
        loop = asyncio.get_running_loop()
        jobs = []
        for start in range(0, len(prompts), self.max_batch):
            end = start + self.max_batch
            jobs.append(_Job(prompts[start:end], replies[start:end], loop.create_future()))
            self.pending.append(jobs[-1])
            self.pending_items += len(jobs[-1].prompts)
        self.arrived.set()
        parts = await asyncio.gather(*(job.future for job in jobs))
        return [reward for part in parts for reward in part]

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            while not self.pending:
                self.arrived.clear()
                await self.arrived.wait()
            deadline = self.pending[0].arrived + self.max_wait_s
            while self.pending_items < self.max_batch and (remaining := deadline - time.monotonic()) > 0:
                self.arrived.clear()
                try:
                    await asyncio.wait_for(self.arrived.wait(), remaining)
                except asyncio.TimeoutError:
                    break
            jobs, size = [], 0
            while self.pending and (not jobs or size + len(self.pending[0].prompts) <= self.max_batch):
                job = self.pending.popleft()
                self.pending_items -= len(job.prompts)
                if not job.future.done():  # done = cancelled: its client went away
                    jobs.append(job)
                    size += len(job.prompts)
            if not jobs:
                continue
            prompts = [p for job in jobs for p in job.prompts]
            replies = [r for job in jobs for r in job.replies]
            try:
                rewards = await loop.run_in_executor(self.executor, self.scorer.score, prompts, replies)
            except Exception as error:  # reported to every request of the batch, the server goes on
                for job in jobs:
                    if not job.future.done():
                        job.future.set_exception(error)
                continue
            start = 0
            for job in jobs:
                if not job.future.done():
                    job.future.set_result(rewards[start:start + len(job.prompts)])
                start += len(job.prompts)


def split_conversation(text: str) -> tuple[str, str]:
    """An OpenRLHF query -> (prompt, reply): HH text splits at its last "\\n\\nAssistant:" (the
    reply without its one separating space, as the HH reader does); other text is all reply."""
    cut = text.rfind(HH_ASSISTANT)
    if cut < 0:
        return "", text
    prompt, reply = text[:cut + len(HH_ASSISTANT)], text[cut + len(HH_ASSISTANT):]
    return prompt, reply[1:] if reply.startswith(" ") else reply


def _strip_specials(text: str, tokenizer) -> str:
    # OpenRLHF's queries are decoded policy outputs that may keep padding and EOS tokens;
    # its own server strips them the same way before scoring.
    for token in {tokenizer.pad_token, tokenizer.eos_token} - {None, ""}:
        while text.endswith(token):
            text = text[:-len(token)]
        while text.startswith(token):
            text = text[len(token):]
    return text


# ---- limits ----------------------------------------------------------------------------------

def check_lengths(texts: list[tuple[str, str]], max_chars: int) -> None:
    """422 naming the first (field, text) pair whose text is longer than max_chars."""
    for where, text in texts:
        if len(text) > max_chars:
            raise HTTPException(422, f"{where}: {len(text)} characters, more than the server's "
                                     f"limit of {max_chars} (--max-chars)")


def prompt_texts(prompt, where: str) -> list[tuple[str, str]]:
    if isinstance(prompt, str):
        return [(where, prompt)]
    return [(f"{where}[{i}].content", m.content) for i, m in enumerate(prompt)]


def check_count(count: int, what: str, max_items: int) -> None:
    if count > max_items:
        raise HTTPException(413, f"{count} {what} in one request, more than the server's limit of "
                                 f"{max_items} (--max-items); split the request")


class BodyLimit:
    """ASGI middleware: 413 for a request body over ``max_bytes``, declared or streamed; 408 for
    one not whole within ``read_timeout`` seconds of its head (a client that stalls mid-body
    would otherwise hold its connection and its task forever)."""

    def __init__(self, app, max_bytes: int, read_timeout: float):
        self.app, self.max_bytes, self.read_timeout = app, max_bytes, read_timeout

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            return await self._reject(scope, receive, send, int(declared))
        # Read the body here (the routes read it whole anyway) so a chunked upload is
        # counted too, then hand it on unchanged. One deadline for the whole body, not one
        # per chunk: a client dripping a byte a second must not stretch it.
        deadline = time.monotonic() + self.read_timeout
        chunks, size, more = [], 0, True
        while more:
            try:
                message = await asyncio.wait_for(receive(), max(0.0, deadline - time.monotonic()))
            except asyncio.TimeoutError:
                return await self._timed_out(scope, receive, send, size, declared)
            if message["type"] == "http.disconnect":
                return
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > self.max_bytes:
                return await self._reject(scope, receive, send, size)
            more = message.get("more_body", False)
        body, delivered = b"".join(chunks), False

        async def replay():
            nonlocal delivered
            if not delivered:
                delivered = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)

    async def _reject(self, scope, receive, send, size: int) -> None:
        detail = (f"request body of {size}+ bytes is larger than the server's limit of "
                  f"{self.max_bytes} bytes (--max-body-bytes)")
        await JSONResponse({"detail": detail}, status_code=413)(scope, receive, send)

    async def _timed_out(self, scope, receive, send, size: int, declared: bytes | None) -> None:
        expected = f"of {int(declared)} " if declared is not None and declared.isdigit() else ""
        detail = (f"request body not received within {self.read_timeout:g} s (--read-timeout): "
                  f"{size} bytes {expected}arrived")
        # Connection: close: the rest of the body may still come; it must not be read as
        # the next request.
        await JSONResponse({"detail": detail}, status_code=408,
                           headers={"connection": "close"})(scope, receive, send)


def guarded_protocol(read_timeout: float) -> type[asyncio.Protocol]:
    """uvicorn's HTTP protocol (h11, or httptools when installed) with a deadline on the request
    head: a connection that has not sent a whole request line and headers ``read_timeout``
    seconds after it opened (or after its previous answer) is closed, with a 408 when part of a
    head arrived. uvicorn has no such deadline (its keep-alive timer stops at the first byte),
    so a client sending headers one byte at a time, or never, would hold its connection, and
    a slot of ``--limit-concurrency``, forever."""
    from uvicorn.protocols.http.auto import AutoHTTPProtocol

    class HeadDeadline(AutoHTTPProtocol):
        def connection_made(self, transport):
            super().connection_made(transport)
            self._arm_head_deadline()

        def data_received(self, data: bytes) -> None:
            self.head_started = True
            super().data_received(data)

        def on_response_complete(self) -> None:
            # Armed first: a pipelined request handled inside super() replaces self.cycle.
            self._arm_head_deadline()
            super().on_response_complete()

        def connection_lost(self, exc) -> None:
            self.head_timer.cancel()
            super().connection_lost(exc)

        def _arm_head_deadline(self) -> None:
            if getattr(self, "head_timer", None):
                self.head_timer.cancel()
            # A new head has arrived once the protocol has replaced its request cycle (both
            # uvicorn protocols make a new self.cycle when a head is complete).
            self.head_started = False
            self.head_timer = self.loop.call_later(read_timeout, self._head_timed_out, self.cycle)

        def _head_timed_out(self, cycle) -> None:
            if (self.cycle is not cycle or self.transport.is_closing()
                    or self.transport.get_protocol() is not self):  # handed to a WebSocket
                return
            if self.head_started:
                detail = (f'{{"detail": "request head not received within {read_timeout:g} s '
                          f'(--read-timeout)"}}').encode()
                self.transport.write(b"HTTP/1.1 408 Request Timeout\r\ncontent-type: application/json"
                                     b"\r\nconnection: close\r\ncontent-length: %d\r\n\r\n%s"
                                     % (len(detail), detail))
            self.transport.close()

    return HeadDeadline


async def _validation_error(request: Request, error: RequestValidationError) -> JSONResponse:
    """One readable line per problem ("body.items.0.reply: Field required"), then the details."""
    lines = []
    for e in error.errors():
        where = ".".join(str(part) for part in e.get("loc", ()))
        reason = e.get("msg", "invalid")
        if e.get("type") == "json_invalid":
            reason = f"malformed JSON ({(e.get('ctx') or {}).get('error', 'decode error')})"
            where = f"body at character {e['loc'][-1]}" if len(e.get("loc", ())) > 1 else "body"
        elif tuple(e.get("loc", ())) == ("body",) and isinstance(e.get("input"), (str, bytes)):
            reason = "not read as JSON; send the header Content-Type: application/json"
        elif tuple(e.get("loc", ())) == ("body",):
            reason = ("empty; " if e.get("type") == "missing" else "") + "expected a JSON object"
        lines.append(f"{where}: {reason}")
    # The inputs are left out: echoing a large body back helps no one.
    errors = [{k: v for k, v in e.items() if k != "input"} for e in error.errors()]
    return JSONResponse({"detail": "invalid request: " + "; ".join(lines),
                         "errors": jsonable_encoder(errors)}, status_code=422)


async def _unparsable_body(request: Request, error: StarletteHTTPException) -> JSONResponse:
    """FastAPI answers a body that json.loads rejects with anything but a JSONDecodeError (bytes
    that are not UTF-8, nesting deeper than Python's recursion limit, an integer of thousands
    of digits) with a bare 400 "There was an error parsing the body": say why, as 422 like
    other malformed JSON."""
    cause = error.__cause__
    if error.status_code != 400 or not isinstance(cause, (ValueError, RecursionError)):
        return await http_exception_handler(request, error)
    if isinstance(cause, UnicodeDecodeError):
        reason = f"not UTF-8: byte {cause.start} is {cause.object[cause.start:cause.start + 1]!r}"
    elif isinstance(cause, RecursionError):
        reason = "nested too deeply"
    else:
        reason = str(cause).split(";")[0]
    return JSONResponse({"detail": f"invalid request: body: malformed JSON ({reason})"}, status_code=422)


# ---- the app ---------------------------------------------------------------------------------

def create_app(model_path: str, *, max_batch: int = 64, max_wait_ms: float = 5.0,
               batching: bool = True, max_items: int = 256, max_chars: int = 20000,
               max_body_bytes: int = 16 * 2**20, max_length: int | None = None,
               batch_tokens: int = 16384, max_padding: float = 0.25,
               normalize: bool = False, read_timeout: float = 30.0) -> FastAPI:
    """The HTTP app serving one reward model (loaded here, once).

    Args:
        model_path: a saved reward model folder, an embedded name ("minilm"), or a hub id.
        max_batch / max_wait_ms: micro-batch limits (items, milliseconds); unused without batching.
        batching: False scores each request in its own forward pass(es).
        max_items: items (or queries, or replies) per request; more -> 413.
        max_chars: characters per text; longer -> 422 naming the item and field.
        max_body_bytes: request body size; larger -> 413.
        max_length: tokens per sequence; default the model's training max_length, else 512.
        batch_tokens / max_padding: a micro-batch is split into length-sorted forward passes
            of at most ``batch_tokens`` padded tokens and ``1 + max_padding`` times their real
            tokens (see ``plan_passes``).
        normalize: the default of /score's "normalize", and what /get_reward returns.
        read_timeout: seconds for a request body to arrive whole after its head; longer -> 408.
            (The deadline on the head itself is the server's: ``server_options``.)
    Returns:
        a FastAPI app; ``app.state.scorer.stats`` counts requests, items, batches, forward passes.
    """
    if max_batch < 1 or max_items < 1 or max_chars < 1 or max_wait_ms < 0 or read_timeout <= 0:
        raise ValueError("max_batch, max_items and max_chars must be >= 1, max_wait_ms >= 0, "
                         "read_timeout > 0")
    scorer = Scorer(model_path, max_length, batch_tokens, max_padding)
    if normalize and not scorer.can_normalize:
        raise ValueError(f"{model_path}: --normalize needs reward_mean/reward_std in "
                         f"{models.METADATA_FILE}; train the model with a dev set to record them")
    executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="chatrlhf-score")
    name = model_path

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        task = None
        if batching:
            app.state.batcher = MicroBatcher(scorer, executor, max_batch, max_wait_ms / 1000)
            task = asyncio.create_task(app.state.batcher.run())
        app.state.ready = True
        try:
            yield
        finally:
            app.state.ready = False
            if task:
                task.cancel()
            executor.shutdown(wait=False)

    app = FastAPI(title="chatrlhf reward model", version=__import__("chatrlhf").__version__,
                  description=__doc__.split("\n\n")[0], lifespan=lifespan)
    app.state.scorer, app.state.ready = scorer, False
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(StarletteHTTPException, _unparsable_body)
    app.add_middleware(BodyLimit, max_bytes=max_body_bytes, read_timeout=read_timeout)

    async def rewards_of(prompts: list, replies: list[str]) -> list[float]:
        scorer.stats["requests"] += 1
        if batching:
            return await app.state.batcher.score(prompts, replies)
        return await asyncio.get_running_loop().run_in_executor(executor, scorer.score, prompts, replies)

    def prompt_value(prompt):
        return prompt if isinstance(prompt, str) else [m.model_dump() for m in prompt]

    @app.post("/score", response_model=ScoreResponse, summary="rewards of (prompt, reply) items")
    async def score(request: ScoreRequest) -> ScoreResponse:
        check_count(len(request.items), "items", max_items)
        texts = []
        for i, item in enumerate(request.items):
            texts += prompt_texts(item.prompt, f"items[{i}].prompt") + [(f"items[{i}].reply", item.reply)]
        check_lengths(texts, max_chars)
        wanted = normalize if request.normalize is None else request.normalize
        if wanted and not scorer.can_normalize:
            raise HTTPException(422, f"model {name} has no reward_mean/reward_std in its "
                                     f"{models.METADATA_FILE}: it cannot normalize; send "
                                     f'"normalize": false (train with a dev set to record them)')
        rewards = await rewards_of([prompt_value(i.prompt) for i in request.items],
                                   [i.reply for i in request.items])
        return ScoreResponse(rewards=scorer.normalize(rewards) if wanted else rewards, normalized=wanted)

    @app.post("/compare", response_model=CompareResponse,
              summary="P(a better than b) for every pair of replies to one prompt, and a ranking")
    async def compare(request: CompareRequest) -> CompareResponse:
        check_count(len(request.replies), "replies", max_items)
        check_lengths(prompt_texts(request.prompt, "prompt")
                      + [(f"replies[{i}]", r) for i, r in enumerate(request.replies)], max_chars)
        prompt = prompt_value(request.prompt)
        rewards = await rewards_of([prompt] * len(request.replies), request.replies)
        ranking = sorted(range(len(rewards)), key=lambda i: -rewards[i])
        pairs = [PairProbability(a=a, b=b, probability=_sigmoid(rewards[a] - rewards[b]))
                 for a in range(len(rewards)) for b in range(a + 1, len(rewards))]
        return CompareResponse(rewards=rewards, ranking=ranking, pairs=pairs)

    @app.post("/get_reward", response_model=GetRewardResponse,
              summary="OpenRLHF's remote reward model route (--remote_rm_url http://HOST:PORT/get_reward)")
    async def get_reward(request: GetRewardRequest) -> GetRewardResponse:
        check_count(len(request.query), "queries", max_items)
        check_lengths([(f"query[{i}]", q) for i, q in enumerate(request.query)], max_chars)
        split = [split_conversation(_strip_specials(q, scorer.tokenizer)) for q in request.query]
        rewards = await rewards_of([p for p, _ in split], [r for _, r in split])
        return GetRewardResponse(rewards=scorer.normalize(rewards) if normalize else rewards)

    @app.get("/health", summary="model name, readiness and counters")
    async def health() -> dict:
        return {"model": name, "ready": app.state.ready, "max_length": scorer.max_length,
                "can_normalize": scorer.can_normalize, "batching": batching,
                "max_batch": max_batch, "max_wait_ms": max_wait_ms, "stats": dict(scorer.stats)}

    return app


def _sigmoid(x: float) -> float:
    return 1 / (1 + math.exp(-x)) if x >= 0 else math.exp(x) / (1 + math.exp(x))


# ---- command line ----------------------------------------------------------------------------

def server_options(*, read_timeout: float = 30.0, limit_concurrency: int | None = 512,
                   timeout_keep_alive: float = 5.0) -> dict:
    """The uvicorn options (``uvicorn.run`` / ``uvicorn.Config`` keywords) that bound what a
    client can hold: ``chatrlhf serve`` runs with them, the tests too.

    Args:
        read_timeout: seconds for a request head to arrive, from the connection's opening or its
            previous answer (``guarded_protocol``); the body's deadline is ``create_app``'s.
        limit_concurrency: open connections plus requests in progress beyond which a request
            is answered 503 at once, so a flood queues no unbounded work (None: no limit).
        timeout_keep_alive: seconds an idle keep-alive connection stays open after an answer.
    """
    if read_timeout <= 0 or timeout_keep_alive < 0 or (
            limit_concurrency is not None and limit_concurrency < 1):
        raise ValueError(f"read_timeout must be > 0 (got {read_timeout}), timeout_keep_alive >= 0 (got "
                         f"{timeout_keep_alive}), limit_concurrency >= 1 or None (got {limit_concurrency})")
    return {"http": guarded_protocol(read_timeout), "limit_concurrency": limit_concurrency,
            "timeout_keep_alive": timeout_keep_alive}


def serve_command(args) -> int:
    import uvicorn

    if args.threads:
        torch.set_num_threads(args.threads)
    app = create_app(args.model, max_batch=args.max_batch, max_wait_ms=args.max_wait_ms,
                     batching=not args.no_batching, max_items=args.max_items, max_chars=args.max_chars,
                     max_body_bytes=args.max_body_bytes, max_length=args.max_length,
                     batch_tokens=args.batch_tokens, max_padding=args.max_padding,
                     normalize=args.normalize, read_timeout=args.read_timeout)
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level,
                **server_options(read_timeout=args.read_timeout,
                                 limit_concurrency=args.limit_concurrency or None,
                                 timeout_keep_alive=args.timeout_keep_alive))
    return 0


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("serve", help="serve a reward model over HTTP (JSON API)",
                              description=__doc__.split("\n\n")[0])
    p.add_argument("model", help="saved reward model folder, or an embedded name (minilm)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--max-batch", type=int, default=64, help="items per micro-batch")
    p.add_argument("--max-wait-ms", type=float, default=5.0,
                   help="how long the first item of a micro-batch waits for others")
    p.add_argument("--no-batching", action="store_true", help="score each request alone")
    p.add_argument("--max-items", type=int, default=256, help="items per request (more: 413)")
    p.add_argument("--max-chars", type=int, default=20000, help="characters per text (more: 422)")
    p.add_argument("--max-body-bytes", type=int, default=16 * 2**20, help="request body (more: 413)")
    p.add_argument("--max-length", type=int, default=None, help="default: the model's training max_length")
    p.add_argument("--batch-tokens", type=int, default=16384, help="padded tokens per forward pass")
    p.add_argument("--max-padding", type=float, default=0.25,
                   help="padding per forward pass, as a fraction of its real tokens (more: split)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (default: torch's); fewer than cores when clients share them")
    p.add_argument("--normalize", action="store_true",
                   help="normalise rewards by default (and on /get_reward) with the model's mean/std")
    p.add_argument("--read-timeout", type=float, default=30.0,
                   help="seconds for a request head to arrive (from the connection's opening or "
                        "previous answer), and again for its body; later: 408 and the connection closed")
    p.add_argument("--limit-concurrency", type=int, default=512,
                   help="open connections + requests in progress beyond which requests get 503 "
                        "at once (0: no limit)")
    p.add_argument("--timeout-keep-alive", type=float, default=5.0,
                   help="seconds an idle keep-alive connection stays open")
    p.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    p.set_defaults(run=serve_command)

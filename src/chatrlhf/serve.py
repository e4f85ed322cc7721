"""Serve a reward model over HTTP: score replies, compare replies, OpenRLHF's remote reward route.

    chatrlhf serve runs/reward/model --port 8000
    curl -s localhost:8000/score -H 'Content-Type: application/json' \
        -d '{"items": [{"prompt": "Hi", "reply": "Hello!"}]}'

Routes (JSON in, JSON out; the schema is at /openapi.json, browsable at /docs):

    POST /score       {"items": [{"prompt": str | [messages], "reply": str}], "normalize": bool,
                       "allow_empty": bool} -> {"rewards": [float], "normalized": bool}
    POST /compare     {"prompt": str | [messages], "replies": [str, ...]}
                      -> {"rewards": [float], "ranking": [int], "pairs": [{"a", "b", "probability"}]}
    POST /get_reward  {"query": [str], "prompts": [str], "labels": ...} -> {"rewards", "scores"}
    GET  /health      -> {"model", "ready", "max_length", "batching", "stats": {...}}

The model is loaded once (``chatrlhf.api.RewardModel``). Texts are tokenised exactly as in training
(the model's max_length, prompt cut from the left), so a served reward equals ``chatrlhf reward
score``'s and ``RewardModel.score``'s. Each request is tokenised on its own, on the tokenizer's one
thread; concurrent requests are then micro-batched on the model's one thread: their items wait up
to ``max_wait_ms`` (or until ``max_batch`` items are queued) and go through the model together,
sorted by length and split where padding would grow past ``--max-padding`` (``plan_passes``);
``--no-batching`` scores each request alone, for comparison. A request whose items the model's
tokenizer or chat template refuses (a role the template rejects, text that is not Unicode) is
answered 422 naming the item, before it joins a batch: the requests it would have been batched
with never see it. A forward pass that fails is retried request by request, so that only the
request that makes it fail gets the 500.

``/get_reward`` is OpenRLHF's remote reward model (``--remote_rm_url http://HOST:PORT/get_reward``).
Its client (``openrlhf/utils/agent.py``) sends each rollout as ``query``: the policy's
chat-templated prompt and the sampled reply decoded with its special tokens, and the templated
prompt as ``prompts``. Each query is cut after its prompt, the prompt's markup (ChatML, Llama 3,
Gemma, Mistral, HH) read back into messages and the reply's end-of-turn and EOS tokens taken off
(``chat_markup.split_query``), and the pair is scored in the reward model's own format. Without
``prompts`` a query is split at its last open assistant turn. Other markup is answered 422 naming
the item. The answer holds the rewards as both ``rewards`` and ``scores`` (OpenRLHF reads either);
``labels`` are ignored.

What a client can send is bounded: more than ``--max-items`` items (or replies, or queries) per
request is 413; a text over ``--max-chars`` characters, a prompt of more than ``--max-messages``
messages, a request of more than ``--max-request-tokens`` tokens (its items as the model reads
them, each cut to max_length), an empty prompt, or an empty reply (unless the request sets
"allow_empty": an RL policy's empty rollout is a reply, a bad one; ``/get_reward`` always allows
it) are 422 naming the item. A body over ``--max-body-bytes`` (declared or streamed) is 413,
malformed JSON or a wrong type 422 naming the field; a request whose head or body is not whole
``--read-timeout`` seconds after the connection opened (or after the head) gets 408 and its
connection is closed (a silent connection is just closed); beyond ``--limit-concurrency`` open
connections plus requests in progress, requests get 503 at once; an idle keep-alive connection is
closed after ``--timeout-keep-alive`` seconds. With ``--api-key`` (or $CHATRLHF_API_KEY) every
route but ``/health`` needs the header ``Authorization: Bearer KEY``, else 401. ``/health`` names the
model without its path. ``bench/serve_load.py --abuse`` attacks a running server in all these ways
while checking that its real clients lose nothing.

Memory: freed buffers are kept for reuse while requests come (the ``chatrlhf`` command's allocator
setting, fast for repeated forward passes) and handed back to the system once the server has been
idle ``--trim-idle-s`` seconds (``give_back_when_idle``), so the peak of a burst is not kept for good.
"""

import asyncio
import collections
import functools
import logging
import os
import sys
import time
import types
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path

from chatrlhf.http_limits import (BearerAuth, BodyLimit, server_options, unparsable_body,
                                  validation_error)

# fastapi, pydantic, torch and the model code are imported where they are used: `chatrlhf --help`
# builds this command's parser (add_parser) and should not pay for them.


class RequestError(Exception):
    """A request the server refuses: the HTTP status and a message naming what is wrong."""

    def __init__(self, status: int, detail: str):
        super().__init__(detail)
        self.status, self.detail = status, detail


# ---- request and response shapes -------------------------------------------------------------

@functools.cache
def schemas() -> types.SimpleNamespace:
    """The pydantic models of the requests and answers (defined on first use, see above)."""
    from typing import Union

    from pydantic import BaseModel, ConfigDict, Field

    class Message(BaseModel):
        role: str
        content: str

    Prompt = Union[str, list[Message]]

    class Item(BaseModel):
        model_config = ConfigDict(extra="forbid")
        prompt: Prompt = Field(description="prompt text, or chat messages ending before the reply")
        reply: str

    class ScoreRequest(BaseModel):
        model_config = ConfigDict(extra="forbid")
        items: list[Item]
        normalize: Union[bool, None] = Field(None, description="(r - reward_mean) / reward_std from "
                                             "the model's chatrlhf.json; default: the server's --normalize")
        allow_empty: bool = Field(False, description="score empty replies (a policy's empty rollout) "
                                  "instead of answering 422")

    class ScoreResponse(BaseModel):
        rewards: list[float]
        normalized: bool

    class CompareRequest(BaseModel):
        model_config = ConfigDict(extra="forbid")
        prompt: Prompt
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
        # OpenRLHF sends more keys in some versions (labels, templates, ...): ignored.
        model_config = ConfigDict(extra="ignore")
        query: list[str] = Field(description="each rollout: the chat-templated prompt, then the reply, "
                                 "decoded with the policy's special tokens")
        prompts: Union[list[str], None] = Field(None, description="the chat-templated prompt each query "
                                                "starts with; without it, a query is split at its last "
                                                "assistant turn")
        labels: Union[list, None] = None

    class GetRewardResponse(BaseModel):
        rewards: list[float]
        scores: list[float] = Field(description="the same numbers (OpenRLHF reads either key)")

    return types.SimpleNamespace(
        Message=Message, Item=Item, ScoreRequest=ScoreRequest, ScoreResponse=ScoreResponse,
        CompareRequest=CompareRequest, PairProbability=PairProbability, CompareResponse=CompareResponse,
        GetRewardRequest=GetRewardRequest, GetRewardResponse=GetRewardResponse)


# ---- scoring ---------------------------------------------------------------------------------

class Scorer:
    """A ``RewardModel`` and its two threads: the tokenizer's (a fast tokenizer must not be used
    from two threads at once) and the model's. Tokenising on a thread of its own lets a request be
    read while the model runs a batch, and makes a request the tokenizer refuses fail alone."""

    def __init__(self, reward_model, batch_tokens: int = 16384, max_padding: float = 0.25,
                 max_request_tokens: int = 65536):
        self.reward_model = reward_model
        self.batch_tokens, self.max_padding = batch_tokens, max_padding
        self.max_request_tokens = max_request_tokens
        self.stats = collections.Counter(requests=0, items=0, batches=0, forward_passes=0, memory_trims=0)
        reward_model.model.register_forward_hook(self._count_forward)
        self.tokenizer_thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="chatrlhf-tokenize")
        self.model_thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="chatrlhf-score")

    def _count_forward(self, *_):
        self.stats["forward_passes"] += 1

    def encode(self, prompts: list, replies: list[str], names: list[str]) -> list:
        """(prompt, reply) items -> tokenised groups (tokenizer thread). RequestError 422 naming
        the first item the tokenizer or chat template refuses, or a request over the token limit."""
        try:
            groups = self.reward_model.encode(prompts, replies)
        except Exception as error:
            raise RequestError(422, self._culprit(prompts, replies, names, error)) from error
        tokens = sum(len(group.input_ids[0]) for group in groups)
        if tokens > self.max_request_tokens:
            raise RequestError(422, f"{len(groups)} items of {tokens} tokens in all (as the model reads them, "
                                    f"each cut to {self.reward_model.max_length}), more than the server's "
                                    f"limit of {self.max_request_tokens} (--max-request-tokens); "
                                    "split the request")
        return groups

    def _culprit(self, prompts: list, replies: list[str], names: list[str], error: Exception) -> str:
        for prompt, reply, name in zip(prompts, replies, names):
            texts = [prompt] if isinstance(prompt, str) else [m["content"] for m in prompt]
            if not all(_is_unicode(text) for text in texts + [reply]):
                return f"{name}: text that is not valid Unicode (a lone surrogate, e.g. \\ud800)"
            try:
                self.reward_model.encode([prompt], [reply])
            except Exception as alone:
                return f"{name}: this model's tokenizer cannot read it ({type(alone).__name__}: {alone})"
        return f"the items cannot be tokenised together ({type(error).__name__}: {error})"

    def forward(self, groups: list) -> list[float]:
        """Rewards of tokenised groups (model thread), in forward passes planned by ``plan_passes``."""
        rewards = [0.0] * len(groups)
        lengths = [len(g.input_ids[0]) for g in groups]
        for indices in plan_passes(lengths, self.batch_tokens, self.max_padding):
            # No token limit inside a planned pass: exactly one forward pass over these items.
            part = self.reward_model.score_encoded([groups[i] for i in indices], batch_tokens=sys.maxsize)
            for i, reward in zip(indices, part):
                rewards[i] = reward
        self.stats["batches"] += 1
        self.stats["items"] += len(groups)
        return rewards

    def close(self) -> None:
        self.tokenizer_thread.shutdown(wait=False)
        self.model_thread.shutdown(wait=False)


def _is_unicode(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


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
    groups: list
    future: asyncio.Future
    arrived: float = field(default_factory=time.monotonic)


class MicroBatcher:
    """Merges the tokenised items of concurrent requests into one scoring call on the model's
    thread (its forward passes are planned by ``plan_passes``).

    A batch starts with the oldest waiting job and closes when ``max_batch`` items are queued or
    ``max_wait_s`` after that job arrived, whichever comes first. A request larger than
    ``max_batch`` is split into jobs of at most ``max_batch`` items. If a batch fails, its jobs
    are retried one by one, so that a failure reaches only the job that causes it.
    """

    def __init__(self, scorer: Scorer, max_batch: int, max_wait_s: float):
        self.scorer, self.max_batch, self.max_wait_s = scorer, max_batch, max_wait_s
        self.pending: collections.deque[_Job] = collections.deque()
        self.pending_items = 0
        # An Event, not an asyncio.Queue: cancelling a timed-out wait on it can lose no job.
        self.arrived = asyncio.Event()

    async def score(self, groups: list) -> list[float]:
        loop = asyncio.get_running_loop()
        jobs = []
        for start in range(0, len(groups), self.max_batch):
            jobs.append(_Job(groups[start:start + self.max_batch], loop.create_future()))
            self.pending.append(jobs[-1])
            self.pending_items += len(jobs[-1].groups)
        self.arrived.set()
        parts = await asyncio.gather(*(job.future for job in jobs))
        return [reward for part in parts for reward in part]

    async def run(self) -> None:
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
            while self.pending and (not jobs or size + len(self.pending[0].groups) <= self.max_batch):
                job = self.pending.popleft()
                self.pending_items -= len(job.groups)
                if not job.future.done():  # done = cancelled: its client went away
                    jobs.append(job)
                    size += len(job.groups)
            if jobs:
                await self._score(jobs)

    async def _score(self, jobs: list[_Job]) -> None:
        loop = asyncio.get_running_loop()
        try:
            rewards = await loop.run_in_executor(self.scorer.model_thread, self.scorer.forward,
                                                 [g for job in jobs for g in job.groups])
        except Exception as error:  # the server goes on; the culprit is found by scoring alone
            if len(jobs) > 1:
                for job in jobs:
                    await self._score([job])
            elif not jobs[0].future.done():
                jobs[0].future.set_exception(error)
            return
        start = 0
        for job in jobs:
            if not job.future.done():
                job.future.set_result(rewards[start:start + len(job.groups)])
            start += len(job.groups)


# ---- limits ----------------------------------------------------------------------------------

@dataclass
class Limits:
    """What one request may hold (``create_app``'s arguments of the same names)."""

    max_items: int = 256
    max_chars: int = 20000
    max_messages: int = 64

    def count(self, count: int, what: str) -> None:
        if count > self.max_items:
            raise RequestError(413, f"{count} {what} in one request, more than the server's limit of "
                                    f"{self.max_items} (--max-items); split the request")

    def prompt(self, prompt, where: str) -> None:
        """A prompt: non-empty text or a non-empty chat, as ``chatrlhf data validate`` wants it,
        of at most max_messages messages and max_chars characters per text."""
        if isinstance(prompt, str):
            if not prompt.strip():
                raise RequestError(422, f"{where}: empty prompt")
            return self.text(prompt, where)
        if not prompt:
            raise RequestError(422, f"{where}: empty chat (no messages)")
        if len(prompt) > self.max_messages:
            raise RequestError(422, f"{where}: {len(prompt)} messages, more than the server's limit of "
                                    f"{self.max_messages} (--max-messages)")
        for i, message in enumerate(prompt):
            self.text(message["content"], f"{where}[{i}].content")

    def reply(self, reply: str, where: str, allow_empty: bool) -> None:
        if not allow_empty and not reply.strip():
            raise RequestError(422, f'{where}: empty reply; send "allow_empty": true to score it '
                                    "(an RL policy's empty rollout)")
        self.text(reply, where)

    def text(self, text: str, where: str) -> None:
        if len(text) > self.max_chars:
            raise RequestError(422, f"{where}: {len(text)} characters, more than the server's "
                                    f"limit of {self.max_chars} (--max-chars)")


async def _request_error(request, error: RequestError):
    from fastapi.responses import JSONResponse

    return JSONResponse({"detail": error.detail}, status_code=error.status)


# ---- the app ---------------------------------------------------------------------------------

def create_app(model, *, max_batch: int = 64, max_wait_ms: float = 5.0, batching: bool = True,
               max_items: int = 256, max_chars: int = 20000, max_messages: int = 64,
               max_request_tokens: int = 65536, max_body_bytes: int = 16 * 2**20,
               max_length: int | None = None, batch_tokens: int = 16384, max_padding: float = 0.25,
               normalize: bool = False, read_timeout: float = 30.0, api_key: str | None = None,
               name: str | None = None, trim_idle_s: float = 2.0):
    """The HTTP app serving one reward model (loaded here, once).

    Args:
        model: a saved reward model folder, an embedded name ("minilm"), a hub id, or a
            ``chatrlhf.api.RewardModel`` already loaded.
        max_batch / max_wait_ms: micro-batch limits (items, milliseconds); unused without batching.
        batching: False scores each request in its own forward pass(es).
        max_items: items (or queries, or replies) per request; more -> 413.
        max_chars: characters per text; longer -> 422 naming the item and field.
        max_messages: messages per chat prompt; more -> 422 naming the item.
        max_request_tokens: tokens per request, its items as the model reads them (each cut to
            max_length); more -> 422.
        max_body_bytes: request body size; larger -> 413.
        max_length: tokens per sequence; default the model's training max_length, else 512
            (ignored for a loaded ``RewardModel``).
        batch_tokens / max_padding: a micro-batch is split into length-sorted forward passes
            of at most ``batch_tokens`` padded tokens and ``1 + max_padding`` times their real
            tokens (see ``plan_passes``).
        normalize: the default of /score's "normalize", and what /get_reward returns.
        read_timeout: seconds for a request body to arrive whole after its head; longer -> 408.
            (The deadline on the head itself is the server's: ``server_options``.)
        api_key: when set, every route but /health needs ``Authorization: Bearer <api_key>``.
        name: the model's name in /health; default ``public_name(model)``.
        trim_idle_s: after this many seconds without scoring, the memory freed since is given
            back to the system (``give_back_when_idle``); 0: never.
    Returns:
        a FastAPI app; ``app.state.scorer.stats`` counts requests, items, batches, forward passes.
    """
    from fastapi import FastAPI
    from fastapi.exceptions import RequestValidationError
    from starlette.exceptions import HTTPException as StarletteHTTPException

    from chatrlhf import chat_markup, models
    from chatrlhf.api import RewardModel, compare_rewards

    if (max_batch < 1 or max_items < 1 or max_chars < 1 or max_messages < 1 or max_request_tokens < 1
            or max_wait_ms < 0 or read_timeout <= 0 or trim_idle_s < 0):
        raise ValueError("max_batch, max_items, max_chars, max_messages and max_request_tokens must be "
                         ">= 1, max_wait_ms >= 0, read_timeout > 0, trim_idle_s >= 0")
    if api_key is not None and not api_key.strip():
        raise ValueError("api_key is empty: give a key, or None for no authentication")
    reward_model = model if isinstance(model, RewardModel) else RewardModel.load(model, max_length=max_length)
    name = name or public_name(model)
    if normalize and not reward_model.can_normalize:
        raise ValueError(f"{name}: --normalize needs reward_mean/reward_std in "
                         f"{models.METADATA_FILE}; train the model with a dev set to record them")
    scorer = Scorer(reward_model, batch_tokens, max_padding, max_request_tokens)
    limits = Limits(max_items, max_chars, max_messages)
    tokenizer = reward_model.tokenizer
    # The reward tokenizer's own padding and EOS may end a query too (OpenRLHF's older clients
    # decoded padded batches).
    own_tokens = tuple({tokenizer.pad_token, tokenizer.eos_token} - {None, ""})
    S = schemas()

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        tasks = []
        if batching:
            app.state.batcher = MicroBatcher(scorer, max_batch, max_wait_ms / 1000)
            tasks.append(asyncio.create_task(app.state.batcher.run()))
        if trim_idle_s:
            tasks.append(asyncio.create_task(give_back_when_idle(scorer, trim_idle_s)))
        app.state.ready = True
        try:
            yield
        finally:
            app.state.ready = False
            for task in tasks:
                task.cancel()
            scorer.close()

    app = FastAPI(title="chatrlhf reward model", version=__import__("chatrlhf").__version__,
                  description=__doc__.split("\n\n")[0], lifespan=lifespan)
    app.state.scorer, app.state.ready = scorer, False
    app.add_exception_handler(RequestValidationError, validation_error)
    app.add_exception_handler(StarletteHTTPException, unparsable_body)
    app.add_exception_handler(RequestError, _request_error)
    app.add_middleware(BodyLimit, max_bytes=max_body_bytes, read_timeout=read_timeout)
    if api_key:  # added last: the outermost, so a request without the key is refused unread
        app.add_middleware(BearerAuth, api_key=api_key)

    async def rewards_of(prompts: list, replies: list[str], names: list[str]) -> list[float]:
        scorer.stats["requests"] += 1
        if not prompts:
            return []
        loop = asyncio.get_running_loop()
        groups = await loop.run_in_executor(scorer.tokenizer_thread, scorer.encode, prompts, replies, names)
        try:
            if batching:
                return await app.state.batcher.score(groups)
            return await loop.run_in_executor(scorer.model_thread, scorer.forward, groups)
        except Exception as error:  # the model failed on this request (alone: see MicroBatcher)
            logging.getLogger("chatrlhf.serve").exception("scoring failed")
            raise RequestError(500, f"the model failed on this request: {type(error).__name__}: {error}") from None

    def prompt_value(prompt):
        return prompt if isinstance(prompt, str) else [m.model_dump() for m in prompt]

    @app.post("/score", response_model=S.ScoreResponse, summary="rewards of (prompt, reply) items")
    async def score(request: S.ScoreRequest):
        limits.count(len(request.items), "items")
        prompts = [prompt_value(item.prompt) for item in request.items]
        for i, (prompt, item) in enumerate(zip(prompts, request.items)):
            limits.prompt(prompt, f"items[{i}].prompt")
            limits.reply(item.reply, f"items[{i}].reply", request.allow_empty)
        wanted = normalize if request.normalize is None else request.normalize
        if wanted and not reward_model.can_normalize:
            raise RequestError(422, f"model {name} has no reward_mean/reward_std in its "
                                    f"{models.METADATA_FILE}: it cannot normalize; send "
                                    f'"normalize": false (train with a dev set to record them)')
        rewards = await rewards_of(prompts, [i.reply for i in request.items],
                                   [f"items[{i}]" for i in range(len(prompts))])
        return S.ScoreResponse(rewards=reward_model.normalize(rewards) if wanted else rewards, normalized=wanted)

    @app.post("/compare", response_model=S.CompareResponse,
              summary="P(a better than b) for every pair of replies to one prompt, and a ranking")
    async def compare(request: S.CompareRequest):
        limits.count(len(request.replies), "replies")
        prompt = prompt_value(request.prompt)
        limits.prompt(prompt, "prompt")
        for i, reply in enumerate(request.replies):
            limits.reply(reply, f"replies[{i}]", allow_empty=False)
        rewards = await rewards_of([prompt] * len(request.replies), request.replies,
                                   [f"replies[{i}] (with the prompt)" for i in range(len(request.replies))])
        result = compare_rewards(rewards)
        pairs = [S.PairProbability(a=a, b=b, probability=result["probabilities"][a][b])
                 for a in range(len(rewards)) for b in range(a + 1, len(rewards))]
        return S.CompareResponse(rewards=rewards, ranking=result["ranking"], pairs=pairs)

    @app.post("/get_reward", response_model=S.GetRewardResponse,
              summary="OpenRLHF's remote reward model route (--remote_rm_url http://HOST:PORT/get_reward)")
    async def get_reward(request: S.GetRewardRequest):
        queries, templated = request.query, request.prompts
        limits.count(len(queries), "queries")
        if templated is not None and len(templated) != len(queries):
            raise RequestError(422, f"{len(queries)} queries but {len(templated)} prompts")
        prompts, replies = [], []
        for i, query in enumerate(queries):
            limits.text(query, f"query[{i}]")
            if not query.strip():
                raise RequestError(422, f"query[{i}]: empty query")
            if templated is not None:
                limits.text(templated[i], f"prompts[{i}]")
            try:
                split = chat_markup.split_query(query, None if templated is None else templated[i], own_tokens)
            except chat_markup.UnknownMarkup as error:
                raise RequestError(422, f"query[{i}]: {error}") from None
            limits.prompt(split.prompt, f"query[{i}] (its prompt)")
            prompts.append(split.prompt)
            replies.append(split.reply)
        rewards = await rewards_of(prompts, replies, [f"query[{i}]" for i in range(len(queries))])
        rewards = reward_model.normalize(rewards) if normalize else rewards
        return S.GetRewardResponse(rewards=rewards, scores=rewards)

    @app.get("/health", summary="model name, readiness and counters (open without the API key)")
    async def health() -> dict:
        return {"model": name, "ready": app.state.ready, "max_length": reward_model.max_length,
                "can_normalize": reward_model.can_normalize, "batching": batching,
                "max_batch": max_batch, "max_wait_ms": max_wait_ms, "stats": dict(scorer.stats)}

    return app


def public_name(model) -> str:
    """What /health calls a model: an embedded name or hub id as given, a local folder by its own
    name (its path would tell every client where the server keeps its files)."""
    if not isinstance(model, (str, os.PathLike)):
        return "reward model"
    path = Path(model)
    return path.resolve().name if path.exists() else str(model)


# ---- memory ----------------------------------------------------------------------------------

def give_back_freed_memory() -> bool:
    """Hand the memory malloc holds free back to the system (glibc ``malloc_trim(0)``: every
    arena, free pages inside the heaps too); returns whether any was released. False where the
    C library is not glibc.

    Why a server calls it when idle rather than resetting the allocator: the ``chatrlhf``
    command has glibc keep freed memory (``training.keep_freed_memory``), so that a step's
    buffers are not page-faulted in again the next step, and the process keeps its peak. Back
    at glibc's static defaults (128 KiB thresholds; mallopt cannot restore the dynamic ones) a
    MiniLM forward pass of 32 HH-length items took 0.89-0.91 s against 0.60 s (median of 12,
    1 thread, idle 2-core machine), and with glibc's dynamic defaults 0.68 s. Keeping freed
    memory while requests come and trimming once they stop serves bursts at full speed and
    gives the peak back (765 -> 512 MiB resident after those passes on the model's thread)."""
    import ctypes

    try:
        libc = ctypes.CDLL(None)
        libc.gnu_get_libc_version  # glibc: malloc_trim exists
    except (OSError, AttributeError):
        return False
    return libc.malloc_trim(0) == 1


async def give_back_when_idle(scorer: Scorer, idle_s: float) -> None:
    """Every ``idle_s`` seconds: if items were scored since the last trim and none in the last
    ``idle_s`` seconds, ``give_back_freed_memory`` on the model's thread (never during a pass)."""
    loop = asyncio.get_running_loop()
    seen = trimmed = scorer.stats["items"]
    while True:
        await asyncio.sleep(idle_s)
        items = scorer.stats["items"]
        if items == seen and items != trimmed:
            await loop.run_in_executor(scorer.model_thread, give_back_freed_memory)
            scorer.stats["memory_trims"] += 1
            trimmed = items
        seen = items


# ---- command line ----------------------------------------------------------------------------

def serve_command(args) -> int:
    import torch
    import uvicorn

    if args.threads:
        torch.set_num_threads(args.threads)
    # The key from the environment rather than the command line, where `ps` shows it to everyone.
    api_key = args.api_key or os.environ.get("CHATRLHF_API_KEY") or None
    app = create_app(args.model, max_batch=args.max_batch, max_wait_ms=args.max_wait_ms,
                     batching=not args.no_batching, max_items=args.max_items, max_chars=args.max_chars,
                     max_messages=args.max_messages, max_request_tokens=args.max_request_tokens,
                     max_body_bytes=args.max_body_bytes, max_length=args.max_length,
                     batch_tokens=args.batch_tokens, max_padding=args.max_padding,
                     normalize=args.normalize, read_timeout=args.read_timeout, api_key=api_key,
                     name=args.name, trim_idle_s=args.trim_idle_s)
    give_back_freed_memory()  # what loading the model freed
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
    p.add_argument("--api-key", default=None,
                   help="require 'Authorization: Bearer KEY' on every route but /health (401 without it); "
                        "better set $CHATRLHF_API_KEY, which `ps` does not show")
    p.add_argument("--name", default=None,
                   help="the model's name in /health (default: the folder's own name, or the name given)")
    p.add_argument("--max-batch", type=int, default=64, help="items per micro-batch")
    p.add_argument("--max-wait-ms", type=float, default=5.0,
                   help="how long the first item of a micro-batch waits for others")
    p.add_argument("--no-batching", action="store_true", help="score each request alone")
    p.add_argument("--max-items", type=int, default=256, help="items per request (more: 413)")
    p.add_argument("--max-chars", type=int, default=20000, help="characters per text (more: 422)")
    p.add_argument("--max-messages", type=int, default=64, help="messages per chat prompt (more: 422)")
    p.add_argument("--max-request-tokens", type=int, default=65536,
                   help="tokens per request, as the model reads its items (each cut to max_length; more: 422)")
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
    p.add_argument("--trim-idle-s", type=float, default=2.0,
                   help="seconds without requests after which the memory freed meanwhile goes back to "
                        "the system (0: never; it is kept while requests come, for speed)")
    p.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    p.set_defaults(run=serve_command)

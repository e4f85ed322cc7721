"""`chatrlhf serve` under abuse: malformed and mistyped JSON, bodies over the limit, clients that
stall or leave, many connections at once, requests the model fails on among good ones batched with
them, missing or wrong API keys. The real server (uvicorn with ``server_options``, as ``chatrlhf
serve`` runs it) on loopback, raw sockets where a well-behaved client cannot go, and every wait
bounded. Afterwards the load test's clients, attacked meanwhile, lose nothing."""

from __future__ import annotations

import argparse
import importlib.util
import json
import socket
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest

from chatrlhf.serve import create_app, server_options
from conftest import running, spread_bert

READ_TIMEOUT, MAX_BODY, KEY = 1.0, 20_000, "abuse-test-key"
MAX_MESSAGES, MAX_REQUEST_TOKENS = 4, 300
# A chat template that refuses roles it does not know, as many real ones do.
STRICT_TEMPLATE = ("{% for m in messages %}{% if m['role'] not in ['system', 'user', 'assistant'] %}"
                   "{{ raise_exception('unknown role ' + m['role']) }}{% endif %}{{ m['role'] + ': ' + "
                   "m['content'] + '\n' }}{% endfor %}{% if add_generation_prompt %}{{ 'assistant:' }}{% endif %}")
BROKEN = "<broken>"  # a token the tokenizer has and the model's embedding table has not
# Deadlines are checked with room to spare: the CI machine has 2 busy cores.
SLACK = 10.0

spec = importlib.util.spec_from_file_location(
    "serve_load", Path(__file__).resolve().parents[1] / "bench" / "serve_load.py")
serve_load = importlib.util.module_from_spec(spec)
spec.loader.exec_module(serve_load)
raw_exchange, chunked = serve_load.raw_exchange, serve_load.chunked


def post_head(path: str, length: int | None) -> bytes:
    return serve_load.post_head(path, length, api_key=KEY)


def whole(path: str, body: bytes) -> bytes:
    return serve_load.whole(path, body, KEY)


@contextmanager
def serving(app, **options):
    """Serve ``app`` on a free loopback port with ``chatrlhf serve``'s uvicorn options."""
    with running(app, "critical", **server_options(read_timeout=READ_TIMEOUT, **options)) as base:
        yield base


@pytest.fixture(scope="module")
def model_dir(tiny_bert, tmp_path_factory) -> str:
    """tiny_bert with large weights, so that different texts get clearly different rewards and
    a mix-up between requests would show (as in test_serve.py); its tokenizer has a chat template
    that refuses unknown roles, and one token more than the model's embeddings (BROKEN): a text
    with it tokenises and then makes the forward pass fail."""
    from transformers import AutoTokenizer

    folder = spread_bert(tiny_bert, tmp_path_factory.mktemp("abused") / "model")
    tokenizer = AutoTokenizer.from_pretrained(folder)
    tokenizer.chat_template = STRICT_TEMPLATE
    tokenizer.add_tokens([BROKEN])
    tokenizer.save_pretrained(folder)
    return str(folder)


def abused_app(model_dir, **options):
    settings = dict(max_batch=4, max_wait_ms=20, max_items=8, max_chars=200, max_messages=MAX_MESSAGES,
                    max_request_tokens=MAX_REQUEST_TOKENS, max_body_bytes=MAX_BODY, read_timeout=READ_TIMEOUT,
                    api_key=KEY)
    return create_app(model_dir, **{**settings, **options})


@pytest.fixture(scope="module")
def url(model_dir):
    with serving(abused_app(model_dir), limit_concurrency=256, timeout_keep_alive=2) as base:
        yield base


ITEM = {"prompt": "the cat sat", "reply": "on the mat"}
AUTH = {"authorization": f"Bearer {KEY}"}


def post(base, path: str, body: dict) -> httpx.Response:
    # JSON with ASCII escapes: a lone surrogate is sent as \ud800, as any JSON client may send it.
    return httpx.post(base + path, content=json.dumps(body).encode(), timeout=30,
                      headers={**AUTH, "content-type": "application/json"})


def score(base, items=(ITEM,)) -> list[float]:
    answer = post(base, "/score", {"items": list(items)})
    assert answer.status_code == 200, answer.text
    return answer.json()["rewards"]


def detail(body: bytes) -> str:
    return json.loads(body)["detail"]


def test_malformed_and_mistyped_json_is_422_with_a_message(url):
    for text, expected in [(b'{"items": [', "malformed JSON"),
                           (b'{"items": [{"prompt": "p", "reply": "r"},]}', "malformed JSON"),
                           (b"", "body: empty; expected a JSON object"),
                           (b'{"items": "\xff"}', "malformed JSON (not UTF-8: byte 11"),
                           (b'{"items": [1' + b"0" * 5000 + b"]}", "malformed JSON (Exceeds the limit"),
                           (b"[1, 2]", "expected a JSON object"),
                           (b"null", "body: expected a JSON object"),
                           # deeper than Python's recursion limit
                           (b"[" * 15_000, "malformed JSON (nested too deeply)")]:
        status, body = raw_exchange(url, [whole("/score", text)])
        assert status == 422 and expected in detail(body), (text[:40], status, body[:300])
    for request, field in [({"items": "abc"}, "body.items"),
                           ({"items": [{"prompt": 3, "reply": "r"}]}, "body.items.0.prompt"),
                           ({"items": [ITEM, {"prompt": "p", "reply": ["r"]}]}, "body.items.1.reply"),
                           ({"items": [ITEM], "normalize": "perhaps"}, "body.normalize"),
                           ({"prompt": "p", "replies": "ab"}, "body.replies"),
                           ({"query": [1, None]}, "body.query.0")]:
        path = "/compare" if "replies" in request else "/get_reward" if "query" in request else "/score"
        status, body = raw_exchange(url, [whole(path, json.dumps(request).encode())])
        assert status == 422 and field in detail(body), (request, status, body[:300])
    status, body = raw_exchange(url, [b"POST /score HTTP/1.1\r\nhost: x\r\ncontent-length: ten\r\n\r\n"])
    assert status == 400, "a broken head is answered 400 by the HTTP parser"
    assert score(url), "the server is still up"


def test_huge_bodies_are_413(url):
    # Declared over the limit: answered from the head alone, the body is never read.
    started = time.monotonic()
    status, body = raw_exchange(url, [post_head("/score", 10**12)], timeout=SLACK)
    assert status == 413 and "--max-body-bytes" in detail(body)
    assert time.monotonic() - started < SLACK
    # Chunked, no length declared: counted while read, refused once past the limit.
    status, body = raw_exchange(url, [post_head("/score", None),
                                      *chunked([b" " * 6000] * 4), b"0\r\n\r\n"])
    assert status == 413 and f"{MAX_BODY} bytes" in detail(body)
    # Just under the limit is read whole (and fails as JSON, not as a size).
    status, body = raw_exchange(url, [whole("/score", b" " * (MAX_BODY - 1))])
    assert status == 422
    assert score(url)


def test_slow_clients_time_out_while_others_are_served(url):
    expected = score(url)
    results = {}

    def stall(name, chunks, **kwargs):
        started = time.monotonic()
        results[name] = raw_exchange(url, chunks, timeout=READ_TIMEOUT + SLACK, **kwargs) + (
            time.monotonic() - started,)

    valid = json.dumps({"items": [ITEM]}).encode()
    slow = {"mid-body": ([post_head("/score", 1000), b'{"items": ['], {}),
            "in head": ([b"POST /score HTTP/1.1\r\nhost: 12"], {}),
            "silent": ([b""], {}),
            # One byte every 0.1 s: each read is quick, the whole body is not.
            "drip": ([post_head("/score", len(valid))] + [bytes([b]) for b in valid], {"pause": 0.1})}
    threads = [threading.Thread(target=stall, args=(name, chunks), kwargs=kwargs)
               for name, (chunks, kwargs) in slow.items()]
    for thread in threads:
        thread.start()
    # Meanwhile, other clients are answered at once and correctly.
    for _ in range(5):
        started = time.monotonic()
        assert score(url) == pytest.approx(expected, abs=1e-5)
        assert time.monotonic() - started < READ_TIMEOUT
    for thread in threads:
        thread.join(READ_TIMEOUT + 2 * SLACK)
    assert set(results) == set(slow), "a slow client was never answered"
    for name in ["mid-body", "in head", "drip"]:
        status, body, seconds = results[name]
        assert status == 408 and "--read-timeout" in detail(body), (name, status, body)
        assert READ_TIMEOUT * 0.9 < seconds < READ_TIMEOUT + SLACK, (name, seconds)
    assert "11 bytes of 1000 arrived" in detail(results["mid-body"][1])
    status, _, seconds = results["silent"]
    assert status is None and seconds < READ_TIMEOUT + SLACK, "a silent connection is closed"
    assert score(url) == pytest.approx(expected, abs=1e-5)


def test_many_connections_some_abandoned(url):
    n, kinds_count = 64, 8
    items = {i: {"prompt": f"prompt {i} " + "the " * (i % 5), "reply": f"reply {i}"}
             for i in range(0, n, kinds_count)}  # the connections that send a valid request
    expected = {i: score(url, [item])[0] for i, item in items.items()}
    assert max(expected.values()) - min(expected.values()) > 0.1, "the test model should tell them apart"
    health = httpx.get(url + "/health").json()["stats"]
    valid = whole("/score", json.dumps({"items": [ITEM]}).encode())
    kinds = [
        ("valid", lambda i: raw_exchange(url, [whole("/score", json.dumps({"items": [items[i]]}).encode())]),
         {200}),
        ("leaves mid-body", lambda i: raw_exchange(url, [post_head("/score", 500), b'{"it'],
                                                 leave=True), {None}),
        ("leaves before the answer", lambda i: raw_exchange(url, [valid], leave=True), {None}),
        ("connects and leaves", lambda i: raw_exchange(url, [b""], leave=True), {None}),
        ("not HTTP", lambda i: raw_exchange(url, [bytes(range(256))]), {400, None}),
        ("malformed", lambda i: raw_exchange(url, [whole("/score", b"{")]), {422}),
        ("too large", lambda i: raw_exchange(url, [post_head("/score", 10**9)]), {413}),
        ("stalls", lambda i: raw_exchange(url, [post_head("/score", 10), b"{"],
                                        timeout=READ_TIMEOUT + SLACK), {408}),
    ]
    assert len(kinds) == kinds_count
    barrier, answers = threading.Barrier(n), [None] * n

    def connect(i):
        name, send, right = kinds[i % len(kinds)]
        barrier.wait(30)
        try:
            status, body = send(i)
        except OSError as error:
            status, body = type(error).__name__, b""
        answers[i] = (name, status, right, body)

    threads = [threading.Thread(target=connect, args=(i,)) for i in range(n)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(READ_TIMEOUT + 2 * SLACK)
    assert all(answers), f"{answers.count(None)} of {n} connections never finished"
    wrong = [(name, status, body[:200]) for name, status, right, body in answers if status not in right]
    assert not wrong, wrong
    for i, (name, status, _, body) in enumerate(answers):
        if name == "valid":  # each client got its own reward (batched with others: float noise)
            assert json.loads(body)["rewards"] == pytest.approx([expected[i]], abs=1e-5)
    # Afterwards: up and correct; every valid request was scored, those whose client left before
    # the answer at most once (or not at all, when the server saw the client gone first).
    assert score(url, [items[0]]) == pytest.approx([expected[0]], abs=1e-5)
    after = httpx.get(url + "/health").json()["stats"]
    valid_count = n // len(kinds)
    assert valid_count + 1 <= after["requests"] - health["requests"] <= 2 * valid_count + 1


def test_limit_concurrency_refuses_with_503_and_idle_connections_are_reclaimed(tiny_bert):
    with serving(create_app(tiny_bert, read_timeout=READ_TIMEOUT), limit_concurrency=4) as base:
        idle = [socket.create_connection(("127.0.0.1", int(base.rsplit(":", 1)[1]))) for _ in range(4)]
        try:
            status, _ = raw_exchange(base, [whole("/score", json.dumps({"items": [ITEM]}).encode())])
            assert status == 503, "past --limit-concurrency a request is refused at once"
            # The silent connections are closed after --read-timeout, freeing their slots.
            for sock in idle:
                sock.settimeout(READ_TIMEOUT + SLACK)
                assert sock.recv(100) == b""
            assert score(base)
        finally:
            for sock in idle:
                sock.close()


def test_a_bad_request_fails_alone_among_the_requests_batched_with_it(model_dir):
    """Concurrent requests, some of them bad: a role the chat template refuses, text that is not
    Unicode, a token the model cannot embed (its forward pass fails: the batch is retried request
    by request). Each bad one gets its own error; the good ones, batched together, their rewards."""
    chat = lambda role: [{"role": "system", "content": "be brief"}, {"role": role, "content": "hi"}]  # noqa: E731
    good = [[{"prompt": chat("user"), "reply": f"reply {i} " + "the " * i}] for i in range(8)]
    bad = {2: ([good[2][0], {"prompt": chat("wizard"), "reply": "r"}], 422,
               "items[1]: this model's tokenizer cannot read it (TemplateError: unknown role wizard)"),
           4: ([{"prompt": "p", "reply": "a\ud800b"}], 422, "items[0]: text that is not valid Unicode"),
           6: ([good[6][0], {"prompt": "p", "reply": f"r {BROKEN}"}], 500,
               "the model failed on this request: Index")}
    # A long wait and room for every item: the good requests go through the model as one batch.
    with serving(abused_app(model_dir, max_wait_ms=400, max_batch=64)) as base:
        expected = {i: score(base, items) for i, items in enumerate(good)}
        before = httpx.get(base + "/health").json()["stats"]
        requests = {i: bad[i][0] if i in bad else good[i] for i in range(8)}
        barrier, answers = threading.Barrier(8), {}

        def send(i):
            barrier.wait(30)
            answers[i] = post(base, "/score", {"items": requests[i]})

        threads = [threading.Thread(target=send, args=(i,)) for i in range(8)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60)
        after = httpx.get(base + "/health").json()["stats"]
    for i, answer in answers.items():
        if i in bad:
            assert answer.status_code == bad[i][1] and answer.json()["detail"].startswith(bad[i][2]), answer.text
        else:
            assert answer.status_code == 200 and answer.json()["rewards"] == pytest.approx(expected[i], abs=1e-5)
    assert len(answers) == 8
    # The 5 good requests and the failing one went through the model together (one failed batch),
    # then request by request: at most 1 + 6 batches, their items counted once each.
    assert after["batches"] - before["batches"] <= 7 and after["items"] - before["items"] == 5


def test_limits_keys_and_markup_are_answered_before_the_model(url):
    turn = {"role": "user", "content": "hi"}
    for path, request, status, message in [
            ("/score", {"items": [ITEM, {"prompt": [turn] * (MAX_MESSAGES + 1), "reply": "r"}]}, 422,
             "items[1].prompt: 5 messages"),
            ("/score", {"items": [{"prompt": "the " * 40, "reply": "the " * 40}] * 6}, 422,
             "--max-request-tokens"),
            ("/score", {"items": [ITEM, {"prompt": "p", "reply": ""}]}, 422, "items[1].reply: empty reply"),
            ("/score", {"items": [{"prompt": "", "reply": "r"}]}, 422, "items[0].prompt: empty prompt"),
            ("/get_reward", {"query": ["<|user|> hi <|bot|> hello"]}, 422, "query[0]: no chat markup found")]:
        answer = post(url, path, request)
        assert answer.status_code == status and message in answer.json()["detail"], (request, answer.text)
    for key in [None, KEY + "x", KEY[:-1], ""]:
        status, body = raw_exchange(url, [serve_load.whole("/score", json.dumps({"items": [ITEM]}).encode(), key)])
        assert status == 401 and "API key" in detail(body), key
    # Not even a huge declared body is read without the key: 401 from the head alone.
    status, _ = raw_exchange(url, [serve_load.post_head("/score", 10**12)], timeout=SLACK)
    assert status == 401
    assert httpx.get(url + "/health").status_code == 200
    assert score(url)


def test_load_test_loses_nothing_under_attack(url):
    # Short synthetic dialogues (the real ones would pass this server's --max-chars 200).
    data = [(f"\n\nHuman: question {i} " + "the " * (i % 9) + "\n\nAssistant:", f"answer {i}")
            for i in range(50)]
    args = argparse.Namespace(seconds=3.0, clients=4, items=2, route="score")
    args.api_key = KEY
    expected = serve_load.reference_rewards(url, args, data)
    abuse = {}
    attack = threading.Thread(target=lambda: abuse.update(serve_load.abuse_clients(
        url, 4, args.seconds, MAX_BODY, READ_TIMEOUT, api_key=KEY, max_messages=MAX_MESSAGES,
        max_request_tokens=MAX_REQUEST_TOKENS, max_length=128, max_items=8, max_chars=200)))
    attack.start()
    result = serve_load.load_clients(url, args, data, expected)
    attack.join(args.seconds + READ_TIMEOUT + 2 * SLACK)
    assert result["ok"] > 0 and result["failed"] == 0 and result["lost"] == 0, result["first_failure"]
    assert abuse["sent"] >= 4 and not abuse["unexpected"], abuse
    names = {name for name, _ in abuse["counts"]}
    assert {"bad item among good ones", "too many tokens", "no API key", "wrong API key"} <= names, names
    assert score(url)


def test_cli_options(tiny_bert):
    from chatrlhf.cli import build_parser

    args = build_parser().parse_args(["serve", tiny_bert, "--read-timeout", "2.5",
                                      "--limit-concurrency", "8", "--timeout-keep-alive", "3"])
    assert (args.read_timeout, args.limit_concurrency, args.timeout_keep_alive) == (2.5, 8, 3.0)
    defaults = build_parser().parse_args(["serve", tiny_bert])
    assert (defaults.read_timeout, defaults.limit_concurrency, defaults.timeout_keep_alive) == (30, 512, 5)
    with pytest.raises(ValueError, match="read_timeout"):
        create_app(tiny_bert, read_timeout=0)
    with pytest.raises(ValueError, match="limit_concurrency >= 1"):
        server_options(limit_concurrency=0)

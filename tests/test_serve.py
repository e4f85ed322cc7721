"""`chatrlhf serve`: the real server on loopback (uvicorn in a thread), each route, the limits,
authentication, micro-batching of concurrent requests, the client, and the memory the serving
process gives back."""

from __future__ import annotations

import json
import math
import os
import socket
import subprocess
import sys
import threading
import time

import httpx
import pytest
import torch

from chatrlhf import models
from chatrlhf.client import RewardClient
from chatrlhf.data.batching import Group, tokenize_groups
from chatrlhf.recipes.reward import score_groups
from chatrlhf.serve import create_app, plan_passes
from conftest import running, spread_bert

MEAN, STD, MAX_LENGTH = 0.5, 2.0, 64


@pytest.fixture(scope="module")
def model_dir(tiny_bert, tmp_path_factory) -> str:
    """tiny_bert with large weights (rewards far apart, so a mix-up between items shows) and
    chatrlhf.json metadata: max_length, reward mean and std."""
    folder = spread_bert(tiny_bert, tmp_path_factory.mktemp("served") / "model")
    (folder / models.METADATA_FILE).write_text(json.dumps(
        {"max_length": MAX_LENGTH, "reward_mean": MEAN, "reward_std": STD}))
    return str(folder)


@pytest.fixture(scope="module")
def url(model_dir):
    """Micro-batching server with small limits so the tests stay small."""
    app = create_app(model_dir, max_batch=4, max_wait_ms=100, max_items=8, max_chars=200,
                     max_messages=3, max_request_tokens=200, max_body_bytes=20_000)
    with running(app) as base:
        yield base


@pytest.fixture(scope="module")
def plain_url(tiny_bert):
    """No micro-batching; a model without chatrlhf.json (so no normalisation)."""
    with running(create_app(tiny_bert, batching=False)) as base:
        yield base


@pytest.fixture(scope="module")
def reference(model_dir):
    """Rewards as `chatrlhf reward score` computes them: tokenize_groups + score_groups."""
    model, tokenizer = models.load_reward_model(model_dir)

    def rewards(prompts, replies):
        groups = [Group(p, [r], [0]) for p, r in zip(prompts, replies)]
        tokenize_groups(groups, tokenizer, MAX_LENGTH)
        return [g[0] for g in score_groups(model, groups, tokenizer.pad_token_id)]
    return rewards


PROMPTS = ["the cat sat on the mat", [{"role": "user", "content": "is it good"}],
           "a " * 90, [{"role": "system", "content": "be kind"}, {"role": "user", "content": "hi"}]]
REPLIES = ["yes it was", "good", "short", "hello there, how are you today"]


def post(base, path, body, **kwargs):
    return httpx.post(base + path, json=body, timeout=30, **kwargs)


def stats(base) -> dict:
    return httpx.get(base + "/health").json()["stats"]


def test_plan_passes_bounds_padding_and_tokens():
    # Sorted [10, 10, 10, 40]: adding 40 would pad 70 real tokens to 160 (> 1.25 x 110).
    assert plan_passes([40, 10, 10, 10], 1000, 0.25) == [[1, 2, 3], [0]]
    assert plan_passes([10, 11, 12, 13], 1000, 0.25) == [[0, 1, 2, 3]]
    assert plan_passes([10, 11, 12, 13], 30, 0.25) == [[0, 1], [2, 3]]  # token budget
    assert plan_passes([], 30, 0.25) == []
    lengths = [5, 50, 7, 300, 48, 6, 310]
    passes = plan_passes(lengths, 10_000, 0.25)
    assert sorted(i for p in passes for i in p) == list(range(7))
    for indices in passes:
        widths = [lengths[i] for i in indices]
        assert len(indices) == 1 or max(widths) * len(widths) <= 1.25 * sum(widths)


def test_health_and_schema(url, model_dir):
    health = httpx.get(url + "/health").json()
    assert health["model"] == "model" and health["ready"] is True  # the folder's name, not its path
    assert model_dir not in json.dumps(health) and "/tmp" not in json.dumps(health)
    assert health["max_length"] == MAX_LENGTH and health["can_normalize"] is True
    schema = httpx.get(url + "/openapi.json").json()
    assert {"/score", "/compare", "/get_reward", "/health"} <= set(schema["paths"])
    assert httpx.get(url + "/docs").status_code == 200


def test_score_matches_training_scoring(url, reference):
    items = [{"prompt": p, "reply": r} for p, r in zip(PROMPTS, REPLIES)]
    answer = post(url, "/score", {"items": items}).json()
    expected = reference(PROMPTS, REPLIES)
    assert answer["normalized"] is False
    torch.testing.assert_close(answer["rewards"], expected, atol=1e-5, rtol=0)
    assert max(expected) - min(expected) > 0.1, "the test model should tell the items apart"
    normalized = post(url, "/score", {"items": items, "normalize": True}).json()
    torch.testing.assert_close(normalized["rewards"], [(r - MEAN) / STD for r in expected],
                               atol=1e-5, rtol=0)


def test_compare_gives_pair_probabilities_and_ranking(url, reference):
    replies = ["yes", "no it was not", "maybe", "good good"]
    answer = post(url, "/compare", {"prompt": "is it", "replies": replies}).json()
    rewards = reference(["is it"] * 4, replies)
    torch.testing.assert_close(answer["rewards"], rewards, atol=1e-5, rtol=0)
    assert answer["ranking"] == sorted(range(4), key=lambda i: -rewards[i])
    assert [(p["a"], p["b"]) for p in answer["pairs"]] == [(0, 1), (0, 2), (0, 3), (1, 2), (1, 3), (2, 3)]
    for pair in answer["pairs"]:
        expected = 1 / (1 + math.exp(-(rewards[pair["a"]] - rewards[pair["b"]])))
        assert abs(pair["probability"] - expected) < 1e-5
    one = post(url, "/compare", {"prompt": "is it", "replies": ["yes"]})
    assert one.status_code == 422 and "replies" in one.json()["detail"]


def test_get_reward_follows_openrlhf(url, reference):
    """HH text here; the chat templates of real policies: test_openrlhf_client.py."""
    prompt = "\n\nHuman: hi there\n\nAssistant: hello\n\nHuman: how are you\n\nAssistant:"
    chat = "<|im_start|>user\nis it good<|im_end|>\n<|im_start|>assistant\n"
    # OpenRLHF sends the templated prompts and labels (ignored); queries may end in EOS or padding.
    body = {"query": [prompt + " fine thanks[PAD][PAD]", chat + "yes it is<|im_end|>"],
            "prompts": [prompt, chat], "labels": [1, 0]}
    answer = post(url, "/get_reward", body).json()
    expected = reference([prompt, [{"role": "user", "content": "is it good"}]], ["fine thanks", "yes it is"])
    assert set(answer) == {"rewards", "scores"} and answer["scores"] == answer["rewards"]
    torch.testing.assert_close(answer["rewards"], expected, atol=1e-5, rtol=0)
    # An empty reply is a policy's rollout like any other here: scored.
    empty = post(url, "/get_reward", {"query": [prompt + "</s>"], "prompts": [prompt]})
    assert empty.status_code == 200
    torch.testing.assert_close(empty.json()["rewards"], reference([prompt], [""]), atol=1e-5, rtol=0)
    plain = post(url, "/get_reward", {"query": ["ok", "just some text"]})
    assert plain.status_code == 422 and "query[0]: no chat markup found" in plain.json()["detail"]


def test_limits_and_malformed_requests(url):
    item = {"prompt": "p", "reply": "r"}
    too_many = post(url, "/score", {"items": [item] * 9})
    assert too_many.status_code == 413 and "--max-items" in too_many.json()["detail"]
    long_reply = post(url, "/score", {"items": [item, {"prompt": "p", "reply": "x" * 201}]})
    assert long_reply.status_code == 422 and "items[1].reply: 201 characters" in long_reply.json()["detail"]
    long_turn = post(url, "/score", {"items": [{"prompt": [{"role": "user", "content": "x" * 300}],
                                                "reply": "r"}]})
    assert long_turn.status_code == 422 and "items[0].prompt[0].content" in long_turn.json()["detail"]
    long_query = post(url, "/get_reward", {"query": ["\n\nHuman: hi\n\nAssistant: ok", "x" * 201]})
    assert long_query.status_code == 422 and "query[1]" in long_query.json()["detail"]
    big = httpx.post(url + "/score", content=b"x" * 30_000, headers={"content-type": "application/json"})
    assert big.status_code == 413 and "--max-body-bytes" in big.json()["detail"]
    streamed = httpx.post(url + "/score", content=iter([b"x" * 15_000, b"x" * 15_000]))  # chunked
    assert streamed.status_code == 413
    bad_json = httpx.post(url + "/score", content=b'{"items": [',
                          headers={"content-type": "application/json"})
    assert bad_json.status_code == 422 and "malformed JSON" in bad_json.json()["detail"]
    missing = post(url, "/score", {"items": [{"prompt": "p"}]})
    assert missing.status_code == 422 and "body.items.0.reply: Field required" in missing.json()["detail"]
    unknown = post(url, "/score", {"items": [item], "normalise": True})
    assert unknown.status_code == 422 and "normalise" in unknown.json()["detail"]
    form = httpx.post(url + "/score", content=b'{"items": []}',
                      headers={"content-type": "application/x-www-form-urlencoded"})
    assert form.status_code == 422 and "Content-Type: application/json" in form.json()["detail"]
    assert post(url, "/score", {"items": [item]}).status_code == 200, "the server survives it all"


def test_messages_tokens_and_empty_texts(url, reference):
    item = {"prompt": "p", "reply": "r"}
    turn = {"role": "user", "content": "hi"}
    chatty = post(url, "/score", {"items": [item, {"prompt": [turn] * 4, "reply": "r"}]})
    assert chatty.status_code == 422 and "items[1].prompt: 4 messages" in chatty.json()["detail"]
    assert "--max-messages" in chatty.json()["detail"]
    assert post(url, "/score", {"items": [{"prompt": [turn] * 3, "reply": "r"}]}).status_code == 200
    # 8 items of about 48 tokens each (cut to max_length 64) are more than 200 tokens in all.
    wordy = post(url, "/score", {"items": [{"prompt": "the " * 45, "reply": "a b"}] * 8})
    assert wordy.status_code == 422 and "--max-request-tokens" in wordy.json()["detail"]
    for bad, where in [({"prompt": "  ", "reply": "r"}, "items[1].prompt: empty prompt"),
                       ({"prompt": [], "reply": "r"}, "items[1].prompt: empty chat"),
                       ({"prompt": "p", "reply": ""}, "items[1].reply: empty reply"),
                       ({"prompt": "p", "reply": " \n"}, "items[1].reply: empty reply")]:
        answer = post(url, "/score", {"items": [item, bad]})
        assert answer.status_code == 422 and where in answer.json()["detail"], (bad, answer.text)
    allowed = post(url, "/score", {"items": [item, {"prompt": "p", "reply": ""}], "allow_empty": True})
    torch.testing.assert_close(allowed.json()["rewards"], reference(["p", "p"], ["r", ""]), atol=1e-5, rtol=0)
    compared = post(url, "/compare", {"prompt": "p", "replies": ["a", ""]})
    assert compared.status_code == 422 and "replies[1]: empty reply" in compared.json()["detail"]
    # Text that is not Unicode (a lone surrogate) reaches the tokenizer, which refuses it: 422.
    broken = httpx.post(url + "/score", content=b'{"items": [{"prompt": "p", "reply": "a\\ud800b"}]}',
                        headers={"content-type": "application/json"})
    assert broken.status_code == 422 and "items[0]: text that is not valid Unicode" in broken.json()["detail"]


def test_api_key(model_dir, reference, monkeypatch):
    with running(create_app(model_dir, api_key="s3cret")) as base:
        body = {"items": [{"prompt": "p", "reply": "r"}]}
        for headers in [{}, {"authorization": "Bearer wrong"}, {"authorization": "s3cret"},
                        {"authorization": "Basic s3cret"}]:
            answer = httpx.post(base + "/score", json=body, headers=headers)
            assert answer.status_code == 401 and "API key" in answer.json()["detail"], headers
            assert answer.headers["www-authenticate"] == "Bearer"
        for path in ["/compare", "/get_reward", "/docs", "/openapi.json"]:
            assert httpx.post(base + path, json={}).status_code in (401, 405)
        ok = httpx.post(base + "/score", json=body, headers={"authorization": "Bearer s3cret"})
        torch.testing.assert_close(ok.json()["rewards"], reference(["p"], ["r"]), atol=1e-5, rtol=0)
        assert httpx.get(base + "/health").json()["ready"], "/health stays open"
        with RewardClient(base, api_key="s3cret") as client:
            assert client.score(["p"], ["r"]) == pytest.approx(ok.json()["rewards"])
        monkeypatch.setenv("CHATRLHF_API_KEY", "s3cret")
        with RewardClient(base) as client:
            assert client.score(["p"], ["r"]) == pytest.approx(ok.json()["rewards"])
        monkeypatch.setenv("CHATRLHF_API_KEY", "nope")
        with RewardClient(base) as client, pytest.raises(ValueError, match="401 missing or wrong API key"):
            client.score(["p"], ["r"])
    with pytest.raises(ValueError, match="api_key is empty"):
        create_app(model_dir, api_key=" ")


def test_normalize_needs_metadata(plain_url):
    answer = post(plain_url, "/score", {"items": [{"prompt": "p", "reply": "r"}], "normalize": True})
    assert answer.status_code == 422 and "reward_mean" in answer.json()["detail"]


def concurrent_scores(base, n: int) -> list:
    """n requests sent at once from n threads; each thread's (prompts, replies, answer)."""
    barrier, out = threading.Barrier(n), [None] * n

    def send(i):
        prompts = [f"prompt {i} " + "the " * (i % 7), [{"role": "user", "content": f"q{i}"}]][: 1 + i % 2]
        replies = [f"reply {i}", "a " * i][: len(prompts)]
        with httpx.Client(timeout=60) as http:
            barrier.wait()
            answer = http.post(base + "/score", json={"items": [{"prompt": p, "reply": r}
                                                                for p, r in zip(prompts, replies)]})
        out[i] = (prompts, replies, answer)

    threads = [threading.Thread(target=send, args=(i,)) for i in range(n)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    return out


def test_concurrent_requests_are_micro_batched(url, reference):
    before = stats(url)
    results = concurrent_scores(url, 32)
    after = stats(url)
    assert all(r is not None and r[2].status_code == 200 for r in results)
    prompts = [p for r in results for p in r[0]]
    replies = [x for r in results for x in r[1]]
    rewards = [x for r in results for x in r[2].json()["rewards"]]
    torch.testing.assert_close(rewards, reference(prompts, replies), atol=1e-5, rtol=0)
    batches = after["batches"] - before["batches"]
    assert after["requests"] - before["requests"] == 32 and after["items"] - before["items"] == len(prompts)
    passes = after["forward_passes"] - before["forward_passes"]
    assert batches < 32, f"{batches} micro-batches for 32 concurrent requests: nothing merged"
    # A micro-batch is split only where padding would grow too much (plan_passes).
    assert batches <= passes < len(prompts), f"{passes} forward passes for {len(prompts)} items"
    # A request larger than max_batch (4) is split and put back together in order.
    seven = [f"p{i} " * i for i in range(1, 8)]
    answer = post(url, "/score", {"items": [{"prompt": p, "reply": "r"} for p in seven]}).json()
    torch.testing.assert_close(answer["rewards"], reference(seven, ["r"] * 7), atol=1e-5, rtol=0)


def test_without_batching_each_request_is_scored_alone(plain_url):
    before = stats(plain_url)
    results = concurrent_scores(plain_url, 8)
    after = stats(plain_url)
    assert all(r[2].status_code == 200 for r in results)
    assert after["batches"] - before["batches"] == 8


def test_client_scores_retries_and_reports(url, reference):
    prompts = ["one", [{"role": "user", "content": "two"}], "three", "four", "five"]
    replies = ["a", "b", "c", "d", "e"]
    with RewardClient(url, chunk=2) as client:  # 3 requests
        torch.testing.assert_close(client.score(prompts, replies), reference(prompts, replies),
                                   atol=1e-5, rtol=0)
        assert client.health()["ready"]
        assert client.compare("p", ["x", "y"])["pairs"][0]["a"] == 0
        with pytest.raises(ValueError, match="--max-chars"):
            client.score(["p"], ["x" * 500])

    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]  # bound, never listening: connections are refused
        with pytest.raises(ConnectionError, match="failed 2 times"):
            RewardClient(f"http://127.0.0.1:{port}", retries=1, backoff=0.01).score(["p"], ["r"])


def test_client_retries_until_the_server_is_up(model_dir, reference):
    """The client's first attempts are refused (nothing listens yet); the server starts meanwhile."""
    import uvicorn

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(create_app(model_dir), log_level="warning"))

    def start_late():
        time.sleep(0.5)
        sock = socket.socket()
        sock.bind(("127.0.0.1", port))
        server.run(sockets=[sock])

    thread = threading.Thread(target=start_late, daemon=True)
    thread.start()
    try:
        client = RewardClient(f"http://127.0.0.1:{port}", retries=8, backoff=0.05)
        started = time.monotonic()
        torch.testing.assert_close(client.score(["one"], ["a"]), reference(["one"], ["a"]), atol=1e-5, rtol=0)
        assert time.monotonic() - started > 0.4, "the first attempts should have been refused"
    finally:
        server.should_exit = True
        thread.join(10)


MEMORY_PROBE = """
import ctypes
from chatrlhf import serve, training

libc = ctypes.CDLL(None)
libc.malloc.restype = ctypes.c_void_p
libc.free.argtypes = [ctypes.c_void_p]

def resident():
    return int(open("/proc/self/statm").read().split()[1]) * 4096 / 2**20

assert training.keep_freed_memory()  # as the chatrlhf command does for every command
start = resident()
blocks = [libc.malloc(64 * 2**20) for _ in range(4)]  # a burst: 256 MiB in 64 MiB buffers
for block in blocks:
    ctypes.memset(block, 1, 64 * 2**20)
for block in blocks:
    libc.free(block)
kept = resident() - start
assert serve.give_back_freed_memory()
print(kept, resident() - start)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's allocator")
def test_freed_memory_goes_back_when_the_server_is_idle(model_dir):
    """A burst's freed memory stays with the process (keep_freed_memory, for speed) until the
    server has been idle for trim_idle_s; then it goes back to the system."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_") and k != "GLIBC_TUNABLES"}
    done = subprocess.run([sys.executable, "-c", MEMORY_PROBE], capture_output=True, text=True, env=env)
    assert done.returncode == 0, done.stderr
    kept, after_trim = map(float, done.stdout.split())
    assert kept > 200 and after_trim < 16, done.stdout
    with running(create_app(model_dir, trim_idle_s=0.2)) as base:
        assert stats(base)["memory_trims"] == 0, "nothing scored yet: nothing to give back"
        post(base, "/score", {"items": [{"prompt": "p", "reply": "r"}]})
        deadline = time.monotonic() + 10
        while stats(base)["memory_trims"] == 0:
            assert time.monotonic() < deadline, "no trim after the server went idle"
            time.sleep(0.05)
        time.sleep(0.6)
        assert stats(base)["memory_trims"] == 1, "one trim per idle spell"
    with pytest.raises(ValueError, match="trim_idle_s >= 0"):
        create_app(model_dir, trim_idle_s=-1)


def test_cli_registers_serve(tiny_bert):
    from chatrlhf.cli import build_parser
    from chatrlhf.serve import serve_command

    args = build_parser().parse_args(["serve", tiny_bert, "--port", "0", "--no-batching",
                                      "--max-wait-ms", "2", "--max-messages", "9", "--max-request-tokens", "99",
                                      "--api-key", "k", "--name", "rm", "--trim-idle-s", "0"])
    assert args.run is serve_command and args.no_batching and args.max_wait_ms == 2.0
    assert (args.max_messages, args.max_request_tokens, args.api_key, args.name) == (9, 99, "k", "rm")
    assert args.trim_idle_s == 0
    defaults = build_parser().parse_args(["serve", tiny_bert])
    assert (defaults.max_messages, defaults.max_request_tokens, defaults.api_key) == (64, 65536, None)


def test_serve_module_imports_no_heavy_packages():
    """`chatrlhf --help` builds serve's parser: importing serve must not import these."""
    code = ("import sys, chatrlhf.serve; heavy = [m for m in ('torch', 'transformers', 'fastapi', 'pydantic') "
            "if m in sys.modules]; assert not heavy, heavy")
    subprocess.run([sys.executable, "-c", code], check=True)

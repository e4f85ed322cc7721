"""`chatrlhf serve`: the real server on loopback (uvicorn in a thread), each route, the limits,
micro-batching of concurrent requests, and the client."""

from __future__ import annotations

import json
import math
import shutil
import socket
import threading

import httpx
import pytest
import torch

from chatrlhf import models
from chatrlhf.client import RewardClient
from chatrlhf.data.batching import Group, tokenize_groups
from chatrlhf.recipes.reward import score_groups
from chatrlhf.serve import create_app, plan_passes, split_conversation
from conftest import running

MEAN, STD, MAX_LENGTH = 0.5, 2.0, 64


@pytest.fixture(scope="module")
def model_dir(tiny_bert, tmp_path_factory) -> str:
    """tiny_bert with large weights (rewards far apart, so a mix-up between items shows) and
    chatrlhf.json metadata: max_length, reward mean and std."""
    from transformers import AutoConfig, BertForSequenceClassification

    folder = tmp_path_factory.mktemp("served") / "model"
    shutil.copytree(tiny_bert, folder)
    config = AutoConfig.from_pretrained(folder)
    config.initializer_range = 0.5  # the default 0.02 gives nearly the same reward to every text
    torch.manual_seed(1)
    BertForSequenceClassification(config).save_pretrained(folder)
    (folder / models.METADATA_FILE).write_text(json.dumps(
        {"max_length": MAX_LENGTH, "reward_mean": MEAN, "reward_std": STD}))
    return str(folder)


@pytest.fixture(scope="module")
def url(model_dir):
    """Micro-batching server with small limits so the tests stay small."""
    app = create_app(model_dir, max_batch=4, max_wait_ms=100, max_items=8, max_chars=200,
                     max_body_bytes=20_000)
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
    assert health["model"] == model_dir and health["ready"] is True
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
    hh = "\n\nHuman: hi there\n\nAssistant: hello\n\nHuman: how are you\n\nAssistant: fine thanks"
    assert split_conversation(hh) == ("\n\nHuman: hi there\n\nAssistant: hello\n\nHuman: how are you"
                                      "\n\nAssistant:", "fine thanks")
    # OpenRLHF sends prompts and labels too (ignored), and queries may end in padding.
    body = {"query": [hh + "[PAD][PAD]", "just some text"], "prompts": ["x", "y"], "labels": [1, 0]}
    answer = post(url, "/get_reward", body).json()
    expected = reference([split_conversation(hh)[0], ""], ["fine thanks", "just some text"])
    assert set(answer) == {"rewards"}
    torch.testing.assert_close(answer["rewards"], expected, atol=1e-5, rtol=0)


def test_limits_and_malformed_requests(url):
    item = {"prompt": "p", "reply": "r"}
    too_many = post(url, "/score", {"items": [item] * 9})
    assert too_many.status_code == 413 and "--max-items" in too_many.json()["detail"]
    long_reply = post(url, "/score", {"items": [item, {"prompt": "p", "reply": "x" * 201}]})
    assert long_reply.status_code == 422 and "items[1].reply: 201 characters" in long_reply.json()["detail"]
    long_turn = post(url, "/score", {"items": [{"prompt": [{"role": "user", "content": "x" * 300}],
                                                "reply": "r"}]})
    assert long_turn.status_code == 422 and "items[0].prompt[0].content" in long_turn.json()["detail"]
    long_query = post(url, "/get_reward", {"query": ["ok", "x" * 201]})
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
    seven = [f"p{i} " * i for i in range(7)]
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

    calls = []
    real = httpx.Client(base_url=url)

    def flaky(request):  # refuses the first two connections, then forwards to the server
        calls.append(request.url.path)
        if len(calls) <= 2:
            raise httpx.ConnectError("connection refused", request=request)
        forwarded = real.send(real.build_request(request.method, request.url.path, content=request.content,
                                                 headers={"content-type": "application/json"}))
        return httpx.Response(forwarded.status_code, content=forwarded.content)

    client = RewardClient(url, retries=2, backoff=0.01)
    client.http = httpx.Client(base_url=url, transport=httpx.MockTransport(flaky))
    torch.testing.assert_close(client.score(["one"], ["a"]), reference(["one"], ["a"]), atol=1e-5, rtol=0)
    assert len(calls) == 3

    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]  # bound, never listening: connections are refused
        with pytest.raises(ConnectionError, match="failed 2 times"):
            RewardClient(f"http://127.0.0.1:{port}", retries=1, backoff=0.01).score(["p"], ["r"])


def test_cli_registers_serve(tiny_bert):
    from chatrlhf.cli import build_parser
    from chatrlhf.serve import serve_command

    args = build_parser().parse_args(["serve", tiny_bert, "--port", "0", "--no-batching",
                                      "--max-wait-ms", "2"])
    assert args.run is serve_command and args.no_batching and args.max_wait_ms == 2.0

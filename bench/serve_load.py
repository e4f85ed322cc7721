"""Load test of `chatrlhf serve`: concurrent clients on loopback, with and without micro-batching.

    python bench/serve_load.py --seconds 20 --clients 16
    python bench/serve_load.py --model runs/reward_hh_minilm/model --items 4 --route get_reward

The script starts the server itself (a subprocess, so clients and server do not share a GIL),
once per mode, and runs ``--clients`` threads that send requests back to back for ``--seconds``.
Each request carries ``--items`` (prompt, reply) items, HH-RLHF harmless dev dialogues from
../shared/data when present (synthetic text otherwise). Printed per mode: requests/s, items/s,
p50 / p99 latency, mean items per forward pass, and the failed and lost requests (a request is
lost when its thread has no answer 60 s after the end). Exits 1 if any request failed or was lost.

Every answer of the real clients is checked against the rewards of its items scored alone before
the load (batched: up to float noise); a wrong one counts as failed.

With ``--abuse N``, N more threads attack the server meanwhile (``abuses``: malformed JSON, wrong
types, bodies over the limit declared or chunked, clients that stall in the head or mid-body,
clients that leave mid-request, bytes that are not HTTP, a bad item among good ones, too many
messages, too many tokens, empty texts, a missing or wrong API key); the server then requires an
API key (a random one, or ``--api-key``), which the real clients send. Each attack's answer is
checked, and an unexpected one (or a failed or lost request of the real clients) also exits 1:

    python bench/serve_load.py --seconds 20 --clients 16 --abuse 8 --read-timeout 2
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import random
import secrets
import select
import socket
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from urllib.parse import urlsplit

import httpx

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"
HH_DEV = SHARED / "hh-rlhf" / "harmless-base" / "dev.jsonl.gz"
WORDS = "the a of to and in is it that was for on are with as at be this have from you can".split()


def conversations(n: int = 400) -> list[tuple[str, str]]:
    """(prompt, reply) pairs: real HH dialogues when the shared data is here, else synthetic."""
    if HH_DEV.exists():
        from chatrlhf.data import load

        pairs = load(HH_DEV, skip_invalid=True, allow_empty=True).records
        return [(p.prompt, p.chosen) for p in pairs if p.chosen.strip()][:n]  # the server refuses empty replies
    rng = random.Random(0)
    text = lambda k: " ".join(rng.choice(WORDS) for _ in range(k))  # noqa: E731
    return [(f"\n\nHuman: {text(rng.randint(10, 120))}\n\nAssistant:", text(rng.randint(5, 60)))
            for _ in range(n)]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_server(args, batching: bool) -> tuple[subprocess.Popen, str]:
    port = free_port()
    command = [sys.executable, "-m", "chatrlhf", "serve", args.model, "--port", str(port),
               "--max-batch", str(args.max_batch), "--max-wait-ms", str(args.max_wait_ms),
               "--log-level", "error" if args.abuse else "warning"]  # not one line per attack
    command += ["--threads", str(args.threads)] if args.threads else []
    command += ["--max-length", str(args.max_length)] if args.max_length else []
    command += [] if batching else ["--no-batching"]
    command += ["--read-timeout", str(args.read_timeout), "--max-body-bytes", str(args.max_body_bytes),
                "--max-messages", str(args.max_messages), "--max-request-tokens", str(args.max_request_tokens)]
    env = dict(os.environ)  # the key through the environment: `ps` would show it on the command line
    if args.api_key:
        env["CHATRLHF_API_KEY"] = args.api_key
    server = subprocess.Popen(command, env=env)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise SystemExit(f"the server exited with {server.returncode}: {' '.join(command)}")
        try:
            if httpx.get(url + "/health", timeout=2).json().get("ready"):
                return server, url
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    server.terminate()
    raise SystemExit("the server did not become ready in 180 s")


def body(route: str, items: list[tuple[str, str]]) -> dict:
    if route == "get_reward":  # whole conversations, as OpenRLHF sends them
        return {"query": [f"{p} {r}" for p, r in items]}
    return {"items": [{"prompt": p, "reply": r} for p, r in items]}


def auth(api_key: str | None) -> dict:
    return {"authorization": f"Bearer {api_key}"} if api_key else {}


def reference_rewards(url: str, args, data: list) -> list[float]:
    """Each item's reward scored alone, before the load: what every answer must hold."""
    with httpx.Client(base_url=url, timeout=120, headers=auth(args.api_key)) as http:
        return [http.post("/" + args.route, json=body(args.route, [item])).json()["rewards"][0] for item in data]


def load_clients(url: str, args, data: list, expected: list[float] | None = None) -> dict:
    """Run the clients for args.seconds; counts and latencies. With ``expected`` (a reward per
    item of ``data``), an answer whose rewards differ from them by more than float noise fails."""
    latencies, failures, sent = [], [], [0]
    lock = threading.Lock()
    stop_at = time.monotonic() + args.seconds

    def client(index: int):
        rng = random.Random(index)
        with httpx.Client(base_url=url, timeout=120, headers=auth(getattr(args, "api_key", None))) as http:
            while time.monotonic() < stop_at:
                chosen = rng.sample(range(len(data)), args.items)
                with lock:
                    sent[0] += 1
                started = time.perf_counter()
                try:
                    answer = http.post("/" + args.route, json=body(args.route, [data[i] for i in chosen]))
                    rewards = answer.json().get("rewards") if answer.status_code == 200 else None
                    ok = rewards is not None and len(rewards) == args.items and (expected is None or all(
                        abs(r - expected[i]) <= 1e-4 * max(1.0, abs(expected[i]))
                        for r, i in zip(rewards, chosen)))
                    problem = None if ok else f"{answer.status_code} {answer.text[:200]}"
                except (httpx.HTTPError, ValueError) as error:
                    problem = f"{type(error).__name__}: {error}"
                with lock:
                    (failures.append(problem) if problem else latencies.append(time.perf_counter() - started))

    threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(args.clients)]
    started = time.monotonic()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(max(0.0, stop_at + 60 - time.monotonic()))
    elapsed = time.monotonic() - started
    with lock:
        lost = sent[0] - len(latencies) - len(failures)
        return {"sent": sent[0], "ok": len(latencies), "failed": len(failures), "lost": lost,
                "elapsed": elapsed, "latencies": sorted(latencies), "first_failure": failures[:1]}


# ---- abuse: raw sockets, so that malformed and unfinished requests can be sent at all ----------

def raw_exchange(url: str, chunks: list[bytes], pause: float = 0.0, timeout: float = 30.0,
                 leave: bool = False) -> tuple[int | None, bytes]:
    """Send ``chunks`` on a fresh connection (``pause`` seconds between them; sending stops
    early once the server answers), then read one answer: (status, body), or (None, b"") when
    the server closed without one. ``leave`` closes the connection right after sending."""
    address = urlsplit(url)
    with socket.create_connection((address.hostname, address.port), timeout=timeout) as sock:
        for i, chunk in enumerate(chunks):
            if i and select.select([sock], [], [], pause)[0]:
                break  # answered (or closed) before the request was whole: read that
            sock.sendall(chunk)
        if leave:
            return None, b""
        data = b""
        try:
            while b"\r\n\r\n" not in data:
                more = sock.recv(65536)
                if not more:
                    return (None, b"") if not data else (int(data.split()[1]), b"")
                data += more
            head, _, body = data.partition(b"\r\n\r\n")
            length = next((int(line.split(b":")[1]) for line in head.split(b"\r\n")
                           if line.lower().startswith(b"content-length:")), None)
            while length is not None and len(body) < length and (more := sock.recv(65536)):
                body += more
        except ConnectionResetError:
            return (int(data.split()[1]), b"") if data.startswith(b"HTTP/") else (None, b"")
        return int(head.split()[1]), body


def post_head(path: str, length: int | None, content_type: str = "application/json",
              api_key: str | None = None) -> bytes:
    size = f"content-length: {length}" if length is not None else "transfer-encoding: chunked"
    key = f"authorization: Bearer {api_key}\r\n" if api_key else ""
    return (f"POST {path} HTTP/1.1\r\nhost: 127.0.0.1\r\ncontent-type: {content_type}\r\n"
            f"{key}{size}\r\n\r\n").encode()


def whole(path: str, body: bytes, api_key: str | None = None) -> bytes:
    return post_head(path, len(body), api_key=api_key) + body


def chunked(parts: list[bytes]) -> list[bytes]:
    return [b"%x\r\n%s\r\n" % (len(part), part) for part in parts]


def abuses(max_body_bytes: int, read_timeout: float, api_key: str | None = None, max_messages: int = 64,
           max_request_tokens: int = 65536, max_length: int = 512, max_items: int = 256,
           max_chars: int = 20000) -> dict:
    """name -> (send(url) -> (status, body), the answers that are right: a set of statuses,
    None for "closed without an answer"). Every attack but the key's own carries ``api_key``;
    the other settings are the server's (``--max-messages`` ...; max_length from /health)."""
    key = api_key

    def post(path: str, request: dict, with_key: str | None = key):
        return lambda url: raw_exchange(url, [whole(path, json.dumps(request).encode(), with_key)])

    good = {"prompt": "hi", "reply": "hello"}
    valid = json.dumps({"items": [good]}).encode()
    wait = read_timeout + 30  # the server must answer a stalled client within its read timeout
    over = max_body_bytes + 1
    # Enough long items to pass --max-request-tokens, each text under --max-chars (a word: a token
    # or more; an item: at most max_length tokens).
    words = max(1, min(max_length, max_chars // 4 - 1))
    per_item = min(max_length, 2 * words)
    wordy = [{"prompt": "the " * words, "reply": "the " * words}] * min(max_items,
                                                                       max_request_tokens // per_item + 1)
    attacks = {
        "malformed JSON": (lambda url: raw_exchange(url, [whole("/score", b'{"items": [{"prompt": ', key)]),
                           {422}),
        "wrong types": (lambda url: raw_exchange(url, [whole("/score", b'{"items": [{"prompt": 1, '
                                                                     b'"reply": ["r"]}]}', key)]), {422}),
        "declared too large": (lambda url: raw_exchange(url, [post_head("/score", 10**12, api_key=key)]), {413}),
        "chunked too large": (lambda url: raw_exchange(
            url, [post_head("/score", None, api_key=key), *chunked([b" " * (over // 4 + 1)] * 4), b"0\r\n\r\n"]),
            {413}),
        "stalls mid-body": (lambda url: raw_exchange(url, [post_head("/score", 1000, api_key=key), b'{"items": ['],
                                                     timeout=wait), {408}),
        "stalls in head": (lambda url: raw_exchange(url, [b"POST /score HTTP/1.1\r\nhost: 127"],
                                                    timeout=wait), {408}),
        "drips the body": (lambda url: raw_exchange(url, [post_head("/score", len(valid), api_key=key)]
                                                    + [bytes([b]) for b in valid],
                                                    pause=2 * read_timeout / len(valid), timeout=wait),
                           {408}),
        "leaves mid-body": (lambda url: raw_exchange(url, [post_head("/score", 1000, api_key=key), b"{"],
                                                     leave=True), {None}),
        "leaves before the answer": (lambda url: raw_exchange(url, [whole("/score", valid, key)],
                                                              leave=True), {None}),
        "not HTTP": (lambda url: raw_exchange(url, [b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03"
                                                    + bytes(range(256))]), {400, None}),
        # A text the tokenizer cannot read (a lone surrogate) among good items: this request
        # alone gets its 422; the real clients' requests, batched meanwhile, are answered.
        "bad item among good ones": (post("/score", {"items": [good, {"prompt": "hi", "reply": "a\ud800b"},
                                                                good]}), {422}),
        "too many messages": (post("/score", {"items": [{"prompt": [{"role": "user", "content": "hi"}]
                                                         * (max_messages + 1), "reply": "r"}]}), {422}),
        "too many tokens": (post("/score", {"items": wordy}), {422}),
        "empty text": (post("/score", {"items": [good, {"prompt": " ", "reply": ""}]}), {422}),
        "unknown markup": (post("/get_reward", {"query": ["<|user|> hi <|bot|> hello"]}), {422}),
    }
    if api_key:
        attacks["no API key"] = (post("/score", {"items": [good]}, with_key=None), {401})
        attacks["wrong API key"] = (post("/score", {"items": [good]}, with_key=api_key + "x"), {401})
    return attacks


def abuse_clients(url: str, threads: int, seconds: float, max_body_bytes: int,
                  read_timeout: float, **settings) -> dict:
    """``threads`` threads send the ``abuses`` in turn for ``seconds``; counts per (abuse,
    answer) and the unexpected answers. ``settings``: ``abuses``' (api_key, max_messages, ...)."""
    kinds = abuses(max_body_bytes, read_timeout, **settings)
    counts, unexpected = collections.Counter(), []
    lock = threading.Lock()
    stop_at = time.monotonic() + seconds

    def attacker(index: int):
        names = list(kinds)
        turn = index * len(names) // threads  # spread out: each kind of attack is sent early on
        while time.monotonic() < stop_at:
            name = names[turn % len(names)]
            turn += 1
            send, right = kinds[name]
            try:
                status, body = send(url)
            except OSError as error:  # a refused or reset connection: the server did not answer
                status, body = f"{type(error).__name__}", b""
            with lock:
                counts[name, status] += 1
                if status not in right:
                    unexpected.append(f"{name}: {status} {body[:200]!r}")

    pool = [threading.Thread(target=attacker, args=(i,), daemon=True) for i in range(threads)]
    for thread in pool:
        thread.start()
    for thread in pool:
        thread.join(max(0.0, stop_at + read_timeout + 60 - time.monotonic()))
    with lock:
        return {"counts": dict(counts), "sent": sum(counts.values()), "unexpected": list(unexpected)}


def percentile(values: list[float], q: float) -> float:
    return values[min(len(values) - 1, int(q * len(values)))] if values else float("nan")


def run_mode(args, data: list, batching: bool) -> dict:
    server, url = start_server(args, batching)
    try:
        expected = reference_rewards(url, args, data)  # also the warm-up
        health = httpx.get(url + "/health").json()
        before = health["stats"]
        abuse = {}
        attack = threading.Thread(target=lambda: abuse.update(abuse_clients(
            url, args.abuse, args.seconds, args.max_body_bytes, args.read_timeout, api_key=args.api_key,
            max_messages=args.max_messages, max_request_tokens=args.max_request_tokens,
            max_length=health["max_length"], max_items=256)))
        if args.abuse:
            attack.start()
        result = load_clients(url, args, data, expected)
        if args.abuse:
            attack.join()
        after = httpx.get(url + "/health").json()["stats"]
        result["abuse"] = abuse
    finally:
        server.terminate()
        server.wait(30)
    passes = after["forward_passes"] - before["forward_passes"]
    result["items_per_pass"] = (after["items"] - before["items"]) / max(1, passes)
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="minilm", help="reward model folder or embedded name")
    parser.add_argument("--seconds", type=float, default=20)
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--items", type=int, default=1, help="items per request")
    parser.add_argument("--route", choices=["score", "get_reward"], default="score")
    parser.add_argument("--max-batch", type=int, default=64)
    parser.add_argument("--max-wait-ms", type=float, default=5)
    parser.add_argument("--max-length", type=int, default=None, help="default: the model's")
    # On a machine busy with other work, torch's default (one thread per core) spins waiting
    # for descheduled threads and can be many times slower than --threads 1.
    parser.add_argument("--threads", type=int, default=None, help="the server's torch threads")
    parser.add_argument("--abuse", type=int, default=0, help="attacking threads (see ABUSES)")
    parser.add_argument("--read-timeout", type=float, default=5.0, help="the server's --read-timeout")
    parser.add_argument("--max-body-bytes", type=int, default=2**20, help="the server's --max-body-bytes")
    parser.add_argument("--max-messages", type=int, default=64, help="the server's --max-messages")
    parser.add_argument("--max-request-tokens", type=int, default=16384, help="the server's --max-request-tokens")
    parser.add_argument("--api-key", default=None, help="the server's API key (with --abuse: a random one "
                        "unless given)")
    args = parser.parse_args()
    if args.abuse and not args.api_key:
        args.api_key = secrets.token_urlsafe(16)

    data = conversations()
    source = "HH-RLHF harmless dev" if HH_DEV.exists() else "synthetic text"
    print(f"model {args.model}; {args.clients} clients x {args.seconds:g} s; {args.items} item(s) per "
          f"/{args.route} request from {source}; max_batch {args.max_batch}, max_wait "
          f"{args.max_wait_ms} ms, max_length {args.max_length or 'the model default'}, "
          f"server threads {args.threads or 'torch default'}")
    results = {}
    for batching in (True, False):
        name = "micro-batching" if batching else "no batching"
        r = results[name] = run_mode(args, data, batching)
        lat, rate = r["latencies"], r["ok"] / r["elapsed"]
        mean = 1000 * statistics.fmean(lat) if lat else float("nan")
        print(f"{name:>15}: {rate:7.1f} requests/s {rate * args.items:7.1f} items/s | latency p50 "
              f"{1000 * percentile(lat, 0.5):7.1f} ms p99 {1000 * percentile(lat, 0.99):7.1f} ms "
              f"(mean {mean:.1f}) | {r['items_per_pass']:.1f} items/forward pass | sent {r['sent']} "
              f"ok {r['ok']} failed {r['failed']} lost {r['lost']}"
              + (f" first failure: {r['first_failure'][0]}" if r["failed"] else ""))
        if args.abuse:
            a = r["abuse"]
            answers = collections.Counter()
            for (_, status), n in a["counts"].items():
                answers[status or "closed"] += n
            print(f"{'':>15}  abuse: {a['sent']} attacks, {a['sent'] - len(a['unexpected'])} answered as "
                  f"expected ({', '.join(f'{k}: {n}' for k, n in sorted(answers.items(), key=str))})"
                  + (f"; unexpected: {a['unexpected'][:3]}" if a["unexpected"] else ""))
    batched, alone = results["micro-batching"], results["no batching"]
    ratio = (batched["ok"] / batched["elapsed"]) / max(1e-9, alone["ok"] / alone["elapsed"])
    print(f"micro-batching / no batching throughput: {ratio:.2f}x")
    bad = sum(r["failed"] + r["lost"] + len(r["abuse"].get("unexpected", [])) for r in results.values())
    return 1 if bad else 0


if __name__ == "__main__":
    raise SystemExit(main())

"""`chatrlhf label`: answer parsing, the both-order maths, the local judge on tiny models, and the
HTTP judge against a real OpenAI-compatible server on loopback (uvicorn in a thread) serving a
tiny model, which times out, fails with 500 and answers malformed text for chosen questions."""

from __future__ import annotations

import json
import threading
import time
from collections import Counter
from pathlib import Path

import pytest
import torch

from chatrlhf import cli
from chatrlhf import config as cfg_lib
from chatrlhf import judge as judge_lib
from chatrlhf.data import load
from chatrlhf.data.records import Pair, Ranking, ScoredSample
from chatrlhf.recipes.label import Group, LabelConfig, Run, evaluate, pair_verdict

from conftest import WORDS, running, separable_pairs, write_jsonl

PRESET = Path(__file__).parents[1] / "configs" / "label_pandalm_smollm2.yaml"
# Short templates: the tiny word-level vocabulary knows "A", "B" and the digits, not English.
PAIR = "{prompt} A {reply_a} B {reply_b} A or B"
SCORE = "{prompt} reply {reply} 0 to 5"
# Quoted: an override value is read as YAML, where a leading "{" opens a mapping.
TINY = [f"judge.pair_template='{PAIR}'", f"judge.score_template='{SCORE}'"]


def build_judge_model(folder: Path, answers: list[str], seed: int) -> str:
    """A 2-layer, width-32 Llama like conftest's tiny_llama, with "A", "B" and digits in its
    vocabulary and an output layer whose only non-zero rows are those of ``answers``; they sum to
    zero, so one of them always has a positive logit and greedy decoding always picks one. Its greedy answer is
    therefore always one of ``answers``, and which one depends on the input through a real forward
    pass."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    torch.manual_seed(seed)
    vocab = ["<unk>", "<s>", "</s>", "<|user|>", "<|assistant|>", "good", "bad", "hi", "A", "B",
             *"012345", "or", "to", "reply", *WORDS, *(f"w{i}" for i in range(40))]
    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(vocab)}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", bos_token="<s>",
                                        eos_token="</s>")
    tokenizer.chat_template = ("{% for m in messages %}<|{{ m['role'] }}|> {{ m['content'] }} "
                               "{% endfor %}{% if add_generation_prompt %}<|assistant|> {% endif %}")
    config = LlamaConfig(vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         bos_token_id=1, eos_token_id=2)
    model = LlamaForCausalLM(config)
    with torch.no_grad():
        rows = torch.randn(len(answers), 32)
        model.lm_head.weight.zero_()
        model.lm_head.weight[[vocab.index(a) for a in answers]] = 0.1 * (rows - rows.mean(0))
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="module")
def judges(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("judges")
    return {"tiny-pair": build_judge_model(root / "pair", ["A", "B"], 0),
            "tiny-score": build_judge_model(root / "score", list("012345"), 1)}


# ---- a real OpenAI-compatible server ---------------------------------------------------------

class Misbehaving:
    """Server state: requests per question text, and the questions to misbehave on. A question
    containing w37 is answered after 2 s (over the client's timeout) the first time, w38 gets a
    500 the first time, w39 always gets a refusal in plain text."""

    def __init__(self):
        self.calls: Counter = Counter()
        self.in_flight = self.max_in_flight = 0
        self.lock = threading.Lock()


def openai_app(model_dirs: dict, state: Misbehaving, api_key: str):
    from fastapi import FastAPI, Header, HTTPException
    from fastapi.responses import JSONResponse
    from transformers import AutoModelForCausalLM, AutoTokenizer

    loaded = {name: (AutoModelForCausalLM.from_pretrained(path).eval(), AutoTokenizer.from_pretrained(path))
              for name, path in model_dirs.items()}
    model_lock = threading.Lock()
    app = FastAPI()

    @app.post("/v1/chat/completions")
    def chat(body: dict, authorization: str | None = Header(None)):
        if authorization != f"Bearer {api_key}":
            raise HTTPException(401, "invalid API key")
        if body.get("model") not in loaded:
            raise HTTPException(404, f"model {body.get('model')!r} not found")
        content = body["messages"][-1]["content"]
        with state.lock:
            state.calls[content] += 1
            first = state.calls[content] == 1
        if "w37" in content and first:
            time.sleep(2)  # the client has given up by now: this answer goes nowhere
            return JSONResponse({"error": {"message": "too late"}}, status_code=500)
        with state.lock:
            state.in_flight += 1
            state.max_in_flight = max(state.max_in_flight, state.in_flight)
        try:
            if "w38" in content and first:
                return JSONResponse({"error": {"message": "internal error"}}, status_code=500)
            if "w39" in content:
                text = "I cannot judge this."
            else:
                model, tokenizer = loaded[body["model"]]
                prompt = tokenizer.apply_chat_template(body["messages"], tokenize=False, add_generation_prompt=True)
                ids = torch.tensor([tokenizer.encode(prompt, add_special_tokens=False)])
                with model_lock, torch.inference_mode():
                    out = model.generate(ids, max_new_tokens=body.get("max_tokens", 16), do_sample=False,
                                         pad_token_id=tokenizer.eos_token_id)
                text = tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
            return {"id": "cmpl-1", "object": "chat.completion", "model": body["model"],
                    "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                                 "finish_reason": "length"}]}
        finally:
            with state.lock:
                state.in_flight -= 1

    return app


@pytest.fixture
def server(judges):
    state = Misbehaving()
    with running(openai_app(judges, state, api_key="sk-test")) as base:
        url = base + "/v1"
        yield url, state


def http_overrides(url: str, out: Path, model: str = "tiny-pair") -> list[str]:
    return [*TINY, "judge.backend=http", f"judge.model={model}", f"judge.base_url={url}", "judge.timeout=0.5",
            "judge.retries=2", "judge.backoff=0.01", "judge.concurrency=2", f"output.path={out}"]


def pairs_file(tmp_path: Path, n: int = 8) -> str:
    rows = separable_pairs(n, seed=3)
    for row, trigger in zip(rows, ("w37", "w38", "w39")):  # the first three misbehave
        row["prompt"] = f"{trigger} {row['prompt']}"
    return write_jsonl(tmp_path / "pairs.jsonl", rows)


def read_lines(path: str) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines()]


# ---- answers and maths ----------------------------------------------------------------------

@pytest.mark.parametrize("text, kind, expected", [
    ("A", "pair", 1.0), ("B", "pair", 0.0), (" **B**", "pair", 0.0), ("Answer: A", "pair", 1.0),
    ("Response B is better.", "pair", 0.0), ("A B A", "pair", 1.0), ("Both are fine", "pair", None),
    ("As an AI, I cannot", "pair", None), ("AB", "pair", None), ("", "pair", None),
    ("4", "score", 4.0), ("0 - useless", "score", 0.0), ("Score: 3", "score", None),
    ("6", "score", None), ("3.5", "score", None), ("45", "score", None), ("five", "score", None),
])
def test_parse_answer_takes_one_clear_verdict_or_none(text, kind, expected):
    assert judge_lib.parse_answer(text, kind) == expected


def answers_for(p_first: dict) -> dict:
    return {key: judge_lib.Answer(v, reason=None if v is not None else "HTTP 500") for key, v in p_first.items()}


def test_both_orders_average_and_agreement_counts_by_hand():
    """Group 0: human prefers reply 0. Orders (0,1): P(A)=0.9, (1,0): P(A)=0.3, so P(0 better) =
    (0.9 + 0.7) / 2 = 0.8 and both orders agree -> correct. Group 1: human prefers reply 1;
    P(A) = 0.8 both ways (pure position bias): P(0 better) = 0.5, a judge tie -> 1/2, orders
    disagree. Group 2: a human tie, left out of agreement. Group 3: one order failed: unlabelled.
    Agreement (1 + 0.5) / 2 = 0.75; consistency 2 agreeing of 3 labelled pairs."""
    groups = [Group(0, "p", ["a", "b"], [0, 1], {}), Group(1, "p", ["a", "b"], [1, 0], {}),
              Group(2, "p", ["a", "b"], [0, 0], {}), Group(3, "p", ["a", "b"], [0, 1], {})]
    answers = answers_for({(0, 0, 1): 0.9, (0, 1, 0): 0.3, (1, 0, 1): 0.8, (1, 1, 0): 0.8,
                           (2, 0, 1): 0.2, (2, 1, 0): 0.6, (3, 0, 1): 0.9, (3, 1, 0): None})
    assert pair_verdict(answers, 0, 0, 1)["p"] == pytest.approx(0.8)
    assert pair_verdict(answers, 0, 0, 1)["agree"] and not pair_verdict(answers, 1, 0, 1)["agree"]
    assert pair_verdict(answers, 3, 0, 1) == {"reason": "HTTP 500"}
    config = LabelConfig()
    config.output.bootstrap = 200
    result = evaluate(Run(config, groups, None, {}, "pair"), answers)
    assert result["agreement"] == pytest.approx(0.75)
    assert result["human_ordered_pairs"] == 2 and result["human_ties_left_out"] == 1
    assert result["unlabelled_pairs"] == 1
    assert result["order_consistency"] == pytest.approx(2 / 3)
    assert result["mean_p_first"] == pytest.approx((0.9 + 0.3 + 0.8 + 0.8 + 0.2 + 0.6) / 6)
    low, high = result["agreement_ci95"]
    assert 0.5 <= low <= 0.75 <= high <= 1.0


def test_cache_keeps_answers_and_ignores_a_torn_last_line(tmp_path):
    path = tmp_path / "cache.jsonl"
    cache = judge_lib.Cache(path)
    cache.put("k1", {"value": 0.25})
    with path.open("a") as file:
        file.write('{"key": "k2", "val')  # a write cut short by a crash
    again = judge_lib.Cache(path)
    assert again.get("k1")["value"] == 0.25 and again.get("k2") is None and again.torn == 1


# ---- local judge ----------------------------------------------------------------------------

def test_local_judge_batching_and_padding_do_not_change_answers(judges):
    templates = {"pair": PAIR, "score": SCORE}
    judge = judge_lib.LocalJudge(judges["tiny-pair"], templates, max_length=128, batch_size=4)
    rows = separable_pairs(6, seed=1)
    questions = [(r["prompt"], (r["chosen"], r["rejected"])) for r in rows]
    batched = [a.value for a in judge.ask("pair", questions)]
    judge.batch_size = 1
    judge.cache = judge_lib.Cache(None)
    alone = [a.value for a in judge.ask("pair", questions)]
    torch.testing.assert_close(torch.tensor(batched), torch.tensor(alone), atol=1e-5, rtol=0)
    assert all(0 < v < 1 for v in batched) and len(set(batched)) > 1
    # Every other token has logit 0 here, so A and B share the mass with the rest of the vocabulary.
    assert all(0 < a.mass < 1 and a.cached for a in judge.ask("pair", questions))


def test_label_local_pairs_writes_judged_pairs_and_reruns_from_cache(judges, tmp_path):
    rows = [{"kind": "pair", **row} for row in separable_pairs(11, seed=2)]
    rows[-1]["rejected"] = rows[-1]["chosen"]  # identical replies: both orders cancel exactly -> a tie
    rows[-1]["tie"] = True
    data = write_jsonl(tmp_path / "pairs.jsonl", rows)
    out = tmp_path / "out" / "labels.jsonl"
    args = ["label", str(PRESET), *TINY, f"judge.model={judges['tiny-pair']}", f"data.file={data}",
            "data.reader=auto", "data.nan_as_missing=false", "judge.max_length=128", f"output.path={out}"]
    with pytest.raises(ValueError, match="unknown config key"):  # the preset itself is checked
        cfg_lib.load(LabelConfig, PRESET, ["judge.nope=1"])
    assert cli.main(args) == 0
    summary = json.loads((tmp_path / "out" / "labels.summary.json").read_text())
    records = load(out).records
    assert len(records) == 11 and all(isinstance(r, Pair) for r in records)
    assert summary["questions"] == 22 and summary["asked_judge"] == 22 and summary["failed_questions"] == 0
    judge_meta = records[0].meta["judge"]
    assert judge_meta["model"] == judges["tiny-pair"] and judge_meta["template_sha"] == judge_lib.template_id(PAIR)
    assert set(judge_meta) >= {"p_chosen", "order_agreement", "p_first_by_order"}
    assert records[-1].tie and records[-1].meta["judge"]["p_chosen"] == 0.5
    # Agreement with the (file's) human labels is what the records' meta say, one by one.
    agrees = [r.meta["human"] for r in records if r.meta["human"] in ("agrees", "disagrees")]
    assert summary["agreement"] == pytest.approx(agrees.count("agrees") / len(agrees))
    assert summary["human_ties_left_out"] == 1
    consistent = [r.meta["judge"]["order_agreement"] for r in records]
    assert summary["order_consistency"] == pytest.approx(sum(consistent) / len(consistent))

    assert cli.main(args) == 0  # a rerun: every answer comes from the cache, same output
    again = json.loads((tmp_path / "out" / "labels.summary.json").read_text())
    assert again["asked_judge"] == 0 and again["answered_from_cache"] == 22
    assert [r.chosen for r in load(out).records] == [r.chosen for r in records]


def test_label_local_rankings_pairs_and_scores_for_k_replies(judges, tmp_path):
    rows = [{"kind": "ranking", "prompt": "the a of", "replies": ["good w1", "bad w2", "w3 w4", "hi w5"],
             "ranks": [0, 3, 1, 2]},
            {"kind": "ranking", "prompt": "to and in", "replies": ["w6 good", "w7", "bad w8"], "ranks": [0, 1, 2]}]
    data = write_jsonl(tmp_path / "rankings.jsonl", rows)
    base = ["label", *TINY, f"judge.model={judges['tiny-pair']}", f"data.file={data}", "judge.max_length=128",
            f"judge.cache={tmp_path / 'cache.jsonl'}"]
    assert cli.main([*base, f"output.path={tmp_path / 'r.jsonl'}"]) == 0
    rankings = load(tmp_path / "r.jsonl").records
    assert [type(r) for r in rankings] == [Ranking, Ranking]
    for ranking in rankings:
        wins = ranking.meta["judge"]["wins"]
        assert sum(wins) == pytest.approx(len(wins) * (len(wins) - 1) / 2)  # each pair shares one win
        best = max(range(len(wins)), key=wins.__getitem__)
        assert ranking.ranks[best] == 0 and sorted(ranking.ranks)[0] == 0
    assert cli.main([*base, "output.kind=pairs", f"output.path={tmp_path / 'p.jsonl'}"]) == 0
    assert len(load(tmp_path / "p.jsonl").records) == 6 + 3  # C(4, 2) + C(3, 2)
    summary = json.loads((tmp_path / "p.summary.json").read_text())
    assert summary["asked_judge"] == 0  # the same questions, one cache: all answered by the first run

    score = ["label", *TINY, f"judge.model={judges['tiny-score']}", f"data.file={data}", "judge.mode=score",
             f"output.path={tmp_path / 's.jsonl'}"]
    assert cli.main(score) == 0
    scored = load(tmp_path / "s.jsonl").records
    assert len(scored) == 7 and all(isinstance(r, ScoredSample) and 0 <= r.score <= 5 for r in scored)
    assert len({round(r.score, 6) for r in scored}) > 1
    summary = json.loads((tmp_path / "s.summary.json").read_text())
    assert summary["human_ordered_pairs"] == 6 + 3 and 0 <= summary["agreement"] <= 1


def test_label_samples_replies_from_a_policy_and_counts_cuts(judges, tiny_llama, tmp_path):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in ["the a of", "hi to and in is it"]))
    out = tmp_path / "sampled.jsonl"
    assert cli.main(["label", *TINY, f"judge.model={judges['tiny-pair']}", f"data.prompts={prompts}",
                     f"sample.policy={tiny_llama}", "sample.replies=3", "sample.max_new_tokens=12",
                     "judge.max_length=28", f"output.path={out}"]) == 0
    rankings = load(out).records
    assert len(rankings) == 2 and all(len(r.replies) == 3 and r.meta["policy"] == tiny_llama for r in rankings)
    summary = json.loads((tmp_path / "sampled.summary.json").read_text())
    assert summary["questions"] == 2 * 6 and summary["questions_cut"] > 0 and "agreement" not in summary


def test_label_bad_input_is_named(tmp_path, capsys, monkeypatch):
    bad = tmp_path / "prompts.jsonl"
    bad.write_text('{"prompt": "ok"}\n{"text": "no prompt"}\n')
    assert cli.main(["label", f"data.prompts={bad}", "sample.policy=x"]) == 2
    assert "line 2, field 'prompt'" in capsys.readouterr().err
    monkeypatch.delenv("CHATRLHF_JUDGE_BASE_URL", raising=False)
    data = write_jsonl(tmp_path / "pairs.jsonl", separable_pairs(2, seed=6))
    assert cli.main(["label", "judge.backend=http", f"data.file={data}"]) == 2
    assert "needs judge.base_url" in capsys.readouterr().err
    assert cli.main(["label", "judge.pair_template=no fields"]) == 2
    assert "lacks {prompt}" in capsys.readouterr().err


# ---- HTTP judge against the real server -----------------------------------------------------

def test_http_judge_retries_timeouts_and_500s_records_malformed_and_matches_local(
        server, judges, tmp_path, monkeypatch):
    url, state = server
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test")
    data = pairs_file(tmp_path)
    out = tmp_path / "http" / "labels.jsonl"
    assert cli.main(["label", f"data.file={data}", *http_overrides(url, out)]) == 0
    summary = json.loads((tmp_path / "http" / "labels.summary.json").read_text())
    assert summary["questions"] == 16 and summary["failed_questions"] == 2
    assert list(summary["failure_reasons"]) == ["malformed answer 'I cannot judge this.'"]
    assert summary["records_written"] == 7 and summary["unlabelled_records"] == 1
    unlabelled = read_lines(tmp_path / "http" / "labels.unlabelled.jsonl")
    assert unlabelled[0]["prompt"].startswith("w39") and "after 3 tries" in unlabelled[0]["reason"]
    calls = {trigger: [n for text, n in state.calls.items() if trigger in text] for trigger in ("w37", "w38", "w39")}
    assert calls == {"w37": [2, 2], "w38": [2, 2], "w39": [3, 3]}  # each order: a failure, then the answer
    assert state.max_in_flight <= 2

    # The served model and the local judge are the same model: the text answer of every order is
    # the local judge's more likely letter.
    records = load(out).records
    local = judge_lib.LocalJudge(judges["tiny-pair"], {"pair": PAIR, "score": SCORE}, max_length=256)
    for record in records:
        http_orders = record.meta["judge"]["p_first_by_order"]
        prompt = judge_lib.conversation_text(record.prompt)
        if record.tie:  # the orders disagreed: which reply was first is in the source order
            continue
        p_ab, p_ba = (a.value for a in local.ask("pair", [(prompt, (record.chosen, record.rejected)),
                                                          (prompt, (record.rejected, record.chosen))]))
        assert http_orders in ([1.0, 0.0], [0.0, 1.0])  # both orders agree when not a tie
        assert p_ab > 0.5 and p_ba < 0.5  # the local judge prefers the same reply in both orders
    assert all(r.meta["judge"]["model"] == "tiny-pair" for r in records)
    assert "sk-test" not in (tmp_path / "http" / "labels.summary.json").read_text()

    # Rerun: answers come from the cache; only the failed (malformed) questions are asked again.
    before = sum(state.calls.values())
    assert cli.main(["label", f"data.file={data}", *http_overrides(url, out)]) == 0
    again = json.loads((tmp_path / "http" / "labels.summary.json").read_text())
    assert again["answered_from_cache"] == 14 and sum(state.calls.values()) - before == 2 * 3


def test_http_judge_resumes_from_the_cache_and_scores(server, tmp_path, monkeypatch):
    url, state = server
    # Exact call counts: a generous timeout, so that a loaded CI machine does not cause retries.
    slow_ok = ["judge.timeout=10"]
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test")
    rows = separable_pairs(6, seed=4)
    data = write_jsonl(tmp_path / "pairs.jsonl", rows)
    out = tmp_path / "labels.jsonl"
    # An interrupted run is a cache holding part of the answers: here the first 2 records'.
    assert cli.main(["label", f"data.file={data}", "data.limit=2", *http_overrides(url, out), *slow_ok]) == 0
    assert sum(state.calls.values()) == 4
    assert cli.main(["label", f"data.file={data}", *http_overrides(url, out), *slow_ok]) == 0
    summary = json.loads((tmp_path / "labels.summary.json").read_text())
    assert summary["answered_from_cache"] == 4 and summary["asked_judge"] == 8
    assert sum(state.calls.values()) == 12 and max(state.calls.values()) == 1

    score_out = tmp_path / "scores.jsonl"
    assert cli.main(["label", f"data.file={data}", "judge.mode=score",
                     *http_overrides(url, score_out, model="tiny-score"), *slow_ok]) == 0
    scored = load(score_out).records
    assert len(scored) == 12 and all(r.score in {0.0, 1.0, 2.0, 3.0, 4.0, 5.0} for r in scored)
    assert all(r.meta["judge"]["raw"].split()[0] in "012345" for r in scored)


def test_http_judge_stops_on_a_bad_key_or_model(server, tmp_path, monkeypatch, capsys):
    url, _ = server
    data = write_jsonl(tmp_path / "pairs.jsonl", separable_pairs(2, seed=6))
    monkeypatch.setenv("OPENAI_API_KEY", "wrong")
    assert cli.main(["label", f"data.file={data}", *http_overrides(url, tmp_path / "o.jsonl")]) == 2
    assert "HTTP 401" in capsys.readouterr().err
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test")
    assert cli.main(["label", f"data.file={data}", *http_overrides(url, tmp_path / "o.jsonl", model="nope")]) == 2
    assert "HTTP 404" in capsys.readouterr().err
    # The endpoint can come from the environment instead of the config.
    monkeypatch.setenv("CHATRLHF_JUDGE_BASE_URL", url)
    monkeypatch.setenv("CHATRLHF_JUDGE_MODEL", "tiny-pair")
    assert cli.main(["label", *TINY, "judge.backend=http", f"data.file={data}",
                     f"output.path={tmp_path / 'env.jsonl'}"]) == 0
    assert len(load(tmp_path / "env.jsonl").records) == 2

"""Comparisons (or 0-5 scores) from an LLM judge, in the project's own format.

    chatrlhf label configs/label_pandalm_smollm2.yaml
    chatrlhf label data.file=replies.jsonl output.path=runs/label/labels.jsonl
    chatrlhf label data.prompts=prompts.jsonl sample.policy=smollm2-135m sample.replies=4
    CHATRLHF_JUDGE_BASE_URL=http://localhost:8000/v1 CHATRLHF_JUDGE_MODEL=qwen2.5-7b-instruct \\
        chatrlhf label judge.backend=http data.file=replies.jsonl

Every pair of replies of a group is asked in both orders, (a, b) and (b, a), and the two answers
are averaged: P(a better) = (P(A | a, b) + P(B | b, a)) / 2, which cancels a judge's preference for
a position (MT-bench, Zheng et al. arXiv 2306.05685, sec. 3.3 asks both orders too). A judge that
only answers in text (HTTP) gives 1 or 0 per order, so two orders that disagree average to 0.5: a
tie, as MT-bench counts them. Groups of K > 2 replies are ranked by soft wins (the sum of each
reply's P(better) over its K - 1 pairs, a Borda count). ``judge.mode=score`` is ChatLLaMA's
legacy absolute 0-5 score per reply, kept so both can be compared on the same data.

Steps: setup (read or sample the replies, load the judge) -> fit (ask every question, in chunks,
cached on disk) -> evaluate (agreement with human labels when the input has them) -> save.
"""

from __future__ import annotations

import json
import math
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from tqdm.auto import tqdm

from chatrlhf import config as cfg_lib
from chatrlhf import judge as judge_lib
from chatrlhf import metrics
from chatrlhf.config import option
from chatrlhf.data import load, save
from chatrlhf.data.records import Pair, Ranking, Record, ScoredSample


@dataclass
class JudgeConfig:
    backend: Literal["local", "http"] = option("local", "'local': a causal LM read at the answer token; "
                                               "'http': an OpenAI-compatible chat-completions endpoint")
    model: str | None = option(None, "local: model name or folder (default smollm2-135m); http: the "
                               "served model's name (default $CHATRLHF_JUDGE_MODEL)")
    base_url: str | None = option(None, "http: endpoint base, e.g. http://localhost:8000/v1 "
                                  "(default $CHATRLHF_JUDGE_BASE_URL)")
    api_key_env: str = option("OPENAI_API_KEY", "http: environment variable holding the API key "
                              "(keys are never read from files or written out); unset: no key sent")
    mode: Literal["pairs", "score"] = option("pairs", "'pairs': compare replies two by two; 'score': "
                                             "legacy absolute 0-5 score per reply (ChatLLaMA)")
    pair_template: str = option(judge_lib.PAIR_TEMPLATE, "judging prompt for pairs: {prompt}, {reply_a}, "
                                "{reply_b}; the answer must be A or B")
    score_template: str = option(judge_lib.SCORE_TEMPLATE, "judging prompt for scores: {prompt}, {reply}; "
                                 "the answer must be a digit 0-5")
    max_length: int = option(1024, "local: tokens per judging prompt (conversation cut from the left, "
                             "replies from the right, counted)")
    batch_size: int = option(8, "local: judging prompts per forward pass")
    timeout: float = option(60.0, "http: seconds per request")
    retries: int = option(3, "http: extra tries after a timeout, 429, 5xx, or a malformed/refused answer")
    backoff: float = option(1.0, "http: first wait before a retry in seconds, doubled per try (jittered)")
    concurrency: int = option(8, "http: requests in flight at once")
    max_tokens: int = option(16, "http: answer tokens requested")
    cache: str | None = option(None, "answers cache (JSONL); default: next to output.path. A rerun asks "
                               "only what is not in it, so an interrupted run resumes")

    def __post_init__(self):
        for name in ("max_length", "batch_size", "concurrency", "max_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"judge.{name}: expected >= 1, found {getattr(self, name)}")
        if self.retries < 0 or self.timeout <= 0 or self.backoff < 0:
            raise ValueError("judge.retries and judge.backoff: expected >= 0; judge.timeout: expected > 0")
        judge_lib.check_template(self.pair_template, "pair")
        judge_lib.check_template(self.score_template, "score")


@dataclass
class InputConfig:
    file: str = option("", "records with 2..K replies per prompt (pairs, rankings, any reader); the "
                       "human labels are not shown to the judge, only used to measure agreement")
    prompts: str = option("", "or prompts alone (JSONL with a 'prompt' field, or .txt one per line), "
                          "with sample.policy generating the replies")
    reader: str = option("auto", "reader name for data.file (see `chatrlhf data validate --help`)")
    fields: dict = option({}, "field mapping canonical=column, e.g. {chosen: answer_a}")
    options: dict = option({}, "reader options")
    skip_invalid: bool = option(False, "skip invalid records (counted and reported) instead of stopping")
    nan_as_missing: bool = option(False, "read a bare NaN in JSON as a missing value (PandaLM needs it)")
    allow_empty: bool = option(False, "accept empty replies")
    limit: int | None = option(None, "use only the first N records or prompts")


@dataclass
class SampleConfig:
    policy: str | None = option(None, "policy model sampling the replies for data.prompts")
    replies: int = option(4, "replies sampled per prompt (K)")
    max_new_tokens: int = option(128, "reply budget in tokens (replies that reach it are counted)")
    max_prompt_tokens: int = option(512, "prompt budget (cut from the left, counted)")
    temperature: float = option(1.0, "sampling temperature")
    top_p: float = option(0.95, "nucleus sampling")
    seed: int = option(42, "sampling seed")

    def __post_init__(self):
        if self.replies < 2:
            raise ValueError(f"sample.replies: expected >= 2 (a comparison needs two), found {self.replies}")


@dataclass
class OutputConfig:
    path: str = option("runs/label/labels.jsonl", "labelled records (project format); beside it "
                       "*.unlabelled.jsonl (with reasons) and *.summary.json")
    kind: Literal["auto", "pairs", "ranking"] = option("auto", "pairs mode: 'pairs' writes every pair, "
                                                      "'ranking' one ranking per group, 'auto' pairs "
                                                      "for K = 2 and rankings for K > 2")
    bootstrap: int = option(2000, "bootstrap resamples for the 95% intervals")


@dataclass
class LabelConfig:
    judge: JudgeConfig = field(default_factory=JudgeConfig)
    data: InputConfig = field(default_factory=InputConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)
    output: OutputConfig = field(default_factory=OutputConfig)


@dataclass
class Group:
    """One prompt and its K replies; ``human_ranks`` (0 = best) when the input had labels."""

    index: int
    prompt: object
    replies: list[str]
    human_ranks: list[int] | None
    meta: dict


@dataclass
class Run:
    config: LabelConfig
    groups: list[Group]
    judge: object
    judge_meta: dict
    kind: str  # "pair" or "score"


# ---- setup ----------------------------------------------------------------------------------

def read_groups(data: InputConfig) -> list[Group]:
    """Records with replies -> groups; scored samples are grouped by prompt (K = their count)."""
    loaded = load(data.file, reader=data.reader, fields=data.fields or None, skip_invalid=data.skip_invalid,
                  nan_as_missing=data.nan_as_missing, allow_empty=data.allow_empty, **data.options)
    print(loaded.summary())
    records = loaded.records[:data.limit] if data.limit else loaded.records
    if data.limit and data.limit < len(loaded.records):
        print(f"{data.file}: using the first {data.limit} of {len(loaded.records)} records (data.limit)")
    groups, scored = [], {}
    for index, record in enumerate(records):
        if isinstance(record, Pair):
            groups.append(Group(index, record.prompt, [record.chosen, record.rejected],
                                [0, 0] if record.tie else [0, 1], record.meta))
        elif isinstance(record, Ranking):
            groups.append(Group(index, record.prompt, list(record.replies), list(record.ranks), record.meta))
        else:  # scored samples of one prompt compare through their scores
            key = json.dumps(record.prompt)
            if key not in scored:
                scored[key] = Group(index, record.prompt, [], [], {})
                groups.append(scored[key])
            scored[key].replies.append(record.reply)
            scored[key].human_ranks.append(record.score)
    for group in scored.values():  # higher score -> better rank
        order = sorted(set(group.human_ranks), reverse=True)
        group.human_ranks = [order.index(s) for s in group.human_ranks]
    alone = [g for g in groups if len(g.replies) < 2]
    if alone:
        print(f"{data.file}: {len(alone)} prompts with a single scored reply left out (nothing to compare)")
    return [g for g in groups if len(g.replies) >= 2]


def read_prompts(path: str, limit: int | None) -> list:
    file = Path(path)
    if not file.exists():
        raise FileNotFoundError(f"no such file: {path}")
    if file.suffix == ".txt":
        prompts = [line for line in file.read_text(encoding="utf-8").splitlines() if line.strip()]
    else:
        prompts = []
        for number, line in enumerate(file.read_text(encoding="utf-8").splitlines(), start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as error:
                raise ValueError(f"{path}: line {number}: invalid JSON ({error.msg})") from None
            prompt = row.get("prompt") if isinstance(row, dict) else None
            if not isinstance(prompt, (str, list)) or not prompt:
                raise ValueError(f"{path}: line {number}, field 'prompt': expected a non-empty string "
                                 f"or list of messages, found {prompt!r:.60}")
            prompts.append(prompt)
    return prompts[:limit] if limit else prompts


def sample_groups(config: LabelConfig) -> list[Group]:
    """K replies per prompt from the policy (sampling, one prompt at a time)."""
    import torch

    from chatrlhf.policy import encode_prompt, load_policy

    sample = config.sample
    if not sample.policy:
        raise ValueError("data.prompts needs sample.policy, the model that writes the replies")
    prompts = read_prompts(config.data.prompts, config.data.limit)
    model, tokenizer = load_policy(sample.policy)
    model.eval()
    torch.manual_seed(sample.seed)
    groups, prompt_cut, reply_cut, empty = [], 0, 0, 0
    for index, prompt in enumerate(tqdm(prompts, desc="sampling replies", dynamic_ncols=True)):
        ids, cut = encode_prompt(tokenizer, prompt, sample.max_prompt_tokens)
        prompt_cut += cut
        with torch.inference_mode():
            out = model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                                 do_sample=True, temperature=sample.temperature, top_p=sample.top_p,
                                 max_new_tokens=sample.max_new_tokens, num_return_sequences=sample.replies,
                                 pad_token_id=tokenizer.pad_token_id)
        replies = []
        for row in out[:, len(ids):]:
            finished = bool((row == tokenizer.eos_token_id).any())
            reply_cut += not finished and len(row) >= sample.max_new_tokens
            text = tokenizer.decode(row, skip_special_tokens=True).strip()
            empty += not text
            replies.append(text)
        groups.append(Group(index, prompt, replies, None, {"policy": sample.policy}))
    print(f"sampled {sample.replies} replies for each of {len(prompts)} prompts: {prompt_cut} prompts cut "
          f"to {sample.max_prompt_tokens} tokens, {reply_cut} replies stopped at {sample.max_new_tokens} "
          f"tokens, {empty} empty")
    return groups


def make_judge(config: LabelConfig):
    """The judge and the metadata every output record carries."""
    j = config.judge
    cache_path = j.cache or str(Path(config.output.path).with_suffix("")) + ".cache.jsonl"
    cache = judge_lib.Cache(cache_path)
    if cache.torn:
        print(f"{cache_path}: {cache.torn} unreadable line(s) ignored (an interrupted write)")
    templates = {"pair": j.pair_template, "score": j.score_template}
    kind = "pair" if j.mode == "pairs" else "score"
    if j.backend == "local":
        name = j.model or "smollm2-135m"
        judge = judge_lib.LocalJudge(name, templates, j.max_length, j.batch_size, cache)
    else:
        base_url = j.base_url or os.environ.get("CHATRLHF_JUDGE_BASE_URL")
        name = j.model or os.environ.get("CHATRLHF_JUDGE_MODEL")
        if not base_url or not name:
            raise ValueError("judge.backend=http needs judge.base_url and judge.model (or the environment "
                             "variables CHATRLHF_JUDGE_BASE_URL and CHATRLHF_JUDGE_MODEL)")
        judge = judge_lib.HttpJudge(base_url, name, templates, os.environ.get(j.api_key_env) or None,
                                    j.timeout, j.retries, j.backoff, j.concurrency, j.max_tokens, cache)
    meta = {"backend": j.backend, "model": name, "mode": j.mode,
            "template_sha": judge_lib.template_id(templates[kind])}
    print(f"judge: {j.backend} {name}, mode {j.mode}; cache {cache_path} ({len(cache.entries)} answers)")
    return judge, meta, kind


def setup(config: LabelConfig) -> Run:
    if bool(config.data.file) == bool(config.data.prompts):
        raise ValueError("give exactly one of data.file (prompts with replies) or data.prompts "
                         "(prompts alone, with sample.policy)")
    groups = read_groups(config.data) if config.data.file else sample_groups(config)
    if not groups:
        raise ValueError(f"{config.data.file or config.data.prompts}: nothing to judge")
    judge, meta, kind = make_judge(config)
    return Run(config, groups, judge, meta, kind)


# ---- fit ------------------------------------------------------------------------------------

def questions(run: Run) -> list[tuple[int, int, int]]:
    """(group, i, j): reply i shown as A and j as B; every pair in both orders. Scores: (g, i, -1)."""
    if run.kind == "score":
        return [(g, i, -1) for g, group in enumerate(run.groups) for i in range(len(group.replies))]
    out = []
    for g, group in enumerate(run.groups):
        for i in range(len(group.replies)):
            for j in range(i + 1, len(group.replies)):
                out += [(g, i, j), (g, j, i)]
    return out


def fit(run: Run) -> dict:
    """Ask every question, chunk by chunk; returns {(g, i, j): Answer}."""
    asked = questions(run)
    chunk = run.config.judge.batch_size * 4 if run.config.judge.backend == "local" else run.config.judge.concurrency * 4
    texts = {g: judge_lib.conversation_text(group.prompt) for g, group in enumerate(run.groups)}
    answers = {}
    bar = tqdm(total=len(asked), desc=f"judging ({run.kind})", dynamic_ncols=True)
    for step in range(math.ceil(len(asked) / chunk)):
        part = asked[step * chunk:(step + 1) * chunk]
        batch = [(texts[g], (run.groups[g].replies[i],) if j < 0 else
                  (run.groups[g].replies[i], run.groups[g].replies[j])) for g, i, j in part]
        for question, answer in zip(part, run.judge.ask(run.kind, batch)):
            answers[question] = answer
        bar.update(len(part))
        bar.set_postfix(unlabelled=sum(a.value is None for a in answers.values()))
    bar.close()
    return answers


def pair_verdict(answers: dict, g: int, i: int, j: int) -> dict:
    """Both orders of (i, j) combined: P(i better), the orders' agreement, or why unlabelled."""
    first, second = answers[(g, i, j)], answers[(g, j, i)]
    reasons = [a.reason for a in (first, second) if a.value is None]
    if reasons:
        return {"reason": "; ".join(reasons)}
    p_i = (first.value + 1 - second.value) / 2
    return {"p": p_i, "orders": [first.value, second.value],
            "agree": (first.value > 0.5) == (second.value < 0.5) and first.value != 0.5 != second.value}


# ---- evaluate -------------------------------------------------------------------------------

def evaluate(run: Run, answers: dict) -> dict:
    """Agreement with the human labels and the both-order consistency, with 95% bootstrap intervals.

    A human-ordered pair counts 1 when the judge prefers the human's choice, 0 when it prefers the
    other, 1/2 for a judge tie; human ties and unlabelled pairs are counted and left out. Pairs of
    one group are resampled together.
    """
    correct, ordered, consistent, labelled, picks = [], [], [], [], []
    human_ties = unlabelled = 0
    for g, group in enumerate(run.groups):
        c = n = agree = total = 0
        for i in range(len(group.replies)):
            for j in range(i + 1, len(group.replies)):
                if run.kind == "score":
                    a, b = answers[(g, i, -1)].value, answers[(g, j, -1)].value
                    p = None if a is None or b is None else (1.0 if a > b else 0.0 if a < b else 0.5)
                else:
                    verdict = pair_verdict(answers, g, i, j)
                    p = verdict.get("p")
                    if p is not None:
                        agree, total = agree + verdict["agree"], total + 1
                        picks += verdict["orders"]
                if p is None:
                    unlabelled += 1
                    continue
                if group.human_ranks is None:
                    continue
                if group.human_ranks[i] == group.human_ranks[j]:
                    human_ties += 1
                    continue
                hit = p if group.human_ranks[i] < group.human_ranks[j] else 1 - p
                c, n = c + (1.0 if hit > 0.5 else 0.5 if hit == 0.5 else 0.0), n + 1
        correct.append(c)
        ordered.append(n)
        consistent.append(agree)
        labelled.append(total)
    result = {"groups": len(run.groups), "unlabelled_pairs": unlabelled}
    resamples = run.config.output.bootstrap
    if sum(ordered):
        result.update(agreement=sum(correct) / sum(ordered), human_ordered_pairs=sum(ordered),
                      agreement_ci95=list(metrics.bootstrap_interval(correct, ordered, resamples)),
                      human_ties_left_out=human_ties)
    if sum(labelled):
        result.update(order_consistency=sum(consistent) / sum(labelled),
                      order_consistency_ci95=list(metrics.bootstrap_interval(consistent, labelled, resamples)),
                      # 0.5 for a judge without position bias: the mean P(A) over both orders
                      mean_p_first=sum(picks) / len(picks))
    return result


# ---- save -----------------------------------------------------------------------------------

def labelled_records(run: Run, answers: dict) -> tuple[list[Record], list[dict]]:
    """Output records with the judge's metadata, and the unlabelled ones with their reasons."""
    out_kind = run.config.output.kind
    records, unlabelled = [], []
    for g, group in enumerate(run.groups):
        base = {**group.meta, "source_record": group.index}
        if run.kind == "score":
            for i, reply in enumerate(group.replies):
                answer = answers[(g, i, -1)]
                if answer.value is None:
                    unlabelled.append({"record": group.index, "reply": i, "reason": answer.reason})
                    continue
                judge = {**run.judge_meta, "answer_mass": answer.mass, "raw": answer.raw}
                records.append(ScoredSample(group.prompt, reply, answer.value, meta={**base, "judge": judge}))
            continue
        k = len(group.replies)
        verdicts = {(i, j): pair_verdict(answers, g, i, j) for i in range(k) for j in range(i + 1, k)}
        missing = {f"{i},{j}": v["reason"] for (i, j), v in verdicts.items() if "reason" in v}
        as_ranking = out_kind == "ranking" or (out_kind == "auto" and k > 2)
        if as_ranking:
            if missing:  # a ranking from part of its pairs would be a guess
                unlabelled.append({"record": group.index, "prompt": group.prompt, "replies": group.replies,
                                   "reason": missing})
                continue
            wins = [0.0] * k
            for (i, j), v in verdicts.items():
                wins[i], wins[j] = wins[i] + v["p"], wins[j] + 1 - v["p"]
            levels = sorted({round(w, 9) for w in wins}, reverse=True)
            ranks = [levels.index(round(w, 9)) for w in wins]
            agreement = sum(v["agree"] for v in verdicts.values()) / len(verdicts)
            judge = {**run.judge_meta, "wins": wins, "order_agreement": agreement}
            records.append(Ranking(group.prompt, list(group.replies), ranks, meta={**base, "judge": judge}))
            continue
        for (i, j), v in verdicts.items():
            if "reason" in v:
                unlabelled.append({"record": group.index, "prompt": group.prompt,
                                   "replies": [group.replies[i], group.replies[j]], "reason": v["reason"]})
                continue
            better, worse = (i, j) if v["p"] >= 0.5 else (j, i)
            judge = {**run.judge_meta, "p_chosen": max(v["p"], 1 - v["p"]), "p_first_by_order": v["orders"],
                     "order_agreement": v["agree"]}
            meta = {**base, "judge": judge}
            if group.human_ranks is not None:
                ranks = group.human_ranks
                meta["human"] = ("tie" if ranks[i] == ranks[j] else "judge tie" if v["p"] == 0.5
                                 else "agrees" if ranks[better] < ranks[worse] else "disagrees")
            records.append(Pair(group.prompt, group.replies[better], group.replies[worse],
                                tie=v["p"] == 0.5, meta=meta))
    return records, unlabelled


def save_outputs(run: Run, records: list[Record], unlabelled: list[dict], summary: dict) -> dict:
    """Labels, unlabelled and summary files beside each other, each written whole or not at all."""
    path = Path(run.config.output.path)
    path.parent.mkdir(parents=True, exist_ok=True)
    stem = str(path).removesuffix(".gz").removesuffix(".jsonl")
    staging = path.with_name(".tmp-" + path.name)
    save(records, staging)
    os.replace(staging, path)
    files = {"labels": str(path), "unlabelled": stem + ".unlabelled.jsonl", "summary": stem + ".summary.json"}
    for name, text in (("unlabelled", "".join(json.dumps(u, ensure_ascii=False) + "\n" for u in unlabelled)),
                       ("summary", json.dumps(summary, indent=2, ensure_ascii=False))):
        staging = Path(files[name] + ".tmp")
        staging.write_text(text, encoding="utf-8")
        os.replace(staging, files[name])
    return files


def label(config: LabelConfig) -> dict:
    """setup -> fit -> evaluate -> save; returns the summary (counts and agreement)."""
    run = setup(config)
    answers = fit(run)
    result = evaluate(run, answers)
    records, unlabelled = labelled_records(run, answers)
    reasons = Counter(a.reason.split(" (after")[0] for a in answers.values() if a.value is None)
    summary = {
        "judge": {**run.judge_meta, "template": config.judge.pair_template if run.kind == "pair"
                  else config.judge.score_template},
        "questions": len(answers), "answered_from_cache": sum(a.cached for a in answers.values()),
        "asked_judge": sum(not a.cached for a in answers.values()),
        "failed_questions": sum(reasons.values()), "failure_reasons": dict(reasons),
        "questions_cut": run.judge.cut, "records_written": len(records), "unlabelled_records": len(unlabelled),
        **result, "config": cfg_lib.to_dict(config),
    }
    files = save_outputs(run, records, unlabelled, summary)
    print(format_summary(summary, files))
    return summary


def format_summary(s: dict, files: dict) -> str:
    lines = [f"{s['questions']} questions: {s['asked_judge']} asked, {s['answered_from_cache']} from the cache, "
             f"{s['failed_questions']} failed" + (f" ({s['failure_reasons']})" if s["failed_questions"] else "")
             + f", {s['questions_cut']} cut to judge.max_length",
             (f"wrote {s['records_written']} records to {files['labels']}; {s['unlabelled_records']} "
              f"unlabelled (with reasons) to {files['unlabelled']}")]
    if "order_consistency" in s:
        low, high = s["order_consistency_ci95"]
        lines.append(f"both orders agree on {s['order_consistency']:.3f} of pairs (95% CI {low:.3f}-{high:.3f}); "
                     f"mean P(first) {s['mean_p_first']:.3f}")
    if "agreement" in s:
        low, high = s["agreement_ci95"]
        lines.append(f"agreement with human labels {s['agreement']:.3f} (95% CI {low:.3f}-{high:.3f}) on "
                     f"{s['human_ordered_pairs']} pairs; {s['human_ties_left_out']} human ties left out")
    return "\n".join(lines)


def add_parser(subparsers) -> None:
    cfg_lib.add_preset_command(
        subparsers, "label", LabelConfig, lambda config, args: label(config),
        help="comparisons, rankings or 0-5 scores from an LLM judge",
        description="Label replies with an LLM judge (local model or OpenAI-compatible endpoint).",
        example="configs/label_pandalm_smollm2.yaml")


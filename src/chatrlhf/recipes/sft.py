"""Supervised fine-tuning of a causal LM on prompt/response or chat data.

    chatrlhf sft configs/sft_hh_smollm2.yaml
    chatrlhf sft model.name=smollm2-135m data.train=chats.jsonl model.lora_r=8 data.packing=true

Data: preference files through ``chatrlhf.data.load`` (a pair trains on its ``chosen`` reply, a
ranking on its best-ranked replies), or SFT JSONL with ``{"prompt", "response"}`` or
``{"messages": [...]}`` rows (the last assistant message is the reply, everything before it the
prompt; earlier assistant turns are context and carry no loss, a deliberate simplification).
The prompt is rendered with the tokenizer's chat template (policy.py) and carries no loss: the
loss is the mean negative log-likelihood of the reply tokens, end-of-turn marker included.

Every forward is ``sharing.policy_logps``: on CPU a batch's examples go one after another in
one row without padding, each attending to itself only; elsewhere they are packed into rows with
a block-diagonal causal mask. The output layer runs at reply tokens only, in chunks, so the
(tokens x vocabulary) logits are never held whole. ``data.packing=true`` makes batches of rows
filled up to model.max_length tokens instead of ``train.batch_size`` examples; the loss is the
same. Steps: setup -> fit -> evaluate -> save, in plain sight below.
"""

from __future__ import annotations

import gzip
import json
import math
import random
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from chatrlhf import config as cfg_lib
from chatrlhf import models, policy, sharing, training
from chatrlhf.config import ModelConfig, SFTConfig, SFTDataConfig
from chatrlhf.data import load, mixture
from chatrlhf.data.records import Pair, Ranking
from chatrlhf.training import CHECKPOINTS

# The settings (SFTConfig and its sections) are in config.py; the `sft` command is in cli.py.

# ---- data -----------------------------------------------------------------------------------

@dataclass
class Example(policy.Encoded):
    record_index: int = 0

    @property
    def num_tokens(self) -> int:
        return len(self.input_ids)

    @property
    def reply_tokens(self) -> int:
        """Tokens with a loss: the reply's (a row's first token has no target)."""
        return self.num_tokens - max(self.prompt_tokens, 1)


def _sft_rows(path: Path):
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8") as file:
        for number, line in enumerate(file, start=1):
            if line.strip():
                try:
                    yield number, json.loads(line)
                except json.JSONDecodeError as error:
                    raise ValueError(f"{path}: line {number}: invalid JSON ({error.msg})") from None


def is_sft_file(path: str) -> bool:
    """Whether the first row of a JSONL file has SFT fields (messages, or prompt + response)."""
    p = Path(path)
    if not p.is_file() or not p.name.lower().removesuffix(".gz").endswith((".jsonl", ".ndjson")):
        return False
    for _, row in _sft_rows(p):
        return isinstance(row, dict) and ("messages" in row or {"prompt", "response"} <= set(row))
    return False


def read_sft(path: str, allow_empty: bool = False) -> list[tuple[object, str]]:
    """(prompt, reply) per row of an SFT JSONL file; a bad row is an error naming line and field."""
    examples = []
    for number, row in _sft_rows(Path(path)):
        where = f"{path}: line {number}"
        if not isinstance(row, dict):
            raise ValueError(f"{where}: expected a JSON object, found {type(row).__name__}")
        if "messages" in row:
            chat = row["messages"]
            ok = isinstance(chat, list) and chat and all(
                isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
                for m in chat)
            if not ok:
                raise ValueError(f"{where}: field 'messages': expected a non-empty list of "
                                 "{role: str, content: str}")
            if chat[-1]["role"] != "assistant" or len(chat) < 2:
                raise ValueError(f"{where}: field 'messages': expected the last message to be the "
                                 f"assistant's reply after at least one other message, found role "
                                 f"{chat[-1]['role']!r} in {len(chat)} message(s)")
            prompt, reply = chat[:-1], chat[-1]["content"]
        else:
            prompt, reply = row.get("prompt"), row.get("response")
            for field, value in (("prompt", prompt), ("response", reply)):
                if not isinstance(value, str):
                    raise ValueError(f"{where}: field '{field}': expected a string, found "
                                     f"{type(value).__name__}")
        if not prompt or (not reply.strip() and not allow_empty):
            raise ValueError(f"{where}: expected a non-empty prompt and reply "
                             "(data.allow_empty=true accepts empty replies)")
        examples.append((prompt, reply))
    return examples


def read_examples(path: str | list, data: SFTDataConfig, log=print, section: str = "train",
                  seed: int = 42) -> list[tuple[object, str]]:
    """(prompt, reply) pairs to imitate, from an SFT file or a preference file, or a mixture of
    such sources (data/mixture.py: each read here with its own options, cut and weighted)."""
    if mixture.is_mixture(path):
        return mixture.mix(path, data, section, seed, lambda source: (mixture.cut(
            read_examples(source.path, source, log), source, lambda e: e[0], log), 0), log).units
    if data.reader == "sft" or (data.reader == "auto" and is_sft_file(path)):
        examples = read_sft(path, data.allow_empty)
        log(f"{path}: {len(examples)} SFT examples")
        return examples
    loaded = load(path, reader=data.reader, fields=data.fields or None, skip_invalid=data.skip_invalid,
                  nan_as_missing=data.nan_as_missing, allow_empty=data.allow_empty, **data.options)
    log(loaded.summary())
    examples, ties, scored = [], 0, 0
    for record in loaded.records:
        if isinstance(record, Pair):
            # A tie says neither reply is worse; chosen is still one a person accepted.
            ties += record.tie
            examples.append((record.prompt, record.chosen))
        elif isinstance(record, Ranking):
            best = min(record.ranks)
            examples += [(record.prompt, r) for r, k in zip(record.replies, record.ranks) if k == best]
        else:
            scored += 1
    if scored:
        raise ValueError(f"{path}: {scored} scored samples: SFT needs pairs, rankings or SFT rows "
                         "(a score does not say which reply to imitate)")
    log(f"{path}: {len(examples)} examples (the chosen reply of each pair, the best of each ranking"
        + (f"; {ties} tied pairs use their 'chosen' reply" if ties else "") + ")")
    return examples


def encode_examples(examples, tokenizer, model_cfg: ModelConfig, source: str, log=print) -> list[Example]:
    out = []
    for index, (prompt, reply) in enumerate(examples):
        e = policy.encode_prompt_response(tokenizer, prompt, reply, model_cfg.max_length, model_cfg.max_reply_tokens)
        out.append(Example(e.input_ids, e.prompt_tokens, e.cut, index))
    cut = sum(e.cut for e in out)
    log(f"{source}: {cut} of {len(out)} examples cut to model.max_length={model_cfg.max_length} "
        "(prompt from the left, then the reply from the right; none dropped)")
    return out


def epoch_batches(examples: list[Example], batch_size: int, seed: int, epoch: int,
                  packing: bool, max_length: int) -> list[list[list[int]]]:
    """Batches of rows of example indices. Unpacked, a row is one example and rows are bucketed
    by length (shuffled, sorted within windows of 50 batches, batches shuffled); packed, rows are
    filled first-fit-decreasing up to max_length. Deterministic in (seed, epoch) for resume."""
    rng = random.Random(seed * 100_003 + epoch)
    order = list(range(len(examples)))
    rng.shuffle(order)
    if packing:
        rows, room = [], []
        for i in sorted(order, key=lambda i: -examples[i].num_tokens):
            n = examples[i].num_tokens
            slot = next((r for r, free in enumerate(room) if free >= n), None)
            if slot is None:
                rows.append([i])
                room.append(max_length - n)
            else:
                rows[slot].append(i)
                room[slot] -= n
        rng.shuffle(rows)
    else:
        rows, window = [], batch_size * 50
        for start in range(0, len(order), window):
            rows += [[i] for i in sorted(order[start:start + window], key=lambda i: examples[i].num_tokens)]
    batches = [rows[i:i + batch_size] for i in range(0, len(rows), batch_size)]
    if not packing:
        rng.shuffle(batches)
    return batches


# ---- loss -----------------------------------------------------------------------------------

def reply_nll(model, examples: list[Example], tokens_per_forward: int) -> tuple[torch.Tensor, int]:
    """Summed negative log-likelihood of the examples' reply tokens, and their count.

    Through ``sharing.policy_logps``: each example attends to itself only, examples one after
    another in a row without padding where the model allows (CPU), else packed into masked rows;
    the output layer runs at reply tokens only, in chunks, so the (tokens x vocabulary) logits are
    never held whole. Prompt tokens carry no loss."""
    logps = sharing.policy_logps(model, [e.input_ids for e in examples], [e.prompt_tokens for e in examples],
                                 tokens_per_forward=tokens_per_forward)
    return -logps.values.sum(), len(logps.values)


# ---- setup / fit / evaluate / save -----------------------------------------------------------

@dataclass
class Run:
    config: SFTConfig
    engine: training.Engine
    model: torch.nn.Module
    tokenizer: object
    train_examples: list[Example]
    dev_examples: list[Example]
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    total_steps: int
    batches_per_epoch: int
    start_step: int = 0


def setup(config: SFTConfig) -> Run:
    train = config.train
    engine = training.Engine(train.output_dir, train.grad_accum, train.max_grad_norm, train.bf16,
                             train.batch_size, train.log_with)
    log = engine.log
    if engine.num_processes > 1:
        log(engine.describe())
    training.seed_everything(train.seed)
    if not config.data.train:
        raise ValueError("data.train is not set: give a training file, e.g. data.train=chats.jsonl")
    resume_from = engine.start(train.resume, train.overwrite)
    model, tokenizer = policy.load_policy(str(resume_from) if resume_from else config.model.name,
                                          lora=config.model.lora(), dropout=config.model.dropout)
    if train.gradient_checkpointing:
        models.enable_checkpointing(model)
    if config.data.packing and (unmasked := sharing.unmasked_layers(model.config)):
        raise ValueError(f"data.packing=true needs a model whose layers all attend through a mask; "
                         f"{config.model.name} has {unmasked} layers, which ignore it, so packed "
                         f"examples would see each other: set data.packing=false")
    examples = read_examples(config.data.train, config.data, log, "train", train.seed)
    if config.data.limit and config.data.limit < len(examples):
        log(f"{config.data.train}: using the first {config.data.limit} of {len(examples)} examples (data.limit)")
        examples = examples[:config.data.limit]
    train_examples = encode_examples(examples, tokenizer, config.model, config.data.train, log)
    dev_examples = (encode_examples(read_examples(config.data.dev, config.data, log, "dev"), tokenizer, config.model,
                                    config.data.dev, log) if config.data.dev else [])
    batches = epoch_batches(train_examples, train.batch_size, train.seed, 0, config.data.packing,
                            config.model.max_length)
    if config.data.packing:
        log(f"packing: {len(train_examples)} examples in {sum(len(b) for b in batches)} rows of up to "
            f"{config.model.max_length} tokens")
    total_steps = train.max_steps or math.ceil(train.epochs * len(batches) / train.grad_accum)
    optimizer, scheduler = training.optimizer_and_scheduler(
        model, train.lr, train.weight_decay, train.schedule, train.warmup_ratio, total_steps)
    model, optimizer = engine.prepare(model, optimizer)
    if train.log_with:
        engine.accelerator.init_trackers("sft", config=cfg_lib.flat_dict(config))
    run = Run(config, engine, model, tokenizer, train_examples, dev_examples, optimizer, scheduler,
              total_steps, len(batches))
    if resume_from:
        run.start_step = engine.restore(resume_from, model, optimizer, scheduler)["step"]
        log(f"resumed from {resume_from} at step {run.start_step} of {total_steps}")
    return run


def fit(run: Run) -> dict:
    """The training loop: gradient accumulation, clipping, logging, evaluation, checkpoints.

    The loss is the mean over every reply token of the optimizer step's whole batch, all its
    micro-batches and processes together (as transformers >= 4.46): a micro-batch of long
    replies weighs more than one of short replies, as it would in one big batch."""
    config, engine, model, train = run.config, run.engine, run.model, run.config.train
    cached: dict[int, list] = {}
    last_eval: dict = {}
    if run.dev_examples and run.start_step == 0:
        last_eval = evaluate(run)
        engine.write_metrics({"step": 0, **{f"dev_{k}": v for k, v in last_eval.items()}})
    recent: list[float] = []
    bar = engine.progress(run.start_step, run.total_steps, "sft")
    model.train()
    for step in bar:
        started = time.perf_counter()
        window = []  # the step's micro-batches: rows of examples
        for micro in range(train.grad_accum):
            epoch, position = divmod(step * train.grad_accum + micro, run.batches_per_epoch)
            if epoch not in cached:
                cached = {epoch: epoch_batches(run.train_examples, train.batch_size, train.seed, epoch,
                                               config.data.packing, config.model.max_length)}
            window.append([[run.train_examples[i] for i in row] for row in cached[epoch][position]])
        window_tokens = sum(e.reply_tokens for rows in window for row in rows for e in row)
        step_nll, step_rows = 0.0, 0
        for rows in window:
            mine, weight = engine.share(rows)
            with engine.accumulate(model):
                with engine.autocast():
                    nll, count = reply_nll(model, [e for row in mine for e in row], train.tokens_per_forward)
                if not torch.isfinite(nll):
                    records = [e.record_index for row in mine for e in row]
                    raise FloatingPointError(f"non-finite loss {nll.item()} at step {step + 1}, examples {records}; "
                                             f"the last good checkpoint is in {train.output_dir}/{CHECKPOINTS}")
                # backward divides by grad_accum, and the processes' gradients are averaged:
                # scaled back, the gradient is the window's summed NLL over its token count.
                scale = train.grad_accum * engine.num_processes / max(window_tokens, 1)
                engine.backward(nll * scale * (weight > 0))
            step_nll += nll.item() * (weight > 0)
            step_rows += len(mine) * (weight > 0)
        grad_norm = engine.step(model, run.optimizer, run.scheduler, step)

        step_loss = engine.reduce_sum(step_nll) / max(window_tokens, 1)
        recent = (recent + [step_loss])[-20:]
        seconds = time.perf_counter() - started
        entry = {"step": step + 1, "loss": step_loss, "lr": run.scheduler.get_last_lr()[0],
                 "grad_norm": grad_norm, "reply_tokens": window_tokens, "rows": int(engine.reduce_sum(step_rows)),
                 "seconds": seconds, "reply_tokens_per_s": window_tokens / seconds}
        if step == run.start_step:  # which fast paths this launch config got
            entry["paths"] = training.fast_paths()
            engine.log(f"forward: {', '.join(entry['paths'])} ({engine.describe()})")
        postfix = {"loss": f"{sum(recent) / len(recent):.3f}"}
        done = step + 1 == run.total_steps
        if run.dev_examples and ((train.eval_every and (step + 1) % train.eval_every == 0) or done):
            last_eval = evaluate(run)
            entry.update({f"dev_{k}": v for k, v in last_eval.items()})
            postfix["dev_loss"] = f"{last_eval['loss']:.3f}"
            model.train()
        bar.set_postfix(postfix)
        engine.write_metrics(entry)
        if (train.save_every and (step + 1) % train.save_every == 0) or done:
            save_checkpoint(run, step + 1)
    bar.close()
    return last_eval


@torch.inference_mode()
def evaluate(run: Run) -> dict:
    """Response-only loss (mean NLL per reply token) and perplexity on data.dev; each process
    scores its share (all of it when the model is sharded: every process runs each forward)."""
    engine = run.engine
    run.model.eval()
    examples = sorted(run.dev_examples, key=lambda e: e.num_tokens)
    mine = examples if engine.sharded else engine.mine(examples)
    model = run.model if engine.sharded else engine.unwrap(run.model)
    # Forwards of about eval_batch_tokens tokens, examples of similar length together.
    nll, count = reply_nll(model, mine, run.config.train.eval_batch_tokens) if mine else (torch.zeros(()), 0)
    total = nll.item()
    if not engine.sharded:
        total, count = engine.reduce_sum(total), int(engine.reduce_sum(count))
    loss = total / max(count, 1)
    return {"loss": loss, "perplexity": math.exp(min(loss, 50)), "reply_tokens": count,
            "examples": len(examples)}


def metadata(config: SFTConfig, result: dict | None = None) -> dict:
    out = {"chatrlhf_version": __import__("chatrlhf").__version__, "kind": "policy", "recipe": "sft",
           "base_model": models.resolve(config.model.name), "max_length": config.model.max_length,
           "config": cfg_lib.to_dict(config)}
    if result:
        out["eval"] = result
    return out


def save_checkpoint(run: Run, step: int) -> None:
    run.engine.save_checkpoint(step, run.model, run.tokenizer, metadata(run.config), run.optimizer,
                               run.scheduler, run.config.train.keep_checkpoints)


def train(config: SFTConfig) -> dict:
    """setup -> fit -> evaluate -> save; returns the final dev metrics (empty without dev data)."""
    run = setup(config)
    result = fit(run) if run.start_step < run.total_steps else (evaluate(run) if run.dev_examples else {})
    folder = run.engine.save_final(run.model, run.tokenizer, metadata(config, result))
    run.engine.end()
    if run.engine.is_main:
        print(f"saved policy to {folder}")
        if result:
            print(f"dev response-only loss {result['loss']:.4f} (perplexity {result['perplexity']:.2f}) "
                  f"on {result['reply_tokens']} reply tokens of {result['examples']} examples")
    return result


"""Direct preference optimisation from comparisons: DPO, cDPO, IPO, and Plackett-Luce for rankings.

    chatrlhf dpo configs/dpo_hh_smollm2.yaml --report runs/dpo_hh_smollm2/report
    chatrlhf dpo model.name=smollm2-135m data.train=pairs.jsonl data.dev=dev.jsonl loss.type=ipo

The policy learns from the comparisons directly (arXiv 2305.18290); the losses are in losses.py.
Each reply's log-probability is summed over its tokens only (the chat-templated prompt carries no
loss). The reference log-probabilities are computed once, before the first step, and cached in
``OUTPUT/reference_logps.pt``: with LoRA they come from the same model with its adapter disabled
(peft ``disable_adapter()``), so no second model is ever loaded; with full fine-tuning they come
from the policy before its first update, and a resume reads them from the cache.

Evaluation: the implicit reward beta * (log pi - log pi_ref) of every held-out reply orders each
pair or ranking as a reward model would; its preference accuracy has a bootstrap 95% interval
(groups resampled), and ``--report DIR`` writes the reward-model report from those rewards.
Steps: setup -> fit -> evaluate -> save, in plain sight below.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from chatrlhf import config as cfg_lib
from chatrlhf import losses, metrics, models, policy, sharing, training
from chatrlhf.config import DPOConfig, DPOLossConfig
from chatrlhf.data import mixture
from chatrlhf.data.batching import Group, to_groups
from chatrlhf.recipes.sft import epoch_batches
from chatrlhf.training import CHECKPOINTS

REFERENCE_FILE = "reference_logps.pt"

# The settings (DPOConfig and its sections) are in config.py; the `dpo` command is in cli.py.

# ---- data -----------------------------------------------------------------------------------

@dataclass
class Item:
    """A group (prompt, K replies, human ranks), its encoded replies and their reference log-probs."""

    group: Group
    encoded: list[policy.Encoded]
    reference_logps: list[float] | None = None

    @property
    def num_tokens(self) -> int:
        return sum(len(e.input_ids) for e in self.encoded)


def load_items(path: str, config: DPOConfig, tokenizer, training_file: bool, log=print) -> list[Item]:
    """Read, group, filter and encode one file, reporting everything dropped or cut."""
    data, loss = config.data, config.loss
    # One file, or a mixture of sources with their own options, cuts and weights (data/mixture.py).
    records = mixture.load_mixture(path, data, "train" if training_file else "dev", config.train.seed, log=log).units
    if training_file and data.limit and data.limit < len(records):
        log(f"{path}: using the first {data.limit} of {len(records)} records (data.limit)")
        records = records[:data.limit]
    groups = to_groups(records, "comparisons")
    if training_file:
        tied = [g for g in groups if len(set(g.ranks)) < len(g.ranks)]
        if loss.type != "plackett_luce" and any(len(g.ranks) > 2 for g in groups):
            raise ValueError(f"{path}: has rankings of more than 2 replies; use loss.type=plackett_luce "
                             "(or turn them into pairs with `chatrlhf data convert`)")
        if tied and (loss.type != "plackett_luce" or loss.drop_ties):
            groups = [g for g in groups if len(set(g.ranks)) == len(g.ranks)]
            log(f"{path}: excluded {len(tied)} groups with tied replies ("
                + ("loss.drop_ties" if loss.drop_ties else f"loss.type={loss.type} has no tie model") + ")")
        elif tied:
            log(f"{path}: {len(tied)} groups with tied replies use the Breslow tie model")
    if not groups:
        raise ValueError(f"{path}: no usable pairs or rankings")
    items = [Item(g, policy.encode_group(tokenizer, g.prompt, g.replies, config.model.max_length,
                                         config.model.max_reply_tokens)) for g in groups]
    cut = sum(e.cut for item in items for e in item.encoded)
    log(f"{path}: {len(items)} groups, {sum(len(i.encoded) for i in items)} replies; {cut} cut to "
        f"model.max_length={config.model.max_length} (a group's prompt cut alike from the left, none dropped)")
    return items


# ---- log-probabilities ----------------------------------------------------------------------

def item_logps(model, items: list[Item], average: bool, tokens_per_forward: int) -> torch.Tensor:
    """(sum K,) the summed (or per-token mean) log-probabilities of the items' replies, each
    group's prompt computed once and the output layer at reply tokens only
    (``sharing.policy_logps``, the forward SFT and GRPO use too)."""
    encoded = [e for item in items for e in item.encoded]
    logps = sharing.policy_logps(model, [e.input_ids for e in encoded], [e.prompt_tokens for e in encoded],
                                 [len(item.encoded) for item in items], tokens_per_forward=tokens_per_forward)
    return logps.means() if average else logps.sums()


@torch.inference_mode()
def score_items(model, items: list[Item], average: bool, batch_tokens: int, desc: str) -> list[list[float]]:
    """Log-probabilities of every reply of every item, in batches of about ``batch_tokens``
    tokens of groups of similar length."""
    model.eval()
    order = sorted(range(len(items)), key=lambda i: items[i].num_tokens)
    batches, current, tokens = [], [], 0
    for i in order:
        if current and tokens + items[i].num_tokens > batch_tokens:
            batches.append(current)
            current, tokens = [], 0
        current.append(i)
        tokens += items[i].num_tokens
    batches += [current] if current else []
    out: list[list[float]] = [[] for _ in items]
    for batch in tqdm(batches, desc=desc, dynamic_ncols=True, leave=False):
        values = iter(item_logps(model, [items[i] for i in batch], average, batch_tokens).tolist())
        for i in batch:
            out[i] = [next(values) for _ in items[i].encoded]
    return out


def reference_context(model):
    """With LoRA the base model, i.e. the adapter disabled, is the reference."""
    return model.disable_adapter() if hasattr(model, "peft_config") else nullcontext()


def cache_key(config: DPOConfig) -> str:
    """What the cached reference log-probabilities depend on: model, files, encoding, averaging."""
    stamps = mixture.fingerprint(config.data, config.train.seed)  # every source, its settings and file
    parts = [models.resolve(config.model.name), stamps, config.model.max_length, config.model.max_reply_tokens,
             config.loss.average_logps, config.data.limit, config.data.fields, config.data.reader,
             config.loss.type, config.loss.drop_ties, __import__("chatrlhf").__version__]
    return hashlib.sha256(json.dumps(parts, default=str).encode()).hexdigest()


def attach_reference(run: "Run", fresh_start: bool) -> None:
    """Fill every item's reference_logps: from the cache, else computed once (each process its
    share of the items) and cached."""
    config, engine = run.config, run.engine
    cache = Path(config.train.output_dir) / REFERENCE_FILE
    key = cache_key(config)
    cached = torch.load(cache, weights_only=True) if cache.exists() else None
    if cached and cached["key"] == key and len(cached["train"]) == len(run.train_items) \
            and len(cached["dev"]) == len(run.dev_items):
        engine.log(f"reference log-probabilities read from {cache}")
        train_ref, dev_ref = cached["train"], cached["dev"]
    else:
        reference, source = run.model, "the policy before training"
        if hasattr(training.inner(run.model), "peft_config"):
            source = "the model with its LoRA adapter disabled"
        elif not fresh_start:
            # Full fine-tuning resumed without a cache: the original weights are the reference.
            reference, _ = policy.load_policy(config.model.name)
            reference.to(engine.device)
            source = f"{config.model.name} loaded as a separate reference"
        engine.log(f"computing reference log-probabilities once, from {source}")
        args = (config.loss.average_logps, config.train.eval_batch_tokens)
        with reference_context(training.inner(reference)):
            train_ref = engine.each_share(reference, run.train_items, lambda model, share: score_items(
                model, share, *args, desc="reference (train)"))
            dev_ref = engine.each_share(reference, run.dev_items, lambda model, share: score_items(
                model, share, *args, desc="reference (dev)"))
        if engine.is_main:
            cache.parent.mkdir(parents=True, exist_ok=True)
            staging = cache.with_name(cache.name + ".tmp")
            torch.save({"key": key, "train": train_ref, "dev": dev_ref}, staging)
            staging.replace(cache)  # atomic: a kill never leaves half a cache
    for item, values in zip(run.train_items, train_ref):
        item.reference_logps = values
    for item, values in zip(run.dev_items, dev_ref):
        item.reference_logps = values


# ---- setup ----------------------------------------------------------------------------------

@dataclass
class Run:
    config: DPOConfig
    engine: training.Engine
    model: torch.nn.Module
    tokenizer: object
    train_items: list[Item]
    dev_items: list[Item]
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    total_steps: int
    batches_per_epoch: int
    start_step: int = 0
    dev_rewards: list[list[float]] | None = None  # of the latest evaluate(), for the report


def setup(config: DPOConfig) -> Run:
    train = config.train
    engine = training.Engine(train.output_dir, train.grad_accum, train.max_grad_norm, train.bf16,
                             train.batch_size, train.log_with)
    log = engine.log
    if engine.num_processes > 1:
        log(engine.describe())
    training.seed_everything(train.seed)
    if not config.data.train:
        raise ValueError("data.train is not set: give a file of pairs or rankings, e.g. data.train=pairs.jsonl")
    resume_from = engine.start(train.resume, train.overwrite)
    model, tokenizer = policy.load_policy(str(resume_from) if resume_from else config.model.name,
                                          lora=config.model.lora(), dropout=config.model.dropout)
    if train.gradient_checkpointing:
        models.enable_checkpointing(model)
    train_items = load_items(config.data.train, config, tokenizer, True, log)
    dev_items = load_items(config.data.dev, config, tokenizer, False, log) if config.data.dev else []
    batches_per_epoch = math.ceil(len(train_items) / train.batch_size)
    total_steps = train.max_steps or math.ceil(train.epochs * batches_per_epoch / train.grad_accum)
    optimizer, scheduler = training.optimizer_and_scheduler(
        model, train.lr, train.weight_decay, train.schedule, train.warmup_ratio, total_steps)
    model, optimizer = engine.prepare(model, optimizer)
    if train.log_with:
        engine.accelerator.init_trackers("dpo", config=cfg_lib.flat_dict(config))
    run = Run(config, engine, model, tokenizer, train_items, dev_items, optimizer, scheduler, total_steps,
              batches_per_epoch)
    attach_reference(run, fresh_start=resume_from is None)
    if resume_from:
        run.start_step = engine.restore(resume_from, model, optimizer, scheduler)["step"]
        log(f"resumed from {resume_from} at step {run.start_step} of {total_steps}")
    return run


# ---- fit ------------------------------------------------------------------------------------

def preference_loss(policy_logps: torch.Tensor, reference_logps: torch.Tensor, ranks: torch.Tensor,
                    group_sizes: list[int], loss: DPOLossConfig) -> torch.Tensor:
    """(G,) per-group losses of the configured type. Pairs are laid out [better, worse]."""
    if loss.type == "plackett_luce":
        return losses.plackett_luce_loss(policy_logps, reference_logps, ranks, group_sizes, loss.beta)
    # Pairs: put the preferred reply first whatever the record's order.
    first_better = (ranks[0::2] < ranks[1::2])
    chosen = [torch.where(first_better, t[0::2], t[1::2]) for t in (policy_logps, reference_logps)]
    rejected = [torch.where(first_better, t[1::2], t[0::2]) for t in (policy_logps, reference_logps)]
    if loss.type == "ipo":
        return losses.ipo_loss(chosen[0], rejected[0], chosen[1], rejected[1], loss.beta)
    return losses.dpo_loss(chosen[0], rejected[0], chosen[1], rejected[1], loss.beta, loss.label_smoothing)


def fit(run: Run) -> dict:
    """The training loop: gradient accumulation, clipping, logging, evaluation, checkpoints."""
    config, engine, model, train = run.config, run.engine, run.model, run.config.train
    beta = config.loss.beta
    cached: dict[int, list] = {}
    last_eval: dict = {}
    # No evaluation before the first step: the policy is then the reference, every implicit
    # reward is 0 and the accuracy is exactly 0.5.
    recent_loss, recent_correct, recent_total = [], 0, 0
    bar = engine.progress(run.start_step, run.total_steps, f"dpo ({config.loss.type})")
    model.train()
    for step in bar:
        started = time.perf_counter()
        step_loss, step_margin, tokens, pairs = 0.0, 0.0, 0, 0
        for micro in range(train.grad_accum):
            epoch, position = divmod(step * train.grad_accum + micro, run.batches_per_epoch)
            if epoch not in cached:
                # Length-bucketed as in SFT (unpacked): one row per group.
                rows = epoch_batches(run.train_items, train.batch_size, train.seed, epoch, False, 0)
                cached = {epoch: [[row[0] for row in batch] for batch in rows]}
            # This process's share of the groups, weighted so that the gradient is the whole
            # micro-batch's mean (Engine.share).
            mine, weight = engine.share(cached[epoch][position])
            items = [run.train_items[i] for i in mine]
            with engine.accumulate(model):
                with engine.autocast():
                    policy_logps = item_logps(model, items, config.loss.average_logps, train.tokens_per_forward)
                reference_logps = torch.tensor([r for item in items for r in item.reference_logps], device=engine.device)
                ranks = torch.tensor([k for item in items for k in item.group.ranks], device=engine.device)
                sizes = [len(item.encoded) for item in items]
                loss = preference_loss(policy_logps.float(), reference_logps, ranks, sizes, config.loss).mean()
                if not torch.isfinite(loss):
                    records = [item.group.record_index for item in items]
                    raise FloatingPointError(f"non-finite loss {loss.item()} at step {step + 1}, records {records}; "
                                             f"the last good checkpoint is in {train.output_dir}/{CHECKPOINTS}")
                engine.backward(loss * weight)
            step_loss += loss.item() * weight / train.grad_accum
            if not weight:
                continue
            tokens += sum(item.num_tokens for item in items)
            rewards = (beta * (policy_logps.detach().float() - reference_logps)).tolist()
            start = 0
            for item, size in zip(items, sizes):
                c, w, _ = metrics.pairwise_outcomes(rewards[start:start + size], item.group.ranks)
                recent_correct, recent_total = recent_correct + c, recent_total + c + w
                if size == 2 and item.group.ranks[0] != item.group.ranks[1]:
                    sign = 1 if item.group.ranks[0] < item.group.ranks[1] else -1
                    step_margin += sign * (rewards[start] - rewards[start + 1])
                    pairs += 1
                start += size
        grad_norm = engine.step(model, run.optimizer, run.scheduler, step)
        # The whole batch's figures (each process counted its share).
        step_loss = engine.reduce_sum(step_loss) / engine.num_processes
        tokens, pairs = int(engine.reduce_sum(tokens)), int(engine.reduce_sum(pairs))
        step_margin = engine.reduce_sum(step_margin) / max(pairs, 1)

        recent_loss = (recent_loss + [step_loss])[-20:]
        seconds = time.perf_counter() - started
        entry = {"step": step + 1, "loss": step_loss, "lr": run.scheduler.get_last_lr()[0],
                 "grad_norm": grad_norm, "reward_margin": step_margin, "seconds": seconds,
                 "tokens": tokens, "tokens_per_s": tokens / seconds}
        if step == run.start_step:  # which fast paths this launch config got
            entry["paths"] = training.fast_paths()
            engine.log(f"forward: {', '.join(entry['paths'])} ({engine.describe()})")
        postfix = {"loss": f"{sum(recent_loss) / len(recent_loss):.3f}"}
        if recent_total:
            entry["train_accuracy"] = recent_correct / recent_total  # the main process's share
            postfix["acc"] = f"{recent_correct / recent_total:.3f}"
            recent_correct, recent_total = recent_correct // 2, recent_total // 2  # a decaying window
        done = step + 1 == run.total_steps
        if run.dev_items and ((train.eval_every and (step + 1) % train.eval_every == 0) or done):
            last_eval = evaluate(run)
            entry.update({f"dev_{k}": v for k, v in last_eval.items()})
            postfix["dev_acc"] = f"{last_eval['accuracy']:.3f}"
            model.train()
        bar.set_postfix(postfix)
        engine.write_metrics(entry)
        if (train.save_every and (step + 1) % train.save_every == 0) or done:
            save_checkpoint(run, step + 1)
    bar.close()
    return last_eval


# ---- evaluate -------------------------------------------------------------------------------

def implicit_rewards(run: Run, items: list[Item]) -> list[list[float]]:
    """beta * (log pi - log pi_ref) of every reply of every item."""
    args = (run.config.loss.average_logps, run.config.train.eval_batch_tokens)
    logps = run.engine.each_share(run.model, items, lambda model, share: score_items(
        model, share, *args, desc="implicit rewards"))
    beta = run.config.loss.beta
    return [[beta * (p - r) for p, r in zip(ps, item.reference_logps)] for ps, item in zip(logps, items)]


def evaluate(run: Run, rewards: list[list[float]] | None = None) -> dict:
    """Preference accuracy of the implicit rewards on data.dev, with a bootstrap 95% interval."""
    rewards = rewards if rewards is not None else implicit_rewards(run, run.dev_items)
    run.dev_rewards = rewards
    ranks = [item.group.ranks for item in run.dev_items]
    result = metrics.summarize(rewards, ranks)
    # Seed 0, as `--report` and `reward eval --report`: the same rewards give the same interval.
    low, high = metrics.group_metric_intervals(rewards, ranks)["accuracy"]
    result["accuracy_low"], result["accuracy_high"] = low, high
    strict, _ = metrics.ordered_margins(rewards, ranks)
    result["reward_margin"] = sum(strict) / len(strict) if strict else math.nan
    return result


# ---- save -----------------------------------------------------------------------------------

def metadata(config: DPOConfig, result: dict | None = None) -> dict:
    out = {"chatrlhf_version": __import__("chatrlhf").__version__, "kind": "policy", "recipe": "dpo",
           "base_model": models.resolve(config.model.name), "max_length": config.model.max_length,
           "max_reply_tokens": config.model.max_reply_tokens, "beta": config.loss.beta,
           "config": cfg_lib.to_dict(config)}
    if result:
        out["eval"] = result
    return out


def save_checkpoint(run: Run, step: int) -> None:
    run.engine.save_checkpoint(step, run.model, run.tokenizer, metadata(run.config), run.optimizer,
                               run.scheduler, run.config.train.keep_checkpoints)


def format_result(result: dict) -> str:
    return (f"dev implicit-reward accuracy {result['accuracy']:.4f} (95% interval {result['accuracy_low']:.4f}"
            f"-{result['accuracy_high']:.4f}) on {result['pairs']} pairs"
            + (f"; {result['human_ties']} human ties not counted" if result.get("human_ties") else "")
            + f"; mean reward margin {result['reward_margin']:.4f}")


def train(config: DPOConfig, report: str | None = None) -> dict:
    """setup -> fit -> evaluate -> save (-> report); returns the final dev metrics."""
    run = setup(config)
    if report and not run.dev_items:
        raise ValueError("--report needs held-out data: set data.dev")
    result = fit(run) if run.start_step < run.total_steps else (evaluate(run) if run.dev_items else {})
    folder = run.engine.save_final(run.model, run.tokenizer, metadata(config, result))
    run.engine.end()
    if not run.engine.is_main:
        return result
    print(f"saved policy to {folder}")
    if result:
        print(format_result(result))
    if report:
        from chatrlhf import report as report_lib

        rewards = run.dev_rewards or implicit_rewards(run, run.dev_items)
        report_lib.write_report([item.group for item in run.dev_items], rewards, metrics.summarize(
            rewards, [item.group.ranks for item in run.dev_items]), report, run.tokenizer,
            title=f"DPO implicit rewards ({config.model.name}, beta {config.loss.beta}) on {config.data.dev}")
    return result


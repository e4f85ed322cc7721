"""Reward models from human comparisons: train, score, evaluate.

    chatrlhf reward train configs/reward_hh_minilm.yaml train.lr=3e-5
    chatrlhf reward score runs/reward/model data.jsonl --output rewards.jsonl
    chatrlhf reward eval runs/reward/model dev.jsonl

Training follows InstructGPT (arXiv 2203.02155, eq. 1): every reply of a group is scored once and
all C(K, 2) pairs of the group come from those K rewards; each group weighs the same. Steps are
setup -> fit -> evaluate -> save, in plain sight below. The same command runs under
``accelerate launch``: each process takes its share of every batch's groups.
"""

from __future__ import annotations

from contextlib import nullcontext
import json
import math
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from chatrlhf import config as cfg_lib
from chatrlhf import encoders, losses, metrics, models, sharing, training
from chatrlhf.config import RewardConfig
from chatrlhf.data import load
from chatrlhf.data.batching import Group, bucketed_batches, collate, to_groups, tokenize_groups
from chatrlhf.data.records import Pair, ScoredSample, kind_of

from chatrlhf.training import CHECKPOINTS


@dataclass
class Run:
    """Everything fit() needs, built by setup()."""

    config: RewardConfig
    engine: training.Engine
    model: torch.nn.Module
    tokenizer: object
    train_groups: list[Group]
    dev_groups: list[Group]
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    total_steps: int
    batches_per_epoch: int
    start_step: int = 0


# ---- data -----------------------------------------------------------------------------------

def load_groups(path: str, config: RewardConfig, tokenizer, limit: int | None = None,
                log=print) -> list[Group]:
    """Read, validate, group and tokenise one file, reporting everything skipped or cut."""
    data = config.data
    loaded = load(path, reader=data.reader, fields=data.fields or None, skip_invalid=data.skip_invalid,
                  nan_as_missing=data.nan_as_missing, allow_empty=data.allow_empty, **data.options)
    log(loaded.summary())
    records = loaded.records[:limit] if limit else loaded.records
    if limit and limit < len(loaded.records):
        log(f"{path}: using the first {limit} of {len(loaded.records)} records (data.limit)")
    groups = to_groups(records, config.loss.objective)
    if config.loss.drop_ties:
        kept = [g for g in groups if not (len(g.ranks) == 2 and g.ranks[0] == g.ranks[1])]
        log(f"{path}: dropped {len(groups) - len(kept)} tied pairs (loss.drop_ties)")
        groups = kept
    if not groups:
        raise ValueError(f"{path}: no usable groups for objective '{config.loss.objective}'")
    cut = tokenize_groups(groups, tokenizer, config.model.max_length, config.model.max_reply_tokens,
                          same_prompt=True)
    replies = sum(len(g.replies) for g in groups)
    log(f"{path}: {len(groups)} groups, {replies} replies; {cut} cut to model.max_length="
        f"{config.model.max_length} (prompt cut from the left, the same for a group's replies; "
        "none dropped)")
    return groups


# ---- setup ----------------------------------------------------------------------------------

def setup(config: RewardConfig) -> Run:
    train = config.train
    engine = training.Engine(train.output_dir, train.grad_accum, train.max_grad_norm, train.bf16,
                             train.batch_size, train.log_with)
    log = engine.log
    if train.bf16 == "auto":
        log(f"train.bf16=auto: bf16 autocast {'on' if engine.bf16 else 'off'} (native bf16 "
            f"{'found' if engine.bf16 else 'not found'} on {engine.device.type})")
    if engine.num_processes > 1:
        log(engine.describe())
    training.seed_everything(train.seed)
    if not config.data.train:
        raise ValueError("data.train is not set: give a training file, e.g. data.train=pairs.jsonl")

    resume_from = engine.start(train.resume, train.overwrite)
    model_source = str(resume_from) if resume_from else config.model.name
    model, tokenizer = models.load_reward_model(model_source, lora=config.model.lora(),
                                                dropout=config.model.dropout)
    if train.gradient_checkpointing:
        models.enable_checkpointing(model)

    train_groups = load_groups(config.data.train, config, tokenizer, config.data.limit, log)
    dev_groups = load_groups(config.data.dev, config, tokenizer, log=log) if config.data.dev else []

    batches_per_epoch = math.ceil(len(train_groups) / train.batch_size)
    total_steps = train.max_steps or math.ceil(train.epochs * batches_per_epoch / train.grad_accum)
    optimizer, scheduler = training.optimizer_and_scheduler(
        model, train.lr, train.weight_decay, train.schedule, train.warmup_ratio, total_steps)
    model, optimizer = engine.prepare(model, optimizer)
    run = Run(config, engine, model, tokenizer, train_groups, dev_groups, optimizer, scheduler,
              total_steps, batches_per_epoch)
    if resume_from:
        run.start_step = engine.restore(resume_from, model, optimizer, scheduler)["step"]
        log(f"resumed from {resume_from} at step {run.start_step} of {total_steps}")
    if train.log_with:
        engine.accelerator.init_trackers("reward", config=cfg_lib.flat_dict(config))
    return run


# ---- fit ------------------------------------------------------------------------------------

def forward_rewards(model, batch: dict, share_prompt: bool = False, pad_id: int = 0,
                    rows_per_forward: int = 0) -> torch.Tensor:
    """(sum K,) float32 rewards of a collated batch.

    ``share_prompt`` runs each group's prompt once (decoders only, see sharing.py). BERT-like
    encoders run padding-free, attention included, and their last layer for the [CLS] token
    only (encoders.py). Other models, with
    ``rows_per_forward`` > 0, run the sequences sorted by length in chunks of that many rows, each
    cut to its own longest sequence: a pair's two replies often differ a lot in length, and
    padding both to the longest of the batch wastes a fifth of the compute on HH.
    """
    if share_prompt and max(batch["group_sizes"]) > 1 and sharing.can_share(training.inner(model)):
        # Through the wrapper's forward (DDP synchronises the gradients, FSDP gathers the weights).
        return training.call_through(model, lambda inner: sharing.shared_prompt_rewards(
            inner, batch["input_ids"], batch["attention_mask"], batch["group_sizes"], pad_id, rows_per_forward))
    names = [k for k in ("input_ids", "attention_mask", "token_type_ids") if k in batch]
    with encoders.packed(model, batch["attention_mask"]) as padding_free:
        if padding_free or not rows_per_forward or rows_per_forward >= len(batch["input_ids"]):
            return model(**{k: batch[k] for k in names}).logits[:, 0].float()
    lengths = batch["attention_mask"].sum(1)
    order = lengths.argsort(stable=True)
    pieces = []
    for rows in order.split(rows_per_forward):
        width = int(lengths[rows].max())
        pieces.append(model(**{k: batch[k][rows, :width] for k in names}).logits[:, 0].float())
    return torch.cat(pieces)[order.argsort()]


def group_loss(rewards: torch.Tensor, batch: dict, config: RewardConfig, tie_nu: float) -> torch.Tensor:
    """Mean loss over the batch's groups, plus the centering term."""
    loss_cfg = config.loss
    if loss_cfg.objective == "regression":
        per_group = losses.score_regression_loss(rewards, batch["scores"])
    else:
        margins = batch["margins"] if loss_cfg.use_margin else None
        per_group = losses.ranking_loss(rewards, batch["ranks"], batch["group_sizes"], margins, tie_nu)
    loss = per_group.mean()
    if loss_cfg.centering:
        loss = loss + losses.centering_loss(rewards, batch["group_sizes"], loss_cfg.centering).mean()
    return loss


def split_rewards(rewards: list[float], group_sizes: list[int]) -> list[list[float]]:
    out, start = [], 0
    for size in group_sizes:
        out.append(rewards[start:start + size])
        start += size
    return out


def fit(run: Run) -> dict:
    """The training loop: gradient accumulation, clipping, logging, evaluation, checkpoints."""
    config, engine, model = run.config, run.engine, run.model
    train = config.train
    has_ties = any(len(set(g.ranks)) < len(g.ranks) for g in run.train_groups)
    # Data without ties trains plain Bradley-Terry (Davidson with nu = 0), see losses.py.
    tie_nu = config.loss.tie_nu if has_ties else 0.0
    pad_id = run.tokenizer.pad_token_id
    epoch_batches: dict[int, list[list[int]]] = {}
    recent_loss, recent_correct, recent_total = [], 0, 0
    last_eval: dict = {}
    bar = engine.progress(run.start_step, run.total_steps, "reward train")
    model.train()
    for step in bar:
        started = time.perf_counter()
        step_loss, tokens, step_pairs, step_groups = 0.0, 0, 0, []
        for micro in range(train.grad_accum):
            index = step * train.grad_accum + micro
            epoch, position = divmod(index, run.batches_per_epoch)
            if epoch not in epoch_batches:
                epoch_batches = {epoch: bucketed_batches(run.train_groups, train.batch_size, train.seed, epoch)}
            # Each process takes its share of the groups, weighted so that the gradient is the
            # whole batch's mean whatever the number of processes (Engine.share).
            mine, weight = engine.share(epoch_batches[epoch][position])
            groups = [run.train_groups[i] for i in mine]
            batch = collate(groups, pad_id)
            batch = {k: v.to(engine.device) if torch.is_tensor(v) else v for k, v in batch.items()}
            tokens += int(batch["attention_mask"].sum()) if weight else 0
            step_pairs += sum(k * (k - 1) // 2 for k in batch["group_sizes"]) if weight else 0
            with engine.accumulate(model):
                with engine.autocast():
                    rewards = forward_rewards(model, batch, train.share_prompt, pad_id, train.rows_per_forward)
                loss = group_loss(rewards, batch, config, tie_nu)
                if not torch.isfinite(rewards).all():
                    raise non_finite("reward", rewards.tolist(), step, groups, run)
                if not torch.isfinite(loss):
                    raise non_finite("loss", loss.item(), step, groups, run)
                engine.backward(loss * weight)
            step_groups += groups
            step_loss += loss.detach() * weight / train.grad_accum
            if config.loss.objective == "comparisons" and weight:
                for r, g in zip(split_rewards(rewards.tolist(), batch["group_sizes"]), groups):
                    c, w, _ = metrics.pairwise_outcomes(r, g.ranks)
                    recent_correct, recent_total = recent_correct + c, recent_total + c + w
        try:
            grad_norm = engine.step(model, run.optimizer, run.scheduler, step)
        except FloatingPointError:
            raise non_finite("gradient norm", "inf/nan", step, step_groups, run) from None
        # The whole batch's loss, tokens and pairs (each process counted its share).
        step_loss = engine.accelerator.reduce(step_loss, "mean").item()
        tokens, step_pairs = int(engine.reduce_sum(tokens)), int(engine.reduce_sum(step_pairs))

        recent_loss = (recent_loss + [step_loss])[-20:]
        seconds = time.perf_counter() - started
        entry = {"step": step + 1, "loss": step_loss, "lr": run.scheduler.get_last_lr()[0],
                 "grad_norm": grad_norm, "seconds": seconds, "tokens": tokens, "pairs": step_pairs,
                 "tokens_per_s": tokens / seconds}
        if step == run.start_step:  # which fast paths this launch config got
            entry["paths"] = training.fast_paths()
            engine.log(f"forward: {', '.join(entry['paths'])} ({engine.describe()})")
        postfix = {"loss": f"{sum(recent_loss) / len(recent_loss):.3f}"}
        if recent_total:
            entry["train_accuracy"] = recent_correct / recent_total
            postfix["acc"] = f"{recent_correct / recent_total:.3f}"
            recent_correct, recent_total = (recent_correct // 2, recent_total // 2)  # a decaying window
        done = step + 1 == run.total_steps
        if run.dev_groups and ((train.eval_every and (step + 1) % train.eval_every == 0) or done):
            last_eval = evaluate(run)
            entry.update({f"dev_{k}": v for k, v in last_eval.items()})
            postfix["dev_acc"] = f"{last_eval.get('accuracy', float('nan')):.3f}"
            model.train()
        bar.set_postfix(postfix)
        engine.write_metrics(entry)
        if (train.save_every and (step + 1) % train.save_every == 0) or done:
            save_checkpoint(run, step + 1)
    bar.close()
    return last_eval


def non_finite(what: str, value, step: int, groups: list[Group], run: Run) -> FloatingPointError:
    """The error that stops a run on a NaN / inf: the step, the records of the batch (0-based
    positions among data.train's loaded records, with the start of their prompt), and where
    the last good checkpoint is (nothing of this step was saved)."""
    records = "; ".join(f"record {g.record_index} (prompt {str(g.prompt)[:40]!r})" for g in groups)
    return FloatingPointError(
        f"non-finite {what} {value} at step {step + 1}, batch of {run.config.data.train}: {records}. "
        f"Nothing of this step was saved; the last good checkpoint is the newest in "
        f"{run.config.train.output_dir}/{CHECKPOINTS} (resume with train.resume=true after fixing the cause)")


# ---- evaluate -------------------------------------------------------------------------------

@torch.inference_mode()
def score_groups(model, groups: list[Group], pad_token_id: int, batch_tokens: int = 16384,
                 progress: bool = False, rows_per_forward: int = 8) -> list[list[float]]:
    """Rewards of every reply of every group, in the groups' order.

    Each reply is scored on its own, except with decoders, which score whole groups, each
    group's shared prompt run once (sharing.py; rewards equal to separate forwards up to
    rounding) in packed forwards of about ``rows_per_forward`` replies, as in training (smollm2
    on 50 HH pairs: 15-16 s against 18 s in one packed forward per batch). BERT-like encoders
    run padding-free (encoders.py). The units are sorted
    by length and batched so that the longest times their number stays within ``batch_tokens``
    (a longer unit alone): padding is small and the batch size adapts to the lengths.
    """
    model.eval()
    share = sharing.can_share(model) and any(len(g.replies) > 1 for g in groups)
    # Other models score a batch of single replies, already sorted by length, in one forward.
    rows = rows_per_forward if share else 0
    if share:  # (unit, the (group, reply) places of its rewards)
        units = [(g, [(gi, ri) for ri in range(len(g.replies))]) for gi, g in enumerate(groups)]
    else:
        units = [(Group(None, [""], [0], input_ids=[ids],
                        token_type_ids=[g.token_type_ids[ri]] if g.token_type_ids else None), [(gi, ri)])
                 for gi, g in enumerate(groups) for ri, ids in enumerate(g.input_ids)]
    units.sort(key=lambda unit: unit[0].num_tokens)
    batches, current = [], []
    for unit in units:
        if current and unit[0].num_tokens * (len(current) + 1) > batch_tokens:
            batches.append(current)
            current = []
        current.append(unit)
    if current:
        batches.append(current)
    out = [[0.0] * len(g.replies) for g in groups]
    device = next(model.parameters()).device
    for batch_units in tqdm(batches, desc="scoring", disable=not progress, dynamic_ncols=True):
        batch = collate([unit for unit, _ in batch_units], pad_token_id)
        batch = {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}
        rewards = forward_rewards(model, batch, share, pad_token_id, rows).tolist()
        places = [place for _, unit_places in batch_units for place in unit_places]
        for (gi, ri), reward in zip(places, rewards):
            out[gi][ri] = reward
    return out


def evaluate(run: Run) -> dict:
    """Dev metrics in float32, also after bf16 training: the saved weights are float32, and
    that is how ``reward eval``, the server and other tools score with them."""
    pad_id, budget = run.tokenizer.pad_token_id, run.config.train.eval_batch_tokens
    rewards = run.engine.each_share(run.model, run.dev_groups,
                                    lambda model, groups: score_groups(model, groups, pad_id, budget))
    result = metrics.summarize(rewards, [g.ranks for g in run.dev_groups])
    flat = [r for group in rewards for r in group]
    result["reward_mean"] = statistics.fmean(flat)
    result["reward_std"] = statistics.pstdev(flat)
    return result


# ---- save -----------------------------------------------------------------------------------

def metadata(config: RewardConfig, result: dict | None = None) -> dict:
    out = {
        "chatrlhf_version": __import__("chatrlhf").__version__,
        "base_model": models.resolve(config.model.name),
        "max_length": config.model.max_length,
        "max_reply_tokens": config.model.max_reply_tokens,
        "config": cfg_lib.to_dict(config),
    }
    if result:
        out["reward_mean"], out["reward_std"] = result.get("reward_mean"), result.get("reward_std")
        out["eval"] = result
    return out


def save_checkpoint(run: Run, step: int) -> None:
    """Model (HF format; LoRA: adapter and head) and training state, written whole or not at all."""
    run.engine.save_checkpoint(step, run.model, run.tokenizer, metadata(run.config), run.optimizer,
                               run.scheduler, run.config.train.keep_checkpoints)


def train(config: RewardConfig) -> dict:
    """setup -> fit -> evaluate -> save; returns the final dev metrics (empty without dev data)."""
    run = setup(config)
    result = fit(run) if run.start_step < run.total_steps else (evaluate(run) if run.dev_groups else {})
    folder = run.engine.save_final(run.model, run.tokenizer, metadata(config, result))
    run.engine.end()
    if run.engine.is_main:
        print(f"saved reward model to {folder}")
        if result:
            print(format_metrics(result, "dev"))
    return result


def format_metrics(result: dict, name: str) -> str:
    parts = [f"{name} accuracy {result['accuracy']:.4f} on {result['pairs']} pairs"]
    if result.get("human_ties"):
        parts.append(f"{result['human_ties']} human ties not counted")
    if "best_vs_worst_accuracy" in result:
        parts.append(f"best-vs-worst {result['best_vs_worst_accuracy']:.4f}")
        parts.append(f"mean Kendall tau {result['mean_kendall_tau']:.4f}")
    return "; ".join(parts)


# ---- score / eval commands ------------------------------------------------------------------
# (Registered with their options in cli.py; the settings, RewardConfig, are in config.py.)

def load_for_scoring(model_path: str, data_path: str, args) -> tuple:
    model, tokenizer = models.load_reward_model(model_path)
    info = models.read_metadata(models.resolve(model_path))
    config = RewardConfig()
    config.model.max_length = args.max_length or info.get("max_length", 512)
    config.model.max_reply_tokens = info.get("max_reply_tokens")
    config.data.reader, config.data.skip_invalid = args.reader, args.skip_invalid
    config.data.nan_as_missing = args.nan_as_missing
    config.data.fields = dict(f.split("=", 1) for f in args.field)
    loaded = load(data_path, reader=args.reader, fields=config.data.fields or None,
                  skip_invalid=args.skip_invalid, nan_as_missing=args.nan_as_missing,
                  allow_empty=args.allow_empty)
    print(loaded.summary(), file=sys.stderr)
    return model, tokenizer, info, config, loaded.records


def score_command(args) -> int:
    model, tokenizer, info, config, records = load_for_scoring(args.model, args.file, args)
    # One group per record, replies in the record's order: [chosen, rejected], the ranking's
    # replies, or the one scored reply.
    groups = []
    for index, record in enumerate(records):
        replies = ([record.chosen, record.rejected] if isinstance(record, Pair)
                   else [record.reply] if isinstance(record, ScoredSample) else record.replies)
        groups.append(Group(record.prompt, replies, [0] * len(replies), record_index=index))
    cut = tokenize_groups(groups, tokenizer, config.model.max_length, config.model.max_reply_tokens)
    rewards = score_groups(model, groups, tokenizer.pad_token_id, args.batch_tokens, progress=True)
    if args.normalize:
        mean, std = info.get("reward_mean"), info.get("reward_std")
        if mean is None or not std:
            raise ValueError(f"{args.model}: no reward_mean/reward_std in {models.METADATA_FILE}; "
                             "train with a dev set to record them")
        rewards = [[(r - mean) / std for r in group] for group in rewards]
    out = open(args.output, "w") if args.output else sys.stdout
    with out if args.output else nullcontext():
        for index, (record, group_rewards) in enumerate(zip(records, rewards)):
            out.write(json.dumps({"record": index, "kind": kind_of(record), "rewards": group_rewards}) + "\n")
    print(f"scored {sum(len(g) for g in rewards)} replies of {len(records)} records"
          f" ({cut} cut to max_length {config.model.max_length})", file=sys.stderr)
    return 0


def eval_command(args) -> int:
    model, tokenizer, info, config, records = load_for_scoring(args.model, args.file, args)
    groups = to_groups(records, "comparisons")
    # Cut as in training (the replies of a group on the same prompt tokens): the accuracy
    # equals the dev accuracy the training run reported.
    cut = tokenize_groups(groups, tokenizer, config.model.max_length, config.model.max_reply_tokens,
                          same_prompt=True)
    rewards = score_groups(model, groups, tokenizer.pad_token_id, args.batch_tokens, progress=True)
    result = metrics.summarize(rewards, [g.ranks for g in groups])
    result["cut_replies"] = cut
    print(format_metrics(result, Path(args.file).name))
    if args.report:
        from chatrlhf import report

        report.write_report(groups, rewards, result, args.report, tokenizer, info,
                            title=f"{args.model} on {args.file}")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    return 0

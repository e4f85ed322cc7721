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
from chatrlhf.data import load, mixture
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
    tie_log_nu: torch.nn.Parameter | None = None  # loss.tie_nu=learn, on data with ties


# ---- data -----------------------------------------------------------------------------------

def load_groups(spec, config: RewardConfig, tokenizer, limit: int | None = None, log=print,
                section: str = "train", account: dict | None = None) -> list[Group]:
    """Read, validate, group and tokenise data.train or data.dev (one file or a mixture of
    sources, data/mixture.py), reporting everything skipped or cut, per source (also into
    ``account``: cut replies per source)."""
    objective = config.loss.objective
    mix = mixture.load_mixture(spec, config.data, section, config.train.seed,
                               "keep" if objective == "regression" else "rank", log)
    name = spec if isinstance(spec, str) else f"data.{section}"
    records, source_of = mix.units, mix.source_of
    if limit and limit < len(records):
        log(f"{name}: using the first {limit} of {len(records)} records (data.limit)")
        records, source_of = records[:limit], source_of[:limit]
    groups = to_groups(records, objective)
    for group in groups:
        group.source = mix.names[source_of[group.record_index]]
    if len(mix.sources) > 1:  # listed (and reported) source by source, in the preset's order
        groups.sort(key=lambda g: source_of[g.record_index])
    if config.loss.drop_ties:
        kept = [g for g in groups if not (len(g.ranks) == 2 and g.ranks[0] == g.ranks[1])]
        log(f"{name}: dropped {len(groups) - len(kept)} tied pairs (loss.drop_ties)")
        groups = kept
    if not groups:
        raise ValueError(f"{name}: no usable groups for objective '{objective}'")
    by_source: dict[str, list[Group]] = {}
    for group in groups:
        by_source.setdefault(group.source, []).append(group)
    cut_by_source = {source: tokenize_groups(mine, tokenizer, config.model.max_length,
                                             config.model.max_reply_tokens, same_prompt=True)
                     for source, mine in by_source.items()}
    cut = sum(cut_by_source.values())
    if account is not None:
        account.update(cut_by_source)
    replies = sum(len(g.replies) for g in groups)
    log(f"{name}: {len(groups)} groups, {replies} replies; {cut} cut to model.max_length="
        f"{config.model.max_length} (prompt cut from the left, the same for a group's replies; "
        "none dropped)")
    if len(mix.sources) > 1:
        for entry in mix.summary:
            mine = by_source.get(entry["name"], [])
            log(f"data.{section} source {entry['name']}: {len(mine)} groups, "
                f"{sum(len(g.replies) for g in mine)} replies, {cut_by_source.get(entry['name'], 0)} "
                f"cut, {entry['skipped']} skipped")
    if section == "train" and config.loss.length_balance:
        balance_lengths(groups, log)
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
    dev_groups = load_groups(config.data.dev, config, tokenizer, log=log, section="dev") if config.data.dev else []

    batches_per_epoch = math.ceil(len(train_groups) / train.batch_size)
    total_steps = train.max_steps or math.ceil(train.epochs * batches_per_epoch / train.grad_accum)
    optimizer, scheduler = training.optimizer_and_scheduler(
        model, train.lr, train.weight_decay, train.schedule, train.warmup_ratio, total_steps)
    tie_log_nu = learned_tie_parameter(config, train_groups, engine, optimizer, log)
    if tie_log_nu is not None:  # one schedule per parameter group: the model's, and a constant one
        warmup = int(train.warmup_ratio * total_steps)
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, [training.lr_lambda(train.schedule, warmup, total_steps), lambda step: 1.0])
    model, optimizer = engine.prepare(model, optimizer)
    run = Run(config, engine, model, tokenizer, train_groups, dev_groups, optimizer, scheduler,
              total_steps, batches_per_epoch, tie_log_nu=tie_log_nu)
    if resume_from:
        state = engine.restore(resume_from, model, optimizer, scheduler)
        run.start_step = state["step"]
        if tie_log_nu is not None and "tie_log_nu" in state:
            with torch.no_grad():
                tie_log_nu.copy_(state["tie_log_nu"])
        log(f"resumed from {resume_from} at step {run.start_step} of {total_steps}")
    if train.log_with:
        engine.accelerator.init_trackers("reward", config=cfg_lib.flat_dict(config))
    return run


# The learned log nu is one number: at the model's learning rate (1e-4 and below) Adam would move
# it by about 0.01 per hundred steps, so it gets its own, constant rate (no warmup or decay).
TIE_LR = 0.02


def learned_tie_parameter(config: RewardConfig, groups: list[Group], engine, optimizer, log):
    """log nu as a parameter of its own optimizer group (loss.tie_nu=learn), or None."""
    if config.loss.tie_nu != "learn":
        return None
    if not any(len(set(g.ranks)) < len(g.ranks) for g in groups):
        log("loss.tie_nu=learn: the training data has no ties; it trains plain Bradley-Terry")
        return None
    if engine.sharded:
        raise ValueError("loss.tie_nu=learn is not supported under DeepSpeed or FSDP yet; give a number")
    log_nu = torch.nn.Parameter(torch.zeros((), device=engine.device))
    optimizer.add_param_group({"params": [log_nu], "lr": TIE_LR, "weight_decay": 0.0})
    log(f"loss.tie_nu=learn: nu starts at 1 and is fitted (Adam, lr {TIE_LR})")
    return log_nu


def balance_lengths(groups: list[Group], log=print) -> None:
    """Weigh groups so that, within each source, "the longer reply wins" holds in half the
    (weighted) pairs (length balancing, Singhal et al. 2023, arXiv 2310.03716).

    A group's share L of its strict pairs won by the longer reply (in characters; equal lengths
    count 1/2) and its source's mean m give the weight L / (2m) + (1 - L) / (2 (1 - m)): weights
    average 1 within each source, and a model cannot lower the weighted loss by preferring length.
    """
    longer: dict[int, float] = {}
    for index, group in enumerate(groups):
        lengths = [len(reply) for reply in group.replies]
        wins = [(lengths[i] > lengths[j]) + 0.5 * (lengths[i] == lengths[j])
                for i in range(len(lengths)) for j in range(len(lengths)) if group.ranks[i] < group.ranks[j]]
        longer[index] = statistics.fmean(wins) if wins else 0.5
    for source in dict.fromkeys(g.source for g in groups):
        mine = [i for i, g in enumerate(groups) if g.source == source]
        m = statistics.fmean(longer[i] for i in mine)
        if not 0 < m < 1:
            log(f"loss.length_balance: {source or 'data.train'}: the longer reply wins in {m:.0%} of "
                "its pairs; nothing to balance")
            continue
        for i in mine:
            groups[i].weight = longer[i] / (2 * m) + (1 - longer[i]) / (2 * (1 - m))
        top = max(groups[i].weight for i in mine)
        log(f"loss.length_balance: {source or 'data.train'}: the longer reply wins in {m:.1%} of its "
            f"pairs; group weights {min(groups[i].weight for i in mine):.2f} to {top:.2f}")


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


def group_loss(rewards: torch.Tensor, batch: dict, config: RewardConfig,
               tie_nu: float | torch.Tensor) -> torch.Tensor:
    """Mean loss over the batch's groups (weighted by loss.length_balance), plus the centering term."""
    loss_cfg = config.loss
    if loss_cfg.objective == "regression":
        per_group = losses.score_regression_loss(rewards, batch["scores"])
    else:
        margins = batch["margins"] if loss_cfg.use_margin else None
        per_group = losses.ranking_loss(rewards, batch["ranks"], batch["group_sizes"], margins, tie_nu)
        if loss_cfg.length_balance:
            per_group = per_group * batch["weights"]
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
    tie_nu = config.loss.tie_nu if has_ties and run.tie_log_nu is None else 0.0
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
                nu = run.tie_log_nu.exp() if run.tie_log_nu is not None else tie_nu
                loss = group_loss(rewards, batch, config, nu)
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
        if run.tie_log_nu is not None and run.tie_log_nu.grad is not None and engine.num_processes > 1:
            # Not a model weight, so DDP does not average its gradient: do it here.
            run.tie_log_nu.grad = engine.accelerator.reduce(run.tie_log_nu.grad, "mean")
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
        if run.tie_log_nu is not None:
            entry["tie_nu"] = float(run.tie_log_nu.detach().exp())
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
    result = summarize_sources(rewards, run.dev_groups)
    flat = [r for group in rewards for r in group]
    result["reward_mean"] = statistics.fmean(flat)
    result["reward_std"] = statistics.pstdev(flat)
    if run.tie_log_nu is not None:
        result["tie_nu"] = float(run.tie_log_nu.detach().exp())
    return result


def summarize_sources(rewards: list[list[float]], groups: list[Group]) -> dict:
    """metrics.summarize over all groups; with several sources also each source's
    (``sources``) and the mean of their accuracies (``source_mean_accuracy``): the pooled
    accuracy weighs a source by its number of pairs, the mean weighs each source the same."""
    result = metrics.summarize(rewards, [g.ranks for g in groups])
    names = list(dict.fromkeys(g.source for g in groups))
    if len(names) > 1:
        result["sources"] = {}
        for name in names:
            mine = [i for i, g in enumerate(groups) if g.source == name]
            result["sources"][name] = metrics.summarize([rewards[i] for i in mine], [groups[i].ranks for i in mine])
        result["source_mean_accuracy"] = statistics.fmean(
            s["accuracy"] for s in result["sources"].values() if not math.isnan(s["accuracy"]))
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
    extra = {"tie_log_nu": run.tie_log_nu.detach().cpu()} if run.tie_log_nu is not None else {}
    run.engine.save_checkpoint(step, run.model, run.tokenizer, metadata(run.config), run.optimizer,
                               run.scheduler, run.config.train.keep_checkpoints, **extra)


def train(config: RewardConfig) -> dict:
    """setup -> fit -> evaluate -> save; returns the final dev metrics (empty without dev data)."""
    run = setup(config)
    result = fit(run) if run.start_step < run.total_steps else (evaluate(run) if run.dev_groups else {})
    info = metadata(config, result)
    if run.tie_log_nu is not None:
        info["tie_nu"] = float(run.tie_log_nu.detach().exp())
    folder = run.engine.save_final(run.model, run.tokenizer, info)
    run.engine.end()
    if run.engine.is_main:
        print(f"saved reward model to {folder}")
        if result:
            print(format_metrics(result, "dev"))
            if "tie_nu" in result:
                print(f"learned tie parameter nu = {result['tie_nu']:.4f}")
    return result


def format_metrics(result: dict, name: str) -> str:
    parts = [f"{name} accuracy {result['accuracy']:.4f} on {result['pairs']} pairs"]
    if result.get("human_ties"):
        parts.append(f"{result['human_ties']} human ties not counted")
    if "best_vs_worst_accuracy" in result:
        parts.append(f"best-vs-worst {result['best_vs_worst_accuracy']:.4f}")
        parts.append(f"mean Kendall tau {result['mean_kendall_tau']:.4f}")
    lines = ["; ".join(parts)]
    for source, figures in result.get("sources", {}).items():
        lines.append(f"  {format_metrics(figures, source)}")
    if "source_mean_accuracy" in result:
        lines.append(f"  mean over {len(result['sources'])} sources: accuracy {result['source_mean_accuracy']:.4f}")
    return "\n".join(lines)


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


def preset_dev_groups(args) -> tuple:
    """A preset's data.dev (one file or a mixture, each source with its own options and cut),
    read and cut as the training run read it, for ``reward eval MODEL preset.yaml``."""
    model, tokenizer = models.load_reward_model(args.model)
    info = models.read_metadata(models.resolve(args.model))
    config = cfg_lib.load(RewardConfig, args.file)
    if not config.data.dev:
        raise ValueError(f"{args.file}: no data.dev to evaluate on")
    config.model.max_length = args.max_length or info.get("max_length", config.model.max_length)
    config.model.max_reply_tokens = info.get("max_reply_tokens", config.model.max_reply_tokens)
    config.loss.objective = "comparisons"
    cut: dict = {}
    groups = load_groups(config.data.dev, config, tokenizer, log=lambda *a: print(*a, file=sys.stderr),
                         section="dev", account=cut)
    return model, tokenizer, info, groups, sum(cut.values())


def eval_command(args) -> int:
    if args.file.endswith((".yaml", ".yml")):
        model, tokenizer, info, groups, cut = preset_dev_groups(args)
    else:
        model, tokenizer, info, config, records = load_for_scoring(args.model, args.file, args)
        groups = to_groups(records, "comparisons")
        # Cut as in training (the replies of a group on the same prompt tokens): the accuracy
        # equals the dev accuracy the training run reported.
        cut = tokenize_groups(groups, tokenizer, config.model.max_length, config.model.max_reply_tokens,
                              same_prompt=True)
    rewards = score_groups(model, groups, tokenizer.pad_token_id, args.batch_tokens, progress=True)
    result = summarize_sources(rewards, groups)
    result["cut_replies"] = cut
    print(format_metrics(result, Path(args.file).name))
    if args.report:
        from chatrlhf import report

        report.write_report(groups, rewards, result, args.report, tokenizer, info,
                            title=f"{args.model} on {args.file}")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    return 0

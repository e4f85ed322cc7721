"""GRPO, Dr. GRPO, RLOO and REINFORCE++ against a reward: critic-free RL, the K replies to a prompt
being their own baseline.

    chatrlhf grpo configs/grpo_hh_smollm2.yaml
    chatrlhf grpo configs/grpo_hh_smollm2.yaml grpo.algorithm=rloo
    chatrlhf grpo configs/grpo_hh_smollm2.yaml --reward-url http://127.0.0.1:8000
    chatrlhf grpo configs/grpo_hh_smollm2.yaml 'reward.functions=[my_rewards:brevity]' 'reward.weights=[1, 0.5]'

Each step, in ``fit`` below (DeepSeekMath, arXiv 2402.03300, algorithm 1, mu = grpo.num_iterations):

1. Sample K = ``grpo.group_size`` replies to each of P = ``grpo.prompts_per_step`` prompts
   (temperature / top-p, at most ``generation.max_new_tokens``, stopping at EOS) with
   ``sampling.sample``: a plain decoding loop in which each prompt's KV cache is computed once and
   repeated K times (``generation.share_prompt_cache``); with LoRA from a copy of the policy with
   its adapter merged in, refreshed before each rollout (``sampling.MergedCopy``). Every reply is
   drawn with its own generator seeded by (train.seed, step, prompt, k), so it is the same reply
   with or without the shared cache (in float32, as on CPU; bf16 rounds the two prefills
   differently), and after a resume.
2. Score them: the weighted sum of a chatrlhf reward model (or a ``chatrlhf serve`` server) and
   Python reward functions ``(prompts, replies) -> rewards`` (``reward.functions``, ``reward.weights``).
3. Advantages per ``grpo.algorithm`` (losses.py, critic-free section): GRPO (r - mean) / std over
   the group; Dr. GRPO r - mean; RLOO r - mean of the other K - 1; REINFORCE++ per-token rewards
   with the KL penalty in them, return-to-go whitened over the batch. Groups whose K rewards are
   all equal give no signal: counted (``zero_signal``).
4. ``grpo.num_iterations`` optimizer steps on the rollout, each over all of it (``train.grad_accum``
   micro-batches of whole groups): the clipped policy-gradient loss, plus ``grpo.beta`` times the
   per-token KL to the frozen reference (GRPO, Dr. GRPO, RLOO), its tokens weighed per
   ``grpo.loss_aggregation`` (losses.aggregate_token_loss). The policy's and the reference's
   log-probabilities of a group's K replies come from one forward with the prompt computed once
   (``sharing.policy_logps``). The log-probabilities at sampling time ("old") are those of the
   first iteration's forward, detached: no update has happened yet, so no extra pass is needed.

Models. The reference is the policy as loaded: with LoRA the policy with its adapter switched off,
else a frozen copy; with ``grpo.beta=0`` it is never run during training (nor loaded, without LoRA).
With LoRA the merged sampling copy is one more backbone in memory (0.5 GB for smollm2-135m in
float32).

Processes. Under ``accelerate launch`` (DDP) each process samples and scores its share of the
step's prompts (whole groups) and the rollout is gathered on every process, so the advantages
(REINFORCE++'s batch whitening included) are those of one process; the log-probabilities and the
updates are split by groups again, each process's loss weighed so that the averaged gradients are
the one-process run's. A reply's seed does not depend on the process that draws it: 1 and 2
processes sample the same replies (tests/test_grpo_engine.py). DeepSpeed and FSDP are refused:
sampling needs the whole policy on each process.

Deliberate simplifications: the
log-probabilities are those of the temperature-scaled distribution, ignoring top-p truncation (as
TRL and PPO here); one optimizer step per iteration over the whole rollout; RLOO and GRPO put the KL
in the loss, REINFORCE++ in the reward (as OpenRLHF).
"""

from __future__ import annotations

import json
import math
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch

from chatrlhf import config as cfg_lib
from chatrlhf import losses, models, policy as policy_lib, sampling, sharing, training
from chatrlhf.config import GRPOConfig
from chatrlhf.recipes import ppo
from chatrlhf.recipes.ppo import PromptItem, RewardFn, load_prompts, seed_of, step_prompts

# ---- rewards --------------------------------------------------------------------------------

def reward_sources(config: cfg_lib.RLRewardConfig, reward_fns: list[RewardFn] | None, device,
                   log=print) -> list[tuple[str, RewardFn, float]]:
    """(name, function, weight) per reward: the model or server first, then ``reward.functions``,
    then the functions passed in Python; the step's reward is their weighted sum."""
    if config.model and config.url:
        raise ValueError("give reward.model or reward.url, not both (--reward-url replaces a preset's model)")
    sources = []
    if config.model or config.url:
        source = ppo.RewardSourceConfig(model=config.model, url=config.url, max_length=config.max_length,
                                        batch_tokens=config.batch_tokens, device=config.device)
        sources.append(("model" if config.model else "server", ppo.reward_scorer(source, None, device, log)))
    sources += [(spec, ppo.reward_function(spec, "reward.functions")) for spec in config.functions]
    sources += [(getattr(fn, "__name__", f"function{i}"), fn) for i, fn in enumerate(reward_fns or [])]
    if not sources:
        raise ValueError("no reward: give reward.model, reward.url (--reward-url) or reward.functions")
    weights = config.weights or [1.0] * len(sources)
    if len(weights) != len(sources):
        raise ValueError(f"reward.weights: {len(weights)} weights for {len(sources)} rewards "
                         f"({', '.join(name for name, _ in sources)})")
    return [(name, fn, float(w)) for (name, fn), w in zip(sources, weights)]


def judge_scorer(config: cfg_lib.RLEvalConfig, device, log=print) -> RewardFn:
    """``eval.judge``: a served model (URL), a reward model folder, or a Python function."""
    spec = config.judge
    if spec.startswith(("http://", "https://")):
        source = ppo.RewardSourceConfig(url=spec)
    elif Path(spec).exists() or ":" not in spec:
        source = ppo.RewardSourceConfig(model=spec, max_length=config.judge_max_length)
    else:
        return ppo.reward_function(spec, "eval.judge")
    log("judge:", end=" ")
    return ppo.reward_scorer(source, None, device, log)


def score(sources, prompts: list, replies: list[str]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """(N,) weighted total reward and each source's own (N,) scores."""
    parts = {name: torch.tensor(fn(prompts, replies), dtype=torch.float32) for name, fn, _ in sources}
    for name, values in parts.items():
        if values.shape != (len(replies),) or not torch.isfinite(values).all():
            raise FloatingPointError(f"reward {name!r} returned {values.tolist()} for {len(replies)} replies")
    return sum(w * parts[name] for name, _, w in sources), parts


# ---- setup ----------------------------------------------------------------------------------

@dataclass
class Run:
    config: GRPOConfig
    engine: training.Engine
    policy: torch.nn.Module
    reference: torch.nn.Module | None  # a frozen copy; None with LoRA (the adapter off) or beta = 0
    tokenizer: object
    rewards: list  # (name, function, weight)
    judge: RewardFn | None
    train_items: list[PromptItem]
    dev_items: list[PromptItem]
    optimizer: torch.optim.Optimizer
    scheduler: object
    stop_ids: list[int]
    sampler: sampling.MergedCopy  # what rollouts sample from: with LoRA the adapter merged in
    start_step: int = 0


def setup(config: GRPOConfig, reward_fns: list[RewardFn] | None = None) -> Run:
    train, grpo = config.train, config.grpo
    engine = training.Engine(train.output_dir, train.grad_accum, train.max_grad_norm, train.bf16, 1, train.log_with)
    log = engine.log
    if engine.sharded:
        raise ValueError(f"chatrlhf grpo runs on one process or under DDP, not {engine.kind}: each process samples "
                         "from the whole policy; launch with configs/accelerate/ddp.yaml")
    if engine.num_processes > 1:
        log(engine.describe())
    if grpo.prompts_per_step < train.grad_accum:
        raise ValueError(f"train.grad_accum={train.grad_accum} splits each rollout's {grpo.prompts_per_step} "
                         "groups into that many micro-batches: it must not be larger")
    if not config.data.train:
        raise ValueError("data.train is not set: give a file of prompts, e.g. data.train=pairs.jsonl")
    training.seed_everything(train.seed)
    rewards = reward_sources(config.reward, reward_fns, engine.device, log)
    judge = judge_scorer(config.eval, engine.device, log) if config.eval.judge else None
    resume_from = engine.start(train.resume, train.overwrite)
    lora = config.policy.lora()
    policy, tokenizer = policy_lib.load_policy(str(resume_from) if resume_from else config.policy.name, lora=lora)
    reference = None
    if grpo.beta and not lora:
        reference, _ = policy_lib.load_policy(config.policy.name)
        reference.requires_grad_(False).eval().to(engine.device)
    train_items = load_prompts(config.data.train, config, tokenizer, config.data.limit, log)
    dev_items = load_prompts(config.data.dev, config, tokenizer, config.data.dev_limit, log) if config.data.dev else []
    optimizer, scheduler = training.optimizer_and_scheduler(
        policy, train.lr, train.weight_decay, train.schedule, train.warmup_ratio, train.steps * grpo.num_iterations)
    stop = policy.generation_config.eos_token_id
    stop_ids = sorted({tokenizer.eos_token_id, *(stop if isinstance(stop, list) else [stop] if stop is not None else [])})
    policy, optimizer = engine.prepare(policy, optimizer)
    run = Run(config, engine, policy, reference, tokenizer, rewards, judge, train_items, dev_items,
              optimizer, scheduler, stop_ids, sampling.MergedCopy(engine.unwrap(policy)))
    if resume_from:
        run.start_step = engine.restore(resume_from, policy, optimizer, scheduler)["step"]
        log(f"resumed from {resume_from} at step {run.start_step} of {train.steps}")
    log(f"{grpo.algorithm}: {grpo.prompts_per_step} prompts x {grpo.group_size} replies per step, "
        f"beta {grpo.beta}, loss aggregation {grpo.aggregation}, {grpo.num_iterations} iteration(s) per rollout")
    if train.log_with:
        engine.accelerator.init_trackers("grpo")
    return run


# ---- rollouts -------------------------------------------------------------------------------

@dataclass
class Rollout:
    """P prompts with K replies each, the K replies of a prompt consecutive (S = P * K)."""

    items: list[PromptItem]  # P
    group_size: int  # K
    sequences: list[list[int]]  # S prompt + reply ids, the reply up to and including its first stop token
    loss_starts: list[int]  # S: where each reply starts
    replies: list[str]
    ended: torch.Tensor  # (S,) whether the reply stopped by itself (False: cut at max_new_tokens)
    scores: torch.Tensor  # (S,) the weighted reward
    parts: dict  # each reward's (S,) scores
    seconds: dict  # generation, scoring

    @property
    def lengths(self) -> list[int]:
        return [len(s) - b for s, b in zip(self.sequences, self.loss_starts)]

    def mask(self) -> torch.Tensor:
        """(S, longest reply) True on reply tokens."""
        lengths = torch.tensor(self.lengths)
        return torch.arange(int(lengths.max())) < lengths[:, None]

    def group(self, g: int) -> dict:
        """Group ``g``'s replies as plain lists (what processes exchange)."""
        rows = slice(g * self.group_size, (g + 1) * self.group_size)
        return {"sequences": self.sequences[rows], "replies": self.replies[rows], "ended": self.ended[rows].tolist(),
                "scores": self.scores[rows].tolist(), "parts": {name: v[rows].tolist() for name, v in self.parts.items()}}


def rollout(run: Run, items: list[PromptItem], group_size: int, seeds: list[int] | None) -> Rollout:
    """Sample, decode and score ``group_size`` replies to each item (``seeds``: one per reply, None:
    greedy). Each process does its share of the items; the rollout is all of them on every process."""
    engine, k = run.engine, group_size
    mine = engine.mine(list(range(len(items))))
    local = _rollout(run, [items[p] for p in mine], k,
                     [seeds[p * k + j] for p in mine for j in range(k)] if seeds is not None else None) if mine else None
    groups = engine.gather([local.group(g) for g in range(len(mine))] if mine else [])
    column = lambda field: [value for group in groups for value in group[field]]  # noqa: E731
    members = [item for item in items for _ in range(k)]
    parts = {name: torch.tensor([v for group in groups for v in group["parts"][name]]) for name in groups[0]["parts"]}
    return Rollout(items, k, column("sequences"), [len(item.input_ids) for item in members], column("replies"),
                   torch.tensor(column("ended")), torch.tensor(column("scores")), parts,
                   local.seconds if local else {"generation": 0.0, "scoring": 0.0})


def _rollout(run: Run, items: list[PromptItem], group_size: int, seeds: list[int] | None) -> Rollout:
    """``rollout`` on this process alone."""
    started = time.perf_counter()
    gen = run.config.generation
    # On CPU bf16 autocast casts every frozen weight again at each decoding step: sampling in float32
    # takes a quarter less time there (smollm2-135m + LoRA, 64 new tokens); the log-probabilities of
    # the update come from their own forward, under the run's precision.
    with run.engine.autocast() if run.engine.device.type != "cpu" else nullcontext():
        reply_ids, ended = sampling.sample(run.sampler.refresh(), [item.input_ids for item in items], group_size,
                                           seeds, run.tokenizer.pad_token_id, run.stop_ids, gen.max_new_tokens,
                                           gen.temperature, gen.top_p, gen.share_prompt_cache,
                                           gen.fast_decoder)
    replies = [run.tokenizer.decode(ids, skip_special_tokens=True).strip() for ids in reply_ids]
    members = [item for item in items for _ in range(group_size)]
    generated = time.perf_counter()
    scores, parts = score(run.rewards, [item.prompt for item in members], replies)
    return Rollout(items, group_size, [item.input_ids + ids for item, ids in zip(members, reply_ids)],
                   [len(item.input_ids) for item in members], replies, ended, scores, parts,
                   {"generation": generated - started, "scoring": time.perf_counter() - generated})


def reply_logps(run: Run, model, rollout: Rollout, rows: list[int], entropy: bool = False) -> sharing.TokenLogps:
    """Log-probabilities of the replies ``rows`` (whole groups), each group's prompt computed once."""
    k = rollout.group_size
    return sharing.policy_logps(
        model, [rollout.sequences[r] for r in rows], [rollout.loss_starts[r] for r in rows],
        [k] * (len(rows) // k) if run.config.train.share_prompt else None,
        temperature=run.config.generation.temperature, entropy=entropy,
        tokens_per_forward=run.config.train.tokens_per_forward)


@torch.no_grad()
def rollout_logps(run: Run, model, rollout: Rollout) -> torch.Tensor:
    """(S, N) ``model``'s log-probabilities of every reply token (0 after a reply's end), each
    process computing its share of the groups."""
    k = rollout.group_size

    def of_groups(model, groups: list[int]) -> list[list[torch.Tensor]]:
        logps, mask = reply_logps(run, model, rollout, [g * k + j for g in groups for j in range(k)]).padded()
        rows = [row[m].float().cpu() for row, m in zip(logps, mask)]
        return [rows[i * k:(i + 1) * k] for i in range(len(groups))]

    with run.engine.autocast():
        rows = [row for group in run.engine.each_share(model, list(range(len(rollout.items))), of_groups) for row in group]
    out = torch.zeros(len(rows), max(len(row) for row in rows), device=run.engine.device)
    for r, row in enumerate(rows):
        out[r, :len(row)] = row
    return out


def reference_logps(run: Run, rollout: Rollout) -> torch.Tensor:
    """(S, N) the reference's log-probabilities of every reply token (0 after a reply's end)."""
    lora = run.reference is None
    with run.engine.unwrap(run.policy).disable_adapter() if lora else nullcontext():
        return rollout_logps(run, run.policy if lora else run.reference, rollout)


# ---- fit ------------------------------------------------------------------------------------

def advantages_of(grpo: cfg_lib.GRPOSection, scores: torch.Tensor, kl: torch.Tensor | None,
                  mask: torch.Tensor) -> torch.Tensor:
    """(S,) one advantage per reply, or (S, N) per token for REINFORCE++."""
    k = grpo.group_size
    if grpo.algorithm == "grpo":
        return losses.group_advantages(scores, k, scale=True)
    if grpo.algorithm == "dr_grpo":
        return losses.group_advantages(scores, k, scale=False)
    if grpo.algorithm == "rloo":
        return losses.rloo_advantages(scores, k)
    return losses.reinforce_pp_advantages(scores, kl if kl is not None else torch.zeros_like(mask, dtype=torch.float32),
                                          mask, grpo.beta)


def grpo_step(run: Run, rollout: Rollout, step: int) -> dict:
    """Advantages, then ``grpo.num_iterations`` optimizer steps over the whole rollout."""
    engine, grpo, train = run.engine, run.config.grpo, run.config.train
    started = time.perf_counter()
    mask, scores = rollout.mask().to(engine.device), rollout.scores.to(engine.device)
    S, k = len(rollout.sequences), rollout.group_size
    reference = reference_logps(run, rollout) if grpo.beta else None
    referenced = time.perf_counter()
    kl_in_reward = grpo.algorithm == "reinforce_pp" and grpo.beta
    old = None
    if kl_in_reward:  # the rewards need the sampling-time log-probabilities before any update
        old = rollout_logps(run, run.policy, rollout)
    kl = losses.kl_penalty(old, reference, grpo.kl_estimator) * mask if kl_in_reward else None
    advantages = advantages_of(grpo, scores, kl, mask)
    groups = list(range(len(rollout.items)))
    chunks = [part.tolist() for part in torch.tensor(groups).tensor_split(train.grad_accum)]  # micro-batches of groups
    tokens = int(mask.sum())
    sampled = torch.zeros(mask.shape, device=engine.device)  # the first iteration's (= sampling-time) log-probabilities
    sums = {"loss": 0.0, "clipped": 0, "entropy": 0.0}
    grad_norms, trained = [], []  # trained: the rows this process computes (its share of each chunk)
    run.policy.train()
    for iteration in range(grpo.num_iterations):
        for chunk in chunks:
            # This process's share of the chunk's groups. The loss is its part of the rollout's
            # loss; the processes' gradients are averaged, hence x num_processes. One left without
            # a group runs the first at weight 0 (every process takes part in each backward).
            mine, weight = engine.share(chunk)
            rows = [g * k + j for g in mine for j in range(k)]
            live = weight > 0
            scale = train.grad_accum * engine.num_processes * live  # backward divides by grad_accum
            if iteration == 0 and live:
                trained += rows
            with engine.accumulate(run.policy):
                with engine.autocast():
                    out = reply_logps(run, run.policy, rollout, rows, entropy=iteration == 0)
                logps, m = out.padded()
                logps, width = logps.float(), logps.shape[1]
                if iteration == 0:
                    sampled[rows, :width] = logps.detach()
                    sums["entropy"] += float(out.entropy.sum()) * live
                old_logps = old[rows, :width] if old is not None else sampled[rows, :width]
                per_token, clipped = losses.clipped_pg_loss(
                    logps, old_logps, advantages[rows] if advantages.dim() == 1 else advantages[rows, :width],
                    grpo.clip_range, reference[rows, :width] if reference is not None and not kl_in_reward else None,
                    grpo.beta, grpo.kl_estimator)
                loss = losses.aggregate_token_loss(per_token, m, grpo.aggregation, run.config.generation.max_new_tokens,
                                                   num_sequences=S, num_tokens=tokens)
                engine.backward(loss * scale)
            sums["loss"] += loss.item() * live
            sums["clipped"] += int((clipped & m).sum()) * live
        grad_norms.append(engine.step(run.policy, run.optimizer, run.scheduler, step))
    done = time.perf_counter()
    sums = {name: engine.reduce_sum(value) for name, value in sums.items()}
    grouped = scores.view(-1, k)
    zero = losses.zero_signal_groups(scores, k)
    entry = {"step": step + 1, "reward": scores.mean().item(), "reward_std": scores.std(unbiased=False).item(),
             "reward_group_std": grouped.std(-1, unbiased=False).mean().item(),
             **({f"reward/{name}": values.mean().item() for name, values in rollout.parts.items()}
                if len(rollout.parts) > 1 else {}),
             "zero_signal": zero.float().mean().item(), "zero_signal_groups": int(zero.sum()),
             "loss": sums["loss"] / grpo.num_iterations, "clip_fraction": sums["clipped"] / (tokens * grpo.num_iterations),
             "entropy": sums["entropy"] / tokens, "response_length": tokens / S,
             "ended": rollout.ended.float().mean().item(), "grad_norm": sum(grad_norms) / len(grad_norms),
             "lr": run.scheduler.get_last_lr()[0]}
    if reference is not None:
        kl = losses.kl_penalty(sampled if old is None else old, reference, "k1") * mask
        entry["kl"] = engine.reduce_sum(kl[trained].sum().item()) / S
    entry.update({f"time_{name}": seconds for name, seconds in rollout.seconds.items()})
    entry.update(time_reference=referenced - started, time_training=done - referenced)
    return entry


def fit(run: Run) -> dict:
    """The loop: rollout -> advantages -> clipped updates -> log, samples, evaluation, checkpoints."""
    engine, train, grpo = run.engine, run.config.train, run.config.grpo
    samples_file = Path(train.output_dir) / "samples.jsonl"
    last_eval = {}
    if run.dev_items and run.start_step == 0:
        last_eval = evaluate(run, 0)
        engine.write_metrics({"step": 0, **{f"eval_{k}": v for k, v in last_eval.items()}})
    bar = engine.progress(run.start_step, train.steps, grpo.algorithm)
    for step in bar:
        started = time.perf_counter()
        items = step_prompts(run.train_items, step, grpo.prompts_per_step, train.seed)
        seeds = [seed_of(train.seed, "reply", step, p, j) for p in range(len(items)) for j in range(grpo.group_size)]
        batch = rollout(run, items, grpo.group_size, seeds)
        entry = grpo_step(run, batch, step)
        for name, fn, _ in run.rewards:
            if hasattr(fn, "cut"):
                entry["reward_inputs_cut"] = fn.cut
        done = step + 1 == train.steps
        if run.dev_items and ((train.eval_every and (step + 1) % train.eval_every == 0) or done):
            last_eval = evaluate(run, step + 1)
            entry.update({f"eval_{k}": v for k, v in last_eval.items()})
        entry["seconds"] = time.perf_counter() - started
        engine.write_metrics(entry)
        if engine.is_main and (step == 0 or (train.sample_every and (step + 1) % train.sample_every == 0)):
            with samples_file.open("a") as f:
                for i in range(min(train.samples, len(batch.replies))):
                    f.write(json.dumps({"step": step + 1, "prompt": batch.items[i // grpo.group_size].prompt,
                                        "reply": batch.replies[i], "score": batch.scores[i].item(),
                                        "ended": bool(batch.ended[i])}) + "\n")
        bar.set_postfix({"reward": f"{entry['reward']:.3f}", "zero_signal": f"{entry['zero_signal']:.2f}"})
        if (train.save_every and (step + 1) % train.save_every == 0) or done:
            save_checkpoint(run, step + 1)
    bar.close()
    return last_eval


# ---- evaluate -------------------------------------------------------------------------------

def mean_sem(values: list[float]) -> tuple[float, float]:
    n = len(values)
    mean = sum(values) / n
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / max(n - 1, 1) / n)


def evaluate(run: Run, step: int) -> dict:
    """One reply per held-out prompt, sampled with the same seed at every evaluation (or greedy),
    scored by the training reward and by ``eval.judge``; KL to the reference where there is one.
    Every reply goes to ``eval_samples.jsonl``."""
    config = run.config
    size = config.grpo.prompts_per_step * config.grpo.group_size
    scores, judged, kls, lengths, rows = [], [], [], [], []
    for start in range(0, len(run.dev_items), size):
        items = run.dev_items[start:start + size]
        seeds = None if config.generation.eval_greedy else [seed_of(config.train.seed, "eval", start + i)
                                                             for i in range(len(items))]
        batch = rollout(run, items, 1, seeds)
        scores += batch.scores.tolist()
        lengths += batch.lengths
        judge = [None] * len(items)
        if run.judge:  # each process judges its share
            mine = run.engine.mine(list(range(len(items))))
            judge = run.engine.gather(list(run.judge([items[i].prompt for i in mine], [batch.replies[i] for i in mine]))
                                      if mine else [])
        judged += judge
        if run.reference is not None or config.policy.lora_r:  # LoRA: the reference is the adapter off
            logps = rollout_logps(run, run.policy, batch)
            kl = losses.kl_penalty(logps, reference_logps(run, batch), "k1") * batch.mask().to(logps.device)
            kls += kl.sum(-1).tolist()
        rows += [{"step": step, "prompt": item.prompt, "reply": reply, "score": s, **({"judge": j} if run.judge else {})}
                 for item, reply, s, j in zip(items, batch.replies, batch.scores.tolist(), judge)]
    if run.engine.is_main:
        Path(config.train.output_dir).mkdir(parents=True, exist_ok=True)
        with (Path(config.train.output_dir) / "eval_samples.jsonl").open("a") as f:
            f.writelines(json.dumps(row) + "\n" for row in rows)
    result = dict(zip(("reward", "reward_sem"), mean_sem(scores)))
    if run.judge:
        result.update(zip(("judge", "judge_sem"), mean_sem(judged)))
    if kls:
        result["kl"] = sum(kls) / len(kls)
    return {**result, "response_length": sum(lengths) / len(lengths), "prompts": len(scores)}


def plot_curves(metrics_file: Path, png: Path) -> None:
    """Rewards (training means; held-out, +- 1 s.e.; the judge's) and KL against the step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [json.loads(line) for line in metrics_file.read_text().splitlines() if line.strip()]
    train_rows, eval_rows = [r for r in rows if "reward" in r], [r for r in rows if "eval_reward" in r]
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    axes[0].plot([r["step"] for r in train_rows], [r["reward"] for r in train_rows], color="0.75", label="training rollouts")
    for key, label in (("reward", "held-out, training reward"), ("judge", "held-out, judge")):
        shown = [r for r in eval_rows if f"eval_{key}" in r]
        if shown:
            axes[0].errorbar([r["step"] for r in shown], [r[f"eval_{key}"] for r in shown],
                             yerr=[r[f"eval_{key}_sem"] for r in shown], marker="o", capsize=3, label=label)
    axes[0].set(xlabel="step", title="mean reward")
    for key, label, rows_of in (("kl", "training rollouts", train_rows), ("eval_kl", "held-out", eval_rows)):
        shown = [r for r in rows_of if key in r]
        axes[1].plot([r["step"] for r in shown], [r[key] for r in shown], marker="o" if key == "eval_kl" else None,
                     label=label)
    zero = [r for r in train_rows if "zero_signal" in r]
    axes[1].plot([r["step"] for r in zero], [r["zero_signal"] for r in zero], linestyle=":", label="zero-signal groups")
    axes[1].set(xlabel="step", title="KL(policy || reference), nats; zero-signal fraction")
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(png, dpi=120)
    plt.close(fig)


# ---- save -----------------------------------------------------------------------------------

def metadata(config: GRPOConfig, result: dict | None = None) -> dict:
    return {"chatrlhf_version": __import__("chatrlhf").__version__, "base_model": models.resolve(config.policy.name),
            "recipe": config.grpo.algorithm, "config": cfg_lib.to_dict(config), "eval": result or {}}


def save_checkpoint(run: Run, step: int) -> None:
    """The policy (a LoRA policy: its adapter), its optimizer, schedule and random states."""
    run.engine.save_checkpoint(step, run.policy, run.tokenizer, metadata(run.config), run.optimizer, run.scheduler,
                               run.config.train.keep_checkpoints)


def train(config: GRPOConfig, reward_fns: list[RewardFn] | None = None) -> dict:
    """setup -> fit -> evaluate -> save; returns the last held-out evaluation ({} without data.dev)."""
    run = setup(config, reward_fns)
    engine = run.engine
    result = fit(run) if run.start_step < config.train.steps else (evaluate(run, run.start_step) if run.dev_items else {})
    folder = engine.save_final(run.policy, run.tokenizer, metadata(config, result))
    engine.end()
    out = Path(config.train.output_dir)
    if engine.is_main:
        print(f"saved the policy to {folder}")
        if (out / "metrics.jsonl").exists():
            plot_curves(out / "metrics.jsonl", out / "curves.png")
        if result:
            judge = f", judge {result['judge']:.4f} +- {result['judge_sem']:.4f}" if "judge" in result else ""
            print(f"held-out mean reward {result['reward']:.4f} +- {result['reward_sem']:.4f}{judge} "
                  f"on {result['prompts']} prompts; curves in {out / 'curves.png'}")
    return result

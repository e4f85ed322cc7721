"""PPO against a reward model: the RLHF loop of InstructGPT (arXiv 2203.02155, section 3.5).

    chatrlhf ppo configs/ppo_hh_smollm2.yaml reward.model=runs/reward_hh_minilm/model
    chatrlhf ppo configs/ppo_hh_smollm2.yaml --reward-url http://127.0.0.1:8000

Each step, in ``fit`` below: sample replies to ``ppo.rollout_prompts`` prompts (prompts left-padded,
temperature / top-p, at most ``generation.max_new_tokens``; the tokens after a reply's first
end-of-sequence token are masked out); score them; per-token rewards = the normalised score on the
last token minus ``beta * KL`` to the reference on every token (Ziegler et al., arXiv 1909.08593);
GAE advantages, whitened; then ``ppo.epochs`` passes of minibatch updates of the clipped policy
loss and the clipped value loss (maths in losses.py, PPO section).

Models. The actor is the policy. The reference is the policy as loaded, frozen; with LoRA it is
the same model with the adapter switched off (no second copy). The critic is a value head on its
own copy of the policy's backbone (no LM head; LoRA too when the policy uses it), started from
the policy's weights as in TRL and OpenRLHF: the reward model's backbone was the other choice, but
it may have another tokenizer, and PPO needs a value per policy token. The score comes from a saved
chatrlhf reward model (the reply is decoded to text and re-tokenised with the reward model's own
tokenizer, exactly as ``chatrlhf reward score`` does), a ``chatrlhf serve`` server
(``reward.url``), or a Python function ``(prompts, replies) -> rewards`` (``reward.function``
"count:WORD", or ``train(config, reward_fn=...)``).

Deliberate simplifications: log-probabilities are those of the temperature-scaled distribution
(as TRL) but ignore the top-p truncation; one optimizer step per minibatch (no accumulation);
held-out KL is the mean summed k1 estimate on the held-out replies.
"""

from __future__ import annotations

import json
import math
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Literal

import torch
from tqdm.auto import tqdm

from chatrlhf import config as cfg_lib
from chatrlhf import losses, models, policy as policy_lib, training
from chatrlhf.config import option
from chatrlhf.data import load, prompt_key
from chatrlhf.data.batching import Group, tokenize_groups
from chatrlhf.training import CHECKPOINTS

RewardFn = Callable[[list, list[str]], list[float]]


# ---- configuration --------------------------------------------------------------------------

@dataclass
class PolicyConfig:
    name: str = option("smollm2-135m", "the policy: an embedded name, a hub id or a local folder")
    max_prompt_tokens: int = option(256, "prompt tokens kept (cut from the left, oldest turns first)")
    lora_r: int = option(0, "LoRA rank for the policy and the critic; 0 trains every weight")
    lora_alpha: int = option(16, "LoRA alpha")
    lora_dropout: float = option(0.0, "LoRA dropout (0 keeps the rollout and update passes identical)")
    lora_target_modules: str | list | None = option("all-linear", "LoRA target modules")

    def lora(self) -> dict | None:
        return {"r": self.lora_r, "lora_alpha": self.lora_alpha, "lora_dropout": self.lora_dropout,
                "target_modules": self.lora_target_modules} if self.lora_r else None


@dataclass
class RewardSourceConfig:
    model: str = option("", "a saved chatrlhf reward model folder (`chatrlhf reward train` output)")
    url: str | None = option(None, "score with a `chatrlhf serve` server at this URL instead")
    function: str | None = option(None, "a rule instead of a model: 'count:WORD' = how often WORD "
                                  "is a word of the reply (tests, debugging)")
    max_length: int | None = option(None, "reward-model tokens per (prompt, reply); default: its training max_length")
    normalize: bool = option(True, "(score - mean) / std with the running moments of every score so far")
    clip: float | None = option(5.0, "clip the (normalised) score to [-clip, clip]; null: no clipping")
    missing_eos_penalty: float | None = option(None, "subtracted from the score of replies cut at max_new_tokens")
    batch_tokens: int = option(16384, "tokens per reward-model batch")


@dataclass
class PromptDataConfig:
    train: str = option("", "prompts for rollouts: any preference file (the records' prompts are used, deduplicated)")
    dev: str | None = option(None, "held-out prompts, evaluated every train.eval_every steps")
    reader: str = option("auto", "reader name (see `chatrlhf data validate --help`)")
    fields: dict = option({}, "field mapping canonical=column")
    skip_invalid: bool = option(False, "skip invalid records (counted) instead of stopping")
    allow_empty: bool = option(True, "accept records with empty replies (only their prompts are used)")
    limit: int | None = option(None, "use only the first N distinct training prompts")
    dev_limit: int | None = option(64, "held-out prompts evaluated (the first N distinct ones)")
    long_prompts: Literal["cut", "drop"] = option("cut", "prompts over policy.max_prompt_tokens: cut "
                                                  "from the left, or drop (both counted)")


@dataclass
class GenerationConfig:
    max_new_tokens: int = option(64, "reply tokens sampled at most (a reply without EOS is cut there)")
    temperature: float = option(1.0, "sampling temperature (log-probabilities use it too)")
    top_p: float = option(1.0, "nucleus sampling; 1 samples from the whole distribution")
    eval_greedy: bool = option(False, "greedy held-out replies (default: sampled with a fixed seed)")


@dataclass
class PPOSection:
    rollout_prompts: int = option(16, "prompts (one reply each) per step")
    minibatch_size: int = option(8, "replies per optimizer step")
    epochs: int = option(2, "passes of minibatch updates over each rollout")
    clip_range: float = option(0.2, "policy ratio clipping epsilon")
    value_clip_range: float | None = option(0.2, "value clipping around the rollout values; null: none")
    gamma: float = option(1.0, "discount")
    lam: float = option(0.95, "GAE lambda")
    kl_coef: float = option(0.05, "initial (or fixed) coefficient of the per-token KL penalty")
    kl_target: float | None = option(None, "adaptive coefficient aiming at this sequence KL (Ziegler et al.); null: fixed")
    kl_horizon: int = option(10000, "adaptive controller horizon, in replies")
    kl_estimator: Literal["k1", "k2", "k3"] = option("k1", "per-token KL estimate in the penalty (losses.kl_penalty)")
    whiten_advantages: bool = option(True, "whiten advantages over each rollout")

    def __post_init__(self):
        for name in ("rollout_prompts", "minibatch_size", "epochs"):
            if getattr(self, name) < 1:
                raise ValueError(f"ppo.{name}: expected >= 1, found {getattr(self, name)}")
        if self.minibatch_size > self.rollout_prompts:
            raise ValueError(f"ppo.minibatch_size ({self.minibatch_size}) is larger than "
                             f"ppo.rollout_prompts ({self.rollout_prompts})")


@dataclass
class PPOTrainConfig:
    output_dir: str = option("runs/ppo", "checkpoints, metrics.jsonl, samples.jsonl, curves.png, model/")
    steps: int = option(100, "PPO steps (one rollout each)")
    lr: float = option(1e-5, "policy learning rate (AdamW)")
    critic_lr: float = option(1e-5, "critic learning rate (AdamW)")
    weight_decay: float = option(0.0, "AdamW weight decay")
    warmup_ratio: float = option(0.0, "fraction of optimizer steps with linear warmup")
    schedule: Literal["linear", "cosine", "constant"] = option("constant", "decay after warmup")
    max_grad_norm: float = option(1.0, "gradient clipping norm; 0 disables")
    eval_every: int = option(10, "held-out evaluation every N steps (and before the first and after the last)")
    sample_every: int = option(10, "write sample generations after the first step and every N steps")
    samples: int = option(4, "replies written each time")
    save_every: int = option(0, "checkpoint every N steps; 0: only at the end")
    keep_checkpoints: int = option(2, "how many recent checkpoints to keep")
    resume: bool | str = option(False, "true: continue from the latest checkpoint in output_dir; or a checkpoint path")
    seed: int = option(42, "seed for initialisation, prompt order and sampling")
    bf16: bool = option(False, "bf16 autocast for every forward pass (about 2x faster on CPUs with "
                        "AVX512-BF16/AMX); losses and log-probabilities stay float32")


@dataclass
class PPOConfig:
    policy: PolicyConfig = field(default_factory=PolicyConfig)
    reward: RewardSourceConfig = field(default_factory=RewardSourceConfig)
    data: PromptDataConfig = field(default_factory=PromptDataConfig)
    generation: GenerationConfig = field(default_factory=GenerationConfig)
    ppo: PPOSection = field(default_factory=PPOSection)
    train: PPOTrainConfig = field(default_factory=PPOTrainConfig)


# ---- models ---------------------------------------------------------------------------------

class Critic(torch.nn.Module):
    """A scalar value head on a causal LM's backbone: (B, T) values, one per position."""

    def __init__(self, backbone, hidden_size: int):
        super().__init__()
        self.backbone = backbone
        self.head = torch.nn.Linear(hidden_size, 1)
        torch.nn.init.zeros_(self.head.weight)  # values start at 0: no random bias in the first advantages
        torch.nn.init.zeros_(self.head.bias)

    def forward(self, input_ids, attention_mask, position_ids):
        hidden = self.backbone(input_ids=input_ids, attention_mask=attention_mask,
                               position_ids=position_ids).last_hidden_state
        return self.head(hidden).squeeze(-1).float()


def load_critic(name: str, lora: dict | None) -> Critic:
    from transformers import AutoModel

    backbone = AutoModel.from_pretrained(models.resolve(name), dtype=torch.float32)
    models.disable_dropout(backbone)
    if lora:
        from peft import LoraConfig, TaskType, get_peft_model

        backbone = get_peft_model(backbone, LoraConfig(task_type=TaskType.FEATURE_EXTRACTION, **lora))
    return Critic(backbone, backbone.config.hidden_size)


def trainable_state(module) -> dict:
    """Only what trains (a LoRA critic's frozen base comes back from the backbone's files)."""
    return {n: p.detach().clone() for n, p in module.named_parameters() if p.requires_grad}


def count_reward(word: str) -> RewardFn:
    """Rule-based reward: how many whitespace-separated words of the reply equal ``word``."""
    return lambda prompts, replies: [float(reply.split().count(word)) for reply in replies]


def reward_scorer(config: RewardSourceConfig, reward_fn: RewardFn | None, log=print) -> RewardFn:
    """(prompts, replies) -> scores, from whichever source the config (or the caller) names."""
    given = [name for name, v in (("a Python reward_fn", reward_fn), ("reward.model", config.model),
                                  ("reward.url", config.url), ("reward.function", config.function)) if v]
    if len(given) != 1:
        raise ValueError(f"give exactly one reward source (reward.model, reward.url or reward.function); found {given or 'none'}")
    if reward_fn:
        return reward_fn
    if config.function:
        kind, _, word = config.function.partition(":")
        if kind != "count" or not word:
            raise ValueError(f"reward.function: expected 'count:WORD', found {config.function!r}")
        return count_reward(word)
    if config.url:
        from chatrlhf.client import RewardClient

        client = RewardClient(config.url)
        log(f"reward: server {config.url} ({client.health().get('model')})")
        return lambda prompts, replies: client.score(prompts, replies)
    model, tokenizer = models.load_reward_model(config.model, dropout=False)
    max_length = config.max_length or models.read_metadata(models.resolve(config.model)).get("max_length", 512)
    log(f"reward: model {config.model}, max_length {max_length}")
    from chatrlhf.recipes.reward import score_groups  # the same tokenisation as `reward score`

    def score(prompts, replies):
        groups = [Group(p, [r], [0]) for p, r in zip(prompts, replies)]
        score.cut += tokenize_groups(groups, tokenizer, max_length)
        return [g[0] for g in score_groups(model, groups, tokenizer.pad_token_id, config.batch_tokens)]
    score.cut = 0  # replies cut to the reward model's max_length, reported in metrics.jsonl
    return score


# ---- data -----------------------------------------------------------------------------------

@dataclass
class PromptItem:
    prompt: object  # text or chat messages, as the reward model reads it
    input_ids: list[int]  # the policy's chat-templated prompt


def load_prompts(path: str, config: PPOConfig, tokenizer, limit: int | None, log=print) -> list[PromptItem]:
    """Distinct prompts of a preference file, encoded for the policy; cuts and drops are counted."""
    data = config.data
    loaded = load(path, reader=data.reader, fields=data.fields or None, skip_invalid=data.skip_invalid,
                  allow_empty=data.allow_empty)
    log(loaded.summary())
    distinct = {}
    for record in loaded.records:
        distinct.setdefault(prompt_key(record.prompt), record.prompt)
    prompts = list(distinct.values())
    log(f"{path}: {len(prompts)} distinct prompts of {len(loaded.records)} records")
    items, cut = [], 0
    for prompt in prompts:
        ids, was_cut = policy_lib.encode_prompt(tokenizer, prompt, config.policy.max_prompt_tokens)
        cut += was_cut
        if not (was_cut and data.long_prompts == "drop"):
            items.append(PromptItem(prompt, ids))
    action = "dropped" if data.long_prompts == "drop" else "cut from the left"
    log(f"{path}: {cut} prompts longer than policy.max_prompt_tokens={config.policy.max_prompt_tokens} {action}")
    if limit and limit < len(items):
        log(f"{path}: using the first {limit} of {len(items)} prompts")
        items = items[:limit]
    if not items:
        raise ValueError(f"{path}: no prompts left (raise policy.max_prompt_tokens or use data.long_prompts=cut)")
    return items


def step_prompts(items: list[PromptItem], step: int, size: int, seed: int) -> list[PromptItem]:
    """The prompts of a step: a fresh shuffle per pass over the data, deterministic in (seed, step)."""
    out = []
    for k in range(step * size, (step + 1) * size):
        epoch, position = divmod(k, len(items))
        order = list(range(len(items)))
        random.Random(seed * 100_003 + epoch).shuffle(order)
        out.append(items[order[position]])
    return out


# ---- setup ----------------------------------------------------------------------------------

@dataclass
class Run:
    config: PPOConfig
    policy: torch.nn.Module
    reference: torch.nn.Module | None  # None with LoRA: the policy with its adapter disabled
    critic: Critic
    tokenizer: object
    score: RewardFn
    train_items: list[PromptItem]
    dev_items: list[PromptItem]
    optimizer: torch.optim.Optimizer
    scheduler: object
    critic_optimizer: torch.optim.Optimizer
    critic_scheduler: object
    kl_controller: losses.AdaptiveKLController
    moments: losses.RunningMoments
    stop_ids: list[int]
    start_step: int = 0


def setup(config: PPOConfig, reward_fn: RewardFn | None = None, log=print) -> Run:
    train = config.train
    training.seed_everything(train.seed)
    if not config.data.train:
        raise ValueError("data.train is not set: give a file of prompts, e.g. data.train=pairs.jsonl")
    score = reward_scorer(config.reward, reward_fn, log)
    resume_from = training.resume_path(train.resume, train.output_dir, log)
    lora = config.policy.lora()
    policy, tokenizer = policy_lib.load_policy(str(resume_from) if resume_from else config.policy.name, lora=lora)
    reference = None
    if not lora:
        reference, _ = policy_lib.load_policy(config.policy.name)
        reference.requires_grad_(False).eval()
    critic = load_critic(config.policy.name, lora)
    train_items = load_prompts(config.data.train, config, tokenizer, config.data.limit, log)
    dev_items = load_prompts(config.data.dev, config, tokenizer, config.data.dev_limit, log) if config.data.dev else []
    ppo = config.ppo
    total = train.steps * ppo.epochs * math.ceil(ppo.rollout_prompts / ppo.minibatch_size)
    optimizer, scheduler = training.optimizer_and_scheduler(
        policy, train.lr, train.weight_decay, train.schedule, train.warmup_ratio, total)
    critic_optimizer, critic_scheduler = training.optimizer_and_scheduler(
        critic, train.critic_lr, train.weight_decay, train.schedule, train.warmup_ratio, total)
    stop = policy.generation_config.eos_token_id
    stop_ids = sorted({tokenizer.eos_token_id, *(stop if isinstance(stop, list) else [stop] if stop is not None else [])})
    run = Run(config, policy, reference, critic, tokenizer, score, train_items, dev_items, optimizer,
              scheduler, critic_optimizer, critic_scheduler,
              losses.AdaptiveKLController(ppo.kl_coef, ppo.kl_target, ppo.kl_horizon),
              losses.RunningMoments(), stop_ids)
    if resume_from:
        state = training.restore_state(resume_from, optimizer, scheduler)
        unexpected = critic.load_state_dict(state["critic"], strict=False).unexpected_keys
        if unexpected:  # missing keys are the frozen base, unexpected ones a different critic
            raise ValueError(f"{resume_from}: the saved critic does not fit this config (e.g. {unexpected[0]})")
        critic_optimizer.load_state_dict(state["critic_optimizer"])
        critic_scheduler.load_state_dict(state["critic_scheduler"])
        run.kl_controller.value = state["kl_coef"]
        vars(run.moments).update(state["reward_moments"])
        run.start_step = state["step"]
        log(f"resumed from {resume_from} at step {run.start_step} of {train.steps}")
    return run


# ---- rollouts -------------------------------------------------------------------------------

@dataclass
class Rollout:
    """B prompts and their replies; (B, N) tensors are per reply token."""

    items: list[PromptItem]
    input_ids: torch.Tensor  # (B, P + N) left-padded prompt, then the reply
    attention_mask: torch.Tensor  # (B, P + N)
    prompt_width: int  # P
    mask: torch.Tensor  # (B, N) True on reply tokens up to and including the first stop token
    ended: torch.Tensor  # (B,) whether the reply stopped by itself
    replies: list[str]
    scores: torch.Tensor  # (B,) raw scores
    logps: torch.Tensor  # (B, N) policy log-probabilities at sampling time
    reference_logps: torch.Tensor  # (B, N)
    entropy: torch.Tensor  # (B, N)


def policy_forward(model, input_ids, attention_mask, prompt_width: int, temperature: float):
    """(B, N) log-probabilities of the reply tokens and (B, N, V) their temperature-scaled logits.

    Position ids follow the attention mask, as in generate(), so left padding changes nothing;
    only the logits that predict reply tokens go through the LM head (logits_to_keep).
    """
    reply_tokens = input_ids.shape[1] - prompt_width
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    logits = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                   logits_to_keep=reply_tokens + 1).logits.float() / temperature
    logps = policy_lib.token_logps(logits, input_ids[:, prompt_width - 1:])
    return logps, logits[:, :-1]


def autocast(run: Run):
    return torch.autocast("cpu", dtype=torch.bfloat16, enabled=run.config.train.bf16)


def critic_values(critic: Critic, rollout: Rollout, rows=slice(None)) -> torch.Tensor:
    """(B, N) V(state before each reply token)."""
    ids, attention = rollout.input_ids[rows], rollout.attention_mask[rows]
    values = critic(ids, attention, (attention.cumsum(-1) - 1).clamp(min=0))
    return values[:, rollout.prompt_width - 1:-1]


def reply_mask(reply_ids: torch.Tensor, stop_ids: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, N) True up to and including each reply's first stop token (what generate() writes after
    it is padding), and (B,) whether the reply has one (False: cut at max_new_tokens)."""
    is_stop = torch.isin(reply_ids, torch.tensor(stop_ids, device=reply_ids.device))
    return (is_stop.long().cumsum(-1) - is_stop.long()) == 0, is_stop.any(-1)


@torch.no_grad()
def generate(run: Run, items: list[PromptItem], sample: bool = True) -> Rollout:
    """Sample (or greedily decode) replies, then score them and take both models' log-probs."""
    gen, pad = run.config.generation, run.tokenizer.pad_token_id
    width = max(len(item.input_ids) for item in items)
    prompt_ids = torch.full((len(items), width), pad, dtype=torch.long)
    prompt_mask = torch.zeros((len(items), width), dtype=torch.long)
    for row, item in enumerate(items):  # left padding: every reply starts at column `width`
        prompt_ids[row, width - len(item.input_ids):] = torch.tensor(item.input_ids)
        prompt_mask[row, width - len(item.input_ids):] = 1
    run.policy.eval()
    sampling = {"do_sample": True, "temperature": gen.temperature, "top_p": gen.top_p, "top_k": 0} if sample else {"do_sample": False}
    # Decoding is bound by Python overhead and weight reads, not by matmuls: a LoRA adapter is
    # merged into the weights for it, and it runs in float32 (autocast would re-cast every
    # frozen weight at every token).
    lora = run.reference is None
    if lora:
        run.policy.merge_adapter()
    try:
        output = run.policy.generate(input_ids=prompt_ids, attention_mask=prompt_mask, max_new_tokens=gen.max_new_tokens,
                                     pad_token_id=pad, eos_token_id=run.stop_ids, return_dict_in_generate=True,
                                     output_logits=True, **sampling)
    finally:
        if lora:
            run.policy.unmerge_adapter()
    sequences, reply_ids = output.sequences, output.sequences[:, width:]
    mask, ended = reply_mask(reply_ids, run.stop_ids)
    replies = [run.tokenizer.decode(ids[m], skip_special_tokens=True).strip() for ids, m in zip(reply_ids, mask)]
    attention_mask = torch.cat([prompt_mask, mask.long()], dim=1)
    # In float32 the sampling-time log-probabilities are generate()'s logits, no second forward
    # pass (equal to a full forward's up to rounding, see tests/test_ppo.py). With bf16 they are
    # recomputed under the same autocast as the reference and the updates, so the ratios and the
    # KL compare like with like rather than bf16 rounding with float32.
    if run.config.train.bf16:
        with autocast(run):
            logps, logits = policy_forward(run.policy, sequences, attention_mask, width, gen.temperature)
    else:
        logits = torch.stack(output.logits, dim=1).float() / gen.temperature  # (B, N, V)
        logps = logits.gather(-1, reply_ids[..., None])[..., 0] - logits.logsumexp(-1)
    if lora:
        with run.policy.disable_adapter(), autocast(run):
            reference_logps, _ = policy_forward(run.policy, sequences, attention_mask, width, gen.temperature)
    else:
        with autocast(run):
            reference_logps, _ = policy_forward(run.reference, sequences, attention_mask, width, gen.temperature)
    scores = torch.tensor(run.score([item.prompt for item in items], replies), dtype=torch.float32)
    if not torch.isfinite(scores).all():
        raise FloatingPointError(f"the reward source returned non-finite scores: {scores.tolist()}")
    return Rollout(items, sequences, attention_mask, width, mask, ended, replies, scores, logps, reference_logps,
                   losses.entropy_from_logits(logits))


def explained_variance(values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor) -> float:
    """1 - Var(returns - values) / Var(returns) over the reply tokens: 1 is a perfect critic,
    0 no better than a constant, below 0 worse."""
    var = losses.masked_mean((returns - losses.masked_mean(returns, mask)) ** 2, mask)
    residual = returns - values
    var_residual = losses.masked_mean((residual - losses.masked_mean(residual, mask)) ** 2, mask)
    return float(1 - var_residual / var) if var > 0 else float("nan")


# ---- fit ------------------------------------------------------------------------------------

def ppo_step(run: Run, rollout: Rollout, step: int) -> dict:
    """Rewards, advantages, and ``ppo.epochs`` passes of minibatch updates on one rollout."""
    ppo, train = run.config.ppo, run.config.train
    mask = rollout.mask
    with torch.no_grad():
        run.critic.eval()
        with autocast(run):
            old_values = critic_values(run.critic, rollout) * mask
        scores = rollout.scores.clone()
        if run.config.reward.missing_eos_penalty is not None:
            scores -= run.config.reward.missing_eos_penalty * (~rollout.ended).float()
        run.moments.update(scores)
        if run.config.reward.normalize:
            scores = (scores - run.moments.mean) / max(run.moments.std, 1e-8)
        if run.config.reward.clip is not None:
            scores = scores.clamp(-run.config.reward.clip, run.config.reward.clip)
        kl = losses.kl_penalty(rollout.logps, rollout.reference_logps, ppo.kl_estimator) * mask
        rewards = losses.token_rewards(scores, kl, mask, run.kl_controller.value)
        advantages, returns = losses.gae(rewards, old_values, mask, ppo.gamma, ppo.lam)
        if ppo.whiten_advantages:
            advantages = losses.masked_whiten(advantages, mask)
    stats = {"policy_loss": [], "value_loss": [], "clip_fraction": [], "value_clip_fraction": [], "approx_kl": []}
    run.policy.train()
    run.critic.train()
    for epoch in range(ppo.epochs):
        order = torch.randperm(len(rollout.items))
        for start in range(0, len(order), ppo.minibatch_size):
            rows = order[start:start + ppo.minibatch_size]
            m = mask[rows]
            with autocast(run):
                logps, _ = policy_forward(run.policy, rollout.input_ids[rows], rollout.attention_mask[rows],
                                          rollout.prompt_width, run.config.generation.temperature)
                values = critic_values(run.critic, rollout, rows)
            per_token, clipped = losses.ppo_policy_loss(logps, rollout.logps[rows], advantages[rows], ppo.clip_range)
            policy_loss = losses.masked_mean(per_token, m)
            per_token_v, clipped_v = losses.ppo_value_loss(values, old_values[rows], returns[rows], ppo.value_clip_range)
            value_loss = losses.masked_mean(per_token_v, m)
            if not (torch.isfinite(policy_loss) and torch.isfinite(value_loss)):
                raise FloatingPointError(f"non-finite loss at step {step} (policy {policy_loss.item()}, value "
                                         f"{value_loss.item()}); the last good checkpoint is in "
                                         f"{train.output_dir}/{CHECKPOINTS}")
            # Separate networks and optimizers: no value coefficient to balance the two losses.
            for loss, model, optimizer, scheduler in ((policy_loss, run.policy, run.optimizer, run.scheduler),
                                                      (value_loss, run.critic, run.critic_optimizer, run.critic_scheduler)):
                loss.backward()
                if train.max_grad_norm:
                    torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], train.max_grad_norm)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
            with torch.no_grad():
                stats["policy_loss"].append(policy_loss.item())
                stats["value_loss"].append(value_loss.item())
                stats["clip_fraction"].append(losses.masked_mean(clipped.float(), m).item())
                stats["value_clip_fraction"].append(losses.masked_mean(clipped_v.float(), m).item())
                stats["approx_kl"].append(losses.masked_mean(losses.kl_penalty(logps, rollout.logps[rows], "k3"), m).item())
    sequence_kl = (losses.kl_penalty(rollout.logps, rollout.reference_logps, "k1") * mask).sum(-1).mean().item()
    entry = {"step": step + 1, "reward": rollout.scores.mean().item(), "reward_std": rollout.scores.std(unbiased=False).item(),
             "normalized_reward": scores.mean().item(), "kl": sequence_kl, "kl_coef": run.kl_controller.value,
             "entropy": losses.masked_mean(rollout.entropy, mask).item(),
             **{k: sum(v) / len(v) for k, v in stats.items()},
             "explained_variance": explained_variance(old_values, returns, mask),
             "response_length": mask.sum(-1).float().mean().item(), "ended": rollout.ended.float().mean().item(),
             "lr": run.scheduler.get_last_lr()[0]}
    run.kl_controller.update(sequence_kl, len(rollout.items))
    return entry


def fit(run: Run) -> dict:
    """The loop: rollout -> PPO update -> log, samples, held-out evaluation, checkpoints."""
    config, train = run.config, run.config.train
    out = Path(train.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    log_file, samples_file = out / "metrics.jsonl", out / "samples.jsonl"
    last_eval = {}
    if run.dev_items and run.start_step == 0:
        last_eval = evaluate(run, 0)
        _append(log_file, {"step": 0, **{f"eval_{k}": v for k, v in last_eval.items()}})
    bar = tqdm(range(run.start_step, train.steps), initial=run.start_step, total=train.steps, desc="ppo", dynamic_ncols=True)
    for step in bar:
        started = time.perf_counter()
        rollout = generate(run, step_prompts(run.train_items, step, config.ppo.rollout_prompts, train.seed))
        entry = ppo_step(run, rollout, step)
        if hasattr(run.score, "cut"):
            entry["reward_inputs_cut"] = run.score.cut
        done = step + 1 == train.steps
        if run.dev_items and ((train.eval_every and (step + 1) % train.eval_every == 0) or done):
            last_eval = evaluate(run, step + 1)
            entry.update({f"eval_{k}": v for k, v in last_eval.items()})
        entry["seconds"] = time.perf_counter() - started
        _append(log_file, entry)
        if step == 0 or (train.sample_every and (step + 1) % train.sample_every == 0):
            for i in range(min(train.samples, len(rollout.items))):
                _append(samples_file, {"step": step + 1, "prompt": rollout.items[i].prompt, "reply": rollout.replies[i],
                                       "score": rollout.scores[i].item(), "ended": bool(rollout.ended[i])})
        postfix = {"reward": f"{entry['reward']:.3f}", "kl": f"{entry['kl']:.2f}"}
        if "eval_reward" in entry:
            postfix["eval_reward"] = f"{entry['eval_reward']:.3f}"
        bar.set_postfix(postfix)
        if (train.save_every and (step + 1) % train.save_every == 0) or done:
            save_checkpoint(run, step + 1)
    bar.close()
    return last_eval


def _append(path: Path, entry: dict) -> None:
    with path.open("a") as f:
        f.write(json.dumps(entry) + "\n")


# ---- evaluate -------------------------------------------------------------------------------

def evaluate(run: Run, step: int) -> dict:
    """Held-out mean reward, KL to the reference and reply length; every reply goes to
    ``eval_samples.jsonl``. Sampling uses a fixed seed (the training random state is put back
    after), so successive evaluations differ only by the policy."""
    size = run.config.ppo.rollout_prompts
    scores, kls, lengths = [], [], []
    samples_file = Path(run.config.train.output_dir) / "eval_samples.jsonl"
    samples_file.parent.mkdir(parents=True, exist_ok=True)
    with torch.random.fork_rng():
        torch.manual_seed(run.config.train.seed + 1)
        for start in range(0, len(run.dev_items), size):
            rollout = generate(run, run.dev_items[start:start + size], sample=not run.config.generation.eval_greedy)
            scores += rollout.scores.tolist()
            kls += (losses.kl_penalty(rollout.logps, rollout.reference_logps, "k1") * rollout.mask).sum(-1).tolist()
            lengths += rollout.mask.sum(-1).tolist()
            for item, reply, score in zip(rollout.items, rollout.replies, rollout.scores.tolist()):
                _append(samples_file, {"step": step, "prompt": item.prompt, "reply": reply, "score": score})
    n = len(scores)
    mean = sum(scores) / n
    sem = math.sqrt(sum((s - mean) ** 2 for s in scores) / max(n - 1, 1) / n)
    return {"reward": mean, "reward_sem": sem, "kl": sum(kls) / n, "response_length": sum(lengths) / n, "prompts": n}


def plot_curves(metrics_file: Path, png: Path) -> None:
    """Held-out mean reward (+- 1 s.e.) and KL against the step, training means behind them."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [json.loads(line) for line in metrics_file.read_text().splitlines() if line.strip()]
    train_rows = [r for r in rows if "reward" in r]
    eval_rows = [r for r in rows if "eval_reward" in r]
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    for ax, key, title in ((axes[0], "reward", "mean reward"), (axes[1], "kl", "KL(policy || reference), nats")):
        ax.plot([r["step"] for r in train_rows], [r[key] for r in train_rows], color="0.75", label="training rollouts")
        steps, values = [r["step"] for r in eval_rows], [r[f"eval_{key}"] for r in eval_rows]
        if key == "reward":
            sem = [r["eval_reward_sem"] for r in eval_rows]
            ax.errorbar(steps, values, yerr=sem, marker="o", capsize=3, label="held-out")
        else:
            ax.plot(steps, values, marker="o", label="held-out")
        ax.set(xlabel="PPO step", title=title)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(png, dpi=120)
    plt.close(fig)


# ---- save -----------------------------------------------------------------------------------

def metadata(config: PPOConfig, result: dict | None = None) -> dict:
    return {"chatrlhf_version": __import__("chatrlhf").__version__, "base_model": models.resolve(config.policy.name),
            "recipe": "ppo", "config": cfg_lib.to_dict(config), "eval": result or {}}


def save_checkpoint(run: Run, step: int) -> None:
    state = training.training_state(
        step, run.optimizer, run.scheduler, critic=trainable_state(run.critic),
        critic_optimizer=run.critic_optimizer.state_dict(), critic_scheduler=run.critic_scheduler.state_dict(),
        kl_coef=run.kl_controller.value, reward_moments=dict(vars(run.moments)))
    training.save_checkpoint(run.config.train.output_dir, step, run.policy, run.tokenizer, metadata(run.config),
                             state, run.config.train.keep_checkpoints)


def train(config: PPOConfig, reward_fn: RewardFn | None = None) -> dict:
    """setup -> fit -> evaluate -> save; returns the last held-out evaluation ({} without data.dev)."""
    run = setup(config, reward_fn)
    result = fit(run) if run.start_step < config.train.steps else (evaluate(run, run.start_step) if run.dev_items else {})
    out = Path(config.train.output_dir)
    models.save_model(run.policy, run.tokenizer, out / "model", metadata(config, result))
    print(f"saved the policy to {out / 'model'}")
    if result and (out / "metrics.jsonl").exists():
        plot_curves(out / "metrics.jsonl", out / "curves.png")
        print(f"held-out mean reward {result['reward']:.4f} +- {result['reward_sem']:.4f}, KL {result['kl']:.3f} "
              f"on {result['prompts']} prompts; curves in {out / 'curves.png'}")
    return result


def add_parser(subparsers) -> None:
    def reward_url(args) -> list[str]:  # the URL replaces a preset's reward model
        return [f"reward.url={args.reward_url}", "reward.model="] if args.reward_url else []

    parser = cfg_lib.add_preset_command(
        subparsers, "ppo", PPOConfig, lambda config, args: train(config),
        help="PPO of a policy against a reward model", description="RLHF with PPO.",
        example="configs/ppo_hh_smollm2.yaml", more_overrides=reward_url)
    parser.add_argument("--reward-url", help="score with a `chatrlhf serve` server (same as reward.url=URL)")

"""PPO against a reward model: the RLHF loop of InstructGPT (arXiv 2203.02155, section 3.5).

    chatrlhf ppo configs/ppo_hh_smollm2.yaml reward.model=runs/reward_hh_minilm/model
    chatrlhf ppo configs/ppo_hh_smollm2.yaml --reward-url http://127.0.0.1:8000
    accelerate launch --config_file configs/accelerate/ddp.yaml -m chatrlhf ppo configs/ppo_hh_smollm2.yaml

Each step, in ``fit`` below: sample replies to ``ppo.rollout_prompts`` prompts (prompts left-padded,
temperature / top-p, at most ``generation.max_new_tokens``; the tokens after a reply's first
end-of-sequence token are masked out); score them; per-token rewards = the normalised score on the
last token minus ``beta * KL`` to the reference on every token (Ziegler et al., arXiv 1909.08593);
GAE advantages, whitened; then ``ppo.epochs`` passes of minibatch updates of the clipped policy
loss and the clipped value loss (maths in losses.py, PPO section).

Processes. Under ``accelerate launch`` (DDP or FSDP, not DeepSpeed) each process samples and
scores its share of the prompts, and the rollout is gathered whole on every process: advantages,
their whitening, reward moments and metrics are the whole rollout's. Each reply is sampled with a
generator seeded by (train.seed, step, prompt), so 1 and N processes give the same replies and,
up to rounding, the same run. A minibatch is split into ``train.grad_accum`` micro-batches, each
shared by the processes; its losses are token means over the whole minibatch.

Models. The actor is the policy. The reference is the policy as loaded, frozen for the whole run;
with LoRA it is the same model with the adapter switched off (peft's ``disable_adapter``: the
adapter is never merged into the base weights, whose rounding would drift). The critic is a value
head on its own copy of the policy's backbone (no LM head; LoRA too when the policy uses it),
started from the policy's weights as in TRL and OpenRLHF: the reward model's backbone was the other
choice, but it may have another tokenizer, and PPO needs a value per policy token. The score comes
from a saved chatrlhf reward model (the reply is decoded to text and re-tokenised with the reward
model's own tokenizer, exactly as ``chatrlhf reward score`` does; on ``reward.device`` or the
policy's), a ``chatrlhf serve`` server (``reward.url``), or a Python function
``(prompts, replies) -> rewards`` (``reward.function`` "module:function", "file.py:function" or the
built-in "count:WORD", as GRPO's ``reward.functions``; or ``train(config, reward_fn=...)``).

Deliberate simplifications: log-probabilities are those of the temperature-scaled distribution
(as TRL) but ignore the top-p truncation; one optimizer step per minibatch; held-out KL is the
mean summed k1 estimate on the held-out replies.
"""

from __future__ import annotations

import hashlib
import json
import math
import random
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Literal

import torch
from transformers import LogitsProcessorList

from chatrlhf import config as cfg_lib
from chatrlhf import losses, models, policy as policy_lib, sampling, training
from chatrlhf.config import RunConfig, option
from chatrlhf.data import load, prompt_key
from chatrlhf.data.batching import Group, tokenize_groups

RewardFn = Callable[[list, list[str]], list[float]]


# ---- configuration --------------------------------------------------------------------------

@dataclass
class PolicyConfig(cfg_lib.RLPolicyConfig):
    lora_r: int = option(0, "LoRA rank for the policy and the critic; 0 trains every weight")


@dataclass
class RewardSourceConfig:
    model: str = option("", "a saved chatrlhf reward model folder (`chatrlhf reward train` output)")
    url: str | None = option(None, "score with a `chatrlhf serve` server at this URL instead")
    function: str | None = option(None, "a Python reward function instead of a model: 'module:function' or "
                                  "'file.py:function' taking (prompts, replies) -> list[float], or the "
                                  "built-in 'count:WORD' = how often WORD is a word of the reply (tests)")
    max_length: int | None = option(None, "reward-model tokens per (prompt, reply); default: its training max_length")
    normalize: bool = option(True, "(score - mean) / std with the running moments of every score so far")
    clip: float | None = option(5.0, "clip the (normalised) score to [-clip, clip]; null: no clipping")
    missing_eos_penalty: float | None = option(None, "subtracted from the score of replies cut at max_new_tokens")
    batch_tokens: int = option(16384, "tokens per reward-model batch")
    device: str | None = option(None, "where the reward model runs, e.g. 'cuda:1'; default: the policy's device")


PromptDataConfig = cfg_lib.RLDataConfig  # the prompts, as GRPO reads them


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
class PPOTrainConfig(RunConfig):
    output_dir: str = option("runs/ppo", "checkpoints, metrics.jsonl, samples.jsonl, curves.png, model/")
    lr: float = option(1e-5, "policy learning rate (AdamW)")
    warmup_ratio: float = option(0.0, "fraction of optimizer steps with linear warmup")
    schedule: Literal["linear", "cosine", "constant"] = option("constant", "decay after warmup")
    grad_accum: int = option(1, "micro-batches each minibatch is split into (less memory, the same update)")
    seed: int = option(42, "seed for initialisation, prompt order and sampling")
    bf16: bool | str = option(False, "bf16 autocast for every forward pass: true, false, or 'auto' (where it "
                              "computes bf16 natively); weights, losses and log-probabilities stay float32")
    steps: int = option(100, "PPO steps (one rollout each)")
    critic_lr: float = option(1e-5, "critic learning rate (AdamW)")
    eval_every: int = option(10, "held-out evaluation every N steps (and before the first and after the last)")
    sample_every: int = option(10, "write sample generations after the first step and every N steps")
    samples: int = option(4, "replies written each time")


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


# Built-in reward functions, by name: NAME:ARGUMENT -> (prompts, replies) -> rewards.
BUILTIN_REWARDS = {
    "count": lambda word: lambda prompts, replies: [float(reply.split().count(word)) for reply in replies],
}


def reward_function(spec: str, setting: str = "reward.function") -> RewardFn:
    """A reward function from its name, as PPO's ``reward.function`` and GRPO's
    ``reward.functions`` take it: a built-in ``NAME:ARGUMENT`` (``count:WORD``), or
    ``module:function`` (importable) or ``path/to/file.py:function``, the function taking
    ``(prompts, replies)`` (N prompts, text or chat messages, and N reply texts) and returning N
    floats, as TRL's ``reward_funcs`` and OpenRLHF's ``--remote_rm_url`` files do."""
    import importlib
    import importlib.util

    module_name, _, name = spec.rpartition(":")
    if module_name in BUILTIN_REWARDS and name:
        return BUILTIN_REWARDS[module_name](name)
    if not module_name or not name:
        raise ValueError(f"{setting}: expected 'module:function', 'file.py:function' or a built-in "
                         f"({', '.join(f'{k}:WORD' for k in BUILTIN_REWARDS)}), found {spec!r}")
    if module_name.endswith(".py"):
        if not Path(module_name).exists():
            raise FileNotFoundError(f"{setting}: no file {module_name}")
        loader = importlib.util.spec_from_file_location(Path(module_name).stem, module_name)
        module = importlib.util.module_from_spec(loader)
        loader.loader.exec_module(module)
    else:
        try:
            module = importlib.import_module(module_name)
        except ImportError as error:
            raise ValueError(f"{setting}: cannot import {module_name!r} ({error})") from None
    function = getattr(module, name, None)
    if not callable(function):
        raise ValueError(f"{setting}: {module_name} has no function {name!r}")
    return function


def reward_scorer(config: RewardSourceConfig, reward_fn: RewardFn | None, device: torch.device,
                  log=print) -> RewardFn:
    """(prompts, replies) -> scores, from whichever source the config (or the caller) names; a
    reward model runs on ``reward.device``, else on ``device``."""
    given = [name for name, v in (("a Python reward_fn", reward_fn), ("reward.model", config.model),
                                  ("reward.url", config.url), ("reward.function", config.function)) if v]
    if len(given) != 1:
        raise ValueError(f"give exactly one reward source (reward.model, reward.url or reward.function); found {given or 'none'}")
    if reward_fn:
        return reward_fn
    if config.function:
        return reward_function(config.function)
    if config.url:
        from chatrlhf.client import RewardClient

        client = RewardClient(config.url)
        log(f"reward: server {config.url} ({client.health().get('model')})")
        return lambda prompts, replies: client.score(prompts, replies)
    model, tokenizer = models.load_reward_model(config.model, dropout=False)
    model.to(config.device or device)
    max_length = config.max_length or models.read_metadata(models.resolve(config.model)).get("max_length", 512)
    log(f"reward: model {config.model} on {config.device or device}, max_length {max_length}")
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
    engine: training.Engine
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


def setup(config: PPOConfig, reward_fn: RewardFn | None = None) -> Run:
    train, ppo = config.train, config.ppo
    engine = training.Engine(train.output_dir, train.grad_accum, train.max_grad_norm, train.bf16,
                             max(1, ppo.minibatch_size // train.grad_accum), train.log_with)
    log = engine.log
    if engine.kind == "DEEPSPEED":
        raise ValueError("PPO runs under DDP or FSDP, not DeepSpeed: it trains two models (policy and critic) "
                         "with two optimizers, which one DeepSpeed engine does not support; launch with "
                         "configs/accelerate/ddp.yaml or fsdp.yaml")
    if engine.num_processes > 1:
        log(engine.describe())
    last_minibatch = ppo.rollout_prompts % ppo.minibatch_size or ppo.minibatch_size
    if min(ppo.minibatch_size, last_minibatch) < train.grad_accum:
        raise ValueError(f"train.grad_accum={train.grad_accum} splits each minibatch into that many micro-batches, "
                         f"but a minibatch has {min(ppo.minibatch_size, last_minibatch)} replies (ppo.minibatch_size "
                         f"{ppo.minibatch_size}, ppo.rollout_prompts {ppo.rollout_prompts})")
    training.seed_everything(train.seed)
    if not config.data.train:
        raise ValueError("data.train is not set: give a file of prompts, e.g. data.train=pairs.jsonl")
    score = reward_scorer(config.reward, reward_fn, engine.device, log)
    resume_from = engine.start(train.resume, train.overwrite)
    lora = config.policy.lora()
    policy, tokenizer = policy_lib.load_policy(str(resume_from) if resume_from else config.policy.name, lora=lora)
    reference = None
    if not lora:
        reference, _ = policy_lib.load_policy(config.policy.name)
        reference.requires_grad_(False).eval().to(engine.device)
    critic = load_critic(config.policy.name, lora)
    train_items = load_prompts(config.data.train, config, tokenizer, config.data.limit, log)
    dev_items = load_prompts(config.data.dev, config, tokenizer, config.data.dev_limit, log) if config.data.dev else []
    total = train.steps * ppo.epochs * math.ceil(ppo.rollout_prompts / ppo.minibatch_size)
    optimizer, scheduler = training.optimizer_and_scheduler(
        policy, train.lr, train.weight_decay, train.schedule, train.warmup_ratio, total)
    critic_optimizer, critic_scheduler = training.optimizer_and_scheduler(
        critic, train.critic_lr, train.weight_decay, train.schedule, train.warmup_ratio, total)
    stop = policy.generation_config.eos_token_id
    stop_ids = sorted({tokenizer.eos_token_id, *(stop if isinstance(stop, list) else [stop] if stop is not None else [])})
    # One model per prepare: accelerate's FSDP 2 shards one model (and its optimizer) per call.
    policy, optimizer = engine.prepare(policy, optimizer)
    critic, critic_optimizer = engine.prepare(critic, critic_optimizer)
    run = Run(config, engine, policy, reference, critic, tokenizer, score, train_items, dev_items, optimizer,
              scheduler, critic_optimizer, critic_scheduler,
              losses.AdaptiveKLController(ppo.kl_coef, ppo.kl_target, ppo.kl_horizon),
              losses.RunningMoments(), stop_ids)
    if resume_from:
        state = engine.restore(resume_from, policy, optimizer, scheduler)
        if not engine.sharded:  # sharded, accelerate's state files held both models and optimizers
            unexpected = engine.unwrap(critic).load_state_dict(state["critic"], strict=False).unexpected_keys
            if unexpected:  # missing keys are the frozen base, unexpected ones a different critic
                raise ValueError(f"{resume_from}: the saved critic does not fit this config (e.g. {unexpected[0]})")
            critic_optimizer.load_state_dict(state["critic_optimizer"])
        critic_scheduler.load_state_dict(state["critic_scheduler"])
        run.kl_controller.value = state["kl_coef"]
        vars(run.moments).update(state["reward_moments"])
        run.start_step = state["step"]
        log(f"resumed from {resume_from} at step {run.start_step} of {train.steps}")
    if train.log_with:
        engine.accelerator.init_trackers("ppo")
    return run


# ---- rollouts -------------------------------------------------------------------------------

def seed_of(*key) -> int:
    """A 63-bit seed from a key such as (train.seed, "reply", step, prompt): the same on every
    process and after a resume."""
    return int.from_bytes(hashlib.sha256(repr(key).encode()).digest()[:8], "little") >> 1


@dataclass
class Sample:
    """One prompt's reply and what the update needs of it: (n,) tensors over its n reply tokens."""

    item: PromptItem
    reply_ids: torch.Tensor  # up to and including the first stop token
    ended: bool  # whether the reply stopped by itself (False: cut at max_new_tokens)
    reply: str
    score: float
    logps: torch.Tensor  # the policy's, at sampling time
    reference_logps: torch.Tensor
    values: torch.Tensor  # the critic's, at sampling time
    entropy: torch.Tensor


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
    values: torch.Tensor  # (B, N) critic values at sampling time
    entropy: torch.Tensor  # (B, N)


def collate(samples: list[Sample], pad: int, device: torch.device) -> Rollout:
    """The samples as one left-padded batch: every reply starts at column P."""
    width, length = max(len(s.item.input_ids) for s in samples), max(len(s.reply_ids) for s in samples)
    input_ids = torch.full((len(samples), width + length), pad, dtype=torch.long)
    attention_mask = torch.zeros_like(input_ids)
    per_token = {name: torch.zeros(len(samples), length) for name in ("logps", "reference_logps", "values", "entropy")}
    for row, s in enumerate(samples):
        p, n = len(s.item.input_ids), len(s.reply_ids)
        input_ids[row, width - p:width + n] = torch.cat([torch.tensor(s.item.input_ids), s.reply_ids])
        attention_mask[row, width - p:width + n] = 1
        for name, values in per_token.items():
            values[row, :n] = getattr(s, name)
    return Rollout([s.item for s in samples], input_ids.to(device), attention_mask.to(device), width,
                   attention_mask[:, width:].bool().to(device), torch.tensor([s.ended for s in samples], device=device),
                   [s.reply for s in samples], torch.tensor([s.score for s in samples], device=device),
                   **{name: values.to(device) for name, values in per_token.items()})


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


def critic_values(critic, input_ids, attention_mask, prompt_width: int) -> torch.Tensor:
    """(B, N) V(state before each reply token)."""
    values = critic(input_ids, attention_mask, (attention_mask.cumsum(-1) - 1).clamp(min=0))
    return values[:, prompt_width - 1:-1]


@torch.no_grad()
def generate(run: Run, items: list[PromptItem], seeds: list[int], sample: bool = True) -> Rollout:
    """Replies to ``items`` (sampled with a seed each, or greedy), scored, with the policy's and
    the reference's log-probabilities and the critic's values. Each process does its share of the
    items; the rollout returned is all of them, in their order, on every process."""
    engine, gen, pad = run.engine, run.config.generation, run.tokenizer.pad_token_id
    # A process left without items runs the first one too (every process of a sharded model
    # takes part in each forward) and keeps nothing of it.
    rows, weight = engine.share(list(range(len(items))))
    mine = [items[r] for r in rows]
    policy = engine.unwrap(run.policy)  # no gradients: no need of DDP's wrapper
    prompt_ids, prompt_mask = sampling.left_pad([item.input_ids for item in mine], pad)
    width = prompt_ids.shape[1]  # every reply starts at this column
    prompt_ids, prompt_mask = prompt_ids.to(engine.device), prompt_mask.to(engine.device)
    policy.eval()
    sampler = [sampling.SeededDraw([seeds[r] for r in rows], gen.temperature, gen.top_p)] if sample else []
    options = dict(input_ids=prompt_ids, attention_mask=prompt_mask, max_new_tokens=gen.max_new_tokens,
                   do_sample=False, logits_processor=LogitsProcessorList(sampler), pad_token_id=pad,
                   eos_token_id=run.stop_ids, return_dict_in_generate=True, output_logits=True,
                   synced_gpus=engine.sharded)  # sharded: the processes done wait for the others
    # Under FSDP a peft model's generate() runs the model inside it, past the outer module's hook
    # that gathers the outer module's own weights: run it as the outer module's forward.
    lora = run.reference is None
    output = (training.call_through(policy, lambda model: model.generate(**options)) if lora and engine.sharded
              else policy.generate(**options))
    sequences, reply_ids = output.sequences, output.sequences[:, width:]
    mask, ended = sampling.reply_mask(reply_ids, run.stop_ids)
    replies = [run.tokenizer.decode(ids[m], skip_special_tokens=True).strip() for ids, m in zip(reply_ids, mask)]
    attention_mask = torch.cat([prompt_mask, mask.long()], dim=1)
    # In float32 the sampling-time log-probabilities are generate()'s logits, no second forward
    # pass (equal to a full forward's up to rounding, see tests/test_ppo.py). With bf16 they are
    # recomputed under the same autocast as the reference and the updates, so the ratios and the
    # KL compare like with like rather than cached decoding's bf16 rounding with a full forward's.
    if engine.bf16:
        with engine.autocast():
            logps, logits = policy_forward(policy, sequences, attention_mask, width, gen.temperature)
    else:
        logits = torch.stack(output.logits, dim=1).float() / gen.temperature  # (B, N, V)
        logps = logits.gather(-1, reply_ids[..., None])[..., 0] - logits.logsumexp(-1)
    with (policy.disable_adapter() if lora else nullcontext()), engine.autocast():
        reference_logps, _ = policy_forward(policy if lora else run.reference, sequences, attention_mask, width,
                                            gen.temperature)
        values = critic_values(engine.unwrap(run.critic).eval(), sequences, attention_mask, width)
    entropy, scores = losses.entropy_from_logits(logits), run.score([item.prompt for item in mine], replies)
    samples = [Sample(item, reply_ids[r, :n].cpu(), bool(ended[r]), replies[r], float(scores[r]), logps[r, :n].cpu(),
                      reference_logps[r, :n].cpu(), values[r, :n].float().cpu(), entropy[r, :n].cpu())
               for r, (item, n) in enumerate(zip(mine, mask.sum(-1).tolist()))]
    rollout = collate(engine.gather(samples if weight else []), pad, engine.device)
    if not torch.isfinite(rollout.scores).all():
        raise FloatingPointError(f"the reward source returned non-finite scores: {rollout.scores.tolist()}")
    return rollout


def explained_variance(values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor) -> float:
    """1 - Var(returns - values) / Var(returns) over the reply tokens: 1 is a perfect critic,
    0 no better than a constant, below 0 worse."""
    var = losses.masked_mean((returns - losses.masked_mean(returns, mask)) ** 2, mask)
    residual = returns - values
    var_residual = losses.masked_mean((residual - losses.masked_mean(residual, mask)) ** 2, mask)
    return float(1 - var_residual / var) if var > 0 else float("nan")


# ---- fit ------------------------------------------------------------------------------------

def ppo_step(run: Run, rollout: Rollout, step: int) -> dict:
    """Rewards, advantages, and ``ppo.epochs`` passes of minibatch updates on one rollout (the
    whole rollout, on every process: each takes its share of every micro-batch)."""
    engine, ppo, train = run.engine, run.config.ppo, run.config.train
    mask = rollout.mask
    with torch.no_grad():
        old_values = rollout.values * mask
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
    # This process's share of each minibatch's token means: policy loss, value loss, clip
    # fractions, approx KL; summed over the processes at the end of the step.
    sums, grad_norms, critic_grad_norms = torch.zeros(5, device=engine.device), [], []
    run.policy.train()
    run.critic.train()
    for epoch in range(ppo.epochs):
        shuffle = torch.Generator().manual_seed(seed_of(train.seed, "minibatches", step, epoch))
        order = torch.randperm(len(rollout.items), generator=shuffle)
        for start in range(0, len(order), ppo.minibatch_size):
            minibatch = order[start:start + ppo.minibatch_size]
            tokens = int(mask[minibatch].sum())  # the token mean's denominator: the whole minibatch's
            for micro in minibatch.tensor_split(train.grad_accum):
                rows, weight = engine.share(micro.tolist())
                m = mask[rows]
                with engine.accumulate(run.policy, run.critic):
                    with engine.autocast():
                        logps, _ = policy_forward(run.policy, rollout.input_ids[rows], rollout.attention_mask[rows],
                                                  rollout.prompt_width, run.config.generation.temperature)
                        values = critic_values(run.critic, rollout.input_ids[rows], rollout.attention_mask[rows],
                                               rollout.prompt_width)
                    per_token, clipped = losses.ppo_policy_loss(logps, rollout.logps[rows], advantages[rows],
                                                                ppo.clip_range)
                    per_token_v, clipped_v = losses.ppo_value_loss(values, old_values[rows], returns[rows],
                                                                   ppo.value_clip_range)
                    policy_sum, value_sum = (per_token * m).sum(), (per_token_v * m).sum()
                    # Separate networks and optimizers: no value coefficient to balance the two
                    # losses, one backward for both. backward divides by grad_accum and the
                    # processes' gradients are averaged: scaled back, each gradient is the
                    # minibatch's summed token loss over its token count.
                    scale = train.grad_accum * engine.num_processes / tokens * (weight > 0)
                    engine.backward((policy_sum + value_sum) * scale)
                if weight:
                    with torch.no_grad():
                        approx_kl = losses.kl_penalty(logps, rollout.logps[rows], "k3") * m
                        sums += torch.stack([policy_sum, value_sum, (clipped & m).sum(), (clipped_v & m).sum(),
                                             approx_kl.sum()]).float() / tokens
            grad_norms.append(engine.step(run.policy, run.optimizer, run.scheduler, step))
            critic_grad_norms.append(engine.step(run.critic, run.critic_optimizer, run.critic_scheduler, step))
    updates = len(grad_norms)
    means = [engine.reduce_sum(value) / updates for value in sums.tolist()]
    sequence_kl = (losses.kl_penalty(rollout.logps, rollout.reference_logps, "k1") * mask).sum(-1).mean().item()
    entry = {"step": step + 1, "reward": rollout.scores.mean().item(), "reward_std": rollout.scores.std(unbiased=False).item(),
             "normalized_reward": scores.mean().item(), "kl": sequence_kl, "kl_coef": run.kl_controller.value,
             "entropy": losses.masked_mean(rollout.entropy, mask).item(),
             **dict(zip(("policy_loss", "value_loss", "clip_fraction", "value_clip_fraction", "approx_kl"), means)),
             "explained_variance": explained_variance(old_values, returns, mask),
             "response_length": mask.sum(-1).float().mean().item(), "ended": rollout.ended.float().mean().item(),
             "grad_norm": sum(grad_norms) / updates, "critic_grad_norm": sum(critic_grad_norms) / updates,
             "lr": run.scheduler.get_last_lr()[0]}
    run.kl_controller.update(sequence_kl, len(rollout.items))
    return entry


def fit(run: Run) -> dict:
    """The loop: rollout -> PPO update -> log, samples, held-out evaluation, checkpoints."""
    config, engine, train = run.config, run.engine, run.config.train
    samples_file = Path(train.output_dir) / "samples.jsonl"
    last_eval = {}
    if run.dev_items and run.start_step == 0:
        last_eval = evaluate(run, 0)
        engine.write_metrics({"step": 0, **{f"eval_{k}": v for k, v in last_eval.items()}})
    bar = engine.progress(run.start_step, train.steps, "ppo")
    for step in bar:
        started = time.perf_counter()
        items = step_prompts(run.train_items, step, config.ppo.rollout_prompts, train.seed)
        rollout = generate(run, items, [seed_of(train.seed, "reply", step, i) for i in range(len(items))])
        entry = ppo_step(run, rollout, step)
        if hasattr(run.score, "cut"):
            entry["reward_inputs_cut"] = int(engine.reduce_sum(run.score.cut))
        done = step + 1 == train.steps
        if run.dev_items and ((train.eval_every and (step + 1) % train.eval_every == 0) or done):
            last_eval = evaluate(run, step + 1)
            entry.update({f"eval_{k}": v for k, v in last_eval.items()})
        entry["seconds"] = time.perf_counter() - started
        engine.write_metrics(entry)
        if engine.is_main and (step == 0 or (train.sample_every and (step + 1) % train.sample_every == 0)):
            with samples_file.open("a") as f:
                for i in range(min(train.samples, len(rollout.items))):
                    f.write(json.dumps({"step": step + 1, "prompt": rollout.items[i].prompt, "reply": rollout.replies[i],
                                        "score": rollout.scores[i].item(), "ended": bool(rollout.ended[i])}) + "\n")
        postfix = {"reward": f"{entry['reward']:.3f}", "kl": f"{entry['kl']:.2f}"}
        if "eval_reward" in entry:
            postfix["eval_reward"] = f"{entry['eval_reward']:.3f}"
        bar.set_postfix(postfix)
        if (train.save_every and (step + 1) % train.save_every == 0) or done:
            save_checkpoint(run, step + 1)
    bar.close()
    return last_eval


# ---- evaluate -------------------------------------------------------------------------------

def evaluate(run: Run, step: int) -> dict:
    """Held-out mean reward, KL to the reference and reply length; every reply goes to
    ``eval_samples.jsonl``. Each prompt's reply is sampled with the same seed at every
    evaluation, so successive evaluations differ only by the policy."""
    config = run.config
    size = config.ppo.rollout_prompts
    scores, kls, lengths, rows = [], [], [], []
    for start in range(0, len(run.dev_items), size):
        items = run.dev_items[start:start + size]
        seeds = [seed_of(config.train.seed, "eval", start + i) for i in range(len(items))]
        rollout = generate(run, items, seeds, sample=not config.generation.eval_greedy)
        scores += rollout.scores.tolist()
        kls += (losses.kl_penalty(rollout.logps, rollout.reference_logps, "k1") * rollout.mask).sum(-1).tolist()
        lengths += rollout.mask.sum(-1).tolist()
        rows += [{"step": step, "prompt": item.prompt, "reply": reply, "score": score}
                 for item, reply, score in zip(rollout.items, rollout.replies, rollout.scores.tolist())]
    if run.engine.is_main:
        samples_file = Path(config.train.output_dir) / "eval_samples.jsonl"
        samples_file.parent.mkdir(parents=True, exist_ok=True)
        with samples_file.open("a") as f:
            f.writelines(json.dumps(row) + "\n" for row in rows)
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
    """The policy, its optimizer and schedule (the engine's), and the critic's trainable weights,
    optimizer and schedule, the KL coefficient and the reward moments as extra state."""
    engine = run.engine
    extra = {"critic_scheduler": run.critic_scheduler.state_dict(), "kl_coef": run.kl_controller.value,
             "reward_moments": dict(vars(run.moments))}
    if not engine.sharded:  # sharded, accelerate's state files hold both models and optimizers
        # Only what trains: a LoRA critic's frozen base comes back from the backbone's files.
        critic = {n: p.detach().clone() for n, p in engine.unwrap(run.critic).named_parameters() if p.requires_grad}
        extra.update(critic=critic, critic_optimizer=run.critic_optimizer.state_dict())
    engine.save_checkpoint(step, run.policy, run.tokenizer, metadata(run.config), run.optimizer, run.scheduler,
                           run.config.train.keep_checkpoints, **extra)


def train(config: PPOConfig, reward_fn: RewardFn | None = None) -> dict:
    """setup -> fit -> evaluate -> save; returns the last held-out evaluation ({} without data.dev)."""
    run = setup(config, reward_fn)
    engine = run.engine
    result = fit(run) if run.start_step < config.train.steps else (evaluate(run, run.start_step) if run.dev_items else {})
    folder = engine.save_final(run.policy, run.tokenizer, metadata(config, result))
    engine.end()
    out = Path(config.train.output_dir)
    if engine.is_main:
        print(f"saved the policy to {folder}")
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

"""Typed configuration: one dataclass per concern, YAML presets, command-line overrides.

A preset is a serialised config: ``{"model": {...}, "train": {...}}``. Overrides are
``section.key=value`` or ``--section.key value``; values are read as YAML (``true``, ``3e-5``,
``[a, b]``) and checked against the field's type. Each field's ``help`` metadata is its CLI help.

The settings of `reward train`, `sft` and `dpo` are here (label's and ppo's beside their recipes):
this module imports no torch, so that building the command line stays quick.
"""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from pathlib import Path

import yaml


def option(default, help: str):
    """A dataclass field with its help text (mutable defaults are copied per instance)."""
    if isinstance(default, (list, dict)):
        return dataclasses.field(default_factory=lambda: type(default)(default), metadata={"help": help})
    return dataclasses.field(default=default, metadata={"help": help})


def _allowed_types(hint) -> tuple:
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return tuple(t for arg in typing.get_args(hint) for t in _allowed_types(arg))
    origin = typing.get_origin(hint)
    if origin is typing.Literal:
        return (str,)
    return (origin or hint,)


def _check(name: str, value, hint):
    allowed = _allowed_types(hint)
    if value is None and type(None) in allowed:
        return None
    if float in allowed and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if float in allowed and isinstance(value, str):
        # YAML 1.1 reads "1e-4" (no dot) as a string.
        try:
            return float(value)
        except ValueError:
            pass
    if typing.get_origin(hint) is typing.Literal and value not in typing.get_args(hint):
        raise ValueError(f"{name}: expected one of {list(typing.get_args(hint))}, found {value!r}")
    if not isinstance(value, tuple(t for t in allowed if isinstance(t, type))):
        names = " or ".join(getattr(t, "__name__", str(t)) for t in allowed)
        raise ValueError(f"{name}: expected {names}, found {value!r} ({type(value).__name__})")
    return value


# Settings that presets for an earlier chatrlhf may hold and this one does not know:
# old key -> (new key, or None when removed, the version that changed it, what to do).
# Meeting one, loading says so instead of the generic unknown-key error.
RENAMED = {
    "train.compile": (None, "0.2.0", "it was measured no faster than eager on CPU; delete the setting"),
    "train.eval_batch_size": ("train.eval_batch_tokens", "0.3.0",
                              "SFT and DPO score by tokens, not by count of sequences"),
}


def _renamed(key: str) -> str | None:
    if key not in RENAMED:
        return None
    new, version, note = RENAMED[key]
    change = f"was renamed to {new}" if new else "was removed"
    return f"{key} {change} in chatrlhf {version}{': ' + note if note else ''} (CHANGELOG.md)"


def from_dict(cls, values: dict, prefix: str = ""):
    """Build a (nested) config dataclass from a dict, checking names and types."""
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = set(values) - set(fields)
    for key in sorted(unknown):
        if message := _renamed(prefix + key):
            raise ValueError(message)
    if unknown:
        raise ValueError(f"unknown config key(s) {sorted(prefix + k for k in unknown)}; "
                         f"allowed under '{prefix or 'top level'}': {sorted(fields)}")
    kwargs = {}
    for name, value in values.items():
        hint = hints[name]
        if dataclasses.is_dataclass(hint):
            if not isinstance(value, dict):
                raise ValueError(f"{prefix}{name}: expected a mapping of settings, found {value!r}")
            kwargs[name] = from_dict(hint, value, f"{prefix}{name}.")
        else:
            kwargs[name] = _check(prefix + name, value, hint)
    return cls(**kwargs)


def to_dict(config) -> dict:
    return dataclasses.asdict(config)


def flat_dict(config) -> dict:
    """``{"train.lr": 5e-05, ...}``: every setting under its dotted key, values other than numbers,
    text and booleans as text; the form trackers' hyperparameter tables take."""
    def flat(tree: dict, prefix: str) -> dict:
        out = {}
        for key, value in tree.items():
            if isinstance(value, dict):
                out.update(flat(value, f"{prefix}{key}."))
            else:
                out[prefix + key] = value if isinstance(value, (int, float, str, bool)) else str(value)
        return out

    return flat(to_dict(config), "")


def parse_overrides(arguments: list[str]) -> dict:
    """``["train.lr=1e-4", "--model.name", "minilm"]`` -> ``{"train": {"lr": 1e-4}, ...}``."""
    pairs, i = [], 0
    while i < len(arguments):
        arg = arguments[i]
        if arg.startswith("--"):
            key, sep, value = arg[2:].partition("=")
            if not sep:
                if i + 1 >= len(arguments):
                    raise ValueError(f"override {arg} has no value")
                value, i = arguments[i + 1], i + 1
        elif "=" in arg:
            key, _, value = arg.partition("=")
        else:
            raise ValueError(f"cannot read override {arg!r}: expected section.key=value or --section.key value")
        pairs.append((key.replace("-", "_"), yaml.safe_load(value) if value != "" else ""))
        i += 1
    tree: dict = {}
    for key, value in pairs:
        node = tree
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return tree


def merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = value
    return out


def load(cls, preset: str | Path | None = None, overrides: list[str] | dict | None = None):
    """A config from an optional YAML preset plus overrides (later wins)."""
    values = {}
    if preset:
        text = Path(preset).read_text()
        values = yaml.safe_load(text) or {}
        if not isinstance(values, dict):
            raise ValueError(f"{preset}: expected a YAML mapping of sections, found {type(values).__name__}")
    if overrides:
        extra = overrides if isinstance(overrides, dict) else parse_overrides(overrides)
        values = merge(values, extra)
    return from_dict(cls, values)


def split_preset(preset: str | None, overrides: list[str]) -> tuple[str | None, list[str]]:
    """The command line's optional first argument is a preset, unless it is already an override
    (``chatrlhf sft data.train=x.jsonl``): then it joins the overrides."""
    if preset and "=" in preset and not preset.endswith((".yaml", ".yml")):
        return None, [preset, *overrides]
    return preset, list(overrides)


def add_preset_command(subparsers, name: str, config_class, run, help: str, description: str,
                       example: str, more_overrides=None) -> argparse.ArgumentParser:
    """The subcommand ``chatrlhf NAME [PRESET] [section.key=value ...]`` of a recipe.

    Its settings come from the optional YAML preset, then the overrides (and
    ``more_overrides(args)``, for options such as ``--reward-url``); then ``run(config, args)``.
    Returns the parser, for the recipe's own options.
    """
    parser = subparsers.add_parser(
        name, help=help, formatter_class=argparse.RawDescriptionHelpFormatter,
        description=f"{description} Settings come from an optional YAML preset, then overrides: "
                    "section.key=value or --section.key value.",
        epilog="settings:\n" + describe(config_class))
    parser.add_argument("preset", nargs="?", help=f"YAML preset (e.g. {example})")

    def command(args) -> int:
        preset, overrides = split_preset(args.preset, args.overrides)
        overrides += more_overrides(args) if more_overrides else []
        run(load(config_class, preset, overrides), args)
        return 0

    parser.set_defaults(run=command, overrides=[])
    return parser


def describe(cls, prefix: str = "") -> str:
    """Every setting with its default and help, for ``--help``."""
    lines = []
    for f in dataclasses.fields(cls):
        hint = typing.get_type_hints(cls)[f.name]
        if dataclasses.is_dataclass(hint):
            lines.append(describe(hint, f"{prefix}{f.name}."))
            continue
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        lines.append(f"  {prefix}{f.name}={default!r}\n      {f.metadata.get('help', '')}")
    return "\n".join(lines)


# ---- Sections shared by the recipes -------------------------------------------------------

from typing import Literal  # noqa: E402

TRACKERS_HELP = ("also log to an Accelerate tracker: 'tensorboard' (events under output_dir; pip install "
                 "'chatrlhf[tensorboard]') or 'wandb' ('chatrlhf[wandb]'; WANDB_MODE=offline keeps the run local)")


@dataclasses.dataclass
class ModelConfig:
    name: str = option("minilm", "backbone: 'minilm', 'smollm2-135m', a hub id or a local folder")
    max_length: int = option(256, "max tokens per (prompt, reply), special tokens included")
    max_reply_tokens: int | None = option(None, "reply budget when cutting; default 3/4 of max_length")
    dropout: bool = option(False, "keep the backbone's dropout while training (off by default, as in "
                           "TRL and DeepSpeed-Chat: one text should get one reward; also faster)")
    lora_r: int = option(0, "LoRA rank; 0 trains every weight")
    lora_alpha: int = option(16, "LoRA alpha")
    lora_dropout: float = option(0.05, "LoRA dropout")
    lora_target_modules: str | list | None = option("all-linear", "LoRA target modules")

    def __post_init__(self):
        if self.max_length < 8:
            raise ValueError(f"model.max_length: expected at least 8, found {self.max_length}")
        if self.lora_r < 0:
            raise ValueError(f"model.lora_r: expected 0 (off) or a positive rank, found {self.lora_r}")

    def lora(self) -> dict | None:
        if not self.lora_r:
            return None
        return {"r": self.lora_r, "lora_alpha": self.lora_alpha, "lora_dropout": self.lora_dropout,
                "target_modules": self.lora_target_modules}


@dataclasses.dataclass
class DataConfig:
    train: str | list = option("", "training file (JSONL/JSON/Parquet/CSV, .gz ok, or a saved HF dataset), "
                               "or a list of sources, each a path or {path, weight, name, holdout, part, "
                               "records, limit, reader, fields, options, ...} (docs/data-formats.md, "
                               "Mixtures), e.g. '[{path: a.jsonl, weight: 0.7}, {path: b.jsonl, weight: 0.3}]'")
    dev: str | list | None = option(None, "held-out file, or a list of sources as data.train (no weights), "
                                    "evaluated every train.eval_every steps and at the end; accuracy per source")
    reader: str = option("auto", "reader name (see `chatrlhf data validate --help`); auto-detected by default")
    fields: dict = option({}, "field mapping canonical=column, e.g. {chosen: answer_a}")
    options: dict = option({}, "reader options, e.g. {aspects: relevance}")
    skip_invalid: bool = option(False, "skip invalid records (counted and reported) instead of stopping")
    nan_as_missing: bool = option(False, "read a bare NaN in JSON as a missing value")
    allow_empty: bool = option(False, "accept empty replies (HH-RLHF has a few: silence was preferred)")
    limit: int | None = option(None, "use only the first N training records (quick trials)")

    def __post_init__(self):
        from chatrlhf.data import mixture  # here: reading the config needs no data code otherwise

        for section in ("train", "dev"):
            if mixture.is_mixture(getattr(self, section)):
                mixture.parse(getattr(self, section), self, section)


@dataclasses.dataclass
class LossConfig:
    objective: Literal["comparisons", "regression"] = option(
        "comparisons", "'comparisons': K-wise Bradley-Terry (InstructGPT eq. 1); 'regression': MSE on scores")
    use_margin: bool = option(False, "subtract each pair's margin from the data inside the sigmoid")
    tie_nu: float | str = option(1.0, "Davidson tie parameter, used when the data has ties (data without ties "
                                 "trains plain Bradley-Terry); 'learn': fitted with the model, from 1")
    drop_ties: bool = option(False, "drop pairs marked as ties (counted) instead of modelling them")
    centering: float = option(0.0, "reward-centering coefficient: adds coefficient * (r_i + r_j)^2 per pair, "
                              "averaged over a group's pairs (arXiv 2312.09244; comparisons only)")
    length_balance: bool = option(False, "weight each training group so that, within each source, pairs "
                                  "the longer reply wins and pairs the shorter reply wins weigh the same "
                                  "(length balancing, arXiv 2310.03716); comparisons only")

    def __post_init__(self):
        if isinstance(self.tie_nu, str) and self.tie_nu != "learn":
            raise ValueError(f"loss.tie_nu: expected a positive number or 'learn', found {self.tie_nu!r}")
        if not isinstance(self.tie_nu, str) and self.tie_nu <= 0:
            raise ValueError(f"loss.tie_nu: expected a positive number or 'learn', found {self.tie_nu}")
        if self.length_balance and self.objective == "regression":
            raise ValueError("loss.length_balance is for loss.objective=comparisons (it weighs who wins)")
        if self.centering < 0:
            raise ValueError(f"loss.centering: expected >= 0, found {self.centering}")
        if self.centering and self.objective == "regression":
            raise ValueError("loss.centering is for loss.objective=comparisons: scores fix the rewards' "
                             "offset themselves")


@dataclasses.dataclass
class RunConfig:
    """The training-loop settings every recipe has (each recipe's train section extends it)."""

    output_dir: str = option("runs/reward", "where checkpoints, logs and the final model go")
    lr: float = option(5e-5, "peak learning rate (AdamW)")
    weight_decay: float = option(0.0, "AdamW weight decay")
    warmup_ratio: float = option(0.1, "fraction of steps with linear warmup")
    schedule: Literal["linear", "cosine", "constant"] = option("linear", "decay after warmup")
    max_grad_norm: float = option(1.0, "gradient clipping norm; 0 disables")
    grad_accum: int = option(1, "micro-batches per optimizer step")
    save_every: int = option(0, "checkpoint every N steps; 0: only at the end")
    keep_checkpoints: int = option(2, "how many recent checkpoints to keep")
    resume: bool | str = option(False, "true: continue from the latest checkpoint in output_dir; or a checkpoint path")
    overwrite: bool = option(False, "start afresh in an output_dir that holds an earlier run, deleting its "
                             "checkpoints and logs (without it, such a run stops and says so)")
    seed: int = option(42, "seed for initialisation, data order and dropout")
    bf16: bool | str = option(False, "bf16 autocast: true, false, or 'auto' (on where the hardware computes "
                              "bf16 natively: CPUs with AVX512-BF16 or AMX, recent GPUs); weights stay float32")
    log_with: str | None = option(None, TRACKERS_HELP)

    def __post_init__(self):
        for name in ("grad_accum", "keep_checkpoints"):
            if getattr(self, name) < 1:
                raise ValueError(f"train.{name}: expected >= 1, found {getattr(self, name)}")
        if isinstance(self.bf16, str) and self.bf16 != "auto":
            raise ValueError(f"train.bf16: expected true, false or auto, found {self.bf16!r}")
        if self.lr <= 0:
            raise ValueError(f"train.lr: expected > 0, found {self.lr}")
        if not 0 <= self.warmup_ratio < 1:
            raise ValueError(f"train.warmup_ratio: expected in [0, 1), found {self.warmup_ratio}")


@dataclasses.dataclass
class EpochsConfig(RunConfig):
    """Recipes that go over a fixed data set in batches (reward, SFT, DPO)."""

    epochs: float = option(1.0, "passes over the training data (fractions allowed)")
    max_steps: int | None = option(None, "optimizer steps; overrides epochs")
    batch_size: int = option(16, "groups (pairs or rankings) per micro-batch")
    eval_every: int = option(0, "evaluate on data.dev every N steps; 0: only at the end")

    def __post_init__(self):
        if self.batch_size < 1:
            raise ValueError(f"train.batch_size: expected >= 1, found {self.batch_size}")
        super().__post_init__()


@dataclasses.dataclass
class TrainConfig(EpochsConfig):
    gradient_checkpointing: bool = option(False, "recompute activations in the backward pass: less memory, "
                                          "about a third more compute")
    eval_batch_tokens: int = option(16384, "tokens per batch when scoring (inference)")
    share_prompt: bool = option(True, "decoders: run each group's prompt once for its K replies "
                                "(same loss, less compute; single process only)")
    rows_per_forward: int = option(8, "run a batch's sequences sorted by length in chunks of this many "
                                   "rows, each padded only to its own longest (BERT-like encoders run "
                                   "padding-free instead); with share_prompt, whole groups of about this "
                                   "many replies per packed forward (0: one forward)")

    def __post_init__(self):
        super().__post_init__()
        if self.rows_per_forward < 0:
            raise ValueError(f"train.rows_per_forward: expected >= 0, found {self.rows_per_forward}")


@dataclasses.dataclass
class RewardConfig:
    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    loss: LossConfig = dataclasses.field(default_factory=LossConfig)
    train: TrainConfig = dataclasses.field(default_factory=TrainConfig)


# ---- SFT and DPO: policies (causal LMs) --------------------------------------------------------

@dataclasses.dataclass
class PolicyModelConfig(ModelConfig):
    name: str = option("smollm2-135m", "causal LM: 'smollm2-135m', a hub id or a local folder")
    dropout: bool = option(False, "keep the model's dropout while training (LoRA's own dropout is kept)")


@dataclasses.dataclass
class SFTDataConfig(DataConfig):
    reader: str = option("auto", "'auto' (SFT JSONL with prompt/response or messages, else the "
                         "preference readers of `chatrlhf data validate`), 'sft', or a reader name")
    packing: bool = option(False, "pack several examples per row (own positions, block-diagonal mask)")


@dataclasses.dataclass
class PolicyTrainConfig(EpochsConfig):
    output_dir: str = option("runs/sft", "where checkpoints, metrics.jsonl and the final model go")
    batch_size: int = option(8, "sequences (or packed rows) per micro-batch")
    lr: float = option(2e-5, "peak learning rate (AdamW); LoRA usually wants ~1e-4 to 1e-3")
    eval_every: int = option(0, "evaluate on data.dev every N steps; 0: at the start and the end only")
    seed: int = option(42, "seed for initialisation and data order")
    bf16: bool | str = option(False, "bf16 autocast on the training device: true, false, or 'auto' (where it "
                              "computes bf16 natively); weights stay float32")
    gradient_checkpointing: bool = option(False, "recompute activations in the backward pass: less memory, "
                                          "about a third more compute")
    tokens_per_forward: int = option(2048, "tokens per forward (groups whole, similar lengths together; "
                                     "sharing.policy_logps)")
    eval_batch_tokens: int = option(8192, "tokens per batch when scoring (evaluation, DPO's reference pass)")

    def __post_init__(self):
        super().__post_init__()
        for key in ("tokens_per_forward", "eval_batch_tokens"):
            if getattr(self, key) < 1:
                raise ValueError(f"train.{key}: expected >= 1, found {getattr(self, key)}")


@dataclasses.dataclass
class SFTConfig:
    model: PolicyModelConfig = dataclasses.field(default_factory=PolicyModelConfig)
    data: SFTDataConfig = dataclasses.field(default_factory=SFTDataConfig)
    train: PolicyTrainConfig = dataclasses.field(default_factory=PolicyTrainConfig)


@dataclasses.dataclass
class DPOLossConfig:
    type: Literal["sigmoid", "ipo", "plackett_luce"] = option(
        "sigmoid", "'sigmoid': DPO (cDPO with label_smoothing > 0); 'ipo': IPO; 'plackett_luce': "
        "K-wise rankings as one ordering (pairs give exactly sigmoid DPO)")
    beta: float = option(0.1, "KL strength beta (IPO: tau); implicit reward = beta * (log pi - log pi_ref)")
    label_smoothing: float = option(0.0, "cDPO: probability that a label is flipped, in [0, 0.5); sigmoid only")
    drop_ties: bool = option(False, "plackett_luce: drop groups with tied replies (counted) instead of "
                             "the Breslow tie model; sigmoid and ipo always drop tied pairs (counted)")
    average_logps: bool = option(False, "use the per-token mean log-probability of a reply instead of "
                                 "the sum (TRL does this for IPO; DPO as published sums)")

    def __post_init__(self):
        if self.beta <= 0:
            raise ValueError(f"loss.beta: expected > 0, found {self.beta}")
        if not 0 <= self.label_smoothing < 0.5:
            raise ValueError(f"loss.label_smoothing: expected in [0, 0.5), found {self.label_smoothing}")
        if self.label_smoothing and self.type != "sigmoid":
            raise ValueError(f"loss.label_smoothing is for loss.type=sigmoid (cDPO), not {self.type!r}")


@dataclasses.dataclass
class DPOTrainConfig(PolicyTrainConfig):
    output_dir: str = option("runs/dpo", "where checkpoints, metrics.jsonl, reference_logps.pt and the model go")
    batch_size: int = option(4, "groups (pairs or rankings) per micro-batch")
    lr: float = option(1e-6, "peak learning rate (AdamW); LoRA usually wants ~1e-4")


@dataclasses.dataclass
class DPOConfig:
    model: PolicyModelConfig = dataclasses.field(default_factory=PolicyModelConfig)
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    loss: DPOLossConfig = dataclasses.field(default_factory=DPOLossConfig)
    train: DPOTrainConfig = dataclasses.field(default_factory=lambda: DPOTrainConfig())


# ---- GRPO, Dr. GRPO, RLOO, REINFORCE++: critic-free RL (recipes/grpo.py) -----------------------

@dataclasses.dataclass
class RLPolicyConfig:
    name: str = option("smollm2-135m", "the policy: an embedded name, a hub id or a local folder")
    max_prompt_tokens: int = option(256, "prompt tokens kept (cut from the left, oldest turns first)")
    lora_r: int = option(0, "LoRA rank; 0 trains every weight (and keeps a frozen copy as the reference)")
    lora_alpha: int = option(16, "LoRA alpha")
    lora_dropout: float = option(0.0, "LoRA dropout (0 keeps the sampling and update passes identical)")
    lora_target_modules: str | list | None = option("all-linear", "LoRA target modules")

    def lora(self) -> dict | None:
        return {"r": self.lora_r, "lora_alpha": self.lora_alpha, "lora_dropout": self.lora_dropout,
                "target_modules": self.lora_target_modules} if self.lora_r else None


@dataclasses.dataclass
class RLRewardConfig:
    model: str = option("", "a saved chatrlhf reward model folder (`chatrlhf reward train` output)")
    url: str | None = option(None, "score with a `chatrlhf serve` server at this URL instead of reward.model")
    functions: list = option([], "Python reward functions, each 'module:function' or 'file.py:function' "
                             "taking (prompts, replies) -> list[float], or a built-in ('count:WORD'); "
                             "added to the model's (or server's) score")
    weights: list | None = option(None, "one weight per reward, in order: the model or server first (if "
                                  "any), then each function; default all 1 (the reward is the weighted sum)")
    max_length: int | None = option(None, "reward-model tokens per (prompt, reply); default: its training max_length")
    batch_tokens: int = option(16384, "tokens per reward-model batch")
    device: str | None = option(None, "where the reward model runs, e.g. 'cuda:1'; default: the policy's device")


@dataclasses.dataclass
class RLDataConfig:
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


@dataclasses.dataclass
class RLGenerationConfig:
    max_new_tokens: int = option(64, "reply tokens sampled at most (a reply without EOS is cut there)")
    temperature: float = option(1.0, "sampling temperature (log-probabilities use it too)")
    top_p: float = option(1.0, "nucleus sampling; 1 samples from the whole distribution")
    share_prompt_cache: bool = option(True, "compute each prompt's KV cache once for its K samples "
                                      "(the same samples as without; less prefill)")
    fast_decoder: bool = option(True, "decode Llama-family policies (Llama, Mistral, Qwen2) with chatrlhf's own "
                                "step (decoding.py: stacked projections, W @ h products), 1.5x faster on CPU; "
                                "false: the model's own forward. Other models always use their own")
    eval_greedy: bool = option(False, "greedy held-out replies (default: sampled with a fixed seed)")

    def __post_init__(self):
        if self.max_new_tokens < 1 or self.temperature <= 0 or not 0 < self.top_p <= 1:
            raise ValueError(f"generation: expected max_new_tokens >= 1, temperature > 0, 0 < top_p <= 1; found "
                             f"{self.max_new_tokens}, {self.temperature}, {self.top_p}")


# What each algorithm does by default: its advantage, where its KL goes, how its loss weighs tokens.
RL_ALGORITHMS = {
    "grpo": "advantage (r - group mean) / group std; KL in the loss; per-reply token mean, then mean",
    "dr_grpo": "advantage r - group mean; KL in the loss; token sum / (replies x max_new_tokens)",
    "rloo": "advantage r - mean of the group's other replies; KL in the loss; token mean over the batch",
    "reinforce_pp": "per-token KL in the reward, return-to-go whitened over the batch; token mean",
}
LOSS_AGGREGATION = {"grpo": "sequence_mean", "dr_grpo": "constant", "rloo": "token_mean", "reinforce_pp": "token_mean"}


@dataclasses.dataclass
class GRPOSection:
    algorithm: Literal["grpo", "dr_grpo", "rloo", "reinforce_pp"] = option(
        "grpo", "; ".join(f"'{k}': {v}" for k, v in RL_ALGORITHMS.items()))
    prompts_per_step: int = option(4, "P: prompts per step")
    group_size: int = option(4, "K: replies sampled per prompt (the group, its own baseline)")
    num_iterations: int = option(1, "optimizer steps on each rollout (TRL's num_iterations, the mu of "
                                 "GRPO); above 1 the ratio clipping matters")
    clip_range: float = option(0.2, "ratio clipping epsilon")
    beta: float = option(0.0, "KL coefficient (the loss's, or the reward's for reinforce_pp); 0 skips the "
                         "reference model entirely (no reference forward)")
    kl_estimator: Literal["k1", "k3"] = option("k3", "per-token KL estimate (losses.kl_penalty); GRPO uses k3")
    loss_aggregation: Literal["sequence_mean", "token_mean", "constant"] | None = option(
        None, "token weighting of the loss (losses.aggregate_token_loss); default the algorithm's: "
        + ", ".join(f"{k} {v}" for k, v in LOSS_AGGREGATION.items()))

    def __post_init__(self):
        if self.group_size < 2:
            raise ValueError(f"grpo.group_size: expected >= 2 (the group is the baseline), found {self.group_size}")
        for name in ("prompts_per_step", "num_iterations"):
            if getattr(self, name) < 1:
                raise ValueError(f"grpo.{name}: expected >= 1, found {getattr(self, name)}")
        if self.beta < 0 or self.clip_range <= 0:
            raise ValueError(f"grpo: expected beta >= 0 and clip_range > 0, found {self.beta}, {self.clip_range}")
        if self.loss_aggregation not in (None, *LOSS_AGGREGATION.values()):
            raise ValueError(f"grpo.loss_aggregation: expected one of {sorted(set(LOSS_AGGREGATION.values()))} "
                             f"or null, found {self.loss_aggregation!r}")

    @property
    def aggregation(self) -> str:
        return self.loss_aggregation or LOSS_AGGREGATION[self.algorithm]


@dataclasses.dataclass
class RLEvalConfig:
    judge: str | None = option(None, "a second scorer of the held-out replies, not trained against: a "
                               "reward model folder, a `chatrlhf serve` URL, or 'module:function'; a "
                               "gap between its score and the training reward's shows reward hacking")
    judge_max_length: int | None = option(None, "the judge reward model's tokens per (prompt, reply)")


@dataclasses.dataclass
class GRPOTrainConfig(RunConfig):
    output_dir: str = option("runs/grpo", "checkpoints, metrics.jsonl, samples.jsonl, curves.png, model/")
    lr: float = option(1e-5, "policy learning rate (AdamW); LoRA usually wants ~1e-4 to 1e-3")
    warmup_ratio: float = option(0.0, "fraction of optimizer steps with linear warmup")
    schedule: Literal["linear", "cosine", "constant"] = option("constant", "decay after warmup")
    grad_accum: int = option(1, "micro-batches each rollout is split into (whole groups; less memory, same update)")
    steps: int = option(100, "steps (one rollout of P x K replies each)")
    eval_every: int = option(10, "held-out evaluation every N steps (and before the first and after the last)")
    sample_every: int = option(10, "write sample generations after the first step and every N steps")
    samples: int = option(8, "replies written each time")
    tokens_per_forward: int = option(2048, "tokens per policy forward (sharing.policy_logps)")
    share_prompt: bool = option(True, "policy and reference log-probabilities of a group's K replies with "
                                "their prompt computed once (sharing.policy_logps; false: each reply alone)")

    def __post_init__(self):
        super().__post_init__()
        if self.steps < 1 or self.tokens_per_forward < 1:
            raise ValueError(f"train: expected steps >= 1 and tokens_per_forward >= 1, found "
                             f"{self.steps}, {self.tokens_per_forward}")


@dataclasses.dataclass
class GRPOConfig:
    policy: RLPolicyConfig = dataclasses.field(default_factory=RLPolicyConfig)
    reward: RLRewardConfig = dataclasses.field(default_factory=RLRewardConfig)
    data: RLDataConfig = dataclasses.field(default_factory=RLDataConfig)
    generation: RLGenerationConfig = dataclasses.field(default_factory=RLGenerationConfig)
    grpo: GRPOSection = dataclasses.field(default_factory=GRPOSection)
    eval: RLEvalConfig = dataclasses.field(default_factory=RLEvalConfig)
    train: GRPOTrainConfig = dataclasses.field(default_factory=GRPOTrainConfig)

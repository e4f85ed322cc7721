"""The one `chatrlhf` command. Each subcommand maps to one function in a recipe or module.

    chatrlhf data validate|stats|convert ...
    chatrlhf reward train|score|eval|compare ...
    chatrlhf sft | dpo | ppo | grpo PRESET [section.key=value ...]
    chatrlhf label PRESET [section.key=value ...]
    chatrlhf serve MODEL

Building the parser imports no torch, transformers or FastAPI, so every ``--help`` answers at
once: the options come from modules that import none of them (config.py holds the recipes'
settings; data/cli.py, recipes/label.py, recipes/compare.py and serve.py their own options), and
a training recipe is imported when its command runs (``recipe``). recipes/ppo.py builds its
parser beside torch: it is imported only when its command is chosen (DEFERRED).
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

from chatrlhf import __version__, serve
from chatrlhf import config as cfg
from chatrlhf.config import DPOConfig, GRPOConfig, RewardConfig, SFTConfig
from chatrlhf.data import cli as data_cli
from chatrlhf.recipes import compare, label

# Commands whose module builds their parser but imports torch at the top: listed by
# `chatrlhf --help` with this help, their module imported when they are chosen.
DEFERRED = {
    "ppo": ("chatrlhf.recipes.ppo", "PPO of a policy against a reward model"),
}


def recipe(name: str):
    """The module ``chatrlhf.recipes.NAME``, imported when a command runs (the recipes import torch)."""
    return importlib.import_module(f"chatrlhf.recipes.{name}")


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The `chatrlhf` parser. ``command``: the one about to run, whose parser is built in full
    even if DEFERRED; None builds every command's (importing torch for the DEFERRED ones)."""
    parser = argparse.ArgumentParser(prog="chatrlhf", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)
    data_cli.add_parser(commands)
    add_reward(commands)
    cfg.add_preset_command(
        commands, "sft", SFTConfig, lambda config, args: recipe("sft").train(config),
        help="supervised fine-tuning of a causal LM (loss on the reply tokens only)",
        description="Supervised fine-tuning on prompt/response, chat or preference data (chosen replies).",
        example="configs/sft_hh_smollm2.yaml")
    dpo = cfg.add_preset_command(
        commands, "dpo", DPOConfig, lambda config, args: recipe("dpo").train(config, report=args.report),
        help="DPO / cDPO / IPO / Plackett-Luce fine-tuning of a causal LM from comparisons",
        description="Direct preference optimisation from pairs or rankings.",
        example="configs/dpo_hh_smollm2.yaml")
    dpo.add_argument("--report", metavar="DIR", help="after training, write the reward-model report "
                     "(report.html, report.json, PNG plots) of the dev implicit rewards into DIR")
    add_deferred(commands, "ppo", command)
    grpo = cfg.add_preset_command(
        commands, "grpo", GRPOConfig, lambda config, args: recipe("grpo").train(config),
        help="GRPO / Dr. GRPO / RLOO / REINFORCE++ of a policy against a reward (no critic)",
        description="Critic-free RL: K replies per prompt, the group as the baseline (grpo.algorithm).",
        example="configs/grpo_hh_smollm2.yaml",
        more_overrides=lambda args: [f"reward.url={args.reward_url}", "reward.model="] if args.reward_url else [])
    grpo.add_argument("--reward-url", help="score with a `chatrlhf serve` server (same as reward.url=URL)")
    label.add_parser(commands)
    serve.add_parser(commands)
    return parser


def add_reward(commands) -> None:
    """`reward train|score|eval` (recipes/reward.py) and `reward compare` (recipes/compare.py)."""
    reward = commands.add_parser("reward", help="train, score and evaluate reward models")
    subcommands = reward.add_subparsers(dest="reward_command", required=True)
    cfg.add_preset_command(
        subcommands, "train", RewardConfig, lambda config, args: recipe("reward").train(config),
        help="train a reward model", description="Train a reward model from comparisons (or scores).",
        example="configs/reward_hh_minilm.yaml")
    for name, function, text in (("score", "score_command", "write the rewards of a file as JSONL"),
                                 ("eval", "eval_command", "accuracy (and ranking metrics) on a file")):
        p = subcommands.add_parser(name, help=text)
        p.add_argument("model", help="saved reward model folder (or a backbone name)")
        p.add_argument("file", help="pairs, rankings or scored samples" + (
            "; or a YAML preset: its data.dev, accuracy per source" if function == "eval_command" else ""))
        p.add_argument("--reader", default="auto")
        p.add_argument("--field", action="append", default=[], help="canonical=column")
        p.add_argument("--skip-invalid", action="store_true")
        p.add_argument("--nan-as-missing", action="store_true")
        p.add_argument("--allow-empty", action="store_true", help="accept empty replies")
        p.add_argument("--max-length", type=int, default=None, help="default: the model's training max_length")
        p.add_argument("--batch-tokens", type=int, default=16384)
        if name == "score":
            p.add_argument("--output", "-o", help="JSONL file (default: standard output)")
            p.add_argument("--normalize", action="store_true", help="(r - mean) / std from the model's metadata")
        else:
            p.add_argument("--json", help="also write the metrics to this JSON file")
            p.add_argument("--report", metavar="DIR", help="write report.html, report.json and PNG plots "
                           "(intervals, length bias, calibration, reward distributions) into DIR")
        p.set_defaults(run=lambda args, function=function: getattr(recipe("reward"), function)(args))
    compare.add_parser(subcommands)


def add_deferred(commands, name: str, command: str | None) -> None:
    """The DEFERRED command ``name``: its own parser when it is ``command`` (or all are built),
    else only its name and help, for the list of commands."""
    module, text = DEFERRED[name]
    if command in (None, name):
        importlib.import_module(module).add_parser(commands)
    else:
        commands.add_parser(name, help=text)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser(argv[0] if argv else "")
    args, extra = parser.parse_known_args(argv)
    if extra:
        if not hasattr(args, "overrides"):
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        args.overrides = extra
    from chatrlhf import training  # (imports torch) after parsing: `--help` has exited by now

    training.keep_freed_memory()
    try:
        return args.run(args) or 0
    except (ValueError, FileNotFoundError, FileExistsError, FloatingPointError) as error:
        # Bad input, bad configuration and a non-finite loss end with the message alone.
        if os.environ.get("CHATRLHF_TRACEBACK"):
            raise
        print(f"error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())

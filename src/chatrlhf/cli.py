"""The one `chatrlhf` command. Each subcommand maps to one function in a recipe or module.

    chatrlhf data validate|stats|convert ...
    chatrlhf reward train|score|eval|compare ...
    chatrlhf sft | dpo | ppo PRESET [section.key=value ...]
    chatrlhf label PRESET [section.key=value ...]
    chatrlhf serve MODEL
"""

from __future__ import annotations

import argparse
import os
import sys

from chatrlhf import serve, training
from chatrlhf.data import cli as data_cli
from chatrlhf.recipes import dpo, label, ppo, reward, sft


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="chatrlhf", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    data_cli.add_parser(commands)
    reward.add_parser(commands)
    sft.add_parser(commands)
    dpo.add_parser(commands)
    ppo.add_parser(commands)
    label.add_parser(commands)
    serve.add_parser(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra:
        if not hasattr(args, "overrides"):
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        args.overrides = extra
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

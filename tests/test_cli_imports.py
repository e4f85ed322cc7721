"""Building the command line imports no torch, transformers, FastAPI, Accelerate, PEFT or
datasets: `chatrlhf --help` and every command's --help answer at once (each runs in a fresh
interpreter here, which prints the modules loaded once the help is out)."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from chatrlhf import __version__
from chatrlhf.cli import main

HEAVY = {"torch", "transformers", "fastapi", "accelerate", "peft", "datasets"}

HELP = """
import contextlib, io, json, sys
from chatrlhf.cli import main
text = io.StringIO()
with contextlib.redirect_stdout(text):
    try:
        main(sys.argv[1:] + ["--help"])
    except SystemExit as exit:
        assert exit.code == 0, exit.code
print(json.dumps({"help": text.getvalue(), "modules": sorted(sys.modules)}))
"""

COMMANDS = ["", "reward", "reward train", "reward score", "reward eval", "reward compare", "sft", "dpo",
            "label", "serve", "data", "data validate", "data stats", "data convert"]
# recipes/ppo.py builds its parser beside `import torch` at the top (cli.DEFERRED); once its
# options come from a module without torch, this passes: drop the mark.
DEFERRED = [pytest.param("ppo", marks=pytest.mark.xfail(strict=True, reason="recipes/ppo.py imports torch"))]


@pytest.mark.parametrize("command", COMMANDS + DEFERRED, ids=lambda c: c or "chatrlhf")
def test_help_imports_no_heavy_library(command):
    out = subprocess.run([sys.executable, "-c", HELP, *command.split()], capture_output=True, text=True,
                         timeout=300, check=True)
    result = json.loads(out.stdout)
    assert result["help"].startswith(f"usage: chatrlhf {command}".rstrip())
    loaded = {name.split(".")[0] for name in result["modules"]}
    assert not loaded & HEAVY, f"`chatrlhf {command} --help` imported {sorted(loaded & HEAVY)}"


def test_a_deferred_command_shows_its_own_options(capsys):
    with pytest.raises(SystemExit):
        main(["ppo", "--help"])
    assert "--reward-url" in capsys.readouterr().out


def test_version_is_the_packages(capsys):
    with pytest.raises(SystemExit):
        main(["--version"])
    assert capsys.readouterr().out.strip() == f"chatrlhf {__version__}"
    pyproject = (Path(__file__).parents[1] / "pyproject.toml").read_text()
    assert re.search(r'^version = "(.*)"$', pyproject, re.MULTILINE)[1] == __version__

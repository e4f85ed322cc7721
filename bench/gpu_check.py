"""GPU check: every training recipe for a few steps in bf16 on one GPU, and the reward recipe and
SFT under FSDP 2 with one process; prints step times and peak GPU memory per run.

    bash bench/gpu_check.sh                          # one CUDA GPU, about 4 minutes on an H100
    python bench/gpu_check.py --device cpu --tiny    # smoke test on a CPU (tests/test_gpu_check.py)

Needs no network and none of the embedded model packages: the models are built here from their
configurations with random weights (a BERT of all-MiniLM-L6-v2's shape as the reward model, a
Llama of SmolLM2-135M's shape as the policy), each with a word-level tokenizer made in this process
(ChatML template for the decoder), and saved to a temporary folder beside synthetic data. Each run
is an ordinary ``chatrlhf`` command on the shipped preset (configs/*.yaml) with ``key=value``
overrides, in its own process through ``--inner``, which resets CUDA's peak-memory counter, calls
``chatrlhf.cli.main`` and writes ``torch.cuda.max_memory_allocated()`` when it returns. FSDP runs go
through ``accelerate launch --config_file configs/accelerate/fsdp.yaml --num_processes 1`` and the
same wrapper. Step times come from each run's ``metrics.jsonl``: the median over the steps after
the first (which pays for compilation, allocation and warm-up).

bf16 is asked for with ``train.bf16=true`` where a recipe's settings have that key (read off its
``--help``); a recipe without one runs as it is, and the table says so. The exit status is 1 if
any run failed; every run is tried and the table printed all the same.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import itertools
import json
import os
import random
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src"
FSDP_CONFIG = ROOT / "configs" / "accelerate" / "fsdp.yaml"
CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


@dataclass
class Sizes:
    """Model shapes, text lengths (in words, one token each) and per-recipe batch settings."""

    bert: dict
    llama: dict
    prompt_words: tuple[int, int]
    reply_words: tuple[int, int]
    max_length: int
    new_tokens: int
    reward_batch: int = 16
    sft_batch: int = 8
    dpo_batch: int = 4
    ppo_rollouts: int = 8
    ppo_minibatch: int = 4


# The real shapes: all-MiniLM-L6-v2 and SmolLM2-135M(-Instruct). Replies of 200-400 tokens.
FULL = Sizes(
    bert=dict(vocab_size=30522, hidden_size=384, num_hidden_layers=6, num_attention_heads=12,
              intermediate_size=1536, max_position_embeddings=512),
    llama=dict(vocab_size=49152, hidden_size=576, num_hidden_layers=30, num_attention_heads=9,
               num_key_value_heads=3, intermediate_size=1536, max_position_embeddings=8192,
               rms_norm_eps=1e-5, tie_word_embeddings=True),
    prompt_words=(80, 160), reply_words=(120, 240), max_length=512, new_tokens=64)
# --tiny: 2 layers, width 64, short texts; seconds per run on a CPU.
TINY = Sizes(
    bert=dict(vocab_size=1024, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
              intermediate_size=128, max_position_embeddings=256),
    llama=dict(vocab_size=1024, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, intermediate_size=128, max_position_embeddings=512,
               tie_word_embeddings=True),
    prompt_words=(10, 30), reply_words=(15, 40), max_length=128, new_tokens=16,
    reward_batch=4, sft_batch=4, dpo_batch=2, ppo_rollouts=4, ppo_minibatch=2)


# ---- models and tokenizers ------------------------------------------------------------------

def words(n: int) -> list[str]:
    """``n`` distinct pronounceable filler words (ba, be, ..., baba, babe, ...): the text's vocabulary."""
    syllables = [c + v for c in "bdfgklmnprstvz" for v in "aeiou"]
    every = (map("".join, itertools.product(syllables, repeat=k)) for k in itertools.count(1))
    return list(itertools.islice(itertools.chain.from_iterable(every), n))


def word_tokenizer(specials: list[str], vocab_size: int, post_processor=None, **tokens):
    """A word-level ``PreTrainedTokenizerFast`` of exactly ``vocab_size`` ids (the model's), so
    every id a model samples decodes to a word. ``tokens`` names its special tokens."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = [*specials, "user", "assistant", "system"]
    vocab += words(vocab_size - len(vocab))
    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(vocab)}, unk_token=tokens["unk_token"]))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    backend.add_special_tokens(specials)
    if post_processor:
        backend.post_processor = post_processor
    return PreTrainedTokenizerFast(tokenizer_object=backend, **tokens)


def build_bert(folder: Path, shape: dict, max_length: int) -> None:
    """A reward model: BERT sequence classifier (num_labels=1) and a [CLS] a [SEP] b [SEP] tokenizer."""
    import torch
    from tokenizers import processors
    from transformers import AutoModelForSequenceClassification, BertConfig

    pair = processors.TemplateProcessing(single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
                                         special_tokens=[("[CLS]", 2), ("[SEP]", 3)])
    tokenizer = word_tokenizer(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"], shape["vocab_size"], pair,
                               unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]", sep_token="[SEP]",
                               mask_token="[MASK]", model_max_length=max_length)
    torch.manual_seed(0)
    config = BertConfig(**shape, num_labels=1, pad_token_id=0)
    AutoModelForSequenceClassification.from_config(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)


def build_llama(folder: Path, shape: dict) -> None:
    """A policy: Llama causal LM and a ChatML tokenizer (EOS = <|im_end|>, as SmolLM2-Instruct)."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    tokenizer = word_tokenizer(["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<unk>"], shape["vocab_size"],
                               unk_token="<unk>", pad_token="<|endoftext|>", bos_token="<|im_start|>",
                               eos_token="<|im_end|>")
    tokenizer.chat_template = CHATML
    torch.manual_seed(0)
    config = LlamaConfig(**shape, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)


# ---- data -----------------------------------------------------------------------------------

def write_data(folder: Path, sizes: Sizes, rows: int) -> dict[str, Path]:
    """Pairs (reward, DPO, PPO's prompts) and SFT rows of filler words, Zipf-distributed."""
    rng = random.Random(0)
    vocabulary = words(min(3000, sizes.bert["vocab_size"] - 16))
    weights = [1 / (rank + 1) for rank in range(len(vocabulary))]

    def text(bounds):
        return " ".join(rng.choices(vocabulary, weights, k=rng.randint(*bounds)))

    pairs = [{"prompt": text(sizes.prompt_words), "chosen": text(sizes.reply_words),
              "rejected": text(sizes.reply_words)} for _ in range(rows)]
    sft = [{"prompt": text(sizes.prompt_words), "response": text(sizes.reply_words)} for _ in range(rows)]
    files = {"pairs": folder / "pairs.jsonl", "sft": folder / "sft.jsonl"}
    for name, records in (("pairs", pairs), ("sft", sft)):
        files[name].write_text("".join(json.dumps(r) + "\n" for r in records))
    return files


# ---- runs -----------------------------------------------------------------------------------

@dataclass
class Run:
    recipe: str
    setup: str  # "1 GPU", "FSDP2 x1", "CPU"
    command: list[str]  # chatrlhf arguments: subcommand, preset, overrides
    output: Path
    bf16: str  # what the table says about precision
    result: dict = field(default_factory=dict)
    steps: int = 0
    median: float | None = None
    status: str = "not run"


def settings_of(command: list[str]) -> str:
    """The settings part of a recipe's ``--help`` (every key=default it accepts)."""
    from chatrlhf import cli

    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer), contextlib.suppress(SystemExit):
        cli.build_parser().parse_args([*command, "--help"])
    return buffer.getvalue()


def plan(work: Path, files: dict, sizes: Sizes, steps: int, gpu: bool) -> list[Run]:
    """The runs: each recipe on its shipped preset, pointed at the built models and data; the
    FSDP ones only with a GPU."""
    bert, llama, configs = work / "bert-minilm-shape", work / "llama-smollm2-shape", ROOT / "configs"
    common = ["data.dev=null", f"model.max_length={sizes.max_length}"]
    recipes = {
        "reward": ["reward", "train", str(configs / "reward_hh_minilm.yaml"), f"model.name={bert}",
                   f"data.train={files['pairs']}", *common, f"train.max_steps={steps}",
                   f"train.batch_size={sizes.reward_batch}", "train.eval_every=0"],
        "sft": ["sft", str(configs / "sft_hh_smollm2.yaml"), f"model.name={llama}", f"data.train={files['sft']}",
                *common, f"train.max_steps={steps}", f"train.batch_size={sizes.sft_batch}", "train.eval_every=0"],
        # DPO scores every training pair with the reference before its first step: only the
        # pairs the steps use.
        "dpo": ["dpo", str(configs / "dpo_hh_smollm2.yaml"), f"model.name={llama}", f"data.train={files['pairs']}",
                *common, f"data.limit={steps * sizes.dpo_batch}", f"train.max_steps={steps}",
                f"train.batch_size={sizes.dpo_batch}", "train.save_every=0"],
        # The preset drops prompts over 64 tokens; here they are cut to fit instead.
        "ppo": ["ppo", str(configs / "ppo_hh_smollm2.yaml"), f"policy.name={llama}", f"reward.model={bert}",
                f"reward.max_length={sizes.max_length}", f"data.train={files['pairs']}", "data.dev=null",
                "data.long_prompts=cut", f"data.limit={steps * sizes.ppo_rollouts}",
                f"policy.max_prompt_tokens={sizes.max_length - sizes.new_tokens}",
                f"generation.max_new_tokens={sizes.new_tokens}", f"ppo.rollout_prompts={sizes.ppo_rollouts}",
                f"ppo.minibatch_size={sizes.ppo_minibatch}", f"train.steps={steps}", "train.eval_every=0"],
    }
    runs = []
    for setup, names in (("1 GPU" if gpu else "CPU", list(recipes)), ("FSDP2 x1", ["reward", "sft"])):
        for name in names:
            command = list(recipes[name])
            command_words = command[:2] if name == "reward" else command[:1]
            has_bf16 = "  train.bf16=" in settings_of(command_words)
            if not has_bf16:
                bf16 = "no bf16 key: fp32"
            elif gpu:
                bf16, command = "bf16", [*command, "train.bf16=true"]
            else:
                bf16, command = "fp32 (cpu)", [*command, "train.bf16=false"]
            output = work / "runs" / f"{name}-{'fsdp' if setup.startswith('FSDP') else 'single'}"
            run = Run(name, setup, [*command, f"train.output_dir={output}"], output, bf16)
            if setup.startswith("FSDP") and not gpu:
                run.status = "skipped: needs a GPU"
            runs.append(run)
    return runs


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def execute(run: Run, env: dict, timeout: float) -> None:
    """Run one recipe in its own process (through accelerate launch for FSDP); fill in the row."""
    result_file, log_file = run.output.with_suffix(".result.json"), run.output.with_suffix(".log")
    shutil.rmtree(run.output, ignore_errors=True)  # a fresh output_dir: no resume, no refusal
    result_file.unlink(missing_ok=True)
    run.output.parent.mkdir(parents=True, exist_ok=True)
    inner = [str(Path(__file__).resolve()), "--inner", str(result_file), "--", *run.command]
    if run.setup.startswith("FSDP"):
        command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(FSDP_CONFIG),
                   "--num_processes", "1", "--main_process_port", str(free_port()), *inner]
    else:
        command = [sys.executable, *inner]
    print(f"--- {run.recipe} ({run.setup}): chatrlhf {' '.join(run.command)}", flush=True)
    started = time.perf_counter()
    with log_file.open("w") as log:
        try:
            rc = subprocess.run(command, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                                timeout=timeout).returncode
        except subprocess.TimeoutExpired:
            rc = None
    run.result = json.loads(result_file.read_text()) if result_file.exists() else {}
    metrics = run.output / "metrics.jsonl"
    rows = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()] if metrics.exists() else []
    seconds = {r["step"]: r["seconds"] for r in rows if r.get("step", 0) >= 1 and "seconds" in r}
    run.steps = len(seconds)
    later = [seconds[s] for s in sorted(seconds)[1:]]
    run.median = statistics.median(later) if later else None
    print(f"    {time.perf_counter() - started:.0f} s, log {log_file}", flush=True)
    if rc is None:
        run.status = f"FAILED: timed out after {timeout:.0f} s"
    elif rc != 0:
        run.status = f"FAILED (exit {rc}): {run.result.get('error') or last_line(log_file)}"
    elif not run.steps:
        run.status = f"FAILED: exit 0, but no step with its seconds in {metrics}"
    elif run.setup.startswith("FSDP") and run.result.get("distributed_type") != "FSDP":
        run.status = (f"ok, NOT sharded: Accelerate state {run.result.get('distributed_type')} "
                      "(the recipe made no FSDP Accelerator)")
    elif run.setup != "CPU" and not run.result.get("peak_bytes"):
        run.status = "ok, but no GPU memory used: the recipe ran on the CPU"
    else:
        run.status = "ok"
    if run.status.startswith("FAILED"):
        print("    " + "\n    ".join(log_file.read_text().splitlines()[-25:]), flush=True)


def last_line(path: Path) -> str:
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    return lines[-1][-200:] if lines else "no output"


def print_table(runs: list[Run]) -> None:
    header = ("recipe", "config", "precision", "steps", "median step s", "peak GPU GiB", "status")
    rows = []
    for run in runs:
        peak = run.result.get("peak_bytes")
        rows.append((run.recipe, run.setup, run.bf16, "-" if run.status.startswith("skipped") else str(run.steps),
                     f"{run.median:.3f}" if run.median is not None else "n/a",
                     f"{peak / 2**30:.2f}" if peak is not None else "n/a", run.status))
    widths = [max(len(r[i]) for r in (header, *rows)) for i in range(len(header) - 1)]
    line = lambda r: "  ".join(v.ljust(w) for v, w in zip(r, widths)) + "  " + r[-1]  # noqa: E731
    print("\n" + line(header))
    print("  ".join("-" * w for w in widths) + "  " + "-" * 6)
    for r in rows:
        print(line(r))
    print("median step s: over the steps after the first; peak GPU GiB: torch.cuda.max_memory_allocated")


# ---- the wrapper each run goes through --------------------------------------------------------

def inner(result_file: str, arguments: list[str]) -> int:
    """``chatrlhf ARGUMENTS`` in this process, with CUDA's peak memory and Accelerate's state
    written to ``result_file`` at exit."""
    import torch

    from chatrlhf import cli

    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    error = None
    try:
        rc = cli.main(arguments)
    except SystemExit as exit_:
        rc = exit_.code if isinstance(exit_.code, int) else 1
    except BaseException as exception:  # noqa: BLE001 - reported in the table, then exit 1
        traceback.print_exc()
        rc, error = 1, f"{type(exception).__name__}: {exception}".splitlines()[0][:200]
    from accelerate.state import AcceleratorState

    kind = AcceleratorState._shared_state.get("distributed_type")
    result = {"rc": rc, "error": error, "peak_bytes": torch.cuda.max_memory_allocated() if cuda else None,
              "distributed_type": getattr(kind, "value", kind)}
    if int(os.environ.get("RANK", "0")) == 0:
        Path(result_file).write_text(json.dumps(result))
    return rc


# ---- main -----------------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    sys.path.insert(0, str(SRC))  # this checkout's chatrlhf, installed or not
    if argv[:1] == ["--inner"]:
        return inner(argv[1], argv[3:] if argv[2:3] == ["--"] else argv[2:])
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda",
                        help="cpu: a smoke test of this script (float32, no FSDP rows, no GPU memory)")
    parser.add_argument("--tiny", action="store_true", help="2-layer, width-64 models and short texts")
    parser.add_argument("--steps", type=int, default=None, help="steps per run (default 6; 3 with --tiny)")
    parser.add_argument("--timeout", type=float, default=240, help="seconds per run before it counts as failed")
    parser.add_argument("--workdir", help="keep models, data and runs here (default: a removed temp folder)")
    args = parser.parse_args(argv)
    import torch

    gpu = args.device == "cuda"
    if gpu and not torch.cuda.is_available():
        print("error: no CUDA GPU found (torch.cuda.is_available() is False); for a smoke test on a "
              "CPU: python bench/gpu_check.py --device cpu --tiny", file=sys.stderr)
        return 2
    sizes, steps = (TINY if args.tiny else FULL), args.steps or (3 if args.tiny else 6)
    work = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="chatrlhf-gpu-check-"))
    work.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(SRC), os.environ.get("PYTHONPATH")])),
           "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1", "TQDM_DISABLE": "1",
           "CHATRLHF_TRACEBACK": "1"}  # the whole traceback of a failed run goes to its log
    if not gpu:
        env["CUDA_VISIBLE_DEVICES"] = ""  # the recipes take a GPU whenever they see one
    try:
        started = time.perf_counter()
        build_bert(work / "bert-minilm-shape", sizes.bert, sizes.max_length)
        build_llama(work / "llama-smollm2-shape", sizes.llama)
        rows = max(steps * max(sizes.reward_batch, sizes.sft_batch, sizes.ppo_rollouts), 16) + 8
        files = write_data(work, sizes, rows)
        print(f"models and data in {work} ({time.perf_counter() - started:.0f} s); torch {torch.__version__}"
              + (f", {torch.cuda.get_device_name()}" if gpu else ", CPU"), flush=True)
        runs = plan(work, files, sizes, steps, gpu)
        for run in runs:
            if run.status == "not run":
                execute(run, env, args.timeout)
        print_table(runs)
    finally:
        if not args.workdir:
            shutil.rmtree(work, ignore_errors=True)
    return 1 if any(run.status.startswith("FAILED") for run in runs) else 0


if __name__ == "__main__":
    raise SystemExit(main())

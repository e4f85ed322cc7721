"""One engine under every recipe (training.Engine): 1 process against 2 processes (gloo, under
`accelerate launch`) with DDP, DeepSpeed ZeRO-2 and ZeRO-3 and FSDP 2 give the same losses and
weights; which fast path each config runs; gradient accumulation 4 x 4 equals one batch of 16;
a 2-process run killed with SIGKILL resumes to the uninterrupted result; checkpoints load
without pickle. Each launch is made once per module (module-scoped fixtures) and read by
several tests: a 2-process launch costs 8-15 s here."""

from __future__ import annotations

import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from chatrlhf import training
from chatrlhf.cli import main
from conftest import WORDS, read_metrics, separable_pairs, write_jsonl

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs" / "accelerate"
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1"}
SHARDED = ("deepspeed_zero2.yaml", "deepspeed_zero3.yaml", "fsdp.yaml")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def launch_command(config: str, arguments: list[str]) -> list[str]:
    return [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(CONFIGS / config),
            "--num_processes", "2", "--mixed_precision", "no", "--main_process_port", str(free_port()),
            "-m", "chatrlhf", *arguments]


def launch(config: str, arguments: list[str]) -> str:
    """Run a recipe as 2 processes; returns its standard output. A config the CPU cannot run
    would skip with its exact error (none is known to: see the README's scale-out section)."""
    done = subprocess.run(launch_command(config, arguments), capture_output=True, text=True, env=ENV, timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    return done.stdout


def sft_rows(n: int, seed: int) -> list[dict]:
    """Prompts and replies of varied lengths: token-weighted and per-batch means differ."""
    rng = random.Random(seed)
    words = lambda k: " ".join(rng.choice(WORDS) for _ in range(k))  # noqa: E731
    return [{"prompt": words(rng.randint(2, 8)), "response": words(rng.randint(1, 14))} for _ in range(n)]


def weights(folder: Path) -> dict[str, torch.Tensor]:
    """The weights of a saved model as plain transformers loads them on one process."""
    import transformers

    architecture = transformers.AutoConfig.from_pretrained(folder).architectures[0]
    return getattr(transformers, architecture).from_pretrained(folder).state_dict()


def assert_same_run(one: Path, two: Path, atol: float = 1e-4) -> None:
    """Same losses and gradient norms at every step and the same final weights, up to float
    rounding. (Adam's first steps move a weight by about lr whatever its gradient's size, so a
    gradient near 0 whose sign rounding flips moves it by 2 lr: LoRA's zero-initialised B.)"""
    first, second = read_metrics(one), read_metrics(two)
    assert [e["step"] for e in second] == [e["step"] for e in first], "logged once a step, by the main process"
    for a, b in zip(first, second):
        if "loss" in a:
            assert abs(a["loss"] - b["loss"]) <= 1e-5 * max(1.0, abs(a["loss"])), (a, b)
        if a.get("grad_norm") == a.get("grad_norm") and b.get("grad_norm") == b.get("grad_norm"):  # not nan
            assert abs(a["grad_norm"] - b["grad_norm"]) <= 1e-4 * a["grad_norm"] + 1e-7, (a, b)
    if atol is None:
        return
    expected, found = weights(one / "model"), weights(two / "model")
    assert expected.keys() == found.keys()
    for name in expected:
        # A pairwise loss gives a head's bias no gradient (it cancels in r_c - r_r): Adam turns
        # rounding noise into lr-sized steps there; it shifts every reward alike.
        limit = 1e-2 if name == "classifier.bias" else atol
        assert (expected[name] - found[name]).abs().max().item() < limit, name


# ---- the runs ------------------------------------------------------------------------------

ATOL = {"reward": 1e-4, "sft": 1e-4, "dpo": 5e-3}  # the final weights (dpo: LoRA, see assert_same_run)
RECIPES = {  # name -> (command, data maker, settings)
    "reward": (["reward", "train"], lambda: separable_pairs(30, seed=5, chat=True),
               ["model.max_length=48", "train.batch_size=6", "train.lr=2e-3"]),
    "sft": (["sft"], lambda: sft_rows(30, seed=6), ["model.max_length=48", "train.batch_size=5", "train.lr=2e-3"]),
    "dpo": (["dpo"], lambda: separable_pairs(30, seed=7, chat=True),
            ["model.max_length=48", "train.batch_size=5", "train.lr=2e-3", "model.lora_r=4",
             "model.lora_dropout=0"]),  # dropout masks depend on how a batch is split
}


def recipe_arguments(recipe: str, model: str, data: str, out: Path, *extra: str) -> list[str]:
    command, _, settings = RECIPES[recipe]
    return [*command, f"model.name={model}", f"data.train={data}", f"train.output_dir={out}", *settings,
            "train.grad_accum=2", "train.max_steps=4", "train.warmup_ratio=0.0", "train.save_every=2", *extra]


@pytest.fixture(scope="module")
def ddp_runs(tmp_path_factory, tiny_llama):
    """Every recipe on the tiny Llama, as 1 process and as 2 DDP processes."""
    root = tmp_path_factory.mktemp("ddp")
    runs = {}
    for recipe, (_, rows, _) in RECIPES.items():
        data = write_jsonl(root / f"{recipe}.jsonl", rows())
        one, two = root / f"{recipe}-one", root / f"{recipe}-two"
        assert main(recipe_arguments(recipe, tiny_llama, data, one)) == 0
        stdout = launch("cpu_2proc.yaml", recipe_arguments(recipe, tiny_llama, data, two))
        runs[recipe] = (one, two, stdout, data)
    return runs


@pytest.mark.slow
@pytest.mark.parametrize("recipe", list(RECIPES))
def test_two_ddp_processes_match_one_process(ddp_runs, recipe):
    one, two, stdout, _ = ddp_runs[recipe]
    assert "2 processes (MULTI_CPU on cpu)" in stdout
    assert stdout.count("saved ") == 1, "one process prints and saves"
    assert_same_run(one, two, ATOL[recipe])


@pytest.mark.slow
def test_fast_paths_run_under_ddp(ddp_runs):
    """Prompt sharing and the reply-only output layer run through DDP's forward (their
    gradients are synchronised: the weights above match one process)."""
    expected = {"reward": ["prompt sharing"], "sft": ["reply-only output layer"],
                "dpo": ["prompt sharing", "reply-only output layer"]}
    for recipe, paths in expected.items():
        one, two, _, _ = ddp_runs[recipe]
        assert read_metrics(one)[0]["paths"] == read_metrics(two)[0]["paths"] == paths, recipe


@pytest.mark.slow
@pytest.mark.parametrize("recipe", list(RECIPES))
def test_checkpoints_resume_on_another_process_count(ddp_runs, recipe, tmp_path, tiny_llama):
    """The 2-process run's step-2 checkpoint, resumed by one process, ends where both runs did."""
    one, two, _, data = ddp_runs[recipe]
    out = tmp_path / "resumed"
    (out / "checkpoints").mkdir(parents=True)
    shutil.copytree(two / "checkpoints" / "step-0000002", out / "checkpoints" / "step-0000002")
    shutil.copy(two / "metrics.jsonl", out / "metrics.jsonl")
    if (two / "reference_logps.pt").exists():
        shutil.copy(two / "reference_logps.pt", out / "reference_logps.pt")
    assert main(recipe_arguments(recipe, tiny_llama, data, out, "train.resume=true")) == 0
    assert_same_run(one, out, ATOL[recipe])


@pytest.fixture(scope="module")
def sharded_runs(tmp_path_factory, tiny_bert, tiny_llama):
    """The reward recipe (tiny BERT: the padding-free encoder path) and SFT (tiny Llama) under
    each sharded config, and as one process."""
    root = tmp_path_factory.mktemp("sharded")
    runs = {}
    for recipe, model in (("reward", tiny_bert), ("sft", tiny_llama)):
        data = write_jsonl(root / f"{recipe}.jsonl", RECIPES[recipe][1]())
        one = root / f"{recipe}-one"
        assert main(recipe_arguments(recipe, model, data, one)) == 0
        for config in SHARDED:
            out = root / f"{recipe}-{config}"
            runs[recipe, config] = (one, out, launch(config, recipe_arguments(recipe, model, data, out)))
    return runs


@pytest.mark.slow
@pytest.mark.parametrize("config", SHARDED)
@pytest.mark.parametrize("recipe", ["reward", "sft"])
def test_sharded_configs_match_one_process(sharded_runs, recipe, config):
    one, out, stdout = sharded_runs[recipe, config]
    kind = "FSDP" if config == "fsdp.yaml" else "DEEPSPEED"
    assert f"2 processes ({kind} on cpu)" in stdout
    assert_same_run(one, out)
    # The final model is one plain Hugging Face folder, gathered from the shards.
    from transformers import AutoConfig

    assert AutoConfig.from_pretrained(out / "model").model_type in ("bert", "llama")
    checkpoint = out / "checkpoints" / "step-0000004"
    assert (checkpoint / training.SHARDED_STATE).is_dir() and (checkpoint / "model.safetensors").exists()


@pytest.mark.slow
def test_which_encoder_path_runs_under_each_sharded_config(sharded_runs):
    """ZeRO-3 gathers a module's weights only when it is called, and the padding-free layers
    read their linear maps' weights without calling them: plain forward there. FSDP gathers
    a whole layer when it is called: the padding-free path runs."""
    expected = {"deepspeed_zero2.yaml": ["padding-free encoder"], "deepspeed_zero3.yaml": ["plain forward"],
                "fsdp.yaml": ["padding-free encoder"]}
    for config, paths in expected.items():
        one, out, _ = sharded_runs["reward", config]
        assert read_metrics(out)[0]["paths"] == paths, config
    assert read_metrics(one)[0]["paths"] == ["padding-free encoder"]


@pytest.mark.slow
def test_sharded_checkpoint_resumes_with_the_same_launch(sharded_runs, tiny_llama, tmp_path):
    one, out, _ = sharded_runs["sft", "deepspeed_zero2.yaml"]
    resumed = tmp_path / "resumed"
    (resumed / "checkpoints").mkdir(parents=True)
    shutil.copytree(out / "checkpoints" / "step-0000002", resumed / "checkpoints" / "step-0000002")
    shutil.copy(out / "metrics.jsonl", resumed / "metrics.jsonl")
    data = out.parent / "sft.jsonl"
    stdout = launch("deepspeed_zero2.yaml", recipe_arguments("sft", tiny_llama, str(data), resumed, "train.resume=true"))
    assert "resumed from" in stdout
    assert_same_run(one, resumed)
    # One process cannot take over sharded optimizer state: it says so.
    assert main(recipe_arguments("sft", tiny_llama, str(data), resumed, "train.resume=true",
                                 "train.max_steps=6")) == 2


# ---- one process ---------------------------------------------------------------------------

@pytest.mark.parametrize("recipe", list(RECIPES))
def test_accumulating_4_by_4_equals_one_batch_of_16(recipe, tmp_path, tiny_llama):
    """One optimizer step over the same 16 groups or examples: the same loss and gradient.
    SFT's loss weighs every reply token of the window alike (before: each micro-batch's mean)."""
    command, rows, settings = RECIPES[recipe]
    data = write_jsonl(tmp_path / "data.jsonl", rows()[:16])
    outs = []
    for batch, accumulate in ((16, 1), (4, 4)):
        out = tmp_path / f"b{batch}"
        assert main([*command, f"model.name={tiny_llama}", f"data.train={data}", f"train.output_dir={out}",
                     *settings, f"train.batch_size={batch}", f"train.grad_accum={accumulate}",
                     "train.max_steps=1", "train.warmup_ratio=0.0"]) == 0
        outs.append(out)
    assert_same_run(*outs, atol=None)


def test_lora_checkpoints_hold_the_adapter_the_final_model_is_merged(tmp_path, tiny_llama):
    data = write_jsonl(tmp_path / "sft.jsonl", sft_rows(8, seed=1))
    out = tmp_path / "run"
    assert main(["sft", f"model.name={tiny_llama}", f"data.train={data}", f"train.output_dir={out}",
                 "model.lora_r=4", "train.max_steps=2", "train.save_every=1", "train.batch_size=4"]) == 0
    checkpoint = out / "checkpoints" / "step-0000001"
    assert (checkpoint / "adapter" / "adapter_model.safetensors").exists()
    assert not (checkpoint / "model.safetensors").exists(), "no merged copy in a checkpoint"
    assert (out / "model" / "model.safetensors").exists() and (out / "model" / "adapter").is_dir()
    training.check_checkpoint(checkpoint)


def test_training_state_loads_without_pickle_and_old_checkpoints_say_so(tmp_path, tiny_bert):
    rows = separable_pairs(8, seed=3)
    data = write_jsonl(tmp_path / "pairs.jsonl", rows)
    out = tmp_path / "run"
    args = ["reward", "train", f"model.name={tiny_bert}", f"data.train={data}", f"train.output_dir={out}",
            "model.max_length=48", "train.batch_size=4", "train.max_steps=2", "train.save_every=1"]
    assert main(args) == 0
    checkpoint = out / "checkpoints" / "step-0000002"
    state = torch.load(checkpoint / training.STATE_FILE, weights_only=True)
    assert state["format"] == training.STATE_FORMAT and state["step"] == 2
    # A training state written as before (numpy's random state needs pickle).
    import numpy as np

    torch.save({"step": 2, "rng_numpy": np.random.get_state()}, checkpoint / training.STATE_FILE)
    with pytest.raises(training.EarlierFormatError, match="written by an earlier chatrlhf"):
        training.latest_checkpoint(out)
    assert main([*args, "train.resume=true", "train.max_steps=3"]) == 2


def test_dpo_reference_cache_loads_without_pickle(tmp_path, tiny_llama):
    data = write_jsonl(tmp_path / "pairs.jsonl", separable_pairs(8, seed=4, chat=True))
    out = tmp_path / "run"
    assert main(["dpo", f"model.name={tiny_llama}", f"data.train={data}", f"train.output_dir={out}",
                 "model.max_length=48", "train.batch_size=4", "train.max_steps=1"]) == 0
    cache = torch.load(out / "reference_logps.pt", weights_only=True)
    assert len(cache["train"]) == 8


# ---- a kill --------------------------------------------------------------------------------

@pytest.mark.slow
def test_two_processes_killed_with_sigkill_resume_to_the_uninterrupted_result(tmp_path, tiny_bert):
    data = write_jsonl(tmp_path / "pairs.jsonl", separable_pairs(40, seed=8))
    settings = ["model.max_length=48", "train.batch_size=5", "train.lr=2e-3", "train.max_steps=8",
                "train.save_every=1", "train.keep_checkpoints=2", "train.warmup_ratio=0.0", "train.resume=true"]
    arguments = lambda out: ["reward", "train", f"model.name={tiny_bert}", f"data.train={data}",  # noqa: E731
                             f"train.output_dir={out}", *settings]
    uninterrupted, killed = tmp_path / "uninterrupted", tmp_path / "killed"
    assert main(arguments(uninterrupted)) == 0
    process = subprocess.Popen(launch_command("cpu_2proc.yaml", arguments(killed)), env=ENV,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + 300
    while not (killed / "checkpoints" / "step-0000003").exists():
        assert process.poll() is None and time.monotonic() < deadline, "the run ended before the kill"
        time.sleep(0.05)
    os.killpg(process.pid, signal.SIGKILL)  # the launcher and both processes
    process.wait()
    assert not (killed / "model").exists()
    stdout = launch("cpu_2proc.yaml", arguments(killed))
    assert "resumed from" in stdout
    assert [e["step"] for e in read_metrics(killed)] == list(range(1, 9))
    assert_same_run(uninterrupted, killed)

"""Reward-model training throughput: chatrlhf against TRL's RewardTrainer, in one run.

    python bench/reward_throughput.py --case hh-minilm --steps 20
    python bench/reward_throughput.py --case all

Both train the same backbone, max length, batch size and threads, one epoch over the same data:
a seeded random sample of the file, as many groups as ``--steps`` batches of chatrlhf (its
batches are groups, TRL's are pairs). Each side first runs one untimed forward and backward on
a batch of the data's longest groups (pairs for TRL), then every step of the epoch is timed. The
warm-up grows each process's heap to about its peak, as the first steps of a long run do: a step
that needs more memory than any before it pays a page fault for every 4 KiB it touches first
(the largest of smollm2's 5 steps spent a third of its forward on them on the 2-core machine,
which a longer run pays once). TRL is
fed ids already cut the way chatrlhf cuts them (prompt from the left, alike for a group's
replies), so it drops nothing. For rankings TRL gets the C(K, 2) pairs expanded, as its users
must do. Printed per case: pairs/s, real tokens/s, peak memory, model-FLOPs utilisation against
a matmul peak measured here in the side's precision (6 x non-embedding parameters x real tokens
of the K sequences: with prompt sharing chatrlhf computes the shared prompt once, so its figure
can exceed what the hardware ran), and two ratios: against TRL at its defaults (gradient
checkpointing on) and against TRL at its fastest setting, gradient checkpointing off (its
RewardTrainer has no other speed setting), the figure that counts; each TRL side's exact settings
are printed. ``--checkpointing`` sets chatrlhf's side only (``on``: both on against TRL's
default; the peak memory at equal checkpointing is printed). ``--precision auto`` runs TRL in float32
(TRL's config would turn bf16 autocast on by default, on CPU too) and chatrlhf with ``train.bf16=auto`` as the main job's preset does (bf16 autocast where
the CPU computes it natively). Each
side runs in its own child process, so its peak resident memory is its own. Scoring is compared
too: every reply of the data scored by plain transformers in batches of 32 in file order (what a
user writes; TRL's trainer does the same) against ``chatrlhf reward score``'s sorted,
token-budget batches. ``--dropout`` keeps the backbone's dropout on both sides, ``--lora R``
trains LoRA adapters on both (chatrlhf's defaults; TRL through its ``peft_config``).
``--repeats N`` runs the three sides N times, alternating, and times each side by each step's fastest
run (every run takes the same steps on the same batches): on a shared
machine the speed drifts by more than a few percent, in bursts. The matmul peak is measured
before and after the runs and the higher kept, for the same reason.
Needs the benchmark extra: pip install -e '.[bench]'.
"""

from __future__ import annotations

import argparse
import json
import random
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from transformers import AutoModelForSequenceClassification

from chatrlhf import config as cfg_lib
from chatrlhf import models, training
from chatrlhf.config import RewardConfig
from chatrlhf.data import load, save
from chatrlhf.data.batching import collate, to_groups, tokenize_groups
from chatrlhf.recipes import reward

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"
CASES = {
    # name: (backbone, data file, reader options)
    "hh-minilm": ("minilm", SHARED / "hh-rlhf/harmless-base/train.jsonl.gz"),
    "oasst-minilm": ("minilm", SHARED / "oasst/en_80_tree.jsonl"),
    "hh-smollm2": ("smollm2-135m", SHARED / "hh-rlhf/harmless-base/train.jsonl.gz"),
}


def matmul_peak(dtype=torch.float32, n: int = 1024, repeats: int = 30) -> float:
    """Measured GFLOP/s of a square matmul, the best of a few timings."""
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    for _ in range(3):
        a @ b
    best = float("inf")
    for _ in range(5):
        start = time.perf_counter()
        for _ in range(repeats):
            a @ b
        best = min(best, (time.perf_counter() - start) / repeats)
    return 2 * n**3 / best / 1e9


def non_embedding_parameters(model) -> int:
    return sum(p.numel() for name, p in model.named_parameters() if "embed" not in name)


def peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def chatrlhf_run(backbone: str, data_file: Path, args, workdir: Path) -> dict:
    config = cfg_lib.load(RewardConfig, None, {
        "model": {"name": backbone, "max_length": args.max_length, "dropout": args.dropout, "lora_r": args.lora},
        "data": {"train": str(data_file), "allow_empty": True},
        "train": {"output_dir": str(workdir / "chatrlhf"), "epochs": 1,
                  "batch_size": args.batch, "lr": 1e-5, "warmup_ratio": 0.0,
                  "bf16": {"fp32": False, "bf16": True, "auto": "auto"}[args.precision],
                  "share_prompt": not args.no_share,
                  "gradient_checkpointing": args.checkpointing == "on"},
    })
    run = reward.setup(config)
    reward.save_checkpoint = lambda run, step: None  # timing the steps, not the saving
    largest = sorted(run.train_groups, key=lambda g: g.num_tokens)[-args.batch:]  # see the module's docstring
    warm_up = collate(largest, run.tokenizer.pad_token_id)
    run.model.train()  # as in training: gradient checkpointing acts in training mode only
    with run.engine.autocast():
        rewards = reward.forward_rewards(run.model, warm_up, config.train.share_prompt,
                                         run.tokenizer.pad_token_id, config.train.rows_per_forward)
    rewards.sum().backward()
    run.model.zero_grad(set_to_none=True)
    reward.fit(run)
    lines = (workdir / "chatrlhf" / "metrics.jsonl").read_text().splitlines()
    steps = [json.loads(line) for line in lines]
    dtype = "bf16" if training.use_bf16(config.train.bf16) else "fp32"
    return {**summarize(steps, non_embedding_parameters(run.model), dtype), "groups": len(run.train_groups)}


def trl_settings(fastest: bool) -> dict:
    """What one TRL side sets, everything else at TRL's defaults (and the settings both TRL sides
    share, printed apart). TRL's fastest setting here is its default with gradient checkpointing
    off: its RewardTrainer has no padding-free mode or other speed setting to turn on."""
    import trl

    return {"trl_version": trl.__version__, "gradient_checkpointing": not fastest}


def trl_run(backbone: str, groups, args, workdir: Path, fastest: bool = False) -> dict:
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import RewardConfig as TRLConfig
    from trl import RewardTrainer

    model, tokenizer = stock_reward_model(backbone)
    rows = []
    for group in groups:  # every ordered pair of every group, as TRL users expand rankings
        for i in range(len(group.replies)):
            for j in range(len(group.replies)):
                if group.ranks[i] < group.ranks[j]:
                    rows.append({"chosen_ids": group.input_ids[i], "rejected_ids": group.input_ids[j]})
    times, batches = [], []  # per step: seconds; (real tokens, pairs)

    class Timer(TrainerCallback):
        def on_step_begin(self, *a, **k):
            self.start = time.perf_counter()

        def on_step_end(self, *a, **k):
            times.append(time.perf_counter() - self.start)

    training_args = TRLConfig(output_dir=str(workdir / "trl"), per_device_train_batch_size=args.batch,
                              num_train_epochs=1, learning_rate=1e-5, report_to=[], save_strategy="no",
                              logging_strategy="no", max_length=None, use_cpu=True, bf16=args.precision == "bf16",
                              gradient_checkpointing=trl_settings(fastest)["gradient_checkpointing"],
                              dataloader_num_workers=0, disable_tqdm=True, disable_dropout=False)
    if not args.dropout:  # here, not by TRL's disable_dropout, which would also zero LoRA's dropout
        models.disable_dropout(model)
    lora = cfg_lib.ModelConfig(lora_r=args.lora).lora()  # chatrlhf's LoRA defaults, for both sides
    if lora:
        from peft import LoraConfig, TaskType

        lora = LoraConfig(task_type=TaskType.SEQ_CLS, **lora)
    trainer = RewardTrainer(model=model, args=training_args, processing_class=tokenizer,
                            train_dataset=Dataset.from_list(rows), callbacks=[Timer()], peft_config=lora)
    collator = trainer.data_collator

    def counting_collator(examples):
        batch = collator(examples)
        batches.append((int(batch["attention_mask"].sum()), len(examples)))
        return batch

    trainer.data_collator = counting_collator
    warm_up = collator(sorted(rows, key=lambda r: len(r["chosen_ids"]) + len(r["rejected_ids"]))[-args.batch:])
    trainer.model.train()
    if training_args.gradient_checkpointing:  # the Trainer turns it on in train(); so must the warm-up
        trainer.model.gradient_checkpointing_enable(training_args.gradient_checkpointing_kwargs)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.precision == "bf16"):
        rewards = trainer.model(input_ids=warm_up["input_ids"], attention_mask=warm_up["attention_mask"]).logits
    rewards.sum().backward()
    trainer.model.zero_grad(set_to_none=True)
    trainer.train()
    steps = [{"seconds": s, "tokens": t, "pairs": p} for s, (t, p) in zip(times, batches)]
    return {**summarize(steps, non_embedding_parameters(model), "bf16" if args.precision == "bf16" else "fp32"),
            "settings": trl_settings(fastest)}


def stock_reward_model(backbone: str):
    """The backbone as plain transformers loads it, with PyTorch's own dropout layers."""
    tokenizer = models.load_tokenizer(backbone)
    model = AutoModelForSequenceClassification.from_pretrained(models.resolve(backbone), num_labels=1,
                                                               dtype=torch.float32)
    model.config.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer


@torch.inference_mode()
def plain_scoring(backbone: str, groups) -> float:
    """Seconds to score every reply with plain transformers: batches of 32 in file order."""
    model, tokenizer = stock_reward_model(backbone)
    model.eval()
    sequences = [ids for g in groups for ids in g.input_ids]
    start = time.perf_counter()
    for i in range(0, len(sequences), 32):
        batch = tokenizer.pad({"input_ids": sequences[i:i + 32]}, return_tensors="pt")
        model(**batch)
    return time.perf_counter() - start


def our_scoring(backbone: str, groups) -> float:
    model, tokenizer = models.load_reward_model(backbone)
    start = time.perf_counter()
    reward.score_groups(model, groups, tokenizer.pad_token_id)
    return time.perf_counter() - start


def summarize(steps: list[dict], params: int, dtype: str) -> dict:
    """One run of one side: each step's seconds and real tokens, and the pairs of all of them."""
    return {"seconds": [s["seconds"] for s in steps], "step_tokens": [s["tokens"] for s in steps],
            "pairs": sum(s["pairs"] for s in steps), "params": params, "peak_mib": peak_mib(), "dtype": dtype}


def fastest(runs: list[dict]) -> dict:
    """One side's runs of the same steps, timed by each step's fastest run."""
    if any(r["step_tokens"] != runs[0]["step_tokens"] or r["pairs"] != runs[0]["pairs"] for r in runs):
        raise RuntimeError("the runs of one side took different steps; their times cannot be compared step by step")
    seconds = sum(map(min, zip(*(r["seconds"] for r in runs))))
    run = runs[0]
    tokens = sum(run["step_tokens"])
    return {**run, "pairs_per_s": run["pairs"] / seconds, "tokens_per_s": tokens / seconds,
            "gflops": 6 * run["params"] * tokens / seconds / 1e9, "peak_mib": max(r["peak_mib"] for r in runs)}


def pairs_per_s(run: dict) -> float:
    return run["pairs"] / sum(run["seconds"])


def load_groups(backbone: str, data_file: Path, max_length: int, count: int):
    """A seeded random sample of ``count`` records of the file (the same for both sides), and
    their groups tokenised as chatrlhf does."""
    tokenizer = models.load_tokenizer(backbone)
    records = load(data_file, allow_empty=True).records
    records = random.Random(0).sample(records, min(count, len(records)))
    groups = to_groups(records)
    tokenize_groups(groups, tokenizer, max_length, same_prompt=True)  # as reward.load_groups
    return records, groups


def side(args) -> dict:
    """One side of one case, run in this (child) process."""
    backbone, data_file = CASES[args.case]
    training.keep_freed_memory()  # as the chatrlhf command does; the same for TRL's side
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        count = args.score_groups if args.side == "scoring" else args.steps * args.batch
        records, groups = load_groups(backbone, data_file, args.max_length, count)
        if args.side == "chatrlhf":
            save(records, workdir / "data.jsonl")  # the same records, in the project's format
            return chatrlhf_run(backbone, workdir / "data.jsonl", args, workdir)
        if args.side in ("trl", "trl-fastest"):
            return trl_run(backbone, groups, args, workdir, fastest=args.side == "trl-fastest")
        return {"replies": sum(len(g.replies) for g in groups),
                "plain": plain_scoring(backbone, groups), "chatrlhf": our_scoring(backbone, groups)}


def in_child(args, which: str) -> dict:
    command = [sys.executable, __file__, "--side", which, *sys.argv[1:]]
    command[command.index("--case") + 1] = args.case
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(f"{which} on {args.case} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--case", choices=[*CASES, "all"], default="hh-minilm")
    parser.add_argument("--steps", type=int, default=30, help="chatrlhf's steps: steps x batch groups are sampled and "
                        "trained one epoch by each side")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--max-length", type=int, default=256)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--precision", choices=["fp32", "bf16", "auto"], default="fp32",
                        help="fp32 or bf16 autocast on both sides; auto: TRL in fp32, "
                             "chatrlhf with train.bf16=auto (bf16 where the CPU computes it natively)")
    parser.add_argument("--no-share", action="store_true", help="chatrlhf without prompt sharing (decoders)")
    parser.add_argument("--checkpointing", choices=["default", "on", "off"], default="default",
                        help="chatrlhf's gradient checkpointing: on, off, or its default (off). TRL always runs "
                             "twice, at its default (on) and at its fastest setting (off), so 'on' compares "
                             "both on against TRL's default and 'off' both off against TRL's fastest")
    parser.add_argument("--dropout", action="store_true", help="keep the backbone's dropout on both sides (both "
                        "turn it off by default; LoRA's own dropout stays on both); TRL runs PyTorch's dropout "
                        "layers, chatrlhf its own")
    parser.add_argument("--lora", type=int, default=0, metavar="R", help="LoRA of rank R on both sides, with "
                        "chatrlhf's defaults (alpha 16, dropout 0.05, every linear map); MFU still counts 6 x "
                        "parameters x tokens, as for full training")
    parser.add_argument("--score-groups", type=int, default=400, help="groups scored in the scoring test")
    parser.add_argument("--repeats", type=int, default=1, help="run both sides this many times, alternating, "
                        "and time each side by each step's fastest run")
    parser.add_argument("--side", choices=["chatrlhf", "trl", "trl-fastest", "scoring"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.side:
        print(json.dumps(side(args)))
        return 0
    if "--case" not in sys.argv:
        sys.argv += ["--case", args.case]
    cases = list(CASES) if args.case == "all" else [args.case]
    # Only the precisions the sides run in: where the CPU emulates bf16 its peak alone takes minutes.
    names = {"fp32": ["fp32"], "bf16": ["bf16"], "auto": ["fp32", "bf16"] if training.native_bf16() else ["fp32"]}
    dtypes = {"fp32": torch.float32, "bf16": torch.bfloat16}
    peaks = {name: matmul_peak(dtypes[name]) for name in names[args.precision]}
    for case in cases:
        args.case = case
        if not CASES[case][1].exists():
            print(f"{case}: skipped, {CASES[case][1]} is absent")
            continue
        # Alternating runs, each step's fastest kept: a shared machine's speed drifts by more than
        # the differences measured, and alternating puts both sides through the same drift.
        sides = {"TRL default": "trl", "TRL fastest": "trl-fastest", "chatrlhf": "chatrlhf"}
        runs = [{name: in_child(args, which) for name, which in sides.items()} for _ in range(args.repeats)]
        results = {name: fastest([run[name] for run in runs]) for name in sides}
        ours = results["chatrlhf"]
        peaks = {name: max(peak, matmul_peak(dtypes[name])) for name, peak in peaks.items()}
        print(f"matmul peak ({args.threads} threads, the higher of before and after): "
              + ", ".join(f"{name} {peak:.1f}" for name, peak in peaks.items()) + " GFLOP/s")
        checkpointing = "on" if args.checkpointing == "on" else "off"
        print(f"\n{case}: {ours['groups']} groups sampled, batch {args.batch}, max length {args.max_length}, "
              f"chatrlhf's gradient checkpointing: {checkpointing}, dropout: {'on' if args.dropout else 'off'}"
              + (f", LoRA rank {args.lora}" if args.lora else ""))
        print(f"{'':12} {'pairs/s':>9} {'tokens/s':>9} {'peak MiB':>9} {'MFU':>7} precision")
        for name, result in results.items():
            print(f"{name:12} {result['pairs_per_s']:9.2f} {result['tokens_per_s']:9.0f} "
                  f"{result['peak_mib']:9.0f} {result['gflops'] / peaks[result['dtype']]:7.1%} {result['dtype']}")
        for name in ("TRL default", "TRL fastest"):
            print(f"chatrlhf/{name} training pairs/s: {ours['pairs_per_s'] / results[name]['pairs_per_s']:.2f}x"
                  + ("  <- the figure that counts" if name == "TRL fastest" else ""))
            if args.repeats > 1:
                print("  each run's ratio: " + ", ".join(f"{pairs_per_s(r['chatrlhf']) / pairs_per_s(r[name]):.2f}x"
                                                        for r in runs) + f"; above, each step's fastest of {args.repeats} runs")
        for name in ("TRL default", "TRL fastest"):
            print(f"{name} settings (the rest TRL's defaults): {json.dumps(results[name]['settings'])}")
        print(f"  both TRL sides also: bf16={args.precision == 'bf16'} (TRL's own default is bf16 autocast on CPU), "
              "disable_dropout=False (dropout set as chatrlhf's, LoRA's kept), max_length=None (ids come cut), "
              "use_cpu, fused AdamW (its default)")
        equal = results["TRL default" if checkpointing == "on" else "TRL fastest"]
        print(f"peak memory at equal gradient checkpointing ({checkpointing} on both): chatrlhf "
              f"{ours['peak_mib']:.0f} MiB, TRL {equal['peak_mib']:.0f} MiB"
              + ("" if checkpointing == "on" else "; run --checkpointing on for both on"))
        scoring = in_child(args, "scoring")
        print(f"scoring {scoring['replies']} replies: plain transformers {scoring['plain']:.1f} s, "
              f"chatrlhf {scoring['chatrlhf']:.1f} s, {scoring['plain'] / scoring['chatrlhf']:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())

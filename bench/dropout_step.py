"""Reward-training steps with chatrlhf's CPU dropout against PyTorch's, in one process.

    python bench/dropout_step.py --lora 16              # LoRA's own dropout (0.05 by default)
    python bench/dropout_step.py --dropout              # full training, the backbone's dropout kept

The same model trains on the same HH batches (MiniLM, batch 16, max length 256); each batch's
step runs once with each dropout, alternating, ``--repeats`` times, and each side is timed by
each step's fastest run. The reference swaps ``chatrlhf.dropout.dropout`` (every dropout layer
of a loaded model calls it, the encoders' attention dropout included) for
``torch.nn.functional.dropout``.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from chatrlhf import config as cfg_lib
from chatrlhf import dropout as dropout_lib
from chatrlhf.config import RewardConfig
from chatrlhf.data import save
from chatrlhf.data.batching import bucketed_batches, collate
from chatrlhf.recipes import reward

sys.path.insert(0, str(Path(__file__).parent))
from reward_throughput import CASES, load_groups  # noqa: E402


def pytorch_dropout(x, p, training=True, inplace=False):
    return F.dropout(x, p, training, inplace)


def use(function) -> None:
    dropout_lib.dropout = function


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lora", type=int, default=0, metavar="R", help="LoRA rank (chatrlhf's defaults otherwise)")
    parser.add_argument("--dropout", action="store_true", help="keep the backbone's dropout")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    backbone, data_file = CASES["hh-minilm"]
    if not data_file.exists():
        print(f"skipped: {data_file} is absent")
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        records, _ = load_groups(backbone, data_file, 256, args.steps * 16)
        save(records, Path(tmp) / "data.jsonl")
        config = cfg_lib.load(RewardConfig, None, {
            "model": {"name": backbone, "lora_r": args.lora, "dropout": args.dropout},
            "data": {"train": str(Path(tmp) / "data.jsonl"), "allow_empty": True},
            "train": {"output_dir": str(Path(tmp) / "out"), "batch_size": 16, "bf16": False}})
        run = reward.setup(config)
    run.model.train()
    batches = [collate([run.train_groups[i] for i in batch], run.tokenizer.pad_token_id)
               for batch in bucketed_batches(run.train_groups, 16, 0, 0)][:args.steps]

    def step(batch) -> float:
        start = time.perf_counter()
        rewards = reward.forward_rewards(run.model, batch, config.train.share_prompt, run.tokenizer.pad_token_id,
                                         config.train.rows_per_forward)
        reward.group_loss(rewards, batch, config, 0.0).backward()
        run.optimizer.step()
        run.optimizer.zero_grad(set_to_none=True)
        return time.perf_counter() - start

    sides = {"PyTorch": pytorch_dropout, "chatrlhf": dropout_lib.dropout}
    for function in sides.values():  # warm-up
        use(function)
        step(batches[0])
    best = {name: [float("inf")] * len(batches) for name in sides}
    for _ in range(args.repeats):
        for i, batch in enumerate(batches):
            for name, function in sides.items():
                use(function)
                best[name][i] = min(best[name][i], step(batch))
    use(sides["chatrlhf"])
    probabilities = sorted({m.p for m in run.model.modules() if isinstance(m, torch.nn.Dropout) and m.p})
    print(f"MiniLM, LoRA rank {args.lora or 'off'}, backbone dropout {'on' if args.dropout else 'off'}, "
          f"dropout probabilities {probabilities}; {len(batches)} HH batches of 16, each step's best of {args.repeats}")
    seconds = {name: sum(times) / len(times) for name, times in best.items()}
    for name, s in seconds.items():
        print(f"{name:9} dropout: {s:.3f} s a step")
    print(f"chatrlhf/PyTorch: {seconds['PyTorch'] / seconds['chatrlhf']:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())

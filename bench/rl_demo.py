"""PPO, GRPO and RLOO on HH harmless prompts at the same budget of generated tokens: the docs' demo table.

    python bench/rl_demo.py --reward-model runs/reward_hh_minilm/model --judge runs/reward_general_minilm/model

Each run takes 16 steps of 8 sampled replies of at most 16 tokens (128 replies): PPO as
configs/ppo_hh_smollm2.yaml (8 prompts x 1 reply), GRPO and RLOO as configs/grpo_hh_smollm2.yaml
with 2 prompts x 4 replies. Every run's held-out replies (24 HH harmless dev prompts, the same
sampling seeds at every evaluation) before and after are scored again here by the training reward
model (raw, without PPO's normalisation) and by a judge not trained against (``--judge``), so the
three runs are read on one scale. Printed: mean and standard error of both, the KL to the
reference (each run's own log), and two replies before/after per run.
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RUNS = {
    "ppo": ["ppo", str(ROOT / "configs/ppo_hh_smollm2.yaml")],
    "grpo": ["grpo", str(ROOT / "configs/grpo_hh_smollm2.yaml"), "grpo.prompts_per_step=2", "train.steps=16"],
    "rloo": ["grpo", str(ROOT / "configs/grpo_hh_smollm2.yaml"), "grpo.prompts_per_step=2", "train.steps=16",
             "grpo.algorithm=rloo"],
}


def mean_sem(values: list[float]) -> str:
    n = len(values)
    mean = sum(values) / n
    return f"{mean:.3f} ± {math.sqrt(sum((v - mean) ** 2 for v in values) / max(n - 1, 1) / n):.3f}"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reward-model", default="runs/reward_hh_minilm/model")
    parser.add_argument("--judge", default="runs/reward_general_minilm/model")
    parser.add_argument("--out", default="runs/rl_demo")
    parser.add_argument("--runs", default="ppo,grpo,rloo")
    args = parser.parse_args(argv)
    from chatrlhf.api import RewardModel

    scorers = {"reward": RewardModel.load(args.reward_model), "judge": RewardModel.load(args.judge)}
    for name in args.runs.split(","):
        out = Path(args.out) / name
        if not (out / "metrics.jsonl").exists():
            subprocess.run([sys.executable, "-m", "chatrlhf", *RUNS[name], f"reward.model={args.reward_model}",
                            f"train.output_dir={out}", "train.eval_every=16", "train.overwrite=true",
                            *([f"eval.judge={args.judge}"] if name != "ppo" else [])], check=True)
        rows = [json.loads(line) for line in (out / "eval_samples.jsonl").read_text().splitlines()]
        metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        kl = {m["step"]: m["eval_kl"] for m in metrics if "eval_kl" in m}
        for step in (0, max(r["step"] for r in rows)):
            at = [r for r in rows if r["step"] == step]
            prompts, replies = [r["prompt"] for r in at], [r["reply"] for r in at]
            cells = [mean_sem(scorer.score(prompts, replies)) for scorer in scorers.values()]
            print(f"| {name} | {step} | {cells[0]} | {cells[1]} | {kl.get(step, 0.0):.2f} |"
                  f" {sum(len(r.split()) for r in replies) / len(replies):.1f} |", flush=True)
            for r in at[:2]:
                print(f"    {name} step {step}: {r['prompt'][-80:]!r} -> {r['reply']!r}")


if __name__ == "__main__":
    main()

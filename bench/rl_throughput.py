"""RL step time: chatrlhf's GRPO against TRL's GRPOTrainer, in one run.

    python bench/rl_throughput.py --plot runs/rl_rewards.png            # 20 steps, the real figures
    python bench/rl_throughput.py --steps 2 --trl-default-steps 2       # a quick check that it works
    python bench/rl_throughput.py --sides chatrlhf,chatrlhf-no-cache,chatrlhf-no-share   # what sharing saves
    python bench/rl_throughput.py --sides chatrlhf,chatrlhf-no-decoder --steps 6         # what decoding.py saves

Every side trains ``smollm2-135m`` with the same LoRA (r 16, alpha 32, dropout 0, every linear map)
for the same steps on the same prompts: HH harmless train prompts as configs/grpo_hh_smollm2.yaml
selects them (at most 64 prompt tokens, longer ones dropped), P prompts per step in chatrlhf's
order (TRL reads them in that order, unshuffled), K replies each, at most ``--max-new-tokens``,
temperature 1, top-p 1; the same threads, precision (bf16 autocast where the CPU computes it
natively, else float32, on both), learning rate, constant schedule, AdamW, no dropout; and the same
algorithm settings, printed: GRPO advantages (r - mean) / (std + 1e-4) over the group, the loss's
token weighting (``--loss-type``: TRL's loss_type, chatrlhf's grpo.loss_aggregation), beta with the
k3 KL (the reference: the policy with its adapter off), clipping epsilon, num_iterations.

The reward is the same on both sides: chatrlhf's scorer of the MiniLM reward model
(``--reward-model``, default the main job's runs/reward_hh_minilm/model), given the original HH
prompt and the reply text. TRL gets it as a reward function (the prompt comes as a dataset column):
TRL's own handling of a classifier reward model would feed it prompt + completion as one text, not
the [CLS] prompt [SEP] reply [SEP] it was trained on.

Sides, each in its own child process: ``chatrlhf`` (recipes/grpo.py: the prompt's KV cache shared
by its K samples, the K replies' log-probabilities with their prompt computed once);
``chatrlhf-no-cache``, ``chatrlhf-no-share`` (each without one of the two) and
``chatrlhf-no-decoder`` (decoding through the model's own forward instead of decoding.py's step); ``trl-default``
(TRL's GRPOConfig defaults, gradient checkpointing on, only the settings above changed) and
``trl-fastest`` (the same, gradient checkpointing off). Seconds per step are split into generation,
scoring and training (chatrlhf: the reference pass, the policy's forward and backward and the
optimizer step; TRL: everything of the step that is not generate() or the reward call, the
reference and old log-probabilities included); the first step is a warm-up, left out of the means.
Printed: each side's seconds per step and split, its peak resident memory, the ratio of TRL's to chatrlhf's (TRL default,
TRL fastest: the figure that counts), and the exact TRL settings. ``--plot FILE`` draws each
side's mean reward per step, side by side. Needs the benchmark extra: pip install -e '.[bench]'.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
from reward_throughput import peak_mib  # noqa: E402
PRESET = ROOT / "configs" / "grpo_hh_smollm2.yaml"
SIDES = ["chatrlhf", "chatrlhf-no-cache", "chatrlhf-no-share", "chatrlhf-no-decoder", "trl-default", "trl-fastest"]
# TRL's loss_type -> chatrlhf's grpo.loss_aggregation (the same token weighting)
LOSS_TYPES = {"dapo": "token_mean", "bnpo": "token_mean", "grpo": "sequence_mean", "dr_grpo": "constant"}
LORA = {"r": 16, "lora_alpha": 32, "lora_dropout": 0.0, "target_modules": "all-linear"}


def arguments(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--trl-default-steps", type=int, default=6,
                        help="steps of the slow trl-default side (its time per step, not a curve)")
    parser.add_argument("--prompts", type=int, default=4, help="P: prompts per step")
    parser.add_argument("--k", type=int, default=4, help="K: replies per prompt")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--beta", type=float, default=0.04, help="KL coefficient (TRL's README value)")
    parser.add_argument("--loss-type", default="dapo", choices=sorted(LOSS_TYPES), help="TRL's default: dapo")
    parser.add_argument("--epsilon", type=float, default=0.2)
    parser.add_argument("--num-iterations", type=int, default=1)
    parser.add_argument("--lr", type=float, default=5e-4)
    parser.add_argument("--threads", type=int, default=None, help="default: torch's default here")
    parser.add_argument("--reward-model", default=str(ROOT / "runs" / "reward_hh_minilm" / "model"))
    parser.add_argument("--sides", default="chatrlhf,trl-default,trl-fastest")
    parser.add_argument("--plot", help="PNG of every side's mean reward per step")
    parser.add_argument("--side", help=argparse.SUPPRESS)  # run one side (in a child process)
    args = parser.parse_args(argv)
    import torch

    args.threads = args.threads or torch.get_num_threads()
    return args


def reward_model_path(args) -> str:
    if Path(args.reward_model).exists() or args.reward_model == "minilm":
        return args.reward_model
    print(f"note: {args.reward_model} is absent (train it: chatrlhf reward train configs/reward_hh_minilm.yaml); "
          "using MiniLM with an untrained head: the times hold, the reward curves mean nothing", file=sys.stderr)
    return "minilm"


def step_prompts(args):
    """Each step's P prompts in chatrlhf's order, as the preset selects them."""
    from chatrlhf import config as cfg_lib, models
    from chatrlhf.config import GRPOConfig
    from chatrlhf.recipes import ppo

    config = cfg_lib.load(GRPOConfig, PRESET)
    tokenizer = models.load_tokenizer(config.policy.name)
    items = ppo.load_prompts(config.data.train, config, tokenizer, None, lambda *a, **k: None)
    return [[item.prompt for item in ppo.step_prompts(items, step, args.prompts, config.train.seed)]
            for step in range(args.steps)]


def bf16() -> bool:
    from chatrlhf import training

    return training.native_bf16()


# ---- chatrlhf -------------------------------------------------------------------------------

def chatrlhf_run(args, workdir: Path, side: str) -> dict:
    from chatrlhf import config as cfg_lib
    from chatrlhf.config import GRPOConfig
    from chatrlhf.recipes import grpo

    config = cfg_lib.load(GRPOConfig, PRESET, {
        "policy": {"lora_r": LORA["r"], "lora_alpha": LORA["lora_alpha"], "lora_dropout": 0.0},
        "reward": {"model": reward_model_path(args)},
        "data": {"dev": None},
        "generation": {"max_new_tokens": args.max_new_tokens, "temperature": 1.0, "top_p": 1.0,
                       "share_prompt_cache": side != "chatrlhf-no-cache", "fast_decoder": side != "chatrlhf-no-decoder"},
        "grpo": {"algorithm": "grpo", "prompts_per_step": args.prompts, "group_size": args.k, "beta": args.beta,
                 "kl_estimator": "k3", "clip_range": args.epsilon, "num_iterations": args.num_iterations,
                 "loss_aggregation": LOSS_TYPES[args.loss_type]},
        "eval": {"judge": None},
        "train": {"output_dir": str(workdir / "run"), "steps": args.steps, "lr": args.lr, "schedule": "constant",
                  "warmup_ratio": 0.0, "eval_every": 0, "sample_every": 0, "save_every": 0, "overwrite": True,
                  "bf16": bf16(), "share_prompt": side != "chatrlhf-no-share", "max_grad_norm": 1.0}})
    grpo.train(config)
    rows = [json.loads(line) for line in (workdir / "run" / "metrics.jsonl").read_text().splitlines()]
    return {"rewards": [r["reward"] for r in rows],
            "steps": [{"total": r["seconds"], "generation": r["time_generation"], "scoring": r["time_scoring"],
                       "training": r["time_reference"] + r["time_training"]} for r in rows]}


# ---- TRL ------------------------------------------------------------------------------------

def trl_settings(args, fastest: bool, steps: int) -> dict:
    """Everything given to TRL's GRPOConfig; the rest is TRL's default."""
    return {"max_steps": steps, "per_device_train_batch_size": args.prompts * args.k, "num_generations": args.k,
            "max_completion_length": args.max_new_tokens, "temperature": 1.0, "top_p": 1.0,
            "beta": args.beta, "loss_type": args.loss_type, "epsilon": args.epsilon,
            "num_iterations": args.num_iterations, "scale_rewards": "group", "learning_rate": args.lr,
            "lr_scheduler_type": "constant", "warmup_steps": 0, "max_grad_norm": 1.0, "bf16": bf16(),
            "gradient_checkpointing": not fastest, "disable_dropout": True, "shuffle_dataset": False,
            "use_cpu": True, "seed": 42, "logging_steps": 1, "save_strategy": "no", "report_to": "none"}


def trl_run(args, workdir: Path, fastest: bool) -> dict:
    import trl
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import TrainerCallback

    from chatrlhf import models, policy, training
    from chatrlhf.api import RewardModel

    steps = args.steps if fastest else min(args.steps, args.trl_default_steps)
    prompts = [p for step in step_prompts(args)[:steps] for p in step]
    # Conversational prompts: TRL renders them with the same chat template; the HH text rides along
    # for the reward.
    dataset = Dataset.from_list([{"prompt": policy.chat_messages(p), "hh_prompt": p} for p in prompts])
    training.seed_everything(42)  # as grpo.setup before it loads the reward model (an untrained head: the same)
    scorer = RewardModel.load(reward_model_path(args))
    times = {"generation": [], "scoring": [], "total": []}
    rewards = []

    def chatrlhf_reward(prompts, completions, hh_prompt, **kwargs):
        started = time.perf_counter()
        texts = [c if isinstance(c, str) else "".join(m["content"] for m in c) for c in completions]
        scores = scorer.score(hh_prompt, [t.strip() for t in texts])
        rewards.append(sum(scores) / len(scores))
        times["scoring"].append(time.perf_counter() - started)
        return scores

    class Timed(trl.GRPOTrainer):
        def _generate(self, *a, **k):
            started = time.perf_counter()
            try:
                return super()._generate(*a, **k)
            finally:
                times["generation"].append(time.perf_counter() - started)

    class StepTimer(TrainerCallback):
        def on_step_begin(self, *a, **k):
            self.started = time.perf_counter()

        def on_step_end(self, *a, **k):
            times["total"].append(time.perf_counter() - self.started)

    settings = trl_settings(args, fastest, steps)
    trainer = Timed(model=models.resolve("smollm2-135m"), reward_funcs=chatrlhf_reward, train_dataset=dataset,
                    args=trl.GRPOConfig(output_dir=str(workdir / "trl"), **settings),
                    peft_config=LoraConfig(task_type="CAUSAL_LM", **LORA), callbacks=[StepTimer()])
    trainer.train()
    return {"rewards": rewards, "settings": {"trl": trl.__version__, **settings},
            "steps": [{"total": t, "generation": g, "scoring": s, "training": t - g - s}
                      for t, g, s in zip(times["total"], times["generation"], times["scoring"])]}


# ---- the run --------------------------------------------------------------------------------

def side(args) -> dict:
    import torch

    from chatrlhf import training

    torch.set_num_threads(args.threads)
    training.keep_freed_memory()  # as the chatrlhf command does; the same for TRL's side
    with tempfile.TemporaryDirectory() as tmp:
        run = (chatrlhf_run(args, Path(tmp), args.side) if args.side.startswith("chatrlhf")
               else trl_run(args, Path(tmp), fastest=args.side == "trl-fastest"))
    return {**run, "peak_mib": peak_mib()}  # the child's own peak: each side runs in its own process


def in_child(args, which: str) -> dict:
    passed = [f"--{key.replace('_', '-')}={value}" for key, value in vars(args).items()
              if value is not None and key not in ("plot", "side", "sides")]
    started = time.perf_counter()
    done = subprocess.run([sys.executable, __file__, *passed, "--side", which],
                          capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(f"{which} failed:\n{done.stderr[-4000:]}")
    return {**json.loads(done.stdout.strip().splitlines()[-1]), "wall_s": time.perf_counter() - started}


def mean_split(run: dict) -> dict:
    timed = run["steps"][1:] or run["steps"]  # the first step is a warm-up
    return {key: sum(s[key] for s in timed) / len(timed) for key in ("total", "generation", "scoring", "training")}


def plot(path: str, results: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shown = {name: run for name, run in results.items() if name in ("chatrlhf", "trl-fastest", "trl-default")}
    fig, axes = plt.subplots(1, len(shown), figsize=(4.5 * len(shown), 3.6), sharey=True, squeeze=False)
    for ax, (name, run) in zip(axes[0], shown.items()):
        ax.plot(range(1, len(run["rewards"]) + 1), run["rewards"], marker="o")
        ax.set(title=name, xlabel="step", ylabel="mean reward of the step's replies")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"reward curves: {path}")


def main(argv=None) -> int:
    args = arguments(argv)
    if args.side:
        print(json.dumps(side(args)))
        return 0
    args.reward_model = reward_model_path(args)  # the children get the one resolved here
    sides = args.sides.split(",")
    unknown = set(sides) - set(SIDES)
    if unknown:
        raise SystemExit(f"unknown sides {sorted(unknown)}; choose from {SIDES}")
    print(f"GRPO, smollm2-135m + LoRA {LORA}, {args.prompts} prompts x {args.k} replies x {args.max_new_tokens} "
          f"new tokens, {args.steps} steps ({args.trl_default_steps} for trl-default), {args.threads} threads, "
          f"bf16 {bf16()}\nalgorithm, both sides: GRPO group advantages, loss_type {args.loss_type} (chatrlhf "
          f"loss_aggregation {LOSS_TYPES[args.loss_type]}), beta {args.beta} (k3), epsilon {args.epsilon}, "
          f"num_iterations {args.num_iterations}, lr {args.lr} constant; reward: chatrlhf's scorer of "
          f"{args.reward_model}", flush=True)
    results = {}
    for which in sides:
        results[which] = run = in_child(args, which)
        split = mean_split(run)
        print(f"{which:18s} {split['total']:7.2f} s/step: generation {split['generation']:6.2f}, scoring "
              f"{split['scoring']:5.2f}, training {split['training']:6.2f}  (whole child {run['wall_s']:.0f} s, "
              f"peak {run['peak_mib']:.0f} MiB; mean reward first/last step {run['rewards'][0]:.3f} / {run['rewards'][-1]:.3f})", flush=True)
        if "settings" in run:
            print(f"  TRL settings given (the rest TRL's defaults): {json.dumps(run['settings'])}")
    base = results.get("chatrlhf")
    if base:
        ours = mean_split(base)["total"]
        for which in SIDES[1:]:  # every other side against chatrlhf
            if which in results:
                theirs = mean_split(results[which])
                print(f"{which} / chatrlhf: {theirs['total'] / ours:.2f}x per step "
                      f"(generation {theirs['generation'] / max(mean_split(base)['generation'], 1e-9):.2f}x, "
                      f"training {theirs['training'] / max(mean_split(base)['training'], 1e-9):.2f}x)")
    if base and "trl-fastest" in results:
        print(f"peak memory at equal settings (gradient checkpointing off on both): chatrlhf {base['peak_mib']:.0f} MiB, "
              f"TRL fastest {results['trl-fastest']['peak_mib']:.0f} MiB")
    if args.plot:
        plot(args.plot, results)
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT / "src"))
    raise SystemExit(main())

"""Absolute scores or comparisons? One backbone trained both ways on the same human judgements.

    chatrlhf reward compare --data ../shared/data/dialsummeval/human_judgment.jsonl \\
        --reader dialsummeval --output runs/compare --rater-noise 0,1.0 [train.lr=1e-4 ...]

Steps, for each rater-noise level:
1. split prompts (not samples) into train / held-out with a seeded shuffle (once, for all levels);
2. perturb the training scores (simulated labellers, below); write two training files into the
   output folder: z-scored scores (train mean / std) for ``loss.objective=regression``, and the
   scores as they are for ``comparisons``, which ``to_groups`` turns into one ranking per prompt
   (equal scores are ties);
3. ``reward.train`` both with the same budget: the same steps, learning rate, schedule and
   max_length, and the same replies per step (a comparison batch of B prompts with K replies each
   is matched by a regression batch of B * K scored samples);
4. score the held-out prompts and measure pairwise accuracy and mean Kendall tau against the clean
   human ordering, with 95% bootstrap intervals (prompts resampled).

Simulated uncalibrated labellers (``--rater-noise``): each labeller gets an offset ~ N(0, level)
and a scale exp(N(0, level / 2)), applied to their scores around the mean score before the
scores of a sample are averaged. With ``--rater-pool per-prompt`` (the default) rater i of each
prompt is a different labeller, as in a labelling pool; with ``fixed`` rater i is the same person
everywhere, and an offset then moves every score alike, which no objective notices. Data without
per-rater scores (UniEval) has its one averaged score treated as one rater's.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import random
import statistics
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

from chatrlhf import config as cfg_lib
from chatrlhf import metrics
from chatrlhf.config import RewardConfig
from chatrlhf.data import load, prompt_key, save
from chatrlhf.data.batching import to_groups, tokenize_groups
from chatrlhf.data.records import ScoredSample

# The reward recipe and the model loaders (torch) are imported inside the steps that train and
# score: building the command line imports this module (add_parser), and no torch.

OBJECTIVES = ("regression", "comparisons")
# One MiniLM pass over DialSummEval's 75 training dialogues (1050 summaries): 38 steps of 28
# replies, about 2.5 minutes per objective on 2 CPU cores, so one noise level runs end to end in
# about 6 minutes and "--rater-noise 0,1.0" in about 12. Dialogues are long; the prompt is cut
# from the left to fit 192 tokens (half the samples are cut), which keeps the summaries whole.
DEFAULTS = ["model.name=minilm", "model.max_length=192", "train.epochs=1", "train.batch_size=2",
            "train.lr=1e-4", "train.warmup_ratio=0.1"]


# ---- data -----------------------------------------------------------------------------------

def split_prompts(records: list[ScoredSample], held_out: float, seed: int) -> tuple[list, list]:
    """(train, held-out) records; every sample of a prompt lands on the same side."""
    keys = sorted({prompt_key(r.prompt) for r in records})
    random.Random(seed).shuffle(keys)
    count = max(1, round(held_out * len(keys)))
    if count >= len(keys):
        raise ValueError(f"--held-out {held_out} leaves no training prompt out of {len(keys)}")
    held = set(keys[:count])
    return ([r for r in records if prompt_key(r.prompt) not in held],
            [r for r in records if prompt_key(r.prompt) in held])


def add_rater_noise(records: list[ScoredSample], level: float, seed: int,
                    pool: str = "per-prompt") -> list[ScoredSample]:
    """Records whose rater scores went through simulated labellers' offsets and scales.

    Labeller of rater i: (prompt, i) with pool "per-prompt", i alone with "fixed". Score s
    becomes center + scale * (s - center) + offset, center = mean of all rater scores; the
    record's score is the mean of its perturbed rater scores. Level 0 returns the records as they are.
    """
    if level == 0:
        return list(records)
    rng = np.random.default_rng(seed)
    raters = [r.rater_scores or [r.score] for r in records]
    center = statistics.fmean(s for scores in raters for s in scores)
    labellers: dict = {}
    noisy = []
    for record, scores in zip(records, raters):
        perturbed = []
        for i, s in enumerate(scores):
            who = (prompt_key(record.prompt), i) if pool == "per-prompt" else i
            if who not in labellers:
                labellers[who] = (rng.normal(0, level), math.exp(rng.normal(0, level / 2)))
            offset, scale = labellers[who]
            perturbed.append(center + scale * (s - center) + offset)
        noisy.append(replace(record, score=statistics.fmean(perturbed), rater_scores=perturbed))
    return noisy


def standardized(records: list[ScoredSample]) -> list[ScoredSample]:
    """Scores z-scored over these records: the regression target, on the scale of a reward."""
    scores = [r.score for r in records]
    mean, std = statistics.fmean(scores), statistics.pstdev(scores) or 1.0
    return [replace(r, score=(r.score - mean) / std) for r in records]


# ---- train and evaluate -----------------------------------------------------------------------

def budget(base: RewardConfig, train_records: list[ScoredSample]) -> dict:
    """Steps and per-objective batch sizes giving both objectives the same replies per step."""
    groups = to_groups(train_records, "comparisons")
    replies_per_group = statistics.fmean(len(g.replies) for g in groups)
    train = base.train
    steps = train.max_steps or math.ceil(train.epochs * math.ceil(len(groups) / train.batch_size)
                                         / train.grad_accum)
    return {"steps": steps, "lr": train.lr, "max_length": base.model.max_length, "train_prompts": len(groups),
            "batch_size": {"comparisons": train.batch_size,
                           "regression": max(1, round(train.batch_size * replies_per_group))},
            "replies_per_step": round(train.batch_size * replies_per_group) * train.grad_accum}


def train_one(base: RewardConfig, objective: str, train_file: Path, output_dir: Path, plan: dict) -> Path:
    config = copy.deepcopy(base)
    config.loss.objective = objective
    config.data = replace(config.data, train=str(train_file), dev=None, reader="chatrlhf", limit=None,
                          fields={}, options={})
    config.train.output_dir = str(output_dir)
    config.train.max_steps = plan["steps"]
    config.train.batch_size = plan["batch_size"][objective]
    from chatrlhf.recipes import reward

    reward.train(config)
    return output_dir / "model"


def evaluate(model_dir: Path, held_out: list[ScoredSample], max_length: int, resamples: int, seed: int) -> dict:
    """Accuracy and mean Kendall tau on the held-out prompts' human ordering, with intervals."""
    from chatrlhf import models
    from chatrlhf.recipes import reward

    model, tokenizer = models.load_reward_model(str(model_dir))
    groups = to_groups(held_out, "comparisons")
    tokenize_groups(groups, tokenizer, max_length, same_prompt=True)
    rewards = reward.score_groups(model, groups, tokenizer.pad_token_id)
    ranks = [g.ranks for g in groups]
    result = metrics.summarize(rewards, ranks)
    result["intervals"] = metrics.group_metric_intervals(rewards, ranks, resamples, seed=seed)
    # Across prompts too: what regression aims at, and comparisons never see.
    flat_scores = [s for g in groups for s in g.scores]
    result["score_pearson"] = metrics.pearson([r for group in rewards for r in group], flat_scores)
    return result


def longer_wins(held_out: list[ScoredSample], tokenizer, resamples: int, seed: int) -> dict:
    """The "longer reply wins" baseline on the same held-out orderings."""
    groups = to_groups(held_out, "comparisons")
    lengths = [[float(len(tokenizer(reply, add_special_tokens=False, verbose=False)["input_ids"]))
                for reply in g.replies] for g in groups]
    ranks = [g.ranks for g in groups]
    result = metrics.summarize(lengths, ranks)
    result["intervals"] = metrics.group_metric_intervals(lengths, ranks, resamples, seed=seed)
    return result


# ---- table, plot, command -----------------------------------------------------------------------

def format_table(rows: list[dict]) -> str:
    def cell(row, key):
        value, (low, high) = row[key], row["intervals"][key]
        return f"{value:.3f} [{low:.3f}, {high:.3f}]"

    lines = [f"{'rater noise':>11}  {'objective':<22} {'pairwise accuracy':<24} {'mean Kendall tau':<24} train s",
             "-" * 95]
    for row in rows:
        noise = "-" if row["noise"] is None else f"{row['noise']:g}"
        seconds = f"{row['train_seconds']:.0f}" if row.get("train_seconds") else ""
        lines.append(f"{noise:>11}  {row['objective']:<22} {cell(row, 'accuracy'):<24} "
                     f"{cell(row, 'mean_kendall_tau'):<24} {seconds}")
    return "\n".join(lines)


def plot(rows: list[dict], path: Path) -> None:
    from chatrlhf.report import _pyplot

    plt = _pyplot()
    figure, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    levels = sorted({row["noise"] for row in rows if row["noise"] is not None})
    for axis, key, label in ((axes[0], "accuracy", "pairwise accuracy"), (axes[1], "mean_kendall_tau", "mean Kendall tau")):
        for shift, objective in zip((-0.08, 0.08), OBJECTIVES):
            mine = sorted((r for r in rows if r["objective"] == objective), key=lambda r: r["noise"])
            x = [levels.index(r["noise"]) + shift for r in mine]  # levels side by side, evenly
            y = [r[key] for r in mine]
            error = [[r[key] - r["intervals"][key][0] for r in mine], [r["intervals"][key][1] - r[key] for r in mine]]
            axis.errorbar(x, y, yerr=error, marker="o", capsize=4, label=objective)
        for row in rows:
            if row["noise"] is None:
                axis.axhline(row[key], color="grey", linestyle=":", label=row["objective"])
        axis.set_xticks(range(len(levels)), [f"{level:g}" for level in levels])
        axis.set_xlim(-0.5, len(levels) - 0.5)
        axis.set_xlabel("simulated rater noise level")
        axis.set_ylabel(f"{label} (held-out prompts, 95% interval)")
        axis.legend(fontsize=8)
    figure.suptitle("Trained on absolute scores (regression) or on comparisons derived from them")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def compare_command(args) -> int:
    started = time.perf_counter()
    base = cfg_lib.load(RewardConfig, None, DEFAULTS + list(args.overrides))
    output = Path(args.output)
    output.mkdir(parents=True, exist_ok=True)
    options = dict(o.split("=", 1) for o in args.reader_option)
    loaded = load(args.data, reader=args.reader, skip_invalid=args.skip_invalid, **options)
    print(loaded.summary())
    records = [r for r in loaded.records if isinstance(r, ScoredSample)]
    if not records:
        raise ValueError(f"{args.data}: no scored samples; `reward compare` needs absolute scores")
    train_records, held_out = split_prompts(records, args.held_out, args.seed)
    save(held_out, output / "held_out.jsonl")
    plan = budget(base, train_records)
    print(f"{len(train_records)} training samples, {len(held_out)} held-out samples "
          f"({len(to_groups(held_out, 'comparisons'))} prompts); both objectives: {plan['steps']} steps of "
          f"{plan['replies_per_step']} replies, lr {plan['lr']}, max_length {plan['max_length']}")

    from chatrlhf import models

    rows = []
    tokenizer = models.load_tokenizer(base.model.name)
    rows.append({"noise": None, "objective": "baseline: longer reply",
                 **longer_wins(held_out, tokenizer, args.resamples, args.seed)})
    for level in args.rater_noise:
        noisy = add_rater_noise(train_records, level, args.seed + 1, args.rater_pool)
        folder = output / f"noise-{level:g}"
        files = {"regression": folder / "train_regression.jsonl", "comparisons": folder / "train_comparisons.jsonl"}
        folder.mkdir(parents=True, exist_ok=True)
        save(standardized(noisy), files["regression"])
        save(noisy, files["comparisons"])
        for objective in OBJECTIVES:
            print(f"== rater noise {level:g}: training on {objective}")
            begun = time.perf_counter()
            model_dir = train_one(base, objective, files[objective], folder / objective, plan)
            seconds = time.perf_counter() - begun
            result = evaluate(model_dir, held_out, base.model.max_length, args.resamples, args.seed)
            rows.append({"noise": level, "objective": objective, "train_seconds": seconds, **result})
            print(format_table(rows[-1:]).splitlines()[-1])

    table = format_table(rows)
    plot(rows, output / "compare.png")
    total = time.perf_counter() - started
    summary = {"data": str(args.data), "reader": loaded.reader, "held_out_fraction": args.held_out,
               "seed": args.seed, "rater_pool": args.rater_pool, "budget": plan,
               "config": cfg_lib.to_dict(base), "rows": rows, "seconds": total}
    (output / "compare.json").write_text(json.dumps(json_ready(summary), indent=2))
    print(table)
    print(f"wrote {output / 'compare.json'} and {output / 'compare.png'} in {total / 60:.1f} min")
    return 0


def json_ready(value):
    """nan -> null for strict JSON."""
    if isinstance(value, dict):
        return {k: json_ready(v) for k, v in value.items()}
    if isinstance(value, list):
        return [json_ready(v) for v in value]
    return None if isinstance(value, float) and not math.isfinite(value) else value


def _levels(text: str) -> list[float]:
    try:
        levels = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected numbers separated by commas, e.g. 0,0.5,1.0; found {text!r}")
    if not levels or any(v < 0 for v in levels):
        raise argparse.ArgumentTypeError(f"expected non-negative noise levels, found {text!r}")
    return levels


def add_parser(commands) -> None:
    """Register `reward compare` under the `reward` command's subcommands."""
    p = commands.add_parser(
        "compare", help="train on absolute scores and on comparisons from them; compare on held-out prompts",
        formatter_class=argparse.RawDescriptionHelpFormatter, description=__doc__,
        epilog="Other arguments are settings for both trainings, as in `reward train`: section.key=value "
               f"(defaults here: {' '.join(DEFAULTS)}).")
    p.add_argument("--data", required=True, help="scored samples, e.g. DialSummEval human_judgment.jsonl")
    p.add_argument("--reader", default="auto")
    p.add_argument("--reader-option", action="append", default=[], metavar="KEY=VALUE",
                   help="reader option, e.g. aspects=relevance")
    p.add_argument("--skip-invalid", action="store_true")
    p.add_argument("--output", default="runs/compare", help="folder for split files, models, compare.json/png")
    p.add_argument("--held-out", type=float, default=0.25, help="fraction of prompts held out")
    p.add_argument("--seed", type=int, default=0, help="seed of the prompt split and the simulated raters")
    p.add_argument("--rater-noise", type=_levels, default=[0.0], metavar="LEVELS",
                   help="comma-separated noise levels, e.g. 0,0.5,1.0 (both objectives trained per level)")
    p.add_argument("--rater-pool", choices=("per-prompt", "fixed"), default="per-prompt",
                   help="per-prompt: rater i of each prompt is another labeller; fixed: the same everywhere")
    p.add_argument("--resamples", type=int, default=2000, help="bootstrap resamples for the intervals")
    p.set_defaults(run=compare_command, overrides=[])

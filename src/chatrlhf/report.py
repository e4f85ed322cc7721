"""The evaluation report of a reward model: figures in report.json, plots as PNG, one HTML page.

    chatrlhf reward eval runs/reward/model dev.jsonl --report runs/reward/report

What it shows, all from the rewards ``reward eval`` printed its accuracy from:
- accuracy (and for rankings best-vs-worst accuracy and mean Kendall tau) with 95% bootstrap
  intervals, groups resampled with a fixed seed;
- length bias: accuracy by prompt-length and reply-length quantile buckets beside the "longer
  reply wins" baseline, and the Pearson / Spearman correlation of reward with reply length;
- calibration of P(a preferred to b) = sigmoid(r_a - r_b): reliability diagram, ECE, and the
  temperature that calibrates it (its ECE cross-fitted: T fitted on one half of the pairs,
  measured on the other);
- the rewards of chosen (best-ranked) and rejected (worst-ranked) replies, and the reward gaps
  on human ties against those on strict preferences;
- the reward mean / std stored at training time (what ``reward score --normalize`` uses).
The maths is in ``metrics.py``; this module only arranges it. Needs matplotlib (extra "report").
"""

from __future__ import annotations

import base64
import html
import json
import math
import statistics
from pathlib import Path

from chatrlhf import metrics
from chatrlhf.data.batching import Group

CALIBRATION_BINS = 10
LENGTH_BUCKETS = 4
HISTOGRAM_BINS = 30


# ---- figures ---------------------------------------------------------------------------------

def token_counts(tokenizer, texts: list[str]) -> list[int]:
    """Tokens of each text, without special tokens and without any cut."""
    return [len(ids) for ids in tokenizer(texts, add_special_tokens=False, verbose=False)["input_ids"]]


def prompt_text(prompt) -> str:
    return prompt if isinstance(prompt, str) else "\n".join(m["content"] for m in prompt)


def _estimate(value: float, interval: list[float] | None = None) -> dict:
    return {"value": value, "interval": interval}


def length_figures(groups: list[Group], rewards: list[list[float]], ranks: list[list[int]],
                   prompt_tokens: list[int], reply_tokens: list[list[int]], resamples: int, seed: int) -> dict:
    """Accuracy per length bucket beside the longer-reply-wins baseline, and correlations."""
    baseline = metrics.summarize([[float(n) for n in lengths] for lengths in reply_tokens], ranks)
    out = {"longer_wins_accuracy": baseline["accuracy"]}
    keys = {"prompt_tokens": [float(n) for n in prompt_tokens],
            "reply_tokens": [statistics.fmean(lengths) for lengths in reply_tokens]}
    for name, per_group in keys.items():
        edges = metrics.quantile_edges(per_group, LENGTH_BUCKETS)
        rows = []
        for b in range(max(1, len(edges) - 1)):
            members = [i for i, v in enumerate(per_group) if metrics.bucket_of(v, edges) == b]
            if not members:
                continue
            r, k = [rewards[i] for i in members], [ranks[i] for i in members]
            lengths = [[float(n) for n in reply_tokens[i]] for i in members]
            model = metrics.summarize(r, k)
            rows.append({"low": edges[b], "high": edges[min(b + 1, len(edges) - 1)],
                         "groups": len(members), "pairs": model["pairs"], "accuracy": model["accuracy"],
                         "accuracy_interval": metrics.group_metric_intervals(r, k, resamples, seed=seed)["accuracy"],
                         "longer_wins_accuracy": metrics.summarize(lengths, k)["accuracy"]})
        out[f"by_{name}"] = rows
    flat_rewards = [r for group in rewards for r in group]
    flat_lengths = [float(n) for lengths in reply_tokens for n in lengths]
    out["reward_length_pearson"] = metrics.pearson(flat_rewards, flat_lengths)
    out["reward_length_spearman"] = metrics.spearman(flat_rewards, flat_lengths)
    out.update(prefers_longer(rewards, ranks, reply_tokens))
    return out


def prefers_longer(rewards: list[list[float]], ranks: list[list[int]], reply_tokens: list[list[int]]) -> dict:
    """How often the people and the model pick the longer reply, over strict human pairs of
    unequal length (a model tie counts one half)."""
    model_longer = human_longer = pairs = 0
    for group_rewards, group_ranks, lengths in zip(rewards, ranks, reply_tokens):
        for i in range(len(lengths)):
            for j in range(i + 1, len(lengths)):
                if group_ranks[i] == group_ranks[j] or lengths[i] == lengths[j]:
                    continue
                longer, shorter = (i, j) if lengths[i] > lengths[j] else (j, i)
                pairs += 1
                human_longer += group_ranks[longer] < group_ranks[shorter]
                model_longer += (group_rewards[longer] > group_rewards[shorter]) + 0.5 * (
                    group_rewards[longer] == group_rewards[shorter])
    return {"pairs_of_unequal_length": pairs,
            "human_prefers_longer": human_longer / pairs if pairs else math.nan,
            "model_prefers_longer": model_longer / pairs if pairs else math.nan}


def source_figures(groups: list[Group], rewards: list[list[float]], reply_tokens: list[list[int]],
                   resamples: int, seed: int) -> dict:
    """Per source of a mixture (``Group.source``): accuracy with its interval beside the "longer
    reply wins" and "shorter reply wins" baselines on the same pairs (a model that learned only
    length matches one of them), and how often people and model prefer the longer reply."""
    out = {}
    for name in dict.fromkeys(g.source for g in groups):
        members = [i for i, g in enumerate(groups) if g.source == name]
        r, k = [rewards[i] for i in members], [groups[i].ranks for i in members]
        lengths = [[float(n) for n in reply_tokens[i]] for i in members]
        flat_rewards, flat_lengths = [x for g in r for x in g], [x for g in lengths for x in g]
        model = metrics.summarize(r, k)
        out[name] = {"groups": len(members), "pairs": model["pairs"], "accuracy": model["accuracy"],
                     "accuracy_interval": metrics.group_metric_intervals(r, k, resamples, seed=seed)["accuracy"],
                     "longer_wins_accuracy": metrics.summarize(lengths, k)["accuracy"],
                     "shorter_wins_accuracy": metrics.summarize([[-n for n in x] for x in lengths], k)["accuracy"],
                     "reward_length_spearman": metrics.spearman(flat_rewards, flat_lengths),
                     **prefers_longer(r, k, [reply_tokens[i] for i in members])}
        if "best_vs_worst_accuracy" in model:
            out[name]["best_vs_worst_accuracy"] = model["best_vs_worst_accuracy"]
    return out


def calibration_figures(strict_margins: list[float], seed: int = 0) -> dict:
    """Calibration of sigmoid(r_better - r_worse) as it is, and after temperature scaling.

    The temperature's ECE is cross-fitted: the pairs are split in two halves (seeded), T is
    fitted on each half and the other half is scaled by it, so the ECE after temperature is
    measured on pairs its T never saw (fitted and measured on the same pairs it is optimistic:
    with few pairs, near 0 whatever the model). ``temperature`` is the one fitted on all pairs,
    the one to use; ``temperature_halves`` the two the ECE used."""
    import random

    probabilities, outcomes = metrics.pair_probabilities(strict_margins)
    order = list(range(len(strict_margins)))
    random.Random(seed).shuffle(order)
    halves = [[strict_margins[i] for i in order[:len(order) // 2]], [strict_margins[i] for i in order[len(order) // 2:]]]
    scaled, scaled_outcomes, fitted = [], [], []
    for fit_on, measure_on in ((halves[0], halves[1]), (halves[1], halves[0])):
        temperature = metrics.fit_temperature(fit_on) if fit_on else 1.0
        fitted.append(temperature)
        p, y = metrics.pair_probabilities(measure_on, temperature)
        scaled, scaled_outcomes = scaled + p, scaled_outcomes + y
    return {
        "bins": CALIBRATION_BINS,
        "ece": metrics.expected_calibration_error(probabilities, outcomes, CALIBRATION_BINS),
        "temperature": metrics.fit_temperature(strict_margins),
        "temperature_halves": fitted,
        "ece_after_temperature": metrics.expected_calibration_error(scaled, scaled_outcomes, CALIBRATION_BINS),
        "reliability": metrics.reliability_bins(probabilities, outcomes, CALIBRATION_BINS),
        "reliability_after_temperature": metrics.reliability_bins(scaled, scaled_outcomes, CALIBRATION_BINS),
    }


def _stats(values: list[float]) -> dict:
    if not values:
        return {"count": 0, "mean": math.nan, "std": math.nan, "median": math.nan}
    return {"count": len(values), "mean": statistics.fmean(values), "std": statistics.pstdev(values),
            "median": statistics.median(values)}


def distribution_figures(rewards: list[list[float]], ranks: list[list[int]], strict: list[float],
                         tied: list[float]) -> dict:
    chosen = [r for rs, ks in zip(rewards, ranks) if min(ks) != max(ks) for r, k in zip(rs, ks) if k == min(ks)]
    rejected = [r for rs, ks in zip(rewards, ranks) if min(ks) != max(ks) for r, k in zip(rs, ks) if k == max(ks)]
    gaps = [abs(d) for d in strict]
    out = {"chosen": _stats(chosen), "rejected": _stats(rejected),
           "strict_pairs_abs_margin": _stats(gaps), "tied_pairs_abs_margin": _stats(tied)}
    if tied and gaps:
        # Reading: a reward model that sees ties as ties puts them below the typical strict gap.
        median_gap = statistics.median(gaps)
        out["ties_below_median_strict_margin"] = sum(t < median_gap for t in tied) / len(tied)
    out["_values"] = {"chosen": chosen, "rejected": rejected, "strict": gaps, "tied": tied}
    return out


def build_figures(groups: list[Group], rewards: list[list[float]], result: dict, tokenizer,
                  info: dict | None = None, resamples: int = 2000, seed: int = 0) -> dict:
    """Every figure of the report as a JSON-ready dict (plus raw values under ``_values`` keys)."""
    ranks = [g.ranks for g in groups]
    prompt_tokens = token_counts(tokenizer, [prompt_text(g.prompt) for g in groups])
    counts = iter(token_counts(tokenizer, [reply for g in groups for reply in g.replies]))
    reply_tokens = [[next(counts) for _ in g.replies] for g in groups]
    intervals = metrics.group_metric_intervals(rewards, ranks, resamples, seed=seed)
    summary = dict(result)
    summary["intervals"] = intervals
    summary["bootstrap"] = {"resamples": resamples, "confidence": 0.95, "seed": seed, "unit": "group"}
    strict, tied = metrics.ordered_margins(rewards, ranks)
    flat = [r for group in rewards for r in group]
    info = info or {}
    return {
        "summary": summary,
        "length": length_figures(groups, rewards, ranks, prompt_tokens, reply_tokens, resamples, seed),
        "sources": (source_figures(groups, rewards, reply_tokens, resamples, seed)
                    if len({g.source for g in groups}) > 1 else {}),
        "calibration": calibration_figures(strict),
        "distribution": distribution_figures(rewards, ranks, strict, tied),
        "normalization": {"trained_reward_mean": info.get("reward_mean"),
                          "trained_reward_std": info.get("reward_std"),
                          "data_reward_mean": statistics.fmean(flat), "data_reward_std": statistics.pstdev(flat)},
        "_values": {"rewards": flat, "reply_tokens": [n for lengths in reply_tokens for n in lengths]},
    }


# ---- plots -----------------------------------------------------------------------------------

def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_calibration(calibration: dict, path: Path) -> None:
    plt = _pyplot()
    figure, (top, bottom) = plt.subplots(2, 1, figsize=(5.5, 6), sharex=True,
                                         gridspec_kw={"height_ratios": [3, 1]})
    top.plot([0, 1], [0, 1], color="grey", linestyle=":", label="perfectly calibrated")
    for key, label, style in (("reliability", f"rewards as they are (ECE {calibration['ece']:.3f})", "o-"),
                              ("reliability_after_temperature",
                               f"divided by T = {calibration['temperature']:.3g} "
                               f"(ECE {calibration['ece_after_temperature']:.3f})", "s--")):
        rows = [row for row in calibration[key] if row["count"]]
        top.plot([row["predicted"] for row in rows], [row["observed"] for row in rows], style, label=label)
    top.set_ylabel("observed rate")
    top.set_title("Calibration of P(a preferred) = sigmoid(r_a - r_b)")
    top.legend(fontsize=8, loc="upper left")
    rows = calibration["reliability"]
    bottom.bar([(row["low"] + row["high"]) / 2 for row in rows], [row["count"] for row in rows],
               width=1 / len(rows) * 0.9, color="tab:blue")
    bottom.set_xlabel("predicted probability (rewards as they are)")
    bottom.set_ylabel("pairs (x2)")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def plot_length(length: dict, values: dict, path: Path) -> None:
    plt = _pyplot()
    figure, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    for axis, key, title in ((axes[0], "by_prompt_tokens", "prompt length (tokens)"),
                             (axes[1], "by_reply_tokens", "mean reply length of the group (tokens)")):
        rows = length[key]
        x = range(len(rows))
        accuracy = [row["accuracy"] for row in rows]
        low = [row["accuracy"] - row["accuracy_interval"][0] for row in rows]
        high = [row["accuracy_interval"][1] - row["accuracy"] for row in rows]
        axis.bar([i - 0.2 for i in x], accuracy, 0.4, yerr=[low, high], capsize=3, label="reward model")
        axis.bar([i + 0.2 for i in x], [row["longer_wins_accuracy"] for row in rows], 0.4,
                 label="longer reply wins", color="tab:orange")
        axis.axhline(0.5, color="grey", linestyle=":")
        axis.set_xticks(list(x), [f"{row['low']:.4g}-{row['high']:.4g}\n({row['pairs']} pairs)" for row in rows],
                        fontsize=8)
        axis.set_ylim(0, 1)
        axis.set_xlabel(title)
        axis.set_ylabel("pairwise accuracy")
        axis.legend(fontsize=8, loc="lower left")
    axes[2].scatter(values["reply_tokens"], values["rewards"], s=6, alpha=0.4)
    axes[2].set_xlabel("reply length (tokens)")
    axes[2].set_ylabel("reward")
    axes[2].set_title(f"Pearson {length['reward_length_pearson']:.3f}, "
                      f"Spearman {length['reward_length_spearman']:.3f}", fontsize=10)
    figure.suptitle("Length bias: accuracy by length quantile bucket (95% intervals), reward against length")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def plot_histograms(series: dict[str, list[float]], title: str, xlabel: str, path: Path,
                    colors=("tab:green", "tab:red")) -> None:
    plt = _pyplot()
    figure, axis = plt.subplots(figsize=(6.5, 4))
    everything = [v for values in series.values() for v in values] or [0.0]
    low, high = min(everything), max(everything)
    edges = [low + (high - low) * i / HISTOGRAM_BINS for i in range(HISTOGRAM_BINS + 1)] if high > low else 10
    for (label, values), color in zip(series.items(), colors):
        if values:
            axis.hist(values, bins=edges, alpha=0.5, density=True, color=color, label=f"{label} ({len(values)})")
            axis.axvline(statistics.fmean(values), color=color, linestyle="--")
    axis.set_xlabel(xlabel)
    axis.set_ylabel("density")
    axis.set_title(title)
    axis.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


# ---- HTML and JSON ---------------------------------------------------------------------------

def _number(value, digits: int = 4) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if not isinstance(value, float):
        return str(value)
    # Rewards of an untrained head can be ~1e-4 apart: fixed decimals would show them all as 0.
    return f"{value:.{digits}f}" if value == 0 or abs(value) >= 0.01 else f"{value:.3g}"


def _interval(pair) -> str:
    return f"[{_number(pair[0])}, {_number(pair[1])}]" if pair else ""


def _table(header: list[str], rows: list[list]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(_number(c) if not isinstance(c, str) else c)}</td>"
                                    for c in row) + "</tr>" for row in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def _image(path: Path) -> str:
    data = base64.b64encode(path.read_bytes()).decode("ascii")
    return f'<img alt="{path.stem}" src="data:image/png;base64,{data}">'


def render_html(figures: dict, images: dict[str, Path], title: str) -> str:
    summary, length, calibration = figures["summary"], figures["length"], figures["calibration"]
    distribution, normalization = figures["distribution"], figures["normalization"]
    intervals = summary["intervals"]
    rows = [["pairwise accuracy", summary["accuracy"], _interval(intervals["accuracy"])]]
    for key, name in (("best_vs_worst_accuracy", "best-vs-worst accuracy"), ("mean_kendall_tau", "mean Kendall tau")):
        if key in summary:
            rows.append([name, summary[key], _interval(intervals[key])])
    rows += [["longer reply wins (baseline)", length["longer_wins_accuracy"], ""],
             ["groups", summary["groups"], ""], ["ordered pairs", summary["pairs"], ""],
             ["human ties (not counted)", summary["human_ties"], ""],
             ["replies cut to max_length", summary.get("cut_replies", "-"), ""]]
    sections = [f"<h1>{html.escape(title)}</h1>",
                "<h2>Accuracy</h2>", _table(["metric", "value", "95% interval (groups resampled)"], rows)]

    bucket_rows = [[f"{key.removeprefix('by_').replace('_', ' ')} {row['low']:.4g}-{row['high']:.4g}",
                    row["groups"], row["pairs"], row["accuracy"], _interval(row["accuracy_interval"]),
                    row["longer_wins_accuracy"]]
                   for key in ("by_prompt_tokens", "by_reply_tokens") for row in length[key]]
    correlations = [["Pearson(reward, reply tokens)", length["reward_length_pearson"]],
                    ["Spearman(reward, reply tokens)", length["reward_length_spearman"]],
                    ["human prefers the longer reply", length["human_prefers_longer"]],
                    ["reward model prefers the longer reply", length["model_prefers_longer"]],
                    ["pairs of unequal length", length["pairs_of_unequal_length"]]]
    sections += ["<h2>Length bias</h2>", _image(images["length"]),
                 _side(_table(["bucket", "groups", "pairs", "accuracy", "95% interval", "longer wins"], bucket_rows),
                       _table(["figure", "value"], correlations))]
    if figures.get("sources"):
        source_rows = [[html.escape(name), f["pairs"], f["accuracy"], _interval(f["accuracy_interval"]),
                        f["longer_wins_accuracy"], f["shorter_wins_accuracy"], f["human_prefers_longer"],
                        f["model_prefers_longer"], f["reward_length_spearman"]]
                       for name, f in figures["sources"].items()]
        sections += ["<h3>Per source</h3>", _table(
            ["source", "pairs", "accuracy", "95% interval", "longer wins", "shorter wins",
             "people prefer longer", "model prefers longer", "Spearman(reward, length)"], source_rows)]

    bins = [[f"{row['low']:.1f}-{row['high']:.1f}", row["count"], row["predicted"], row["observed"],
             after["count"], after["predicted"], after["observed"]]
            for row, after in zip(calibration["reliability"], calibration["reliability_after_temperature"])]
    sections += ["<h2>Calibration</h2>",
                 _side(_image(images["calibration"]),
                       _table(["figure", "value"], [["ECE (10 equal-width bins)", calibration["ece"]],
                                                    ["fitted temperature T", calibration["temperature"]],
                                                    ["ECE of sigmoid(d / T)", calibration["ece_after_temperature"]]])
                       + _table(["bin", "points", "mean predicted", "observed",
                                "points (d / T)", "mean predicted (d / T)", "observed (d / T)"], bins))]

    stat_rows = [[name.replace("_", " "), s["count"], s["mean"], s["std"], s["median"]]
                 for name, s in distribution.items() if isinstance(s, dict) and "count" in s]
    if "ties_below_median_strict_margin" in distribution:
        stat_rows.append(["ties with a gap below the median strict gap",
                          "", distribution["ties_below_median_strict_margin"], "", ""])
    norm_rows = [[k.replace("_", " "), v] for k, v in normalization.items()]
    sections += ["<h2>Rewards</h2>",
                 _side(_image(images["rewards"]), _table(["set", "count", "mean", "std", "median"], stat_rows)
                       + "<h3>Normalisation (reward score --normalize uses the trained mean / std)</h3>"
                       + _table(["figure", "value"], norm_rows))]
    if "ties" in images:
        sections += ["<h2>Human ties</h2>", _image(images["ties"])]
    style = ("body{font-family:sans-serif;margin:2em;max-width:1500px} table{border-collapse:collapse;margin:.5em 0}"
             " td,th{border:1px solid #ccc;padding:3px 8px;text-align:right} img{max-width:100%}"
             " .side{display:flex;gap:2em;align-items:flex-start}")
    return (f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
            f"<style>{style}</style></head><body>{''.join(sections)}</body></html>")


def _side(left: str, right: str) -> str:
    return f"<div class='side'><div>{left}</div><div>{right}</div></div>"


def _json_ready(value):
    """Drop raw values (keys starting with _) and write nan as null (strict JSON)."""
    if isinstance(value, dict):
        return {k: _json_ready(v) for k, v in value.items() if not k.startswith("_")}
    if isinstance(value, (list, tuple)):
        return [_json_ready(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def write_report(groups: list[Group], rewards: list[list[float]], result: dict, folder: str | Path,
                 tokenizer, info: dict | None = None, title: str = "Reward model evaluation",
                 resamples: int = 2000, seed: int = 0, log=print) -> dict:
    """Write report.json, the PNG plots and report.html into ``folder``; return the figures.

    Args:
        groups: the evaluated groups (prompt, replies, human ranks), as scored.
        rewards: rewards[g][k] of reply k of group g, the same ones ``result`` comes from.
        result: ``metrics.summarize`` of those rewards (plus anything the caller added).
        tokenizer: counts prompt and reply tokens for the length analysis.
        info: the model's chatrlhf.json metadata (reward_mean / reward_std).
        log: prints the headline figures and where the report went.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    figures = build_figures(groups, rewards, result, tokenizer, info, resamples, seed)
    figures["title"] = title
    images = {"length": folder / "length.png", "calibration": folder / "calibration.png",
              "rewards": folder / "rewards.png"}
    plot_length(figures["length"], figures["_values"], images["length"])
    plot_calibration(figures["calibration"], images["calibration"])
    values = figures["distribution"]["_values"]
    plot_histograms({"chosen (best-ranked)": values["chosen"], "rejected (worst-ranked)": values["rejected"]},
                    "Rewards of chosen and rejected replies", "reward", images["rewards"])
    if values["tied"]:
        images["ties"] = folder / "ties.png"
        plot_histograms({"|r_a - r_b| on human ties": values["tied"],
                         "|r_a - r_b| on strict preferences": values["strict"]},
                        "Reward gaps on ties and on strict preferences", "|reward difference|", images["ties"],
                        colors=("tab:blue", "tab:gray"))
    figures["images"] = {name: path.name for name, path in images.items()}
    (folder / "report.json").write_text(json.dumps(_json_ready(figures), indent=2, allow_nan=False))
    (folder / "report.html").write_text(render_html(figures, images, title))
    log(format_report(figures))
    log(f"report written to {folder / 'report.html'} (figures in report.json)")
    return figures


def format_report(figures: dict) -> str:
    """The report's headline figures in a few lines, for the terminal."""
    summary, calibration, length = figures["summary"], figures["calibration"], figures["length"]
    lines = [f"accuracy {summary['accuracy']:.4f} 95% interval {_interval(summary['intervals']['accuracy'])}"]
    for key in ("best_vs_worst_accuracy", "mean_kendall_tau"):
        if key in summary:
            lines.append(f"{key.replace('_', ' ')} {summary[key]:.4f} "
                         f"95% interval {_interval(summary['intervals'][key])}")
    lines.append(f"longer reply wins {_number(length['longer_wins_accuracy'])}; reward-length Pearson "
                 f"{_number(length['reward_length_pearson'], 3)}, Spearman {_number(length['reward_length_spearman'], 3)}")
    for name, f in figures.get("sources", {}).items():
        lines.append(f"  {name}: accuracy {_number(f['accuracy'])} {_interval(f['accuracy_interval'])} on "
                     f"{f['pairs']} pairs; longer wins {_number(f['longer_wins_accuracy'])}, shorter wins "
                     f"{_number(f['shorter_wins_accuracy'])}; model prefers longer "
                     f"{_number(f['model_prefers_longer'])}")
    lines.append(f"ECE {_number(calibration['ece'])}; temperature {calibration['temperature']:.3g} "
                 f"gives ECE {_number(calibration['ece_after_temperature'])}")
    return "\n".join(lines)

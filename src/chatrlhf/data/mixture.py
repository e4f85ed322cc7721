"""Several sources in one ``data.train`` (or ``data.dev``): reader options, splits and weights.

    data:
      train:
        - {path: hh/train.jsonl.gz, weight: 0.5}
        - {path: oasst.jsonl, name: oasst, weight: 0.3, holdout: 0.1}   # 90% of its prompts
        - {path: pandalm.json, weight: 0.2, nan_as_missing: true, records: [200, null]}
      dev:
        - hh/dev.jsonl.gz
        - {path: oasst.jsonl, name: oasst, holdout: 0.1}                # the other 10%
        - {path: pandalm.json, nan_as_missing: true, records: [0, 200]}

A plain path string is one source read exactly as before. Each source may set its own reader
options (``reader``, ``fields``, ``options``, ``skip_invalid``, ``nan_as_missing``,
``allow_empty``; unset ones come from the data section) and cut itself:

* ``records: [start, end]``: the records at 0-based positions start <= i < end of what the reader
  gives (``null`` for an open end), before anything else;
* ``holdout: f`` (with ``seed``, default 0): a seeded hash of each prompt (of a chat: its first
  message, so a conversation's later turns go with it) puts about a fraction f of the prompts
  on the dev side; ``part: train`` keeps the rest, ``part: dev`` the held-out
  ones (by default the part of the section it is listed in). A prompt is never on both sides, the
  cut does not depend on the file's order or on ``train.seed``, and it is the same every run;
* ``limit: n``: the first n records left.

``weight`` (data.train only) is the source's share of the units drawn for training, as
OpenRLHF's ``--dataset_probs``: with N the units of all sources together, source i gives
round(N * w_i / sum w) of its units, drawn once with ``train.seed``: a random subset without
replacement when it has more, whole copies plus a random subset when it has fewer (sampling with
replacement spread evenly). Without weights every unit is used once, as with one file.

A unit is a record; for comparisons, scored samples of one prompt first become one ranking (as
the reward recipe's grouping would make them), so that a repeated prompt stays one group and two
sources never merge their replies. This module reads no tensors: recipes turn the records into
their own groups, and ``source_of`` tells each record's source.
"""

from __future__ import annotations

import hashlib
import random
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from chatrlhf.data.convert import scores_to_rankings
from chatrlhf.data.files import load
from chatrlhf.data.records import Record, ScoredSample, prompt_key

# Per-source settings that default to the data section's own.
READER_KEYS = ("reader", "fields", "options", "skip_invalid", "nan_as_missing", "allow_empty")
SOURCE_KEYS = ("path", "name", "weight", "records", "holdout", "seed", "part", "limit") + READER_KEYS


@dataclass
class Source:
    """One entry of data.train / data.dev, its settings filled in from the data section."""

    path: str
    name: str
    weight: float | None = None
    records: tuple[int | None, int | None] | None = None
    holdout: float | None = None
    seed: int = 0
    part: str = "train"
    limit: int | None = None
    reader: str = "auto"
    fields: dict = field(default_factory=dict)
    options: dict = field(default_factory=dict)
    skip_invalid: bool = False
    nan_as_missing: bool = False
    allow_empty: bool = False

    def settings(self) -> dict:
        """Everything that decides which records this source gives (for cache keys)."""
        return {k: getattr(self, k) for k in SOURCE_KEYS}


@dataclass
class Mixture:
    """The units of a section's sources, and where each one came from."""

    units: list  # records (or a recipe's own units, e.g. SFT examples), interleaved
    sources: list[Source]
    source_of: list[int]  # per unit: its source's position in ``sources``
    summary: list[dict] = field(default_factory=list)  # per source: units, skipped, drawn

    @property
    def names(self) -> list[str]:
        return [s.name for s in self.sources]


def is_mixture(spec) -> bool:
    """Whether a data.train / data.dev value is a list of sources (not one path)."""
    return isinstance(spec, list)


def parse(spec, data, section: str) -> list[Source]:
    """The sources of ``data.<section>`` (a path, or a list of paths and mappings), checked.

    Args:
        spec: the value of data.train or data.dev.
        data: the data section (a DataConfig): defaults for the reader settings.
        section: "train" or "dev", for messages and the default ``part`` of a holdout.
    Raises:
        ValueError: naming the entry, the key and what was expected.
    """
    where = f"data.{section}"
    if isinstance(spec, str):
        return [_source({"path": spec}, data, section, where)]
    if not isinstance(spec, list) or not spec:
        raise ValueError(f"{where}: expected a path or a non-empty list of sources, found {spec!r}")
    sources = [_source(entry if isinstance(entry, dict) else {"path": entry}, data, section, f"{where}[{i}]")
               for i, entry in enumerate(spec)]
    names = Counter(s.name for s in sources)
    if twice := [n for n, k in names.items() if k > 1]:
        raise ValueError(f"{where}: two sources are named {twice[0]!r}; give each a distinct 'name'")
    weighted = [s.weight is not None for s in sources]
    if any(weighted) and not all(weighted):
        missing = next(s.name for s in sources if s.weight is None)
        raise ValueError(f"{where}: source {missing!r} has no 'weight' while others have one; "
                         "give every source a weight, or none (each unit used once)")
    if any(weighted) and section != "train":
        raise ValueError(f"{where}: 'weight' is for data.train (every dev unit is evaluated once)")
    return sources


def _source(entry: dict, data, section: str, where: str) -> Source:
    unknown = sorted(set(entry) - set(SOURCE_KEYS))
    if unknown:
        raise ValueError(f"{where}: unknown key {unknown[0]!r}; a source takes {', '.join(SOURCE_KEYS)}")
    path = entry.get("path")
    if not isinstance(path, str) or not path:
        raise ValueError(f"{where}: expected 'path' (a file), found {path!r}")
    values = {k: getattr(data, k) for k in READER_KEYS}
    values.update({k: v for k, v in entry.items() if k in READER_KEYS})
    checks = {"reader": str, "fields": dict, "options": dict, "skip_invalid": bool,
              "nan_as_missing": bool, "allow_empty": bool}
    for key, kind in checks.items():
        if not isinstance(values[key], kind):
            raise ValueError(f"{where}.{key}: expected {kind.__name__}, found {values[key]!r}")
    name = entry.get("name", path)
    if not isinstance(name, str) or not name:
        raise ValueError(f"{where}.name: expected text, found {name!r}")
    weight = entry.get("weight")
    if weight is not None and (isinstance(weight, bool) or not isinstance(weight, (int, float)) or weight <= 0):
        raise ValueError(f"{where}.weight: expected a number > 0, found {weight!r}")
    records = entry.get("records")
    if records is not None:
        ok = (isinstance(records, list) and len(records) == 2
              and all(v is None or (isinstance(v, int) and not isinstance(v, bool) and v >= 0) for v in records))
        if not ok or (None not in records and records[0] >= records[1]):
            raise ValueError(f"{where}.records: expected [start, end] with 0 <= start < end "
                             f"(null for an open end), found {records!r}")
        records = tuple(records)
    holdout = entry.get("holdout")
    if holdout is not None and (isinstance(holdout, bool) or not isinstance(holdout, (int, float))
                                or not 0 < holdout < 1):
        raise ValueError(f"{where}.holdout: expected a fraction in (0, 1), found {holdout!r}")
    part = entry.get("part", section)
    if part not in ("train", "dev"):
        raise ValueError(f"{where}.part: expected 'train' or 'dev', found {part!r}")
    if "part" in entry and holdout is None:
        raise ValueError(f"{where}.part: only with 'holdout' (the fraction to cut)")
    seed = entry.get("seed", 0)
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ValueError(f"{where}.seed: expected an integer, found {seed!r}")
    limit = entry.get("limit")
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise ValueError(f"{where}.limit: expected a positive integer, found {limit!r}")
    return Source(path, name, None if weight is None else float(weight), records,
                  None if holdout is None else float(holdout), seed, part, limit, **values)


def settings(spec, data, section: str) -> list[dict]:
    """Every source of a section with all its settings: what a cache of its data depends on."""
    return [s.settings() for s in parse(spec, data, section)] if spec else []


# ---- reading ---------------------------------------------------------------------------------

def in_holdout(prompt, fraction: float, seed: int) -> bool:
    """Whether a prompt falls on the held-out side: a seeded hash, uniform in [0, 1), below f.

    A chat is hashed by its first message: the rankings of one OpenAssistant tree (each turn's
    replies, on the conversation so far) all go where its opening message goes, so no dev
    conversation is seen in training, even in part.
    """
    opening = prompt[:1] if isinstance(prompt, list) else prompt
    digest = hashlib.sha256(f"{seed}\x00{prompt_key(opening)}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2 ** 64 < fraction


def cut(units: list, source: Source, prompt_of=lambda r: r.prompt, log=print) -> list:
    """A source's own range, holdout and limit, applied to its units in file order."""
    read, steps = len(units), []
    if source.records:
        start, end = source.records
        units = units[start:end]
        steps.append(f"records [{start}, {'end' if end is None else end})")
    if source.holdout:
        units = [u for u in units if in_holdout(prompt_of(u), source.holdout, source.seed) == (source.part == "dev")]
        steps.append(f"{source.part} side of holdout {source.holdout:g} (seed {source.seed})")
    if source.limit and source.limit < len(units):
        units = units[:source.limit]
        steps.append(f"first {source.limit} (limit)")
    if steps:
        log(f"{source.name}: {len(units)} of {read} kept: {', '.join(steps)}")
    if not units and steps:
        raise ValueError(f"{source.name} ({source.path}): nothing left after {', '.join(steps)}")
    return units


def read_records(source: Source, log=print) -> tuple[list[Record], int]:
    """The records of one source after its range, holdout and limit; and how many it skipped."""
    loaded = load(source.path, reader=source.reader, fields=source.fields or None,
                  skip_invalid=source.skip_invalid, nan_as_missing=source.nan_as_missing,
                  allow_empty=source.allow_empty, **source.options)
    log(loaded.summary())
    return cut(loaded.records, source, log=log), sum(loaded.skipped.values())


def load_mixture(spec, data, section: str, seed: int = 42, scored: str = "rank", log=print) -> Mixture:
    """Read every source of ``data.<section>`` into records, cut it, and draw the weighted mixture.

    Args:
        spec: data.train or data.dev (a path or a list of sources).
        data: the data section (reader defaults).
        section: "train" or "dev".
        seed: train.seed: which units a weighted draw takes.
        scored: "rank" turns each source's scored samples into one ranking per prompt (the
            comparisons objective; done only with several sources, so a single file reads as
            before), "keep" leaves them (regression, SFT).
    Returns:
        A ``Mixture``; one source without weight gives its records unchanged and in order.
    """
    several = is_mixture(spec) and len(spec) > 1

    def read(source: Source) -> tuple[list, int]:
        records, skipped = read_records(source, log)
        if scored == "rank" and several and any(isinstance(r, ScoredSample) for r in records):
            samples = [r for r in records if isinstance(r, ScoredSample)]
            notes = Counter()
            records = [r for r in records if not isinstance(r, ScoredSample)] + scores_to_rankings(samples, notes)
            skipped += sum(notes.values())
            log(f"{source.name}: {len(samples)} scored samples -> one ranking per prompt"
                + (f" ({sum(notes.values())} prompts with one reply left out)" if notes else ""))
        return records, skipped

    return mix(spec, data, section, seed, read, log)


def mix(spec, data, section: str, seed: int, read, log=print) -> Mixture:
    """Any recipe's units from the sources of ``data.<section>``: ``read(source)`` gives a
    source's units (already cut, see ``cut``) and how many it skipped; then the weighted draw."""
    sources = parse(spec, data, section)
    parts, summary = [], []
    for source in sources:
        part, skipped = read(source)
        parts.append(part)
        summary.append({"name": source.name, "units": len(part), "skipped": skipped})
    units, source_of = [], []
    for index, (part, picks) in enumerate(zip(parts, draw([len(p) for p in parts], [s.weight for s in sources], seed))):
        units += [part[i] for i in picks]
        source_of += [index] * len(picks)
        summary[index]["drawn"] = len(picks)
    if len(sources) > 1:
        # Interleave the sources (seeded), so that data.limit's first N come from all of them.
        order = list(range(len(units)))
        random.Random(seed * 7919 + 1).shuffle(order)
        units, source_of = [units[i] for i in order], [source_of[i] for i in order]
        for s, source in zip(summary, sources):
            share = f", weight {source.weight / sum(x.weight for x in sources):.3f}" if source.weight else ""
            log(f"data.{section} source {s['name']}: {s['units']} units ({s['skipped']} skipped), "
                f"{s['drawn']} used ({s['drawn'] / len(units):.1%} of them{share}, "
                f"x{s['drawn'] / s['units']:.2f})")
    return Mixture(units, sources, source_of, summary)


def fingerprint(data, seed: int) -> list:
    """What a mixture's units depend on: every source of data.train and data.dev with all its
    settings and its file's size and modification time, and the seed when weights draw."""
    out = []
    for section in ("train", "dev"):
        for settings_ in (settings(getattr(data, section), data, section)):
            path = Path(settings_["path"])
            stamp = [path.stat().st_size, path.stat().st_mtime_ns] if path.exists() else None
            out.append([section, settings_, stamp, seed if settings_["weight"] is not None else None])
    return out


def draw(sizes: list[int], weights: list[float | None], seed: int) -> list[list[int]]:
    """Positions drawn from each source: all of them once without weights; else source i gives
    round(N * w_i / sum w) of N = sum(sizes) (largest remainders make the total N), whole
    shuffled copies of itself plus a random subset. Deterministic in ``seed``."""
    if not weights or weights[0] is None:
        return [list(range(n)) for n in sizes]
    total = sum(sizes)
    exact = [total * w / sum(weights) for w in weights]
    counts = [int(x) for x in exact]
    for i in sorted(range(len(sizes)), key=lambda i: exact[i] - counts[i], reverse=True)[:total - sum(counts)]:
        counts[i] += 1
    rng = random.Random(seed * 104_729 + 17)
    out = []
    for n, count in zip(sizes, counts):
        copies, rest = divmod(count, n)
        out.append([i for _ in range(copies) for i in range(n)] + sorted(rng.sample(range(n), rest)))
    return out

"""Checks on raw rows and canonical records, and the errors that name the file, place and field.

Readers call the small field checks (``text``, ``number``, ``messages``) on the source's own field
names, so an error says ``field 'response1'`` rather than a name the user never wrote. Every record
then goes through ``check_record`` for the rules that hold whatever the source: non-empty replies,
chosen differing from rejected, finite scores, rankings of at least two replies.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any

from chatrlhf.data.records import Pair, Ranking, Record, ScoredSample

# Hints added to a DataError's message when errors of these kinds occurred.
HINTS = {
    "NaN value": "pass --nan-as-missing (nan_as_missing=True) to read NaN as a missing value",
    "empty reply": "pass --allow-empty (allow_empty=True) to keep empty replies",
}


@dataclass
class RecordError:
    """One invalid record: where it is, which field, what was expected and what was found."""

    source: str
    where: str  # "line 3", or "record 5 (line 40)" in a JSON list, or "record 5" in a table
    field: str | None
    expected: str
    found: str
    reason: str  # short category, the key of Loaded.skipped: "missing field", "wrong type", ...

    def __str__(self) -> str:
        field = f", field '{self.field}'" if self.field else ""
        return f"{self.source}, {self.where}{field}: expected {self.expected}, found {self.found}"


class DataError(ValueError):
    """A file with invalid records; ``errors`` holds the first ones, ``total`` counts them all."""

    def __init__(self, source: str, errors: list[RecordError], total: int, reasons=()):
        self.source, self.errors, self.total = source, errors, total
        lines = [f"{total} invalid record{'s' if total != 1 else ''} in {source}:"]
        lines += [f"  {error}" for error in errors]
        if total > len(errors):
            lines.append(f"  ... and {total - len(errors)} more")
        hints = [HINTS[reason] for reason in sorted(set(reasons)) if reason in HINTS]
        lines += [f"hint: {hint}" for hint in hints]
        lines.append("hint: pass --skip-invalid (skip_invalid=True) to leave invalid records out "
                     "and count them by reason")
        super().__init__("\n".join(lines))


class Invalid(Exception):
    """Raised by readers and checks for one bad record; ``load`` adds the file and place."""

    def __init__(self, field: str | None, expected: str, found: str, reason: str):
        super().__init__(f"field {field!r}: expected {expected}, found {found}")
        self.field, self.expected, self.found, self.reason = field, expected, found, reason


class Constant:
    """A bare ``NaN`` / ``Infinity`` / ``-Infinity`` token met while parsing JSON.

    Parsing into this marker instead of a float lets ``load`` report the field that held it, and
    read NaN as missing only when asked to.
    """

    def __init__(self, name: str):
        self.name = name

    def __repr__(self) -> str:
        return self.name


def describe(value: Any) -> str:
    """A short rendering of a found value for error messages: ``''``, ``true (a boolean)``."""
    if isinstance(value, Constant):
        return f"{value.name} (not valid JSON)"
    if isinstance(value, str):
        return repr(value if len(value) <= 40 else value[:40] + "...")
    kind = {bool: "a boolean", int: "a number", float: "a number", list: "a list",
            dict: "an object", type(None): "a missing value"}.get(type(value), type(value).__name__)
    try:
        shown = json.dumps(value, ensure_ascii=False, default=str)
    except ValueError:
        shown = repr(value)
    if len(shown) > 40:
        shown = shown[:40] + "..."
    return f"{shown} ({kind})"


def get(row: dict, field: str) -> Any:
    """``row[field]``, or Invalid("missing field") naming the fields the row does have."""
    if field not in row:
        have = ", ".join(sorted(map(str, row))[:12])
        raise Invalid(field, "a field of that name", f"none (fields: {have})", "missing field")
    return row[field]


def text(row: dict, field: str, allow_empty: bool = False) -> str:
    """A string field; empty or blank strings are refused unless ``allow_empty``.

    Readers pass ``allow_empty=True`` for replies: whether an empty reply is allowed is decided
    once, for every source, in ``check_record``.
    """
    value = get(row, field)
    if not isinstance(value, str):
        raise Invalid(field, "a string", describe(value), _type_reason(value))
    if not allow_empty and not value.strip():
        raise Invalid(field, "a non-empty string", describe(value), "empty text")
    return value


def number(row: dict, field: str, optional: bool = False) -> float | None:
    """A finite number field (None allowed if ``optional``)."""
    value = row.get(field) if optional else get(row, field)
    if value is None and optional:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise Invalid(field, "a number", describe(value), _type_reason(value))
    if not math.isfinite(value):
        raise Invalid(field, "a finite number", describe(value), "non-finite score")
    return float(value)


def messages(value: Any, field: str) -> list[dict]:
    """A chat: a non-empty list of {"role": str, "content": str}; returns plain dicts of the two."""
    if not isinstance(value, list) or not value:
        raise Invalid(field, "a non-empty list of {role, content} messages", describe(value),
                      "wrong type")
    chat = []
    for i, message in enumerate(value):
        if (not isinstance(message, dict) or not isinstance(message.get("role"), str)
                or not isinstance(message.get("content"), str)):
            raise Invalid(f"{field}[{i}]", "a message {role: str, content: str}",
                          describe(message), "wrong type")
        chat.append({"role": message["role"], "content": message["content"]})
    return chat


def _type_reason(value: Any) -> str:
    # A NaN token where a string or number belongs is its own category, because it has its own
    # remedy (--nan-as-missing) and is the most common way real files break.
    if isinstance(value, Constant):
        return "NaN value" if value.name == "NaN" else "non-finite value"
    return "wrong type"


def check_prompt(prompt: Any) -> None:
    """A prompt is a non-empty string or a non-empty chat."""
    if isinstance(prompt, str):
        if not prompt.strip():
            raise Invalid("prompt", "a non-empty prompt", describe(prompt), "empty prompt")
    else:
        messages(prompt, "prompt")


def check_record(record: Record, allow_empty: bool = False) -> None:
    """The rules every canonical record obeys, whatever its source; raises Invalid."""
    check_prompt(record.prompt)
    if isinstance(record, Pair):
        for field in ("chosen", "rejected"):
            value = getattr(record, field)
            if not isinstance(value, str):
                raise Invalid(field, "a string", describe(value), "wrong type")
            if not allow_empty and not value.strip():
                raise Invalid(field, "a non-empty reply", describe(value), "empty reply")
        # Identical replies carry no preference, unless the record says so (a tie).
        if record.chosen == record.rejected and not record.tie:
            raise Invalid("rejected", "a reply different from 'chosen'", "the same text",
                          "chosen == rejected")
        if record.margin is not None:
            number({"margin": record.margin}, "margin")
            if record.margin < 0:
                raise Invalid("margin", "a margin >= 0", describe(record.margin), "negative margin")
    elif isinstance(record, Ranking):
        if not isinstance(record.replies, list) or len(record.replies) < 2:
            raise Invalid("replies", "at least 2 replies", describe(record.replies),
                          "fewer than 2 replies")
        if not isinstance(record.ranks, list) or len(record.ranks) != len(record.replies):
            raise Invalid("ranks", f"{len(record.replies)} ranks, one per reply",
                          describe(record.ranks), "wrong type")
        for i, (reply, rank) in enumerate(zip(record.replies, record.ranks)):
            if not isinstance(reply, str) or (not allow_empty and not reply.strip()):
                raise Invalid(f"replies[{i}]", "a non-empty reply", describe(reply), "empty reply")
            if isinstance(rank, bool) or not isinstance(rank, int) or rank < 0:
                raise Invalid(f"ranks[{i}]", "an integer rank >= 0", describe(rank), "wrong type")
    elif isinstance(record, ScoredSample):
        if not isinstance(record.reply, str) or (not allow_empty and not record.reply.strip()):
            raise Invalid("reply", "a non-empty reply", describe(record.reply), "empty reply")
        number({"score": record.score}, "score")
        if record.rater_scores is not None and not isinstance(record.rater_scores, list):
            raise Invalid("rater_scores", "a list of numbers", describe(record.rater_scores), "wrong type")
        for i, score in enumerate(record.rater_scores or []):
            number({f"rater_scores[{i}]": score}, f"rater_scores[{i}]")

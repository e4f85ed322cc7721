"""Canonical records every recipe takes: comparison pairs, K-wise rankings and scored samples.

A prompt is plain text or a chat: a list of ``{"role": ..., "content": ...}`` messages ending
before the reply. Replies are plain text (the assistant's turn). Readers turn each source format
into these records and nothing source-specific goes further.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Union

Prompt = Union[str, list]  # str, or list of {"role": str, "content": str}


@dataclass
class Pair:
    """One human comparison: ``chosen`` was preferred to ``rejected`` (or neither, if ``tie``).

    ``margin`` is an optional non-negative strength of the preference (rating difference, votes);
    it is used inside the sigmoid by the margin loss.
    """

    prompt: Prompt
    chosen: str
    rejected: str
    margin: float | None = None
    tie: bool = False
    meta: dict[str, Any] = field(default_factory=dict)


@dataclass
class Ranking:
    """K >= 2 replies to one prompt with their ranks: 0 is best, equal ranks are ties."""

    prompt: Prompt
    replies: list[str]
    ranks: list[int]
    meta: dict[str, Any] = field(default_factory=dict)


@dataclass
class ScoredSample:
    """One reply with an absolute score (e.g. mean of raters) and optionally each rater's score."""

    prompt: Prompt
    reply: str
    score: float
    rater_scores: list[float] | None = None
    meta: dict[str, Any] = field(default_factory=dict)


Record = Union[Pair, Ranking, ScoredSample]
KINDS = {"pair": Pair, "ranking": Ranking, "scored": ScoredSample}


def kind_of(record: Record) -> str:
    """The short name of a record's type: "pair", "ranking" or "scored"."""
    return {Pair: "pair", Ranking: "ranking", ScoredSample: "scored"}[type(record)]


def to_dict(record: Record) -> dict:
    """The record as a JSON-ready dict with a ``kind`` field, the project's own file format."""
    return {"kind": kind_of(record), **asdict(record)}


def prompt_key(prompt: Prompt) -> str:
    """A hashable key to group records by prompt."""
    if isinstance(prompt, str):
        return prompt
    return "\x1e".join(f"{m['role']}\x1f{m['content']}" for m in prompt)

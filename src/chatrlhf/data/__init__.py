"""Preference data: canonical records, readers per source, validation, conversions.

    loaded = load("train.jsonl.gz")            # reader detected from the file's fields
    loaded = load("pandalm.json", reader="pandalm", nan_as_missing=True)
    pairs = loaded.records

Where things are: ``records`` (the canonical records), ``files`` (``load`` and ``save``: opening
files, numbering rows, collecting errors), ``readers`` (one function per source format),
``validation`` (checks and ``DataError``), ``convert`` (scores <-> pairs <-> rankings),
``tokenize`` and ``batching`` (model inputs). This module only gathers the public names.
"""

from __future__ import annotations

from chatrlhf.data.convert import (pairs_to_rankings, rankings_to_pairs, scores_to_pairs,
                                   scores_to_rankings)
from chatrlhf.data.files import Loaded, load, save
from chatrlhf.data.readers import READERS, detect  # noqa: F401 (detect: importable here, as before)
from chatrlhf.data.records import (KINDS, Pair, Prompt, Ranking, Record, ScoredSample, kind_of,
                                   prompt_key, to_dict)
from chatrlhf.data.validation import (Constant, DataError, Invalid, RecordError,  # noqa: F401
                                      check_record, describe)

__all__ = [
    "load", "save", "Loaded", "RecordError", "DataError", "READERS", "Pair", "Ranking",
    "ScoredSample", "Record", "Prompt", "KINDS", "kind_of", "to_dict", "prompt_key",
    "scores_to_pairs", "rankings_to_pairs", "pairs_to_rankings", "scores_to_rankings",
]

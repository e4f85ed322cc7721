"""Readers on the real human data in ../shared/data (skipped when that folder is absent).

Counts below are those of the shared copies described in ../shared/data/README.md.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest

from chatrlhf.data import DataError, Pair, Ranking, load, prompt_key, scores_to_pairs

DATA = Path(__file__).parents[1].parent / "shared" / "data"


def data_file(relative: str) -> Path:
    path = DATA / relative
    if not path.exists():
        pytest.skip(f"real data {relative} not found under {DATA}")
    return path


def test_hh_rlhf_train():
    path = data_file("hh-rlhf/harmless-base/train.jsonl.gz")
    # Four dialogues end with an empty chosen reply (silence preferred to a harmful answer):
    # reported by default, kept with allow_empty, counted when skipped.
    with pytest.raises(DataError) as caught:
        load(path)
    assert caught.value.total == 4
    assert [e.where for e in caught.value.errors] == ["line 87", "line 517", "line 926",
                                                      "line 1104"]
    assert {e.field for e in caught.value.errors} == {"chosen"}
    loaded = load(path, allow_empty=True)
    assert loaded.reader == "hh" and len(loaded.records) == 1600 and not loaded.errors
    assert all(isinstance(p, Pair) and p.prompt.endswith("\n\nAssistant:") for p in loaded.records)
    assert load(path, skip_invalid=True).skipped == {"empty reply": 4}


def test_hh_rlhf_dev():
    loaded = load(data_file("hh-rlhf/harmless-base/dev.jsonl.gz"), skip_invalid=True)
    assert len(loaded.records) + sum(loaded.skipped.values()) == 200


def test_oasst_rankings():
    loaded = load(data_file("oasst/en_80_tree.jsonl"))
    assert loaded.reader == "oasst" and all(isinstance(r, Ranking) for r in loaded.records)
    sizes = Counter(len(r.replies) for r in loaded.records)
    assert sizes == {2: 51, 3: 92, 4: 21, 5: 2, 6: 4, 8: 1, 9: 1}
    for ranking in loaded.records:
        assert len(ranking.replies) >= 2 and min(ranking.ranks) == 0
        assert sorted(set(ranking.ranks)) == list(range(len(set(ranking.ranks))))
        assert ranking.prompt[-1]["role"] == "user"
    assert loaded.notes == {"unranked replies left out": 107}


def test_pandalm_is_reported_then_read():
    path = data_file("pandalm/testset-v1.json")
    # The shared copy has no NaN token (the README says it does): its bad input is six
    # responses stored as JSON `true` instead of text, plus 54 empty responses.
    with pytest.raises(DataError) as caught:
        load(path, nan_as_missing=True)
    assert caught.value.total == 60
    assert "record 158 (line 1892), field 'response1': expected a string, found true" in str(
        caught.value)
    loaded = load(path, nan_as_missing=True, allow_empty=True, skip_invalid=True)
    assert len(loaded.records) == 993 and loaded.skipped == {"wrong type": 6}
    ties = [p for p in loaded.records if p.tie]
    assert len(ties) == 105
    assert {p.meta["agreement"] for p in loaded.records} <= {1.0, 2 / 3, 1 / 3}


def test_dialsummeval_scores():
    loaded = load(data_file("dialsummeval/human_judgment.jsonl"))
    assert len(loaded.records) == 1400
    assert len({prompt_key(s.prompt) for s in loaded.records}) == 100
    assert all(1 <= s.score <= 5 and len(s.rater_scores) == 3 for s in loaded.records)
    notes = Counter()
    pairs = scores_to_pairs(loaded.records, notes=notes)
    # 100 dialogues x C(14, 2) = 9100 pairs of summaries, less equal scores and equal texts.
    assert len(pairs) + sum(notes.values()) == 9100


def test_unieval_scores():
    loaded = load(data_file("unieval/topical_chat.json"))
    assert len(loaded.records) == 360
    assert len({s.prompt for s in loaded.records}) == 60

"""`chatrlhf data validate|stats|convert` run in-process through the real entry point."""

from __future__ import annotations

import json

import pytest

from chatrlhf.cli import main
from chatrlhf.data import load

HH = {"chosen": "\n\nHuman: Hi\n\nAssistant: Hello there",
      "rejected": "\n\nHuman: Hi\n\nAssistant: Go"}


@pytest.fixture
def hh_file(tmp_path):
    path = tmp_path / "hh.jsonl"
    path.write_text(json.dumps(HH) + "\n" + json.dumps(dict(HH, chosen=HH["rejected"])) + "\n")
    return path


def test_validate_exit_codes(hh_file, tmp_path, capsys):
    assert main(["data", "validate", str(hh_file), "--skip-invalid"]) == 1
    out = capsys.readouterr().out
    assert "1 records (1 pairs)" in out and "line 2, field 'rejected'" in out
    good = tmp_path / "good.jsonl"
    good.write_text(json.dumps(HH) + "\n")
    assert main(["data", "validate", str(good)]) == 0
    assert "reader 'hh'" in capsys.readouterr().out


def test_unknown_reader_is_a_usage_error(hh_file, capsys):
    assert main(["data", "validate", str(hh_file), "--reader", "nope"]) == 2
    assert "unknown reader" in capsys.readouterr().err


def test_stats_counts_tokens_and_cut_records(tmp_path, capsys):
    path = tmp_path / "ranks.jsonl"
    rows = [{"kind": "ranking", "prompt": "word " * 40, "replies": ["a b", "c", "d"],
             "ranks": [0, 1, 1]},
            {"kind": "pair", "prompt": "hi", "chosen": "a", "rejected": "b", "tie": True}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert main(["data", "stats", str(path), "--max-length", "20"]) == 0
    out = capsys.readouterr().out
    assert "K=3: 1" in out and "ties: 1 tied pairs, 1 rankings with tied replies" in out
    assert "prompt length (MiniLM tokens): p50 1, p90 40, p99 40, max 40" in out
    assert "records cut at max-length 20: 1 of 2" in out


def test_convert_scores_to_pairs_with_reader_option(tmp_path, capsys):
    rows = [{"id": str(i), "dialogue": "A: hi", "summary": s, "model_id": "m",
             "annotations": [{"consistency": 1, "relevance": r, "fluency": 1, "coherence": 1}]}
            for i, (s, r) in enumerate([("x", 5), ("y", 1), ("z", 4)])]
    source, out = tmp_path / "d.jsonl", tmp_path / "pairs.parquet"
    source.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert main(["data", "convert", str(source), str(out), "--to", "pairs",
                 "--option", "aspects=relevance", "--threshold", "1.5"]) == 0
    assert "wrote 2 pairs" in capsys.readouterr().out
    pairs = load(out).records
    assert [(p.chosen, p.rejected, p.margin) for p in pairs] == [("x", "y", 4.0), ("z", "y", 3.0)]
    assert main(["data", "convert", str(out), str(tmp_path / "r.jsonl"), "--to", "rankings"]) == 0
    [ranking] = load(tmp_path / "r.jsonl").records
    assert dict(zip(ranking.replies, ranking.ranks)) == {"x": 0, "z": 0, "y": 1}


def test_field_flag_maps_columns(tmp_path, capsys):
    path = tmp_path / "p.jsonl"
    path.write_text(json.dumps({"q": "p", "good": "a", "bad": "b"}) + "\n")
    assert main(["data", "validate", str(path), "--field", "prompt=q", "--field", "chosen=good",
                 "--field", "rejected=bad"]) == 0
    assert main(["data", "validate", str(path), "--field", "nonsense"]) == 2

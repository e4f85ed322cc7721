"""Readers, auto-detection and validation on tiny inline files written in tmp_path."""

from __future__ import annotations

import gzip
import json

import pytest

from chatrlhf.data import DataError, Pair, Ranking, ScoredSample, load, save

HH = {"chosen": "\n\nHuman: Hi\n\nAssistant: Hello!\n\nHuman: Joke?\n\nAssistant: A pun.",
      "rejected": "\n\nHuman: Hi\n\nAssistant: Hello!\n\nHuman: Joke?\n\nAssistant: No."}


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def test_hh_splits_the_last_assistant_turn_and_reads_gzip(tmp_path):
    path = tmp_path / "train.jsonl.gz"
    with gzip.open(path, "wt") as file:
        file.write(json.dumps(HH) + "\n")
    loaded = load(path)
    assert loaded.reader == "hh"
    [pair] = loaded.records
    assert pair.prompt == "\n\nHuman: Hi\n\nAssistant: Hello!\n\nHuman: Joke?\n\nAssistant:"
    assert (pair.chosen, pair.rejected) == ("A pun.", "No.")
    assert pair.prompt + " " + pair.chosen == HH["chosen"]


def test_hh_empty_reply_is_an_error_unless_allowed(tmp_path):
    row = {"chosen": "\n\nHuman: Hi\n\nAssistant: ", "rejected": "\n\nHuman: Hi\n\nAssistant: Go"}
    path = write_jsonl(tmp_path / "hh.jsonl", [HH, row])
    with pytest.raises(DataError, match=r"line 2, field 'chosen': expected a non-empty reply"):
        load(path)
    assert load(path, skip_invalid=True).skipped == {"empty reply": 1}
    assert load(path, allow_empty=True).records[1].chosen == ""


def test_broken_line_3_is_named_with_the_problem(tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_text(json.dumps(HH) + "\n" + json.dumps(HH) + '\n{"chosen": "x", \n')
    with pytest.raises(DataError) as caught:
        load(path)
    assert caught.value.total == 1
    assert "data.jsonl, line 3" in str(caught.value) and "invalid JSON" in str(caught.value)
    assert caught.value.errors[0].where == "line 3"


def test_errors_are_collected_then_skipped_by_reason(tmp_path):
    rows = [{"prompt": "p", "chosen": "a", "rejected": "b"},
            {"prompt": "p", "chosen": "", "rejected": "b"},
            {"prompt": "p", "chosen": "a", "rejected": "a"},
            {"prompt": "p", "chosen": 3, "rejected": "b"},
            {"prompt": "p", "rejected": "b"},
            {"prompt": "p", "chosen": "a", "rejected": "b", "margin": -1}]
    path = write_jsonl(tmp_path / "pairs.jsonl", rows)
    with pytest.raises(DataError) as caught:
        load(path, max_errors=2)
    assert caught.value.total == 5 and len(caught.value.errors) == 2
    assert "... and 3 more" in str(caught.value) and "--skip-invalid" in str(caught.value)
    loaded = load(path, skip_invalid=True)
    assert len(loaded.records) == 1
    assert loaded.skipped == {"empty reply": 1, "chosen == rejected": 1, "wrong type": 1,
                              "missing field": 1, "negative margin": 1}
    assert [e.where for e in loaded.errors] == ["line 2", "line 3", "line 4", "line 5", "line 6"]
    assert str(loaded.errors[2]).endswith("field 'chosen': expected a string, found 3 (a number)")
    assert "skipped 5 invalid" in loaded.summary()


def test_bare_nan_is_an_error_by_default_and_missing_on_request(tmp_path):
    path = tmp_path / "votes.json"
    path.write_text('[\n {"instruction": "Pick", "input": "", "response1": "A", "response2": "B",\n'
                    '  "annotator1": 1, "annotator2": NaN, "annotator3": 2},\n'
                    ' {"instruction": "Pick", "input": "x", "response1": "A", "response2": "B",\n'
                    '  "annotator1": 2, "annotator2": 2, "annotator3": 0}\n]')
    with pytest.raises(DataError) as caught:
        load(path)
    message = str(caught.value)
    assert "votes.json, record 1 (line 3), field 'annotator2'" in message and "NaN" in message
    assert "--nan-as-missing" in message
    first, second = load(path, nan_as_missing=True).records
    assert first.tie and first.meta["votes"] == [1, 2] and first.meta["agreement"] == 0
    assert second.prompt == "Pick\n\nx" and (second.chosen, second.rejected) == ("B", "A")
    assert second.meta["agreement"] == pytest.approx(2 / 3)


def test_pandalm_majority_and_no_majority(tmp_path):
    base = {"instruction": "Say hi", "input": "", "response1": "hi", "response2": "yo"}
    rows = [dict(base, annotator1="1", annotator2="1", annotator3="2"),
            dict(base, annotator1=0, annotator2=1, annotator3=2),
            dict(base, annotator1=0, annotator2=0, annotator3=2)]
    path = tmp_path / "pandalm.json"
    path.write_text(json.dumps(rows, indent=2))
    won, split, tied = load(path).records
    assert (won.chosen, won.tie, won.prompt) == ("hi", False, "Say hi")
    assert split.tie and split.meta["agreement"] == pytest.approx(1 / 3)
    assert tied.tie and tied.meta["agreement"] == pytest.approx(2 / 3)


def test_pairs_with_text_chats_and_field_mapping(tmp_path):
    chat = [{"role": "user", "content": "Hi"}]
    rows = [{"question": "p", "answer_a": "good", "rejected": "bad", "margin": 2},
            {"question": chat, "answer_a": [{"role": "assistant", "content": "good"}],
             "rejected": [{"role": "assistant", "content": "bad"}]}]
    path = write_jsonl(tmp_path / "mapped.jsonl", rows)
    text, chats = load(path, fields={"prompt": "question", "chosen": "answer_a"}).records
    assert text == Pair("p", "good", "bad", margin=2.0)
    assert chats.prompt == chat and chats.chosen == "good"
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"question": "p", "answer_a": "", "rejected": "b"}])
    with pytest.raises(DataError, match="field 'answer_a'"):
        load(bad, reader="pairs", fields={"prompt": "question", "chosen": "answer_a"})


def test_pairs_whole_conversations_without_prompt(tmp_path):
    history = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hey"},
               {"role": "user", "content": "Joke?"}]
    row = {"chosen": history + [{"role": "assistant", "content": "A pun."}],
           "rejected": history + [{"role": "assistant", "content": "No."}]}
    [pair] = load(write_jsonl(tmp_path / "c.jsonl", [row])).records
    assert pair.prompt == history and (pair.chosen, pair.rejected) == ("A pun.", "No.")
    row["rejected"] = [{"role": "user", "content": "Other"}, {"role": "assistant", "content": "x"}]
    with pytest.raises(DataError, match="different conversation"):
        load(write_jsonl(tmp_path / "d.jsonl", [row]), reader="pairs")


def test_pairs_from_parquet_csv_json_and_datasets(tmp_path):
    import datasets
    import pyarrow as pa
    import pyarrow.csv as pcsv
    import pyarrow.parquet as pq

    rows = [{"prompt": "p", "chosen": "a", "rejected": "b", "margin": 0.5},
            {"prompt": "q", "chosen": "c", "rejected": "d", "margin": None}]
    table = pa.Table.from_pylist(rows)
    pq.write_table(table, tmp_path / "x.parquet")
    pcsv.write_csv(table, tmp_path / "x.csv")
    (tmp_path / "x.json").write_text(json.dumps(rows))
    dataset = datasets.Dataset.from_list(rows)
    dataset.save_to_disk(str(tmp_path / "saved"))
    for source in ["x.parquet", "x.csv", "x.json", "saved"]:
        loaded = load(tmp_path / source)
        assert loaded.reader == "pairs", source
        assert [r.chosen for r in loaded.records] == ["a", "c"], source
        assert loaded.records[0].margin == 0.5, source
    assert len(load(dataset).records) == 2


def test_table_nan_follows_nan_as_missing(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist([{"user_input": "p", "completion": "c",
                                          "score": float("nan")}]), tmp_path / "s.parquet")
    with pytest.raises(DataError, match=r"record 1, field 'score'.*NaN"):
        load(tmp_path / "s.parquet")
    loaded = load(tmp_path / "s.parquet", nan_as_missing=True)
    assert loaded.records == [] and loaded.notes == {"unscored samples left out": 1}


def test_oasst_tree_gives_rankings_of_ranked_siblings(tmp_path):
    def node(text, role, rank=None, replies=()):
        return {"text": text, "role": role, "rank": rank, "replies": list(replies)}

    follow = node("Why?", "prompter", replies=[node("Because", "assistant", 1),
                                               node("Dunno", "assistant", 0),
                                               node("Hm", "assistant", None)])
    tree = {"message_tree_id": "t1", "prompt": node("Hi", "prompter", replies=[
        node("Hello", "assistant", 0, [follow]), node("Go away", "assistant", 2),
        node("Yo", "assistant", 2)])}
    top, nested = load(write_jsonl(tmp_path / "tree.jsonl", [tree])).records
    assert top == Ranking([{"role": "user", "content": "Hi"}], ["Hello", "Go away", "Yo"],
                          [0, 1, 1], top.meta)
    assert nested.prompt[-1] == {"role": "user", "content": "Why?"}
    assert nested.prompt[1] == {"role": "assistant", "content": "Hello"}
    assert (nested.replies, nested.ranks) == (["Because", "Dunno"], [1, 0])


def test_oasst_counts_unranked_replies_in_notes(tmp_path):
    tree = {"message_tree_id": "t", "prompt": {"text": "Hi", "role": "prompter", "replies": [
        {"text": "a", "role": "assistant", "rank": 0, "replies": []},
        {"text": "b", "role": "assistant", "rank": None, "replies": []}]}}
    loaded = load(write_jsonl(tmp_path / "t.jsonl", [tree]))
    assert loaded.records == []
    assert loaded.notes == {"unranked replies left out": 1, "replies ranked alone left out": 1}
    assert "note: unranked replies left out: 1" in loaded.summary()


def test_dialsummeval_aspects(tmp_path):
    scores = [{"consistency": 5, "relevance": 4, "fluency": 3, "coherence": 4},
              {"consistency": 1, "relevance": 2, "fluency": 3, "coherence": 2}]
    row = {"id": "1", "dialogue": "A: hi | B: yo", "summary": "They greet.",
           "annotations": scores, "model_id": "m"}
    path = write_jsonl(tmp_path / "d.jsonl", [row])
    [sample] = load(path).records
    assert sample.rater_scores == [4.0, 2.0] and sample.score == 3.0
    assert load(path, aspects="relevance").records[0].rater_scores == [4.0, 2.0]
    assert load(path, aspects="fluency,consistency").records[0].rater_scores == [4.0, 2.0]
    with pytest.raises(ValueError, match="unknown aspect"):
        load(path, aspects="humour")
    with pytest.raises(ValueError, match="has no option 'aspect'"):
        load(path, aspect="relevance")


def test_unieval_chatllama_shp(tmp_path):
    uni = [{"source": "hi \n hello", "context": "a fact", "system_id": "s",
            "system_output": "nice", "scores": {"overall": 4.5, "naturalness": 2.0}}]
    (tmp_path / "u.json").write_text(json.dumps(uni))
    [sample] = load(tmp_path / "u.json").records
    assert (sample.prompt, sample.reply, sample.score) == ("hi \n hello", "nice", 4.5)
    assert load(tmp_path / "u.json", aspect="naturalness").records[0].score == 2.0

    llama = [{"user_input": "p", "completion": "c", "score": 2},
             {"user_input": "p", "completion": "d", "score": None}]
    (tmp_path / "l.json").write_text(json.dumps(llama))
    loaded = load(tmp_path / "l.json")
    assert loaded.records == [ScoredSample("p", "c", 2.0)]
    assert loaded.notes == {"unscored samples left out": 1}

    shp = {"history": "q", "human_ref_A": "a", "human_ref_B": "b", "labels": 0,
           "score_A": 2, "score_B": 8}
    [pair] = load(write_jsonl(tmp_path / "shp.jsonl", [shp])).records
    assert (pair.chosen, pair.rejected, pair.margin) == ("b", "a", None)
    assert pair.meta["score_ratio"] == 4.0


def test_non_finite_score_and_short_ranking(tmp_path):
    path = tmp_path / "own.jsonl"
    path.write_text('{"kind": "scored", "prompt": "p", "reply": "r", "score": 1e400}\n'
                    '{"kind": "scored", "prompt": "p", "reply": "r", "score": -Infinity}\n'
                    '{"kind": "ranking", "prompt": "p", "replies": ["a"], "ranks": [0]}\n')
    loaded = load(path, skip_invalid=True, nan_as_missing=True)
    assert loaded.skipped == {"non-finite score": 1, "non-finite value": 1,
                              "fewer than 2 replies": 1}
    assert "found -Infinity" in str(loaded.errors[1])


def test_auto_detection_asks_for_reader_when_unsure(tmp_path):
    with pytest.raises(ValueError, match="--reader"):
        load(write_jsonl(tmp_path / "x.jsonl", [{"question": "q", "answer": "a"}]))
    with pytest.raises(ValueError, match="unknown reader"):
        load(write_jsonl(tmp_path / "y.jsonl", [HH]), reader="nope")


def test_save_and_load_round_trip(tmp_path):
    records = [Pair("p", "a", "b", margin=1.0, meta={"k": 1}), Pair("q", "c", "c", tie=True),
               Ranking("p", ["a", "b", "c"], [0, 1, 1]),
               ScoredSample("p", "a", 2.5, rater_scores=[2.0, 3.0], meta={"id": "x"})]
    for name, format in [("own.jsonl.gz", "jsonl"), ("own.parquet", "parquet")]:
        save(records, tmp_path / name, format)
        loaded = load(tmp_path / name)
        assert loaded.reader == "chatrlhf" and loaded.records == records, name

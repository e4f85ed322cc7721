"""Malformed records thrown at every reader through ``chatrlhf.data.load`` (issue 10, item 4).

Hypothesis mutates a valid row of each source (fields deleted, replaced by any JSON value, nested
values broken, NaN / Infinity tokens, undecodable lines, odd line separators) and writes the rows
to a file. The only allowed outcomes are loaded records or ``DataError`` whose errors name the
file, the line and the field; with ``skip_invalid`` every row is accounted for: it gave records,
was skipped (counted by reason) or was left out with a note.
"""

from __future__ import annotations

import json
import re
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from chatrlhf.data import READERS, DataError, load

VALID = {
    "chatrlhf": [{"kind": "pair", "prompt": "p", "chosen": "a", "rejected": "b", "margin": 1.0, "tie": False,
                  "meta": {"k": 1}},
                 {"kind": "ranking", "prompt": [{"role": "user", "content": "p"}], "replies": ["a", "b", "c"],
                  "ranks": [0, 1, 1], "meta": {}},
                 {"kind": "scored", "prompt": "p", "reply": "a", "score": 0.5, "rater_scores": [0.0, 1.0]}],
    "pairs": [{"prompt": "p", "chosen": "a", "rejected": "b", "margin": 0.5},
              {"chosen": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}],
               "rejected": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "b"}]}],
    "hh": [{"chosen": "\n\nHuman: hi\n\nAssistant: a", "rejected": "\n\nHuman: hi\n\nAssistant: b"}],
    "oasst": [{"message_tree_id": "t", "prompt": {"text": "Hi", "role": "prompter", "replies": [
        {"text": "a", "role": "assistant", "rank": 0, "replies": [
            {"text": "more", "role": "prompter", "rank": None, "replies": []}]},
        {"text": "b", "role": "assistant", "rank": 1, "replies": []},
        {"text": "c", "role": "assistant", "rank": None, "replies": []}]}}],
    "pandalm": [{"idx": 1, "cmp_key": "k", "instruction": "i", "input": "x", "response1": "a",
                 "response2": "b", "annotator1": "1", "annotator2": "2", "annotator3": "1"}],
    "dialsummeval": [{"id": "1", "dialogue": "d", "summary": "s", "model_id": "m", "annotations": [
        {"consistency": 5, "relevance": 4, "fluency": 3, "coherence": 4}]}],
    "unieval": [{"source": "s", "system_output": "o", "scores": {"overall": 3.0}, "context": "c"}],
    "chatllama": [{"user_input": "u", "completion": "c", "score": 0.5}],
    "shp": [{"history": "h", "human_ref_A": "a", "human_ref_B": "b", "labels": 1, "score_A": 3,
             "score_B": 1, "post_id": "p", "domain": "d"}],
}
assert set(VALID) == set(READERS), "a new reader needs a valid row here"

# Texts with the characters that break naive line splitting or encoding.
pieces = st.sampled_from(list("ab \n\t\"\\{}[]:,") + ["\u2028", "\x85", "\x1e", "é", "\ufeff", "\ud800",
                                                      "\n\nHuman:", "\n\nAssistant:", "[PAD]"])
texts = st.lists(pieces, max_size=8).map("".join)
scalars = st.one_of(st.none(), st.booleans(), st.integers(-10**20, 10**20), texts,
                    st.floats(allow_nan=False, allow_infinity=False), st.sampled_from([1e308, -1e308, 5e-324]))
json_values = st.recursive(scalars, lambda inner: st.one_of(
    st.lists(inner, max_size=3), st.dictionaries(st.sampled_from(["role", "content", "text", "rank", "replies",
                                                                   "overall", "x"]), inner, max_size=3)),
    max_leaves=6)
NAN_MARK = "\x00nan-token\x00"


def mutate(value, draw, depth=0):
    """A copy of ``value`` with some fields deleted or replaced, recursively."""
    action = draw(st.sampled_from(["keep", "keep", "replace", "recurse", "nan"] if depth else ["recurse"]))
    if action == "replace":
        return draw(json_values)
    if action == "nan":
        return NAN_MARK
    if isinstance(value, dict):
        out = {}
        for key, item in value.items():
            if not draw(st.booleans()) or draw(st.integers(0, 5)):  # most fields kept
                out[key] = mutate(item, draw, depth + 1)
        if draw(st.integers(0, 6)) == 0:
            out[draw(texts)] = draw(json_values)
        return out
    if isinstance(value, list):
        items = [mutate(item, draw, depth + 1) for item in value]
        if items and draw(st.integers(0, 4)) == 0:
            items.pop(draw(st.integers(0, len(items) - 1)))
        return items
    return value if action != "recurse" else draw(st.one_of(st.just(value), json_values))


def line_of(row, draw) -> str:
    kind = draw(st.sampled_from(["row"] * 8 + ["garbage", "not an object"]))
    if kind == "garbage":
        return draw(st.text(min_size=1, max_size=20).filter(
            lambda t: "\n" not in t and "\r" not in t and t.strip() and not t.lstrip().startswith("[")))
    if kind == "not an object":  # (a first line starting with "[" makes the file a JSON list)
        return json.dumps(draw(scalars))
    text = json.dumps(row, ensure_ascii=draw(st.booleans()))
    token = draw(st.sampled_from(["NaN", "Infinity", "-Infinity"]))
    return text.replace(json.dumps(NAN_MARK, ensure_ascii=False), token).replace(json.dumps(NAN_MARK), token)


def check_error(error: DataError, path: str, place: str) -> None:
    assert error.source == path and error.errors and error.total >= len(error.errors)
    for e in error.errors:
        assert e.source == path and re.fullmatch(place, e.where), e.where
        assert isinstance(e.expected, str) and isinstance(e.found, str) and e.reason
        assert path in str(error) and e.where in str(error)


def outcome(path: str, reader: str, **kwargs):
    try:
        return load(path, reader=reader, **kwargs)
    except DataError as error:
        return error


@pytest.mark.parametrize("reader", sorted(READERS))
@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_malformed_jsonl_rows_load_or_raise_data_error_and_are_all_accounted_for(reader, data):
    draw = data.draw
    rows = [mutate(draw(st.sampled_from(VALID[reader])), draw) for _ in range(draw(st.integers(1, 4)))]
    lines = [line_of(row, draw) for row in rows]
    ending = draw(st.sampled_from(["\n", "\r\n"]))
    bom = "\ufeff" if draw(st.integers(0, 9)) == 0 else ""
    with tempfile.TemporaryDirectory() as folder:
        path = str(Path(folder) / "data.jsonl")
        # A lone surrogate ("\ud800") written raw is not UTF-8: the loader must say which line.
        Path(path).write_text(bom + "".join(line + ending for line in lines), encoding="utf-8",
                              errors="surrogatepass")

        strict = outcome(path, reader)
        if isinstance(strict, DataError):
            check_error(strict, path, r"line \d+")
        lenient = load(path, reader=reader, skip_invalid=True, nan_as_missing=draw(st.booleans()))
        assert lenient.reader == reader

        # Row by row: each gives records, is skipped (counted), or is left out with a note.
        records, skipped = [], 0
        for number, line in enumerate(lines, start=1):
            one = str(Path(folder) / f"row{number}.jsonl")
            Path(one).write_text(line + "\n", encoding="utf-8", errors="surrogatepass")
            alone = load(one, reader=reader, skip_invalid=True)
            if not (alone.records or alone.skipped or alone.notes):
                # Only an OpenAssistant tree with no group of sibling replies has nothing to leave out.
                assert reader == "oasst" and not has_sibling_group(json.loads(line)), (
                    f"row {number} gave nothing and was not counted: {line!r}")
            records += alone.records
            skipped += sum(alone.skipped.values())
        whole = load(path, reader=reader, skip_invalid=True)
        assert whole.records == records and sum(whole.skipped.values()) == skipped
        if not isinstance(strict, DataError):
            assert strict.records == records and skipped == 0


def has_sibling_group(tree) -> bool:
    stack = [tree.get("prompt")]
    while stack:
        node = stack.pop()
        replies = node.get("replies") if isinstance(node, dict) else None
        if isinstance(replies, list):
            if len(replies) >= 2:
                return True
            stack += replies
    return False


@pytest.mark.parametrize("reader", sorted(READERS))
@settings(max_examples=10, deadline=None)
@given(data=st.data())
def test_malformed_json_lists_load_or_raise_data_error(reader, data):
    draw = data.draw
    rows = [mutate(draw(st.sampled_from(VALID[reader])), draw) for _ in range(draw(st.integers(1, 3)))]
    text = "[\n" + ",\n".join(line_of(row, draw) for row in rows) + "\n]"
    with tempfile.TemporaryDirectory() as folder:
        path = str(Path(folder) / "data.json")
        Path(path).write_text(text, encoding="utf-8", errors="surrogatepass")
        for skip in (False, True):
            result = outcome(path, reader, skip_invalid=skip)
            if isinstance(result, DataError):
                check_error(result, path, r"record \d+( \(line \d+\))?|line \d+")


def test_line_separators_inside_json_strings_are_not_line_breaks(tmp_path):
    # json.dumps(ensure_ascii=False) writes U+2028 / U+0085 raw; JSONL splits on "\n" only.
    row = {"prompt": "a\u2028b\x85c", "chosen": "x\x1ey", "rejected": "z"}
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps(row, ensure_ascii=False) + "\n" + json.dumps(row) + "\n", encoding="utf-8")
    loaded = load(path, reader="pairs")
    assert [r.prompt for r in loaded.records] == ["a\u2028b\x85c"] * 2


def test_undecodable_bytes_and_byte_order_mark_are_reported_by_line(tmp_path):
    good = json.dumps({"prompt": "p", "chosen": "a", "rejected": "b"}).encode()
    path = tmp_path / "d.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + good + b"\n" + good[:-2] + b"\xff\xfe\"}\n" + good + b"\n")
    with pytest.raises(DataError, match=r"line 2: expected UTF-8 text") as error:
        load(path, reader="pairs")
    assert error.value.total == 1
    loaded = load(path, reader="pairs", skip_invalid=True)
    assert len(loaded.records) == 2 and loaded.skipped == {"not UTF-8": 1}


def test_deeply_nested_json_is_an_error_not_a_crash(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('{"prompt": "p", "chosen": "a", "rejected": "b"}\n' + "[" * 100_000 + "]" * 100_000 + "\n")
    loaded = load(path, reader="pairs", skip_invalid=True)
    assert len(loaded.records) == 1 and sum(loaded.skipped.values()) == 1

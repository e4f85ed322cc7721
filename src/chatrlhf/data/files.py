"""Reading and writing files of preference data: ``load`` any supported file into canonical
records, ``save`` records in the project's own format.

Files are JSONL, JSON lists, Parquet or CSV (each optionally gzipped), or Hugging Face datasets.
Their rows are numbered for error messages and handed one by one to a reader from
``readers.READERS``. Invalid records are collected and reported together (``DataError``), or
skipped and counted by reason with ``skip_invalid=True``.
"""

from __future__ import annotations

import gzip
import inspect
import json
import math
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from chatrlhf.data.readers import READERS, detect
from chatrlhf.data.records import Record, kind_of, to_dict
from chatrlhf.data.validation import Constant, DataError, Invalid, RecordError, check_record, describe


@dataclass
class Loaded:
    """The records of one file, and an account of everything that was not turned into one."""

    records: list[Record]
    source: str
    reader: str
    skipped: Counter = field(default_factory=Counter)  # reason -> invalid records left out
    errors: list[RecordError] = field(default_factory=list)  # the first max_errors of them
    notes: Counter = field(default_factory=Counter)  # what readers leave out on purpose -> count

    def summary(self) -> str:
        """A few human-readable lines: records by kind, skipped by reason, notes."""
        kinds = Counter(kind_of(r) for r in self.records)
        plural = {"pair": "pairs", "ranking": "rankings", "scored": "scored samples"}
        by_kind = ", ".join(f"{n} {plural[kind]}" for kind, n in sorted(kinds.items())) or "none"
        lines = [f"{self.source}: {len(self.records)} records ({by_kind}), reader '{self.reader}'"]
        if self.skipped:
            lines.append(f"skipped {sum(self.skipped.values())} invalid: "
                         + ", ".join(f"{reason}: {n}" for reason, n in self.skipped.most_common()))
        for note, n in self.notes.most_common():
            lines.append(f"note: {note}: {n}")
        return "\n".join(lines)


def load(path, reader: str = "auto", fields: dict | None = None, skip_invalid: bool = False,
         nan_as_missing: bool = False, max_errors: int = 20, allow_empty: bool = False,
         **options) -> Loaded:
    """Read a file (or a ``datasets.Dataset``) of preference data into canonical records.

    Args:
        path: a .jsonl / .json / .parquet / .csv file (each may end in .gz), a folder saved by
            ``datasets.Dataset.save_to_disk``, or a ``datasets.Dataset``.
        reader: a name from ``READERS``, or "auto" to detect it from the first record's fields.
        fields: canonical name -> the file's column name, e.g. {"chosen": "answer_a"}.
        skip_invalid: leave invalid records out (counted in ``skipped``) instead of raising.
        nan_as_missing: read a bare NaN (invalid JSON, or a float NaN in a table) as missing.
        max_errors: how many errors to keep in ``errors`` and to show; all are counted.
        allow_empty: accept empty replies (HH-RLHF has a few chosen empty replies: silence
            preferred to a harmful answer).
        options: the reader's own options, e.g. ``aspects="relevance"`` for dialsummeval.

    Raises:
        DataError: when records are invalid and ``skip_invalid`` is False, after reading them all.
        ValueError: unknown reader or option, undetectable format, a JSON list that cannot parse.
    """
    source = "<datasets.Dataset>" if hasattr(path, "column_names") else str(path)
    rows = _rows(path, source, nan_as_missing)
    rename = {column: canonical for canonical, column in (fields or {}).items()}
    if rename:
        rows = ((place, _rename(row, rename)) for place, row in rows)
    if reader == "auto":
        head, rows = _first_valid(rows)
        if head is None:
            raise ValueError(f"{source}: no valid record to detect the format from; "
                             f"choose one with --reader NAME")
        reader = detect(head, source)
    if reader not in READERS:
        raise ValueError(f"unknown reader {reader!r}; choose one of: {', '.join(READERS)}")
    read = READERS[reader]
    _check_options(read, reader, options)

    loaded = Loaded([], source, reader)
    for place, row in rows:
        try:
            if isinstance(row, Invalid):
                raise row
            records = read(row, loaded.notes, **options)
            for record in records:
                check_record(record, allow_empty)
        except Invalid as bad:
            column = (fields or {}).get(bad.field, bad.field)
            loaded.skipped[bad.reason] += 1
            if len(loaded.errors) < max_errors:
                loaded.errors.append(RecordError(source, place.at(column), column,
                                                 bad.expected, bad.found, bad.reason))
            continue
        loaded.records.extend(records)
    if loaded.skipped and not skip_invalid:
        raise DataError(source, loaded.errors, sum(loaded.skipped.values()), loaded.skipped)
    return loaded


def save(records: list[Record], path, format: str = "jsonl") -> None:
    """Write records in the project's own format (``to_dict`` per row); ``load`` reads it back.

    JSONL (gzipped when the name ends in .gz) holds anything. Parquet stores ``meta`` as JSON text
    (its keys vary between records) and needs all prompts of one type (all text or all chats).
    """
    path = Path(path)
    rows = [to_dict(r) for r in records]
    if format == "jsonl":
        with _open(path, "wt") as file:
            for row in rows:
                file.write(json.dumps(row, ensure_ascii=False, allow_nan=False) + "\n")
    elif format == "parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        if len({isinstance(r["prompt"], str) for r in rows}) > 1:
            raise ValueError("Parquet needs all prompts of one type (text or chat); use jsonl")
        for row in rows:
            row["meta"] = json.dumps(row["meta"], ensure_ascii=False)
        # from_pylist takes its columns from the first row; kinds differ in their fields.
        columns = list(dict.fromkeys(key for row in rows for key in row))
        rows = [{key: row.get(key) for key in columns} for row in rows]
        pq.write_table(pa.Table.from_pylist(rows), path)
    else:
        raise ValueError(f"unknown format {format!r}; choose jsonl or parquet")


# --- rows from files --------------------------------------------------------------------------


@dataclass
class _Place:
    """Where a row is, for error messages: "line 3", "record 5", or "record 5 (line 41)"."""

    label: str
    text: str = ""  # the row's JSON text inside a JSON list, to find the line of a field
    first_line: int = 0

    def at(self, field: str | None) -> str:
        if not self.text:
            return self.label
        line = self.first_line
        key = re.sub(r"\[\d*\]", "", field).split(".")[-1] if field else ""  # "a.b[2]" -> "b"
        found = self.text.find(f'"{key}"') if key else -1
        if found > 0:
            line += self.text.count("\n", 0, found)
        return f"{self.label} (line {line})"


def _open(path: Path, mode: str = "rt"):
    """Open a file, through gzip when its name ends in .gz."""
    if path.suffix == ".gz":
        return gzip.open(path, mode, encoding="utf-8")
    return open(path, mode, encoding="utf-8")


def _rows(path, source: str, nan_as_missing: bool) -> Iterator[tuple[_Place, Any]]:
    """(place, row) for each row of the input; a row is a dict, or an Invalid for a broken one."""
    if hasattr(path, "column_names"):  # a datasets.Dataset passed directly
        return _table_rows(iter(path), nan_as_missing)
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no such file or folder: {path}")
    if path.is_dir():
        import datasets

        dataset = datasets.load_from_disk(str(path))
        if isinstance(dataset, datasets.DatasetDict):
            raise ValueError(f"{path} holds the splits {list(dataset)}; pass the folder of one, "
                             f"e.g. {path / next(iter(dataset))}")
        return _table_rows(iter(dataset), nan_as_missing)
    name = path.name.lower().removesuffix(".gz")
    if name.endswith(".parquet"):
        import pyarrow.parquet as pq

        batches = pq.ParquetFile(path).iter_batches()
        return _table_rows((row for batch in batches for row in batch.to_pylist()), nan_as_missing)
    if name.endswith(".csv"):
        import pyarrow.csv as pcsv

        with _open(path, "rb") if path.suffix == ".gz" else open(path, "rb") as file:
            table = pcsv.read_csv(file)
        return _table_rows(iter(table.to_pylist()), nan_as_missing)
    if name.endswith((".jsonl", ".json", ".ndjson")):
        with gzip.open(path, "rb") if path.suffix == ".gz" else open(path, "rb") as file:
            data = file.read().removeprefix(b"\xef\xbb\xbf")  # a byte order mark is no data
        if data.lstrip().startswith(b"["):
            try:
                text = data.decode("utf-8")
            except UnicodeDecodeError as error:
                line = data.count(b"\n", 0, error.start) + 1
                bad = RecordError(source, f"line {line}", None, "UTF-8 text",
                                  f"the bytes {data[error.start:error.end]!r}", "not UTF-8")
                raise DataError(source, [bad], 1) from None
            return _json_list_rows(text, source, nan_as_missing)
        return _json_lines_rows(data, nan_as_missing)
    raise ValueError(f"{path}: unknown file type; use .jsonl, .json, .parquet or .csv "
                     f"(optionally .gz), or a folder saved by datasets")


def _json_lines_rows(data: bytes, nan_as_missing: bool):
    constants = []
    # Split on "\n" only: str.splitlines would also split on U+2028, U+0085, ... which JSON
    # strings may hold raw (json.dumps with ensure_ascii=False writes them so).
    for number, raw in enumerate(data.split(b"\n"), start=1):
        place = _Place(f"line {number}")
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as error:
            yield place, Invalid(None, "UTF-8 text", f"the bytes {raw[error.start:error.end]!r} at "
                                 f"byte {error.start + 1}", "not UTF-8")
            continue
        if not line.strip():
            continue
        try:
            row = json.loads(line, parse_constant=lambda name: constants.append(name)
                             or Constant(name))
        except json.JSONDecodeError as error:
            yield place, Invalid(None, "a JSON object", f"invalid JSON ({error.msg} at column "
                                 f"{error.colno})", "invalid JSON")
            continue
        except RecursionError:
            constants.clear()
            yield place, Invalid(None, "a JSON object", "invalid JSON (nested too deeply)", "invalid JSON")
            continue
        yield place, _checked(row, bool(constants), nan_as_missing)
        constants.clear()


def _json_list_rows(text: str, source: str, nan_as_missing: bool):
    # Decode element by element, not the whole list at once, to know each record's first line.
    constants = []
    decoder = json.JSONDecoder(parse_constant=lambda name: constants.append(name)
                               or Constant(name))
    space = re.compile(r"\s*")
    position = space.match(text).end() + 1  # just after "["
    number = 0
    while True:
        position = space.match(text, position).end()
        if text.startswith("]", position):
            return
        number += 1
        try:
            row, end = decoder.raw_decode(text, position)
        except RecursionError:
            bad = RecordError(source, f"record {number}", None, "a valid JSON list",
                              "invalid JSON (nested too deeply)", "invalid JSON")
            raise DataError(source, [bad], 1) from None
        except json.JSONDecodeError as error:
            # One broken record breaks the list: there is no line to resynchronise on.
            bad = RecordError(source, f"record {number} (line {error.lineno})", None,
                              "a valid JSON list", f"invalid JSON ({error.msg} at column "
                              f"{error.colno})", "invalid JSON")
            raise DataError(source, [bad], 1) from None
        place = _Place(f"record {number}", text[position:end], text.count("\n", 0, position) + 1)
        yield place, _checked(row, bool(constants), nan_as_missing)
        constants.clear()
        position = space.match(text, end).end()
        if text.startswith(",", position):
            position += 1


def _table_rows(rows, nan_as_missing: bool):
    for number, row in enumerate(rows, start=1):
        yield _Place(f"record {number}"), _checked(row, True, nan_as_missing)


def _checked(row: Any, has_constants: bool, nan_as_missing: bool):
    """The row, with NaN read as None if asked; an Invalid for a non-object or a kept NaN."""
    if not isinstance(row, dict):
        return Invalid(None, "a JSON object (one record)", describe(row), "wrong type")
    if not has_constants:
        return row
    try:
        return _replace_nan(row, "", nan_as_missing)
    except Invalid as bad:
        bad.row = row  # still good enough to detect the format from
        return bad


def _replace_nan(value: Any, path: str, nan_as_missing: bool) -> Any:
    # Strict by default: a NaN or Infinity token anywhere in a record is reported, even in a
    # field the reader does not use, because it means the file is not the JSON it claims to be.
    if isinstance(value, dict):
        return {k: _replace_nan(v, f"{path}.{k}" if path else k, nan_as_missing)
                for k, v in value.items()}
    if isinstance(value, list):
        return [_replace_nan(v, f"{path}[{i}]", nan_as_missing) for i, v in enumerate(value)]
    is_nan = (isinstance(value, Constant) and value.name == "NaN") or (
        isinstance(value, float) and math.isnan(value))
    if is_nan and nan_as_missing:
        return None
    if is_nan:
        raise Invalid(path, "a value (strict JSON has no NaN)", "NaN", "NaN value")
    if isinstance(value, Constant):
        raise Invalid(path, "a finite value (strict JSON has no Infinity)", value.name,
                      "non-finite value")
    return value


def _first_valid(rows):
    """The first row that parsed to a dict, and an iterator over all rows (that one included)."""
    seen = []
    for place, row in rows:
        seen.append((place, row))
        head = getattr(row, "row", row)
        if isinstance(head, dict):
            return head, _chain(seen, rows)
    return None, iter(seen)


def _chain(seen, rows):
    yield from seen
    yield from rows


def _rename(row, rename: dict):
    if not isinstance(row, dict):
        return row
    return {rename.get(key, key): value for key, value in row.items()}


def _check_options(read, name: str, options: dict) -> None:
    allowed = list(inspect.signature(read).parameters)[2:]
    unknown = [key for key in options if key not in allowed]
    if unknown:
        raise ValueError(f"reader {name!r} has no option {unknown[0]!r}; "
                         f"its options: {', '.join(allowed) or 'none'}")

"""Prompt/response data sets: JSONL or CSV files with a `prompt` column and an optional `response`,
or a Hub dataset with a column mapping. Every problem is a one-line `DatasetError`.

Files are read one row at a time (`iter_rows`), each row at most `max_row_bytes` long, so that checking an
upload (`scan_rows`) holds one row in memory, never the file. The rules of a row, the same for every reader:
UTF-8 text; a JSONL line is a JSON object within `untrusted.loads`' bounds (no NaN, no 5,000-digit integers, no
deep nesting); at most 256 columns named by at most 200 printable characters; a non-empty text prompt; prompts
and responses valid Unicode (no lone surrogates such as JSON's "\\ud800").
"""

from __future__ import annotations

import csv
import hashlib
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, AnyStr

from .errors import DatasetError
from .untrusted import UntrustedValueError, control_free, encodable, loads, quote

SUFFIXES = (".jsonl", ".json", ".csv")
MAX_ROW_BYTES = 1 << 20
MAX_COLUMNS = 256
MAX_COLUMN_CHARS = 200


@dataclass(frozen=True)
class Example:
    prompt: str
    response: str | None = None


def _lines(handle: IO[AnyStr], source: str, max_row_bytes: int) -> Iterator[tuple[int, AnyStr]]:
    """(line number, line) of an open file, refusing a line longer than `max_row_bytes` before reading more."""
    number = 0
    while line := handle.readline(max_row_bytes + 1):
        number += 1
        if len(line) > max_row_bytes:
            raise DatasetError(f"{source}:{number}: a row is longer than {max_row_bytes} bytes")
        yield number, line


def _check_columns(row: dict, source: str, number: int) -> dict:
    if len(row) > MAX_COLUMNS:
        raise DatasetError(f"{source}:{number}: more than {MAX_COLUMNS} columns")
    for key in row:
        if not isinstance(key, str) or len(key) > MAX_COLUMN_CHARS or not control_free(key):
            raise DatasetError(
                f"{source}:{number}: column name {quote(key)} is not printable text of at most {MAX_COLUMN_CHARS} "
                "characters"
            )
    return row


def _rows_jsonl(path: Path, source: str, max_row_bytes: int) -> Iterator[tuple[int, dict]]:
    with path.open("rb") as handle:
        for number, raw in _lines(handle, source, max_row_bytes):
            if number == 1:
                raw = raw.removeprefix(b"\xef\xbb\xbf")
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise DatasetError(f"{source}:{number}: not UTF-8 text (byte {exc.start})") from None
            if not line.strip():
                continue
            try:
                row = loads(line)
            except UntrustedValueError as exc:
                raise DatasetError(f"{source}:{number}: {exc}") from None
            if not isinstance(row, dict):
                raise DatasetError(f"{source}:{number}: each line must be a JSON object")
            yield number, _check_columns(row, source, number)


def _rows_csv(path: Path, source: str, max_row_bytes: int) -> Iterator[tuple[int, dict]]:
    with path.open("r", encoding="utf-8-sig", newline="") as handle:
        lines = (line for _, line in _lines(handle, source, max_row_bytes))
        reader = csv.reader(lines)
        try:
            header = next(reader, None)
            if header is None:
                return
            _check_columns(dict.fromkeys(header), source, 1)
            for values in reader:
                if not values:  # a blank line
                    continue
                number = reader.line_num
                if len(values) > len(header):
                    raise DatasetError(f"{source}:{number}: more fields than the header's {len(header)}")
                yield number, dict(zip(header, values)) | dict.fromkeys(header[len(values) :])
        except UnicodeDecodeError:
            raise DatasetError(f"{source}: not UTF-8 text (near line {reader.line_num + 1})") from None
        except csv.Error as exc:
            raise DatasetError(f"{source}: not valid CSV ({exc})") from None


def iter_rows(
    path: str | Path, *, source: str | None = None, max_row_bytes: int = MAX_ROW_BYTES
) -> Iterator[tuple[int, dict]]:
    """(line number, row) of a JSONL/CSV file, one at a time; errors name the file as `source` (default: its
    path)."""
    path = Path(path)
    source = source or str(path)
    if not path.is_file():
        raise DatasetError(f"data file not found: {source}")
    suffix = path.suffix.lower()
    if suffix not in SUFFIXES:
        raise DatasetError(f"{source}: unsupported data format {quote(path.suffix)} (use .jsonl or .csv)")
    reader = _rows_csv if suffix == ".csv" else _rows_jsonl
    return reader(path, source, max_row_bytes)


def read_rows(path: str | Path, *, source: str | None = None, max_row_bytes: int = MAX_ROW_BYTES) -> list[dict]:
    """The rows of a JSONL/CSV file as dicts (UTF-8 only)."""
    rows = [row for _, row in iter_rows(path, source=source, max_row_bytes=max_row_bytes)]
    if not rows:
        raise DatasetError(f"{source or path}: holds no rows")
    return rows


def _text(value: object, column: str, source: str, number: int) -> str:
    text = value if isinstance(value, str) else str(value)
    if not encodable(text):
        raise DatasetError(f"{source}: row {number} has a {column!r} that is not valid Unicode (a lone surrogate)")
    return text


def to_example(
    row: dict,
    number: int,
    source: str,
    *,
    prompt_column: str = "prompt",
    response_column: str | None = "response",
    require_response: bool = False,
) -> Example:
    """One row as an example: a non-empty text prompt; the response (made text) when the column is given."""
    prompt = row.get(prompt_column)
    if not isinstance(prompt, str) or not prompt.strip():
        raise DatasetError(f"{source}: row {number} has an empty or non-text {prompt_column!r}")
    prompt = _text(prompt, prompt_column, source, number)
    response = row.get(response_column) if response_column is not None else None
    response = _text(response, str(response_column), source, number) if response is not None else None
    if require_response and not (response and response.strip()):
        raise DatasetError(f"{source}: row {number} has an empty {response_column!r}")
    return Example(prompt, response if response else None)


def _check_prompt_column(row: dict, source: str, prompt_column: str) -> None:
    if prompt_column not in row:
        raise DatasetError(f"{source}: missing column {prompt_column!r} (has {quote(sorted(row), 200)})")


def to_examples(
    rows: list[dict],
    source: str,
    *,
    prompt_column: str = "prompt",
    response_column: str | None = "response",
    require_response: bool = False,
) -> list[Example]:
    """Rows → examples; the prompt column is required, the response column only if `require_response`."""
    _check_prompt_column(rows[0], source, prompt_column)
    has_response = response_column is not None and any(response_column in row for row in rows)
    if require_response and not has_response:
        raise DatasetError(f"{source}: missing column {response_column!r}, needed here (empirical Fisher / training)")
    return [
        to_example(
            row,
            number,
            source,
            prompt_column=prompt_column,
            response_column=response_column if has_response else None,
            require_response=require_response,
        )
        for number, row in enumerate(rows, start=1)
    ]


@dataclass(frozen=True)
class RowsSummary:
    """What a data file holds, found while checking every row: row count and columns in order of appearance."""

    rows: int
    columns: list[str]


def scan_rows(path: str | Path, source: str, *, max_row_bytes: int = MAX_ROW_BYTES) -> RowsSummary:
    """Check a JSONL/CSV file row by row with the rules of `to_examples` (no response required), holding one row
    in memory; raises `DatasetError` naming `source`."""
    count, columns = 0, {}
    for count, (_, row) in enumerate(iter_rows(path, source=source, max_row_bytes=max_row_bytes), start=1):
        if count == 1:
            _check_prompt_column(row, source, "prompt")
        to_example(row, count, source)
        columns.update(dict.fromkeys(row))
        if len(columns) > MAX_COLUMNS:
            raise DatasetError(f"{source}: more than {MAX_COLUMNS} different columns")
    if not count:
        raise DatasetError(f"{source}: holds no rows")
    return RowsSummary(count, list(columns))


def load_examples(path: str | Path, *, require_response: bool = False, limit: int | None = None) -> list[Example]:
    """Examples of a JSONL/CSV file, at most `limit` (the first ones, in file order)."""
    examples = to_examples(read_rows(path), str(path), require_response=require_response)
    return examples[:limit] if limit is not None else examples


def load_hub_examples(
    dataset_id: str,
    *,
    split: str = "train",
    revision: str | None = None,
    prompt_column: str = "prompt",
    response_column: str | None = "response",
    require_response: bool = False,
    limit: int | None = None,
) -> list[Example]:
    """Examples of a Hugging Face Hub dataset, with a column mapping (needs the `datasets` package)."""
    try:
        from datasets import load_dataset
    except ImportError:
        raise DatasetError("Hub datasets need the `datasets` package (pip install datasets)") from None
    try:
        data = load_dataset(dataset_id, split=split, revision=revision)
    except Exception as exc:  # noqa: BLE001 - the Hub client raises many types; all mean "cannot load"
        raise DatasetError(f"cannot load Hub dataset {dataset_id}@{revision or 'main'}: {exc}") from None
    rows = [dict(row) for row in (data.select(range(min(limit, len(data)))) if limit else data)]
    if not rows:
        raise DatasetError(f"Hub dataset {dataset_id}: split {split!r} is empty")
    return to_examples(
        rows,
        dataset_id,
        prompt_column=prompt_column,
        response_column=response_column,
        require_response=require_response,
    )


def file_sha256(path: Path) -> str:
    """Hex sha256 of a file's bytes, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def examples_sha256(examples: list[Example]) -> str:
    """Content hash of examples (order matters): the data part of the Fisher cache key."""
    digest = hashlib.sha256()
    for example in examples:
        digest.update(json.dumps([example.prompt, example.response], ensure_ascii=False).encode())
    return digest.hexdigest()

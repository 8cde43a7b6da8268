"""Prompt/response data sets: JSONL or CSV files with a `prompt` column and an optional `response`,
or a Hub dataset with a column mapping. Every problem is a one-line `DatasetError`."""

from __future__ import annotations

import csv
import hashlib
import io
import json
from dataclasses import dataclass
from pathlib import Path

from .errors import DatasetError

SUFFIXES = (".jsonl", ".json", ".csv")


@dataclass(frozen=True)
class Example:
    prompt: str
    response: str | None = None


def _rows_jsonl(text: str, path: Path) -> list[dict]:
    rows = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DatasetError(f"{path}:{number}: not valid JSON ({exc.msg})") from None
        if not isinstance(row, dict):
            raise DatasetError(f"{path}:{number}: each line must be a JSON object")
        rows.append(row)
    return rows


def _rows_csv(text: str, path: Path) -> list[dict]:
    try:
        return list(csv.DictReader(io.StringIO(text)))
    except csv.Error as exc:
        raise DatasetError(f"{path}: not valid CSV ({exc})") from None


def read_rows(path: str | Path) -> list[dict]:
    """The rows of a JSONL/CSV file as dicts (UTF-8 only)."""
    path = Path(path)
    if not path.is_file():
        raise DatasetError(f"data file not found: {path}")
    if path.suffix.lower() not in SUFFIXES:
        raise DatasetError(f"{path}: unsupported data format {path.suffix!r} (use .jsonl or .csv)")
    try:
        text = path.read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise DatasetError(f"{path}: not UTF-8 text (byte {exc.start})") from None
    rows = _rows_csv(text, path) if path.suffix.lower() == ".csv" else _rows_jsonl(text, path)
    if not rows:
        raise DatasetError(f"{path}: holds no rows")
    return rows


def to_examples(
    rows: list[dict],
    source: str,
    *,
    prompt_column: str = "prompt",
    response_column: str | None = "response",
    require_response: bool = False,
) -> list[Example]:
    """Rows → examples; the prompt column is required, the response column only if `require_response`."""
    if prompt_column not in rows[0]:
        raise DatasetError(f"{source}: missing column {prompt_column!r} (has {sorted(rows[0])})")
    has_response = response_column is not None and any(response_column in row for row in rows)
    if require_response and not has_response:
        raise DatasetError(f"{source}: missing column {response_column!r}, needed here (empirical Fisher / training)")
    examples = []
    for number, row in enumerate(rows, start=1):
        prompt = row.get(prompt_column)
        if not isinstance(prompt, str) or not prompt.strip():
            raise DatasetError(f"{source}: row {number} has an empty or non-text {prompt_column!r}")
        response = row.get(response_column) if has_response else None
        if response is not None and not isinstance(response, str):
            response = str(response)
        if require_response and not (response and response.strip()):
            raise DatasetError(f"{source}: row {number} has an empty {response_column!r}")
        examples.append(Example(prompt, response if response else None))
    return examples


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

"""Reading text that comes from outside (uploaded configs, dataset rows, request values), torch-free.

`loads` is `json.loads` with bounds: nesting depth, digits of an integer, no `NaN`/`Infinity` and no float that
overflows to ±inf (`1e400`). Python's own parser accepts the last two, raises `RecursionError` on deep nesting
and `ValueError` past 4300 digits; here every refusal is one `UntrustedValueError` with a short message.

`quote` shows at most a short prefix of a value, so that an error message never echoes a huge input back.
"""

from __future__ import annotations

import json
import math
import re
from typing import Any

MAX_DEPTH = 32
MAX_INT_DIGITS = 64
QUOTE_CHARS = 60
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")


class UntrustedValueError(ValueError):
    """A value from outside is malformed or out of bounds; the message says how, quoting at most a prefix."""


def quote(value: object, limit: int = QUOTE_CHARS) -> str:
    """`repr` of `value`, cut to its first `limit` characters (with the full length) when longer."""
    if isinstance(value, str) and len(value) > limit:
        return f"{value[:limit]!r}… ({len(value)} characters)"
    text = repr(value)
    return text if len(text) <= limit else f"{text[:limit]}… ({len(text)} characters)"


def _parse_int(text: str, max_digits: int) -> int:
    if len(text.lstrip("-")) > max_digits:
        raise UntrustedValueError(f"an integer has more than {max_digits} digits")
    return int(text)


def _parse_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise UntrustedValueError(f"the number {quote(text, 20)} is out of range")
    return value


def _parse_constant(name: str) -> float:
    raise UntrustedValueError(f"{name} is not a JSON number")


def depth(value: Any) -> int:
    """Nesting depth of a parsed JSON value: 0 for a scalar, 1 for a flat list or object (iterative)."""
    deepest, todo = 0, [(value, 0)]
    while todo:
        item, level = todo.pop()
        children = item.values() if isinstance(item, dict) else item if isinstance(item, list) else None
        if children is None:
            continue
        deepest = max(deepest, level + 1)
        todo.extend((child, level + 1) for child in children if isinstance(child, (dict, list)))
    return deepest


def loads(text: str | bytes, *, max_depth: int = MAX_DEPTH, max_int_digits: int = MAX_INT_DIGITS) -> Any:
    """Parse JSON from outside; raises `UntrustedValueError` for invalid JSON, a non-finite number, an integer
    of more than `max_int_digits` digits or nesting deeper than `max_depth`."""
    try:
        value = json.loads(
            text,
            parse_int=lambda s: _parse_int(s, max_int_digits),
            parse_float=_parse_float,
            parse_constant=_parse_constant,
        )
    except UntrustedValueError:
        raise
    except json.JSONDecodeError as exc:
        raise UntrustedValueError(f"not valid JSON ({exc.msg} at line {exc.lineno} column {exc.colno})") from None
    except UnicodeDecodeError as exc:
        raise UntrustedValueError(f"not UTF-8 text (byte {exc.start})") from None
    except RecursionError:
        raise UntrustedValueError(f"JSON nested deeper than {max_depth} levels") from None
    except ValueError as exc:  # anything else the parser refuses
        raise UntrustedValueError(f"not valid JSON ({quote(str(exc))})") from None
    if depth(value) > max_depth:
        raise UntrustedValueError(f"JSON nested deeper than {max_depth} levels")
    return value


def encodable(text: str) -> bool:
    """Whether `text` can be written as UTF-8 (no lone surrogates such as JSON's "\\ud800")."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def control_free(text: str) -> bool:
    """Whether `text` has no control characters (NUL, newlines, tabs, DEL, C1) and no lone surrogates."""
    return encodable(text) and _CONTROL.search(text) is None

"""Every implemented merge method by name: the catalogue's declarations joined with their implementations."""

from __future__ import annotations

from . import dense, linear, sst  # noqa: F401  (importing them attaches the implementations)
from .base import IMPLEMENTATIONS, MergeMethod
from .catalog import CATALOG

METHODS: dict[str, MergeMethod] = IMPLEMENTATIONS
_missing = sorted(set(CATALOG) - set(IMPLEMENTATIONS))
if _missing:
    raise ImportError(f"declared but not implemented: {_missing}")


def get_method(name: str) -> MergeMethod:
    try:
        return METHODS[name]
    except KeyError:
        raise KeyError(f"unknown merge method {name!r}; one of {sorted(METHODS)}") from None

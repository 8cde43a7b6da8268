"""The one list of merge methods: name → `MergeMethod` (function, description, reference, parameters)."""

from __future__ import annotations

from . import dense, linear, sst
from .base import MergeMethod

METHODS: dict[str, MergeMethod] = {m.name: m for m in [sst.METHOD, linear.METHOD, *dense.METHODS]}


def get_method(name: str) -> MergeMethod:
    try:
        return METHODS[name]
    except KeyError:
        raise KeyError(f"unknown merge method {name!r}; one of {sorted(METHODS)}") from None

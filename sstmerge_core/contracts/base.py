"""The base of every contract model: unknown keys are an error (a misspelt or stale field is refused at the edge)."""

from __future__ import annotations

from typing import Generic, TypeVar

from pydantic import BaseModel, ConfigDict

T = TypeVar("T")


class Contract(BaseModel):
    """A JSON document (or a part of one) that a job produces; its `model_dump(mode="json")` is the stored form."""

    model_config = ConfigDict(extra="forbid")


class BySet(Contract, Generic[T]):
    """One value per evaluation set."""

    harmful: T
    benign: T
    utility_eval: T


def absent(value: object) -> bool:
    """Whether an optional field is left out of the stored document (`Field(exclude_if=absent)`): None is."""
    return value is None

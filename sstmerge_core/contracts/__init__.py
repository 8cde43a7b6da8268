"""Typed contracts for what a job produces (metrics.json, the job summary), parsed once where they are read.

Pydantic models only: this package imports no torch, numpy or transformers, so that the API process may import it
(an import-linter contract in pyproject.toml holds it so)."""

from __future__ import annotations

from .metrics import Metrics
from .summary import JobSummary, MergeJobSummary, SearchJobSummary

__all__ = ["JobSummary", "MergeJobSummary", "Metrics", "SearchJobSummary"]

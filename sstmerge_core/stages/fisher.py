"""Fisher factors: the utility and the safety pass at the utility-merged model (docs/method.md, step 3), each
read from or written to the factor cache, keyed by everything the factors depend on."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Protocol

from ..cache import FisherCache, cache_key
from ..data import examples_sha256
from ..merge import fisher_factors
from ..methods.base import FisherFactors
from .inputs import LoadedInputs


class PassProgress(Protocol):
    """What the Fisher stage reports: a pass begins (`fisher_utility`, `fisher_safety`), then its batches."""

    def begin(self, stage: str) -> None: ...

    def advance(self, done: float, total: float) -> None: ...

    def check_cancel(self) -> None: ...


@dataclass(frozen=True)
class FisherResult:
    """The restricted K-FAC factors of every safety module, and where they came from."""

    factors: Mapping[str, FisherFactors]
    cache_keys: Mapping[str, str]  # "utility", "safety"
    cache_hits: Mapping[str, bool]

    def without_factors(self) -> FisherResult:
        """Where the factors came from, the factors freed (the merges that needed them are done)."""
        return replace(self, factors={})

    def summary(self, damping: float) -> dict:
        """The report's `fisher` section."""
        return {"cache_hits": dict(self.cache_hits), "cache_keys": dict(self.cache_keys), "damping": damping}


def fisher_cache_keys(loaded: LoadedInputs) -> dict[str, str]:
    """Cache key per pass: base model fingerprint and dtype, adapter hashes and weights, data hash, pass settings."""
    spec = loaded.spec
    common = dict(
        model=loaded.model_fingerprint,
        dtype=spec.dtype,
        utility=[(w.adapter.sha256, w.weight) for w in loaded.utility],
        safety=[(w.adapter.sha256, w.weight) for w in loaded.safety],
    )
    return {
        role: cache_key(**common, data=examples_sha256(list(data.examples)), config=data.config.__dict__)
        for role, data in loaded.fisher_data.items()
    }


def compute_fisher(loaded: LoadedInputs, *, progress: PassProgress | None = None) -> FisherResult:
    """Both passes (or their cached factors) for the job's data; the model's weights are unchanged on return."""
    spec = loaded.spec
    cache = FisherCache(Path(spec.cache_dir) / "fisher" if spec.cache_dir else None)
    keys = fisher_cache_keys(loaded)

    def cached(kind, compute):
        if progress is not None:
            progress.begin(f"fisher_{kind}")
        return cache.get_or_compute(keys[kind], compute)

    def report(_kind: str, done: int, total: int) -> None:
        if progress is not None:
            progress.advance(done, total)

    u, s = loaded.fisher_data["utility"], loaded.fisher_data["safety"]
    factors = fisher_factors(
        loaded.model,
        loaded.tokenizer,
        dict(loaded.modules),
        list(u.examples),
        list(s.examples),
        u.config,
        s.config,
        cached=cached,
        progress=report,
        between_batches=progress.check_cancel if progress is not None else None,
    )
    return FisherResult(factors, keys, {kind: keys[kind] in cache.hits for kind in keys})

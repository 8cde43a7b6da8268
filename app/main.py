"""ASGI entry point: `uvicorn app.main:app` builds the API from the environment on first access (once).

`create_app` (in `app.api.factory`) is re-exported for callers that pass their own `Settings`.
"""

from __future__ import annotations

from functools import lru_cache

from fastapi import FastAPI

from .api.factory import create_app

__all__ = ["create_app"]


@lru_cache
def _default_app() -> FastAPI:
    return create_app()


def __getattr__(name: str) -> FastAPI:
    if name == "app":
        return _default_app()
    raise AttributeError(name)

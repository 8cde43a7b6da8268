"""The sstmerge HTTP service, in two layers:

- `app.domain`: settings, persistence, storage, merge requests and their translation to the core's
  `MergeSpec`, job state and the job queue; raises `app.domain.errors.DomainError`, knows nothing of HTTP.
- `app.api`: FastAPI routes, response schemas, dependencies, middleware and the one table that maps domain
  errors to HTTP statuses.

`app.main` is the ASGI entry point, `app.cli` the service commands. Nothing in this package imports torch or
`workers/`; the layering is checked by `tests/test_layers.py` (import-linter contracts in pyproject.toml).
"""

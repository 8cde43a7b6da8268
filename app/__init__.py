"""The sstmerge HTTP service: FastAPI routes, persistence (SQLAlchemy), artifact storage.

Nothing in this package imports torch: model work happens in `workers/`, which calls `sstmerge_core`.
"""

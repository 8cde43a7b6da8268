"""Celery workers: a job id becomes `sstmerge_core.pipeline.run_merge` calls, with state kept in the database.

Imports the service domain (`app.domain`: settings, job state, storage, the request → `MergeSpec`
translation) and the core, never the HTTP layer.
"""

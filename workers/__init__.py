"""Celery workers: a job id becomes `sstmerge_core.pipeline.run_merge` calls, with state kept in the database."""

"""The service domain: settings, persistence, storage, uploads, merge requests and their translation to the
core's `MergeSpec`, job state, and the job queue (Celery, by task name).

No HTTP here (`app.api` maps `errors.DomainError` to status codes) and no torch: the API process runs all of
it, and the worker (`workers/`) uses it to read jobs and record their outcome.
"""

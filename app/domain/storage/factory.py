"""Build the configured storage backend."""

from __future__ import annotations

from ..settings import Settings
from .base import Storage


def get_storage(settings: Settings) -> Storage:
    if settings.storage_backend == "s3":
        from .s3 import S3Storage

        if not settings.s3_bucket:
            raise ValueError("SSTMERGE_STORAGE_BACKEND=s3 needs SSTMERGE_S3_BUCKET")
        return S3Storage(settings.s3_bucket, settings.s3_prefix, settings.s3_endpoint_url, settings.s3_region)
    from .local import LocalStorage

    return LocalStorage(settings.resolved_storage_dir, settings.min_free_bytes)

"""Adapters: upload (archive or Hub), listing, deletion. Files go to storage before the row is committed;
on any failure nothing stays behind."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import IO

from sqlalchemy.orm import Session

from sstmerge_core.adapter_format import WEIGHTS_NAME, refuse_pickles
from sstmerge_core.errors import AdapterError

from . import archives
from .adapter_files import KEPT_FILES, find_adapter_folder, inspect_adapter, invalid
from .db.models import Adapter, new_id
from .errors import InvalidInput, TooLarge, UpstreamFailed
from .inputs import check_quota, delete_input
from .settings import Settings
from .storage import Storage
from .uploads import display_name, recorded_size, save_stream, staging_dir, stored_with_row, upload_source

log = logging.getLogger(__name__)


def _store(
    session: Session, storage: Storage, settings: Settings, tenant: str, folder: Path, *, name: str, source: str
) -> Adapter:
    """Validate the folder completely, then store its files and row together (nothing before validation ends),
    within the tenant's quota."""
    info = inspect_adapter(folder)
    adapter_id = new_id("ad")
    prefix = f"tenants/{tenant}/adapters/{adapter_id}"
    files = [folder / f for f in KEPT_FILES if (folder / f).is_file()]
    size = recorded_size(sum(p.stat().st_size for p in files))
    check_quota(session, settings, tenant, size)
    with stored_with_row(session, storage, prefix):
        for path in files:
            storage.put_file(f"{prefix}/{path.name}", path)
        adapter = Adapter(
            id=adapter_id,
            tenant_id=tenant,
            name=name,
            rank=info.rank,
            target_modules=info.target_modules,
            modules=info.modules,
            fan_in_fan_out=info.fan_in_fan_out,
            sha256=info.sha256,
            base_model_hint=info.base_model_hint,
            source=source,
            size_bytes=size,
            storage_prefix=prefix,
        )
        session.add(adapter)
    log.info("adapter stored", extra={"tenant": tenant, "adapter_id": adapter_id, "adapter_sha256": info.sha256})
    return adapter


def create_from_archive(
    session: Session,
    storage: Storage,
    settings: Settings,
    tenant: str,
    upload: IO[bytes],
    filename: str | None,
    name: str | None,
) -> Adapter:
    """Store the PEFT folder inside an uploaded .zip / .tar.gz."""
    name = display_name(name, filename, "adapter")
    with staging_dir(settings.resolved_work_dir) as staging:
        archive = staging / "upload"
        save_stream(upload, archive, settings.max_upload_bytes)
        root = staging / "extracted"
        root.mkdir()
        try:
            files = archives.extract(
                archive,
                root,
                max_members=settings.max_archive_members,
                max_bytes=settings.max_extracted_bytes,
                max_header_bytes=settings.max_archive_header_bytes,
            )
        except archives.ArchiveError as exc:
            kind = TooLarge if exc.code == "archive_too_large" else InvalidInput
            raise kind(str(exc), code=exc.code) from None
        folder = find_adapter_folder(root, files)
        return _store(
            session,
            storage,
            settings,
            tenant,
            folder,
            name=name,
            source=upload_source(filename, "archive"),
        )


def _fetch_from_hub(source: str, destination: Path) -> None:
    """Download the config and safetensors weights of `hf://org/name[@revision]` into `destination`."""
    from huggingface_hub import HfApi, snapshot_download
    from huggingface_hub.errors import RepositoryNotFoundError, RevisionNotFoundError

    repo_id, _, revision = source.removeprefix("hf://").partition("@")
    try:
        names = HfApi().list_repo_files(repo_id, revision=revision or None)
    except (RepositoryNotFoundError, RevisionNotFoundError) as exc:
        raise InvalidInput(f"{source}: {exc}", code="hub_not_found") from None
    except Exception as exc:  # noqa: BLE001 - the Hub client raises HTTP, network and OS errors alike
        raise UpstreamFailed(f"cannot reach the Hugging Face Hub for {source}: {exc}", code="hub_unavailable") from None
    if WEIGHTS_NAME not in names:
        try:
            refuse_pickles(names)
        except AdapterError as exc:
            raise invalid(f"{source}: {exc}", exc.code) from None
        raise invalid(f"{source} has no {WEIGHTS_NAME}")
    try:
        snapshot_download(
            repo_id,
            revision=revision or None,
            local_dir=destination,
            allow_patterns=list(KEPT_FILES),
        )
    except Exception as exc:  # noqa: BLE001 - as above
        raise UpstreamFailed(f"download of {source} failed: {exc}", code="hub_unavailable") from None


def create_from_hub(
    session: Session, storage: Storage, settings: Settings, tenant: str, source: str, name: str | None
) -> Adapter:
    """Fetch `hf://org/name[@revision]` (safetensors and config only) and store it like an upload."""
    if not settings.hub_enabled:
        raise InvalidInput(
            "Hugging Face Hub access is disabled on this server (SSTMERGE_HUB_ENABLED)", code="hub_disabled"
        )
    repo_name = source.removeprefix("hf://").partition("@")[0].rsplit("/", 1)[-1]
    name = display_name(name, None, repo_name)
    with staging_dir(settings.resolved_work_dir) as staging:
        _fetch_from_hub(source, staging)
        return _store(session, storage, settings, tenant, staging, name=name, source=source)


def delete_adapter(session: Session, storage: Storage, tenant: str, adapter_id: str) -> None:
    delete_input(session, storage, Adapter, tenant, adapter_id)

"""API keys: `sst_<id>_<secret>` keys stored as SHA-256 only; environment keys compared by hash."""

from __future__ import annotations

import hashlib
import hmac
import secrets
import threading
import time
import weakref
from collections.abc import Callable
from contextlib import AbstractContextManager

from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from .db.models import ApiKey, Tenant, utcnow
from .settings import TENANT_PATTERN, Settings


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def ensure_tenant(session: Session, tenant: str) -> None:
    if not TENANT_PATTERN.match(tenant):
        raise ValueError(f"invalid tenant name {tenant!r} (letters, digits, '_', '.', '-'; at most 64)")
    if session.get(Tenant, tenant) is not None:
        return
    try:
        with session.begin_nested():  # another process may register the same tenant concurrently
            session.add(Tenant(id=tenant))
    except IntegrityError:
        pass


def create_key(session: Session, tenant: str) -> tuple[str, str]:
    """Create a key for `tenant` (created if new); returns (key id, key). The key is not stored."""
    ensure_tenant(session, tenant)
    key_id = secrets.token_hex(4)
    key = f"sst_{key_id}_{secrets.token_urlsafe(32)}"
    session.add(ApiKey(id=key_id, tenant_id=tenant, key_sha256=hash_key(key)))
    session.flush()
    return key_id, key


def revoke_key(session: Session, key_id: str) -> bool:
    key = session.get(ApiKey, key_id)
    if key is None or key.revoked_at is not None:
        return False
    key.revoked_at = utcnow()
    for cache in list(_CACHES):
        cache.forget(key.key_sha256)
    return True


def list_keys(session: Session, tenant: str | None = None) -> list[ApiKey]:
    query = select(ApiKey).order_by(ApiKey.tenant_id, ApiKey.created_at)
    if tenant:
        query = query.where(ApiKey.tenant_id == tenant)
    return list(session.scalars(query))


def authenticate(session: Session, settings: Settings, presented: str) -> str | None:
    """The tenant owning `presented`, or None."""
    digest = hash_key(presented)
    for entry in settings.api_keys:
        if hmac.compare_digest(hash_key(entry.key.get_secret_value()), digest):
            return entry.tenant
    key = session.scalar(select(ApiKey).where(ApiKey.key_sha256 == digest, ApiKey.revoked_at.is_(None)))
    return key.tenant_id if key else None


_CACHES: weakref.WeakSet[KeyCache] = weakref.WeakSet()


class KeyCache:
    """`authenticate` behind a short time-to-live cache of key digest → tenant, so that a request whose key was
    seen in the last `ttl` seconds needs no database read. Only valid keys are cached. `revoke_key` drops a
    revoked key from every cache of its process at once; an API process that did not revoke it (the key was
    revoked with `sstmerge keys revoke`, or by another API process) stops accepting it within `ttl` seconds.
    `ttl=0` disables the cache."""

    def __init__(self, sessions: Callable[[], AbstractContextManager[Session]], settings: Settings, ttl: float) -> None:
        self.sessions, self.settings, self.ttl = sessions, settings, ttl
        self._entries: dict[str, tuple[str, float]] = {}  # digest -> (tenant, expiry on time.monotonic())
        self._lock = threading.Lock()
        _CACHES.add(self)

    def cached(self, presented: str) -> str | None:
        """The tenant of `presented` if it was authenticated less than `ttl` seconds ago (no I/O)."""
        entry = self._entries.get(hash_key(presented))
        return entry[0] if entry is not None and entry[1] > time.monotonic() else None

    def authenticate(self, presented: str) -> str | None:
        """The tenant owning `presented`, read from the settings and the database (blocking); cached if valid."""
        with self.sessions() as session:
            tenant = authenticate(session, self.settings, presented)
        if tenant is not None and self.ttl > 0:
            with self._lock:
                now = time.monotonic()
                if len(self._entries) > 10_000:  # keys come and go; drop the expired ones now and then
                    self._entries = {k: v for k, v in self._entries.items() if v[1] > now}
                self._entries[hash_key(presented)] = (tenant, now + self.ttl)
        return tenant

    def forget(self, digest: str) -> None:
        with self._lock:
            self._entries.pop(digest, None)

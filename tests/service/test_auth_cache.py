"""The API key cache (`SSTMERGE_AUTH_CACHE_SECONDS`): a revocation in the same process takes effect at once, one
made elsewhere (another API process, `sstmerge keys revoke`) within the cache's lifetime; unknown keys are never
cached, so a new key works at once."""

from __future__ import annotations

import time

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import update

from app.domain.auth import create_key, hash_key, revoke_key
from app.domain.db.models import ApiKey, utcnow
from app.domain.db.session import session_scope
from app.main import create_app

pytestmark = pytest.mark.service


def status(client: TestClient, key: str) -> int:
    return client.get("/merges", headers={"Authorization": f"Bearer {key}"}, params={"limit": 1}).status_code


def test_revocation_in_this_process_is_immediate(settings):
    with TestClient(create_app(settings.model_copy(update={"auth_cache_seconds": 600}))) as client:
        with session_scope(settings.resolved_database_url) as session:
            key_id, key = create_key(session, "acme")
        assert status(client, key) == 200
        with session_scope(settings.resolved_database_url) as session:
            assert revoke_key(session, key_id)
        assert status(client, key) == 401


def test_revocation_elsewhere_takes_effect_within_the_cache_lifetime(settings):
    url = settings.resolved_database_url
    with TestClient(create_app(settings.model_copy(update={"auth_cache_seconds": 0.5}))) as client:
        with session_scope(url) as session:
            _, key = create_key(session, "acme")
        assert status(client, key) == 200
        with session_scope(url) as session:  # as another process would: the row only, no cache of ours involved
            session.execute(update(ApiKey).where(ApiKey.key_sha256 == hash_key(key)).values(revoked_at=utcnow()))
        assert status(client, key) == 200  # still trusted from the cache
        time.sleep(1.0)
        assert status(client, key) == 401


def test_without_a_cache_every_request_reads_the_key(settings):
    url = settings.resolved_database_url
    with TestClient(create_app(settings.model_copy(update={"auth_cache_seconds": 0}))) as client:
        with session_scope(url) as session:
            _, key = create_key(session, "acme")
        assert status(client, key) == 200
        with session_scope(url) as session:
            session.execute(update(ApiKey).where(ApiKey.key_sha256 == hash_key(key)).values(revoked_at=utcnow()))
        assert status(client, key) == 401


def test_unknown_keys_are_not_cached(settings):
    with TestClient(create_app(settings.model_copy(update={"auth_cache_seconds": 600}))) as client:
        with session_scope(settings.resolved_database_url) as session:
            key_id, key = create_key(session, "acme")
            session.execute(update(ApiKey).where(ApiKey.id == key_id).values(revoked_at=utcnow()))
        assert status(client, key) == 401
        with session_scope(settings.resolved_database_url) as session:
            session.execute(update(ApiKey).where(ApiKey.id == key_id).values(revoked_at=None))
        assert status(client, key) == 200

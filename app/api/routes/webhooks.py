"""The tenant's webhook signing secret (Standard Webhooks `whsec_…`): read it to verify webhooks, rotate it."""

from __future__ import annotations

from fastapi import APIRouter, Response

from ...domain import webhooks
from ..deps import DbDep, TenantDep
from ..schemas import WebhookSecretOut

router = APIRouter(prefix="/webhooks", tags=["webhooks"])
NO_STORE = {"Cache-Control": "no-store"}


@router.get(
    "/secret",
    response_model=WebhookSecretOut,
    summary="This tenant's webhook signing secret (made on first read)",
    description="Every webhook of this tenant's jobs is signed with this secret (`webhook-signature`: `v1,` "
    "base64 HMAC-SHA256 of `{webhook-id}.{webhook-timestamp}.{body}`); verify with any Standard Webhooks library, "
    "e.g. `standardwebhooks.Webhook(secret).verify(body, headers)`. Only this tenant's keys read it.",
)
def get_webhook_secret(response: Response, tenant: TenantDep, db: DbDep) -> WebhookSecretOut:
    secret = webhooks.tenant_secret(db, tenant)
    db.commit()
    response.headers.update(NO_STORE)
    return WebhookSecretOut(secret=secret)


@router.post(
    "/secret/rotate",
    response_model=WebhookSecretOut,
    summary="Replace this tenant's webhook signing secret",
    description="Attempts made from now on (retries of earlier events included) are signed with the new secret.",
)
def rotate_webhook_secret(response: Response, tenant: TenantDep, db: DbDep) -> WebhookSecretOut:
    secret = webhooks.rotate_secret(db, tenant)
    db.commit()
    response.headers.update(NO_STORE)
    return WebhookSecretOut(secret=secret)

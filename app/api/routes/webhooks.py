"""Webhooks per project: register, list, delete, and read the delivery log."""

from __future__ import annotations

import secrets
from typing import Annotated, Any

from fastapi import APIRouter, Query
from pydantic import BaseModel, ConfigDict, Field, HttpUrl, field_validator
from sqlalchemy import select

from app.api.deps import ProjectDep, SessionDep, SettingsDep
from app.core.errors import APIError, error_responses, not_found
from app.core.settings import Settings
from app.core.webhook_targets import TargetForbidden, TargetUnresolvable, resolve_target
from app.db import crud
from app.db.models import JOB_STATUSES, Webhook, WebhookDelivery

router = APIRouter(tags=["webhooks"], responses=error_responses(401, 422))
WEBHOOK_URL_MAX = 2000  # the column's length: PostgreSQL refuses longer (a 500 before this check)
EVENTS = tuple(f"job.{status}" for status in JOB_STATUSES)


class WebhookCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")
    url: HttpUrl
    events: list[str] = Field(default_factory=list, description=f"subset of {list(EVENTS)}; empty = all")

    @field_validator("url")
    @classmethod
    def _fits_the_column(cls, url: HttpUrl) -> HttpUrl:
        if len(str(url)) > WEBHOOK_URL_MAX:  # normalized (punycode, trailing slash) as it is stored
            raise ValueError(f"URL longer than {WEBHOOK_URL_MAX} characters")
        return url


class WebhookOut(BaseModel):
    model_config = ConfigDict(from_attributes=True)
    id: str
    url: str
    events: list[str]
    active: bool
    secret: str | None = None


class DeliveryOut(BaseModel):
    model_config = ConfigDict(from_attributes=True)
    id: str
    job_id: str
    event: str
    status: str
    attempts: int
    last_status_code: int | None
    last_error: str | None
    duration_ms: int | None = Field(description="time to the response status of the last attempt")
    created_at: Any
    delivered_at: Any


def check_target(url: str, settings: Settings) -> None:
    """Refuse targets inside the network (SSRF) unless the operator allows them; delivery checks again."""
    try:
        resolve_target(url, allow_private=settings.webhook_allow_private_targets)
    except TargetForbidden as exc:
        raise APIError(422, "webhook_target_forbidden", str(exc), {"url": url}) from exc
    except TargetUnresolvable as exc:
        raise APIError(422, "webhook_target_unresolvable", str(exc), {"url": url}) from exc


@router.post("/webhooks", status_code=201, response_model=WebhookOut, responses=error_responses(400, 413))
def create_webhook(body: WebhookCreate, project: ProjectDep, session: SessionDep, settings: SettingsDep) -> Any:
    """The signing secret is returned once, here."""
    unknown = sorted(set(body.events) - set(EVENTS))
    if unknown:
        raise APIError(422, "invalid_events", f"unknown events {unknown}", {"known": list(EVENTS)})
    check_target(str(body.url), settings)
    hook = Webhook(project_id=project.id, url=str(body.url), events=body.events, secret=secrets.token_hex(32))
    session.add(hook)
    session.commit()
    return WebhookOut.model_validate(hook)


@router.get("/webhooks", response_model=list[WebhookOut])
def list_webhooks(project: ProjectDep, session: SessionDep) -> Any:
    hooks = crud.list_owned(session=session, cls=Webhook, project_id=project.id)
    return [WebhookOut.model_validate(h).model_copy(update={"secret": None}) for h in hooks]


@router.delete("/webhooks/{webhook_id}", status_code=204, responses=error_responses(404))
def delete_webhook(webhook_id: str, project: ProjectDep, session: SessionDep) -> None:
    hook = crud.get_owned(session=session, cls=Webhook, project_id=project.id, ident=webhook_id)
    if hook is None:
        raise not_found("webhook", webhook_id)
    session.delete(hook)
    session.commit()


@router.get("/webhooks/{webhook_id}/deliveries", response_model=list[DeliveryOut], responses=error_responses(404))
def list_deliveries(
    webhook_id: str,
    project: ProjectDep,
    session: SessionDep,
    limit: Annotated[int, Query(ge=1, le=500)] = 100,
) -> Any:
    hook = crud.get_owned(session=session, cls=Webhook, project_id=project.id, ident=webhook_id)
    if hook is None:
        raise not_found("webhook", webhook_id)
    query = (
        select(WebhookDelivery)
        .where(WebhookDelivery.webhook_id == hook.id)
        .order_by(WebhookDelivery.created_at.desc())
        .limit(limit)
    )
    return session.scalars(query).all()

"""POST /v1/models and /v1/datasets: stream, hash, inspect, then record. Nothing half-written."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from fastapi import APIRouter, Request
from sqlalchemy.orm import Session
from starlette.concurrency import run_in_threadpool

from app.api.deps import ProjectDep, SessionDep, SettingsDep, StoreDep
from app.api.upload import Received, receive_file
from app.core.errors import APIError, error_responses, not_found
from app.core.inspect import (
    InspectError,
    check_dataset_matches_model,
    inspect_dataset_file,
    inspect_model_file,
)
from app.db import crud
from app.db.models import Dataset, Model
from app.schemas.api import DatasetOut, ModelOut
from app.storage.store import Store

router = APIRouter(tags=["uploads"], responses=error_responses(401, 422))
UPLOAD_ERRORS = error_responses(400, 413, 415)


def multipart_body(**fields: dict[str, Any]) -> dict[str, Any]:
    """The OpenAPI request body of a streamed upload (the route reads the stream itself, so FastAPI cannot)."""
    properties = {"file": {"type": "string", "format": "binary"}, **fields}
    schema = {"type": "object", "required": ["file"], "properties": properties}
    return {"requestBody": {"required": True, "content": {"multipart/form-data": {"schema": schema}}}}


T = TypeVar("T")


async def _keep_if_valid(received: Received, store: Store, check: Callable[[Path], T]) -> tuple[T, str]:
    """Run `check` on the spooled upload; refused uploads are discarded, accepted ones committed.

    Whatever goes wrong before the commit, the spool file is removed: nothing is left in the store's tmp.
    """
    try:
        result = await run_in_threadpool(check, received.spool.path)
        return result, await run_in_threadpool(store.commit, received.spool)
    except InspectError as exc:
        received.spool.discard()
        raise APIError(exc.status, exc.code, exc.message, exc.details) from exc
    except BaseException:
        received.spool.discard()
        raise


async def _record(session: Session, row: T) -> T:
    session.add(row)
    await run_in_threadpool(session.commit)
    return row


@router.post(
    "/models", status_code=201, response_model=ModelOut, responses=UPLOAD_ERRORS, openapi_extra=multipart_body()
)
async def upload_model(
    request: Request, project: ProjectDep, session: SessionDep, store: StoreDep, settings: SettingsDep
) -> Any:
    received = await receive_file(request, store=store, limit=settings.max_upload_bytes)
    limits = settings.archive_limits
    inspection, address = await _keep_if_valid(received, store, lambda path: inspect_model_file(path, limits))
    info = {**inspection.info, "inputs": inspection.inputs}
    model = Model(
        project_id=project.id,
        filename=received.filename,
        format=inspection.format,
        sha256=address,
        size_bytes=received.spool.size,
        param_count=inspection.param_count,
        info=info,
    )
    return await _record(session, model)


@router.get("/models", response_model=list[ModelOut])
def list_models(project: ProjectDep, session: SessionDep, sha256: str | None = None) -> Any:
    """The project's models, newest first; `?sha256=` finds an upload the server already has."""
    return crud.list_owned(session=session, cls=Model, project_id=project.id, sha256=sha256)


@router.get("/models/{model_id}", response_model=ModelOut, responses=error_responses(404))
def get_model(model_id: str, project: ProjectDep, session: SessionDep) -> Any:
    model = crud.get_model(session=session, project_id=project.id, model_id=model_id)
    if model is None:
        raise not_found("model", model_id)
    return model


@router.post(
    "/datasets",
    status_code=201,
    response_model=DatasetOut,
    responses={**UPLOAD_ERRORS, **error_responses(404)},
    openapi_extra=multipart_body(model_id={"type": "string"}),
)
async def upload_dataset(
    request: Request, project: ProjectDep, session: SessionDep, store: StoreDep, settings: SettingsDep
) -> Any:
    """Optional form field `model_id` validates the arrays against that model's inputs at upload."""
    received = await receive_file(request, store=store, limit=settings.max_upload_bytes)

    def inspect_for_model(path: Path) -> tuple[str, dict[str, Any]]:
        kind, info = inspect_dataset_file(path, settings.archive_limits)
        _check_against_model(session, project.id, received.fields.get("model_id"), kind, info)
        return kind, info

    (kind, info), address = await _keep_if_valid(received, store, inspect_for_model)
    return await _record(
        session,
        Dataset(
            project_id=project.id,
            filename=received.filename,
            kind=kind,
            sha256=address,
            size_bytes=received.spool.size,
            info=info,
        ),
    )


def _check_against_model(session: Any, project_id: str, model_id: str | None, kind: str, info: dict) -> None:
    if not model_id:
        return
    model = crud.get_model(session=session, project_id=project_id, model_id=model_id)
    if model is None:
        raise not_found("model", model_id)
    problems = check_dataset_matches_model(model.info.get("inputs", []), model.format, model.info, kind, info)
    if problems:
        raise APIError(422, "dataset_mismatch", "; ".join(problems), {"problems": problems})


@router.get("/datasets", response_model=list[DatasetOut])
def list_datasets(project: ProjectDep, session: SessionDep, sha256: str | None = None) -> Any:
    return crud.list_owned(session=session, cls=Dataset, project_id=project.id, sha256=sha256)


@router.get("/datasets/{dataset_id}", response_model=DatasetOut, responses=error_responses(404))
def get_dataset(dataset_id: str, project: ProjectDep, session: SessionDep) -> Any:
    dataset = crud.get_dataset(session=session, project_id=project.id, dataset_id=dataset_id)
    if dataset is None:
        raise not_found("dataset", dataset_id)
    return dataset

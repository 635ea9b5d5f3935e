"""GET /v1/methods: every method with its JSON schema and the data it needs;
POST /v1/methods/{method}/validate: the same config check a job gets, without a model."""

from __future__ import annotations

from fastapi import APIRouter

from app.api.deps import ProjectDep
from app.core.errors import error_responses
from app.core.jobflow import validate_config
from app.schemas.api import ConfigCheck, ConfigCheckOut, MethodOut
from compression.method_docs import method_catalog

router = APIRouter(tags=["methods"])


@router.get("/methods", response_model=list[MethodOut])
def list_methods() -> list[MethodOut]:
    return [MethodOut(**entry) for entry in method_catalog()]


@router.post("/methods/{method}/validate", response_model=ConfigCheckOut, responses=error_responses(400, 401, 413, 422))
def validate_method_config(method: str, body: ConfigCheck, _: ProjectDep) -> ConfigCheckOut:
    """422 `unknown_method` (details list the known ones) or `invalid_config` (details name each field)."""
    config = validate_config(method, body.config)
    return ConfigCheckOut(
        method=config.method,
        config=config.model_dump(mode="json", exclude={"method"}),
        needs_calibration=config.needs_calibration,
    )

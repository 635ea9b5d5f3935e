"""GET /v1/methods: every method with its JSON schema and whether it needs calibration data."""

from __future__ import annotations

from fastapi import APIRouter

from app.schemas.api import MethodOut
from compression.configs import CONFIG_CLASSES

router = APIRouter(tags=["methods"])


@router.get("/methods", response_model=list[MethodOut])
def list_methods() -> list[MethodOut]:
    return [
        MethodOut(
            key=key,
            summary=cls.summary,
            needs_calibration=cls.needs_calibration,
            config_schema=cls.model_json_schema(),
        )
        for key, cls in CONFIG_CLASSES.items()
    ]

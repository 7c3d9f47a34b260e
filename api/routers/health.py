"""Liveness and readiness probes (no auth: load balancers and orchestrators call them)."""

from __future__ import annotations

import asyncio

import sqlalchemy as sa
from fastapi import APIRouter
from fastapi.responses import JSONResponse

from api.deps import Context
from api.schemas import Health

router = APIRouter(tags=["health"])


@router.get("/healthz", response_model=Health, summary="Liveness: the process answers")
async def healthz() -> Health:
    return Health(status="ok")


async def _database_ok(context: Context) -> bool:
    try:
        async with context.engine.connect() as connection:
            await asyncio.wait_for(connection.execute(sa.text("SELECT 1")), 2.0)
        return True
    except Exception:
        return False


@router.get(
    "/readyz",
    response_model=Health,
    responses={503: {"model": Health, "description": "A dependency is unreachable."}},
    summary="Readiness: the database and Temporal are reachable",
)
async def readyz(context: Context) -> JSONResponse:
    database, temporal = await asyncio.gather(_database_ok(context), context.temporal.reachable())
    checks = {"database": database, "temporal": temporal}
    ready = all(checks.values())
    body = Health(status="ok" if ready else "unavailable", checks=checks)
    return JSONResponse(body.model_dump(), status_code=200 if ready else 503)

"""Endpoints for machines watching the gateway: liveness, readiness, the OpenAPI document and
Prometheus metrics. None needs a token."""

from __future__ import annotations

import os
from collections.abc import Callable

from starlette.requests import Request
from starlette.responses import Response

from gateway import errors
from gateway.schemas import Health, Readiness
from gateway.telemetry import metrics
from gateway.web.responses import MsgspecResponse, RawJSONResponse
from gateway.web.routing import HEALTH, Answer, Operation, Resource
from gateway.web.services import Services

HEALTHZ = Operation(
    method="GET",
    tag=HEALTH,
    operation_id="healthz",
    summary="The process runs (never touches Redis)",
    answers=(Answer(status=200, body=Health, description="alive"),),
)
READYZ = Operation(
    method="GET",
    tag=HEALTH,
    operation_id="readyz",
    summary="Redis answers and every script is loaded",
    answers=(Answer(status=200, body=Readiness, description="ready"),),
    raises=(errors.BackendUnavailable,),
)
OPENAPI = Operation(
    method="GET",
    tag=HEALTH,
    operation_id="openapi",
    summary="This document",
    answers=(Answer(status=200, body={"type": "object"}, description="OpenAPI 3.1"),),
)
METRICS = Operation(
    method="GET",
    tag=HEALTH,
    operation_id="metrics",
    summary="Prometheus text: every worker's counts and what Redis holds now",
    answers=(
        Answer(
            status=200,
            body={"type": "string"},
            media_type="text/plain",
            description="Prometheus text exposition format",
        ),
    ),
)

_HEALTHY = Health(status="ok")


def routes(services: Services, document: Callable[[], bytes]) -> list[Resource]:
    """`document` gives the OpenAPI document's bytes (`openapi.Document`)."""

    async def healthz(request: Request) -> Response:
        return MsgspecResponse(_HEALTHY)

    async def readyz(request: Request) -> Response:
        if not services.ready:
            raise errors.BackendUnavailable(reason=services.not_ready)
        if await services.inventory.ping():
            mode = services.watcher.mode
            return MsgspecResponse(Readiness(status="ready", mode=mode, pid=os.getpid()))
        raise errors.BackendUnavailable(reason="Redis is not answering or scripts are not loaded")

    async def openapi_document(request: Request) -> Response:
        """The OpenAPI 3.1 document (`web/openapi.py`), built once; no auth."""
        return RawJSONResponse(document())

    async def metrics_endpoint(request: Request) -> Response:
        """Prometheus text: every worker's counts and what Redis holds (telemetry/metrics.py)."""
        body = await metrics.render(services.figures)
        return Response(body, media_type=metrics.CONTENT_TYPE)

    return [
        Resource("/healthz", (HEALTHZ, healthz)),
        Resource("/readyz", (READYZ, readyz)),
        Resource("/openapi.json", (OPENAPI, openapi_document)),
        Resource("/metrics", (METRICS, metrics_endpoint)),
    ]

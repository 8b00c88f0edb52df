"""``GET /metrics``: the Prometheus text exposition of :mod:`server.metrics`."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.concurrency import run_in_threadpool

from server import metrics

router = APIRouter(tags=["Health"])


@router.get("/metrics", response_class=Response, responses={200: {"content": {CONTENT_TYPE_LATEST: {}}}})
async def prometheus_metrics() -> Response:
    # Collecting reads SQLite (adapter and job counts), so it stays off the event loop.
    body = await run_in_threadpool(generate_latest, metrics.REGISTRY)
    return Response(body, media_type=CONTENT_TYPE_LATEST)

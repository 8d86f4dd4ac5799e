"""The ops console: its page (`console.html`, with its files' versioned links), the files
(`assets.py`) and the view the page reads every second with the admin token."""

from __future__ import annotations

import asyncio
import time
from importlib import resources

from starlette.requests import Request
from starlette.responses import Response

from gateway.schemas import (
    ConsoleLatency,
    ConsoleRelay,
    ConsoleSku,
    ConsoleView,
    ConsoleWorker,
)
from gateway.store.figures import Sample, SkuSample, paused
from gateway.telemetry import snapshot
from gateway.transport.replies import call
from gateway.web.console import assets
from gateway.web.operators import admin_raises, require_admin
from gateway.web.orders import ORDER_PATH
from gateway.web.responses import MsgspecResponse
from gateway.web.routing import ADMIN, HEALTH, Answer, Operation, Resource
from gateway.web.services import Services

PAGE = Operation(
    method="GET",
    tag=HEALTH,
    operation_id="console",
    summary="The ops console page (asks for the admin token; no data of its own)",
    answers=(
        Answer(status=200, body={"type": "string"}, media_type="text/html", description="HTML"),
    ),
)
VIEW = Operation(
    method="GET",
    security=ADMIN,
    operation_id="getConsoleView",
    summary="What the ops console shows: mode, switches, SKUs, relay lag, the instance's "
    "order answers, latency and workers",
    answers=(Answer(status=200, body=ConsoleView, description="the console's figures"),),
    raises=admin_raises(),
)

_PAGE = (resources.files("gateway.web.console") / "console.html").read_bytes()
for _asset in assets.ASSETS:  # the page links each file by its content's version
    _PAGE = _PAGE.replace(_asset.path.encode() + b'"', _asset.url.encode() + b'"')
_PAGE_HEADERS = {
    # this origin's files only: no inline script or style, no other origin, no frames
    "Content-Security-Policy": "default-src 'none'; script-src 'self'; style-src 'self'; "
    "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'",
    "Cache-Control": "no-store",
    "X-Content-Type-Options": "nosniff",
}


async def console_page(request: Request) -> Response:
    """The page: no data of its own; it asks for the admin token and reads
    `/api/v1/admin/console` with it every second."""
    return Response(_PAGE, media_type="text/html", headers=_PAGE_HEADERS)


_made: tuple[Sample | None, list[ConsoleSku]] = (None, [])  # the last sample's SKU rows


async def _console_skus(sample: Sample) -> list[ConsoleSku]:
    """The view's SKU rows, made once per sample (every console open shares them), in a
    thread at many SKUs: 10,000 rows are tens of milliseconds the orders would wait behind."""
    global _made
    if _made[0] is not sample:
        skus = sample.skus
        rows = (
            _sku_rows(skus) if len(skus) < 500 else await asyncio.to_thread(paused, _sku_rows, skus)
        )
        _made = (sample, rows)
    return _made[1]


def _sku_rows(skus: list[SkuSample]) -> list[ConsoleSku]:
    return [
        ConsoleSku(
            sku_id=s.sku_id, stock=s.stock, available=s.available, held=s.held, sold=s.sold,
            holds=s.holds, backlog=s.backlog, pending=s.pending, dead=s.dead,
        )
        if s.draw == "none"
        else ConsoleSku(
            sku_id=s.sku_id, stock=s.stock, available=s.available, held=s.held, sold=s.sold,
            holds=s.holds, backlog=s.backlog, pending=s.pending, dead=s.dead,
            draw=s.draw, prequeued=s.prequeued, drawn=s.drawn,
        )
        for s in skus
    ]  # fmt: skip


def routes(services: Services) -> list[Resource]:
    async def console_view(request: Request) -> Response:
        require_admin(request, services.settings.admin_token, services.admin_refusals)
        sample = await call(services.figures.sample(streams=1))
        modes = await call(services.modes.view(limit=10))
        counted = snapshot.take(ORDER_PATH)
        now_ms = int(time.time() * 1000)
        view = ConsoleView(
            mode=modes.mode.value,
            changed_at=modes.changed_at,
            history=modes.history,
            breaker=services.breaker.state.value,
            entries_in=sum(s.entries_in for s in sample.skus),
            skus=await _console_skus(sample),
            answers=counted.answers,
            latency=ConsoleLatency(
                le_ms=counted.le_ms, counts=counted.buckets, sum_s=counted.sum_s
            ),
            workers=[
                ConsoleWorker(pid=w.pid, breaker=w.breaker, mode=w.mode) for w in counted.workers
            ],
            relays=[
                ConsoleRelay(
                    group=r.group,
                    target=r.target,
                    lag=r.lag,
                    oldest_unconfirmed_s=r.oldest_age_s(now_ms),
                )
                for r in sample.relays
            ],  # fmt: skip
        )
        return MsgspecResponse(view)

    return [
        Resource("/console", (PAGE, console_page)),
        *(assets.resource(asset) for asset in assets.ASSETS),
        Resource("/api/v1/admin/console", (VIEW, console_view)),
    ]

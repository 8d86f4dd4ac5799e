"""The ops console: its page (`console.html`, served as is) and the view it reads every
second with the admin token."""

from __future__ import annotations

from importlib import resources

from starlette.requests import Request
from starlette.responses import Response

from gateway.schemas import ConsoleSku, ConsoleView
from gateway.transport.replies import call
from gateway.web.operators import admin_raises, require_admin
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
    summary="What the ops console shows: mode, switches, this worker's breaker, SKUs",
    answers=(Answer(status=200, body=ConsoleView, description="the console's figures"),),
    raises=admin_raises(),
)

_PAGE = (resources.files("gateway.web.console") / "console.html").read_bytes()
_PAGE_HEADERS = {
    # the page's own script and styles only; data comes from this origin with the token
    "Content-Security-Policy": "default-src 'none'; script-src 'unsafe-inline'; "
    "style-src 'unsafe-inline'; connect-src 'self'; form-action 'none'; frame-ancestors 'none'",
    "Cache-Control": "no-store",
}


async def console_page(request: Request) -> Response:
    """The page: no data of its own; it asks for the admin token and reads
    `/api/v1/admin/console` with it every second."""
    return Response(_PAGE, media_type="text/html", headers=_PAGE_HEADERS)


def routes(services: Services) -> list[Resource]:
    async def console_view(request: Request) -> Response:
        require_admin(request, services.settings.admin_token, services.admin_refusals)
        sample = await call(services.figures.sample(streams=1))
        modes = await call(services.modes.view(limit=10))
        view = ConsoleView(
            mode=modes.mode.value,
            changed_at=modes.changed_at,
            history=modes.history,
            breaker=services.breaker.state.value,
            entries_in=sum(s.entries_in for s in sample.skus),
            skus=[
                ConsoleSku(
                    sku_id=s.sku_id,
                    stock=s.stock,
                    available=s.available,
                    held=s.held,
                    sold=s.sold,
                    holds=s.holds,
                    backlog=s.backlog,
                    pending=s.pending,
                    dead=s.dead,
                )  # fmt: skip
                for s in sample.skus
            ],
        )
        return MsgspecResponse(view)

    return [
        Resource("/console", (PAGE, console_page)),
        Resource("/api/v1/admin/console", (VIEW, console_view)),
    ]

"""The console's files, served by the gateway itself (no CDN, nothing fetched elsewhere): its
script and styles, and the charting library, uPlot (MIT, vendored unchanged from its npm
package; version and licence in `static/uplot/`).

Each file is read once at import. The page links each with `?v=<first 12 hex digits of its
SHA-256>`, so a file is cached for good (`immutable`) and a new gateway's file is a new URL.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from importlib import resources

from starlette.requests import Request
from starlette.responses import Response

from gateway.web.routing import HEALTH, Answer, Operation, Resource

UPLOT_VERSION = "1.6.32"
CACHED = {
    "Cache-Control": "public, max-age=31536000, immutable",
    "X-Content-Type-Options": "nosniff",
}
_STATIC = resources.files("gateway.web.console") / "static"


@dataclass(frozen=True, slots=True)
class Asset:
    path: str  # the URL path
    file: str  # under static/
    media_type: str
    operation_id: str
    summary: str

    @property
    def body(self) -> bytes:
        return _BODIES[self.file]

    @property
    def url(self) -> str:
        """The path with the content's version: what the page links."""
        return f"{self.path}?v={hashlib.sha256(self.body).hexdigest()[:12]}"


ASSETS = (
    Asset("/console/console.js", "console.js", "text/javascript", "consoleScript",
          "The ops console's script"),
    Asset("/console/console.css", "console.css", "text/css", "consoleStyles",
          "The ops console's styles"),
    Asset("/console/uplot/uPlot.iife.min.js", "uplot/uPlot.iife.min.js", "text/javascript",
          "uplotScript", f"uPlot {UPLOT_VERSION}, the console's charting library (MIT)"),
    Asset("/console/uplot/uPlot.min.css", "uplot/uPlot.min.css", "text/css", "uplotStyles",
          f"uPlot {UPLOT_VERSION}'s styles"),
)  # fmt: skip
_BODIES = {asset.file: (_STATIC / asset.file).read_bytes() for asset in ASSETS}


def resource(asset: Asset) -> Resource:
    """The route serving one file."""
    body = asset.body
    operation = Operation(
        method="GET",
        tag=HEALTH,
        operation_id=asset.operation_id,
        summary=asset.summary,
        answers=(
            Answer(
                status=200,
                body={"type": "string"},
                media_type=asset.media_type,
                description="the file (cached for good: the page links it by version)",
            ),
        ),
    )

    async def serve(request: Request) -> Response:
        return Response(body, media_type=asset.media_type, headers=CACHED)

    return Resource(asset.path, (operation, serve))

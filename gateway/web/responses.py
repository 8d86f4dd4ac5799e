"""Response classes: msgspec-encoded JSON and pre-rendered JSON bytes."""

from __future__ import annotations

from typing import Any

from starlette.responses import Response

from gateway.schemas import encoder


class MsgspecResponse(Response):
    media_type = "application/json"

    def render(self, content: Any) -> bytes:
        return encoder.encode(content)


class RawJSONResponse(Response):
    """JSON that is already bytes (the stored answer of an order), sent as is."""

    media_type = "application/json"

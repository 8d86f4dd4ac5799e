"""Request bodies: read with a size limit, decoded and validated into their Structs."""

from __future__ import annotations

from typing import TypeVar

import msgspec
from starlette.requests import Request
from starlette.types import Receive

from gateway import errors

T = TypeVar("T")


async def read_body(receive: Receive, declared: bytes | str | None, limit: int) -> bytes:
    """The request body, refused with 413 once it is larger than `limit` bytes. `declared` is
    the Content-Length header, checked first so an oversized body is not even read."""
    if declared is not None:
        try:
            too_large = int(declared) > limit
        except ValueError:
            raise errors.InvalidRequest("Content-Length is not a number") from None
        if too_large:
            raise errors.PayloadTooLarge(f"request body is larger than {limit} bytes")
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] != "http.request":  # http.disconnect
            raise errors.InvalidRequest("client disconnected before sending the body")
        chunk: bytes = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            raise errors.PayloadTooLarge(f"request body is larger than {limit} bytes")
        if not message.get("more_body", False):
            if not chunks:
                return chunk  # the usual case: the whole body in one message
            chunks.append(chunk)
            return b"".join(chunks)
        chunks.append(chunk)


async def request_body(request: Request, limit: int) -> bytes:
    return await read_body(request.receive, request.headers.get("content-length"), limit)


def decode(decoder: msgspec.json.Decoder[T], body: bytes) -> T:
    """Decode and validate a body; every failure is `400 invalid_request` naming the field."""
    try:
        return decoder.decode(body)
    except msgspec.ValidationError as exc:
        raise errors.InvalidRequest(str(exc)) from None
    except msgspec.DecodeError as exc:
        raise errors.InvalidRequest(malformed(body, exc)) from None
    except UnicodeDecodeError:
        raise errors.InvalidRequest("request body is not valid UTF-8") from None


def malformed(body: bytes, exc: msgspec.DecodeError) -> str:
    """What is wrong with a body that is not JSON, said as such (msgspec alone answers an
    empty or cut-off body with "Input data was truncated")."""
    if not body.strip():
        return "request body is empty: a JSON object is expected"
    text = str(exc)
    if text.startswith("JSON is malformed"):
        return text
    return f"JSON is malformed: {text[:1].lower()}{text[1:]}"


def header(headers: list[tuple[bytes, bytes]], name: bytes) -> bytes | None:
    """One request header from the ASGI scope (names arrive lower-case)."""
    for key, value in headers:
        if key == name:
            return value
    return None

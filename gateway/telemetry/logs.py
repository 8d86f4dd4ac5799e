"""Logs: one JSON object per line (`FLASHGATE_LOG_FORMAT=json`, the default) or plain text.

Every process of flashgate (serve, its children, uvicorn and its workers) logs through the
standard library with these formatters. A JSON line carries `ts` (UTC, ms), `level`, `logger`,
`pid`, `msg`, and the fields a call passes in `extra` (`request_id`, `order_id`, `sku_id`,
`route`, `status`, ...); an exception adds `exc`. Nothing logs a header other than
`X-Request-Id` and `X-Operator`, a body, a token or a secret.

The access log (`FLASHGATE_ACCESS_LOG=1`, off by default: one line per request costs about as
much as the request) is flashgate's own, one line per answer on the `flashgate.access` logger:
request id (the client's `X-Request-Id` when it is an id, else a new one), method, route
template, status, answer code, duration, the client's address (the peer's, or behind a proxy
listed in `FLASHGATE_TRUSTED_PROXIES` the one it names) and the order id when there is one.
"""

from __future__ import annotations

import logging
import logging.config
import time
from typing import Any

import orjson

TEXT_FORMAT = "%(asctime)s flashgate %(message)s"
_STANDARD = set(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {
    "message",
    "asctime",
    "color_message",  # uvicorn's copy of the message with terminal colours
}


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "pid": record.process,
            "msg": record.getMessage(),
        }
        for key, value in vars(record).items():
            if key not in _STANDARD and not key.startswith("_") and key not in out:
                out[key] = value
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        # orjson: these dicts are untyped (each call's `extra`); UTF-8 as is, no ASCII escapes
        return orjson.dumps(out, default=str).decode()


# Libraries that log every request at INFO (httpx: one line per webhook delivery of the relay)
QUIET = ("httpx", "httpcore")


def formatter(fmt: str) -> logging.Formatter:
    return JsonFormatter() if fmt == "json" else logging.Formatter(TEXT_FORMAT)


def configure(fmt: str, *, force: bool = True) -> None:
    """The root logger of this process: INFO, one handler on stderr in `fmt`."""
    root = logging.getLogger()
    if root.handlers and not force:
        return  # configured already (a worker in the parent's process)
    handler = logging.StreamHandler()
    handler.setFormatter(formatter(fmt))
    root.handlers[:] = [handler]
    root.setLevel(logging.INFO)
    for chatty in QUIET:
        logging.getLogger(chatty).setLevel(logging.WARNING)


def uvicorn_config(fmt: str, level: str) -> dict[str, Any]:
    """uvicorn's `log_config`: its own loggers in the same format, its access log off (the
    gateway writes its own)."""
    factory = "gateway.telemetry.logs.JsonFormatter" if fmt == "json" else "logging.Formatter"
    spec: dict[str, Any] = {"()": factory}
    if fmt != "json":
        spec["fmt"] = TEXT_FORMAT
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "formatters": {"default": spec},
        "handlers": {"default": {"class": "logging.StreamHandler", "formatter": "default"}},
        "loggers": {
            "uvicorn": {"handlers": ["default"], "level": level.upper(), "propagate": False},
            "uvicorn.error": {"level": level.upper()},
            "uvicorn.access": {"handlers": [], "level": "WARNING", "propagate": False},
        },
    }

"""One setting as a field of `Settings` declares it (`gateway/settings.py`): its environment
variable and flag, the values it accepts in words, how an environment value is read, and its
row in `docs/reference/settings.md`."""

from __future__ import annotations

import base64
import binascii
import dataclasses
import ipaddress
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal, Union, get_args, get_origin
from urllib.parse import urlsplit

from msgspec import Meta

PREFIX = "FLASHGATE_"
_BOOL_WORDS = {"1": True, "true": True, "yes": True, "on": True}
_BOOL_WORDS.update({"0": False, "false": False, "no": False, "off": False})


@dataclass(frozen=True, slots=True)
class Setting:
    """One setting: a field of `Settings` and what its annotation and default declare."""

    name: str
    env: str  # its environment variable
    kind: type  # bool, int, float or str (for a Literal: its values' type)
    default: object
    description: str
    choices: tuple[object, ...] = ()  # a Literal's values
    bounds: Meta = Meta()  # ge, gt, le, lt of a number
    secret: bool = False  # never in a repr

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")

    @property
    def default_text(self) -> str:
        return "unset" if self.default is None else text_of(self.default)

    def accepts(self) -> str:
        """The values it takes, in words ("an integer >= 1", "mux or pool")."""
        if self.kind is bool:
            return "1/true/yes/on or 0/false/no/off"
        if self.choices:
            return " or ".join(map(text_of, self.choices))
        if self.kind is str:
            return "text"
        noun = "an integer" if self.kind is int else "a number"
        b = self.bounds
        if b.ge is not None and b.le is not None:
            return f"{noun} within {text_of(b.ge)}..{text_of(b.le)}"
        limits = (">=", b.ge), (">", b.gt), ("<=", b.le), ("<", b.lt)
        shown = " and ".join(f"{op} {text_of(v)}" for op, v in limits if v is not None)
        return f"{noun} {shown}".strip()

    def prepare(self, text: str) -> object:
        """An environment value as `msgspec.convert(..., strict=False)` takes it."""
        if self.kind is bool:
            return _BOOL_WORDS.get(text.strip().lower(), text)
        return text if self.kind is str else text.strip()

    def refusal(self, value: object) -> str:
        """The error message for a value it does not accept (a secret's value is not shown)."""
        shown = "" if self.secret else f", got {value!r}"
        return f"{self.env} must be {self.accepts()}{shown}"


def declare(field: dataclasses.Field[Any], hint: Any) -> Setting:
    """The `Setting` a field declares with its type hint, `Annotated[T, Meta(...)]` (T may be
    optional or a Literal; `Meta.extra["env"]` names a variable outside the prefix)."""
    kind, *metas = get_args(hint) if get_origin(hint) is Annotated else (hint,)
    meta = next((m for m in metas if isinstance(m, Meta)), Meta())
    if get_origin(kind) in (Union, type(int | None)):
        kind = next(arg for arg in get_args(kind) if arg is not type(None))
    choices = get_args(kind) if get_origin(kind) is Literal else ()
    extra = meta.extra or {}
    return Setting(
        name=field.name,
        env=extra.get("env", PREFIX + field.name.upper()),
        kind=type(choices[0]) if choices else kind,
        default=field.default,
        description=meta.description or "",
        choices=choices,
        bounds=meta,
        secret=not field.repr,
    )


def text_of(value: object) -> str:
    """A value as the environment writes it: booleans as 1/0, 5000.0 as 5000."""
    if isinstance(value, bool):
        return "1" if value else "0"
    if isinstance(value, float):
        return str(value).removesuffix(".0")
    return str(value)


_PAGE_HEAD = """\
# Settings

<!-- Generated from the declaration in gateway/settings.py by
`python -m gateway.settings --markdown > docs/reference/settings.md`;
tests/test_settings.py fails when this file differs from it. -->

Every setting is an environment variable (also read from `./.env`) and a flag of every command,
both named after the field (`hold_ttl_s` = `FLASHGATE_HOLD_TTL_S` = `--hold-ttl-s`). Flags win
over the environment, the environment over `.env`, `.env` over the default; an empty value
counts as unset. `.env` holds `KEY=VALUE` lines (an `export ` before the key, `#` comment lines
and quotes around the value are allowed). Booleans take `1/true/yes/on` or `0/false/no/off`
(flags: `--x` / `--no-x`). A bad value stops start-up with a message naming the variable.
`flashgate <command> --help` lists the flags with their defaults.

The protection settings `qps`, `burst`, `breaker_*`, `client_*` and `user_*` are runtime rules:
they seed the rules in Redis when it has none, and from then on the rules change through
`PUT /api/v1/admin/rules` (docs/operations/rules.md), not the environment.

| variable | flag | default | accepts | meaning |
| --- | --- | --- | --- | --- |
"""


def reference_page(settings: Iterable[Setting]) -> str:
    """`docs/reference/settings.md`: the settings table, in Markdown."""
    rows = []
    for s in settings:
        default = (
            "unset" if s.default is None else f"`{s.default_text}`" if s.default_text else "empty"
        )
        accepts = s.accepts() + ("; secret: never shown" if s.secret else "")
        cells = (f"`{s.env}`", f"`{s.flag}`", default, accepts, s.description)
        rows.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |\n")
    return _PAGE_HEAD + "".join(rows)


def read_dotenv(path: str | Path) -> dict[str, str]:
    """KEY=VALUE lines; `#` comments and blank lines ignored; surrounding quotes stripped."""
    p = Path(path)
    if not p.is_file():
        return {}
    out: dict[str, str] = {}
    for line in p.read_text(encoding="utf-8").splitlines():
        line = line.strip()
        if not line or line.startswith("#") or "=" not in line:
            continue
        key, _, value = line.partition("=")
        value = value.strip()
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "\"'":
            value = value[1:-1]
        out[key.strip().removeprefix("export ").strip()] = value
    return out


WEBHOOK_SCHEMES = ("http", "https")
BROKER_SCHEMES = ("amqp", "amqps")


def relay_target_problem(url: str, secret: str | None) -> str | None:
    """What makes a relay target unusable, in words naming the variable (None: usable). Neither
    the URL's password nor the secret is ever shown."""
    try:
        parts = urlsplit(url)
        host = parts.hostname
        parts.port  # noqa: B018 (raises on a port that is not a number)
    except ValueError:
        return "FLASHGATE_RELAY_URL is not a URL"
    if parts.scheme not in WEBHOOK_SCHEMES + BROKER_SCHEMES:
        return (
            "FLASHGATE_RELAY_URL must be an http://, https:// (webhook), amqp:// or amqps://"
            f" (RabbitMQ) URL, got {parts.scheme + ':' if parts.scheme else 'no scheme'}"
        )
    if not host:
        return "FLASHGATE_RELAY_URL names no host"
    if parts.scheme in BROKER_SCHEMES:
        return None
    if not secret:
        return "FLASHGATE_RELAY_SECRET is required for a webhook target (whsec_ + base64)"
    body = secret.removeprefix("whsec_")
    try:
        key = base64.b64decode(body, validate=True)
    except binascii.Error:
        key = b""
    if body == secret or not 24 <= len(key) <= 64:
        return "FLASHGATE_RELAY_SECRET must be whsec_ followed by base64 of 24 to 64 bytes"
    return None


Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def proxy_networks(text: str) -> tuple[Network, ...]:
    """The networks of a comma-separated list of addresses and CIDRs ("10.0.0.1, 10.1.0.0/16,
    ::1"); ValueError naming the first entry that is neither."""
    found: list[Network] = []
    for entry in text.split(","):
        entry = entry.strip()
        if not entry:
            continue
        try:
            found.append(ipaddress.ip_network(entry, strict=False))
        except ValueError:
            raise ValueError(f"{entry!r} is not an IP address or CIDR") from None
    return tuple(found)


def problems(settings: Any) -> Iterator[str]:
    """What makes `Settings` unusable beyond one value's bounds, each in words naming the
    variable (checked by `Settings.__post_init__`)."""
    if settings.redis_cluster:
        yield from _cluster_problems(settings)
    try:
        proxy_networks(settings.trusted_proxies)
    except ValueError as exc:
        yield f"FLASHGATE_TRUSTED_PROXIES: {exc}"
    if settings.relay_url is not None:
        problem = relay_target_problem(settings.relay_url, settings.relay_secret)
        if problem:
            yield problem


def _cluster_problems(settings: Any) -> Iterator[str]:
    url = settings.redis_url
    if url and not url.startswith(("redis://", "rediss://")):
        yield "FLASHGATE_REDIS_CLUSTER=1 needs a redis:// or rediss:// URL"
    if (settings.waitaof_local or settings.waitaof_replicas) and settings.redis_client != "mux":
        # WAITAOF must reach the node that ran the write: the mux routes it there
        yield (
            "FLASHGATE_WAITAOF_LOCAL/FLASHGATE_WAITAOF_REPLICAS in cluster mode need"
            " FLASHGATE_REDIS_CLIENT=mux"
        )

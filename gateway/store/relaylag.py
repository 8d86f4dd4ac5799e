"""The relays' lag figures in Redis (`fg:{mode}:relay-lag`): one field per relay group (one per
target), written by a relay about once a second, read by `/metrics` and the ops console with one
HGETALL, so neither computes anything per scrape or per view.

Several relays of one target write the same field with the same figures (each measures every
stream of its group). Figures not rewritten for `STALE_S` are left out when read: the group's
relays are gone (or cannot reach Redis), and a frozen lag would read as a live one.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import msgspec

from gateway.store import keys
from gateway.transport.connect import Client

STALE_S = 30.0


class _Stored(msgspec.Struct, frozen=True, array_like=True):
    target: str
    lag: int
    oldest_ms: int  # 0: nothing unconfirmed
    at_ms: int


_encode = msgspec.json.Encoder().encode
_decode = msgspec.json.Decoder(_Stored).decode


@dataclass(frozen=True, slots=True)
class RelayLag:
    group: str  # the target's consumer group
    target: str  # webhook | rabbitmq
    lag: int  # events its group has not confirmed yet (pending + not yet handed out)
    oldest_ms: int  # epoch ms of the oldest unconfirmed event's entry id; 0: none
    at_ms: int  # epoch ms the figures were measured

    def oldest_age_s(self, now_ms: int) -> float:
        """Seconds since the oldest unconfirmed event was committed (0 with none)."""
        return max(0, now_ms - self.oldest_ms) / 1000 if self.oldest_ms else 0.0


async def write(redis: Client, figures: RelayLag) -> None:
    stored = _Stored(figures.target, figures.lag, figures.oldest_ms, figures.at_ms)
    await redis.hset(keys.RELAY_LAG, figures.group, _encode(stored))


def parse(raw: dict[Any, Any] | None, now_ms: int, *, stale: bool = False) -> list[RelayLag]:
    """An HGETALL of `fg:{mode}:relay-lag` as figures, by group, unreadable left out: the fresh
    ones, or with `stale` those no relay rewrote for `STALE_S` (a group whose relays are gone
    keeps the events streams from being trimmed: `flashgate status` names it)."""
    found = []
    for group, value in sorted((raw or {}).items()):
        try:
            s = _decode(value)
        except msgspec.DecodeError:
            continue
        if (now_ms - s.at_ms > STALE_S * 1000) == stale:
            name = group.decode() if isinstance(group, bytes) else str(group)
            found.append(RelayLag(name, s.target, s.lag, s.oldest_ms, s.at_ms))
    return found


async def read(redis: Client, group: str) -> RelayLag | None:
    """The figures one group's relays last wrote (fresh or stale), None with none."""
    raw = await redis.hget(keys.RELAY_LAG, group)
    if raw is None:
        return None
    try:
        s = _decode(raw)
    except msgspec.DecodeError:
        return None
    return RelayLag(group, s.target, s.lag, s.oldest_ms, s.at_ms)


async def remove(redis: Client, group: str) -> bool:
    """Drop a retired group's figures; returns whether it had any."""
    return bool(await redis.hdel(keys.RELAY_LAG, group))

"""switch_mode.lua called directly against the real server."""

from __future__ import annotations

import json

import pytest
from redis.asyncio import Redis

from gateway.intake.mode import ModeStore
from gateway.schemas import Mode
from gateway.store import keys
from gateway.transport.scripts import ScriptRegistry

pytestmark = pytest.mark.lua


@pytest.fixture
def modes(redis: Redis) -> ModeStore:
    return ModeStore(redis, ScriptRegistry())


async def history(redis: Redis) -> list[dict[str, object]]:
    return [json.loads(entry) for entry in await redis.lrange(keys.MODE_HISTORY, 0, -1)]


async def test_a_change_records_who_and_from_where(modes: ModeStore, redis: Redis) -> None:
    assert await modes.switch(Mode.QUEUE_ONLY, by="alice", client="2001:db8::1") is True
    assert await modes.switch(Mode.QUEUE_ONLY, by="bob", client="10.0.0.2") is False
    assert await modes.switch(Mode.NORMAL) is True  # defaults: "operator", unknown address
    back, first = await history(redis)
    assert {k: first[k] for k in ("from", "to", "by", "client")} == {
        "from": "NORMAL",
        "to": "QUEUE_ONLY",
        "by": "alice",
        "client": "2001:db8::1",
    }
    assert (back["by"], back["client"]) == ("operator", None)
    assert isinstance(back["at"], int)


async def test_any_value_stays_inside_its_json_string(modes: ModeStore, redis: Redis) -> None:
    """The gateway passes only checked values, but the script does not rely on it."""
    hostile = 'x","to":"NORMAL","at":0}\\\n\x00ü'
    await modes.switch(Mode.QUEUE_ONLY, by=hostile, client=hostile)
    (entry,) = await history(redis)
    assert (entry["to"], entry["by"], entry["client"]) == ("QUEUE_ONLY", hostile, hostile)


async def test_older_entries_without_by_still_read(modes: ModeStore, redis: Redis) -> None:
    await redis.lpush(keys.MODE_HISTORY, '{"from":"NORMAL","to":"QUEUE_ONLY","at":1}')
    await redis.hset(keys.MODE, mapping={"mode": "QUEUE_ONLY", "changed_at": 1})
    await modes.switch(Mode.NORMAL, by="alice")
    view = await modes.view()
    entries = json.loads(bytes(view.history))
    assert [(e["from"], e["to"], e.get("by")) for e in entries] == [
        ("QUEUE_ONLY", "NORMAL", "alice"),
        ("NORMAL", "QUEUE_ONLY", None),
    ]

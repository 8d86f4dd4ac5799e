"""`flashgate status` and `flashgate dead`: what the gateway is doing, in the terminal.

The intake mode (with the last switch: when, who, from where) and, per SKU: stock, available,
held, sold; the backlog of orders not yet decided by a finalizer; entries delivered to a
finalizer and not yet acknowledged; dead letters; and two rates over the sampling interval:
entries into the SKU's stream per second (orders and payment confirmations) and final states
out per second (the outbound events); a fair start's draw (pending, drawing or done), its
pre-queued orders and how many of them it decided. The figures are read by `gateway.store.figures`;
nothing is written.

    flashgate status                 # one table, rates over 1 s
    flashgate status --watch 2       # a table every 2 s until Ctrl-C
    flashgate dead --sku s1          # the newest dead letters of s1
"""

from __future__ import annotations

import asyncio
import sys
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, TextIO

from gateway.settings import Settings
from gateway.store.figures import PER_CALL, Sample, Sampler, dead_letters
from gateway.transport.connect import create_client, create_reader
from gateway.transport.scripts import ScriptRegistry

if TYPE_CHECKING:
    from gateway.workers.relay.forget import Forgotten

DEAD_HEADER = (
    "sku_id", "dead_id", "entry_id", "event", "order_id", "payment_id", "reason", "from"
)  # fmt: skip


def text_table(rows: Sequence[Sequence[str]], *, numbers_right: bool = False) -> list[str]:
    """Rows as aligned columns two spaces apart; with `numbers_right`, every column after the
    first is right-aligned."""
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return [
        "  ".join(
            c.rjust(w) if numbers_right and i else c.ljust(w)
            for i, (c, w) in enumerate(zip(r, widths, strict=True))
        ).rstrip()
        for r in rows
    ]


def render(before: Sample, now: Sample) -> list[str]:
    """The table for `now`, with rates against `before`."""
    seconds = max(now.at - before.at, 1e-9)
    earlier = {s.sku_id: s for s in before.skus}
    switch = ""
    if now.last_switch:
        sw = now.last_switch
        at = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(sw["at"] / 1000))
        switch = f" (switched {sw['from']} -> {sw['to']} at {at}"
        switch += f" by {sw.get('by', '?')} from {sw.get('client') or 'unknown'})"
    lines = [f"mode {now.mode}{switch}"]
    header = ("sku_id", "stock", "available", "held", "sold", "backlog", "pending", "dead",
              "in/s", "out/s")  # fmt: skip
    rows: list[tuple[str, ...]] = [header]
    totals = [0] * 7
    for s in now.skus:
        prev = earlier.get(s.sku_id, s)
        rate_in = (s.entries_in - prev.entries_in) / seconds
        rate_out = (s.entries_out - prev.entries_out) / seconds
        figures = (s.stock, s.available, s.held, s.sold, s.backlog, s.pending, s.dead)
        totals = [t + f for t, f in zip(totals, figures, strict=True)]
        rows.append((s.sku_id, *map(str, figures), f"{rate_in:.1f}", f"{rate_out:.1f}"))
    lines += text_table(rows, numbers_right=True)
    lines.append(
        f"{len(now.skus)} SKU(s): stock {totals[0]}, available {totals[1]}, held {totals[2]}, "
        f"sold {totals[3]}, backlog {totals[4]}, pending {totals[5]}, dead letters {totals[6]}"
    )
    for s in now.skus:
        if s.draw != "none":
            lines.append(f"draw {s.sku_id}: {s.draw}, {s.prequeued} pre-queued, {s.drawn} decided")
    now_ms = int(time.time() * 1000)
    for r in now.relays:  # as the relays last wrote it, about once a second
        lines.append(f"relay {r.target} ({r.group}): lag {r.lag}, oldest unconfirmed "
                     f"{r.oldest_age_s(now_ms):.1f} s")  # fmt: skip
    for r in now.silent:  # its group still holds the events streams back from trimming
        lines.append(f"relay {r.target} ({r.group}): no relay reported for "
                     f"{(now_ms - r.at_ms) / 60_000:.0f} min; its group keeps "
                     "the events streams from being trimmed: start its relay, or retire it "
                     f"with `flashgate relay --forget --group {r.group}`")  # fmt: skip
    return lines


async def run(sampler: Sampler, *, watch_s: float, count: int | None, out: TextIO) -> int:
    """Print the table once (rates over 1 s) or every `watch_s` seconds, `count` times."""
    interval = watch_s if watch_s > 0 else 1.0
    before = await sampler.sample(streams=2)
    shown = 0
    while True:
        await asyncio.sleep(interval)
        now = await sampler.sample(streams=2)
        if shown:
            print(file=out)
        print(f"-- {time.strftime('%H:%M:%S')}", file=out)
        print("\n".join(render(before, now)), file=out, flush=True)
        shown += 1
        if watch_s <= 0 or (count is not None and shown >= count):
            return 0
        before = now


async def show_status(settings: Settings, watch_s: float, count: int | None) -> int:
    """`flashgate status`: `run` on a client of its own (two round trips a table)."""
    client = create_client(settings)
    reader = create_reader(settings, client)
    try:
        per_call = 1 if settings.redis_cluster else PER_CALL
        sampler = Sampler(reader, ScriptRegistry(), max_age_s=0, per_call=per_call)
        return await run(sampler, watch_s=watch_s, count=count, out=sys.stdout)
    except KeyboardInterrupt:
        return 0
    finally:
        await reader.aclose()
        await client.aclose()


async def show_dead(settings: Settings, sku_ids: list[str] | None, limit: int) -> int:
    """`flashgate dead`: the newest `limit` dead letters of each SKU, as a table."""
    client = create_client(settings)
    try:
        rows = await dead_letters(client, sku_ids, limit)
    finally:
        await client.aclose()
    if rows:
        print("\n".join(text_table([DEAD_HEADER, *rows])))
    print(f"{len(rows)} dead letter(s)")
    return 0


async def replay_dead(settings: Settings, sku_ids: list[str] | None) -> int:
    """`flashgate finalizer --replay-dead`: every dead letter (of `sku_ids`) back onto its order
    stream for the finalizers, oldest first; one line each, then the count."""
    from gateway.store.deadletters import replay_dead as put_back
    from gateway.transport.scripts import ScriptRegistry

    client = create_client(settings)
    try:
        scripts = ScriptRegistry()
        await scripts.load_all(client)
        done = await put_back(client, scripts, sku_ids)
    finally:
        await client.aclose()
    if done:
        print("\n".join(text_table([("sku_id", "dead_id", "entry_id"), *done])))
    print(f"{len(done)} dead letter(s) put back for the finalizers")
    return 0


async def replay_relay(settings: Settings, sku_ids: list[str] | None) -> int:
    """`flashgate relay --replay-dead`: the relay's dead letters of FLASHGATE_RELAY_URL's target
    sent again, oldest first; exits 1 when the target refused one (the rest stay dead)."""
    from gateway.workers.relay.factory import target_for
    from gateway.workers.relay.loop import group_for
    from gateway.workers.relay.replay import replay_dead as send_again
    from gateway.workers.relay.target import Unreachable

    target = target_for(settings)
    client = create_client(settings)
    try:
        try:
            await target.start()
        except Unreachable as exc:
            print(f"flashgate relay: the target is out of reach: {exc}", file=sys.stderr)
            return 1
        done = await send_again(client, target, group_for(target.name, settings.relay_url or ""),
                                sku_ids)  # fmt: skip
    finally:
        await target.close()
        await client.aclose()
    for event_id in done.sent:
        print(event_id)
    print(f"{len(done.sent)} relay dead letter(s) sent again")
    if done.stopped:
        print(f"stopped: {done.stopped}", file=sys.stderr)
        return 1
    return 0


async def forget_relay(settings: Settings, group: str | None, *, force: bool) -> int:
    """`flashgate relay --forget`: retire a target's consumer group (`group`, else
    FLASHGATE_RELAY_URL's) on every events stream; says what it did and which dead letters stay.
    Exits 1 when a relay of it still reports (without `force`) or there was nothing to forget."""
    from gateway.workers.relay import forget

    group = group or forget.target_group(settings)
    client = create_client(settings)
    try:
        done = await forget.forget_group(client, group, now_ms=int(time.time() * 1000), force=force)
    except ValueError as exc:  # not a relay's group
        print(f"flashgate relay: {exc}", file=sys.stderr)
        return 2
    except forget.Alive as exc:
        print(f"flashgate relay: {exc}: it is alive; stop its relays first, or give --force "
              "(a relay still running joins the streams again from their first entry and "
              "delivers every event in them again)", file=sys.stderr)  # fmt: skip
        return 1
    finally:
        await client.aclose()
    if not done.found:
        print(f"flashgate relay: {group} is on no events stream and has no lag figures: "
              "nothing to forget", file=sys.stderr)  # fmt: skip
    print_forgotten(done, sys.stdout)
    return 0 if done.found else 1


def print_forgotten(done: Forgotten, out: TextIO) -> None:
    if done.streams:
        rows = [("events stream", "pending dropped")]
        print("\n".join(text_table([*rows, *((s, str(n)) for s, n in done.streams)])), file=out)
    if done.figures:
        print(f"lag figures of {done.group} removed", file=out)
    for sku_id, stream, kept in done.dead:
        print(f"kept: {kept} dead letter(s) of {done.group} in {stream}; list them with "
              f"`flashgate dead --sku {sku_id}`, send them again with `flashgate relay "
              "--replay-dead` (FLASHGATE_RELAY_URL: that target), or delete one with "
              f"`XDEL {stream} <dead_id>`", file=out)  # fmt: skip
    if done.found:
        print(f"{done.group} forgotten: {len(done.streams)} events stream(s), "
              f"{done.pending} pending entries dropped", file=out)  # fmt: skip

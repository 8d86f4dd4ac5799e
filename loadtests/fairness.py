"""The prequeue scenario's checks of a fair start, from what Redis holds after the drain.

- **order**: no order that arrived at or after the start was decided before a pre-queued one:
  every post-start order's decision (its `QUEUED -> HELD|REJECTED` entry, or its creation when
  NORMAL held it at once) is at or after the last pre-queued order's decision;
- **winners**: the draw's ranking (`fg:{S}:draw`) is exactly the pre-queue, every pre-queued
  order carries its rank, and with one unit per order and one order per user (the scenario's
  shoppers) the HELD ones are exactly the first `min(stock, pre-queued)` of the ranking; a
  post-start order holds units only when every pre-queued one was held, and never more than
  the stock the draw left;
- `flashgate verify-draw` (run by the runner) recomputes every rank and the commitment;
- `GET /metrics` (`draw_metrics`): the draw is `done`, its gauges count the pre-queue, and the
  finalizers counted each drawn order once (HELD + REJECTED = pre-queued) and timed one draw.
"""

from __future__ import annotations

import json
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from gateway.store import keys

FAR = 1 << 62


def decided_at(record: dict[str, str]) -> int | None:
    """When an order was decided (epoch ms): its QUEUED -> HELD|REJECTED entry, or its creation
    when it was HELD at once; None while it is still QUEUED."""
    history = json.loads(record.get("history") or "[]")
    for entry in history:
        if entry.get("from") == "QUEUED":
            return int(entry["at"])
    if history and history[0].get("to") == "HELD":
        return int(history[0]["at"])
    return None


def check(client: Any, sku: str, stock: int, order_ids: set[str]) -> dict[str, Any]:
    """The fairness of `sku`'s fair start over the accepted `order_ids`: counts, the decision
    times at the boundary and the problems found (none: fair)."""
    sk = keys.SkuKeys(sku)
    prequeued = set(client.smembers(sk.prequeue))
    ranking = list(client.lrange(sk.draw, 0, -1))
    problems: list[str] = []
    if set(ranking) != prequeued or len(ranking) != len(prequeued):
        problems.append(f"the ranking ({len(ranking)}) is not the pre-queue ({len(prequeued)})")
    if not prequeued <= order_ids:
        problems.append(f"{len(prequeued - order_ids)} pre-queued order(s) no shopper was given")
    records = {oid: client.hgetall(keys.order_key(oid) or "") for oid in order_ids | prequeued}
    draw_held = [records[oid].get("status") == "HELD" for oid in ranking]
    winners = min(stock, len(ranking))
    if draw_held != [True] * winners + [False] * (len(ranking) - winners):
        problems.append(f"the HELD pre-queued orders are not the first {winners} of the draw")
    for rank, oid in enumerate(ranking, start=1):
        if records[oid].get("draw_rank") != str(rank):
            problems.append(f"order {oid} of rank {rank} says {records[oid].get('draw_rank')}")
            break
    first_after, last_prequeued, after_held = FAR, 0, 0
    undecided = 0
    for oid, record in records.items():
        at = decided_at(record)
        if at is None:
            undecided += 1
        elif oid in prequeued:
            last_prequeued = max(last_prequeued, at)
        else:
            first_after = min(first_after, at)
            after_held += record.get("status") == "HELD"
    if undecided:
        problems.append(f"{undecided} order(s) never decided")
    if first_after < last_prequeued:
        problems.append(
            f"an order after the start was decided {last_prequeued - first_after} ms before "
            "the last pre-queued one"
        )
    if after_held and sum(draw_held) < len(ranking):
        problems.append(f"{after_held} order(s) after the start held while the draw rejected")
    if after_held > stock - sum(draw_held):  # the audit would also find the oversell
        problems.append(f"{after_held} order(s) after the start held, over the stock left")
    return {
        "prequeued": len(ranking),
        "prequeued_held": sum(draw_held),
        "after_start": len(records) - len(prequeued),
        "after_start_held": after_held,
        "last_prequeued_decided_ms": last_prequeued or None,
        "first_after_start_decided_ms": None if first_after == FAR else first_after,
        "problems": problems,
    }


def draw_metrics(metrics: str, sku: str) -> dict[str, Any]:
    """What one `GET /metrics` says of the draws: the orders the finalizers counted as drawn
    by outcome, the draws they timed and their total length, and `sku`'s draw gauges."""
    found: dict[str, Any] = {"held": 0, "rejected": 0, "timed": 0, "seconds": 0.0}
    for family in text_string_to_metric_families(metrics):
        for s in family.samples:
            if s.name == "flashgate_draw_orders_total":
                found[s.labels["outcome"].lower()] = int(s.value)
            elif s.name == "flashgate_draw_duration_seconds_count":
                found["timed"] = int(s.value)
            elif s.name == "flashgate_draw_duration_seconds_sum":
                found["seconds"] = round(s.value, 3)
            elif s.name.startswith("flashgate_sku_draw_") and s.labels.get("sku") == sku:
                if s.name == "flashgate_sku_draw_state":
                    if s.value:
                        found["state"] = s.labels["state"]
                else:
                    found[s.name.removeprefix("flashgate_sku_draw_")] = int(s.value)
    return found


def print_fairness(
    found: dict[str, Any], drawn: dict[str, Any], verify_rc: int, verify_out: str
) -> None:
    gap = None
    if found["first_after_start_decided_ms"] and found["last_prequeued_decided_ms"]:
        gap = found["first_after_start_decided_ms"] - found["last_prequeued_decided_ms"]
    print(
        f"fair start: {found['prequeued']} pre-queued ({found['prequeued_held']} held, the first"
        f" of the draw), {found['after_start']} after the start ({found['after_start_held']}"
        f" held); first post-start decision {gap} ms after the last pre-queued one"
    )
    print(
        f"  /metrics: the draw {drawn.get('state')}, {drawn.get('prequeued')} pre-queued,"
        f" {drawn.get('drawn')} decided; drawn HELD {drawn['held']}, REJECTED"
        f" {drawn['rejected']}; {drawn['timed']} draw(s) timed, {drawn['seconds']} s"
    )
    print(f"  problems: {len(found['problems'])}")
    for problem in found["problems"][:10]:
        print(f"    {problem}")
    print(f"flashgate verify-draw: exit code {verify_rc}")
    for line in verify_out.splitlines()[:10]:
        print(f"  {line}")

"""`flashgate audit`: every SKU's inventory invariants, checked against what Redis holds and
printed as a table; exit status 1 when any SKU breaks one."""

from __future__ import annotations

import asyncio

from gateway.ops.status import text_table
from gateway.settings import Settings
from gateway.store.audit import AuditRow
from gateway.store.inventory import Inventory
from gateway.transport.connect import create_client
from gateway.transport.scripts import ScriptRegistry

AUDIT_SWEEP_MARGIN_MS = 5000  # a hold may outlive its deadline by one sweep interval plus this
AUDITS_AT_ONCE = 16  # SKUs audited side by side (the pool's connections are shared)


async def audit(settings: Settings) -> int:
    client = create_client(settings)
    try:
        scripts = ScriptRegistry()
        inventory = Inventory(client, scripts, settings)
        sku_ids = await inventory.sku_ids()
        seconds, micros = await client.time()
        now_ms = seconds * 1000 + micros // 1000
        slack_ms = settings.sweep_interval_ms + AUDIT_SWEEP_MARGIN_MS
        header = ("sku_id", "stock", "available", "held", "sold", "backlog", "orders", "status")
        rows: list[tuple[str, ...]] = []
        broken = 0
        index = await inventory.audit.order_index()  # one scan, not one per SKU
        audited: list[AuditRow | None] = []
        for i in range(0, len(sku_ids), AUDITS_AT_ONCE):
            audited += await asyncio.gather(
                *(
                    inventory.audit_sku(s, now_ms=now_ms, slack_ms=slack_ms, index=index)
                    for s in sku_ids[i : i + AUDITS_AT_ONCE]
                )
            )
        for sku_id, row in zip(sku_ids, audited, strict=True):
            if row is None:
                rows.append((sku_id, *"------", "BROKEN: registered, no config"))
                broken += 1
                continue
            problems = row.breaches()
            broken += bool(problems)
            status = "ok" if not problems else "BROKEN: " + "; ".join(problems)
            orders = " ".join(f"{st}:{n}" for st, (n, _) in sorted(row.orders.items())) or "-"
            figures = (row.stock, row.available, row.held, row.sold, row.backlog)
            rows.append((sku_id, *(str(x) for x in figures), orders, status))
        print("\n".join(text_table([header, *rows])))
        print(f"{len(sku_ids)} SKU(s), {broken} with broken invariants")
        return 1 if broken else 0
    finally:
        await client.aclose()

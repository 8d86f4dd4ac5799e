"""`flashgate verify-draw SKU`: recompute a fair start's draw from its revealed seed.

Where the draw comes from:
- Redis (the default; `REDIS_URL` or the embedded server of `--data-dir`, as `audit`): the
  draw, the commitment the SKU view published, the closed pre-queue and each order's recorded
  rank are all checked;
- `--url BASE` (a gateway; the admin token from `FLASHGATE_ADMIN_TOKEN`): the draw and the
  SKU view's `draw_commitment`;
- `--file PATH`: a saved answer of `GET /api/v1/admin/skus/{id}/draw` (anyone may check it
  offline against the commitment they saw before the sale, `--commitment HEX`).

Exit status 0 when every check passes, 1 on a mismatch, 2 when there is no draw to check (no
such SKU, the draw not done, no answer).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx
import msgspec

from gateway.schemas import DrawView, SkuView
from gateway.settings import Settings
from gateway.store import draws, keys
from gateway.store.inventory import Inventory
from gateway.transport.connect import create_client
from gateway.transport.scripts import ScriptRegistry

FETCH_TIMEOUT_S = 30.0


class Unreadable(Exception):
    """No draw to check: no such SKU, the draw not done, no answer."""


def report(view: DrawView, found: list[str], checked: list[str]) -> int:
    """Print what was checked and what is wrong; the exit status."""
    print(f"draw of SKU {view.sku_id}: {len(view.orders)} order(s)")
    print(f"  seed        {view.seed}")
    print(f"  commitment  {view.commitment}")
    for line in checked:
        print(f"  checked: {line}")
    for problem in found:
        print(f"  MISMATCH: {problem}")
    print(f"NOT verified: {len(found)} problem(s)" if found else "verified: the draw checks out")
    return 1 if found else 0


async def from_redis(settings: Settings, sku_id: str) -> int:
    client = create_client(settings)
    try:
        inventory = Inventory(client, ScriptRegistry(), settings)
        view = await inventory.draws.view(sku_id)
        if view is None:
            exists, state, _ = await inventory.draws.state(sku_id)
            what = "no such SKU" if not exists else f"no draw done (draw: {state or 'none'})"
            raise Unreadable(f"SKU {sku_id}: {what}")
        _, _, published = await inventory.draws.state(sku_id)
        prequeued = await inventory.draws.prequeued(sku_id)
        found = draws.problems(view, published=published, prequeued=prequeued)
        async with client.pipeline(transaction=False) as pipe:
            for order_id in view.orders:
                pipe.hget(keys.order_key(order_id) or "", "draw_rank")
            recorded: list[Any] = await pipe.execute()
        wrong = [
            oid
            for rank, (oid, got) in enumerate(zip(view.orders, recorded, strict=True), 1)
            if got is not None and int(got) != rank
        ]
        if wrong:
            found.append(f"{len(wrong)} order record(s) carry another rank, first {wrong[0]}")
        checked = [
            "sha256(seed) is the commitment the SKU view published",
            "every rank is the ascending HMAC-SHA256(seed, order_id)",
            f"the draw ranked exactly the {len(prequeued)} pre-queued order(s)",
            "each order was decided at its rank",
        ]
        return report(view, found, checked)
    finally:
        await client.aclose()


def from_url(settings: Settings, sku_id: str, base: str) -> int:
    if not settings.admin_token:
        raise Unreadable(
            "--url reads the draw through the admin API: set FLASHGATE_ADMIN_TOKEN "
            "(or give --admin-token)"
        )
    headers = {"Authorization": f"Bearer {settings.admin_token}"}
    path = f"{base.rstrip('/')}/api/v1/admin/skus/{sku_id}"
    try:
        with httpx.Client(headers=headers, timeout=FETCH_TIMEOUT_S) as http:
            answer = http.get(f"{path}/draw")
            if answer.status_code != 200:
                raise Unreadable(f"GET {path}/draw answered {answer.status_code}: {answer.text}")
            sku = http.get(path)
    except httpx.HTTPError as exc:
        raise Unreadable(f"GET {path}/draw failed: {exc}") from exc
    view = msgspec.json.decode(answer.content, type=DrawView)
    published = None
    if sku.status_code == 200:
        published = msgspec.json.decode(sku.content, type=SkuView).draw_commitment
    checked = [
        "sha256(seed) is the commitment"
        + (" the SKU view published" if published is not None else ""),
        "every rank is the ascending HMAC-SHA256(seed, order_id)",
    ]
    return report(view, draws.problems(view, published=published), checked)


def from_file(path: Path, commitment: str | None) -> int:
    try:
        view = msgspec.json.decode(path.read_bytes(), type=DrawView)
    except (OSError, msgspec.DecodeError) as exc:  # ValidationError is a DecodeError
        raise Unreadable(f"{path}: {exc}") from exc
    checked = [
        "sha256(seed) is the commitment given"
        if commitment
        else "sha256(seed) is the draw's own commitment (no --commitment: compare it with the"
        " draw_commitment published before the sale)",
        "every rank is the ascending HMAC-SHA256(seed, order_id)",
    ]
    return report(view, draws.problems(view, published=commitment), checked)

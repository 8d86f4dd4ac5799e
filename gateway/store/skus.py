"""SKU administration: create or change a SKU (and its stock buckets), read it, its change log,
the registry of SKUs."""

from __future__ import annotations

from typing import Any, Literal

from gateway.schemas import SkuChange, SkuConfig, SkuSettings, SkuView
from gateway.store import calls, draws, keys
from gateway.store.buckets import Layouts, Mover
from gateway.store.calls import Call
from gateway.store.keys import DEFAULT_OPERATOR
from gateway.store.outcomes import ConfigureResult
from gateway.store.sending import Sender
from gateway.transport.scripts import ScriptRegistry

CHANGES_KEPT = 1000  # about this many entries of each SKU's change log are kept (XADD MAXLEN ~)


def _configure_call(
    sk: keys.SkuKeys,
    cfg: SkuConfig,
    by: str,
    client: str,
    stock: int,
    stock_mode: Literal["set", "init", "total"],
    log_change: bool = True,
) -> Call:
    """configure_sku.lua's call for one bucket (or a SKU without buckets) of `cfg`. A fair
    start's SKU gets a fresh seed, which the script keeps only when the SKU has no draw yet."""
    seed = draws.new_seed() if cfg.prequeue_s and log_change else ""
    return calls.configure_sku(
        sk,
        promotion_id=cfg.promotion_id,
        stock=stock,
        per_user_limit=cfg.per_user_limit,
        starts_at=cfg.starts_at,
        ends_at=cfg.ends_at,
        by=by,
        client=client,
        changes_kept=CHANGES_KEPT,
        stock_mode=stock_mode,
        buckets=cfg.buckets,
        total_stock=cfg.stock if stock_mode == "total" else None,
        log_change=log_change,
        prequeue_s=cfg.prequeue_s,
        draw_seed=seed,
        draw_commitment=draws.commitment(seed) if seed else "",
    )


class Skus:
    def __init__(
        self, send: Sender, scripts: ScriptRegistry, layouts: Layouts, mover: Mover
    ) -> None:
        self.send = send
        self.redis = send.redis
        self.layouts = layouts
        self.mover = mover
        self._configure = scripts["configure_sku"]

    async def configure_sku(
        self, sku_id: str, cfg: SkuConfig, *, by: str = DEFAULT_OPERATOR, client: str = ""
    ) -> tuple[ConfigureResult, int]:
        """Create or change a SKU and append the change (who, from where, before and after) to
        its audit log `fg:{S}:changes`, atomically; a refused change records nothing. Returns
        (result, units held plus sold when refused, else 0)."""
        run = self.send.run
        # Registry first: a SKU in the registry without config is harmless, the reverse
        # would hide a SKU from the audit.
        await run(self.redis.sadd(keys.SKU_REGISTRY, sku_id))
        if cfg.prequeue_s:  # a draw may begin: finalizers watch it until it is done
            await run(self.redis.sadd(keys.DRAW_REGISTRY, sku_id))
        if cfg.buckets == 1:
            home = keys.SkuKeys(sku_id)
            call = _configure_call(home, cfg, by, client, cfg.stock, "set")
            code, detail = await self.send.script(self._configure, *call)
        else:
            code, detail = await self._configure_buckets(sku_id, cfg, by, client)
        if code > 0:
            self.layouts.remember(sku_id, cfg.buckets)
            # More may be available now: gateways that remember the SKU as sold out forget it.
            await run(self.redis.publish(keys.NOTICES, keys.stock_notice(sku_id)))
        return ConfigureResult(code), int(detail)

    async def _configure_buckets(
        self, sku_id: str, cfg: SkuConfig, by: str, client: str
    ) -> tuple[int, int]:
        """A bucketed SKU: every bucket gets the configuration; bucket 0 holds the total and
        the change log, and decides (a refusal writes nothing anywhere). Created: buckets
        1..K-1 empty first, then bucket 0 with the whole stock (the SKU exists from then on),
        then an even share moved into each other bucket by journaled transfers, so whatever
        fails or runs twice, the buckets never hold more than the total. Changed: bucket 0
        first, its stock moved by the difference to the stored total inside its script (a
        decrease first moves available stock into bucket 0); then the other buckets get the
        new settings."""
        run = self.send.run
        tags = self.layouts.tags(sku_id, cfg.buckets)
        count = len(tags)
        home = keys.SkuKeys(sku_id)
        promotion, stored, total, available0 = await run(
            self.redis.hmget(home.sku, "promotion_id", "buckets", "total_stock", "available")
        )
        if promotion is not None and int(stored or 1) != count:
            return ConfigureResult.BUCKETS_FIXED, int(stored or 1)  # nothing written
        creating = promotion is None

        async def others() -> None:
            for tag in tags[1:]:  # a new bucket starts empty
                call = _configure_call(keys.SkuKeys(tag), cfg, by, client, 0, "init", False)
                await self.send.script(self._configure, *call)

        if creating:
            await others()
        elif cfg.stock < int(total) and int(available0 or 0) < int(total) - cfg.stock:
            short = int(total) - cfg.stock - int(available0 or 0)
            await run(self.mover.refill(tags, 0, short))
        call = _configure_call(home, cfg, by, client, cfg.stock, "total")
        code, detail = await self.send.script(self._configure, *call)
        if code == ConfigureResult.STOCK_BELOW_COMMITTED:
            view = await self.get_sku(sku_id)
            return code, 0 if view is None else view.held + view.sold
        if code == ConfigureResult.CREATED:
            for b, tag in enumerate(tags[1:], 1):  # bucket 0 keeps the first share
                share = cfg.stock // count + (1 if b < cfg.stock % count else 0)
                await run(self.mover.move(sku_id, tag, share))
        elif code > 0:
            await others()
        return code, detail

    async def get_sku(self, sku_id: str) -> SkuView | None:
        run = self.send.run
        raw = await run(self.redis.hgetall(keys.SkuKeys(sku_id).sku))
        if not raw:
            return None
        h = {k.decode(): v.decode() for k, v in raw.items()}
        stock, available, held, sold = (int(h[f]) for f in ("stock", "available", "held", "sold"))
        buckets, in_transit = int(h.get("buckets", 1)), 0
        if buckets > 1:
            for tag in self.layouts.tags(sku_id, buckets)[1:]:
                figures = await run(
                    self.redis.hmget(keys.SkuKeys(tag).sku, "stock", "available", "held", "sold")
                )
                b_stock, b_available, b_held, b_sold = (int(v or 0) for v in figures)
                stock, available = stock + b_stock, available + b_available
                held, sold = held + b_held, sold + b_sold
            # units taken out of one bucket and not yet given to another: still for sale
            in_transit = int(h["total_stock"]) - stock
            stock, available = stock + in_transit, available + in_transit
        return SkuView(
            sku_id=sku_id,
            promotion_id=h["promotion_id"],
            stock=stock,
            available=available,
            held=held,
            sold=sold,
            per_user_limit=int(h["per_user_limit"]),
            starts_at=int(h["starts_at"]) if "starts_at" in h else None,
            ends_at=int(h["ends_at"]) if "ends_at" in h else None,
            buckets=buckets,
            bucket_tags=self.layouts.tags(sku_id, buckets) if buckets > 1 else None,
            in_transit=in_transit,
            prequeue_s=int(h.get("prequeue_s", 0)),
            draw_commitment=h.get("draw_commitment"),
            draw=h.get("draw"),
        )

    async def sku_changes(self, sku_id: str, limit: int = 20) -> list[SkuChange] | None:
        """The SKU's latest configuration changes, newest first; None for a SKU never
        configured."""
        sk = keys.SkuKeys(sku_id)

        async def read() -> list[Any]:
            async with self.redis.pipeline(transaction=False) as pipe:
                pipe.exists(sk.sku)
                pipe.xrevrange(sk.changes, count=limit)
                result: list[Any] = await pipe.execute()
                return result

        exists, entries = await self.send.run(read())
        if not exists:
            return None
        return [sku_change(entry_id, fields) for entry_id, fields in entries]

    async def sku_ids(self) -> list[str]:
        members = await self.send.run(self.redis.smembers(keys.SKU_REGISTRY))
        return sorted(m.decode() for m in members)


def sku_change(entry_id: bytes, fields: dict[bytes, bytes]) -> SkuChange:
    """One entry of `fg:{S}:changes` as the API shows it (see lua/configure_sku.lua)."""
    f = {k.decode(): v.decode() for k, v in fields.items()}
    return SkuChange(
        id=entry_id.decode(),
        at=int(f["at"]),
        by=f["by"],
        client=f["client"] or None,
        action=f["action"],
        before=_sku_settings(f, "before:") if "before:stock" in f else None,  # None: created
        after=_sku_settings(f, "after:"),
    )


def _sku_settings(f: dict[str, str], prefix: str) -> SkuSettings:
    def opt(name: str) -> int | None:
        value = f.get(prefix + name, "")
        return int(value) if value else None

    return SkuSettings(
        promotion_id=f[prefix + "promotion_id"],
        stock=int(f[prefix + "stock"]),
        per_user_limit=int(f[prefix + "per_user_limit"]),
        starts_at=opt("starts_at"),
        ends_at=opt("ends_at"),
        prequeue_s=opt("prequeue_s") or 0,
    )

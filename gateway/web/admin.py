"""Operator endpoints: the intake mode switch, the runtime rules, SKU configuration and its
change log. Every one needs the admin token (`operators.require_admin`)."""

from __future__ import annotations

import re

import msgspec
from starlette.requests import Request
from starlette.responses import Response

from gateway import errors
from gateway.intake import rules
from gateway.intake.mode import ModeView
from gateway.schemas import (
    ID_PATTERN,
    DrawView,
    Id,
    Mode,
    SkuChanges,
    SkuConfig,
    SkuView,
    sku_config_decoder,
)
from gateway.store.outcomes import ConfigureResult
from gateway.transport.replies import call
from gateway.web.bodies import decode, request_body
from gateway.web.operators import Operator, admin_raises, log_change, require_admin
from gateway.web.responses import MsgspecResponse
from gateway.web.routing import ADMIN, Answer, Json, Operation, Resource, schema_of
from gateway.web.services import Services

CHANGES_SHOWN_MAX = 100  # most change-log entries one GET returns
_ID = re.compile(ID_PATTERN)
_LIMIT = re.compile(r"^[0-9]{1,3}\Z")

SKU_ID: Json = {
    "name": "sku_id",
    "in": "path",
    "required": True,
    "schema": schema_of(Id),
    "example": "sku-42",
}
# Where an answer's ids lead (OpenAPI links; schemathesis follows them in its stateful test).
SKU_LINKS = {
    "GetSku": {"operationId": "getSku", "parameters": {"sku_id": "$request.path.sku_id"}},
    "GetSkuChanges": {
        "operationId": "getSkuChanges",
        "parameters": {"sku_id": "$request.path.sku_id"},
    },
    "GetDraw": {"operationId": "getDraw", "parameters": {"sku_id": "$request.path.sku_id"}},
    "CreateOrder": {
        "operationId": "createOrder",
        "requestBody": {
            "sku_id": "$request.path.sku_id",
            "promotion_id": "$response.body#/promotion_id",
        },
    },
}

GET_MODE = Operation(
    method="GET",
    security=ADMIN,
    operation_id="getMode",
    summary="The intake mode and its last 20 switches, newest first",
    answers=(Answer(status=200, body=ModeView, description="the mode"),),
    raises=admin_raises(),
)
SWITCH_MODE = Operation(
    method="POST",
    security=ADMIN,
    operation_id="switchMode",
    summary="Switch the intake mode; every gateway applies it within 1 s",
    parameters=(
        {
            "name": "mode",
            "in": "query",
            "required": True,
            "schema": {"type": "string", "enum": ["QUEUE_ONLY", "NORMAL"]},
        },
    ),
    answers=(Answer(status=200, body=ModeView, description="the mode after the switch"),),
    raises=admin_raises(),
)
CONFIGURE_SKU = Operation(
    method="PUT",
    security=ADMIN,
    operation_id="configureSku",
    summary="Create or change a SKU; the change is recorded in its change log",
    parameters=(SKU_ID,),
    body=SkuConfig,
    example={"promotion_id": "promo-1111", "stock": 100, "per_user_limit": 2},
    answers=(
        Answer(status=200, body=SkuView, description="updated", links=SKU_LINKS),
        Answer(status=201, body=SkuView, description="created", links=SKU_LINKS),
    ),
    description=(
        "`prequeue_s` > 0 (with `starts_at`) makes a fair start: orders in `[starts_at - "
        "prequeue_s, starts_at)` are pre-queued and decided at `starts_at` by a draw. The "
        "first such configuration chooses the draw's seed and shows its commitment as "
        "`draw_commitment`; no later change alters the seed."
    ),
    raises=admin_raises(errors.StockBelowCommitted, errors.BucketsFixed, errors.PayloadTooLarge),
)
GET_SKU = Operation(
    method="GET",
    security=ADMIN,
    operation_id="getSku",
    summary="A SKU's figures: stock == available + held + sold",
    parameters=(SKU_ID,),
    answers=(Answer(status=200, body=SkuView, description="the SKU"),),
    raises=admin_raises(errors.UnknownSku),
)
GET_SKU_CHANGES = Operation(
    method="GET",
    security=ADMIN,
    operation_id="getSkuChanges",
    summary="A SKU's configuration changes, newest first",
    parameters=(
        SKU_ID,
        {
            "name": "limit",
            "in": "query",
            "required": False,
            "schema": {"type": "integer", "minimum": 1, "maximum": 100, "default": 20},
        },
    ),
    answers=(Answer(status=200, body=SkuChanges, description="the changes"),),
    raises=admin_raises(errors.UnknownSku),
)


GET_DRAW = Operation(
    method="GET",
    security=ADMIN,
    operation_id="getDraw",
    summary="A fair start's draw once done: the seed, its commitment, the orders in rank order",
    description=(
        "An order's rank is the ascending order of HMAC-SHA256(key=seed bytes, msg=order id), "
        "hex; sha256(seed bytes) is the commitment the SKU view showed before the sale. "
        "`flashgate verify-draw SKU` checks both."
    ),
    parameters=(SKU_ID,),
    answers=(Answer(status=200, body=DrawView, description="the draw"),),
    raises=admin_raises(errors.UnknownSku, errors.NoDraw, errors.DrawPending),
)


def sku_problem(cfg: SkuConfig) -> str | None:
    """What makes a SKU configuration invalid beyond its fields' own bounds (None: nothing)."""
    if cfg.starts_at is not None and cfg.ends_at is not None and cfg.ends_at <= cfg.starts_at:
        return "ends_at must be after starts_at"
    if cfg.prequeue_s and cfg.starts_at is None:
        return "prequeue_s needs starts_at (the pre-queue is the window before the start)"
    if cfg.prequeue_s and cfg.buckets > 1:
        return "prequeue_s is not available for a SKU with stock buckets"
    return None


GET_RULES = Operation(
    method="GET",
    security=ADMIN,
    operation_id="getRules",
    summary="The runtime rules in force, their version and their last 20 changes, newest first",
    answers=(Answer(status=200, body=rules.RulesView, description="the rules"),),
    raises=admin_raises(),
)
PUT_RULES = Operation(
    method="PUT",
    security=ADMIN,
    operation_id="changeRules",
    summary="Change any of the runtime rules; every gateway applies them within 1 s",
    description=(
        "Omitted rules keep their value. A bad value or an unknown field is `400` naming it, "
        "and nothing is applied. A change is recorded (who, from where, before, after) and "
        "adds one to `version`; a request that changes nothing records nothing."
    ),
    body=rules.RulesPatch,
    example={"qps": 2000, "user_qps": 2, "user_burst": 5},
    answers=(Answer(status=200, body=rules.RulesView, description="the rules after the change"),),
    raises=admin_raises(errors.PayloadTooLarge),
)


def _sku_id(request: Request) -> str:
    sku_id: str = request.path_params["sku_id"]
    if not _ID.match(sku_id):
        raise errors.InvalidRequest("sku_id must be 1-64 characters of [A-Za-z0-9_.:-]")
    return sku_id


def mode_routes(services: Services) -> list[Resource]:
    """`/api/v1/order/switch`: routed before `/api/v1/order/{order_id}`."""

    def admin(request: Request) -> Operator:
        return require_admin(request, services.settings.admin_token, services.admin_refusals)

    async def get_switch(request: Request) -> Response:
        admin(request)
        return MsgspecResponse(await call(services.modes.view()))

    async def post_switch(request: Request) -> Response:
        op = admin(request)
        raw = request.query_params.get("mode", "")
        try:
            mode = Mode(raw.strip().upper())
        except ValueError:
            raise errors.InvalidRequest("mode must be QUEUE_ONLY or NORMAL - at `?mode`") from None
        changed = await call(services.modes.switch(mode, by=op.name, client=op.client))
        if changed:  # two modes: a change comes from the other one
            other = Mode.NORMAL if mode is Mode.QUEUE_ONLY else Mode.QUEUE_ONLY
            log_change(op, "mode switched:", previous=other.value, mode=mode.value)
        else:
            log_change(op, "mode switch (already in force, nothing changed):", mode=mode.value)
        services.watcher.mode = mode  # this process at once; the others on the published notice
        return MsgspecResponse(await call(services.modes.view()))

    return [Resource("/api/v1/order/switch", (GET_MODE, get_switch), (SWITCH_MODE, post_switch))]


def rules_routes(services: Services) -> list[Resource]:
    """`/api/v1/admin/rules`: the protection settings every gateway applies, live."""
    settings = services.settings

    def admin(request: Request) -> Operator:
        return require_admin(request, settings.admin_token, services.admin_refusals)

    async def get_rules(request: Request) -> Response:
        admin(request)
        return MsgspecResponse(await call(services.rules.store.view()))

    async def put_rules(request: Request) -> Response:
        op = admin(request)
        body = await request_body(request, settings.max_body_bytes)
        patch = decode(rules.patch_decoder, body)
        live = services.rules
        changed, before, after = await call(live.store.change(patch, by=op.name, client=op.client))
        if changed:
            old, new = msgspec.structs.asdict(before), msgspec.structs.asdict(after)
            shown = {name: f"{old[name]}->{new[name]}" for name in new if new[name] != old[name]}
            log_change(op, "runtime rules changed:", **shown)
        await call(live.refresh())  # this process at once; the others on the notice
        return MsgspecResponse(await call(live.store.view()))

    return [Resource("/api/v1/admin/rules", (GET_RULES, get_rules), (PUT_RULES, put_rules))]


def sku_routes(services: Services) -> list[Resource]:
    settings = services.settings

    def admin(request: Request) -> Operator:
        return require_admin(request, settings.admin_token, services.admin_refusals)

    async def put_sku(request: Request) -> Response:
        op = admin(request)
        sku_id = _sku_id(request)
        body = await request_body(request, settings.max_body_bytes)
        cfg = decode(sku_config_decoder, body)
        if problem := sku_problem(cfg):
            raise errors.InvalidRequest(problem)
        inventory = services.inventory
        result, committed = await inventory.configure_sku(sku_id, cfg, by=op.name, client=op.client)
        if result is ConfigureResult.STOCK_BELOW_COMMITTED:
            raise errors.StockBelowCommitted(committed=committed)
        if result is ConfigureResult.BUCKETS_FIXED:
            raise errors.BucketsFixed(buckets=committed)
        created = result is ConfigureResult.CREATED
        log_change(
            op,
            f"sku {sku_id} {'created' if created else 'updated'}:",
            promotion_id=cfg.promotion_id,
            stock=cfg.stock,
            per_user_limit=cfg.per_user_limit,
            starts_at=cfg.starts_at,
            ends_at=cfg.ends_at,
            **({"buckets": cfg.buckets} if cfg.buckets > 1 else {}),
            **({"prequeue_s": cfg.prequeue_s} if cfg.prequeue_s else {}),
        )
        view = await inventory.get_sku(sku_id)
        return MsgspecResponse(view, status_code=201 if created else 200)

    async def get_sku(request: Request) -> Response:
        admin(request)
        view = await services.inventory.get_sku(_sku_id(request))
        if view is None:
            raise errors.UnknownSku("no such SKU")
        return MsgspecResponse(view)

    async def get_sku_changes(request: Request) -> Response:
        """The SKU's configuration changes, newest first: `?limit=` 1-100, default 20."""
        admin(request)
        sku_id = _sku_id(request)
        raw = request.query_params.get("limit", "20")
        if not _LIMIT.match(raw) or not 1 <= int(raw) <= CHANGES_SHOWN_MAX:
            raise errors.InvalidRequest(f"limit must be an integer from 1 to {CHANGES_SHOWN_MAX}")
        changes = await services.inventory.sku_changes(sku_id, int(raw))
        if changes is None:
            raise errors.UnknownSku("no such SKU")
        return MsgspecResponse(SkuChanges(sku_id=sku_id, changes=changes))

    return [
        Resource("/api/v1/admin/skus/{sku_id}", (CONFIGURE_SKU, put_sku), (GET_SKU, get_sku)),
        Resource("/api/v1/admin/skus/{sku_id}/changes", (GET_SKU_CHANGES, get_sku_changes)),
    ]


def draw_routes(services: Services) -> list[Resource]:
    """`/api/v1/admin/skus/{sku_id}/draw`: a fair start's draw, revealed once done."""

    def admin(request: Request) -> Operator:
        return require_admin(request, services.settings.admin_token, services.admin_refusals)

    async def get_draw(request: Request) -> Response:
        admin(request)
        sku_id = _sku_id(request)
        draws = services.inventory.draws
        view = await draws.view(sku_id)
        if view is not None:
            return MsgspecResponse(view)
        exists, state, _ = await draws.state(sku_id)
        if not exists:
            raise errors.UnknownSku("no such SKU")
        if state is None:
            raise errors.NoDraw()
        raise errors.DrawPending(draw=state)

    return [Resource("/api/v1/admin/skus/{sku_id}/draw", (GET_DRAW, get_draw))]

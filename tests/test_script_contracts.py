"""Each Lua script's header against its builder (gateway/store/calls.py) and its reply type
(gateway/store/outcomes.py): KEYS count and key shapes, ARGV names and positions, the codes
and fields of `Returns`. No Redis needed: a header, a builder or an enum that drifts fails."""

from __future__ import annotations

import inspect
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import IntEnum
from pathlib import Path
from typing import Any

import pytest

from gateway.store import calls, outcomes
from gateway.store.keys import SkuKeys
from gateway.transport.scripts import ScriptRegistry

LUA = Path(__file__).resolve().parents[1] / "lua"

_KEY = re.compile(r"KEYS\[(\d+)\] (\S+) \(([a-z]+)(, optional)?\)")
_ARGV = re.compile(r"ARGV\[(\d+)(\.\.)?\] ([a-z_][a-z0-9_]*)")
_RETURNS = re.compile(r"Returns (\{[^}]*\}|[a-z_]+)")
_CODE = re.compile(r"(?<![\w.\[])(-?\d+) ([A-Z][A-Z_]+)\b")


@dataclass(frozen=True)
class Header:
    keys: list[tuple[str, str, bool]]  # (pattern, type, optional), KEYS[1] first
    argv: list[str]  # ARGV names, ARGV[1] first
    variadic: bool  # the last ARGV name stands for ARGV[n..]
    shape: list[str]  # the reply's fields ({a, b}) or its one name
    codes: dict[int, str]


def header(source: str) -> Header:
    text = source[source.index("--[[") : source.index("]]")]
    ks = [(int(i), pattern, kind, bool(opt)) for i, pattern, kind, opt in _KEY.findall(text)]
    assert [i for i, *_ in ks] == list(range(1, len(ks) + 1)), "KEYS[n] each once, in order"
    argv = [(int(i), bool(dots), name) for i, dots, name in _ARGV.findall(text)]
    assert [i for i, *_ in argv] == list(range(1, len(argv) + 1)), "ARGV[n] each once, in order"
    assert not any(dots for _, dots, _ in argv[:-1]), "only the last ARGV may be ARGV[n..]"
    returns = _RETURNS.search(text)
    assert returns is not None, "no Returns line"
    shape = [f.strip() for f in returns.group(1).strip("{}").split(",")]
    codes = {int(v): name for v, name in _CODE.findall(text[returns.start() :])}
    return Header(
        keys=[(p, kind, opt) for _, p, kind, opt in ks],
        argv=[name for _, _, name in argv],
        variadic=bool(argv and argv[-1][1]),
        shape=shape,
        codes=codes,
    )


SK = SkuKeys("s1")


@dataclass(frozen=True)
class Contract:
    build: Callable[..., calls.Call]
    sample: dict[str, Any]  # every parameter, optional keys included
    without_optional: dict[str, Any] = field(default_factory=dict)  # overrides dropping them
    codes: type[IntEnum] | None = None
    reply: type[Any] | None = None  # a NamedTuple: its fields are the Returns fields


CONTRACTS = {
    "create_order": Contract(
        calls.create_order,
        dict(
            sku=SK, idempotency_key="k1", guarded=True, order_id="abc.s1", user_id="u1",
            sku_id="s1", quantity=2, promotion_id="p1", fingerprint="s1|2|p1", hold_ttl_ms=900,
            idempotency_ttl_ms=8000, now_ms=None, mode="hold", queue_max=50,
            accepted_member="k1:u1", claim_token="", replay_only=False, buckets=1, durable=False,
        ),
        dict(guarded=False),
        codes=outcomes.CreateResult,
    ),
    "claim_key": Contract(
        calls.claim_key,
        dict(guard="fg:{u:u1}:ik:k1", token="t1", fingerprint="s1|2|p1", stale_ms=5, ttl_ms=9,
             now_ms=3),
        reply=outcomes.ClaimReply,
        codes=outcomes.Claim,
    ),
    "settle_key": Contract(
        calls.settle_key,
        dict(guard="fg:{u:u1}:ik:k1", token="t1", outcome="done", fingerprint="f", ttl_ms=9),
        codes=outcomes.Settled,
    ),
    "fence_key": Contract(
        calls.fence_key,
        dict(record=SK.idempotency("u1", "k1"), token="t1", ttl_ms=9, tokens_kept=16),
        codes=outcomes.Fenced,
    ),
    "claim_guard": Contract(calls.claim_guard, dict(guard="fg:{p:pay1}", value="abc.s1")),
    "release_guard": Contract(
        calls.release_guard, dict(guard="fg:{p:pay1}", value="abc.s1"), codes=outcomes.Released
    ),
    "confirm_payment": Contract(
        calls.confirm_payment,
        dict(sku=SK, guard="fg:{p:pay1}", payment_id="pay1", order_id="abc.s1", now_ms=None,
             durable=True),
        dict(guard=None),
        codes=outcomes.PaymentResult,
    ),
    "configure_sku": Contract(
        calls.configure_sku,
        dict(
            sku=SK, promotion_id="p1", stock=10, per_user_limit=2, starts_at=None, ends_at=5,
            by="op", client="", changes_kept=1000, stock_mode="set", buckets=1, total_stock=None,
            log_change=True, prequeue_s=60, draw_seed="ab" * 32, draw_commitment="cd" * 32,
        ),
        codes=outcomes.ConfigureResult,
    ),
    "draw_open": Contract(
        calls.draw_open, dict(sku=SK, now_ms=None), reply=outcomes.DrawOpened,
        codes=outcomes.DrawState,
    ),
    "draw_decide": Contract(
        calls.draw_decide,
        dict(sku=SK, cursor=0, hold_ttl_ms=900, now_ms=None, orders_prefix=SK.orders_prefix,
             order_ids=["abc.s1", "def.s1"]),
        reply=outcomes.DrawBatch,
        codes=outcomes.DrawDecided,
    ),
    "audit_sku": Contract(
        calls.audit_sku, dict(sku=SK, orders_prefix=SK.orders_prefix), reply=outcomes.AuditFigures
    ),
    "take_stock": Contract(
        calls.take_stock,
        dict(bucket=SK, transfer_id="tr1", units=3, to_tag="s1~1~0", now_ms=None),
        reply=outcomes.Taken,
    ),
    "give_stock": Contract(
        calls.give_stock,
        dict(bucket=SK, transfer_id="tr1", units=3, now_ms=None, received_kept_ms=60_000),
        codes=outcomes.Given,
    ),
    "finalize": Contract(
        calls.finalize,
        dict(sku=SK, stream=SK.stream, group="g", entry_id=b"1-0", event="paid",
             order_id="abc.s1", payment_id="pay1", hold_ttl_ms=900, now_ms=None),
        dict(event="created", payment_id=""),
        reply=outcomes.Finalized,
        codes=outcomes.FinalizeResult,
    ),
    "read_order": Contract(
        calls.read_order, dict(order=SK.order("abc.s1"), sku=SK), reply=outcomes.OrderRead
    ),
    "dead_letter": Contract(
        calls.dead_letter,
        dict(sku=SK, stream=SK.stream, order_id="abc.s1", group="g", entry_id=b"1-0",
             reason="bad", fields=[b"event", b"created"]),
        dict(order_id=None),
        codes=outcomes.DeadLettered,
    ),
    "replay_dead": Contract(
        calls.replay_dead,
        dict(sku=SK, dead_id=b"1-0"),
        reply=outcomes.ReplayReply,
        codes=outcomes.Replayed,
    ),
    "relay_read": Contract(
        calls.relay_read,
        dict(events=SK.events, group="relay:webhook:1a2b3c4d", consumer="c1", count=200,
             min_idle_ms=60_000),
        codes=outcomes.RelayRead,
    ),
    "relay_dead": Contract(
        calls.relay_dead,
        dict(sku=SK, group="relay:webhook:1a2b3c4d", entry_id=b"1-0", event_id="s1/0/1-0",
             reason="refused", fields=[b"event", b"CONFIRMED"]),
        codes=outcomes.RelayDead,
    ),
    "sku_figures": Contract(
        calls.sku_figures, dict(sku=SK, group="finalizers", streams=1), reply=outcomes.SkuFigures
    ),
    "sweep": Contract(
        calls.sweep,
        dict(sku=SK, now_ms=None, batch=100, orders_prefix=SK.orders_prefix, skip=0),
        reply=outcomes.Swept,
    ),
    "switch_mode": Contract(
        calls.switch_mode,
        dict(mode="QUEUE_ONLY", channel="fg:notices", history_kept=100, by="op", client=""),
        reply=outcomes.ModeChange,
    ),
    "set_rules": Contract(
        calls.set_rules,
        dict(expected_version=3, rules=b'{"qps":1}', channel="fg:notices", history_kept=20,
             by="op", client=""),
        reply=outcomes.RulesChange,
        codes=outcomes.RulesResult,
    ),
}  # fmt: skip

SCRIPTS = sorted(p.stem for p in LUA.glob("*.lua"))


def test_every_script_has_one_builder_and_every_builder_a_script() -> None:
    assert sorted(CONTRACTS) == SCRIPTS
    for name, contract in CONTRACTS.items():
        assert contract.build.__name__ == name
        assert getattr(calls, name) is contract.build


def _argv_params(contract: Contract, argv: list[str]) -> list[str]:
    """The builder's parameters that are ARGV: the last len(argv) ones."""
    params = list(inspect.signature(contract.build).parameters.values())
    assert sorted(p.name for p in params) == sorted(contract.sample), "sample: every parameter"
    tail = params[len(params) - len(argv) :] if argv else []
    head = params[: len(params) - len(argv)]
    assert all(p.kind is not p.KEYWORD_ONLY for p in head), "key inputs come before ARGV"
    return [p.name for p in tail]


def _other(value: Any) -> Any:
    """A different value of the same kind."""
    if isinstance(value, bool):
        return not value
    if value is None or isinstance(value, int):
        return 7 if value is None else value + 1
    if isinstance(value, str):
        return value + "x"
    if isinstance(value, bytes):
        return value + b"x"
    if isinstance(value, list):
        return [*value, b"x"]
    raise AssertionError(f"no other value for {value!r}")


@pytest.mark.parametrize("name", SCRIPTS)
def test_argv_names_and_positions_match_the_header(name: str) -> None:
    h = header((LUA / f"{name}.lua").read_text(encoding="utf-8"))
    contract = CONTRACTS[name]
    assert _argv_params(contract, h.argv) == h.argv
    _, base = contract.build(**contract.sample)
    fixed = len(h.argv) - 1 if h.variadic else len(h.argv)
    assert len(base) == fixed + (len(contract.sample[h.argv[-1]]) if h.variadic else 0)
    for i, arg in enumerate(h.argv):  # each field moves its own ARGV and no other
        _, moved = contract.build(**{**contract.sample, arg: _other(contract.sample[arg])})
        if h.variadic and i == fixed:
            assert moved[:fixed] == base[:fixed] and moved[fixed:] != base[fixed:], arg
        else:
            changed = [j for j, (a, b) in enumerate(zip(base, moved, strict=True)) if a != b]
            assert changed == [i], f"{arg} is ARGV[{i + 1}], the builder moved {changed}"


def _key_regex(pattern: str) -> re.Pattern[str]:
    rx = re.escape(pattern).replace(r"\{S\}", r"\{[^{}]+\}").replace(r"\{B\}", r"\{[^{}]+\}")
    return re.compile(re.sub(r"<[a-z_]+>", "[^:{}]+", rx) + r"\Z")


@pytest.mark.parametrize("name", SCRIPTS)
def test_keys_match_the_header(name: str) -> None:
    h = header((LUA / f"{name}.lua").read_text(encoding="utf-8"))
    contract = CONTRACTS[name]
    ks, _ = contract.build(**contract.sample)
    assert len(ks) == len(h.keys) == ScriptRegistry(LUA)[name].max_keys
    for i, (key, (pattern, _, _)) in enumerate(zip(ks, h.keys, strict=True)):
        assert _key_regex(pattern).match(key), f"KEYS[{i + 1}] {key!r} is not {pattern}"
    required = [k for k in h.keys if not k[2]]
    assert h.keys[: len(required)] == required, "optional keys come last"
    ks, _ = contract.build(**{**contract.sample, **contract.without_optional})
    assert len(ks) == len(required)


@pytest.mark.parametrize("name", SCRIPTS)
def test_returns_match_the_outcome(name: str) -> None:
    h = header((LUA / f"{name}.lua").read_text(encoding="utf-8"))
    contract = CONTRACTS[name]
    expected = {} if contract.codes is None else {m.value: m.name for m in contract.codes}
    assert h.codes == expected
    if contract.reply is not None:
        assert list(contract.reply._fields) == h.shape
    elif len(h.shape) > 1:
        assert h.shape[0] == "code" and contract.codes is not None, h.shape


def test_a_drifted_header_fails() -> None:
    """The checks above read what they are meant to: a swapped ARGV, a renamed code."""
    source = (LUA / "create_order.lua").read_text(encoding="utf-8")
    h = header(source)
    swapped = header(source.replace("ARGV[7] hold_ttl_ms", "ARGV[7] idempotency_ttl_ms", 1))
    assert swapped.argv != h.argv
    assert header(source.replace("-3 SOLD_OUT", "-3 GONE", 1)).codes != h.codes
    with pytest.raises(AssertionError):
        header(source.replace("KEYS[2] fg", "KEYS[3] fg", 1))

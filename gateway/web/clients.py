"""The client's address: the peer's, or, behind a trusted proxy, the one its headers name.

`FLASHGATE_TRUSTED_PROXIES` lists the proxies in front (addresses, CIDRs). Only when the peer
is one of them are `X-Forwarded-For` or, when there is none, `Forwarded` (RFC 7239, its `for=`)
read: every header of that name, in order, as one list of hops, each proxy having appended
the address it saw. The client is the right-most hop that is not a trusted proxy (hops left of
it are whatever the client sent, never looked at); when every hop is a proxy, the left-most.
A hop that is not an address (`unknown`, an obfuscated name, garbage) where the walk needs it
makes the whole header ignored: the client is then the peer. Nothing here raises on input.

A proxy that appends to one header passes the other through untouched: it should strip or set
the one it does not write, or a client could name itself in it (`X-Forwarded-For` wins when
both are there, as most proxies write that one).
"""

from __future__ import annotations

import ipaddress

from starlette.types import Scope

from gateway.setting import proxy_networks

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
CLIENT = "flashgate.client"  # the scope's client address, set by `front.GatewayApp`
KNOWN_MAX = 4096  # peers whose trust is remembered before the memo starts again


def parse_hop(text: str) -> IPAddress | None:
    """One hop's address: `1.2.3.4`, `1.2.3.4:80`, `2001:db8::1`, `[2001:db8::1]:80` (quotes
    around it allowed); None for anything else."""
    t = text.strip()
    if len(t) >= 2 and t[0] == '"' and t[-1] == '"':
        t = t[1:-1]
    if t.startswith("["):
        host, bracket, port = t[1:].partition("]")
        if not bracket or (port and not (port[0] == ":" and port[1:].isdecimal())):
            return None
    elif t.count(":") == 1:
        host, _, port = t.partition(":")
        if not port.isdecimal():
            return None
    else:
        host = t
    try:
        return ipaddress.ip_address(host)
    except ValueError:
        return None


def forwarded_for(value: str) -> list[str]:
    """The `for=` of each element of a `Forwarded` value, in order ("" where there is none)."""
    hops = []
    for element in value.split(","):
        found = ""
        for pair in element.split(";"):
            name, eq, given = pair.partition("=")
            if eq and name.strip().lower() == "for":
                found = given.strip()
        hops.append(found)
    return hops


class ClientAddress:
    """`of(scope)`: the client's address for one request ("" when unknown)."""

    def __init__(self, trusted_proxies: str) -> None:
        self.networks = proxy_networks(trusted_proxies)
        self._known: dict[str, bool] = {}  # peer text -> trusted

    def of(self, scope: Scope) -> str:
        client = scope.get("client")
        peer = client[0] if client else ""
        if not isinstance(peer, str):
            return ""
        if not self.networks or not self.trusted_peer(peer):
            return peer
        return self.forwarded(scope["headers"], peer)

    def trusted_peer(self, peer: str) -> bool:
        known = self._known.get(peer)
        if known is None:
            ip = parse_hop(peer)
            known = ip is not None and self.trusted(ip)
            if len(self._known) >= KNOWN_MAX:
                self._known.clear()
            self._known[peer] = known
        return known

    def trusted(self, ip: IPAddress) -> bool:
        return any(ip in net for net in self.networks)

    def forwarded(self, headers: list[tuple[bytes, bytes]], peer: str) -> str:
        """The client a trusted peer names in its headers; `peer` when they name none."""
        xff = [v for k, v in headers if k == b"x-forwarded-for"]
        if xff:
            hops = b",".join(xff).decode("latin-1").split(",")
        else:
            fwd = [v for k, v in headers if k == b"forwarded"]
            if not fwd:
                return peer
            hops = forwarded_for(b",".join(fwd).decode("latin-1"))
        leftmost: IPAddress | None = None
        for hop in reversed(hops):
            ip = parse_hop(hop)
            if ip is None:
                return peer  # malformed where it matters: ignored
            if not self.trusted(ip):
                return str(ip)
            leftmost = ip
        return str(leftmost) if leftmost is not None else peer

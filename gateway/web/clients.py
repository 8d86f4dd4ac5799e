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

from socket import AF_INET, AF_INET6, inet_ntop, inet_pton

from starlette.types import Scope

from gateway.setting import proxy_networks

CLIENT = "flashgate.client"  # the scope's client address, set by `front.GatewayApp`
KNOWN_MAX = 4096  # hops whose reading is remembered before the memo starts again


def _packed(host: str) -> tuple[int, bytes] | None:
    try:
        if ":" in host:
            return AF_INET6, inet_pton(AF_INET6, host.partition("%")[0])  # no zone
        return AF_INET, inet_pton(AF_INET, host)
    except (OSError, ValueError):  # ValueError: a NUL inside
        return None


def parse_hop(text: str) -> str | None:
    """One hop's address in its canonical text: from `1.2.3.4`, `1.2.3.4:80`, `2001:db8::1`,
    `[2001:db8::1]:80` (quotes around it allowed); None for anything else."""
    found = _hop(text)
    return None if found is None else inet_ntop(*found)


def _hop(text: str) -> tuple[int, bytes] | None:
    t = text.strip()
    if len(t) >= 2 and t[0] == '"' and t[-1] == '"':
        t = t[1:-1]
    if t.startswith("["):
        host, bracket, port = t[1:].partition("]")
        if (
            not bracket
            or ":" not in host
            or (port and not (port[0] == ":" and port[1:].isdecimal()))
        ):
            return None
    elif t.count(":") == 1:
        host, _, port = t.partition(":")
        if not port.isdecimal():
            return None
    else:
        host = t
    return _packed(host)


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
        # (family, network as an integer, mask): a membership test without ipaddress objects
        self._nets = [
            (AF_INET if net.version == 4 else AF_INET6, int(net.network_address), int(net.netmask))
            for net in self.networks
        ]
        self._peers: dict[str, bool] = {}  # peer text -> trusted
        self._hops: dict[str, tuple[str, bool] | None] = {}  # hop text -> (address, trusted)

    def of(self, scope: Scope) -> str:
        client = scope.get("client")
        peer = client[0] if client else ""
        if not isinstance(peer, str):
            return ""
        if not self._nets or not self.trusted_peer(peer):
            return peer
        return self.forwarded(scope["headers"], peer)

    def trusted_peer(self, peer: str) -> bool:
        known = self._peers.get(peer)
        if known is None:
            found = _packed(peer)
            known = found is not None and self.trusted(found)
            if len(self._peers) >= KNOWN_MAX:
                self._peers.clear()
            self._peers[peer] = known
        return known

    def trusted(self, found: tuple[int, bytes]) -> bool:
        family, packed = found
        n = int.from_bytes(packed, "big")
        return any(f == family and n & mask == net for f, net, mask in self._nets)

    def hop(self, text: str) -> tuple[str, bool] | None:
        """A hop's canonical address and whether it is a trusted proxy (None: not an address);
        remembered, as the same clients and proxies come again and again."""
        try:
            return self._hops[text]
        except KeyError:
            pass
        found = _hop(text)
        read = None if found is None else (inet_ntop(*found), self.trusted(found))
        if len(self._hops) >= KNOWN_MAX:
            self._hops.clear()
        self._hops[text] = read
        return read

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
        leftmost = peer
        for text in reversed(hops):
            read = self.hop(text)
            if read is None:
                return peer  # malformed where it matters: ignored
            address, trusted = read
            if not trusted:
                return address
            leftmost = address
        return leftmost

"""The client's address as a caller id, for anonymous callers.

``X-Forwarded-For`` is believed only from ``identity.trusted_proxies``; an IPv6 client is keyed by
its network (``identity.ipv6_prefix``, default /64).
"""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence

from quota_middleware.base._request import RequestInfo
from quota_middleware.errors import ConfigurationError

__all__ = ["IPAddress", "Network", "client_id", "parse_ip", "parse_networks"]

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
Network = ipaddress.IPv4Network | ipaddress.IPv6Network
_XFF_MAX_HOPS = 32


def parse_ip(text: str) -> IPAddress | None:
    """An address from a peer or X-Forwarded-For entry (ports and brackets stripped), else None.

    IPv4-mapped IPv6 becomes IPv4, so one client is one caller whichever stack accepted it.
    """
    text = text.strip()
    if not text or len(text) > 64:
        return None
    if text.startswith("["):
        end = text.find("]")
        text = text[1:end] if end > 0 else ""
    elif text.count(":") == 1:
        text = text.split(":", 1)[0]
    try:
        addr = ipaddress.ip_address(text)
    except ValueError:
        return None
    if isinstance(addr, ipaddress.IPv6Address):
        if addr.ipv4_mapped is not None:
            return addr.ipv4_mapped
        if addr.scope_id is not None:
            return ipaddress.IPv6Address(int(addr))
    return addr


def parse_networks(trusted_proxies: Sequence[str], where: str) -> tuple[Network, ...]:
    """``identity.trusted_proxies`` (CIDRs, host bits allowed) as networks."""
    if isinstance(trusted_proxies, str):
        raise ConfigurationError(where, "must be a list of CIDRs")
    nets = []
    for i, cidr in enumerate(trusted_proxies):
        try:
            nets.append(ipaddress.ip_network(cidr, strict=False))
        except (ValueError, TypeError):
            raise ConfigurationError(f"{where}[{i}]", f"not an IP network: {cidr!r}") from None
    return tuple(nets)


def client_id(
    info: RequestInfo,
    networks: Sequence[Network],
    ipv6_prefix: int,
    peer_ids: dict[str, str],
) -> str:
    """The client's IP (or IPv6 network), walking X-Forwarded-For through trusted proxies.

    ``peer_ids`` caches the ids of untrusted peers by ``info.client``: only their id depends on
    the peer alone.
    """
    cached = peer_ids.get(info.client) if info.client else None
    if cached is not None:
        return cached
    peer = parse_ip(info.client) if info.client else None
    if peer is None:
        # Not an IP (a unix socket, a test client name): the server's label is all we have.
        raw = info.client or ""
        return raw if raw.isascii() and raw.isprintable() and 0 < len(raw) <= 64 else "unknown"
    addr = peer
    if not _trusted(peer, networks):
        # Only an untrusted peer's id depends on the peer alone (no header): worth caching,
        # as parsing addresses is most of the cost of identifying an anonymous caller.
        if len(peer_ids) >= 10_000:
            peer_ids.clear()
        caller_id = _format(peer, ipv6_prefix)
        peer_ids[info.client or ""] = caller_id
        return caller_id
    if _trusted(peer, networks):
        hops = ",".join(info.headers.getlist("x-forwarded-for")).split(",")
        for entry in reversed(hops[-_XFF_MAX_HOPS:]):
            nxt = parse_ip(entry)
            if nxt is None:
                break
            addr = nxt
            if not _trusted(nxt, networks):
                break
    return _format(addr, ipv6_prefix)


def _format(addr: IPAddress, ipv6_prefix: int) -> str:
    if isinstance(addr, ipaddress.IPv6Address):
        return str(ipaddress.IPv6Network((addr, ipv6_prefix), strict=False))
    return str(addr)


def _trusted(addr: IPAddress, networks: Sequence[Network]) -> bool:
    return any(addr in net for net in networks)

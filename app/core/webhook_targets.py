"""Where a webhook may be sent: public http(s) addresses only, checked on every address the name resolves to.

The check runs at registration and again before each send; the send then connects to the address that was
checked (the URL's host swapped for the IP, the name kept in the Host header and as TLS SNI, so the
certificate is still verified against the name). A name that resolves elsewhere between the check and the
connection (DNS rebinding) therefore cannot redirect the request.
"""

from __future__ import annotations

import ipaddress
import socket
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import httpx

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
ALLOWED_SCHEMES = ("http", "https")


class TargetForbidden(ValueError):
    """The URL is not a permitted webhook target; the message says why."""


class TargetUnresolvable(ValueError):
    """The host name does not resolve (perhaps for now)."""


@dataclass(frozen=True)
class PinnedTarget:
    url: httpx.URL
    ips: tuple[str, ...]  # every address the host resolved to, all checked, in resolver order

    def request_args(self, ip: str) -> dict[str, Any]:
        """URL, Host header and SNI so that the connection goes to `ip` and nowhere else."""
        return {
            "url": self.url.copy_with(host=ip),
            "headers": {"Host": self.url.netloc.decode("ascii")},
            "extensions": {"sni_hostname": self.url.host} if self.url.scheme == "https" else {},
        }


def forbidden_reason(ip: IPAddress) -> str | None:
    """Why this address is not a public unicast one, else None. Embedded IPv4 (mapped, 6to4) is unwrapped."""
    if isinstance(ip, ipaddress.IPv6Address):
        embedded = ip.ipv4_mapped or ip.sixtofour
        if embedded is not None:
            return forbidden_reason(embedded)
    checks = (
        ("unspecified", ip.is_unspecified),
        ("loopback", ip.is_loopback),
        ("link-local", ip.is_link_local),
        ("multicast", ip.is_multicast),
        ("private", ip.is_private),
        ("reserved", ip.is_reserved),
        ("not globally routable", not ip.is_global),
    )
    return next((name for name, matches in checks if matches), None)


def resolve_target(url: str, *, allow_private: bool) -> PinnedTarget:
    """Check the URL's shape and every address its host resolves to; returns the address to connect to."""
    parts = urlsplit(url)
    if parts.scheme.lower() not in ALLOWED_SCHEMES:
        raise TargetForbidden(f"scheme {parts.scheme!r} is not allowed; use http or https")
    if "@" in parts.netloc:
        raise TargetForbidden("credentials in the URL are not allowed; authenticate with the signature")
    if not parts.hostname:
        raise TargetForbidden("the URL has no host")
    addresses = _resolve(parts.hostname, parts.scheme.lower())
    for ip in addresses if not allow_private else ():
        reason = forbidden_reason(ip)
        if reason is not None:
            raise TargetForbidden(f"{parts.hostname} resolves to {ip}, a {reason} address")
    try:
        parsed = httpx.URL(url)
    except httpx.InvalidURL as exc:
        raise TargetForbidden(f"invalid URL: {exc}") from exc
    return PinnedTarget(url=parsed, ips=tuple(str(ip) for ip in addresses))


def _resolve(host: str, scheme: str) -> list[IPAddress]:
    try:
        infos = socket.getaddrinfo(host, 443 if scheme == "https" else 80, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError) as exc:
        raise TargetUnresolvable(f"{host} does not resolve: {exc}") from exc
    # A scoped IPv6 address (fe80::1%eth0) carries its zone after '%'; the address itself decides.
    addresses = [ipaddress.ip_address(str(info[4][0]).split("%", 1)[0]) for info in infos]
    if not addresses:
        raise TargetUnresolvable(f"{host} has no addresses")
    return list(dict.fromkeys(addresses))

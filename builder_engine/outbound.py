"""Outbound HTTP to customer endpoints (webhook tools, event webhooks), guarded against SSRF.

Every request goes through ``post_json``/``send``:

* only ``http``/``https`` URLs without credentials;
* the host is resolved and **every** address checked: private, loopback, link-local,
  shared (CGNAT), multicast, reserved and unspecified addresses are refused (also when
  wrapped as IPv4-mapped, 6to4 or Teredo IPv6), unless the organization's
  ``outbound_allowlist`` names the host, the address or a network holding it;
* the connection goes to the address that was checked (the URL's host travels in the
  ``Host`` header and as TLS SNI, so certificates are still verified against the name):
  a DNS answer that changes between the check and the connection (rebinding) cannot
  redirect the request;
* redirects are not followed (a 3xx is returned as is), the response body is read up to
  a size limit, and the whole exchange has one timeout.

Signing: ``signature_headers`` adds ``Builder-Signature: t=<unix seconds>,v1=<hex>`` (HMAC-SHA256
of ``"{t}.{body}"`` with the secret), the same header webhook events carry
(builder_engine/webhooks.py, docs/webhooks.md).
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass

import httpx

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
Resolver = Callable[[str, int], Awaitable[list[str]]]

DEFAULT_MAX_RESPONSE_BYTES = 64 * 1024
USER_AGENT = "BuilderEngine/0.1 (+https://builder-engine.dev)"


class OutboundRefused(Exception):
    """The destination may not be called (SSRF guard) or the URL is unusable."""


@dataclass(frozen=True)
class Allowlist:
    """Private destinations an organization allows: host names, addresses, networks."""

    hosts: frozenset[str] = frozenset()
    networks: tuple[IPNetwork, ...] = ()

    @classmethod
    def parse(cls, entries: Iterable[str]) -> Allowlist:
        hosts: set[str] = set()
        networks: list[IPNetwork] = []
        for raw in entries:
            entry = raw.strip().lower()
            if not entry:
                continue
            try:
                networks.append(ipaddress.ip_network(entry.strip("[]"), strict=False))
            except ValueError:
                hosts.add(entry.rstrip("."))
        return cls(frozenset(hosts), tuple(networks))

    def allows_host(self, host: str) -> bool:
        return host.lower().rstrip(".") in self.hosts

    def allows_address(self, address: IPAddress) -> bool:
        return any(address.version == n.version and address in n for n in self.networks)


def _embedded_ipv4(address: ipaddress.IPv6Address) -> ipaddress.IPv4Address | None:
    if address.ipv4_mapped is not None:
        return address.ipv4_mapped
    if address.sixtofour is not None:
        return address.sixtofour
    if address.teredo is not None:
        return address.teredo[1]
    return None


def is_public(address: IPAddress) -> bool:
    """True for a globally routable unicast address (what a public endpoint has)."""
    if isinstance(address, ipaddress.IPv6Address):
        inner = _embedded_ipv4(address)
        if inner is not None and not is_public(inner):
            return False
    return bool(address.is_global) and not (
        address.is_multicast or address.is_reserved or address.is_unspecified
    )


async def system_resolver(host: str, port: int) -> list[str]:
    loop = asyncio.get_running_loop()
    try:
        infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        raise OutboundRefused(f"cannot resolve {host}: {exc.strerror}") from None
    return [str(info[4][0]) for info in infos]


@dataclass(frozen=True)
class Destination:
    """A checked URL: connect to ``address``; ``host`` goes in the Host header and SNI."""

    url: httpx.URL
    host: str
    address: IPAddress

    @property
    def pinned_url(self) -> httpx.URL:
        return self.url.copy_with(host=str(self.address))

    @property
    def host_header(self) -> str:
        default = 443 if self.url.scheme == "https" else 80
        port = self.url.port
        host = f"[{self.host}]" if ":" in self.host else self.host
        return host if port in (None, default) else f"{host}:{port}"


async def check_destination(
    url: str, allowlist: Allowlist, *, resolver: Resolver = system_resolver
) -> Destination:
    """Resolve ``url``'s host and check every address; raises ``OutboundRefused``."""
    try:
        parsed = httpx.URL(url)
    except (httpx.InvalidURL, TypeError) as exc:
        raise OutboundRefused(f"not a valid URL: {exc}") from None
    if parsed.scheme not in ("http", "https"):
        raise OutboundRefused(f"only http and https URLs may be called, not {parsed.scheme!r}")
    if parsed.userinfo:
        raise OutboundRefused("URLs with credentials are not allowed")
    host = parsed.host
    if not host:
        raise OutboundRefused("the URL has no host")
    port = parsed.port or (443 if parsed.scheme == "https" else 80)
    try:
        literal: IPAddress | None = ipaddress.ip_address(host)
    except ValueError:
        literal = None
    raw = [str(literal)] if literal is not None else await resolver(host, port)
    addresses: list[IPAddress] = []
    for text in raw:
        try:
            addresses.append(ipaddress.ip_address(text.split("%", 1)[0]))
        except ValueError:
            raise OutboundRefused(f"{host} resolved to an invalid address {text!r}") from None
    if not addresses:
        raise OutboundRefused(f"{host} has no address")
    host_allowed = literal is None and allowlist.allows_host(host)
    for address in addresses:
        if not (is_public(address) or host_allowed or allowlist.allows_address(address)):
            shown = host if literal is not None else f"{host} ({address})"
            raise OutboundRefused(
                f"{shown} is a private, loopback or link-local address; add it to the "
                "organization's outbound allowlist to call it"
            )
    return Destination(parsed, host, addresses[0])


def signature_headers(secret: str, body: bytes, *, now: float | None = None) -> dict[str, str]:
    """The same signature as webhook events (one verification recipe for both)."""
    from builder_engine.webhooks import SIGNATURE_HEADER, signature_header

    return {SIGNATURE_HEADER: signature_header(secret, body, None if now is None else int(now))}


@dataclass(frozen=True)
class OutboundResponse:
    status: int
    headers: Mapping[str, str]
    body: bytes
    truncated: bool

    @property
    def content_type(self) -> str:
        return self.headers.get("content-type", "").split(";", 1)[0].strip().lower()


async def send(
    client: httpx.AsyncClient,
    method: str,
    url: str,
    *,
    body: bytes,
    headers: Mapping[str, str],
    allowlist: Allowlist,
    timeout_s: float,
    max_response_bytes: int = DEFAULT_MAX_RESPONSE_BYTES,
    resolver: Resolver = system_resolver,
) -> OutboundResponse:
    """One request to a checked destination. Raises ``OutboundRefused``, ``TimeoutError``
    (the whole exchange took longer than ``timeout_s``) or ``httpx.HTTPError``."""

    async def exchange() -> OutboundResponse:
        destination = await check_destination(url, allowlist, resolver=resolver)
        request = client.build_request(
            method,
            destination.pinned_url,
            content=body,
            headers={"User-Agent": USER_AGENT, **headers, "Host": destination.host_header},
            extensions={"sni_hostname": destination.host},
        )
        response = await client.send(request, stream=True, follow_redirects=False)
        try:
            chunks: list[bytes] = []
            size = 0
            truncated = False
            async for chunk in response.aiter_bytes():
                room = max_response_bytes - size
                if len(chunk) > room:
                    chunks.append(chunk[:room])
                    truncated = True
                    break
                chunks.append(chunk)
                size += len(chunk)
            return OutboundResponse(
                response.status_code, dict(response.headers), b"".join(chunks), truncated
            )
        finally:
            await response.aclose()

    return await asyncio.wait_for(exchange(), timeout_s)


def new_client() -> httpx.AsyncClient:
    """A client for ``send``: no proxies from the environment, no redirects."""
    return httpx.AsyncClient(
        trust_env=False,
        follow_redirects=False,
        timeout=httpx.Timeout(None),
        limits=httpx.Limits(max_connections=200, max_keepalive_connections=20),
    )

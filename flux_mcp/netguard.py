"""Guarded server-side URL fetches: the server downloads a URL without becoming a way into the network.

Where the server itself downloads (local-backend input URLs, LoRA files) a caller could otherwise make
it reach what only the server can reach: ``http://127.0.0.1:…`` admin ports, the home router, the
cloud metadata service at 169.254.169.254. So every fetch here

1. accepts http and https only, and no ``user:password@`` in the URL;
2. resolves the host name once (``getaddrinfo`` in a worker thread; this also turns spellings such as
   ``2130706433``, ``0177.0.0.1`` and ``127.1`` into the address they mean) and checks EVERY address;
3. connects to a checked address, never to the name again, so DNS cannot answer differently between
   check and connect (``_PinnedBackend``); TLS still verifies the certificate against the host name;
4. follows redirects itself, repeating 1–3 for each hop, at most ``max_redirects`` of them;
5. stops at ``max_bytes`` while streaming and at an overall deadline.

Address policy (``check_address``):

- always refused: unspecified (0.0.0.0/8, ::), multicast, reserved/unallocated, documentation and other
  special-purpose ranges, and the cloud metadata addresses (169.254.169.254, 169.254.170.2,
  169.254.170.23, 100.100.100.200, fd00:ec2::254, fd00:ec2::23);
- refused unless ``allow_private`` (FLUX_MCP_ALLOW_PRIVATE_URLS=true): loopback, private (RFC 1918,
  fc00::/7), link-local, carrier-grade NAT 100.64.0.0/10 (Tailscale lives there) and 198.18.0.0/15;
- IPv6 forms that carry an IPv4 address (IPv4-mapped ``::ffff:a.b.c.d``, 6to4 ``2002::/16``, NAT64
  ``64:ff9b::/96``) are judged by the IPv4 address inside; the obsolete IPv4-compatible ``::a.b.c.d``
  and IPv4-translated ``::ffff:0:a.b.c.d`` forms are always refused.

The metadata addresses stay refused with ``allow_private``: that setting exists so images and LoRAs
can come from a NAS or a model mirror on a trusted LAN, and no such server lives on a metadata
address, while fetching one hands the instance's cloud credentials to whoever picked the URL.

Proxy variables (HTTP_PROXY, …) are not used here on purpose: the guard must know the address it
connects to. This module knows nothing about images, LoRAs, MCP or the backends; callers pass the
limits and the names of the settings that raise them, so messages can say what to change.
"""

from __future__ import annotations

import ipaddress
import socket
import ssl
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from typing import Any

import anyio
import httpcore
import httpx

from .errors import BackendError, BackendTimeout, InvalidRequest

__all__ = [
    "PRIVATE_URLS_SETTING",
    "Resolver",
    "Sink",
    "check_address",
    "fetch_url",
    "resolve_and_check",
    "system_resolver",
]

PRIVATE_URLS_SETTING = "FLUX_MCP_ALLOW_PRIVATE_URLS"

Resolver = Callable[[str, int], Awaitable[list[str]]]
"""``async (host, port) -> addresses``: how a host name becomes IP addresses (tests inject their own)."""
Sink = Callable[[bytes], Awaitable[None]]
"""``async (chunk) -> None``: receives a downloaded body chunk by chunk (``fetch_url(sink=...)``)."""

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

_DEFAULT_PORTS = {"http": 80, "https": 443}
_REDIRECT_STATUSES = frozenset({301, 302, 303, 307, 308})
_USER_AGENT = b"flux-mcp (guarded fetch)"

# ---------------------------------------------------------------------------------------------------
# The address policy
# ---------------------------------------------------------------------------------------------------

# Metadata services hand out the instance's cloud credentials: refused even with allow_private.
_METADATA = frozenset(
    ipaddress.ip_address(a)
    for a in (
        "169.254.169.254",  # AWS, GCP, Azure, Oracle, DigitalOcean, OpenStack
        "169.254.170.2",  # AWS ECS task credentials
        "169.254.170.23",  # AWS EKS pod identity
        "100.100.100.200",  # Alibaba Cloud
        "fd00:ec2::254",  # AWS IMDS over IPv6
        "fd00:ec2::23",  # AWS EKS pod identity over IPv6
    )
)

# (network, how to name it, whether allow_private lets it through). First match wins, so narrower
# ranges come before the wider ones that contain them.
_RANGES: tuple[tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, str, bool], ...] = tuple(
    (ipaddress.ip_network(net), phrase, private)
    for net, phrase, private in (
        ("0.0.0.0/8", "an unspecified ('this network') address", False),
        ("10.0.0.0/8", "a private address", True),
        ("100.64.0.0/10", "a carrier-grade NAT (shared) address", True),
        ("127.0.0.0/8", "a loopback address", True),
        ("169.254.0.0/16", "a link-local address", True),
        ("172.16.0.0/12", "a private address", True),
        ("192.0.0.0/24", "an IETF special-purpose address", False),
        ("192.0.2.0/24", "a documentation address", False),
        ("192.88.99.0/24", "a reserved (6to4 relay) address", False),
        ("192.168.0.0/16", "a private address", True),
        # Benchmarking range; in practice lab networks and "fake-IP" proxies use it.
        ("198.18.0.0/15", "a private (benchmarking) address", True),
        ("198.51.100.0/24", "a documentation address", False),
        ("203.0.113.0/24", "a documentation address", False),
        ("224.0.0.0/4", "a multicast address", False),
        ("240.0.0.0/4", "a reserved address", False),  # includes 255.255.255.255
        ("::/128", "the unspecified address", False),
        ("::1/128", "a loopback address", True),
        # The local-use NAT64 prefix may embed IPv4 at several offsets, so the inner address is unknowable.
        ("64:ff9b:1::/48", "a local-use NAT64 address", False),
        ("100::/64", "a discard-only address", False),
        ("2001:db8::/32", "a documentation address", False),
        ("2001::/23", "an IETF special-purpose address (Teredo, benchmarking, ORCHID)", False),
        ("3fff::/20", "a documentation address", False),
        ("5f00::/16", "a segment-routing address", False),
        ("fc00::/7", "a private (unique local) address", True),
        ("fe80::/10", "a link-local address", True),
        ("fec0::/10", "a private (site-local) address", True),
        ("ff00::/8", "a multicast address", False),
    )
)
_GLOBAL_UNICAST_V6 = ipaddress.ip_network("2000::/3")
_NAT64 = ipaddress.ip_network("64:ff9b::/96")
_IPV4_COMPAT = ipaddress.ip_network("::/96")
_IPV4_TRANSLATED = ipaddress.ip_network("::ffff:0:0:0/96")


@dataclass(frozen=True)
class _Refusal:
    """Why one address may not be fetched from."""

    phrase: str  # "a private address", completes "<ip> is …"
    private: bool  # True when FLUX_MCP_ALLOW_PRIVATE_URLS=true would let it through
    detail: str = ""  # e.g. " (IPv4 10.0.0.1 inside an IPv4-mapped IPv6 address)"

    def advice(self) -> str:
        if self.private:
            return f"Set {PRIVATE_URLS_SETTING}=true if this server runs on a trusted network."
        return "Such addresses are never fetched; use a public http(s) URL."


def _embedded_ipv4(ip: ipaddress.IPv6Address) -> tuple[ipaddress.IPv4Address, str, bool] | None:
    """The IPv4 address an IPv6 form carries, how the form is called, and whether the form is routable."""
    if ip.ipv4_mapped is not None:
        return ip.ipv4_mapped, "an IPv4-mapped IPv6 address", True
    if ip in _NAT64:
        return ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF), "a NAT64 address", True
    if ip.sixtofour is not None:
        return ip.sixtofour, "a 6to4 address", True
    if ip in _IPV4_TRANSLATED:
        return ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF), "an IPv4-translated IPv6 address", False
    if ip in _IPV4_COMPAT and int(ip) > 1:  # :: and ::1 are in ::/96 but carry no IPv4
        return ipaddress.IPv4Address(int(ip)), "a deprecated IPv4-compatible IPv6 address", False
    return None


def _refusal(ip: IPAddress) -> _Refusal | None:
    """The policy for one parsed address (scope id already removed); None means public."""
    if ip in _METADATA:
        return _Refusal(
            "a cloud metadata address",
            private=False,
            detail=f", which hands out cloud credentials and is refused even with {PRIVATE_URLS_SETTING}=true",
        )
    if isinstance(ip, ipaddress.IPv6Address) and (embedded := _embedded_ipv4(ip)) is not None:
        inner, form, routable = embedded
        if not routable:  # obsolete forms: nothing legitimate uses them, whatever they carry
            form_noun = form.removeprefix("an ").removeprefix("a ")
            return _Refusal(f"a reserved address (a {form_noun} of {inner})", private=False)
        inner_refusal = _refusal(inner)
        if inner_refusal is None:
            return None
        detail = f" (IPv4 {inner} inside {form}){inner_refusal.detail}"
        return _Refusal(inner_refusal.phrase, inner_refusal.private, detail)
    for network, phrase, private in _RANGES:
        if ip.version == network.version and ip in network:
            return _Refusal(phrase, private)
    if isinstance(ip, ipaddress.IPv6Address) and ip not in _GLOBAL_UNICAST_V6:
        return _Refusal("an unallocated (reserved) address", private=False)
    # Belt and braces: whatever the table above missed, Python's registry view still refuses.
    if not ip.is_global:
        return _Refusal("a reserved (not globally routable) address", private=False)
    return None


def _parse_ip(ip: str) -> IPAddress:
    try:
        return ipaddress.ip_address(ip.split("%", 1)[0])  # drop an IPv6 scope id such as %eth0
    except ValueError:
        raise InvalidRequest(f"{ip!r} is not an IP address.") from None


def _same_address(host: str, ip: str) -> bool:
    try:
        return ipaddress.ip_address(host.strip("[]")) == _parse_ip(ip)
    except ValueError:
        return False


def _refusal_message(host: str, ip: str, refusal: _Refusal) -> str:
    subject = f"{host} is" if _same_address(host, ip) else f"{host} resolves to {ip}, which is"
    return f"{subject} {refusal.phrase}{refusal.detail}. {refusal.advice()}"


def check_address(ip: str, *, allow_private: bool) -> None:
    """Raise InvalidRequest unless the server may connect to ``ip`` (see the module docstring)."""
    refusal = _refusal(_parse_ip(ip))
    if refusal is not None and not (allow_private and refusal.private):
        raise InvalidRequest(_refusal_message(ip, ip, refusal))


# ---------------------------------------------------------------------------------------------------
# Resolving
# ---------------------------------------------------------------------------------------------------


async def system_resolver(host: str, port: int) -> list[str]:
    """The operating system's answer for ``host`` (getaddrinfo in a worker thread), in its order."""
    infos = await anyio.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return [str(info[4][0]) for info in infos]


async def resolve_and_check(
    host: str, port: int, *, allow_private: bool, resolver: Resolver | None = None
) -> list[str]:
    """Resolve ``host`` and check every address; return them (deduplicated, in resolver order).

    One refused address refuses the host: a name that answers with both a public and a private
    address could be steered to either.
    """
    try:
        answers = await (resolver or system_resolver)(host, port)
    except (OSError, UnicodeError) as exc:
        raise InvalidRequest(f"cannot resolve the host name {host!r} ({exc}); check the URL.") from None
    addresses = list(dict.fromkeys(answers))
    if not addresses:
        raise InvalidRequest(f"the host name {host!r} has no address; check the URL.")
    for ip in addresses:
        refusal = _refusal(_parse_ip(ip))
        if refusal is not None and not (allow_private and refusal.private):
            raise InvalidRequest(_refusal_message(host, ip, refusal))
    return addresses


# ---------------------------------------------------------------------------------------------------
# Connecting only where the check said yes
# ---------------------------------------------------------------------------------------------------


class _PinnedBackend(httpcore.AsyncNetworkBackend):
    """A network backend that connects to the checked addresses of one origin and nowhere else.

    httpcore asks it for ``(host, port)`` of the URL; it connects to the addresses ``resolve_and_check``
    returned instead of resolving the name again. TLS is started afterwards by httpcore with the URL's
    host name as ``server_hostname``, so SNI and certificate verification still use the name.
    """

    def __init__(
        self, inner: httpcore.AsyncNetworkBackend, host: str, port: int, addresses: list[str]
    ) -> None:
        self._inner = inner
        self._origin = (host.strip("[]").lower(), port)
        self._addresses = addresses

    async def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,
        local_address: str | None = None,
        socket_options: Iterable[Any] | None = None,
    ) -> httpcore.AsyncNetworkStream:
        if (host.strip("[]").lower(), port) != self._origin:
            # Cannot happen with one pool per hop; refuse rather than connect somewhere unchecked.
            raise httpcore.ConnectError(f"refusing to connect to unchecked origin {host}:{port}")
        failure: Exception = httpcore.ConnectError("no address to connect to")
        for ip in self._addresses:
            try:
                return await self._inner.connect_tcp(
                    ip, port, timeout=timeout, local_address=local_address, socket_options=socket_options
                )
            except (httpcore.ConnectError, httpcore.ConnectTimeout) as exc:
                failure = exc
        raise failure

    async def connect_unix_socket(
        self, path: str, timeout: float | None = None, socket_options: Iterable[Any] | None = None
    ) -> httpcore.AsyncNetworkStream:
        raise httpcore.ConnectError("guarded fetches never use unix sockets")

    async def sleep(self, seconds: float) -> None:
        await self._inner.sleep(seconds)


# ---------------------------------------------------------------------------------------------------
# Fetching
# ---------------------------------------------------------------------------------------------------


def _shown(url: httpx.URL) -> str:
    """The URL as messages may show it: scheme://host[:port]/path, without credentials or query."""
    if url.scheme not in _DEFAULT_PORTS:
        return f"the {url.scheme}: URL" if url.scheme else "a URL without a scheme"
    text = f"{url.scheme}://{url.netloc.decode('ascii')}{url.path}"
    return text if len(text) <= 160 else text[:157] + "..."


def _parse(url: str) -> tuple[httpx.URL | None, str | None]:
    """Parse one URL (the first or a redirect target); return it, or None and why it is refused."""
    try:
        parsed = httpx.URL(url)
    except (httpx.InvalidURL, TypeError):
        return None, "it is not a valid URL."
    if parsed.scheme not in _DEFAULT_PORTS:
        kind = f"{parsed.scheme}: URLs" if parsed.scheme else "URLs without a scheme"
        return None, f"only http and https URLs can be fetched by the server, not {kind}."
    if not parsed.host:
        return None, "the URL has no host."
    if parsed.userinfo:
        return None, "the URL carries a user name or password; remove the 'user:password@' part."
    return parsed, None


def _size(n: int) -> str:
    return f"{n / 2**20:.4g} MiB" if n >= 2**20 else f"{n} bytes"


@dataclass(frozen=True)
class _Fetch:
    """What one fetch_url call needs at every hop (the caller's limits, names and test hooks)."""

    first: httpx.URL
    allow_private: bool
    max_bytes: int
    what: str
    size_setting: str
    field: str | None
    ssl_context: ssl.SSLContext | None
    resolver: Resolver | None
    network_backend: httpcore.AsyncNetworkBackend
    sink: Sink | None = None

    def refuse(self, hop: httpx.URL, reason: str) -> InvalidRequest:
        # Identity, not equality: a redirect back to the first URL is still reported as a redirect.
        via = "" if hop is self.first else f" it redirects to {_shown(hop)}, and"
        return InvalidRequest(f"refusing to fetch {_shown(self.first)}:{via} {reason}", field=self.field)

    def too_big(self, hop: httpx.URL) -> InvalidRequest:
        return InvalidRequest(
            f"the {self.what} at {_shown(hop)} is larger than the {_size(self.max_bytes)} limit; "
            f"raise {self.size_setting} or use a smaller file.",
            field=self.field,
        )


async def _fetch_hop(job: _Fetch, hop: httpx.URL) -> tuple[bytes, str | None] | httpx.URL:
    """One request: the body and content type, or the next URL when the answer is a redirect."""
    port = hop.port or _DEFAULT_PORTS[hop.scheme]
    host = hop.raw_host.decode("ascii")  # IDNA names arrive here already as xn-- labels
    try:
        addresses = await resolve_and_check(
            host, port, allow_private=job.allow_private, resolver=job.resolver
        )
    except InvalidRequest as exc:
        raise job.refuse(hop, str(exc)) from None

    backend = _PinnedBackend(job.network_backend, host, port, addresses)
    url = httpcore.URL(scheme=hop.raw_scheme, host=hop.raw_host, port=port, target=hop.raw_path)
    headers = [
        (b"Host", hop.netloc),
        (b"User-Agent", _USER_AGENT),
        (b"Accept", b"*/*"),
        (b"Accept-Encoding", b"identity"),  # the size cap counts the bytes that are returned
    ]
    try:
        async with (
            httpcore.AsyncConnectionPool(
                ssl_context=job.ssl_context, network_backend=backend, retries=0
            ) as pool,
            pool.stream(b"GET", url, headers=headers) as response,
        ):
            found = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in response.headers}
            if response.status in _REDIRECT_STATUSES and "location" in found:
                return _redirect_target(hop, found["location"])
            if response.status >= 300:
                raise _status_error(hop, response)
            declared = found.get("content-length", "")
            if declared.isdigit() and int(declared) > job.max_bytes:
                raise job.too_big(hop)
            body = bytearray()
            received = 0
            async for chunk in response.aiter_stream():
                received += len(chunk)
                if received > job.max_bytes:  # the header may be missing or wrong: count what arrives
                    raise job.too_big(hop)
                if job.sink is None:
                    body += chunk
                else:
                    await job.sink(chunk)
            return bytes(body), found.get("content-type")
    except (httpcore.NetworkError, httpcore.TimeoutException, httpcore.ProtocolError) as exc:
        raise BackendError(
            f"could not download {_shown(hop)}: {type(exc).__name__}: {exc or 'connection failed'}. "
            "Check that the host is up and serves http(s) with a valid certificate."
        ) from exc


def _redirect_target(hop: httpx.URL, location: str) -> httpx.URL:
    try:
        return hop.join(location.strip())
    except httpx.InvalidURL:
        raise BackendError(f"{_shown(hop)} redirects to an invalid URL; use the final URL.") from None


def _status_error(hop: httpx.URL, response: httpcore.Response) -> BackendError:
    reason = response.extensions.get("reason_phrase", b"").decode("latin-1")
    status = f"HTTP {response.status} {reason}".rstrip()
    if response.status >= 500:
        hint = "the server failed; try again later or use another URL."
    elif response.status in (401, 403):
        hint = "the file is not public; use a URL that works without logging in."
    elif 300 <= response.status < 400:
        hint = "a redirect without a Location header; use the final URL."
    else:
        hint = "check the URL."
    return BackendError(f"{_shown(hop)} answered {status}; {hint}")


async def fetch_url(
    url: str,
    *,
    allow_private: bool,
    max_bytes: int,
    timeout_s: float,
    allowed_suffixes: tuple[str, ...] | None = None,
    max_redirects: int = 5,
    what: str = "file",
    size_setting: str = "FLUX_MCP_MAX_DOWNLOAD_MB",
    timeout_setting: str = "FLUX_MCP_DOWNLOAD_TIMEOUT_S",
    field: str | None = None,
    ssl_context: ssl.SSLContext | None = None,
    resolver: Resolver | None = None,
    network_backend: httpcore.AsyncNetworkBackend | None = None,
    sink: Sink | None = None,
) -> tuple[bytes, str | None]:
    """Download ``url`` through the guard; return ``(body, content type)``.

    ``allowed_suffixes`` (e.g. ``(".safetensors",)``) is checked on the path of the URL as given,
    not on redirect targets (hubs redirect to content-addressed CDN paths without the file name).
    ``what``, ``size_setting`` and ``timeout_setting`` only shape messages; ``field`` is put on the
    InvalidRequest errors. ``ssl_context`` replaces the default CA bundle (certifi). ``resolver`` and
    ``network_backend`` replace getaddrinfo and the socket layer (tests use them to stay on loopback).
    ``sink``, when given, receives the body chunk by chunk (e.g. into a file; the size cap still
    applies) and the returned body is empty: large files never sit in memory.

    Raises InvalidRequest (refused scheme, address, suffix, size or redirect count), BackendError
    (connection failure, HTTP 3xx without Location, 4xx, 5xx) or BackendTimeout (past ``timeout_s``).
    """
    if max_bytes <= 0 or timeout_s <= 0 or max_redirects < 0:
        raise ValueError("fetch_url needs max_bytes > 0, timeout_s > 0 and max_redirects >= 0")
    parsed, reason = _parse(url)
    if parsed is None:
        try:
            shown = _shown(httpx.URL(url))
        except (httpx.InvalidURL, TypeError):
            shown = "this URL"
        raise InvalidRequest(f"refusing to fetch {shown}: {reason}", field=field)
    if allowed_suffixes and not parsed.path.lower().endswith(tuple(s.lower() for s in allowed_suffixes)):
        raise InvalidRequest(
            f"refusing to fetch {_shown(parsed)}: the URL path must end with {' or '.join(allowed_suffixes)}.",
            field=field,
        )
    job = _Fetch(
        first=parsed,
        allow_private=allow_private,
        max_bytes=max_bytes,
        what=what,
        size_setting=size_setting,
        field=field,
        ssl_context=ssl_context,
        resolver=resolver,
        network_backend=network_backend or httpcore.AnyIOBackend(),
        sink=sink,
    )
    hop = parsed
    try:
        with anyio.fail_after(timeout_s):
            for _ in range(max_redirects + 1):
                outcome = await _fetch_hop(job, hop)
                if not isinstance(outcome, httpx.URL):
                    return outcome
                checked, reason = _parse(str(outcome))
                if checked is None:
                    raise job.refuse(outcome, str(reason))
                hop = checked
    except TimeoutError:
        raise BackendTimeout(
            f"downloading the {what} at {_shown(parsed)} took longer than {timeout_s:g} s; "
            f"raise {timeout_setting} or use a faster host."
        ) from None
    raise InvalidRequest(
        f"refusing to fetch {_shown(parsed)}: it redirects more than {max_redirects} times "
        "(the limit); use the final URL.",
        field=field,
    )

"""Tests of the guarded server-side fetch (flux_mcp/netguard.py).

Safety of the tests themselves: no test may send a packet to a non-loopback address, even if the code
under test is wrong. So every real fetch goes through ``LoopbackOnly``, a network backend that opens
sockets to 127.0.0.1 only and raises for anything else, and through ``FakeDNS``, which answers made-up
names and never asks real DNS. Addresses such as 10.0.0.5 or 169.254.169.254 appear only as DNS answers
the guard must refuse; if it did not, the connect would hit ``LoopbackOnly`` and fail the test. A few
public addresses are "pretend internet": ``LoopbackOnly`` serves them from the loopback test server,
which lets a test start from a hop the default policy allows and then be redirected somewhere refused.
"""

from __future__ import annotations

import ipaddress
import socket
import ssl
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, quote, urlsplit

import httpcore
import pytest
import trustme

from flux_mcp.errors import BackendError, BackendTimeout, InvalidRequest
from flux_mcp.netguard import check_address, fetch_url, resolve_and_check

LOOPBACK = frozenset({"127.0.0.1", "::1"})
PUBLIC_STAND_IN = "93.184.216.34"  # "pretend internet": LoopbackOnly serves it from 127.0.0.1
PNG = b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 8


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


# ---------------------------------------------------------------------------------------------------
# Test doubles for the network: DNS answers we choose, sockets only to loopback
# ---------------------------------------------------------------------------------------------------


class FakeDNS:
    """A resolver for made-up names; IP literals answer themselves; real DNS is never asked."""

    def __init__(self, names: dict[str, list[list[str]]] | None = None) -> None:
        self.names = names or {}  # name -> answers, one list per call (the last one repeats)
        self.calls: list[str] = []

    async def __call__(self, host: str, port: int) -> list[str]:
        self.calls.append(host)
        try:
            return [str(ipaddress.ip_address(host))]
        except ValueError:
            pass
        if host not in self.names:
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        answers = self.names[host]
        return answers.pop(0) if len(answers) > 1 else answers[0]


class LoopbackOnly(httpcore.AsyncNetworkBackend):
    """Real sockets, but only to loopback: anything else is a test failure, never a packet."""

    def __init__(self) -> None:
        self.inner = httpcore.AnyIOBackend()
        self.connects: list[tuple[str, int]] = []

    async def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,
        local_address: str | None = None,
        socket_options: Any = None,
    ) -> httpcore.AsyncNetworkStream:
        self.connects.append((host, port))
        target = "127.0.0.1" if host == PUBLIC_STAND_IN else host
        if target not in LOOPBACK:
            raise AssertionError(f"the code under test tried to connect to {host}:{port}")
        return await self.inner.connect_tcp(target, port, timeout=timeout)

    async def connect_unix_socket(
        self, path: str, timeout: float | None = None, socket_options: Any = None
    ) -> httpcore.AsyncNetworkStream:
        raise AssertionError("unexpected unix socket")

    async def sleep(self, seconds: float) -> None:
        await self.inner.sleep(seconds)


# ---------------------------------------------------------------------------------------------------
# A small HTTP(S) server on 127.0.0.1 in a thread
# ---------------------------------------------------------------------------------------------------


class LoopbackServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), Handler)
        self.seen: list[tuple[str, str | None]] = []  # (path, Host header) of every request
        self.release = threading.Event()  # lets stalling handlers finish at teardown

    @property
    def port(self) -> int:
        return self.server_address[1]


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: LoopbackServer

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def do_GET(self) -> None:
        parts = urlsplit(self.path)
        query = {k: v[0] for k, v in parse_qs(parts.query).items()}
        self.server.seen.append((parts.path, self.headers.get("Host")))
        route = getattr(
            self, "route_" + parts.path.strip("/").split("/")[0].replace(".", "_").replace("-", "_")
        )
        route(query)

    def send_body(self, body: bytes, content_type: str = "application/octet-stream") -> None:
        self.send_response(200)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def route_img_png(self, query: dict[str, str]) -> None:
        self.send_body(PNG, "image/png")

    def route_lora_safetensors(self, query: dict[str, str]) -> None:
        self.send_body(b"lora weights")

    def route_blob(self, query: dict[str, str]) -> None:
        self.send_body(b"content-addressed blob")

    def route_bytes(self, query: dict[str, str]) -> None:
        body = b"x" * int(query["n"])
        if "chunked" not in query:
            return self.send_body(body)
        self.send_response(200)
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        for start in range(0, len(body), 1000):
            piece = body[start : start + 1000]
            self.wfile.write(b"%x\r\n%b\r\n" % (len(piece), piece))
        self.wfile.write(b"0\r\n\r\n")

    def route_liar(self, query: dict[str, str]) -> None:
        """Declares 10 MB and sends 10 bytes: only a Content-Length precheck reports the size."""
        self.send_response(200)
        self.send_header("Content-Length", "10000000")
        self.end_headers()
        self.wfile.write(b"0123456789")
        self.close_connection = True

    def route_stall_headers(self, query: dict[str, str]) -> None:
        self.server.release.wait(10)

    def route_stall_body(self, query: dict[str, str]) -> None:
        self.send_response(200)
        self.send_header("Content-Length", "1000")
        self.end_headers()
        self.wfile.write(b"a little")
        self.wfile.flush()
        self.server.release.wait(10)

    def route_status(self, query: dict[str, str]) -> None:
        self.send_response(int(query["code"]))
        self.send_header("Content-Length", "0")
        self.end_headers()

    def route_redirect(self, query: dict[str, str]) -> None:
        self.send_response(int(query.get("code", "302")))
        self.send_header("Location", query["to"])
        self.send_header("Content-Length", "0")
        self.end_headers()


def redirect(to: str, code: int = 302) -> str:
    return f"/redirect?code={code}&to={quote(to, safe='')}"


def run_server(server: LoopbackServer) -> Iterator[LoopbackServer]:
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.01}, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.release.set()
        server.shutdown()
        server.server_close()
        thread.join(5)


@pytest.fixture
def server() -> Iterator[LoopbackServer]:
    yield from run_server(LoopbackServer())


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture
def tls_server(ca: trustme.CA) -> Iterator[LoopbackServer]:
    server = LoopbackServer()
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("images.test").configure_cert(context)
    server.socket = context.wrap_socket(server.socket, server_side=True)
    yield from run_server(server)


@pytest.fixture
def net() -> LoopbackOnly:
    return LoopbackOnly()


@pytest.fixture
def dns() -> FakeDNS:
    return FakeDNS()


async def fetch(url: str, net: LoopbackOnly, dns: FakeDNS | None, **kwargs: Any) -> tuple[bytes, str | None]:
    """fetch_url with test-friendly defaults; always through the loopback-only network."""
    options: dict[str, Any] = {"allow_private": True, "max_bytes": 1 << 20, "timeout_s": 5.0}
    options.update(kwargs)
    return await fetch_url(url, resolver=dns, network_backend=net, **options)


# ---------------------------------------------------------------------------------------------------
# The address policy: decisions only, no connection
# ---------------------------------------------------------------------------------------------------

REFUSED_BY_DEFAULT = [
    "127.0.0.1",
    "127.255.255.254",
    "::1",
    "::ffff:127.0.0.1",
    "::ffff:7f00:1",
    "10.1.2.3",
    "172.16.0.1",
    "172.31.255.255",
    "192.168.1.1",
    "169.254.169.254",
    "169.254.1.1",
    "fe80::1",
    "fe80::1%eth0",
    "fc00::1",
    "fd12:3456::1",
    "0.0.0.0",
    "::",
    "100.64.0.1",
    "224.0.0.1",
    "ff02::1",
    "240.0.0.1",
    "255.255.255.255",
    "64:ff9b::a00:1",  # NAT64 of 10.0.0.1
    "2002:a00:1::",  # 6to4 of 10.0.0.1
    "::127.0.0.1",  # deprecated IPv4-compatible form
    "2001:db8::1",
    "192.0.2.1",
    "2001::1",  # Teredo
    "4000::1",  # outside global unicast
]
ALWAYS_REFUSED = [
    "169.254.169.254",
    "::ffff:169.254.169.254",
    "64:ff9b::a9fe:a9fe",  # NAT64 of 169.254.169.254
    "169.254.170.2",
    "fd00:ec2::254",
    "100.100.100.200",
    "0.0.0.0",
    "0.1.2.3",
    "::",
    "224.0.0.1",
    "ff02::1",
    "240.0.0.1",
    "255.255.255.255",
    "::127.0.0.1",
    "::ffff:0:a00:1",  # IPv4-translated form
    "2001:db8::1",
    "203.0.113.7",
    "4000::1",
]
PRIVATE_ALLOWED_WITH_SETTING = [
    "127.0.0.1",
    "::1",
    "::ffff:127.0.0.1",
    "10.1.2.3",
    "172.16.0.1",
    "192.168.1.1",
    "169.254.1.1",
    "fe80::1",
    "fc00::1",
    "100.64.0.1",
    "64:ff9b::a00:1",
]
PUBLIC = ["93.184.216.34", "2606:4700::1111", "8.8.8.8", "::ffff:93.184.216.34", "64:ff9b::5db8:d822"]


@pytest.mark.parametrize("ip", REFUSED_BY_DEFAULT)
def test_refused_by_default(ip: str) -> None:
    with pytest.raises(InvalidRequest) as err:
        check_address(ip, allow_private=False)
    assert ip in str(err.value)


@pytest.mark.parametrize("ip", ALWAYS_REFUSED)
def test_refused_even_with_allow_private(ip: str) -> None:
    with pytest.raises(InvalidRequest, match="never fetched"):
        check_address(ip, allow_private=True)


@pytest.mark.parametrize("ip", PRIVATE_ALLOWED_WITH_SETTING)
def test_private_addresses_pass_with_allow_private(ip: str) -> None:
    check_address(ip, allow_private=True)
    with pytest.raises(
        InvalidRequest, match="FLUX_MCP_ALLOW_PRIVATE_URLS=true if this server runs on a trusted"
    ):
        check_address(ip, allow_private=False)


@pytest.mark.parametrize("ip", PUBLIC)
@pytest.mark.parametrize("allow_private", [False, True])
def test_public_addresses_pass(ip: str, allow_private: bool) -> None:
    # A decision only: nothing connects here. Refusing would raise InvalidRequest.
    assert check_address(ip, allow_private=allow_private) is None


def test_messages_explain_the_address() -> None:
    with pytest.raises(InvalidRequest) as err:
        check_address("::ffff:10.0.0.5", allow_private=False)
    assert "private" in str(err.value) and "IPv4 10.0.0.5 inside an IPv4-mapped IPv6 address" in str(
        err.value
    )
    with pytest.raises(InvalidRequest) as err:
        check_address("169.254.169.254", allow_private=True)
    assert "cloud metadata" in str(err.value) and "even with FLUX_MCP_ALLOW_PRIVATE_URLS=true" in str(
        err.value
    )


def test_not_an_address() -> None:
    with pytest.raises(InvalidRequest, match="not an IP address"):
        check_address("example.com", allow_private=True)


# ---------------------------------------------------------------------------------------------------
# Resolving: every address is checked; other spellings of loopback resolve to loopback
# ---------------------------------------------------------------------------------------------------


@pytest.mark.anyio
@pytest.mark.parametrize("host", ["2130706433", "0177.0.0.1", "0x7f000001", "127.1", "0x7f.1", "localhost"])
async def test_spellings_of_loopback_are_resolved_then_refused(host: str) -> None:
    # The real resolver: these names can only mean loopback, and nothing connects.
    with pytest.raises(InvalidRequest, match=r"loopback address\. Set FLUX_MCP_ALLOW_PRIVATE_URLS"):
        await resolve_and_check(host, 80, allow_private=False)
    addresses = await resolve_and_check(host, 80, allow_private=True)
    assert addresses and all(ipaddress.ip_address(a).is_loopback for a in addresses)


@pytest.mark.anyio
async def test_one_private_answer_refuses_the_name() -> None:
    dns = FakeDNS({"mixed.test": [["93.184.216.34", "10.0.0.7"]]})
    with pytest.raises(
        InvalidRequest, match=r"mixed\.test resolves to 10\.0\.0\.7, which is a private address"
    ):
        await resolve_and_check("mixed.test", 443, allow_private=False, resolver=dns)


@pytest.mark.anyio
async def test_public_answers_are_returned_deduplicated() -> None:
    dns = FakeDNS({"cdn.test": [["93.184.216.34", "2606:4700::1111", "93.184.216.34"]]})
    addresses = await resolve_and_check("cdn.test", 443, allow_private=False, resolver=dns)
    assert addresses == ["93.184.216.34", "2606:4700::1111"]


@pytest.mark.anyio
async def test_unknown_and_empty_names() -> None:
    dns = FakeDNS({"empty.test": [[]]})
    with pytest.raises(InvalidRequest, match=r"cannot resolve the host name 'nowhere\.test'"):
        await resolve_and_check("nowhere.test", 80, allow_private=True, resolver=dns)
    with pytest.raises(InvalidRequest, match="has no address"):
        await resolve_and_check("empty.test", 80, allow_private=True, resolver=dns)


# ---------------------------------------------------------------------------------------------------
# Fetching from the loopback test server
# ---------------------------------------------------------------------------------------------------


@pytest.mark.anyio
async def test_loopback_refused_before_any_connection(server: LoopbackServer, net: LoopbackOnly) -> None:
    url = f"http://127.0.0.1:{server.port}/img.png?token=s3cret"
    with pytest.raises(InvalidRequest) as err:
        await fetch(url, net, FakeDNS(), allow_private=False, field="image_urls.0")
    message = str(err.value)
    assert message.startswith(
        f"refusing to fetch http://127.0.0.1:{server.port}/img.png: 127.0.0.1 is a loopback"
    )
    assert "FLUX_MCP_ALLOW_PRIVATE_URLS=true" in message and "s3cret" not in message
    assert err.value.field == "image_urls.0"
    assert net.connects == [] and server.seen == []


@pytest.mark.anyio
async def test_localhost_refused_with_the_system_resolver(server: LoopbackServer, net: LoopbackOnly) -> None:
    with pytest.raises(InvalidRequest, match=r"localhost resolves to .*loopback address"):
        await fetch(f"http://localhost:{server.port}/img.png", net, None, allow_private=False)
    assert net.connects == [] and server.seen == []


@pytest.mark.anyio
async def test_download_with_allow_private(server: LoopbackServer, net: LoopbackOnly, dns: FakeDNS) -> None:
    body, content_type = await fetch(f"http://127.0.0.1:{server.port}/img.png", net, dns)
    assert (body, content_type) == (PNG, "image/png")
    assert net.connects == [("127.0.0.1", server.port)]
    assert server.seen == [("/img.png", f"127.0.0.1:{server.port}")]


@pytest.mark.anyio
async def test_connects_to_the_checked_address_not_the_name(
    server: LoopbackServer, net: LoopbackOnly
) -> None:
    # A rebinding name: the first answer is checked, a later one would be the metadata service.
    dns = FakeDNS({"rebind.test": [["127.0.0.1"], ["169.254.169.254"]]})
    body, _ = await fetch(f"http://rebind.test:{server.port}/img.png", net, dns)
    assert body == PNG
    assert dns.calls == ["rebind.test"]  # resolved once, never again at connect time
    assert net.connects == [("127.0.0.1", server.port)]
    assert server.seen == [("/img.png", f"rebind.test:{server.port}")]  # the Host header keeps the name


@pytest.mark.anyio
async def test_name_resolving_to_private_refused(server: LoopbackServer, net: LoopbackOnly) -> None:
    dns = FakeDNS({"intranet.test": [["10.0.0.5"]]})
    with pytest.raises(
        InvalidRequest, match=r"intranet\.test resolves to 10\.0\.0\.5, which is a private address"
    ):
        await fetch("http://intranet.test/x.png", net, dns, allow_private=False)
    assert net.connects == []


@pytest.mark.anyio
@pytest.mark.parametrize(
    ("url", "scheme"),
    [
        ("file:///etc/passwd", "file:"),
        ("ftp://127.0.0.1/x.png", "ftp:"),
        ("data:image/png;base64,iVBORw0KGgo=", "data:"),
        ("gopher://127.0.0.1:70/_x", "gopher:"),
        ("javascript:alert(1)", "javascript:"),
        ("//127.0.0.1/x.png", "without a scheme"),
    ],
)
async def test_only_http_and_https(url: str, scheme: str, net: LoopbackOnly, dns: FakeDNS) -> None:
    with pytest.raises(InvalidRequest, match="only http and https") as err:
        await fetch(url, net, dns)
    assert scheme in str(err.value)
    assert dns.calls == [] and net.connects == []


@pytest.mark.anyio
async def test_credentials_in_url_refused(server: LoopbackServer, net: LoopbackOnly, dns: FakeDNS) -> None:
    with pytest.raises(InvalidRequest, match="user:password@") as err:
        await fetch(f"http://admin:hunter2@127.0.0.1:{server.port}/img.png", net, dns)
    assert "hunter2" not in str(err.value)
    assert net.connects == [] and server.seen == []


# ---------------------------------------------------------------------------------------------------
# Size cap and deadline
# ---------------------------------------------------------------------------------------------------


@pytest.mark.anyio
@pytest.mark.parametrize("path", ["/bytes?n=5000", "/bytes?n=5000&chunked=1", "/liar"])
async def test_size_cap(path: str, server: LoopbackServer, net: LoopbackOnly, dns: FakeDNS) -> None:
    url = f"http://127.0.0.1:{server.port}{path}"
    with pytest.raises(InvalidRequest) as err:
        await fetch(url, net, dns, max_bytes=4000, what="LoRA", size_setting="FLUX_MCP_MAX_LORA_MB")
    message = str(err.value)
    assert "LoRA" in message and "4000 bytes limit" in message and "raise FLUX_MCP_MAX_LORA_MB" in message


@pytest.mark.anyio
@pytest.mark.parametrize("chunked", ["", "&chunked=1"])
async def test_exactly_at_the_cap_is_fine(
    chunked: str, server: LoopbackServer, net: LoopbackOnly, dns: FakeDNS
) -> None:
    body, _ = await fetch(f"http://127.0.0.1:{server.port}/bytes?n=4000{chunked}", net, dns, max_bytes=4000)
    assert body == b"x" * 4000


@pytest.mark.anyio
@pytest.mark.parametrize("path", ["/stall-headers", "/stall-body"])
async def test_deadline(path: str, server: LoopbackServer, net: LoopbackOnly, dns: FakeDNS) -> None:
    started = time.monotonic()
    with pytest.raises(BackendTimeout, match=r"longer than 0\.3 s; raise FLUX_MCP_DOWNLOAD_TIMEOUT_S"):
        await fetch(f"http://127.0.0.1:{server.port}{path}", net, dns, timeout_s=0.3)
    assert time.monotonic() - started < 3


# ---------------------------------------------------------------------------------------------------
# Redirects: followed by hand, every hop checked again
# ---------------------------------------------------------------------------------------------------


@pytest.mark.anyio
async def test_redirect_chain_is_followed(server: LoopbackServer, net: LoopbackOnly) -> None:
    dns = FakeDNS({"images.test": [["127.0.0.1"]]})
    absolute = f"http://images.test:{server.port}{redirect('/img.png', 307)}"
    body, content_type = await fetch(f"http://127.0.0.1:{server.port}{redirect(absolute, 301)}", net, dns)
    assert (body, content_type) == (PNG, "image/png")
    assert [path for path, _ in server.seen] == ["/redirect", "/redirect", "/img.png"]
    assert server.seen[-1][1] == f"images.test:{server.port}"
    assert dns.calls == ["127.0.0.1", "images.test", "images.test"]  # every hop resolved and checked


@pytest.mark.anyio
async def test_too_many_redirects(server: LoopbackServer, net: LoopbackOnly, dns: FakeDNS) -> None:
    url = f"http://127.0.0.1:{server.port}{redirect(redirect('/img.png'))}"
    with pytest.raises(InvalidRequest, match="redirects more than 1 times"):
        await fetch(url, net, dns, max_redirects=1)
    assert [path for path, _ in server.seen] == ["/redirect", "/redirect"]
    body, _ = await fetch(url, net, dns, max_redirects=2)
    assert body == PNG


@pytest.mark.anyio
@pytest.mark.parametrize(
    ("target", "reason"),
    [
        (
            "http://metadata.test/latest/meta-data/",
            "metadata.test resolves to 169.254.169.254, which is a cloud",
        ),
        ("http://169.254.169.254/latest/meta-data/", "169.254.169.254 is a cloud metadata address"),
        ("http://[::ffff:169.254.169.254]/latest/", "::ffff:169.254.169.254 is a cloud metadata address"),
        ("http://0.0.0.0:{port}/img.png", "0.0.0.0 is an unspecified"),
        ("http://[::]:{port}/img.png", ":: is the unspecified address"),
        ("http://224.0.0.1/x", "multicast"),
        ("file:///etc/passwd", "not file: URLs"),
        ("gopher://127.0.0.1:{port}/", "not gopher: URLs"),
        ("http://u:p@127.0.0.1:{port}/img.png", "user name or password"),
    ],
)
async def test_redirect_to_a_refused_target(
    target: str, reason: str, server: LoopbackServer, net: LoopbackOnly
) -> None:
    dns = FakeDNS({"metadata.test": [["169.254.169.254"]]})
    url = f"http://127.0.0.1:{server.port}{redirect(target.format(port=server.port))}"
    with pytest.raises(InvalidRequest) as err:
        await fetch(url, net, dns, allow_private=True)  # the first hop is allowed, the second never
    assert "it redirects to " in str(err.value) and reason in str(err.value)
    assert net.connects == [("127.0.0.1", server.port)]  # only the first hop ever connected
    assert [path for path, _ in server.seen] == ["/redirect"]


@pytest.mark.anyio
async def test_public_hop_redirecting_to_private_refused_by_default(
    server: LoopbackServer, net: LoopbackOnly
) -> None:
    # public.test answers with a public address (served from loopback by LoopbackOnly), so the
    # default policy allows the first hop; its redirect to a private name must then be refused.
    dns = FakeDNS({"public.test": [[PUBLIC_STAND_IN]], "router.test": [["192.168.1.1"]]})
    url = f"http://public.test:{server.port}{redirect('http://router.test/admin')}"
    with pytest.raises(InvalidRequest) as err:
        await fetch(url, net, dns, allow_private=False)
    message = str(err.value)
    assert message.startswith(f"refusing to fetch http://public.test:{server.port}/redirect: it redirects to")
    assert "router.test resolves to 192.168.1.1, which is a private address" in message
    assert net.connects == [(PUBLIC_STAND_IN, server.port)]


# ---------------------------------------------------------------------------------------------------
# HTTP errors, connection errors, TLS, suffixes
# ---------------------------------------------------------------------------------------------------


@pytest.mark.anyio
@pytest.mark.parametrize(("code", "hint"), [(404, "check the URL"), (403, "not public"), (500, "try again")])
async def test_http_errors_name_the_url_without_query(
    code: int, hint: str, server: LoopbackServer, net: LoopbackOnly, dns: FakeDNS
) -> None:
    with pytest.raises(BackendError) as err:
        await fetch(f"http://127.0.0.1:{server.port}/status?code={code}&token=s3cret", net, dns)
    message = str(err.value)
    assert f"http://127.0.0.1:{server.port}/status answered HTTP {code}" in message and hint in message
    assert "s3cret" not in message


@pytest.mark.anyio
async def test_connection_refused(net: LoopbackOnly, dns: FakeDNS) -> None:
    with socket.socket() as probe:  # a port nobody listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    with pytest.raises(BackendError, match=f"could not download http://127.0.0.1:{port}/img.png"):
        await fetch(f"http://127.0.0.1:{port}/img.png", net, dns)


@pytest.mark.anyio
async def test_https_verifies_the_name_while_connecting_to_the_checked_address(
    tls_server: LoopbackServer, ca: trustme.CA, net: LoopbackOnly
) -> None:
    context = ssl.create_default_context()
    ca.configure_trust(context)
    dns = FakeDNS({"images.test": [["127.0.0.1"]], "other.test": [["127.0.0.1"]]})
    body, _ = await fetch(f"https://images.test:{tls_server.port}/img.png", net, dns, ssl_context=context)
    assert body == PNG
    assert net.connects == [("127.0.0.1", tls_server.port)]
    # Same server, same address, but a name the certificate does not cover: refused by TLS.
    with pytest.raises(BackendError, match=r"could not download https://other\.test"):
        await fetch(f"https://other.test:{tls_server.port}/img.png", net, dns, ssl_context=context)


@pytest.mark.anyio
async def test_allowed_suffixes(server: LoopbackServer, net: LoopbackOnly, dns: FakeDNS) -> None:
    base = f"http://127.0.0.1:{server.port}"
    with pytest.raises(InvalidRequest, match=r"must end with \.safetensors"):
        await fetch(f"{base}/lora.bin", net, dns, allowed_suffixes=(".safetensors",))
    assert net.connects == []
    body, _ = await fetch(f"{base}/lora.safetensors?download=1", net, dns, allowed_suffixes=(".safetensors",))
    assert body == b"lora weights"
    # Hubs redirect to content-addressed paths: only the URL as given must carry the suffix.
    hub = f"{base}{redirect('/blob/3f9a')}".replace("/redirect?", "/redirect/lora.safetensors?")
    body, _ = await fetch(hub, net, dns, allowed_suffixes=(".safetensors",))
    assert body == b"content-addressed blob"

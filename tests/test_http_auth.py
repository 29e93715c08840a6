"""The streamable HTTP transport's guards: the bearer token, the refusal to serve other interfaces
without one, DNS-rebinding protection, and the token staying out of logs and results.

Servers run as ``python -m flux_mcp serve --http`` subprocesses on 127.0.0.1 only. The refusal
tests ask for 0.0.0.0 / :: but hold that port on every interface themselves first (bound, never
listening), so even if the refusal regressed the server could not listen beyond loopback.

This module knows the CLI, the HTTP surface and the tools, nothing of the server's code.
"""

from __future__ import annotations

import contextlib
import json
import secrets
import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import httpx2
import pytest
from mcp import Client
from mcp.client.streamable_http import streamable_http_client

from .conftest import data_uri, free_port, make_png, run_cli, server_env, text_of
from .conftest import http_server as serve_http
from .fal_emulator import FalEmulator

INIT = {
    "jsonrpc": "2.0",
    "id": 1,
    "method": "initialize",
    "params": {
        "protocolVersion": "2025-06-18",
        "capabilities": {},
        "clientInfo": {"name": "t", "version": "0"},
    },
}
MCP_HEADERS = {"Accept": "application/json, text/event-stream", "Content-Type": "application/json"}


@contextlib.contextmanager
def _hold_every_interface(port: int) -> Iterator[None]:
    """Bind (never listen on) the wildcard addresses, so nobody else can listen there meanwhile."""
    held = []
    for family, address in ((socket.AF_INET, "0.0.0.0"), (socket.AF_INET6, "::")):
        try:
            sock = socket.socket(family)
        except OSError:  # no IPv6 here: nothing to hold
            continue
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.bind((address, port))
        held.append(sock)
    try:
        yield
    finally:
        for sock in held:
            sock.close()


@pytest.mark.parametrize(
    ("host", "token"),
    [("0.0.0.0", None), ("::", None), ("0.0.0.0", "   ")],
    ids=["ipv4-any", "ipv6-any", "blank-token"],
)
def test_serving_beyond_loopback_without_a_token_is_refused_before_binding(
    tmp_path: Path, host: str, token: str | None
) -> None:
    port = free_port()
    env = server_env(tmp_path)
    if token is not None:
        env["FLUX_MCP_HTTP_TOKEN"] = token
    with _hold_every_interface(port):
        started = time.monotonic()
        done = run_cli("serve", "--http", "--host", host, "--port", str(port), env=env, timeout=30)
    assert done.returncode == 1, done.stderr
    assert f"Refusing to serve on {host}" in done.stderr and "FLUX_MCP_HTTP_TOKEN" in done.stderr
    assert "address already in use" not in done.stderr.lower(), "it tried to bind before refusing"
    assert "Traceback" not in done.stderr and done.stdout == ""
    assert time.monotonic() - started < 30


@dataclass
class HTTPServer:
    url: str
    port: int
    token: str
    log: Path
    out: Path
    emulator: FalEmulator


@pytest.fixture(scope="module")
def module_emulator() -> Iterator[FalEmulator]:
    with FalEmulator() as emu:
        yield emu


@pytest.fixture(scope="module")
def http_server(
    module_emulator: FalEmulator, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[HTTPServer]:
    """One token-protected server on 127.0.0.1 for the module."""
    root = tmp_path_factory.mktemp("http-auth")
    (root / "inputs").mkdir()
    token = "tok-" + secrets.token_urlsafe(24)
    home = root / "home"
    env = server_env(
        root,
        **module_emulator.env(),
        FLUX_MCP_HTTP_TOKEN=token,
        HOME=str(home),
        XDG_CONFIG_HOME=str(home / ".config"),
        XDG_DATA_HOME=str(home / ".local/share"),
        XDG_CACHE_HOME=str(home / ".cache"),
    )
    log = root / "server.log"
    with serve_http(env, log=log, verbose=True) as server:
        yield HTTPServer(server.url, server.port, token, log, root / "out", module_emulator)


def _post(
    server: HTTPServer, headers: dict[str, str] | None = None, path: str = "/mcp", **params: Any
) -> httpx.Response:
    return httpx.post(
        f"http://127.0.0.1:{server.port}{path}",
        headers={**MCP_HEADERS, **(headers or {})},
        json=INIT,
        timeout=10,
        **params,
    )


@pytest.mark.parametrize(
    "headers",
    [
        {},
        {"Authorization": "Bearer wrong"},
        {"Authorization": "Bearer"},
        {"Authorization": "Basic dXNlcjpwYXNz"},
        {"Authorization": "TOKEN"},  # the token itself, without the scheme (filled in below)
        {"Authorization": "Bearer TOKENx"},  # a longer token that starts with the right one
        {"X-Api-Key": "TOKEN"},
    ],
    ids=["none", "wrong", "empty", "basic", "bare-token", "token-prefix", "other-header"],
)
def test_requests_without_the_right_bearer_token_get_401(
    http_server: HTTPServer, headers: dict[str, str]
) -> None:
    headers = {k: v.replace("TOKEN", http_server.token) for k, v in headers.items()}
    answer = _post(http_server, headers)
    assert answer.status_code == 401, answer.text
    assert answer.headers.get("www-authenticate", "").startswith("Bearer")
    assert http_server.token not in answer.text


def test_the_token_guards_every_method_and_path(http_server: HTTPServer) -> None:
    base = f"http://127.0.0.1:{http_server.port}"
    answers = [
        httpx.get(f"{base}/mcp", headers={"Accept": "text/event-stream"}, timeout=10),
        httpx.delete(f"{base}/mcp", headers={"Mcp-Session-Id": "x"}, timeout=10),
        httpx.get(f"{base}/", timeout=10),
        httpx.get(f"{base}/mcp?token={http_server.token}", timeout=10),
        _post(http_server, path="/elsewhere"),
    ]
    assert [a.status_code for a in answers] == [401] * len(answers)


def test_dns_rebinding_protection_stays_on_behind_the_token(http_server: HTTPServer) -> None:
    auth = {"Authorization": f"Bearer {http_server.token}"}
    good = _post(http_server, auth)
    assert good.status_code == 200, good.text
    rebound = _post(http_server, {**auth, "Host": "evil.example"})
    assert rebound.status_code in (400, 403, 421), rebound.status_code
    foreign_origin = _post(http_server, {**auth, "Origin": "http://evil.example"})
    assert foreign_origin.status_code in (400, 403), foreign_origin.status_code


@pytest.mark.anyio
async def test_an_mcp_client_with_the_token_uses_every_tool_and_the_token_leaks_nowhere(
    http_server: HTTPServer,
) -> None:
    headers = {"Authorization": f"Bearer {http_server.token}"}
    seen: list[str] = []
    async with (
        httpx2.AsyncClient(headers=headers, timeout=httpx2.Timeout(30, read=120)) as http,
        Client(streamable_http_client(http_server.url, http_client=http)) as client,
    ):
        tools = {t.name for t in (await client.list_tools()).tools}
        assert {"edit_image", "compare_seeds", "list_presets"} <= tools
        presets = await client.call_tool("list_presets", {})
        edited = await client.call_tool(
            "edit_image", {"prompt": "ink drawing", "seed": 9, "image_urls": [data_uri(make_png())]}
        )
        assert not edited.is_error, text_of(edited)
        image = edited.structured_content["images"][0]
        resource = await client.read_resource(image["uri"])
        refused = await client.call_tool("edit_image", {"prompt": "x", "image_urls": ["/etc/passwd"]})
        assert refused.is_error
        seen += [json.dumps(r.model_dump(mode="json")) for r in (presets, edited, resource, refused)]
    assert Path(image["path"]).is_file()
    texts = [*seen, http_server.log.read_text()] + [p.read_text() for p in http_server.out.rglob("*.json")]
    assert len(texts) >= 6
    assert not [t[:200] for t in texts if http_server.token in t]
    assert not [t[:200] for t in texts if http_server.emulator.key.split(":")[1] in t]

"""A minimal MCP Apps host for the viewer's browser tests.

Headless Chromium (Debian's ``chromium``, driven by Playwright) shows a host page; the page mounts the
viewer's HTML — as the real server's ``resources/read`` returned it — in a sandboxed ``srcdoc`` frame,
answers the frame's ``ui/initialize`` with a host context (theme), resizes the frame on
``ui/notifications/size-changed``, and forwards the frame's ``tools/call`` and ``resources/read`` to a
real MCP client connected to the server. The test pushes tool results into the frame as a host does
(``ui/notifications/tool-result``) and reads what the frame shows.

Every request the page makes is recorded (Playwright's request events), so a test can assert that
nothing left the frame; every forwarded call is recorded, so a test can assert each action's arguments.
"""

from __future__ import annotations

import io
import os
import shutil
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio
from mcp import Client, MCPError
from mcp.client import advertise
from mcp.server.apps import APP_MIME_TYPE, EXTENSION_ID
from PIL import Image, ImageStat
from playwright.async_api import FrameLocator, Page, async_playwright

from .conftest import REPO

#: Debian's chromium; CHROMIUM overrides it (no browser download is possible on these machines).
CHROMIUM = os.environ.get("CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless=new",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
#: What a client declares to get MCP Apps from the server.
APPS = advertise(EXTENSION_ID, {"mimeTypes": [APP_MIME_TYPE]})
#: The policy hosts put on a frame whose resource declares no domains: inline code, data: images only.
HOST_CSP = "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; img-src data: blob:"
TWO_FRAMES = "() => new Promise(done => requestAnimationFrame(() => requestAnimationFrame(done)))"
#: Screenshots are also copied here for people to look at (gitignored).
ARTIFACTS = REPO / "out" / "viewer"

HOST_PAGE = """<!doctype html>
<html><head><meta charset="utf-8"><style>
  body { margin: 0; background: #888; } iframe { display: block; width: 100%; height: 200px; border: 0; }
</style></head><body><script>
  let frame = null;
  let context = {};
  window.initialized = false;
  function post(message) { frame.contentWindow.postMessage(Object.assign({ jsonrpc: "2.0" }, message), "*"); }
  window.hostNotify = (method, params) => post({ method, params });
  const answers = new Map();
  let hostId = 0;
  window.hostRequest = (method, params) => new Promise((resolve) => {
    hostId += 1;
    answers.set("host-" + hostId, resolve);
    post({ id: "host-" + hostId, method, params });
  });
  // Attached before the frame exists, so the frame's first ui/initialize cannot be missed.
  window.addEventListener("message", async (event) => {
    if (!frame || event.source !== frame.contentWindow) return;
    const msg = event.data;
    if (msg.method === undefined && answers.has(msg.id)) {
      answers.get(msg.id)(msg);
      answers.delete(msg.id);
    } else if (msg.method === "ui/initialize") {
      post({ id: msg.id, result: {
        protocolVersion: msg.params.protocolVersion,
        hostInfo: { name: "flux-mcp-test-host", version: "1.0.0" },
        hostCapabilities: { serverTools: {}, serverResources: {} },
        hostContext: context,
      } });
    } else if (msg.method === "ui/notifications/initialized") {
      window.initialized = true;
    } else if (msg.method === "ui/notifications/size-changed") {
      frame.style.height = msg.params.height + "px";
    } else if (msg.id !== undefined && msg.method) {
      post(Object.assign({ id: msg.id }, await window.mcpForward(msg.method, msg.params || {})));
    }
  });
  window.mountViewer = (html, hostContext) => {
    context = hostContext;
    frame = document.createElement("iframe");
    frame.setAttribute("sandbox", "allow-scripts");
    frame.srcdoc = html;
    document.body.append(frame);
  };
</script></body></html>"""


@dataclass
class AppsHost:
    """The host page, its viewer frame and what went through them."""

    page: Page
    client: Client
    shots: Path
    forwarded: list[tuple[str, dict[str, Any]]] = field(default_factory=list)
    requests: list[str] = field(default_factory=list)
    console_errors: list[str] = field(default_factory=list)
    _called: anyio.Event = field(default_factory=anyio.Event)

    @property
    def frame(self) -> FrameLocator:
        return self.page.frame_locator("iframe")

    async def forward(self, method: str, params: dict[str, Any]) -> dict[str, Any]:
        """What a host does with the frame's requests: proxy them to the server."""
        self.forwarded.append((method, params))
        self._called.set()
        self._called = anyio.Event()
        try:
            if method == "tools/call":
                result: Any = await self.client.call_tool(params["name"], params.get("arguments") or {})
            elif method == "resources/read":
                result = await self.client.read_resource(params["uri"])
            else:
                return {"error": {"code": -32601, "message": f"method not found: {method}"}}
        except MCPError as exc:
            return {"error": {"code": exc.error.code, "message": exc.error.message}}
        return {"result": result.model_dump(by_alias=True, mode="json", exclude_none=True)}

    async def tool_result(self, result: Any) -> None:
        """Hand the frame a tool's result, as the host does when the call returns."""
        payload = result.model_dump(by_alias=True, mode="json", exclude_none=True)
        await self.page.evaluate("r => hostNotify('ui/notifications/tool-result', r)", payload)

    async def tool_input(self, arguments: dict[str, Any]) -> None:
        """Hand the frame the call's arguments, as the host does while the call runs."""
        await self.page.evaluate("a => hostNotify('ui/notifications/tool-input', {arguments: a})", arguments)

    async def request(self, method: str, params: dict[str, Any]) -> dict[str, Any]:
        """A host-to-frame request (e.g. ui/resource-teardown); the frame's JSON-RPC answer."""
        return await self.page.evaluate("([m, p]) => hostRequest(m, p)", [method, params])

    async def host_context(self, **changes: Any) -> None:
        await self.page.evaluate("c => hostNotify('ui/notifications/host-context-changed', c)", changes)

    async def wait_for_calls(self, name: str, count: int) -> None:
        """Until the frame has made ``count`` tools/call of ``name``."""
        with anyio.fail_after(60):
            while len(self.calls(name)) < count:
                await self._called.wait()

    def calls(self, name: str) -> list[dict[str, Any]]:
        """The arguments of every tools/call of ``name`` the frame made, in order."""
        return [
            p.get("arguments") or {} for m, p in self.forwarded if m == "tools/call" and p["name"] == name
        ]

    def reads(self) -> list[str]:
        return [p["uri"] for m, p in self.forwarded if m == "resources/read"]

    def left_the_frame(self) -> list[str]:
        """Requests that would reach a network (anything but inline data)."""
        return [u for u in self.requests if not u.startswith(("data:", "about:", "blob:"))]

    async def snap(self, name: str) -> Path:
        """A screenshot of the whole host page, kept with the test and copied to out/viewer/."""
        path = self.shots / f"{name}.png"
        # A frame taller than the window is not fully painted in a full-page shot: grow the window to it.
        viewport = self.page.viewport_size
        assert viewport is not None
        tall = await self.page.evaluate("() => document.documentElement.scrollHeight")
        await self.page.set_viewport_size(
            {"width": viewport["width"], "height": max(tall, viewport["height"])}
        )
        await self.frame.locator("body").evaluate(TWO_FRAMES)
        await self.page.evaluate(TWO_FRAMES)
        await self.page.screenshot(path=str(path))
        await self.page.set_viewport_size(viewport)
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        shutil.copy(path, ARTIFACTS / path.name)
        return path

    async def pixels(self, selector: str) -> Image.Image:
        """What the frame shows in the element ``selector``, as an RGB image."""
        png = await self.frame.locator(selector).first.screenshot()
        return Image.open(io.BytesIO(png)).convert("RGB")


@asynccontextmanager
async def apps_host(
    client: Client,
    shots: Path,
    *,
    theme: str = "light",
    width: int = 900,
    height: int = 900,
    csp: bool = False,
) -> AsyncIterator[AppsHost]:
    """Chromium with the host page and the viewer from the server's ``resources/read``, initialized.

    ``csp`` puts the host's strict content security policy on the frame (a request that breaks it is
    refused before it is made, so the request log only proves "nothing left" without it).
    """
    tools = (await client.list_tools()).tools
    uri = next(t.meta["ui"]["resourceUri"] for t in tools if t.meta and "ui" in t.meta)
    resource = (await client.read_resource(uri)).contents[0]
    assert resource.mime_type == APP_MIME_TYPE
    html = resource.text
    if csp:
        html = html.replace(
            "<head>", f'<head><meta http-equiv="Content-Security-Policy" content="{HOST_CSP}">', 1
        )
    shots.mkdir(parents=True, exist_ok=True)
    async with async_playwright() as playwright:
        browser = await playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = await browser.new_page(viewport={"width": width, "height": height})
            host = AppsHost(page, client, shots)
            page.on("request", lambda request: host.requests.append(request.url))
            page.on("console", lambda m: host.console_errors.append(m.text) if m.type == "error" else None)
            await page.expose_function("mcpForward", host.forward)
            await page.set_content(HOST_PAGE)
            await page.evaluate("([html, ctx]) => mountViewer(html, ctx)", [html, {"theme": theme}])
            await page.wait_for_function("window.initialized")
            yield host
        finally:
            await browser.close()


def mean_rgb(image: Image.Image, box: tuple[float, float, float, float]) -> tuple[float, ...]:
    """Mean colour of a region given as fractions (left, top, right, bottom) of the image."""
    w, h = image.size
    region = image.crop((int(box[0] * w), int(box[1] * h), int(box[2] * w), int(box[3] * h)))
    return tuple(ImageStat.Stat(region).mean)


def spread(image: Image.Image) -> float:
    """Largest per-channel standard deviation: near 0 for a blank (one-colour) area."""
    return max(ImageStat.Stat(image).stddev)


def distance(a: tuple[float, ...], b: tuple[float, ...]) -> float:
    return max(abs(x - y) for x, y in zip(a, b, strict=True))

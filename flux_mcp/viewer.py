"""The interactive result viewer for hosts that render MCP Apps (Claude, ChatGPT, VS Code, ...).

The viewer is one self-contained HTML file (``assets/viewer.html``) served as the ``ui://`` resource
``VIEWER_URI`` through the SDK's Apps extension; edit_image and compare_seeds are bound to it there.
A host with Apps shows it in a sandboxed frame and hands it the tool result; every image it shows
comes through the host's ``resources/read`` of ``flux://images/<id>``.

For a client that negotiated Apps (``client_supports_apps``), a result also carries, in its ``_meta``
under ``VIEWER_META_KEY``, where the viewer finds the first input image for its before/after view.
Nothing else changes: text, previews and structured content are the same for every client, and a
client without Apps gets exactly what it got before.

This module knows nothing about backends or the store layout; it only sees prepared calls' inputs.
"""

from __future__ import annotations

from functools import cache
from importlib import resources
from typing import Any

import anyio.to_thread
from mcp.server.apps import Apps, client_supports_apps
from mcp.server.mcpserver import Context
from mcp.types import CallToolResult

from . import images as imaging
from . import media
from .backends import InputImage

__all__ = [
    "BEFORE_SIDE",
    "VIEWER_META_KEY",
    "VIEWER_URI",
    "apps_extension",
    "before_image",
    "for_client",
    "viewer_html",
]

#: The viewer's resource; edit_image and compare_seeds point at it (``_meta.ui.resourceUri``).
VIEWER_URI = "ui://flux-mcp/viewer.html"
#: Key of the viewer's facts in a result's ``_meta`` (only for clients that negotiated Apps).
VIEWER_META_KEY = "flux-mcp/viewer"
#: Long side of the before image sent inline when the input is not a stored result.
BEFORE_SIDE = 768


@cache
def viewer_html() -> str:
    """The viewer page, shipped as package data."""
    return resources.files("flux_mcp").joinpath("assets/viewer.html").read_text(encoding="utf-8")


def apps_extension() -> Apps:
    """The SDK's Apps extension with the viewer resource registered; bind tools with ``.tool(...)``."""
    apps = Apps()
    apps.add_html_resource(
        VIEWER_URI,
        viewer_html(),
        name="viewer",
        title="flux-mcp result viewer",
        description="Shows edit_image and compare_seeds results large, with before/after, refine and vary.",
        prefers_border=True,
    )
    return apps


def before_image(first: InputImage | None) -> dict[str, str]:
    """Where the viewer finds the first input image: a stored result by its uri, a small inline JPEG of
    an image the server read itself, or why there is none (an https URL only the backend fetches).

    Blocking (it may encode a JPEG): call it in a worker thread.
    """
    if first is None:
        return {"unavailable": "This call has no input image."}
    if first.source.startswith("flux://images/"):
        return {"uri": first.source}
    if first.data is None:
        return {"unavailable": "The input is a URL the backend fetched itself; it is not shown here."}
    jpeg = imaging.preview(first.data, BEFORE_SIDE)
    return {"data_uri": media.data_uri(jpeg, "image/jpeg")}


async def for_client(ctx: Context, inputs: list[InputImage], result: CallToolResult) -> CallToolResult:
    """The result as the client should get it: unchanged without Apps; with Apps, plus the viewer's
    ``_meta`` (kept out of the text and structured content, so the model's context does not grow)."""
    if result.is_error or not client_supports_apps(ctx):
        return result
    before = await anyio.to_thread.run_sync(before_image, inputs[0] if inputs else None)
    meta: dict[str, Any] = dict(result.meta or {})
    meta[VIEWER_META_KEY] = {"before": before}
    return result.model_copy(update={"meta": meta})

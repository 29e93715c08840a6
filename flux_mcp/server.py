"""The MCP face: tools edit_image, list_presets, compare_seeds and the resource flux://images/{id}.

Thin by design: each tool hands the caller's raw arguments to ``FluxService`` and renders what it
returns as MCP content — one text summary, small JPEG previews (ImageContent), one ResourceLink per
stored image, and structured content with an output schema (never base64 inside it).

The tools' input schemas are derived from the request model (``schema.EditImageArgs`` and
``schema.CompareSeedsArgs``), not from Python signatures: the service validates the raw argument
dict itself, which is how a preset can fill exactly the fields the caller did not send.

This module knows nothing about fal, torch or the file layout of the store.
"""

from __future__ import annotations

import base64
import hmac
import inspect
import ipaddress
import logging
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Annotated, Any

import anyio
from mcp.server.mcpserver import Context, MCPServer
from mcp.server.mcpserver.exceptions import ResourceError, ToolError
from mcp.server.mcpserver.tools.base import Tool
from mcp.server.mcpserver.utilities.func_metadata import ArgModelBase
from mcp.types import CallToolResult, ContentBlock, ImageContent, ResourceLink, TextContent, ToolAnnotations
from pydantic import BaseModel, ConfigDict, Field

from . import __version__, doctor, viewer
from .config import Settings
from .errors import ConfigError, FluxMCPError, NotFound
from .jobs import Job, JobManager
from .results import (
    CompareOutcome,
    CompareOutput,
    EditOutcome,
    EditOutput,
    PresetsOutput,
    cancel_step,
    compare_summary,
    edit_summary,
    pending_summary,
    presets_summary,
)
from .schema import CompareSeedsArgs, EditImageArgs, host_schema, tool_input_schema
from .service import FluxService

__all__ = [
    "AppState",
    "build_server",
    "render_compare",
    "render_edit",
    "render_pending",
    "render_presets",
    "serve",
    "serve_http",
    "serve_stdio",
]

logger = logging.getLogger("flux_mcp")

#: How much a repeated progress value is raised so that notifications keep increasing.
PROGRESS_NUDGE = 0.001

INSTRUCTIONS = """\
Edit images with FLUX.2 [klein] 9B Base and trained edit LoRAs.
- edit_image: give a prompt (include a LoRA's trigger word) and 1-4 images (https URL, data URI, local
  path, or flux://images/<id> of an earlier result). Results are saved to disk and returned as previews
  and structured content with ids, flux://images/<id> URIs and paths.
- compare_seeds: same arguments, run with several seeds at once, or on a grid of varied arguments at one
  seed (vary); returns one labelled contact sheet.
- list_presets: presets, image sizes, the user's LoRA library (with trigger words) and the active backend.
- Long calls return a job id instead of timing out: collect with get_result, stop with cancel_job.
Chain edits by passing flux://images/<id> from one result into the next call's image_urls.
"""


class _RawArguments(ArgModelBase):
    """Accepts any argument object and hands it, untouched, to the tool as ``arguments``.

    The SDK would otherwise validate (and fill defaults from) the function signature; the service
    validates against the request model instead, and needs to see which fields the caller sent.
    """

    model_config = ConfigDict(extra="allow")

    def model_dump_one_level(self) -> dict[str, Any]:
        return {"arguments": dict(self.model_extra or {})}


@dataclass(frozen=True)
class AppState:
    """What the lifespan gives every request: the service and the job manager."""

    service: FluxService
    jobs: JobManager


def _state(ctx: Context) -> AppState:
    return ctx.request_context.lifespan_context


def _service(ctx: Context) -> FluxService:
    return _state(ctx).service


def _progress(ctx: Context) -> Callable[[float, float | None, str], Awaitable[None]]:
    """The call's progress sink. MCP wants every notification's value to increase, while a backend
    may repeat a value with a new message (queue position, a phase, a heartbeat): nudge those up."""
    last = -1.0

    async def report(progress: float, total: float | None, message: str) -> None:
        nonlocal last
        value = progress if progress > last else round(last + PROGRESS_NUDGE, 6)
        if total is not None and value > total:
            total = value
        last = value
        await ctx.report_progress(value, total, message)

    return report


async def _call_as_job(ctx: Context, tool: str, arguments: dict[str, Any]) -> CallToolResult:
    """Validate, start the job, wait up to the call budget; the result, or a "still running" answer."""
    state = _state(ctx)
    try:
        call = await state.service.prepare(tool, arguments)
    except FluxMCPError as exc:
        raise ToolError(str(exc)) from exc
    job = await state.jobs.submit(call)
    try:
        finished = await state.jobs.wait(job, state.service.settings.call_budget_s, _progress(ctx))
    except anyio.get_cancelled_exc_class():
        # The host cancelled the call while it was still a call: stop the work (and fal's job).
        with anyio.CancelScope(shield=True):
            await state.jobs.cancel(job)
        raise
    if not finished:
        result = render_pending(job, await state.jobs.pending_view(job))
    else:
        result = await _job_result(state.jobs, job)
    return await viewer.for_client(ctx, call.inputs, result)


async def _job_result(jobs: JobManager, job: Job) -> CallToolResult:
    if job.state == "done":
        outcome = await jobs.outcome(job)
        links = jobs.service.settings.resource_links
        if isinstance(outcome, CompareOutcome):
            return render_compare(outcome, links)
        return render_edit(outcome, links)
    if job.state == "failed":
        raise ToolError(job.record.info.error or "the job failed")
    if job.state == "cancelled":
        raise ToolError(f"job {job.id} was cancelled; nothing was saved for it.")
    return render_pending(job, await jobs.pending_view(job))


async def edit_image(arguments: dict[str, Any], ctx: Context) -> Annotated[CallToolResult, EditOutput]:
    """Edit 1-4 images with FLUX.2 [klein] 9B Base and edit LoRAs.

    Results are saved before the call returns: previews, ids, paths and seeds. Chain edits with
    flux://images/<id> in image_urls. A long call returns a job id: collect it with get_result.
    """
    return await _call_as_job(ctx, "edit_image", arguments)


async def compare_seeds(arguments: dict[str, Any], ctx: Context) -> Annotated[CallToolResult, CompareOutput]:
    """Run one edit with 2-8 seeds, or on a grid of varied arguments (vary): one labelled contact sheet.

    Arguments as in edit_image (see its descriptions), minus seed and num_images, plus seeds or count.
    Every image is saved with its own id. Long runs return a job id: collect it with get_result.
    """
    return await _call_as_job(ctx, "compare_seeds", arguments)


async def get_result(
    job_id: Annotated[str, Field(description="From a still-running edit_image/compare_seeds result.")],
    ctx: Context,
    wait_s: Annotated[
        float,
        Field(ge=0, le=3600, description="Seconds to wait for it (capped at the call budget)."),
    ] = 0,
) -> CallToolResult:
    """Collect a job: what its edit_image/compare_seeds call returns once done, else its progress."""
    state = _state(ctx)
    try:
        job = await state.jobs.get(job_id)
    except FluxMCPError as exc:
        raise ToolError(str(exc)) from exc
    await state.jobs.wait(job, min(wait_s, state.service.settings.call_budget_s), _progress(ctx))
    return await _job_result(state.jobs, job)


async def cancel_job(
    job_id: Annotated[str, Field(description="The job id to stop.")], ctx: Context
) -> CallToolResult:
    """Stop a running job (on fal too); a local one answers 'cancelling' and stops at its next step.
    Finished jobs are left as they are."""
    state = _state(ctx)
    try:
        job = await state.jobs.get(job_id)
        await state.jobs.cancel(job)
    except FluxMCPError as exc:
        raise ToolError(str(exc)) from exc
    info = job.record.info
    step = cancel_step(info)
    return CallToolResult(
        content=[TextContent(type="text", text=f"Job {job.id} is {info.state}. {step}")],
        structured_content={"job": info.model_dump(mode="json"), "next_step": step},
    )


def render_pending(job: Job, pending: BaseModel) -> CallToolResult:
    return CallToolResult(
        content=[
            TextContent(type="text", text=pending_summary(job.record.info, getattr(pending, "notes", [])))
        ],
        structured_content=pending.model_dump(mode="json"),
    )


async def list_presets(ctx: Context) -> Annotated[CallToolResult, PresetsOutput]:
    """Presets, image sizes, the LoRA library (trigger words), CNS settings explained, the backend."""
    return render_presets(await anyio.to_thread.run_sync(_service(ctx).presets))


def render_edit(outcome: EditOutcome, links: bool = False) -> CallToolResult:
    """Text, previews and (with ``links``, FLUX_MCP_RESOURCE_LINKS) one resource link per image."""
    out = outcome.output
    content: list[ContentBlock] = [TextContent(type="text", text=edit_summary(out))]
    content += [_image_block(p) for p in outcome.previews]
    if links:
        content += [_link(img.uri, img.id, img.content_type, img.width, img.height) for img in out.images]
    return CallToolResult(content=content, structured_content=out.model_dump(mode="json"))


def render_compare(outcome: CompareOutcome, links: bool = False) -> CallToolResult:
    out = outcome.output
    content: list[ContentBlock] = [
        TextContent(type="text", text=compare_summary(out)),
        _image_block(outcome.sheet),
    ]
    content += [
        _link(r.image.uri, f"seed {r.seed}", r.image.content_type, r.image.width, r.image.height)
        for r in out.runs
        if r.image is not None and links
    ]
    return CallToolResult(content=content, structured_content=out.model_dump(mode="json"))


def render_presets(out: PresetsOutput) -> CallToolResult:
    return CallToolResult(
        content=[TextContent(type="text", text=presets_summary(out))],
        structured_content=out.model_dump(mode="json"),
    )


def _image_block(jpeg: bytes) -> ImageContent:
    return ImageContent(type="image", data=base64.b64encode(jpeg).decode(), mime_type="image/jpeg")


def _link(uri: str, name: str, mime: str, width: int, height: int) -> ResourceLink:
    return ResourceLink(
        type="resource_link",
        uri=uri,
        name=name,
        mime_type=mime,
        description=f"full-resolution {width}x{height}",
    )


_MAGIC = ((b"\x89PNG\r\n\x1a\n", "image/png"), (b"\xff\xd8\xff", "image/jpeg"))


def _sniff(data: bytes) -> str:
    for magic, mime in _MAGIC:
        if data.startswith(magic):
            return mime
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "image/webp"
    return "application/octet-stream"


class FluxMCPServer(MCPServer[AppState]):
    """MCPServer whose image resource reports each file's real MIME type (templates declare one)."""

    async def read_resource(self, uri: Any, context: Any = None) -> Any:
        results = await super().read_resource(uri, context)
        if str(uri).startswith("flux://images/") and isinstance(results, list | tuple):
            for item in results:
                if isinstance(item.content, bytes):
                    item.mime_type = _sniff(item.content)
        return results

    def use_model_arguments(self, name: str, args_model: type[BaseModel]) -> None:
        """Make a registered tool take its raw arguments (``_RawArguments``), advertised with
        ``args_model``'s schema. A tool bound through an extension is built by the SDK from the
        function's signature, so this is applied once it is registered."""
        tool = self._tool_manager.get_tool(name)
        if tool is None:
            raise ValueError(f"no tool named {name!r} is registered")
        tool.parameters = tool_input_schema(args_model)
        tool.fn_metadata.arg_model = _RawArguments


def build_server(settings: Settings, service: FluxService | None = None) -> FluxMCPServer:
    """The MCP server, with a lifespan that starts (and closes) one FluxService."""

    @asynccontextmanager
    async def lifespan(_: MCPServer[AppState]) -> AsyncIterator[AppState]:
        svc = service or FluxService(settings)
        await svc.start()
        try:
            async with JobManager(svc).running() as jobs:
                yield AppState(svc, jobs)
        finally:
            await svc.aclose()

    writes = ToolAnnotations(
        read_only_hint=False, destructive_hint=False, idempotent_hint=False, open_world_hint=True
    )
    # edit_image and compare_seeds are bound to the viewer through the SDK's Apps extension.
    apps = viewer.apps_extension()
    for fn, title in (
        (edit_image, "Edit images with FLUX.2 klein + LoRAs"),
        (compare_seeds, "Compare seeds or parameters of one edit"),
    ):
        apps.tool(
            resource_uri=viewer.VIEWER_URI,
            name=fn.__name__,
            title=title,
            description=inspect.cleandoc(fn.__doc__ or ""),
            annotations=writes,
        )(fn)
    tools = [
        Tool.from_function(
            list_presets,
            name="list_presets",
            title="List presets, LoRA library and backend",
            description=inspect.cleandoc(list_presets.__doc__ or ""),
            annotations=ToolAnnotations(read_only_hint=True, idempotent_hint=True, open_world_hint=False),
        ),
        Tool.from_function(
            get_result,
            name="get_result",
            title="Collect a long-running edit",
            description=inspect.cleandoc(get_result.__doc__ or ""),
            structured_output=False,
            annotations=ToolAnnotations(read_only_hint=True, idempotent_hint=True, open_world_hint=False),
        ),
        Tool.from_function(
            cancel_job,
            name="cancel_job",
            title="Cancel a long-running edit",
            description=inspect.cleandoc(cancel_job.__doc__ or ""),
            structured_output=False,
            annotations=ToolAnnotations(destructive_hint=True, idempotent_hint=True, open_world_hint=True),
        ),
    ]
    for tool in tools:
        tool.parameters = host_schema(tool.parameters)
    server = FluxMCPServer(
        "flux-mcp",
        title="FLUX.2 klein edit LoRAs",
        instructions=INSTRUCTIONS,
        version=__version__,
        lifespan=lifespan,
        tools=tools,
        extensions=[apps],
    )
    server.use_model_arguments("edit_image", EditImageArgs)
    server.use_model_arguments("compare_seeds", CompareSeedsArgs)

    @server.resource(
        "flux://images/{image_id}",
        name="image",
        title="Stored result image",
        description="A result image at full resolution, by its id.",
        mime_type="image/png",
    )
    async def image(image_id: str, ctx: Context) -> bytes:
        try:
            data, _ = await _service(ctx).read_image(image_id)
        except NotFound as exc:
            raise ResourceError(str(exc)) from exc
        return data

    return server


# -- serving ------------------------------------------------------------------------------------


def serve(settings: Settings, *, http: bool, host: str, port: int, path: str, allow_hosts: list[str]) -> None:
    """Serve MCP over stdio, or streamable HTTP with ``http``; the set-up summary goes to stderr first
    (hosts show it in their MCP logs)."""
    doctor.log_startup(settings)
    if http:
        serve_http(settings, host=host, port=port, path=path, allow_hosts=allow_hosts)
    else:
        serve_stdio(settings)


def serve_stdio(settings: Settings) -> None:
    """Serve MCP over stdio (what Claude Desktop and most hosts start); a line that is not JSON-RPC gets
    a JSON-RPC error instead of silence (``stdio``)."""
    from . import stdio

    anyio.run(stdio.serve_stdio, build_server(settings))


def serve_http(settings: Settings, *, host: str, port: int, path: str, allow_hosts: list[str]) -> None:
    """Serve streamable HTTP at ``http://host:port/path``. Loopback by default; any other address needs
    FLUX_MCP_HTTP_TOKEN, checked on every request. DNS-rebinding protection stays on (``allow_hosts``
    adds accepted Host names)."""
    import uvicorn
    from mcp.server.transport_security import TransportSecuritySettings

    if not _is_loopback(host) and not settings.http_token:
        raise ConfigError(
            f"Refusing to serve on {host} without a token: set FLUX_MCP_HTTP_TOKEN (clients then send "
            "'Authorization: Bearer <token>'), or bind to 127.0.0.1."
        )
    hosts = ["127.0.0.1", "localhost", "[::1]", host, *allow_hosts]
    security = TransportSecuritySettings(
        enable_dns_rebinding_protection=True,
        allowed_hosts=[h for name in hosts for h in (name, f"{name}:{port}")],
        allowed_origins=[f"http://{h}:{port}" for h in hosts] + [f"https://{h}" for h in hosts],
    )
    app: Any = build_server(settings).streamable_http_app(
        streamable_http_path=path, transport_security=security, host=host
    )
    if settings.http_token:
        app = _BearerAuth(app, settings.http_token)
    print(f"flux-mcp {__version__}: streamable HTTP on http://{host}:{port}{path}", file=sys.stderr)
    uvicorn.run(app, host=host, port=port, log_level="warning")


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


class _BearerAuth:
    """ASGI middleware: every HTTP request must carry ``Authorization: Bearer <FLUX_MCP_HTTP_TOKEN>``."""

    def __init__(self, app: Any, token: str) -> None:
        self.app = app
        self._expected = f"Bearer {token}".encode()

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "http":
            given = dict(scope.get("headers") or []).get(b"authorization", b"")
            if not hmac.compare_digest(given, self._expected):
                await send(
                    {
                        "type": "http.response.start",
                        "status": 401,
                        "headers": [(b"content-type", b"application/json"), (b"www-authenticate", b"Bearer")],
                    }
                )
                await send(
                    {
                        "type": "http.response.body",
                        "body": b'{"error":"missing or wrong bearer token (FLUX_MCP_HTTP_TOKEN)"}',
                    }
                )
                return
        await self.app(scope, receive, send)

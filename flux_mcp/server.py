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
import logging
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

from . import __version__
from .config import Settings
from .errors import FluxMCPError, NotFound
from .jobs import Job, JobManager
from .schema import CompareSeedsArgs, EditImageArgs
from .service import CompareOutcome, CompareOutput, EditOutcome, EditOutput, FluxService, PresetsOutput

__all__ = [
    "AppState",
    "build_server",
    "render_compare",
    "render_edit",
    "render_pending",
    "render_presets",
    "tool_input_schema",
]

logger = logging.getLogger("flux_mcp")

#: How much a repeated progress value is raised so that notifications keep increasing.
PROGRESS_NUDGE = 0.001

INSTRUCTIONS = """\
Edit images with FLUX.2 [klein] 9B Base and trained edit LoRAs.
- edit_image: give a prompt (include a LoRA's trigger word) and 1-4 images (https URL, data URI, local
  path, or flux://images/<id> of an earlier result). Results are saved to disk and returned as previews,
  resource links and structured content with ids and paths.
- compare_seeds: same arguments, run with several seeds at once; returns one labelled contact sheet.
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


def tool_input_schema(model: type[BaseModel]) -> dict[str, Any]:
    """A model's JSON Schema with every ``$ref`` inlined (several hosts do not follow $defs)."""
    schema = model.model_json_schema()
    defs = schema.pop("$defs", {})

    def inline(node: Any) -> Any:
        if isinstance(node, dict):
            ref = node.get("$ref")
            if isinstance(ref, str) and ref.startswith("#/$defs/"):
                target = inline(defs[ref.split("/")[-1]])
                return {**target, **{k: inline(v) for k, v in node.items() if k != "$ref"}}
            return {k: inline(v) for k, v in node.items()}
        if isinstance(node, list):
            return [inline(v) for v in node]
        return node

    return inline(schema)


def _model_tool(
    fn: Callable[..., Awaitable[Any]],
    *,
    name: str,
    title: str,
    description: str,
    args_model: type[BaseModel],
    annotations: ToolAnnotations,
) -> Tool:
    tool = Tool.from_function(fn, name=name, title=title, description=description, annotations=annotations)
    tool.parameters = tool_input_schema(args_model)
    tool.fn_metadata.arg_model = _RawArguments
    return tool


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
        return render_pending(job, await state.jobs.pending_view(job))
    return await _job_result(state.jobs, job)


async def _job_result(jobs: JobManager, job: Job) -> CallToolResult:
    if job.state == "done":
        outcome = await jobs.outcome(job)
        return render_compare(outcome) if isinstance(outcome, CompareOutcome) else render_edit(outcome)
    if job.state == "failed":
        raise ToolError(job.record.info.error or "the job failed")
    if job.state == "cancelled":
        raise ToolError(f"job {job.id} was cancelled; nothing was saved for it.")
    return render_pending(job, await jobs.pending_view(job))


async def edit_image(arguments: dict[str, Any], ctx: Context) -> Annotated[CallToolResult, EditOutput]:
    """Apply FLUX.2 [klein] 9B Base (with edit LoRAs) to 1-4 input images.

    Results are saved to the output folder before the call returns; each comes back as a small
    preview, a flux://images/<id> resource link and structured data (id, path, seed). Pass a
    flux://images/<id> in image_urls to keep editing a result. A call that takes longer than the
    server's time budget returns a job id instead; collect the result with get_result.
    """
    return await _call_as_job(ctx, "edit_image", arguments)


async def compare_seeds(arguments: dict[str, Any], ctx: Context) -> Annotated[CallToolResult, CompareOutput]:
    """Run the same edit with 2-8 seeds and return one labelled contact sheet.

    Give `seeds` (explicit) or `count` (random seeds, reported). Every image is saved with its own id;
    re-run edit_image with the seed you like, or use its flux://images/<id> as the next input.
    Long runs return a job id; collect the result with get_result.
    """
    return await _call_as_job(ctx, "compare_seeds", arguments)


async def get_result(
    job_id: Annotated[
        str, Field(description="The job id from a 'still running' edit_image/compare_seeds result.")
    ],
    ctx: Context,
    wait_s: Annotated[
        float,
        Field(
            ge=0, le=3600, description="Wait up to this many seconds for the job (capped at the call budget)."
        ),
    ] = 0,
) -> CallToolResult:
    """Collect a job: exactly what the original edit_image/compare_seeds call would have returned once it is
    done, or its progress while it still runs. Works after a server restart too."""
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
    """Stop a running job (a hosted job is cancelled on fal as well). A local job answers 'cancelling' at
    once and stops at its next denoising step; nothing is saved for it. Finished jobs are left as they are."""
    state = _state(ctx)
    try:
        job = await state.jobs.get(job_id)
        await state.jobs.cancel(job)
    except FluxMCPError as exc:
        raise ToolError(str(exc)) from exc
    info = job.record.info
    return CallToolResult(
        content=[TextContent(type="text", text=f"Job {job.id} is {info.state}.")],
        structured_content={"job": info.model_dump(mode="json")},
    )


def render_pending(job: Job, pending: BaseModel) -> CallToolResult:
    info = job.record.info
    done = f"{info.progress:g}/{info.total:g}" if info.total else f"{info.progress:g}"
    text = (
        f"Still running after the server's time budget: job {job.id} ({info.state}, progress {done}: "
        f"{info.message or 'working'}). The work continues on the server and every image will be saved. "
        f"Call get_result with job_id={job.id!r} (and wait_s up to a minute) to collect it, "
        "or cancel_job to stop it."
    )
    if info.state == "cancelling":
        text = f"Job {job.id} is being cancelled (progress {done}): it stops at its next step; nothing will be saved."
    return CallToolResult(
        content=[TextContent(type="text", text=text)], structured_content=pending.model_dump(mode="json")
    )


async def list_presets(ctx: Context) -> Annotated[CallToolResult, PresetsOutput]:
    """List presets (built-in and the user's), image-size presets, the LoRA library with trigger words,
    and the active backend with what it supports."""
    return render_presets(await anyio.to_thread.run_sync(_service(ctx).presets))


def render_edit(outcome: EditOutcome) -> CallToolResult:
    out = outcome.output
    lines = [
        f"Edited {len(out.images)} image(s) on {out.backend} ({out.endpoint}), seed {out.seed}, "
        f"{out.params['num_inference_steps']} steps"
        + (f", preset {out.preset}" if out.preset else "")
        + f"; estimated cost ${out.estimated_cost_usd:.3f}.",
    ]
    for i, img in enumerate(out.images, 1):
        lines.append(f"{i}. {img.uri} -> {img.path} ({img.width}x{img.height}, seed {img.seed})")
    lines += _tail(out.library_loras, out.notes)
    lines.append("To keep editing a result, pass its flux://images/<id> in image_urls.")
    content: list[ContentBlock] = [TextContent(type="text", text="\n".join(lines))]
    content += [_image_block(p) for p in outcome.previews]
    content += [_link(img.uri, img.id, img.content_type, img.width, img.height) for img in out.images]
    return CallToolResult(content=content, structured_content=out.model_dump(mode="json"))


def render_compare(outcome: CompareOutcome) -> CallToolResult:
    out = outcome.output
    ok = [r for r in out.runs if r.image is not None]
    lines = [
        f"Compared {len(out.runs)} seeds on {out.backend} ({len(ok)} succeeded"
        + (f", {len(out.failed_seeds)} failed" if out.failed_seeds else "")
        + f"); estimated cost ${out.estimated_cost_usd:.3f}. The contact sheet is labelled by seed."
    ]
    for run in out.runs:
        if run.image is not None:
            lines.append(f"- seed {run.seed}: {run.image.uri} -> {run.image.path}")
        else:
            lines.append(f"- seed {run.seed}: FAILED: {run.error}")
    lines += _tail(out.library_loras, out.notes)
    lines.append(
        "Next: call edit_image with the seed you prefer (e.g. with preset 'quality'), "
        "or pass that image's flux://images/<id> in image_urls to edit it further."
    )
    content: list[ContentBlock] = [
        TextContent(type="text", text="\n".join(lines)),
        _image_block(outcome.sheet),
    ]
    content += [
        _link(r.image.uri, f"seed {r.seed}", r.image.content_type, r.image.width, r.image.height)
        for r in ok
        if r.image is not None
    ]
    return CallToolResult(content=content, structured_content=out.model_dump(mode="json"))


def render_presets(out: PresetsOutput) -> CallToolResult:
    lines = ["Presets (arguments you give always win over a preset's):"]
    for p in out.presets:
        params = ", ".join(f"{k}={v}" for k, v in p.params.items())
        lines.append(f"- {p.name} [{p.source}]: {p.description} ({params})")
    lines.append("Image sizes: " + ", ".join(f"{s.name} {s.width}x{s.height}" for s in out.image_sizes))
    if out.loras:
        lines.append("LoRA library (use the name as loras[].path):")
        for lora in out.loras:
            trigger = f", trigger word {lora.trigger_word!r}" if lora.trigger_word else ""
            lines.append(f"- {lora.name}: {lora.description} (scale {lora.scale:g}{trigger}; {lora.path})")
    else:
        lines.append(f"LoRA library: empty (add [loras.NAME] entries to {out.presets_file}).")
    if out.presets_file_error:
        lines.append(f"WARNING: the presets file could not be used: {out.presets_file_error}")
    backend = out.backend
    if backend.get("name"):
        lines.append("Backend: " + ", ".join(f"{k}={v}" for k, v in backend.items()))
    else:
        lines.append(f"Backend: not available: {backend.get('error')}")
    return CallToolResult(
        content=[TextContent(type="text", text="\n".join(lines))],
        structured_content=out.model_dump(mode="json"),
    )


def _tail(library_loras: list[Any], notes: list[str]) -> list[str]:
    lines = []
    for lora in library_loras:
        if lora.trigger_word:
            lines.append(
                f"LoRA {lora.name!r} has the trigger word {lora.trigger_word!r}: include it in the prompt "
                "if it is not there (the prompt was sent as you wrote it)."
            )
    lines += [f"Note: {n}" for n in notes]
    return lines


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
    tools = [
        _model_tool(
            edit_image,
            name="edit_image",
            title="Edit images with FLUX.2 klein + LoRAs",
            description=edit_image.__doc__ or "",
            args_model=EditImageArgs,
            annotations=writes,
        ),
        _model_tool(
            compare_seeds,
            name="compare_seeds",
            title="Compare seeds of one edit",
            description=compare_seeds.__doc__ or "",
            args_model=CompareSeedsArgs,
            annotations=writes,
        ),
        Tool.from_function(
            list_presets,
            name="list_presets",
            title="List presets, LoRA library and backend",
            description=list_presets.__doc__ or "",
            annotations=ToolAnnotations(read_only_hint=True, idempotent_hint=True, open_world_hint=False),
        ),
        Tool.from_function(
            get_result,
            name="get_result",
            title="Collect a long-running edit",
            description=get_result.__doc__ or "",
            structured_output=False,
            annotations=ToolAnnotations(read_only_hint=True, idempotent_hint=True, open_world_hint=False),
        ),
        Tool.from_function(
            cancel_job,
            name="cancel_job",
            title="Cancel a long-running edit",
            description=cancel_job.__doc__ or "",
            structured_output=False,
            annotations=ToolAnnotations(destructive_hint=True, idempotent_hint=True, open_world_hint=True),
        ),
    ]
    server = FluxMCPServer(
        "flux-mcp",
        title="FLUX.2 klein edit LoRAs",
        instructions=INSTRUCTIONS,
        version=__version__,
        lifespan=lifespan,
        tools=tools,
    )

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

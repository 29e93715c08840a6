"""The job manager on its own, with a backend of the test's making that stays silent for a while
(a long fal queue or a model load): waiting callers still hear from the job regularly."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import anyio
import pytest

from flux_mcp.backends import BackendResult, CostEstimate, GeneratedImage, InputImage, RunContext, RunOutcome
from flux_mcp.config import Settings
from flux_mcp.jobs import JobManager
from flux_mcp.schema import EditRequest
from flux_mcp.service import FluxService

from .conftest import data_uri, make_png

pytestmark = pytest.mark.anyio


class SilentBackend:
    """A backend of the test's own (the whole Backend protocol): says nothing for ``quiet_s``
    seconds per run, then returns one image."""

    name = "silent"
    endpoint = "test/silent"
    resumable = False
    cancels_promptly = True

    def __init__(self, quiet_s: float) -> None:
        self.quiet_s = quiet_s

    def capabilities(self) -> dict[str, Any]:
        return {}

    def estimate_cost(self, runs: list[EditRequest], inputs: list[InputImage]) -> CostEstimate:
        return CostEstimate(0.0, billed=False)

    async def run(
        self, runs: list[EditRequest], inputs: list[InputImage], ctx: RunContext
    ) -> list[RunOutcome]:
        outcomes: list[RunOutcome] = []
        for request in runs:
            await ctx.progress(0, None, "queued at position 3")
            await anyio.sleep(self.quiet_s)
            image = GeneratedImage(make_png(), "image/png", 64, 48, seed=request.seed or 0)
            outcomes.append(BackendResult([image], seed=image.seed))
        return outcomes

    async def collect(
        self, remote: dict[int, str], runs: list[EditRequest], ctx: RunContext
    ) -> list[RunOutcome]:
        raise AssertionError("not resumable: never called")

    async def aclose(self) -> None:
        return None


async def test_a_silent_job_still_sends_heartbeats_and_finishes(tmp_path: Path) -> None:
    settings = Settings(
        output_dir=tmp_path / "out", input_roots=(tmp_path,), presets_file=tmp_path / "p.toml"
    )
    service = FluxService(settings, backend=SilentBackend(quiet_s=1.0))
    await service.start()
    heard: list[tuple[float, str]] = []

    async def listener(value: float, total: float | None, message: str) -> None:
        heard.append((value, message))

    async with JobManager(service, heartbeat_s=0.2).running() as jobs:
        call = await service.prepare(
            "edit_image", {"prompt": "p", "image_urls": [data_uri(make_png())], "seed": 4}
        )
        job = await jobs.submit(call)
        with anyio.fail_after(10):
            assert await jobs.wait(job, 5, listener)
    assert job.state == "done" and job.outcome is not None
    repeats = [m for _, m in heard if m == "queued at position 3"]
    assert len(repeats) >= 3, heard
    assert Path(job.outcome.output.images[0].path).is_file()


async def test_hosts_that_send_lists_as_json_strings_are_understood(tmp_path: Path) -> None:
    """Claude Desktop has been seen sending list and object arguments as JSON text."""
    from mcp import Client

    from flux_mcp.server import build_server

    settings = Settings(
        output_dir=tmp_path / "out", input_roots=(tmp_path,), presets_file=tmp_path / "p.toml"
    )
    server = build_server(settings, FluxService(settings, backend=SilentBackend(quiet_s=0)))
    uri = data_uri(make_png())
    async with Client(server) as client:
        result = await client.call_tool(
            "edit_image",
            {
                "prompt": "p",
                "image_urls": f'["{uri}"]',
                "image_size": '{"width": 64, "height": 48}',
                "seed": 2,
            },
        )
        compared = await client.call_tool(
            "compare_seeds", {"prompt": "p", "image_urls": [uri], "seeds": "[5, 6]"}
        )
    assert not result.is_error, result.content
    assert result.structured_content["params"]["image_size"] == {"width": 64, "height": 48}
    assert not compared.is_error, compared.content
    assert [run["seed"] for run in compared.structured_content["runs"]] == [5, 6]

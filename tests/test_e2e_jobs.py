"""Edits that outlive the host's tool-call timeout: jobs, get_result, cancel_job, restarts —
through the real mcp client over stdio against the loopback fal emulator.

"fal" finishes when the test says so (the emulator holds jobs halfway until ``release_jobs()``), so no
test races a model latency against the call budget on a loaded machine."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import anyio
import pytest

from .conftest import server_env, stdio_client, text_of

pytestmark = pytest.mark.anyio

EDIT = {"prompt": "make it night", "seed": 5, "num_inference_steps": 8}


def _env(tmp_path: Path, emulator: Any, budget: str = "1", **extra: str) -> dict[str, str]:
    (tmp_path / "inputs").mkdir(exist_ok=True)
    return server_env(tmp_path, **emulator.env(), FLUX_MCP_CALL_BUDGET_S=budget, **extra)


async def _collect(client: Any, job_id: str, progress: Any = None, limit_s: float = 60) -> Any:
    """get_result until the job is no longer running (each call waits at most the 1 s budget);
    ``limit_s`` is only the safety net."""
    with anyio.fail_after(limit_s):
        while True:
            result = await client.call_tool(
                "get_result", {"job_id": job_id, "wait_s": 5}, progress_callback=progress
            )
            job = (result.structured_content or {}).get("job")
            if result.is_error or not job or job["state"] not in ("queued", "running"):
                return result


async def _start(client: Any, tool: str, arguments: dict[str, Any], progress: Any = None) -> str:
    """Call ``tool`` on a held job: it answers "still running" after the budget; the job's id."""
    with anyio.fail_after(60):
        pending = await client.call_tool(tool, arguments, progress_callback=progress)
    assert not pending.is_error, text_of(pending)
    job = pending.structured_content["job"]
    assert job["state"] in ("queued", "running") and job["id"].startswith("job-")
    assert "get_result" in text_of(pending) and job["id"] in text_of(pending)
    assert pending.structured_content.get("images", []) == []
    return str(job["id"])


def _blocks(result: Any) -> list[tuple[str, Any]]:
    """A result's content in comparable form (type + payload)."""
    out = []
    for block in result.content:
        payload = (
            getattr(block, "text", None) or getattr(block, "data", None) or str(getattr(block, "uri", ""))
        )
        out.append((block.type, payload))
    return out


async def test_short_calls_are_unchanged(tmp_path: Path, emulator: Any, input_png: Path) -> None:
    async with stdio_client(_env(tmp_path, emulator, budget="30")) as client:
        result = await client.call_tool("edit_image", {**EDIT, "image_urls": [str(input_png)]})
    assert not result.is_error
    assert result.structured_content["job"] is None and len(result.structured_content["images"]) == 1
    assert "get_result" not in text_of(result)


async def test_a_call_past_its_budget_becomes_a_job_that_get_result_collects(
    tmp_path: Path, emulator: Any, input_png: Path
) -> None:
    emulator.hold_jobs()
    progress: list[str] = []

    async def on_progress(value: float, total: float | None, message: str | None) -> None:
        progress.append(message or "")

    # With FLUX_MCP_RESOURCE_LINKS, results carry resource links too (off by default).
    async with stdio_client(_env(tmp_path, emulator, FLUX_MCP_RESOURCE_LINKS="true")) as client:
        job_id = await _start(
            client, "edit_image", {**EDIT, "image_urls": [str(input_png)]}, progress=on_progress
        )
        with anyio.fail_after(60):  # held halfway on "fal": get_result reports that progress
            while not any("Step 4/8" in message for message in progress):
                early = await client.call_tool(
                    "get_result", {"job_id": job_id}, progress_callback=on_progress
                )
                assert not early.is_error and early.structured_content["job"]["id"] == job_id
        emulator.release_jobs()
        done = await _collect(client, job_id)
        assert not done.is_error, text_of(done)
        again = await client.call_tool("get_result", {"job_id": job_id})

    out = done.structured_content
    assert out["job"] is None and len(out["images"]) == 1 and Path(out["images"][0]["path"]).is_file()
    assert [b[0] for b in _blocks(done)] == ["text", "image", "resource_link"]
    assert _blocks(again) == _blocks(done)
    assert len(emulator.submissions) == 1, "the job ran once; get_result only collects"
    record = json.loads((tmp_path / "out" / "jobs" / f"{job_id}.json").read_text())
    assert record["info"]["state"] == "done" and record["remote"] == {"0": emulator.submissions[0].request_id}
    assert record["call"]["kind"] == "edit" and len(record["call"]["runs"]) == 1


async def test_get_result_waits_no_longer_than_the_call_budget(
    tmp_path: Path, emulator: Any, input_png: Path
) -> None:
    """wait_s is capped at FLUX_MCP_CALL_BUDGET_S (1 s here), so get_result never outlasts the host's
    tool-call timeout: asked to wait an hour for a job that does not finish, it still answers."""
    emulator.hold_jobs()  # never released: only the cap can end the wait
    async with stdio_client(_env(tmp_path, emulator)) as client:
        job_id = await _start(client, "edit_image", {**EDIT, "image_urls": [str(input_png)]})
        with anyio.fail_after(30):  # the safety net, 30x the budget; an uncapped wait lasts 3600 s
            waited = await client.call_tool("get_result", {"job_id": job_id, "wait_s": 3600})
        await client.call_tool("cancel_job", {"job_id": job_id})
    assert not waited.is_error, text_of(waited)
    assert waited.structured_content["job"]["state"] == "running" and "get_result" in text_of(waited)


async def test_cancel_job_reaches_fals_cancel(tmp_path: Path, emulator: Any, input_png: Path) -> None:
    emulator.hold_jobs()
    async with stdio_client(_env(tmp_path, emulator)) as client:
        job_id = await _start(client, "edit_image", {**EDIT, "image_urls": [str(input_png)]})
        cancelled = await client.call_tool("cancel_job", {"job_id": job_id})
        after = await client.call_tool("get_result", {"job_id": job_id})
        unknown = await client.call_tool("get_result", {"job_id": "job-20200101-000000-00000000"})
        bogus = await client.call_tool("cancel_job", {"job_id": "../../etc/passwd"})
    assert cancelled.structured_content["job"]["state"] == "cancelled"
    assert emulator.cancellations == [emulator.submissions[0].request_id]
    assert after.is_error and "cancelled" in text_of(after)
    assert unknown.is_error and "No job" in text_of(unknown)
    assert bogus.is_error and "not a job id" in text_of(bogus)
    assert list((tmp_path / "out").glob("*.png")) == []


async def test_a_finished_job_survives_a_restart_with_the_same_content(
    tmp_path: Path, emulator: Any, input_png: Path
) -> None:
    emulator.hold_jobs()
    env = _env(tmp_path, emulator)
    async with stdio_client(env) as client:
        job_id = await _start(
            client,
            "compare_seeds",
            {"prompt": EDIT["prompt"], "image_urls": [str(input_png)], "seeds": [1, 2]},
        )
        emulator.release_jobs()
        before = await _collect(client, job_id)
    assert not before.is_error, text_of(before)
    async with stdio_client(env) as client:
        after = await client.call_tool("get_result", {"job_id": job_id})
    assert _blocks(after) == _blocks(before)
    assert after.structured_content == before.structured_content
    assert len(emulator.submissions) == 2


async def test_a_hosted_job_running_at_restart_is_resumed_by_its_request_id(
    tmp_path: Path, emulator: Any, input_png: Path
) -> None:
    emulator.hold_jobs()
    env = _env(tmp_path, emulator)
    async with stdio_client(env) as client:
        job_id = await _start(client, "edit_image", {**EDIT, "image_urls": [str(input_png)]})
        # fal has the job and the server polls it (its request id is recorded before the first poll).
        assert await anyio.to_thread.run_sync(
            lambda: emulator.wait_until(lambda: emulator.route_events("status"), 30)
        )
    # The server is gone; fal's job was left running, not cancelled.
    assert emulator.cancellations == []
    record = json.loads((tmp_path / "out" / "jobs" / f"{job_id}.json").read_text())
    assert record["info"]["state"] == "running" and record["remote"]
    emulator.release_jobs()
    async with stdio_client(env) as client:
        done = await _collect(client, job_id)
    assert not done.is_error, text_of(done)
    assert len(emulator.submissions) == 1, "resumed, not submitted again"
    (image,) = done.structured_content["images"]
    assert Path(image["path"]).is_file() and image["seed"] == EDIT["seed"]


async def test_a_grid_running_at_restart_is_resumed_cell_by_cell(
    tmp_path: Path, emulator: Any, input_png: Path
) -> None:
    emulator.latency_s = 3
    env = _env(tmp_path, emulator)
    vary = [{"field": "guidance_scale", "values": [3, 5, 7]}]
    async with stdio_client(env) as client:
        pending = await client.call_tool(
            "compare_seeds",
            {"prompt": EDIT["prompt"], "image_urls": [str(input_png)], "vary": vary, "seeds": [8]},
        )
        assert pending.structured_content["grid"]["axes"] == vary, text_of(pending)
        job_id = pending.structured_content["job"]["id"]
    record = json.loads((tmp_path / "out" / "jobs" / f"{job_id}.json").read_text())
    assert record["call"]["kind"] == "compare" and len(record["call"]["runs"]) == 3
    by_run = {int(index): rid for index, rid in record["remote"].items()}
    sent = {s.request_id: s.payload["guidance_scale"] for s in emulator.submissions}
    assert {index: sent[rid] for index, rid in by_run.items()} == {0: 3, 1: 5, 2: 7}
    async with stdio_client(env) as client:
        done = await _collect(client, job_id)
    assert not done.is_error, text_of(done)
    assert len(emulator.submissions) == 3, "every cell was collected, none submitted again"
    cells = done.structured_content["grid"]["cells"]
    assert [c["values"]["guidance_scale"] for c in cells] == [3, 5, 7]
    assert all(c["error"] is None and Path(c["path"]).is_file() for c in cells)

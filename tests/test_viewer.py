"""The result viewer for hosts that render MCP Apps.

The real server runs over stdio on the loopback fal emulator; the real MCP client is the host's
connection to it. Browser tests show the viewer (as the server's ``resources/read`` returns it) in
headless Chromium through the small host in ``apps_host.py``, feed it real edit_image / compare_seeds
results and let its actions reach the server. Screenshots of every state are saved with the test and
copied to out/viewer/.
"""

from __future__ import annotations

import base64
import io
import json
import re
from pathlib import Path
from typing import Any

import pytest
from mcp import Client
from mcp.server.apps import APP_MIME_TYPE
from PIL import Image

from flux_mcp.backends import InputImage
from flux_mcp.config import Settings
from flux_mcp.schema import CompareSeedsArgs, EditImageArgs, tool_input_schema
from flux_mcp.server import build_server
from flux_mcp.viewer import VIEWER_META_KEY, VIEWER_URI, before_image

from .apps_host import APPS, apps_host, distance, mean_rgb, spread
from .conftest import make_png, server_env, stdio_client, text_of

pytestmark = pytest.mark.anyio

EDIT = {"prompt": "turn it into a painting", "seed": 42, "num_inference_steps": 8}
#: Most a UI binding may add to the tool list, which hosts send to the model every turn (bytes).
TOOL_LIST_GROWTH_LIMIT = 300


def _env(tmp_path: Path, emulator: Any, **extra: str) -> dict[str, str]:
    (tmp_path / "inputs").mkdir(exist_ok=True)
    return server_env(tmp_path, **emulator.env(), **extra)


def _compact(value: Any) -> int:
    return len(json.dumps(value, separators=(",", ":")))


# -- the server side, without a browser ---------------------------------------------------------------


async def test_tools_are_bound_to_one_self_contained_viewer_and_the_tool_list_barely_grows(
    tmp_path: Path,
) -> None:
    server = build_server(Settings(output_dir=tmp_path / "out"))
    async with Client(server) as client:
        tools = (await client.list_tools()).tools
        listed = (await client.list_resources()).resources
        read = (await client.read_resource(VIEWER_URI)).contents

    bound = {t.name: t.meta["ui"]["resourceUri"] for t in tools if t.meta and "ui" in t.meta}
    assert bound == {"edit_image": VIEWER_URI, "compare_seeds": VIEWER_URI}
    by_name = {t.name: t for t in tools}
    # The arguments are still the request model's (the service validates them, presets fill the rest).
    assert by_name["edit_image"].input_schema == tool_input_schema(EditImageArgs)
    assert by_name["compare_seeds"].input_schema == tool_input_schema(CompareSeedsArgs)
    assert by_name["edit_image"].output_schema is not None

    wire = [t.model_dump(by_alias=True, mode="json", exclude_none=True) for t in tools]
    growth = _compact(wire) - _compact([{k: v for k, v in t.items() if k != "_meta"} for t in wire])
    assert 0 < growth <= TOOL_LIST_GROWTH_LIMIT, f"the UI binding adds {growth} bytes to tools/list"

    assert [r.mime_type for r in listed if str(r.uri) == VIEWER_URI] == [APP_MIME_TYPE]
    (page,) = read
    html = page.text
    assert page.mime_type == APP_MIME_TYPE and len(html.encode()) < 300_000
    assert "ui/initialize" in html and "resources/read" in html
    # Self-contained: nothing a host's content security policy would block.
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:)?//""", html, re.I)
    assert not re.search(r"@import|url\(|<link\b|https?://", html, re.I)


async def test_results_are_unchanged_for_clients_without_apps(
    tmp_path: Path, emulator: Any, input_png: Path
) -> None:
    env = _env(tmp_path, emulator)
    args = {**EDIT, "image_urls": [str(input_png)]}
    async with stdio_client(env) as plain_client:
        plain = await plain_client.call_tool("edit_image", args)
    async with stdio_client(env, extensions=[APPS]) as apps_client:
        apps = await apps_client.call_tool("edit_image", args)
    assert not plain.is_error and not apps.is_error, text_of(plain) + text_of(apps)

    def without_ids(result: Any) -> Any:
        """Structured content minus what differs between two runs of one call (ids, times)."""
        out = {k: v for k, v in result.structured_content.items() if k not in ("timings", "details")}
        text = json.dumps(out)
        for image in result.structured_content["images"]:
            text = text.replace(image["id"], "ID")
        return text

    assert without_ids(plain) == without_ids(apps)
    assert [b.type for b in plain.content] == [b.type for b in apps.content] == ["text", "image"]
    plain_id, apps_id = (
        plain.structured_content["images"][0]["id"],
        apps.structured_content["images"][0]["id"],
    )
    assert text_of(plain).replace(plain_id, "ID") == text_of(apps).replace(apps_id, "ID")
    assert VIEWER_META_KEY not in (plain.meta or {})
    # With Apps, the viewer also learns where the input is: a small JPEG of the local file here.
    before = apps.meta[VIEWER_META_KEY]["before"]
    head, data = before["data_uri"].split(",", 1)
    assert head == "data:image/jpeg;base64"
    assert Image.open(io.BytesIO(base64.b64decode(data))).size == (64, 48)


def test_the_before_image_is_a_stored_uri_an_inline_preview_or_a_reason() -> None:
    stored = InputImage(source="flux://images/abc123", data=make_png(), content_type="image/png")
    assert before_image(stored) == {"uri": "flux://images/abc123"}
    remote = InputImage(source="https://example.com/a.png", url="https://example.com/a.png")
    assert "URL" in before_image(remote)["unavailable"]
    big = InputImage(source="/tmp/big.png", data=make_png(2000, 1000), content_type="image/png")
    jpeg = base64.b64decode(before_image(big)["data_uri"].split(",", 1)[1])
    assert Image.open(io.BytesIO(jpeg)).size == (768, 384)
    assert "no input" in before_image(None)["unavailable"]


# -- in the browser ---------------------------------------------------------------------------------------


async def test_viewer_shows_an_edit_before_after_and_its_actions_reach_the_server(
    tmp_path: Path, emulator: Any, input_png: Path
) -> None:
    async with stdio_client(_env(tmp_path, emulator), extensions=[APPS]) as client:
        result = await client.call_tool("edit_image", {**EDIT, "image_urls": [str(input_png)]})
        assert not result.is_error, text_of(result)
        (image,) = result.structured_content["images"]
        async with apps_host(client, tmp_path / "shots") as host:
            frame = host.frame
            await host.tool_input({**EDIT, "image_urls": [str(input_png)]})  # while the call runs
            await frame.locator("h1").filter(has_text="Running").wait_for()
            assert "turn it into a painting" in await frame.locator(".prompt").inner_text()
            await host.tool_result(result)
            caption = frame.locator("#focus figcaption")
            await caption.filter(has_text="seed 42").wait_for()
            assert await caption.inner_text() == "seed 42 · 64×48"
            assert "turn it into a painting" in await frame.locator(".prompt").inner_text()
            assert "8 steps" in await frame.locator(".chips").inner_text()
            await frame.locator("#focus img.after[src^='data:image/png']").wait_for()
            await frame.locator("#focus img.before[src^='data:image/jpeg']").wait_for()
            assert host.reads() == [image["uri"]], "the full-resolution result came through resources/read"
            await host.snap("edit-light")

            # Before on the left of the split, after on the right: compare with the real images.
            shown = await host.pixels("#focus .frame")
            before_px = Image.open(input_png).convert("RGB")
            after_px = Image.open(image["path"]).convert("RGB")
            left, right = (0.05, 0.3, 0.4, 0.7), (0.6, 0.3, 0.95, 0.7)
            assert spread(shown) > 10, "the viewer shows an image, not a blank area"
            assert distance(mean_rgb(shown, left), mean_rgb(before_px, left)) < 20
            assert distance(mean_rgb(shown, right), mean_rgb(after_px, right)) < 20
            assert distance(mean_rgb(before_px, right), mean_rgb(after_px, right)) > 20, "the edit is visible"

            # The host's theme: light now, dark when the host says so.
            body_bg = "getComputedStyle(document.body).backgroundColor"
            assert await frame.locator("body").evaluate(f"() => {body_bg}") == "rgb(255, 255, 255)"
            await host.host_context(theme="dark")
            await frame.locator("html[data-theme='dark']").wait_for(state="attached")
            assert await frame.locator("body").evaluate(f"() => {body_bg}") == "rgb(29, 30, 34)"
            await host.snap("edit-dark")

            # refine: the chosen result again at the quality preset, same seed and parameters.
            await frame.locator("button[data-action='refine']").click()
            await frame.locator(".chips").filter(has_text="preset quality").wait_for()
            (refine,) = host.calls("edit_image")
            assert refine["preset"] == "quality" and refine["seed"] == 42 and refine["num_images"] == 1
            assert refine["prompt"] == EDIT["prompt"] and refine["image_urls"] == [str(input_png)]
            assert "num_inference_steps" not in refine and "acceleration" not in refine
            assert host.calls("list_presets") == [{}]
            assert emulator.submissions[-1].payload["num_inference_steps"] == 50
            assert "50 steps" in await frame.locator(".chips").inner_text()
            await frame.locator("#focus img.after[src^='data:image/png']").wait_for()
            await host.snap("edit-refined")

            # use as input: back to the first result, a new prompt, its flux:// uri as the input.
            await frame.locator("button[data-action='back']").click()
            await frame.locator(".chips").filter(has_text="8 steps").wait_for()
            await frame.locator("#actions input").fill("now at night")
            await frame.locator("button[data-action='use']").click()
            await frame.locator(".prompt").filter(has_text="now at night").wait_for()
            use = host.calls("edit_image")[-1]
            assert use == {"prompt": "now at night", "image_urls": [image["uri"]]}
            # Its before image is the stored first result (read through the host once, then cached).
            await frame.locator("#focus img.before[src^='data:image/png']").wait_for()
            assert host.reads().count(image["uri"]) == 1 and len(host.reads()) == 3
            await host.snap("edit-used-as-input")

            assert host.left_the_frame() == []
            # The request log does see what leaves the frame (so the assertion above can fail).
            async with host.page.expect_request("http://127.0.0.1:9/probe"):
                await frame.locator("body").evaluate(
                    "() => { fetch('http://127.0.0.1:9/probe').catch(() => 0); }"
                )
            assert host.left_the_frame() == ["http://127.0.0.1:9/probe"]


async def test_viewer_shows_compare_seeds_as_a_labelled_grid_and_varies_the_chosen_seed(
    tmp_path: Path, emulator: Any, input_png: Path
) -> None:
    async with stdio_client(_env(tmp_path, emulator), extensions=[APPS]) as client:
        args = {**EDIT, "image_urls": [str(input_png)]}
        del args["seed"]
        result = await client.call_tool("compare_seeds", {**args, "seeds": [11, 22, 33]})
        assert not result.is_error, text_of(result)
        runs = result.structured_content["runs"]
        async with apps_host(client, tmp_path / "shots", csp=True) as host:
            frame = host.frame
            await host.tool_result(result)
            cells = frame.locator("#grid .cell")
            await frame.locator("#grid .cell img.thumb[src^='data:image/png']").nth(2).wait_for()
            assert await cells.all_inner_texts() == ["seed 11", "seed 22", "seed 33"]
            assert await frame.locator("h1").inner_text() == "Compare: 3 results"
            for index, run in enumerate(runs):  # each cell shows its own stored image
                thumb = await host.pixels(f"#grid .cell[data-index='{index}'] img")
                stored = Image.open(run["image"]["path"]).convert("RGB")
                assert spread(thumb) > 10
                # 64x48 in a square thumbnail: the image fills the middle 3/4 of its height.
                shown, expected = (
                    mean_rgb(thumb, (0.1, 0.3, 0.9, 0.7)),
                    mean_rgb(stored, (0.1, 0.23, 0.9, 0.77)),
                )
                assert distance(shown, expected) < 20, (index, shown, expected)
            await host.snap("compare")

            await cells.nth(1).click()
            await frame.locator("#focus figcaption").filter(has_text="seed 22").wait_for()
            assert await cells.nth(1).get_attribute("aria-pressed") == "true"
            await frame.locator("button[data-action='vary']").click()
            await frame.locator("h1").filter(has_text="Compare: 4 results").wait_for()
            (vary,) = host.calls("compare_seeds")
            assert {k: vary[k] for k in args} == args  # the chosen run's arguments, with new seeds
            assert vary["count"] == 4 and not {"seed", "seeds", "num_images"} & set(vary)
            assert vary["prompt"] == EDIT["prompt"] and vary["num_inference_steps"] == 8
            assert len(emulator.submissions) == 3 + 4
            await frame.locator("#grid .cell img.thumb[src^='data:image/png']").nth(3).wait_for()
            await host.snap("compare-varied")

            # A real grid on two axes (compare_seeds with vary): rows and columns labelled by their values.
            axes = [
                {"field": "guidance_scale", "values": [4.0, 6.0]},
                {"field": "num_inference_steps", "values": [8, 12]},
            ]
            gridded = await client.call_tool("compare_seeds", {**args, "seeds": [5], "vary": axes})
            assert not gridded.is_error, text_of(gridded)
            assert gridded.structured_content["grid"]["axes"] == axes
            grid_runs = gridded.structured_content["runs"]
            points = [(4.0, 8), (4.0, 12), (6.0, 8), (6.0, 12)]
            await host.tool_result(gridded)
            await frame.locator("#grid table").wait_for()
            headers = await frame.locator("#grid th").all_inner_texts()
            assert headers == [
                "guidance scale \\ num inference steps",
                "num inference steps 8",
                "num inference steps 12",
                "guidance scale 4",
                "guidance scale 6",
            ]
            assert await frame.locator("#grid td .label").all_inner_texts() == [
                f"guidance scale {g:g} · num inference steps {n} · seed {r['seed']}"
                for (g, n), r in zip(points, grid_runs, strict=True)
            ]
            await frame.locator("#grid td .cell").nth(3).click()
            await frame.locator("button[data-action='vary']").click()
            await frame.locator("#grid table").wait_for(state="detached")  # the new result has one axis
            gridded_vary = host.calls("compare_seeds")[-1]
            assert gridded_vary["guidance_scale"] == 6.0 and gridded_vary["num_inference_steps"] == 12
            assert gridded_vary["count"] == 4 and "vary" not in gridded_vary
            await host.tool_result(gridded)
            await frame.locator("#grid td img.thumb[src^='data:image/png']").nth(3).wait_for()
            await host.snap("grid-two-axes")

            # Narrow: nothing wider than the frame; the grid wraps.
            await host.tool_result(result)
            await frame.locator("#grid .cell img.thumb[src^='data:image/png']").nth(2).wait_for()
            await host.page.set_viewport_size({"width": 360, "height": 800})
            await frame.locator("body").evaluate("() => new Promise(r => requestAnimationFrame(r))")
            overflow = "() => document.documentElement.scrollWidth - document.documentElement.clientWidth"
            assert await frame.locator("body").evaluate(overflow) <= 0
            await host.snap("compare-narrow")

            assert host.left_the_frame() == [] and host.console_errors == []


async def test_viewer_follows_a_pending_job_to_its_result_or_cancels_it(
    tmp_path: Path, emulator: Any, input_png: Path
) -> None:
    env = _env(tmp_path, emulator, FLUX_MCP_CALL_BUDGET_S="1")
    async with stdio_client(env, extensions=[APPS]) as client:
        emulator.latency_s = 2.5  # past the 1 s budget: the call answers with a job
        finishing = await client.call_tool("edit_image", {**EDIT, "image_urls": [str(input_png)]})
        emulator.latency_s = 120
        pending = await client.call_tool("edit_image", {**EDIT, "image_urls": [str(input_png)]})
        job = pending.structured_content["job"]
        assert finishing.structured_content["job"]["state"] in ("queued", "running"), text_of(finishing)
        assert job["state"] in ("queued", "running"), text_of(pending)
        async with apps_host(client, tmp_path / "shots", width=360) as host:
            frame = host.frame
            # A job that finishes: the viewer collects it with get_result and shows the images.
            await host.tool_result(finishing)
            await frame.locator("#focus figcaption").filter(has_text="seed 42").wait_for()
            assert host.calls("get_result")[0] == {
                "job_id": finishing.structured_content["job"]["id"],
                "wait_s": 10,
            }
            await frame.locator("#focus img.before[src^='data:image/jpeg']").wait_for()
            await frame.locator("#focus img.after[src^='data:image/png']").wait_for()
            assert await frame.locator("#job").count() == 0
            await host.snap("job-collected-narrow")

            # A job that runs on: progress while get_result waits, then cancel.
            await host.tool_result(pending)
            before = len(host.calls("get_result"))
            text = frame.locator("#job .job-text")
            await text.filter(has_text=job["id"]).wait_for()
            await host.wait_for_calls("get_result", before + 2)
            assert host.calls("get_result")[before : before + 2] == [{"job_id": job["id"], "wait_s": 10}] * 2
            assert "running" in await text.inner_text()
            assert await frame.locator("#job progress").count() == 1
            await host.snap("job-running")

            await frame.locator("button[data-action='cancel']").click()
            await frame.locator("#status").filter(has_text="cancelled").wait_for()
            assert host.calls("cancel_job") == [{"job_id": job["id"]}]
            assert emulator.cancellations == [emulator.submissions[1].request_id]
            assert f"Job {job['id']}: cancelled" in await text.inner_text()
            assert await frame.locator("button[data-action='cancel']").is_disabled()
            await host.snap("job-cancelled")
            assert host.left_the_frame() == []
            teardown = await host.request("ui/resource-teardown", {})
            assert teardown == {"jsonrpc": "2.0", "id": teardown["id"], "result": {}}
            unknown = await host.request("ui/no-such-method", {})
            assert unknown["error"]["code"] == -32601

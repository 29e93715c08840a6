"""End to end on real parts: a flux-mcp server subprocess, the real mcp client over stdio (and
streamable HTTP), and the loopback HTTPS emulator of fal's queue protocol."""

from __future__ import annotations

import base64
import io
import itertools
import json
import re
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest
from mcp import Client
from PIL import Image

from .conftest import (
    clean_env,
    data_uri,
    http_server,
    make_png,
    run_cli,
    server_env,
    stdio_client,
    text_of,
)

pytestmark = pytest.mark.anyio

EDIT = {"prompt": "turn it into a painting", "seed": 42, "num_inference_steps": 8}


def _env(tmp_path: Path, emulator: Any, **extra: str) -> dict[str, str]:
    (tmp_path / "inputs").mkdir(exist_ok=True)
    return server_env(tmp_path, **emulator.env(), **extra)


def _decode(block: Any) -> Image.Image:
    return Image.open(io.BytesIO(base64.b64decode(block.data)))


async def test_tools_list_advertises_every_endpoint_field_and_output_schemas(
    tmp_path: Path, emulator: Any
) -> None:
    async with stdio_client(_env(tmp_path, emulator)) as client:
        tools = {t.name: t for t in (await client.list_tools()).tools}
    assert set(tools) == {"edit_image", "compare_seeds", "list_presets", "get_result", "cancel_job"}
    edit = tools["edit_image"]
    props = edit.input_schema["properties"]
    assert props["guidance_scale"]["maximum"] == 20 and props["guidance_scale"]["default"] == 5
    assert props["loras"]["maxItems"] == 3 and props["image_urls"]["maxItems"] == 4
    assert len(props["cns"]["properties"]) == 11  # the endpoint's cns_* knobs, grouped
    assert edit.output_schema is not None and "images" in edit.output_schema["properties"]
    assert tools["list_presets"].annotations.read_only_hint is True
    assert "seeds" in tools["compare_seeds"].input_schema["properties"]


async def test_edit_with_file_url_data_uri_and_chained_result(
    tmp_path: Path, emulator: Any, input_png: Path
) -> None:
    emulator.latency_s = 0.3
    progress: list[tuple[float, float | None, str | None]] = []

    async def on_progress(value: float, total: float | None, message: str | None) -> None:
        progress.append((value, total, message))

    async with stdio_client(_env(tmp_path, emulator)) as client:
        first = await client.call_tool(
            "edit_image",
            {
                **EDIT,
                "image_urls": [str(input_png), "https://example.com/ref.png", data_uri(make_png(30, 20))],
            },
            progress_callback=on_progress,
        )
        assert not first.is_error, text_of(first)
        out = first.structured_content
        (image,) = out["images"]
        # chain: the first result becomes the next input, by its flux:// id
        second = await client.call_tool(
            "edit_image", {**EDIT, "seed": 7, "image_urls": [image["uri"]], "image_size": "square"}
        )
        assert not second.is_error, text_of(second)
        resource = await client.read_resource(image["uri"])

    # What reached the endpoint: the URL untouched, the file and the data URI uploaded to the CDN.
    sent = emulator.submissions[0].payload
    assert sent["image_urls"][1] == "https://example.com/ref.png"
    assert all(
        u.startswith(emulator.base_url + "/files/") for u in (sent["image_urls"][0], sent["image_urls"][2])
    )
    assert sent["prompt"] == EDIT["prompt"] and sent["seed"] == 42 and sent["num_inference_steps"] == 8
    assert sent["guidance_scale"] == 5 and sent["enable_cns"] is False and sent["loras"] == []
    assert {data for _, data in emulator.uploads[:2]} == {input_png.read_bytes(), make_png(30, 20)}
    # The chained call uploaded exactly the stored first result.
    saved = Path(image["path"])
    assert emulator.uploads[-1][1] == saved.read_bytes()
    assert emulator.submissions[1].payload["image_size"] == "square"

    # What came back: a real image of the input's size, on disk with its sidecar, readable as a resource.
    assert (image["width"], image["height"]) == (64, 48) and image["seed"] == 42
    assert saved.is_file() and saved.parent == tmp_path / "out"
    sidecar = json.loads(saved.with_suffix(".json").read_text())
    assert sidecar["request"]["image_urls"][2].startswith("data:image/png;base64,<")
    assert sidecar["endpoint"] == "fal-ai/flux-2/klein/9b/base/edit/lora" and sidecar["seed"] == 42
    assert sidecar["source_url"].startswith(emulator.base_url)
    assert base64.b64decode(resource.contents[0].blob) == saved.read_bytes()
    assert resource.contents[0].mime_type == "image/png"
    kinds = [b.type for b in first.content]
    assert kinds == ["text", "image"]  # no resource_link by default (FLUX_MCP_RESOURCE_LINKS)
    assert _decode(first.content[1]).format == "JPEG"
    assert image["uri"] in text_of(first) and str(saved) in text_of(first)
    assert re.search(r"[A-Za-z0-9+/=]{200,}", json.dumps(out)) is None, "no base64 in structured content"
    assert out["estimated_cost_usd"] == pytest.approx(0.02 * (3 + 64 * 48 / 1e6), abs=1e-4)
    assert second.structured_content["images"][0]["width"] == 512
    # Progress: queued/in-progress messages from the backend, monotonic.
    values = [p[0] for p in progress]
    assert len(progress) >= 2 and all(b > a for a, b in itertools.pairwise(values)), (
        "MCP: progress must increase"
    )
    assert any("step" in (m or "").lower() or "progress" in (m or "").lower() for _, _, m in progress)


async def test_data_uri_upload_mode_sends_inline_images(
    tmp_path: Path, emulator: Any, input_png: Path
) -> None:
    async with stdio_client(_env(tmp_path, emulator, FLUX_MCP_FAL_UPLOAD="data-uri")) as client:
        result = await client.call_tool(
            "edit_image", {**EDIT, "image_urls": [str(input_png)], "num_images": 2}
        )
    assert not result.is_error, text_of(result)
    sent = emulator.submissions[0].payload["image_urls"][0]
    assert sent == data_uri(input_png.read_bytes()) and emulator.uploads == []
    images = result.structured_content["images"]
    assert [i["seed"] for i in images] == [42, 43] and len({i["id"] for i in images}) == 2
    assert sum(1 for b in result.content if b.type == "image") == 2


async def test_previews_stay_small_whatever_the_size_of_the_stored_images(
    tmp_path: Path, emulator: Any, input_png: Path
) -> None:
    """Previews are for the chat, not the full images: one image's preview is at most 512 px on its long
    side, several are at most 384 px each, all of one call together under the ~450 KB budget, and the
    compare_seeds sheet is 512 px per seed for up to 4 seeds (smaller when more), however big the outputs are."""
    async with stdio_client(_env(tmp_path, emulator)) as client:
        one = await client.call_tool(
            "edit_image",
            {**EDIT, "image_urls": [str(input_png)], "image_size": {"width": 2048, "height": 1536}},
        )
        four = await client.call_tool(
            "edit_image", {**EDIT, "image_urls": [str(input_png)], "image_size": "square_hd", "num_images": 4}
        )
        sheet = await client.call_tool(
            "compare_seeds",
            {
                "prompt": EDIT["prompt"],
                "image_urls": [str(input_png)],
                "image_size": "square_hd",
                "seeds": [1, 2, 3],
            },
        )
    for result in (one, four, sheet):
        assert not result.is_error, text_of(result)
    assert [(i["width"], i["height"]) for i in one.structured_content["images"]] == [(2048, 1536)]
    assert [i["width"] for i in four.structured_content["images"]] == [1024] * 4

    def previews(result: Any) -> list[tuple[tuple[int, int], int, str | None]]:
        blocks = [b for b in result.content if b.type == "image"]
        return [(_decode(b).size, len(base64.b64decode(b.data)), _decode(b).format) for b in blocks]

    assert [(size, fmt) for size, _, fmt in previews(one)] == [((512, 384), "JPEG")]
    assert [size for size, _, _ in previews(four)] == [(384, 384)] * 4
    assert sum(n for _, n, _ in previews(four)) <= 450_000
    assert [size for size, _, _ in previews(sheet)] == [(3 * 512, 512 + 22)]


@pytest.mark.parametrize(
    ("args", "field"),
    [
        ({"guidance_scale": 25}, "guidance_scale"),
        ({"image_urls": ["https://a.example/x.png"] * 5}, "image_urls"),
        ({"loras": [{"path": "a/b"}] * 4}, "loras"),
        ({"preset": "nope"}, "preset"),
        ({"image_urls": ["/definitely/not/here.png"]}, "image_urls.0"),
        ({"image_urls": ["NOTIMAGE"]}, "image_urls.0"),
        ({"bogus": 1}, "bogus"),
    ],
)
async def test_bad_arguments_are_tool_errors_naming_the_field_and_the_server_keeps_serving(
    tmp_path: Path, emulator: Any, input_png: Path, args: dict[str, Any], field: str
) -> None:
    not_image = input_png.parent / "notes.png"
    not_image.write_text("not an image")
    args = {
        **args,
        "image_urls": [str(not_image) if u == "NOTIMAGE" else u for u in args.get("image_urls", [])],
    }
    if not args["image_urls"]:
        args["image_urls"] = [str(input_png)]
    async with stdio_client(_env(tmp_path, emulator)) as client:
        bad = await client.call_tool("edit_image", {**EDIT, **args})
        good = await client.call_tool("edit_image", {**EDIT, "image_urls": [str(input_png)]})
    assert bad.is_error
    assert field in text_of(bad), text_of(bad)
    assert "Traceback" not in text_of(bad)
    assert not good.is_error
    assert len(emulator.submissions) == 1, "the bad call must not reach the endpoint"


async def test_endpoint_422_names_the_field(tmp_path: Path, emulator: Any, input_png: Path) -> None:
    detail = {
        "detail": [
            {"loc": ["body", "image_size"], "msg": "width must be at least 512", "type": "value_error"}
        ]
    }
    emulator.add_fault("submit", "http", status=422, body=detail)
    async with stdio_client(_env(tmp_path, emulator)) as client:
        result = await client.call_tool("edit_image", {**EDIT, "image_urls": [str(input_png)]})
    assert result.is_error and "image_size" in text_of(result) and "512" in text_of(result)


async def test_cancelling_the_call_cancels_the_fal_request(
    tmp_path: Path, emulator: Any, input_png: Path
) -> None:
    emulator.hold_jobs()
    async with stdio_client(_env(tmp_path, emulator)) as client:
        async with anyio.create_task_group() as group:
            group.start_soon(client.call_tool, "edit_image", {**EDIT, "image_urls": [str(input_png)]})
            # Cancel once fal has the job and the server is polling it (not after a guessed delay).
            assert await anyio.to_thread.run_sync(
                lambda: emulator.wait_until(lambda: emulator.route_events("status"), 30)
            )
            group.cancel_scope.cancel()
        assert await anyio.to_thread.run_sync(lambda: emulator.wait_until(lambda: emulator.cancellations, 30))
        emulator.release_jobs()
        after = await client.call_tool("edit_image", {**EDIT, "image_urls": [str(input_png)]})
    assert emulator.cancellations == [emulator.submissions[0].request_id]
    assert not after.is_error
    assert len(list((tmp_path / "out").glob("*.png"))) == 1


async def test_streamable_http_transport_runs_the_same_edit(
    tmp_path: Path, emulator: Any, input_png: Path
) -> None:
    with http_server(_env(tmp_path, emulator)) as server:
        async with Client(server.url) as client:
            result = await client.call_tool("edit_image", {**EDIT, "image_urls": [data_uri(make_png())]})
        assert not result.is_error, text_of(result)
        assert Path(result.structured_content["images"][0]["path"]).is_file()
        # DNS-rebinding protection: a foreign Host header is refused.
        rebound = httpx.post(server.url, headers={"Host": "evil.example"}, json={})
        assert rebound.status_code in (400, 403, 421)


async def test_the_key_never_appears_in_results_logs_or_sidecars(
    tmp_path: Path, emulator: Any, input_png: Path
) -> None:
    log = tmp_path / "server.log"
    emulator.add_fault("result", "http", status=500, body={"detail": "boom"})
    seen: list[str] = []
    async with stdio_client(_env(tmp_path, emulator), "--verbose", stderr=log) as client:
        for _ in range(2):
            result = await client.call_tool("edit_image", {**EDIT, "image_urls": [str(input_png)]})
            seen.append(json.dumps(result.model_dump(mode="json")))
        seen.append(json.dumps((await client.call_tool("list_presets", {})).model_dump(mode="json")))
    secret = emulator.key.split(":")[1]
    texts = [*seen, log.read_text()] + [p.read_text() for p in (tmp_path / "out").glob("*.json")]
    assert len(texts) >= 5
    assert not any(secret in t for t in texts)


async def test_every_cns_field_reaches_the_endpoint_unchanged(
    tmp_path: Path, emulator: Any, input_png: Path
) -> None:
    cns = {
        "enable_cns": True,
        "cns_s_churn": 1.25,
        "cns_gamma_source": "approximation",
        "cns_power_gamma": 2.5,
        "cns_gamma_divider": 25.0,
        "cns_alpha_tilt_start": -1.5,
        "cns_alpha_tilt_end": 1.75,
        "cns_alpha_use_fnorm": False,
        "cns_alpha_exp_interp": False,
        "cns_alpha_exp_sharpness": 9.5,
        "cns_num_freq_bins": 96,
        "cns_energy_scale": 1.4,
    }
    async with stdio_client(_env(tmp_path, emulator)) as client:
        result = await client.call_tool("edit_image", {**EDIT, "image_urls": [str(input_png)], **cns})
        preset = await client.call_tool(
            "edit_image", {**EDIT, "image_urls": [str(input_png)], "preset": "cns_guided", "cns_s_churn": 0.3}
        )
    assert not result.is_error and not preset.is_error
    sent = emulator.submissions[0].payload
    assert {k: sent[k] for k in cns} == cns
    guided = emulator.submissions[1].payload
    assert guided["enable_cns"] is True and guided["cns_gamma_divider"] == 25 and guided["cns_s_churn"] == 0.3


def test_the_demo_runs_against_the_hosted_endpoint_when_a_key_is_set(tmp_path: Path, emulator: Any) -> None:
    done = run_cli(
        "demo", "--output-dir", str(tmp_path / "demo"), env=clean_env(**emulator.env()), timeout=300
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert "hosted endpoint" in done.stdout and "backend: fal" in done.stdout
    saved = sorted((tmp_path / "demo" / "results").glob("*.png"))
    assert len(saved) == 5 and all(str(p) in done.stdout for p in saved)
    assert len(emulator.submissions) == 5
    assert (
        emulator.submissions[0].payload["num_inference_steps"] == 28
    )  # the endpoint's defaults, not the tiny model's

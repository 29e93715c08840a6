"""The loopback fal emulator speaks fal's protocol well enough for the real fal-client, and its
faults fire. These tests drive it with ``fal_client.AsyncClient`` (and plain httpx), unpatched
except for the URL globals fal-client reads at import.
"""

from __future__ import annotations

import base64
import io
import json
import os
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import anyio
import fal_client
import fal_client.client
import httpx
import pytest
from PIL import Image

from .fal_emulator import FalEmulator

APP = "fal-ai/flux-2/klein/9b/base/edit/lora"


@pytest.fixture(scope="module")
def shared_emulator() -> Iterator[FalEmulator]:
    with FalEmulator() as emu:
        yield emu


@pytest.fixture
def emu(shared_emulator: FalEmulator, monkeypatch: pytest.MonkeyPatch) -> FalEmulator:
    shared_emulator.reset()
    shared_emulator.latency_s = shared_emulator.queue_s = 0.0
    monkeypatch.setenv("SSL_CERT_FILE", shared_emulator.ca_path)
    for name in ("QUEUE_URL_FORMAT", "RUN_URL_FORMAT"):
        monkeypatch.setattr(fal_client.client, name, shared_emulator.base_url + "/")
    for name in ("REST_URL", "CDN_URL"):
        monkeypatch.setattr(fal_client.client, name, shared_emulator.base_url)
    return shared_emulator


@pytest.fixture
async def fal(emu: FalEmulator) -> AsyncIterator[Callable[..., fal_client.AsyncClient]]:
    """Real fal-client instances (default: the emulator's key), closed afterwards."""
    made: list[fal_client.AsyncClient] = []

    def make(key: str | None = None) -> fal_client.AsyncClient:
        made.append(fal_client.AsyncClient(key=key or emu.key))
        return made[-1]

    yield make
    for client in made:  # fal-client has no close(): its lazily made httpx client is in the instance dict
        if "_client" in vars(client):
            await (await client._client).aclose()


def png(size: tuple[int, int] = (32, 24), color: tuple[int, int, int] = (0, 120, 240)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, color).save(buffer, format="PNG")
    return buffer.getvalue()


def data_uri(data: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(data).decode()


def payload(**extra: Any) -> dict[str, Any]:
    return {"prompt": "paint it", "image_urls": [data_uri(png())], **extra}


async def fetch(url: str) -> httpx.Response:
    async with httpx.AsyncClient() as client:
        return await client.get(url)


@pytest.mark.anyio
async def test_submit_status_logs_and_result_with_the_real_client(
    emu: FalEmulator, fal: Callable[..., fal_client.AsyncClient]
) -> None:
    emu.queue_s, emu.latency_s = 0.3, 0.3
    client = fal()
    handle = await client.submit(
        APP, payload(seed=5, num_images=2, num_inference_steps=4, image_size="square")
    )
    events = [event async for event in handle.iter_events(with_logs=True, interval=0.03)]
    result = await handle.get()

    positions = [e.position for e in events if isinstance(e, fal_client.Queued)]
    assert positions and positions == sorted(positions, reverse=True) and positions[0] == 2
    assert any(isinstance(e, fal_client.InProgress) for e in events)
    final = events[-1]
    assert isinstance(final, fal_client.Completed) and final.error is None
    assert final.logs is not None and final.logs[-1]["message"] == "Step 4/4"
    assert {"message", "level", "source", "timestamp"} <= set(final.logs[0])

    [submission] = emu.submissions
    assert submission.app == APP and submission.request_id == handle.request_id
    assert submission.payload["seed"] == 5 and "authorization" not in submission.headers
    assert result["seed"] == 5 and result["has_nsfw_concepts"] == [False, False]
    for image in result["images"]:
        response = await fetch(image["url"])
        assert response.headers["content-type"] == "image/png"
        assert (
            Image.open(io.BytesIO(response.content)).size == (512, 512) == (image["width"], image["height"])
        )
        assert image["file_size"] == len(response.content)


@pytest.mark.anyio
async def test_outputs_depend_on_seed_prompt_and_format(
    emu: FalEmulator, fal: Callable[..., fal_client.AsyncClient]
) -> None:
    client = fal()

    async def run(**extra: Any) -> dict[str, Any]:
        return await (await client.submit(APP, payload(sync_mode=True, **extra))).get()

    first, again, other_seed = await run(seed=1), await run(seed=1), await run(seed=2)
    assert first["images"][0]["url"] == again["images"][0]["url"]
    assert first["images"][0]["url"] != other_seed["images"][0]["url"]
    jpeg = (await run(seed=1, output_format="jpeg", image_size={"width": 20, "height": 10}))["images"][0]
    assert jpeg["url"].startswith("data:image/jpeg;base64,") and jpeg["content_type"] == "image/jpeg"
    image = Image.open(io.BytesIO(base64.b64decode(jpeg["url"].split(",", 1)[1])))
    assert (image.format, image.size) == ("JPEG", (20, 10))
    assert image.convert("RGB").getpixel((5, 5))[2] > 100  # still the blue input underneath


@pytest.mark.anyio
async def test_upload_then_use_the_file_as_input(
    emu: FalEmulator, fal: Callable[..., fal_client.AsyncClient]
) -> None:
    client = fal()
    url = await client.upload(png(color=(250, 0, 0)), "image/png")
    assert emu.uploads == [("image/png", png(color=(250, 0, 0)))]
    downloaded = await fetch(url)
    assert downloaded.content == png(color=(250, 0, 0)) and downloaded.headers["content-type"] == "image/png"
    result = await (await client.submit(APP, {"prompt": "x", "image_urls": [url], "seed": 3})).get()
    assert (result["images"][0]["width"], result["images"][0]["height"]) == (32, 24)


@pytest.mark.anyio
async def test_a_failing_cdn_upload_falls_back_to_storage_like_fal(
    emu: FalEmulator, fal: Callable[..., fal_client.AsyncClient]
) -> None:
    emu.add_fault("upload", "http", status=500)
    url = await fal().upload(b"\x89PNG fake", "image/png")
    assert (await fetch(url)).content == b"\x89PNG fake"
    uploads = [(method, status) for method, path, status in emu.log if "upload" in path and method != "GET"]
    assert uploads == [("POST", 500), ("POST", 200), ("PUT", 200)]
    assert emu.uploads == [("image/png", b"\x89PNG fake")]


@pytest.mark.anyio
async def test_cancel_stops_a_running_request(
    emu: FalEmulator, fal: Callable[..., fal_client.AsyncClient]
) -> None:
    emu.latency_s = 5.0
    handle = await fal().submit(APP, payload(seed=1))
    await handle.cancel()
    status = await handle.status()
    assert isinstance(status, fal_client.Completed) and status.error_type == "request_cancelled"
    assert emu.cancellations == [handle.request_id]
    with pytest.raises(fal_client.FalClientHTTPError):
        await handle.get()


@pytest.mark.anyio
async def test_wrong_key_and_bad_payloads_are_rejected_like_fal(
    emu: FalEmulator, fal: Callable[..., fal_client.AsyncClient]
) -> None:
    with pytest.raises(fal_client.FalClientHTTPError) as caught:
        await fal("nope:nope").submit(APP, payload())
    assert caught.value.status_code == 401
    client = fal()
    with pytest.raises(fal_client.FalClientHTTPError) as caught:
        await client.submit(APP, {"image_urls": [data_uri(png())] * 5})
    assert caught.value.status_code == 422
    fields = [item["loc"] for item in caught.value.response.json()["detail"]]
    assert fields == [["body", "prompt"], ["body", "image_urls"]]
    assert emu.submissions == []


@pytest.mark.anyio
async def test_fail_seed_completes_with_an_error_and_the_result_answers_it(
    emu: FalEmulator, fal: Callable[..., fal_client.AsyncClient]
) -> None:
    emu.fail_seed(13, "out of memory", error_type="runner_oom")
    client = fal()
    handle = await client.submit(APP, payload(seed=13))
    status = await handle.status(with_logs=True)
    assert isinstance(status, fal_client.Completed)
    assert (status.error, status.error_type) == ("out of memory", "runner_oom")
    with pytest.raises(fal_client.FalClientHTTPError) as caught:
        await handle.get()
    assert caught.value.status_code == 500 and caught.value.error_type == "runner_oom"
    assert await (await client.submit(APP, payload(seed=14))).get()


@pytest.mark.anyio
async def test_http_reset_malformed_and_stall_faults_fire(
    emu: FalEmulator, fal: Callable[..., fal_client.AsyncClient]
) -> None:
    client = fal()
    emu.add_fault("submit", "http", status=503, body={"detail": "busy"})
    with pytest.raises(fal_client.FalClientHTTPError) as caught:
        await client.submit(APP, payload())
    assert (caught.value.status_code, caught.value.message) == (503, "busy")

    emu.add_fault("submit", "reset")  # fal-client retries transport errors itself
    handle = await client.submit(APP, payload(seed=1))
    assert [status for _, _, status in emu.log][-2:] == [0, 200]

    emu.add_fault("status", "malformed")
    with pytest.raises(json.JSONDecodeError):
        await handle.status()

    emu.add_fault("result", "stall", seconds=0.4)
    started = time.monotonic()
    assert (await handle.get())["seed"] == 1
    assert time.monotonic() - started >= 0.4


@pytest.mark.anyio
async def test_status_faults_and_file_faults(
    emu: FalEmulator, fal: Callable[..., fal_client.AsyncClient]
) -> None:
    client = fal()
    emu.add_fault("status", "stuck_in_queue")
    stuck = await client.submit(APP, payload(seed=1))
    await anyio.sleep(0.1)
    assert isinstance(await stuck.status(), fal_client.Queued)
    assert isinstance(await stuck.status(), fal_client.Queued)  # for good, not once

    emu.add_fault("status", "completed_error", message="boom", error_type="internal")
    failed = await (await client.submit(APP, payload(seed=2))).status()
    assert isinstance(failed, fal_client.Completed) and failed.error == "boom"

    result = await (await client.submit(APP, payload(seed=3))).get()
    url = result["images"][0]["url"]
    emu.add_fault("file", "not_found")
    emu.add_fault("file", "huge", size=300_000)
    assert (await fetch(url)).status_code == 404
    assert len((await fetch(url)).content) == 300_000
    assert (await fetch(url)).status_code == 200


@pytest.mark.anyio
async def test_held_jobs_wait_halfway_until_released_and_answers_are_timed(
    emu: FalEmulator, fal: Callable[..., fal_client.AsyncClient]
) -> None:
    client = fal()
    emu.hold_jobs()
    handle = await client.submit(APP, payload(seed=6, num_inference_steps=8))
    for _ in range(3):  # however long it is polled, it stays halfway
        status = await handle.status(with_logs=True)
        assert isinstance(status, fal_client.InProgress) and status.logs[-1]["message"] == "Step 4/8"
    emu.add_fault("result", "http", status=429, headers={"Retry-After": "7"})
    emu.release_jobs()
    assert isinstance(await handle.status(), fal_client.Completed)
    refused = await fetch_with_key(handle.response_url, emu.key)
    assert refused.status_code == 429 and refused.headers["retry-after"] == "7"
    assert (await handle.get())["seed"] == 6

    assert (emu.events[0].route, emu.events[0].status) == ("submit", 200)
    assert [event.status for event in emu.route_events("result")] == [429, 200]
    assert len(emu.route_events("status")) >= 4
    times = [event.at for event in emu.events]
    assert times == sorted(times)


async def fetch_with_key(url: str, key: str) -> httpx.Response:
    async with httpx.AsyncClient() as client:
        return await client.get(url, headers={"Authorization": f"Key {key}"})


@pytest.mark.anyio
async def test_loras_are_checked_like_fal_does(
    emu: FalEmulator, fal: Callable[..., fal_client.AsyncClient]
) -> None:
    client = fal()
    good = [{"path": "https://example.com/a.safetensors", "scale": 0.5}, {"path": "owner/name"}]
    assert (await (await client.submit(APP, payload(seed=1, loras=good))).get())["seed"] == 1
    bad = [{"path": ""}, {"path": "x", "scale": 5}, {"path": "y", "weight": 1}, {"path": "z"}]
    with pytest.raises(fal_client.FalClientHTTPError) as caught:
        await client.submit(APP, payload(loras=bad))
    detail = caught.value.response.json()["detail"]
    assert [tuple(d["loc"][1:]) for d in detail] == [
        ("loras",),
        ("loras", 0, "path"),
        ("loras", 1, "scale"),
        ("loras", 2),
    ]


@pytest.mark.anyio
async def test_many_concurrent_clients(emu: FalEmulator, fal: Callable[..., fal_client.AsyncClient]) -> None:
    emu.latency_s = 0.2
    results: list[int] = []

    async def one(seed: int) -> None:
        client = fal()  # its own connections
        handle = await client.submit(APP, payload(seed=seed))
        results.append((await handle.get(interval=0.05))["seed"])

    async with anyio.create_task_group() as group:
        for seed in range(40):
            group.start_soon(one, seed)
    assert sorted(results) == list(range(40))


def test_env_lets_an_unpatched_subprocess_reach_the_emulator(emu: FalEmulator) -> None:
    env = emu.env()
    assert env["FLUX_MCP_FAL_REST_URL"] == env["FLUX_MCP_FAL_CDN_URL"] == emu.base_url
    code = (
        "import fal_client;"
        f"h = fal_client.submit({APP!r}, {{'prompt': 'p', 'image_urls': ['https://example.com/a.png'], 'seed': 4}});"
        "print(h.get()['seed'])"
    )
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("FAL_", "SSL_"))}
    done = subprocess.run(
        [sys.executable, "-c", code], env={**clean, **env}, capture_output=True, text=True, timeout=60
    )
    assert done.stdout.strip() == "4", done.stderr
    assert emu.wait_until(lambda: emu.submissions, timeout=1)
    assert emu.submissions[0].payload["seed"] == 4


def test_close_is_quick_even_with_a_stalled_request(monkeypatch: pytest.MonkeyPatch) -> None:
    emu = FalEmulator()
    monkeypatch.setenv("SSL_CERT_FILE", emu.ca_path)  # so the request gets through TLS to the stall
    emu.add_fault("file", "stall", seconds=30)
    with anyio.from_thread.start_blocking_portal() as portal:
        future = portal.start_task_soon(fetch, emu.base_url + "/files/nothing")
        assert emu.wait_until(lambda: emu._server.connections, timeout=30)  # the request is in the stall
        started = time.monotonic()
        emu.close()
        assert time.monotonic() - started < 10, "close() did not wait out the 30 s stall"
        try:  # the stalled request ends too: woken early (then answered) or cut off
            answered = future.result(timeout=10).status_code
        except httpx.HTTPError:
            answered = 0
        assert answered in (0, 404)

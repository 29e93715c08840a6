"""FalBackend against the loopback fal emulator, in-process, with the real fal-client.

fal-client reads its queue host at import, so the tests point its URL globals at the emulator
(monkeypatch restores them) and trust the emulator's CA through SSL_CERT_FILE before the backend
(and so its httpx clients) is created. Nothing of the backend itself is patched.
"""

from __future__ import annotations

import base64
import io
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterator
from email.utils import formatdate
from typing import Any

import anyio
import fal_client.client
import pytest
from PIL import Image

from flux_mcp.backends import BackendResult, InputImage, RunContext
from flux_mcp.backends.fal import ATTEMPTS, MAX_RETRY_AFTER_S, FalBackend
from flux_mcp.config import Settings
from flux_mcp.errors import (
    BackendError,
    BackendTimeout,
    BackendUnavailable,
    InvalidRequest,
    JobFailed,
)
from flux_mcp.schema import ENDPOINT_ID, EditRequest, LoraWeight

from .conftest import edit_once
from .fal_emulator import FalEmulator

RED = (220, 30, 30)
#: LoRAs as the agent gives them: a URL and a Hugging Face repo id, with scales.
LORAS = [
    {"path": "https://example.com/loras/sketch2paint.safetensors", "scale": 0.8},
    {"path": "someone/klein-watercolor-lora", "scale": 1.5},
]
#: The safety net of waits for an event: generous, since the machine may be loaded; never reached
#: when things work.
EVENT_LIMIT_S = 30.0


@pytest.fixture(scope="module")
def shared_emulator() -> Iterator[FalEmulator]:
    """One emulator for the module (each test resets it): starting one per test costs time."""
    with FalEmulator() as emu:
        yield emu


@pytest.fixture
def emu(shared_emulator: FalEmulator, monkeypatch: pytest.MonkeyPatch) -> FalEmulator:
    emulator = shared_emulator
    emulator.reset()
    emulator.latency_s = emulator.queue_s = 0.0
    emulator.flag_nsfw = False
    monkeypatch.setenv("SSL_CERT_FILE", emulator.ca_path)
    for name in ("QUEUE_URL_FORMAT", "RUN_URL_FORMAT"):
        monkeypatch.setattr(fal_client.client, name, emulator.base_url + "/")
    # What ``process_effects`` does for a service (FLUX_MCP_FAL_REST_URL/CDN_URL): these tests make
    # the backend without one. Uploads must never fall through to fal's own hosts.
    for name in ("REST_URL", "CDN_URL"):
        monkeypatch.setattr(fal_client.client, name, emulator.base_url)
    return emulator


@pytest.fixture
async def make_backend(emu: FalEmulator) -> AsyncIterator[Callable[..., FalBackend]]:
    made: list[FalBackend] = []

    def make(**overrides: Any) -> FalBackend:
        settings = {
            "fal_key": emu.key,
            "fal_rest_url": emu.base_url,
            "fal_cdn_url": emu.base_url,
            "job_timeout_s": 20.0,
            "download_timeout_s": 5.0,
            **overrides,
        }
        backend = FalBackend(Settings(**settings))
        made.append(backend)
        return backend

    yield make
    for backend in made:
        await backend.aclose()


class Recorder:
    """A Progress callback that keeps every call."""

    def __init__(self) -> None:
        self.events: list[tuple[float, float | None, str]] = []

    async def __call__(self, progress: float, total: float | None, message: str) -> None:
        self.events.append((progress, total, message))

    def assert_monotonic(self) -> None:
        done = [event[0] for event in self.events]
        assert done == sorted(done), self.events


def png(size: tuple[int, int] = (64, 64), color: tuple[int, int, int] = RED) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, color).save(buffer, format="PNG")
    return buffer.getvalue()


def local_input(data: bytes | None = None) -> InputImage:
    data = data or png()
    return InputImage(source="/tmp/in.png", data=data, content_type="image/png", width=64, height=64)


def request(**fields: Any) -> EditRequest:
    return EditRequest(prompt="turn it into a watercolor", image_urls=["/tmp/in.png"], **fields)


def assert_clean(exc: BaseException, emu: FalEmulator) -> None:
    """No error text may carry the key (or either half of it) or an Authorization header."""
    text = f"{exc} {exc!r}"
    for secret in (emu.key, *emu.key.split(":")):
        assert secret not in text
    assert "Authorization" not in text


def decoded(data: bytes) -> Image.Image:
    image = Image.open(io.BytesIO(data))
    image.load()
    return image


# ---------------------------------------------------------------------------------- happy paths


@pytest.mark.anyio
async def test_edit_sends_the_payload_and_returns_images_at_the_requested_size(
    emu: FalEmulator, make_backend: Callable[..., FalBackend]
) -> None:
    emu.queue_s, emu.latency_s = 0.3, 0.4
    backend = make_backend()
    req = request(
        seed=7, num_images=2, num_inference_steps=4, image_size={"width": 48, "height": 40}, loras=LORAS
    )
    progress = Recorder()

    result = await edit_once(backend, req, [local_input()], progress)

    [submission] = emu.submissions
    assert submission.payload["loras"] == LORAS  # passed as given: fal fetches them itself
    [(upload_type, upload_bytes)] = emu.uploads
    assert (upload_type, upload_bytes) == ("image/png", png())
    uploaded_url = submission.payload["image_urls"][0]
    assert uploaded_url.startswith(emu.base_url + "/files/")
    assert submission.payload == {**req.payload(), "image_urls": [uploaded_url]}
    assert submission.app == ENDPOINT_ID
    assert result.details["request_id"] == submission.request_id
    assert [image.seed for image in result.images] == [7, 8] and result.seed == 7
    for image in result.images:
        pixels = decoded(image.data)
        assert (pixels.width, pixels.height) == (image.width, image.height) == (48, 40)
        assert image.content_type == "image/png" and image.nsfw is False
        assert image.source_url is not None and image.source_url.startswith(emu.base_url)
        red, green, _ = pixels.convert("RGB").getpixel((10, 10))
        assert red > green  # derived from the red input
    assert result.images[0].data != result.images[1].data  # seed + i differs
    assert set(result.timings) >= {"queue_s", "inference_s", "download_s", "total_s"}
    assert result.timings["queue_s"] >= 0.2

    messages = [event[2] for event in progress.events]
    assert any(m.startswith("queued at position") for m in messages)
    assert any("Step" in m for m in messages)
    assert progress.events[0][1] is None  # nothing known while queued
    progress.assert_monotonic()
    assert progress.events[-1][:2] == (4, 4)


@pytest.mark.anyio
async def test_data_uri_mode_inlines_local_inputs_instead_of_uploading(
    emu: FalEmulator, make_backend: Callable[..., FalBackend]
) -> None:
    backend = make_backend(fal_upload="data-uri")
    await edit_once(backend, request(seed=1), [local_input()], Recorder())
    [sent] = emu.submissions[0].payload["image_urls"]
    header, _, encoded = sent.partition(",")
    assert header == "data:image/png;base64"
    assert base64.b64decode(encoded) == png()
    assert emu.uploads == []


@pytest.mark.anyio
async def test_urls_pass_through_unchanged_and_order_is_kept(
    emu: FalEmulator, make_backend: Callable[..., FalBackend]
) -> None:
    url = "https://example.com/photos/cat.png?x=1"
    inputs = [InputImage(source=url, url=url), local_input(png(color=(0, 0, 200)))]
    result = await edit_once(make_backend(), request(seed=3), inputs, Recorder())
    sent = emu.submissions[0].payload["image_urls"]
    assert sent[0] == url and sent[1].startswith(emu.base_url + "/files/")
    assert len(emu.uploads) == 1
    assert (result.images[0].width, result.images[0].height) == (512, 512)  # the emulator's placeholder


@pytest.mark.anyio
async def test_sync_mode_images_come_back_inline(
    emu: FalEmulator, make_backend: Callable[..., FalBackend]
) -> None:
    emu.flag_nsfw = True
    result = await edit_once(
        make_backend(), request(seed=5, sync_mode=True, output_format="webp"), [local_input()], Recorder()
    )
    [image] = result.images
    assert image.source_url is None and image.content_type == "image/webp" and image.nsfw is True
    assert decoded(image.data).format == "WEBP"
    assert not any(path.startswith("/files/") for method, path, _ in emu.log if method == "GET")


@pytest.mark.anyio
async def test_a_random_seed_is_reported_back(
    emu: FalEmulator, make_backend: Callable[..., FalBackend]
) -> None:
    result = await edit_once(make_backend(), request(num_images=2), [local_input()], Recorder())
    assert "seed" not in emu.submissions[0].payload
    assert [image.seed for image in result.images] == [result.seed, result.seed + 1]


# ---------------------------------------------------------------------------------- cancellation


async def wait_until(predicate: Callable[[], object]) -> None:
    """Wait for an event the emulator records (``EVENT_LIMIT_S`` is only the safety net)."""
    with anyio.fail_after(EVENT_LIMIT_S):
        while not predicate():
            await anyio.sleep(0.02)


async def wait_for_submissions(emu: FalEmulator, count: int) -> None:
    """Wait until the emulator has accepted ``count`` submissions."""
    await wait_until(lambda: len(emu.submissions) >= count)


def polls(emu: FalEmulator) -> int:
    """How many status requests (status streams opened, and polls) the emulator has answered."""
    return len(emu.route_events("status"))


@pytest.mark.anyio
async def test_cancelling_the_caller_cancels_the_fal_request(
    emu: FalEmulator, make_backend: Callable[..., FalBackend]
) -> None:
    emu.latency_s = 3600.0  # never finishes by itself: only the cancellation can end the call
    backend = make_backend()
    with anyio.fail_after(EVENT_LIMIT_S):
        async with anyio.create_task_group() as group:
            group.start_soon(edit_once, backend, request(seed=1), [local_input()], Recorder())
            await wait_until(lambda: polls(emu) >= 1)  # submitted, and its status followed
            group.cancel_scope.cancel()
    # The cancel was sent before the cancelled call returned.
    assert emu.cancellations == [emu.submissions[0].request_id]


@pytest.mark.anyio
async def test_a_detached_run_is_left_running_on_fal_and_collected_later(
    emu: FalEmulator, make_backend: Callable[..., FalBackend]
) -> None:
    emu.latency_s = 0.6
    announced: dict[int, str] = {}
    accepted = anyio.Event()

    async def submitted(index: int, request_id: str) -> None:
        announced[index] = request_id
        accepted.set()

    ctx = RunContext(Recorder(), submitted, detached=lambda: True)  # a server shutting down
    async with anyio.create_task_group() as group:
        group.start_soon(make_backend().run, [request(seed=4)], [local_input()], ctx)
        with anyio.fail_after(10):
            await accepted.wait()
        group.cancel_scope.cancel()
    [submission] = emu.submissions
    assert announced == {0: submission.request_id}
    assert emu.cancellations == []

    progress = Recorder()  # a fresh backend, as after a restart
    [result] = await make_backend().collect(announced, [request(seed=4)], RunContext(progress))
    assert len(emu.submissions) == 1, "collected, not submitted again"
    assert isinstance(result, BackendResult)
    assert result.details["request_id"] == submission.request_id and result.images[0].seed == 4
    assert progress.events[-1][:2] == (28, 28)


@pytest.mark.anyio
async def test_collecting_an_unknown_request_is_a_clear_error(
    emu: FalEmulator, make_backend: Callable[..., FalBackend]
) -> None:
    [outcome] = await make_backend().collect(
        {0: "no-such-request"}, [request(seed=1)], RunContext(Recorder())
    )
    assert isinstance(outcome, BackendError) and "HTTP 404 to the status request" in str(outcome)


@pytest.mark.anyio
async def test_a_job_stuck_in_the_queue_times_out_and_is_cancelled(
    emu: FalEmulator, make_backend: Callable[..., FalBackend]
) -> None:
    emu.add_fault("status", "stuck_in_queue")
    backend = make_backend(job_timeout_s=1.0)
    with (
        anyio.fail_after(EVENT_LIMIT_S),
        pytest.raises(BackendTimeout, match="FLUX_MCP_JOB_TIMEOUT_S") as caught,
    ):
        await edit_once(backend, request(seed=1), [local_input()], Recorder())
    assert emu.cancellations == [emu.submissions[0].request_id]
    # The deadline (which started just before the submit), not an early error, ended it.
    [submitted], [cancelled] = emu.route_events("submit"), emu.route_events("cancel")
    assert cancelled.at - submitted.at >= 0.5
    assert_clean(caught.value, emu)


# ---------------------------------------------------------------------------------- error mapping


@pytest.mark.anyio
async def test_a_422_names_the_field_to_change(
    emu: FalEmulator, make_backend: Callable[..., FalBackend]
) -> None:
    detail = [
        {"loc": ["body", "guidance_scale"], "msg": "Input should be less than or equal to 20", "type": "le"}
    ]
    emu.add_fault("submit", "http", status=422, body={"detail": detail})
    with pytest.raises(InvalidRequest) as caught:
        await edit_once(make_backend(), request(seed=1), [local_input()], Recorder())
    assert caught.value.field == "guidance_scale"
    assert "guidance_scale: Input should be less than or equal to 20 — change guidance_scale" in str(
        caught.value
    )
    assert_clean(caught.value, emu)


@pytest.mark.anyio
async def test_the_emulators_own_validation_reaches_the_caller_as_invalid_request(
    emu: FalEmulator, make_backend: Callable[..., FalBackend]
) -> None:
    urls = ["https://example.com/a.png"] * 5  # more than the endpoint takes; EditRequest is bypassed
    bad = request(seed=1).model_copy(update={"image_urls": urls})
    inputs = [InputImage(source=u, url=u) for u in urls]
    with pytest.raises(InvalidRequest) as caught:
        await edit_once(make_backend(), bad, inputs, Recorder())
    assert caught.value.field == "image_urls"


@pytest.mark.anyio
async def test_overload_bursts_are_retried_until_success(
    emu: FalEmulator, make_backend: Callable[..., FalBackend]
) -> None:
    emu.add_fault("submit", "http", times=2, status=503)
    emu.add_fault("status", "http", times=2, status=429)
    emu.add_fault("result", "http", times=1, status=502)
    emu.add_fault("result", "http", times=1, status=429)  # our own GET: fal-client does not see it
    emu.add_fault("result", "reset", times=1)  # our own GET: retried by us
    emu.add_fault("status", "reset", times=1)  # through fal-client: retried by it
    result = await edit_once(make_backend(), request(seed=2), [local_input()], Recorder())
    assert len(result.images) == 1
    statuses = [status for _, _, status in emu.log]
    assert statuses.count(503) == 2 and statuses.count(429) == 3 and statuses.count(502) == 1
    assert statuses.count(0) == 2  # the reset connections
    assert [event.status for event in emu.route_events("result")] == [502, 429, 0, 200]


@pytest.mark.anyio
async def test_an_input_is_uploaded_once_per_content(
    emu: FalEmulator, make_backend: Callable[..., FalBackend]
) -> None:
    backend = make_backend()
    same = [local_input() for _ in range(3)]
    async with anyio.create_task_group() as group:  # three concurrent calls with the same bytes
        for index, item in enumerate(same):
            group.start_soon(edit_once, backend, request(seed=index), [item], Recorder())
    assert len(emu.uploads) == 1, "the same bytes went up once"
    await edit_once(backend, request(seed=9), [local_input(png(color=(10, 200, 10)))], Recorder())
    assert len(emu.uploads) == 2, "other bytes are uploaded"
    urls = {s.payload["image_urls"][0] for s in emu.submissions[:3]}
    assert len(urls) == 1 and urls != {emu.submissions[3].payload["image_urls"][0]}


@pytest.mark.anyio
async def test_a_slot_is_free_once_fal_says_completed_not_after_the_result_and_downloads(
    emu: FalEmulator, make_backend: Callable[..., FalBackend]
) -> None:
    emu.add_fault("result", "stall", times=1, seconds=2.0)  # the first result is slow to come
    backend = make_backend(fal_concurrency=1)
    outcomes = await backend.run([request(seed=1), request(seed=2)], [local_input()], RunContext(Recorder()))
    assert all(isinstance(o, BackendResult) for o in outcomes)
    first_result = emu.route_events("result")[0]
    second_submit = emu.route_events("submit")[1]
    assert second_submit.at < first_result.at, "the second job went to fal while the first result was fetched"
    assert emu.completed_told[0] == emu.submissions[0].request_id


def _status_requests(emu: FalEmulator) -> tuple[list[int], list[int]]:
    """The answers to status-stream requests and to status polls, in order."""
    streams = [status for _, path, status in emu.log if "/status/stream" in path]
    polls = [status for _, path, status in emu.log if "/status" in path and "/status/stream" not in path]
    return streams, polls


@pytest.mark.anyio
async def test_the_status_stream_follows_a_job_without_polling(
    emu: FalEmulator, make_backend: Callable[..., FalBackend]
) -> None:
    emu.queue_s, emu.latency_s = 0.3, 0.3
    progress = Recorder()
    result = await edit_once(
        make_backend(), request(seed=5, num_inference_steps=6), [local_input()], progress
    )
    assert result.images[0].seed == 5
    assert _status_requests(emu) == ([200], []), "one stream, no polls"
    messages = [message for _, _, message in progress.events]
    assert any("queued at position" in m for m in messages) and any(m.startswith("Step ") for m in messages)
    progress.assert_monotonic()
    assert result.timings["queue_s"] >= 0.2, "the time in fal's queue is still measured"


@pytest.mark.anyio
async def test_a_refused_or_broken_status_stream_falls_back_to_polling(
    emu: FalEmulator, make_backend: Callable[..., FalBackend]
) -> None:
    emu.latency_s = 0.3
    emu.add_fault("status", "http", times=1, status=503)  # the stream is refused
    first = await edit_once(make_backend(), request(seed=1), [local_input()], Recorder())
    streams, polls = _status_requests(emu)
    assert first.images and streams == [503] and polls and set(polls) == {200}
    emu.reset()
    emu.latency_s = 0.3
    emu.add_fault("status", "reset", times=1)  # the stream's connection drops
    second = await edit_once(make_backend(), request(seed=2), [local_input()], Recorder())
    streams, polls = _status_requests(emu)
    assert second.images and streams == [0] and polls


@pytest.mark.anyio
async def test_persistent_overload_gives_up_in_bounded_time(
    emu: FalEmulator, make_backend: Callable[..., FalBackend]
) -> None:
    emu.add_fault("submit", "http", times=None, status=503)
    with anyio.fail_after(EVENT_LIMIT_S), pytest.raises(BackendUnavailable, match="HTTP 503") as caught:
        await edit_once(make_backend(), request(seed=2), [local_input()], Recorder())
    assert sum(1 for method, _, status in emu.log if method == "POST" and status == 503) == ATTEMPTS
    assert emu.submissions == []
    assert_clean(caught.value, emu)


def waits_after_refusal(emu: FalEmulator, route: str) -> float:
    """Seconds between the emulator's first (refused) answer on ``route`` and the retried request's."""
    refused, retried = emu.route_events(route)[:2]
    assert refused.status in (429, 503) and retried.status == 200, emu.route_events(route)
    return retried.at - refused.at


@pytest.mark.anyio
async def test_a_short_retry_after_is_waited_out_before_retrying(
    emu: FalEmulator, make_backend: Callable[..., FalBackend]
) -> None:
    """3 s cannot be mistaken for our own backoff (0.25-1 s): the retry waited for the header."""
    emu.add_fault("result", "http", status=429, headers={"Retry-After": "3"})
    emu.add_fault("file", "http", status=503, headers={"Retry-After": "3"})
    with anyio.fail_after(EVENT_LIMIT_S):
        result = await edit_once(make_backend(), request(seed=3), [local_input()], Recorder())
    assert len(result.images) == 1
    for route in ("result", "file"):
        waited = waits_after_refusal(emu, route)
        assert 3.0 <= waited < MAX_RETRY_AFTER_S, f"{route}: retried after {waited:.2f} s"


@pytest.mark.anyio
async def test_a_huge_retry_after_is_capped(
    emu: FalEmulator, make_backend: Callable[..., FalBackend]
) -> None:
    """An hour (in seconds, or as an HTTP date) would hold the tool call: the wait is capped instead."""
    emu.add_fault("result", "http", status=503, headers={"Retry-After": "3600"})
    in_an_hour = formatdate(time.time() + 3600, usegmt=True)
    emu.add_fault("file", "http", status=429, headers={"Retry-After": in_an_hour})
    with anyio.fail_after(EVENT_LIMIT_S + 2 * MAX_RETRY_AFTER_S):
        result = await edit_once(make_backend(), request(seed=4), [local_input()], Recorder())
    assert len(result.images) == 1
    for route in ("result", "file"):
        waited = waits_after_refusal(emu, route)
        # It did wait (the header was read), but no longer than the cap (plus a loaded machine's slack).
        assert MAX_RETRY_AFTER_S <= waited < MAX_RETRY_AFTER_S + 10, f"{route}: retried after {waited:.2f} s"


@pytest.mark.anyio
async def test_a_lora_fal_refuses_names_its_field(
    emu: FalEmulator, make_backend: Callable[..., FalBackend]
) -> None:
    good = request(seed=1, loras=LORAS)
    too_strong = LoraWeight.model_construct(path=LORAS[1]["path"], scale=9.0)  # past EditRequest's check
    bad = good.model_copy(update={"loras": [good.loras[0], too_strong]})
    with pytest.raises(InvalidRequest, match=r"loras\.1\.scale") as caught:
        await edit_once(make_backend(), bad, [local_input()], Recorder())
    assert caught.value.field == "loras.1.scale"
    assert emu.submissions == []


@pytest.mark.anyio
async def test_a_rejected_key_is_reported_without_the_key(
    emu: FalEmulator, make_backend: Callable[..., FalBackend]
) -> None:
    wrong = "wrong-key-id:wrong-key-secret"
    with pytest.raises(BackendUnavailable, match="FAL_KEY") as caught:
        await edit_once(
            make_backend(fal_key=wrong),
            request(seed=1),
            [InputImage(source="u", url="https://e.com/a.png")],
            Recorder(),
        )
    assert wrong not in str(caught.value) and "wrong-key-secret" not in str(caught.value)
    assert emu.submissions == []


@pytest.mark.anyio
async def test_server_text_echoing_the_key_is_scrubbed(
    emu: FalEmulator, make_backend: Callable[..., FalBackend]
) -> None:
    emu.add_fault(
        "submit", "http", status=500, body={"detail": f"upstream said: Authorization: Key {emu.key}"}
    )
    with pytest.raises(BackendError) as caught:
        await edit_once(make_backend(), request(seed=1), [local_input()], Recorder())
    assert "***" in str(caught.value)
    assert emu.key not in str(caught.value)


@pytest.mark.anyio
async def test_a_500_on_the_result_is_a_clear_backend_error(
    emu: FalEmulator, make_backend: Callable[..., FalBackend]
) -> None:
    emu.add_fault("result", "http", status=500, body={"detail": "worker crashed"})
    with pytest.raises(BackendError, match=r"HTTP 500 to the result request: worker crashed") as caught:
        await edit_once(make_backend(), request(seed=1), [local_input()], Recorder())
    assert_clean(caught.value, emu)


@pytest.mark.anyio
async def test_malformed_json_is_a_backend_error_and_the_job_is_cancelled(
    emu: FalEmulator, make_backend: Callable[..., FalBackend]
) -> None:
    emu.latency_s = 5.0
    # The status stream meets it first (and gives way to polling), then the first poll.
    emu.add_fault("status", "malformed", times=2)
    with pytest.raises(BackendError, match="malformed answer to the status request"):
        await edit_once(make_backend(), request(seed=1), [local_input()], Recorder())
    assert emu.cancellations == [emu.submissions[0].request_id]


@pytest.mark.anyio
async def test_completed_with_error_is_job_failed(
    emu: FalEmulator, make_backend: Callable[..., FalBackend]
) -> None:
    emu.latency_s = 0.3
    emu.add_fault("status", "completed_error", message="CUDA out of memory", error_type="runner_oom")
    with pytest.raises(JobFailed, match=r"\(runner_oom\): CUDA out of memory"):
        await edit_once(make_backend(), request(seed=1), [local_input()], Recorder())
    assert emu.cancellations == []


@pytest.mark.anyio
@pytest.mark.parametrize(
    ("kind", "params", "expected"),
    [
        ("not_found", {}, "Output image 1 of 1 could not be downloaded .*HTTP 404"),
        ("huge", {"size": 3 * 2**20}, "Output image 1 of 1 is larger than the 1.0 MiB limit"),
        ("huge", {"size": 3 * 2**20, "declare_length": False}, "Output image 1 of 1 is larger than"),
    ],
)
async def test_output_download_failures_say_which_image(
    emu: FalEmulator,
    make_backend: Callable[..., FalBackend],
    kind: str,
    params: dict[str, Any],
    expected: str,
) -> None:
    emu.add_fault("file", kind, **params)
    with pytest.raises(BackendError, match=expected) as caught:
        await edit_once(make_backend(max_download_mb=1.0), request(seed=1), [local_input()], Recorder())
    assert_clean(caught.value, emu)


@pytest.mark.anyio
async def test_without_a_key_the_error_says_how_to_configure(make_backend: Callable[..., FalBackend]) -> None:
    with pytest.raises(BackendUnavailable, match="set FAL_KEY"):
        await edit_once(make_backend(fal_key=""), request(seed=1), [local_input()], Recorder())


# ---------------------------------------------------------------------------------- many seeds


@pytest.mark.anyio
async def test_runs_go_concurrently_and_a_failing_run_leaves_the_others(
    emu: FalEmulator, make_backend: Callable[..., FalBackend]
) -> None:
    emu.latency_s = 0.3
    emu.fail_seed(12, "NSFW content detected in the output", error_type="content_policy_violation")
    backend = make_backend(fal_concurrency=2)
    progress = Recorder()
    started = time.monotonic()

    runs = [request(seed=seed) for seed in (10, 11, 12, 13)]
    outcomes = await backend.run(runs, [local_input()], RunContext(progress))

    assert time.monotonic() - started >= 2 * 0.3  # two at a time
    assert len(emu.uploads) == 1  # the input went up once
    assert sorted(s.payload["seed"] for s in emu.submissions) == [10, 11, 12, 13]
    assert all(s.payload["num_images"] == 1 for s in emu.submissions)
    failed = outcomes[2]
    assert isinstance(failed, JobFailed) and "NSFW content detected" in str(failed)
    fine = [outcomes[i] for i in (0, 1, 3)]
    assert all(isinstance(o, BackendResult) for o in fine)
    assert [o.images[0].seed for o in fine if isinstance(o, BackendResult)] == [10, 11, 13]
    progress.assert_monotonic()
    assert progress.events[-1][:2] == (4, 4)
    assert all(total in (None, 4) for _, total, _ in progress.events)


@pytest.mark.anyio
async def test_concurrent_calls_share_one_limit_and_cancel_every_run(
    emu: FalEmulator, make_backend: Callable[..., FalBackend]
) -> None:
    emu.latency_s = 3600.0  # nothing finishes by itself, so no slot is freed before the cancel
    backend = make_backend(fal_concurrency=2)
    async with anyio.create_task_group() as group:
        runs = [request(seed=seed) for seed in (1, 2, 3)]
        group.start_soon(backend.run, runs, [local_input()], RunContext(Recorder()))
        other = local_input(png(color=(10, 200, 10)))
        group.start_soon(edit_once, backend, request(seed=9), [other], Recorder())
        await wait_for_submissions(emu, 2)
        # Both calls have uploaded their input (one upload each), so every run is at the semaphore,
        # and both admitted jobs are being followed: a third submit has had every chance it must not take.
        await wait_until(lambda: len(emu.uploads) == 2 and polls(emu) >= 2)
        group.cancel_scope.cancel()
    assert len(emu.submissions) == 2  # the shared semaphore let only two jobs in
    assert sorted(emu.cancellations) == sorted(s.request_id for s in emu.submissions)


def test_capabilities_describe_the_hosted_endpoint() -> None:
    caps = FalBackend(Settings(fal_key="k", fal_concurrency=3, fal_upload="data-uri")).capabilities()
    assert caps == {
        "backend": "fal",
        "endpoint": ENDPOINT_ID,
        "cns": True,
        "max_images_per_call": 4,
        "max_concurrency": 3,
        "upload": "data-uri",
    }


def test_the_hosted_path_does_not_import_torch_and_quiets_httpx() -> None:
    code = (
        "import logging, sys; from flux_mcp.backends.fal import FalBackend; from flux_mcp.config import Settings;"
        "FalBackend(Settings(fal_key='k'));"
        "assert 'torch' not in sys.modules and 'diffusers' not in sys.modules, 'torch imported';"
        "assert logging.getLogger('httpx').getEffectiveLevel() >= logging.WARNING"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)

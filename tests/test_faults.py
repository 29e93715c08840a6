"""Fault injection end to end: one flux-mcp server subprocess, the real mcp client over stdio, and the
loopback fal emulator misbehaving on one route at a time.

Every case must end, within a bounded time, either in success (after retries) or in a clear
``is_error`` tool result: never a hang, never a traceback or the key in the text, never a partly
written file in the output folder; and the server must keep serving (a good call follows every
failed one). One server serves all cases (a start costs ~2 s); the emulator is reset between them.

This module knows the emulator's fault API and the product's public behaviour, nothing of its code.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio
import pytest
from mcp import Client

from .conftest import data_uri, make_png, server_env, stdio_client, text_of
from .fal_emulator import FalEmulator

pytestmark = pytest.mark.anyio

#: Small deadlines so the deadline cases finish quickly; the size cap makes a 2 MiB image "huge".
JOB_TIMEOUT_S = 4.0
DOWNLOAD_TIMEOUT_S = 1.0
MAX_DOWNLOAD_MB = 1
#: The safety net: a call still unanswered after this long is a hang. No case asserts a wall-clock bound
#: (the machine may be loaded); bounded retrying is asserted by counting the emulator's answers.
HANG_S = 60.0


@dataclass(frozen=True)
class Fault:
    route: str
    kind: str
    times: int | None = 1
    params: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Case:
    """Faults to inject, the outcome expected ('ok' or words the error must contain), and, where it is
    fixed, how many answers the first fault's route gives in all (retries are bounded, not endless)."""

    name: str
    faults: tuple[Fault, ...]
    expect: str | tuple[str, ...]
    answers: int | None = None
    cancelled: bool = False  # the job must have been cancelled on fal


CASES = [
    # Overload bursts: retried (by fal-client for 429, by the backend for 5xx) until they pass.
    Case("submit-429-burst", (Fault("submit", "http", 3, {"status": 429}),), "ok", answers=4),
    Case("submit-503-burst", (Fault("submit", "http", 2, {"status": 503}),), "ok", answers=3),
    Case(
        "submit-503-retry-after",
        (Fault("submit", "http", 1, {"status": 503, "headers": {"Retry-After": "0.2"}}),),
        "ok",
        answers=2,
    ),
    Case("status-429-burst", (Fault("status", "http", 3, {"status": 429}),), "ok"),
    Case("status-503-burst", (Fault("status", "http", 2, {"status": 503}),), "ok"),
    Case("result-503-burst", (Fault("result", "http", 2, {"status": 503}),), "ok", answers=3),
    Case("result-429-once", (Fault("result", "http", 1, {"status": 429}),), "ok", answers=2),
    Case("file-503-burst", (Fault("file", "http", 2, {"status": 503}),), "ok", answers=3),
    Case("upload-503-burst", (Fault("upload", "http", 2, {"status": 503}),), "ok"),
    # Overload that never ends: a clear error, within the retry budget or the job deadline.
    Case(
        "submit-503-forever",
        (Fault("submit", "http", None, {"status": 503}),),
        ("overloaded", "503"),
        answers=4,
    ),
    Case("submit-429-forever", (Fault("submit", "http", None, {"status": 429}),), ("did not finish",)),
    # Connection resets: transport errors are retried.
    Case("submit-reset", (Fault("submit", "reset", 1),), "ok", answers=2),
    Case("status-reset", (Fault("status", "reset", 1),), "ok"),
    Case("status-reset-twice", (Fault("status", "reset", 2),), "ok"),
    Case("result-reset", (Fault("result", "reset", 1),), "ok", answers=2),
    Case("file-reset", (Fault("file", "reset", 1),), "ok", answers=2),
    # Broken answers: a clear error naming what happened.
    Case("result-500", (Fault("result", "http", 1, {"status": 500}),), ("500", "result"), answers=1),
    Case("result-malformed-json", (Fault("result", "malformed", 1),), ("malformed",), answers=1),
    # Status faults meet the status stream first (which gives way to polling), then the polls: two.
    Case(
        "status-malformed-json", (Fault("status", "malformed", 2),), ("malformed",), answers=2, cancelled=True
    ),
    Case(
        "status-html-502-forever",
        (Fault("status", "http", None, {"status": 502, "body": "<html>bad gateway</html>"}),),
        ("overloaded", "502"),
        answers=1 + 4,  # the status stream, then the polls' 4 attempts
        cancelled=True,
    ),
    Case("status-404", (Fault("status", "not_found", 2),), ("404",), answers=2, cancelled=True),
    Case(
        "completed-with-error",
        (Fault("status", "completed_error", 1, {"message": "CUDA out of memory", "error_type": "oom"}),),
        ("failed", "CUDA out of memory"),
    ),
    # Deadlines: a job stuck in the queue is cancelled on fal after FLUX_MCP_JOB_TIMEOUT_S.
    Case(
        "stuck-in-queue",
        (Fault("status", "stuck_in_queue", 1),),
        ("did not finish", "FLUX_MCP_JOB_TIMEOUT_S"),
        cancelled=True,
    ),
    # Output downloads: missing, stalled, oversized (declared or not).
    Case("file-404", (Fault("file", "not_found", 1),), ("404",), answers=1),
    Case(
        "file-stall",
        (Fault("file", "stall", 1, {"seconds": 8}),),
        ("did not download", "FLUX_MCP_DOWNLOAD_TIMEOUT_S"),
    ),
    Case(
        "file-huge-declared",
        (Fault("file", "huge", 1, {"size": 2 * 2**20}),),
        ("FLUX_MCP_MAX_DOWNLOAD_MB",),
        answers=1,
    ),
    Case(
        "file-huge-undeclared",
        (Fault("file", "huge", 1, {"size": 3 * 2**20, "declare_length": False}),),
        ("FLUX_MCP_MAX_DOWNLOAD_MB",),
        answers=1,
    ),
    # Several faults in one call, each on a different route, all survivable.
    Case(
        "mixed-survivable",
        (
            Fault("submit", "http", 1, {"status": 503}),
            Fault("status", "reset", 1),
            Fault("result", "http", 1, {"status": 504}),
            Fault("file", "http", 1, {"status": 502}),
        ),
        "ok",
    ),
]


@dataclass
class Served:
    client: Client
    emulator: FalEmulator
    out: Path
    log: Path


@pytest.fixture(scope="module")
def anyio_backend() -> str:
    return "asyncio"  # module scope, so the one server below can outlive a single test


@pytest.fixture(scope="module")
def module_emulator() -> Iterator[FalEmulator]:
    with FalEmulator() as emu:
        yield emu


@pytest.fixture(scope="module")
async def served(
    module_emulator: FalEmulator, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[Served]:
    root = tmp_path_factory.mktemp("faults")
    (root / "inputs").mkdir()
    home = root / "home"
    env = server_env(
        root,
        **module_emulator.env(),
        HOME=str(home),
        XDG_CONFIG_HOME=str(home / ".config"),
        XDG_DATA_HOME=str(home / ".local/share"),
        XDG_CACHE_HOME=str(home / ".cache"),
        FLUX_MCP_JOB_TIMEOUT_S=str(JOB_TIMEOUT_S),
        FLUX_MCP_DOWNLOAD_TIMEOUT_S=str(DOWNLOAD_TIMEOUT_S),
        FLUX_MCP_MAX_DOWNLOAD_MB=str(MAX_DOWNLOAD_MB),
    )
    log = root / "server.log"
    async with stdio_client(env, "--verbose", stderr=log) as client:
        yield Served(client, module_emulator, root / "out", log)


EDIT = {"prompt": "make it a watercolor", "seed": 11, "num_inference_steps": 8}
INPUT = data_uri(make_png(48, 32))


async def _edit(client: Client, **extra: Any) -> Any:
    with anyio.fail_after(HANG_S):
        return await client.call_tool("edit_image", {**EDIT, "image_urls": [INPUT], **extra})


def _pairs(out: Path) -> set[str]:
    """Ids of complete results; fails on temp files, lone images or lone sidecars."""
    names = sorted(p.name for p in out.iterdir()) if out.is_dir() else []
    assert not [n for n in names if n.startswith(".tmp-")], names
    images = {Path(n).stem for n in names if n.endswith((".png", ".jpg", ".webp"))}
    sidecars = {Path(n).stem for n in names if n.endswith(".json")}
    assert images == sidecars, f"unpaired files: {sorted(images ^ sidecars)}"
    for stem in sidecars:
        record = json.loads((out / f"{stem}.json").read_text())
        assert (out / record["file"]).stat().st_size > 0
    return images


def _assert_clean_text(text: str, emulator: FalEmulator) -> None:
    assert "Traceback" not in text and 'File "' not in text, text
    for secret in (emulator.key, *emulator.key.split(":")):
        assert secret not in text


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
async def test_fault_ends_in_success_or_a_clear_error_and_the_server_keeps_serving(
    served: Served, case: Case
) -> None:
    emu = served.emulator
    emu.reset()
    emu.latency_s = emu.queue_s = 0.0
    before = _pairs(served.out)
    for fault in case.faults:
        emu.add_fault(fault.route, fault.kind, fault.times, **fault.params)

    result = await _edit(served.client)
    text = text_of(result)
    _assert_clean_text(text, emu)
    if case.answers is not None:
        route = case.faults[0].route
        statuses = [event.status for event in emu.route_events(route)]
        assert len(statuses) == case.answers, f"{case.name}: {route} answered {statuses}"
    after = _pairs(served.out)
    if case.expect == "ok":
        assert not result.is_error, text
        (image,) = result.structured_content["images"]
        assert after - before == {image["id"]} and Path(image["path"]).is_file()
    else:
        assert result.is_error, text
        for word in case.expect:
            assert word in text, f"{word!r} not in {text!r}"
        assert after == before, "a failed call must not leave files behind"
    if case.cancelled:
        submitted = [s.request_id for s in emu.submissions]
        assert await anyio.to_thread.run_sync(lambda: emu.wait_until(lambda: emu.cancellations, 30))
        assert set(emu.cancellations) <= set(submitted) and emu.cancellations

    # The server keeps serving: with the faults cleared, the next call succeeds.
    emu.reset()
    good = await _edit(served.client, seed=12)
    assert not good.is_error, text_of(good)
    assert len(_pairs(served.out)) == len(after) + 1


async def test_compare_seeds_survives_a_failing_seed_and_a_status_reset(served: Served) -> None:
    """One seed's job fails on fal, another's status poll is reset: the others still come back."""
    emu = served.emulator
    emu.reset()
    emu.fail_seed(102, "NSFW content detected", error_type="content_policy_violation")
    emu.add_fault("status", "reset", 1)
    before = _pairs(served.out)
    with anyio.fail_after(HANG_S):
        result = await served.client.call_tool(
            "compare_seeds", {**{k: v for k, v in EDIT.items() if k != "seed"}, "image_urls": [INPUT],
                              "seeds": [101, 102, 103]},
        )  # fmt: skip
    text = text_of(result)
    _assert_clean_text(text, emu)
    assert not result.is_error, text
    out = result.structured_content
    assert out["failed_seeds"] == [102] and "content_policy_violation" in text
    assert [r["seed"] for r in out["runs"] if r["image"]] == [101, 103]
    assert len(_pairs(served.out) - before) == 2


async def test_server_log_stays_free_of_tracebacks_and_the_key(served: Served) -> None:
    """After the fault cases (this test runs last in the module), the log is clean."""
    log = served.log.read_text()
    assert "Traceback" not in log, log[-3000:]
    for secret in (served.emulator.key, *served.emulator.key.split(":")):
        assert secret not in log

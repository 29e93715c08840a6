"""Crash safety: kill -9 a flux-mcp server subprocess mid-call, restart it on the same output folder.

After a restart the output folder holds only complete results (image + sidecar), no temp file of a
dead process survives, and every result stored before the crash is served again by its id with the
same bytes. The kills are real SIGKILLs of the server process, found among this test process's
children. Where a kill must land at an exact point, the process stops itself there first, through a
Python audit hook ("os.rename" fires before a rename acts): the server before committing its first
image (SIGSTOP, then the test kills it), a lone store writer between its image and sidecar renames
(SIGKILL). No sleep or polling race decides where a kill lands.

This module knows the store's documented file layout (``<id>.<ext>`` + ``<id>.json``, temp files
``.tmp-<pid>-*``) and the tools' public behaviour, nothing else of the product.
"""

from __future__ import annotations

import base64
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import psutil
import pytest
from mcp import Client
from PIL import Image

from .conftest import data_uri, make_png, server_env, stdio_client, text_of

pytestmark = pytest.mark.anyio

EDIT = {"prompt": "make it a linocut", "num_inference_steps": 8}
#: The store keeps an image without a sidecar this long (a write in progress in another process).
ORPHAN_GRACE_S = 60
IMAGE_EXTS = (".png", ".jpg", ".webp")


def _env(tmp_path: Path, emulator: Any, **extra: str) -> dict[str, str]:
    (tmp_path / "inputs").mkdir(exist_ok=True)
    return server_env(tmp_path, **emulator.env(), **extra)


def _flux_children() -> set[int]:
    return {
        p.pid
        for p in psutil.Process().children(recursive=True)
        if any("flux_mcp" in part for part in _cmdline(p))
    }


def _cmdline(proc: psutil.Process) -> list[str]:
    try:
        return proc.cmdline()
    except (psutil.NoSuchProcess, psutil.ZombieProcess, psutil.AccessDenied):
        return []


@asynccontextmanager
async def _server(env: dict[str, str]) -> AsyncIterator[tuple[Client, psutil.Process]]:
    """A stdio server subprocess and its process handle (the new flux_mcp child of this process)."""
    before = _flux_children()
    async with stdio_client(env) as client:
        (pid,) = _flux_children() - before
        yield client, psutil.Process(pid)


async def _edit(client: Client, seed: int, **extra: Any) -> Any:
    with anyio.fail_after(20):
        result = await client.call_tool(
            "edit_image", {**EDIT, "seed": seed, "image_urls": [data_uri(make_png())], **extra}
        )
    assert not result.is_error, text_of(result)
    return result


async def _blob(client: Client, uri: str) -> bytes:
    with anyio.fail_after(10):
        resource = await client.read_resource(uri)
    return base64.b64decode(resource.contents[0].blob)


def _dead_pid() -> int:
    """The pid of a process that has certainly exited."""
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait(10)
    return proc.pid


def _kill(proc: psutil.Process) -> None:
    proc.send_signal(signal.SIGKILL)
    proc.wait(10)


def _temp_files(out: Path) -> list[Path]:
    return [p for p in out.rglob(".tmp-*")] if out.is_dir() else []


def _committed(out: Path) -> dict[str, Path]:
    """Results whose sidecar landed (the store's commit marker), each checked to have its image."""
    found = {}
    for sidecar in out.glob("[!.]*.json"):  # not the hidden temp files
        record = json.loads(sidecar.read_text())
        image = out / record["file"]
        assert image.is_file() and image.stat().st_size > 0, f"{sidecar.name} has no image"
        found[record["id"]] = image
    return found


def _orphans(out: Path) -> list[Path]:
    """Images without a sidecar (not stored: the sidecar is the commit marker)."""
    return [p for p in out.glob("[!.]*") if p.suffix in IMAGE_EXTS and not p.with_suffix(".json").exists()]


async def _assert_only_complete_results(client: Client, out: Path, dead_pid: int) -> set[Path]:
    """No temp file of the dead server; every sidecar has its image; a lone image (only possible when
    the kill fell between the image's and the sidecar's rename) is young and is not served as a
    result. Returns those lone images."""
    assert not [p for p in _temp_files(out) if p.name.startswith(f".tmp-{dead_pid}-")]
    _committed(out)
    orphans = set(_orphans(out))
    for orphan in orphans:
        assert time.time() - orphan.stat().st_mtime < ORPHAN_GRACE_S
        with anyio.fail_after(10):
            result = await client.call_tool(
                "edit_image", {**EDIT, "image_urls": [f"flux://images/{orphan.stem}"]}
            )
        assert result.is_error and "No stored image" in text_of(result)
    return orphans


def _settled(out: Path, allowed_orphans: set[Path], timeout: float = 20.0) -> list[Path]:
    """Wait until no write is in progress: no temp files, no lone images but the dead writer's (kept
    by the store's grace period); a restarted server may be finishing a resumed job meanwhile.
    Returns what is still unsettled (empty when settled)."""
    deadline = time.monotonic() + timeout
    while True:
        left = _temp_files(out) + [p for p in _orphans(out) if p not in allowed_orphans]
        if not left or time.monotonic() > deadline:
            return left
        time.sleep(0.05)


async def test_kill_during_a_running_edit_then_restart_serves_every_earlier_result(
    tmp_path: Path, emulator: Any
) -> None:
    env = _env(tmp_path, emulator)
    out = tmp_path / "out"
    async with _server(env) as (client, proc):
        earlier = [(await _edit(client, seed)).structured_content["images"][0] for seed in (1, 2)]
        served = {img["id"]: await _blob(client, img["uri"]) for img in earlier}
        emulator.latency_s = 3.0  # the next job is mid-flight on "fal" when the server dies
        ended: list[BaseException | Any] = []

        async def doomed_call() -> None:
            try:
                ended.append(
                    await client.call_tool(
                        "edit_image", {**EDIT, "seed": 3, "image_urls": [data_uri(make_png())]}
                    )
                )
            except Exception as exc:  # the transport reports the dead server
                ended.append(exc)

        async with anyio.create_task_group() as group:
            group.start_soon(doomed_call)
            with anyio.fail_after(30):  # submitted, and polled while "fal" runs it: mid-edit
                while not _polled(emulator, 3):
                    await anyio.sleep(0.02)
            _kill(proc)
            with anyio.fail_after(30):  # the pending call must end, not hang
                while not ended:
                    await anyio.sleep(0.02)
        assert not hasattr(ended[0], "is_error"), "the call cannot have succeeded: its server was killed"
        dead = proc.pid
    assert {img["id"]: Path(img["path"]).read_bytes() for img in earlier} == served

    emulator.latency_s = 0.0
    async with _server(env) as (client, _):
        for image_id, data in served.items():
            assert await _blob(client, f"flux://images/{image_id}") == data
        leftovers = await _assert_only_complete_results(client, out, dead)
        assert not leftovers, "nothing was being written when the server died"
        after = (await _edit(client, 4)).structured_content["images"][0]
        assert await _blob(client, after["uri"]) == Path(after["path"]).read_bytes()
        assert await anyio.to_thread.run_sync(_settled, out, set()) == []
    assert set(served) <= set(_committed(out))


def _polled(emulator: Any, count: int) -> bool:
    """Whether the emulator has accepted ``count`` jobs and answered a status poll of the last one."""
    if len(emulator.submissions) < count:
        return False
    request_id = emulator.submissions[count - 1].request_id
    return any(request_id in event.path for event in emulator.route_events("status"))


#: Put on the PYTHONPATH of one server process as ``sitecustomize``: an audit hook that freezes the
#: server (SIGSTOP) just before it renames its first temp image into place ("os.rename" fires before
#: os.replace acts). Both temp files of that result are then whole on disk and neither is committed:
#: the kill that follows lands mid-write by construction, whatever the machine's load.
_STOP_BEFORE_COMMIT = """
import os, signal, sys, threading

def _stop_before_the_first_image_commit(event, args):
    if event == "os.rename" and os.path.basename(str(args[0])).startswith(".tmp-"):
        if str(args[1]).endswith((".png", ".jpg", ".webp")):
            with open(os.path.join(os.path.dirname(__file__), "stopped-at"), "w") as marker:
                marker.write(str(args[1]))
            # Directed at this thread: it stops on its way out of this call. os.kill would direct it at
            # the process, and the kernel may let this thread run the rename before the stop lands.
            signal.pthread_kill(threading.get_ident(), signal.SIGSTOP)

sys.addaudithook(_stop_before_the_first_image_commit)
"""


def _stopping_env(env: dict[str, str], folder: Path) -> dict[str, str]:
    """``env`` for a server that freezes itself before committing its first image."""
    folder.mkdir()
    (folder / "sitecustomize.py").write_text(_STOP_BEFORE_COMMIT)
    return {**env, "PYTHONPATH": str(folder)}


async def _stopped(proc: psutil.Process, marker: Path) -> bool:
    """Wait until ``proc`` has frozen itself at its first image commit (True) or has exited (False).

    The hook leaves ``marker`` just before it stops the process. A stop without it is not ours (job
    control, when the suite runs in a background job of a terminal): the process is continued.
    """
    with anyio.fail_after(60):
        while True:
            try:
                if proc.status() == psutil.STATUS_STOPPED:
                    if marker.exists():
                        return True
                    proc.resume()
            except psutil.NoSuchProcess:
                return False
            await anyio.sleep(0.01)


async def test_kill_while_the_store_is_writing_leaves_no_partial_result(
    tmp_path: Path, emulator: Any
) -> None:
    env = _env(tmp_path, emulator, FLUX_MCP_FAL_UPLOAD="data-uri")
    out = tmp_path / "out"
    several = {"num_images": 3, "image_urls": [data_uri(make_png())]}
    async with _server(env) as (client, _):  # an earlier result, stored by a normal server
        first = (await _edit(client, 5)).structured_content["images"][0]
        first_bytes = await _blob(client, first["uri"])

    async with _server(_stopping_env(env, tmp_path / "stopper")) as (client, proc):
        ended: list[Any] = []

        async def doomed_call() -> None:
            try:
                ended.append(await client.call_tool("edit_image", {**EDIT, "seed": 6, **several}))
            except Exception as exc:
                ended.append(exc)

        async with anyio.create_task_group() as group:
            group.start_soon(doomed_call)
            stopper = tmp_path / "stopper"
            assert await _stopped(proc, stopper / "stopped-at"), (
                "the server exited instead of reaching its first commit"
            )
            snapshot = sorted(p.name for p in out.iterdir())
            _kill(proc)
            with anyio.fail_after(30):  # the pending call must end, not hang
                while not ended:
                    await anyio.sleep(0.02)
        dead = proc.pid
    # The server died mid-write: its temp files were on disk at the moment of the kill.
    assert not hasattr(ended[0], "is_error"), "the call cannot have succeeded: its server was killed"
    stopped_at = (tmp_path / "stopper" / "stopped-at").read_text()
    assert any(n.startswith(f".tmp-{dead}-") for n in snapshot), (snapshot, stopped_at, ended)
    assert any(p.name.startswith(f".tmp-{dead}-") for p in _temp_files(out)), "the kill left no temp file"

    async with _server(env) as (client, _):
        leftovers = await _assert_only_complete_results(client, out, dead)
        assert await _blob(client, first["uri"]) == first_bytes
        await _edit(client, 7)
        assert await anyio.to_thread.run_sync(_settled, out, leftovers) == []
    for image_id, path in _committed(out).items():
        with Image.open(path) as img:
            img.load()  # every committed image is whole
        assert json.loads(path.with_suffix(".json").read_text())["id"] == image_id


#: Stores one result with the real ResultStore in a process of its own and SIGKILLs that process just
#: before its N-th rename: Python's "os.rename" audit event (os.replace raises it) fires before the
#: rename happens. A real crash at a chosen point, with nothing of the store patched.
_CRASHING_WRITER = """
import io, os, signal, sys
from pathlib import Path
from PIL import Image
from flux_mcp.store import ResultStore
root, image_id, crash_at = Path(sys.argv[1]), sys.argv[2], int(sys.argv[3])
renames = 0
def crash_before_rename(event, args):
    global renames
    if event == "os.rename":
        renames += 1
        if renames == crash_at:
            os.kill(os.getpid(), signal.SIGKILL)
buffer = io.BytesIO()
Image.new("RGB", (32, 32), "teal").save(buffer, format="PNG")
store = ResultStore(root)
store.ensure()
sys.addaudithook(crash_before_rename)
store.save(image_id, buffer.getvalue(), "image/png", {"seed": 1})
"""


@pytest.mark.parametrize("crash_at", [1, 2], ids=["before-the-first-rename", "between-the-two-renames"])
def test_a_crash_between_the_stores_two_renames_never_leaves_a_sidecar_without_its_image(
    tmp_path: Path, crash_at: int
) -> None:
    """The sidecar is the commit marker, so it must be renamed into place after the image: killed
    before either rename or between the two, the folder holds no sidecar whose image is missing."""
    from flux_mcp.errors import NotFound
    from flux_mcp.store import ResultStore

    out, image_id = tmp_path / "out", "20261130-120000-0a1b2c3d"
    writer = subprocess.run(
        [sys.executable, "-c", _CRASHING_WRITER, str(out), image_id, str(crash_at)], timeout=60
    )
    assert writer.returncode == -signal.SIGKILL, "the writer was killed at its rename"
    names = sorted(p.name for p in out.iterdir())
    assert _committed(out) == {}, names  # no sidecar landed, and none without its image
    assert len(_temp_files(out)) == 3 - crash_at, names  # the dead writer's files not yet renamed
    store = ResultStore(out)
    with pytest.raises(NotFound, match="No stored image"):
        store.lookup(image_id)  # a lone image is not a result
    store.sweep()
    assert _temp_files(out) == [], "the dead writer's temp files are swept"
    orphans = _orphans(out)
    assert [p.name for p in orphans] == ([f"{image_id}.png"] if crash_at == 2 else [])
    for orphan in orphans:  # kept while young (it could be a live writer's), swept once old
        old = time.time() - 2 * ORPHAN_GRACE_S
        os.utime(orphan, (old, old))
    store.sweep()
    assert list(out.iterdir()) == []


@pytest.fixture
def planted(tmp_path: Path) -> Iterator[dict[str, Path]]:
    """Leftovers as a crashed writer leaves them, and a live writer's temp file (must survive)."""
    out = tmp_path / "out"
    (out / "jobs").mkdir(parents=True)
    dead = _dead_pid()
    files = {
        "dead_image_tmp": out / f".tmp-{dead}-0a1b2c3d4e5f-20260101-000000-0a1b2c3d.png",
        "dead_sidecar_tmp": out / f".tmp-{dead}-0a1b2c3d4e5f-20260101-000000-0a1b2c3d.json",
        "dead_job_tmp": out / "jobs" / f".tmp-{dead}-0a1b2c3d-job-20260101-000000-0a1b2c3d.json",
        "old_orphan": out / "20260101-000000-deadbeef.png",
        "live_tmp": out / f".tmp-{os.getpid()}-0a1b2c3d4e5f-20260101-000000-00000000.png",
    }
    for path in files.values():
        path.write_bytes(make_png(8, 8))
    old = time.time() - 3 * ORPHAN_GRACE_S
    os.utime(files["old_orphan"], (old, old))
    yield files


async def test_a_restarted_server_sweeps_what_dead_writers_left(
    tmp_path: Path, emulator: Any, planted: dict[str, Path]
) -> None:
    async with _server(_env(tmp_path, emulator)) as (client, _):
        await client.list_tools()  # the server has started (and swept) before it answers
        stored = (await _edit(client, 8)).structured_content["images"][0]
    gone = {name for name, path in planted.items() if not path.exists()}
    assert gone == {"dead_image_tmp", "dead_sidecar_tmp", "dead_job_tmp", "old_orphan"}
    assert Path(stored["path"]).is_file()

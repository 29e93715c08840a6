"""Bounded load: 32 concurrent edit_image calls over streamable HTTP against one flux-mcp server.

The server (``python -m flux_mcp serve --http``) runs as a subprocess against the loopback fal
emulator with ``FLUX_MCP_FAL_CONCURRENCY=4`` and 0.2 s of model latency. Every call must succeed,
every image must land on disk with its sidecar, no more than 4 fal jobs may ever be in flight, and
the server's resident memory must stay bounded.

In-flight jobs are measured from what the emulator records, sampled from a thread: a job is in
flight at fal from its submit until fal has told the client it completed (the emulator records that
before sending it; the backend holds its slot from before the submit until it has heard it, so this
never over-counts). Submissions are read before the completions, so a job counted as unfinished was
still unfinished when the submissions were read.

``run_load`` is also what ``benchmarks/bench_load.py`` runs. This module knows the product only
through its CLI, its MCP tools and its output folder.
"""

from __future__ import annotations

import contextlib
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio
import psutil
import pytest
from mcp import Client

from .conftest import clean_env, data_uri, http_server, make_png, text_of
from .fal_emulator import FalEmulator

pytestmark = pytest.mark.anyio

CALLS = 32
CLIENTS = 4
FAL_CONCURRENCY = 4
LATENCY_S = 0.2
MAX_RSS_MB = 400
#: Everything (start, 32 calls, shutdown) must be over by then: a hang fails instead of blocking.
RUN_LIMIT_S = 90


@dataclass
class LoadReport:
    """What one load run measured."""

    latencies_s: list[float]
    wall_s: float
    peak_rss_mb: float
    peak_in_flight: int
    results: list[Any] = field(repr=False)
    out_dir: Path

    def percentile(self, q: float) -> float:
        ordered = sorted(self.latencies_s)
        return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))]

    @property
    def throughput(self) -> float:
        return len(self.latencies_s) / self.wall_s


def server_environment(emu: FalEmulator, work: Path, concurrency: int) -> dict[str, str]:
    home = work / "home"
    env = clean_env()
    env.update(
        emu.env(),
        HOME=str(home),
        XDG_CONFIG_HOME=str(home / ".config"),
        XDG_DATA_HOME=str(home / ".local/share"),
        XDG_CACHE_HOME=str(home / ".cache"),
        FLUX_MCP_OUTPUT_DIR=str(work / "out"),
        FLUX_MCP_INPUT_ROOTS=str(work),
        FLUX_MCP_PRESETS=str(work / "presets.toml"),
        FLUX_MCP_FAL_CONCURRENCY=str(concurrency),
        PYTHONUNBUFFERED="1",
    )
    return env


class _Sampler:
    """Samples, from a thread, the server's RSS and the number of fal jobs in flight."""

    def __init__(self, emu: FalEmulator, proc: psutil.Process) -> None:
        self.emu, self.proc = emu, proc
        self.peak_rss = 0
        self.peak_in_flight = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> _Sampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(5)
        self._sample()

    def _run(self) -> None:
        while not self._stop.wait(0.002):
            self._sample()

    def _sample(self) -> None:
        submitted = [s.request_id for s in list(self.emu.submissions)]  # first: see the docstring
        told = set(self.emu.completed_told)
        self.peak_in_flight = max(self.peak_in_flight, sum(1 for rid in submitted if rid not in told))
        with contextlib.suppress(psutil.NoSuchProcess):  # it may exit between two samples
            self.peak_rss = max(self.peak_rss, self.proc.memory_info().rss)


async def run_load(
    emu: FalEmulator,
    work: Path,
    calls: int = CALLS,
    clients: int = CLIENTS,
    concurrency: int = FAL_CONCURRENCY,
    latency_s: float = LATENCY_S,
) -> LoadReport:
    """Start the HTTP server, run ``calls`` concurrent edits spread over ``clients`` MCP clients."""
    emu.latency_s = latency_s
    (work / "home").mkdir(parents=True, exist_ok=True)
    latencies: list[float] = []
    results: list[Any] = [None] * calls
    image = data_uri(make_png(64, 48))

    async def one(client: Client, index: int) -> None:
        started = time.monotonic()
        results[index] = await client.call_tool(
            "edit_image",
            {
                "prompt": f"load test {index}",
                "seed": 1000 + index,
                "num_inference_steps": 4,
                "image_urls": [image],
            },
        )
        latencies.append(time.monotonic() - started)

    # The clock starts once every client has its MCP session: the run measures calls, not handshakes.
    connected, all_connected, go = [0], anyio.Event(), anyio.Event()

    async def client_share(share: list[int]) -> None:
        async with Client(server.url) as client:
            connected[0] += 1
            if connected[0] == clients:
                all_connected.set()
            await go.wait()
            async with anyio.create_task_group() as group:
                for index in share:
                    group.start_soon(one, client, index)

    environment = server_environment(emu, work, concurrency)
    with (
        http_server(environment, log=work / "server.log") as server,
        _Sampler(emu, psutil.Process(server.proc.pid)) as sampler,
    ):
        with anyio.fail_after(RUN_LIMIT_S):
            async with anyio.create_task_group() as group:
                for c in range(clients):
                    group.start_soon(client_share, list(range(c, calls, clients)))
                await all_connected.wait()
                started = time.monotonic()
                go.set()
        wall = time.monotonic() - started
    return LoadReport(
        latencies, wall, sampler.peak_rss / 2**20, sampler.peak_in_flight, results, work / "out"
    )


async def test_32_concurrent_edits_over_http_stay_within_the_fal_concurrency_and_memory_bounds(
    tmp_path: Path, emulator: FalEmulator
) -> None:
    report = await run_load(emulator, tmp_path)

    failed = [text_of(r) for r in report.results if r is None or r.is_error]
    assert not failed, failed[:3]
    images = [r.structured_content["images"][0] for r in report.results]
    assert len({img["id"] for img in images}) == CALLS
    assert sorted(img["seed"] for img in images) == [1000 + i for i in range(CALLS)]
    stored = {p.stem for p in report.out_dir.glob("*.png")}
    sidecars = {p.stem for p in report.out_dir.glob("*.json")}
    assert stored == sidecars == {img["id"] for img in images}
    assert not list(report.out_dir.glob(".tmp-*"))

    assert len(emulator.submissions) == CALLS
    # Never more than FLUX_MCP_FAL_CONCURRENCY jobs at fal at once, and the limit was actually used.
    assert report.peak_in_flight == FAL_CONCURRENCY, report.peak_in_flight
    # 32 jobs through 4 slots of >= 0.2 s each take at least 8 rounds.
    assert report.wall_s >= CALLS / FAL_CONCURRENCY * LATENCY_S
    assert report.wall_s < 45, report.wall_s
    assert 0 < report.peak_rss_mb < MAX_RSS_MB, report.peak_rss_mb

"""Memory under a long GPU queue: peak server RSS with N local jobs waiting, each with a ~1 MiB input.

    python benchmarks/bench_queue.py                      # 50 queued jobs, 1 MiB inputs of 16 MP each
    python benchmarks/bench_queue.py --jobs 50 --megapixels 64

A ``flux-mcp serve --http`` subprocess on the local backend with the tiny klein pipeline (CPU). One
long edit takes the GPU; then ``--jobs`` more edit_image calls arrive, each with its own ~1 MiB PNG
that decodes to ``--megapixels`` (a flat picture with a noisy band: small file, many pixels, as an
attacker would send). Their calls return a job id after the call budget while the jobs wait. The
server's RSS is sampled throughout; the table gives the peak and the cost per queued job. Inputs
are kept encoded while queued, so the cost per job is about the input's file size, not its pixels.
"""

from __future__ import annotations

import argparse
import io
import os
import random
import sys
import tempfile
import threading
import time
from pathlib import Path

import anyio
import psutil
from mcp import Client
from PIL import Image

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from tests.conftest import clean_env, data_uri, http_server, text_of  # noqa: E402

LONG = {"prompt": "hold the GPU", "num_inference_steps": 50, "image_size": {"width": 512, "height": 512}}


def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--jobs", type=int, default=50, help="jobs queued behind the running one (default 50)"
    )
    parser.add_argument(
        "--megapixels", type=float, default=16, help="pixels of each ~1 MiB input (default 16)"
    )
    parser.add_argument("--input-mb", type=float, default=1.0, help="file size of each input (default 1 MiB)")
    return parser.parse_args(argv)


def bomb_png(megapixels: float, size_mb: float, seed: int) -> bytes:
    """A PNG of ``megapixels`` whose file is about ``size_mb``: flat, with a band of noise."""
    side = int((megapixels * 1e6) ** 0.5)
    image = Image.new("RGB", (side, side), (90, 120, 200))
    band_rows = max(1, int(size_mb * 2**20 / (side * 3)))
    noise = random.Random(seed).randbytes(side * band_rows * 3)
    image.paste(Image.frombytes("RGB", (side, band_rows), noise), (0, 0))
    out = io.BytesIO()
    image.save(out, format="PNG", compress_level=6)
    return out.getvalue()


class _PeakRss:
    def __init__(self, pid: int) -> None:
        self.proc = psutil.Process(pid)
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> _PeakRss:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(5)

    def _run(self) -> None:
        while not self._stop.wait(0.01):
            try:
                self.peak = max(self.peak, self.proc.memory_info().rss)
            except psutil.NoSuchProcess:
                return


async def run(ns: argparse.Namespace, work: Path) -> list[tuple[str, str]]:
    from flux_mcp.backends.tiny import save_tiny_model

    model = save_tiny_model(work / "model")
    inputs = [data_uri(bomb_png(ns.megapixels, ns.input_mb, seed)) for seed in range(ns.jobs)]
    env = clean_env(
        HOME=str(work / "home"),
        FLUX_MCP_BACKEND="local",
        FLUX_MCP_MODEL=str(model),
        FLUX_MCP_DEVICE="cpu",
        FLUX_MCP_OUTPUT_DIR=str(work / "out"),
        FLUX_MCP_MAX_QUEUED_JOBS=str(ns.jobs + 1),
        FLUX_MCP_MAX_INPUT_MEGAPIXELS=str(max(64, ns.megapixels)),
        FLUX_MCP_CALL_BUDGET_S="1",
        OMP_NUM_THREADS="1",
    )
    (work / "home").mkdir()
    with http_server(env, log=work / "server.log") as server, _PeakRss(server.proc.pid) as rss:
        async with Client(server.url) as client:
            first = await client.call_tool("edit_image", {**LONG, "image_urls": [inputs[0]]})
            baseline = rss.proc.memory_info().rss
            started = time.monotonic()
            answers: list[str] = []

            async def queue(index: int) -> None:
                result = await client.call_tool("edit_image", {**LONG, "image_urls": [inputs[index]]})
                answers.append("error: " + text_of(result)[:80] if result.is_error else "queued")

            async with anyio.create_task_group() as group:
                for index in range(ns.jobs):
                    group.start_soon(queue, index)
            queued_s = time.monotonic() - started
            await anyio.sleep(1.0)  # let the queue settle
            settled = rss.proc.memory_info().rss
        peak = rss.peak
    queued = answers.count("queued")
    size = sum(len(u) * 3 // 4 for u in inputs) / len(inputs)
    return [
        ("jobs queued behind the running one", f"{queued} of {ns.jobs} ({len(answers) - queued} refused)"),
        ("each input", f"{size / 2**20:.2f} MiB PNG, {ns.megapixels:g} MP"),
        ("first call", "pending (holds the GPU)" if first.structured_content.get("job") else "finished"),
        ("server RSS with the first job running", f"{baseline / 2**20:.0f} MB"),
        ("peak server RSS", f"{peak / 2**20:.0f} MB"),
        ("server RSS with every job queued", f"{settled / 2**20:.0f} MB"),
        ("peak RSS per queued job", f"{(peak - baseline) / max(queued, 1) / 2**20:.1f} MB"),
        ("time to queue them", f"{queued_s:.1f} s"),
    ]


def main(argv: list[str] | None = None) -> int:
    ns = _parse(argv)
    with tempfile.TemporaryDirectory(prefix="flux-bench-queue-") as tmp:
        rows = anyio.run(run, ns, Path(tmp))
    width = max(len(name) for name, _ in rows)
    for name, value in rows:
        print(f"{name:<{width}}  {value}")
    return 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())

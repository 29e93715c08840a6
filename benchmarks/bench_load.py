"""Load benchmark: N concurrent edit_image calls over streamable HTTP against one flux-mcp server.

    python benchmarks/bench_load.py                      # 32 calls, 4 clients, 4 fal slots, 0.2 s latency
    python benchmarks/bench_load.py --calls 128 --clients 8 --concurrency 8 --latency 0.5

The same run as tests/test_load.py (``run_load``): the server is a ``flux-mcp serve --http``
subprocess talking to the loopback fal emulator; nothing leaves the machine and no key is needed.
Prints p50/p99 call latency, throughput, peak server RSS and the most fal jobs seen in flight;
exits 1 when a call failed or the fal concurrency limit was exceeded.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import anyio

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from tests.fal_emulator import FalEmulator  # noqa: E402
from tests.test_load import LoadReport, run_load  # noqa: E402


def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--calls", type=int, default=32, help="concurrent edit_image calls (default 32)")
    parser.add_argument("--clients", type=int, default=4, help="MCP clients sharing the calls (default 4)")
    parser.add_argument("--concurrency", type=int, default=4, help="FLUX_MCP_FAL_CONCURRENCY (default 4)")
    parser.add_argument("--latency", type=float, default=0.2, help="emulated model seconds per job")
    return parser.parse_args(argv)


def _print(report: LoadReport, ns: argparse.Namespace) -> None:
    failed = sum(1 for r in report.results if r is None or r.is_error)
    rows = [
        ("calls", f"{len(report.results)} ({failed} failed)"),
        ("clients / fal slots", f"{ns.clients} / {ns.concurrency}"),
        ("model latency", f"{ns.latency:g} s"),
        ("p50 latency", f"{report.percentile(0.50):.3f} s"),
        ("p99 latency", f"{report.percentile(0.99):.3f} s"),
        ("wall time", f"{report.wall_s:.2f} s"),
        ("throughput", f"{report.throughput:.1f} calls/s"),
        ("ideal throughput", f"{ns.concurrency / ns.latency:.1f} calls/s (slots / latency)"),
        ("peak server RSS", f"{report.peak_rss_mb:.0f} MB"),
        ("peak fal jobs in flight", f"{report.peak_in_flight} (limit {ns.concurrency})"),
    ]
    width = max(len(name) for name, _ in rows)
    for name, value in rows:
        print(f"{name:<{width}}  {value}")


def main(argv: list[str] | None = None) -> int:
    ns = _parse(argv)
    with tempfile.TemporaryDirectory(prefix="flux-bench-load-") as tmp, FalEmulator() as emu:
        report = anyio.run(run_load, emu, Path(tmp), ns.calls, ns.clients, ns.concurrency, ns.latency)
        _print(report, ns)
    ok = all(r is not None and not r.is_error for r in report.results)
    return 0 if ok and report.peak_in_flight <= ns.concurrency else 1


if __name__ == "__main__":
    sys.exit(main())

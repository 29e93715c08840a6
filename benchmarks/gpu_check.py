"""GPU check of the local backend: what the CPU tests cannot see, on the tiny pipeline (no downloads).

On CUDA, in bf16 (the backend's dtype there), through ``LocalBackend`` as the server uses it:

1. every acceleration level (none, regular = torch.compile, high = TaylorSeer) through 12 changing
   LoRA configurations (more new adapter sets than dynamo's recompile limit of 8): all must succeed;
2. model offload and sequential offload (FLUX_MCP_OFFLOAD=model / sequential): an edit with a LoRA;
3. batching: compare_seeds-style ``run`` of 4 seeds against 4 single edits (target >= 2.5x);
4. CNS against the plain sampler (target <= 1.15x);
5. peak VRAM per denoising step (the peak is read and reset at every step's progress message).

Prints one table; exits 1 when a functional row failed (an error), 0 otherwise (timing targets are
reported, not enforced). Without CUDA it runs the rows a CPU can (regular with the eager compile
backend, which keeps dynamo's guards and limits) at a smaller size and prints why the others were
skipped. Meant to finish in under 5 minutes on a GPU.

Run: ``python benchmarks/gpu_check.py [--size 256] [--steps 28] [--compile-backend auto]``.
"""

from __future__ import annotations

import argparse
import io
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
import torch

from flux_mcp.backends import InputImage, RunContext, run_one
from flux_mcp.backends.local import LocalBackend
from flux_mcp.backends.tiny import (
    changing_lora_sets,
    make_example_image,
    make_lora_state_dict,
    save_lora,
    save_tiny_model,
)
from flux_mcp.config import Settings
from flux_mcp.errors import FluxMCPError
from flux_mcp.schema import EditRequest

CUDA = torch.cuda.is_available()
LORA_CONFIGURATIONS = 12
LEVELS = ("none", "regular", "high")


@dataclass
class Row:
    check: str
    value: str
    target: str = ""
    result: str = "ok"


class StepMemory:
    """A progress sink that records the peak CUDA memory of every denoising step."""

    def __init__(self) -> None:
        self.peaks: list[int] = []

    async def __call__(self, progress: float, total: float | None, message: str) -> None:
        if CUDA and message.startswith("step "):
            self.peaks.append(torch.cuda.max_memory_allocated())
            torch.cuda.reset_peak_memory_stats()


async def _timed(fn: Callable[[], Awaitable[object]]) -> float:
    started = time.perf_counter()
    await fn()
    return time.perf_counter() - started


class Check:
    """The model, LoRA files and input picture of one run of this script, in a temp dir."""

    def __init__(self, workdir: Path, size: int, steps: int, compile_backend: str) -> None:
        from diffusers import Flux2Transformer2DModel

        self.workdir, self.size, self.steps, self.compile_backend = workdir, size, steps, compile_backend
        self.model = save_tiny_model(workdir / "model")
        transformer = Flux2Transformer2DModel.from_pretrained(self.model / "transformer")
        paths = [
            str(
                save_lora(
                    workdir / f"lora{seed}.safetensors", make_lora_state_dict(transformer, "peft", seed=seed)
                )
            )
            for seed in range(4)
        ]
        self.lora_sets = changing_lora_sets(paths, LORA_CONFIGURATIONS)
        buffer = io.BytesIO()
        make_example_image(size, size).save(buffer, format="PNG")
        self.inputs = [
            InputImage("check.png", data=buffer.getvalue(), content_type="image/png", width=size, height=size)
        ]

    def backend(self, **settings: Any) -> LocalBackend:
        base = {
            "model": str(self.model),
            "output_dir": self.workdir / "out",
            "lora_cache": self.workdir / "lora-cache",
            "input_roots": (self.workdir,),
            "compile_backend": self.compile_backend,
        }
        return LocalBackend(Settings(**(base | settings)))

    def request(self, **fields: Any) -> EditRequest:
        base = {
            "prompt": "a red house on a hill, watercolour",
            "image_urls": ["check.png"],
            "num_inference_steps": self.steps,
            "guidance_scale": 4.0,
            "seed": 1,
            "acceleration": "none",
            "enable_safety_checker": False,
        }
        return EditRequest(**(base | fields))

    async def edit(self, backend: LocalBackend, progress: Any = None, **fields: Any) -> Any:
        return await run_one(
            backend, self.request(**fields), self.inputs, RunContext(progress or StepMemory())
        )

    # -- the checks ---------------------------------------------------------------------------------

    async def acceleration(self, backend: LocalBackend, level: str) -> Row:
        """12 requests, each with the next LoRA configuration; batch sizes 1 and 2 alternate."""
        times, failures, eager_notes = [], [], 0
        for index, loras in enumerate(self.lora_sets):
            started = time.perf_counter()
            try:
                result = await self.edit(backend, acceleration=level, loras=loras, num_images=1 + index % 2)
            except FluxMCPError as exc:
                failures.append(f"#{index + 1}: {exc}"[:120])
                continue
            times.append(time.perf_counter() - started)
            eager_notes += any("ran this LoRA" in note or "ran eager" in note for note in result.notes)
        value = (
            f"{len(times)}/{len(self.lora_sets)} ok, first {times[0]:.2f} s, median {statistics.median(times):.2f} s"
            if times
            else "0 ok"
        )
        if eager_notes:
            value += f", {eager_notes} ran eager"
        return Row(f"acceleration {level}: {LORA_CONFIGURATIONS} LoRA configurations", value, "all succeed",
                   "ok" if not failures else "FAILED " + "; ".join(failures[:2]))  # fmt: skip

    async def offload(self, mode: str) -> Row:
        if not CUDA:
            return Row(f"offload {mode}", "skipped: needs CUDA", result="skipped")
        backend = self.backend(offload=mode)
        try:
            await self.edit(backend, loras=self.lora_sets[1])  # loads the model
            memory = StepMemory()
            seconds = await _timed(lambda: self.edit(backend, memory, loras=self.lora_sets[5]))
        except FluxMCPError as exc:
            return Row(f"offload {mode}", str(exc)[:80], result="FAILED")
        finally:
            await backend.aclose()
        return Row(f"offload {mode} (edit with 2 LoRAs)", f"{seconds:.2f} s, peak {_mib(max(memory.peaks))}")

    async def batching(self, backend: LocalBackend) -> Row:
        seeds = [11, 12, 13, 14]
        request = self.request()

        async def batched() -> None:
            await backend.run(
                [request.model_copy(update={"seed": s}) for s in seeds], self.inputs, RunContext(StepMemory())
            )

        async def singles() -> None:
            for seed in seeds:
                await run_one(
                    backend, request.model_copy(update={"seed": seed}), self.inputs, RunContext(StepMemory())
                )

        await batched()  # warm-up of the batch-of-4 shapes
        batch_s = statistics.median([await _timed(batched) for _ in range(3)])
        single_s = statistics.median([await _timed(singles) for _ in range(3)])
        speedup = single_s / batch_s
        value = f"{speedup:.2f}x ({batch_s:.2f} s vs {single_s:.2f} s)"
        return Row("compare_seeds(4) batch vs 4 single edits", value, ">= 2.5x", _verdict(speedup >= 2.5))

    async def cns(self, backend: LocalBackend) -> Row:
        plain = statistics.median([await _timed(lambda: self.edit(backend)) for _ in range(3)])
        coloured = statistics.median(
            [await _timed(lambda: self.edit(backend, enable_cns=True)) for _ in range(3)]
        )
        ratio = coloured / plain
        value = f"{ratio:.3f}x ({coloured:.2f} s vs {plain:.2f} s)"
        return Row("CNS vs plain sampler", value, "<= 1.15x", _verdict(ratio <= 1.15))

    async def step_memory(self, backend: LocalBackend) -> Row:
        if not CUDA:
            return Row("peak VRAM per step", "skipped: needs CUDA", result="skipped")
        memory = StepMemory()
        await self.edit(backend, memory, loras=self.lora_sets[11], num_images=4)
        peaks = memory.peaks
        return Row(
            "peak VRAM per step (4 images, 3 LoRAs)", f"max {_mib(max(peaks))}, min {_mib(min(peaks))}"
        )


def _mib(count: int) -> str:
    return f"{count / 2**20:.0f} MiB"


def _verdict(met: bool) -> str:
    return "ok" if met else "MISSED"


async def run_checks(check: Check) -> list[Row]:
    backend = check.backend()
    rows: list[Row] = []
    try:
        await check.edit(backend)  # loads the model
        rows += [await _row(f"acceleration {level}", check.acceleration(backend, level)) for level in LEVELS]
        rows.append(await _row("batching", check.batching(backend)))
        rows.append(await _row("CNS vs plain", check.cns(backend)))
        rows.append(await _row("peak VRAM per step", check.step_memory(backend)))
    finally:
        await backend.aclose()
    rows += [await _row(f"offload {mode}", check.offload(mode)) for mode in ("model", "sequential")]
    return rows


async def _row(name: str, measuring: Awaitable[Row]) -> Row:
    """The row, or a FAILED row with the error: one broken check must not hide the others' results
    (so any exception, including torch's own, is caught here and shown)."""
    try:
        return await measuring
    except Exception as exc:
        return Row(name, f"{type(exc).__name__}: {exc}"[:100], result="FAILED")


def print_table(rows: list[Row], header: str, seconds: float) -> None:
    widths = [max(len(getattr(row, name)) for row in rows) for name in ("check", "value", "target")]
    print(header)
    print(f"{'check':<{widths[0]}}  {'value':<{widths[1]}}  {'target':<{widths[2]}}  result")
    for row in rows:
        print(f"{row.check:<{widths[0]}}  {row.value:<{widths[1]}}  {row.target:<{widths[2]}}  {row.result}")
    print(f"total {seconds:.0f} s (target < 300 s on a GPU)")


def quiet_libraries() -> None:
    """No progress bars from model saving/loading, and no peft warning per extra adapter: one table."""
    import warnings

    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    diffusers_logging.disable_progress_bar()
    transformers_logging.disable_progress_bar()
    warnings.filterwarnings("ignore", message="Already found a `peft_config` attribute")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=256 if CUDA else 64, help="input and output side in px")
    parser.add_argument("--steps", type=int, default=28 if CUDA else 4, help="denoising steps")
    parser.add_argument(
        "--compile-backend",
        default="auto" if CUDA else "eager",
        choices=["auto", "inductor", "eager", "aot_eager"],
        help="FLUX_MCP_COMPILE_BACKEND for acceleration 'regular' (CPU default: eager, to keep dynamo's limits)",
    )
    args = parser.parse_args(argv)
    quiet_libraries()
    if not CUDA:
        torch.set_num_threads(1)  # the tiny model's matrices are too small to split
        print("no CUDA device: running the CPU-capable rows only (offload and VRAM rows need CUDA)")
    device = torch.cuda.get_device_name() if CUDA else "CPU"
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="flux-mcp-gpu-check-") as workdir:
        check = Check(Path(workdir), args.size, args.steps, args.compile_backend)
        rows = anyio.run(run_checks, check)
    header = (
        f"tiny klein pipeline, {device}, {'bf16' if CUDA else 'float32'}, {args.size}x{args.size}, "
        f"{args.steps} steps, compile backend {args.compile_backend}, torch {torch.__version__}"
    )
    print_table(rows, header, time.perf_counter() - started)
    return 1 if any(row.result.startswith("FAILED") for row in rows) else 0


if __name__ == "__main__":
    sys.exit(main())

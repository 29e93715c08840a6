"""Benchmark of Colored Noise Sampling's overhead on this machine (CPU or GPU).

Run ``python benchmarks/bench_cns.py`` (the ``local`` extra installed). It prints two tables:

1. A whole run of the tiny random klein pipeline (256x256, 28 steps, CFG; ``--reference`` adds a
   256x256 input image, which quadruples the attention cost on a CPU): the plain Euler sampler vs
   CNS with s_churn 0.5, median of a few interleaved repetitions, and their ratio (target <= 1.15).
2. The per-step cost at a 1024x1024 request's latent grid (batch 1, 128 channels x 64 x 64 tokens):
   colouring the noise alone, drawing + colouring, a CNS step, and a plain Euler step (the steps
   averaged over the 27 noised steps of a 28-step run, so the per-run set-up is included).

Targets are printed next to the figures; the script exits 0 whatever they are (it measures, it does
not gate). It knows nothing about MCP, fal or the result store.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch
from diffusers import FlowMatchEulerDiscreteScheduler

from flux_mcp.backends.cns import (
    CNSParams,
    ColoredNoiseScheduler,
    approximation_gamma,
    band_weights,
    colour_noise,
    noise_generators,
    radial_bins,
    token_grid,
)
from flux_mcp.backends.tiny import build_tiny_pipeline, make_example_image
from flux_mcp.schema import EditRequest

RATIO_TARGET = 1.15


def _median_seconds(run: Callable[[], object], repeats: int, warmup: int = 1) -> float:
    for _ in range(warmup):
        run()
    timings = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        timings.append(time.perf_counter() - start)
    return statistics.median(timings)


def _cns_params(s_churn: float) -> CNSParams:
    request = EditRequest(prompt="bench", image_urls=["https://example.invalid/a.png"], cns_s_churn=s_churn)
    return CNSParams.from_request(request)


class _TimedStep:
    """Mixin for a scheduler: adds up the seconds spent in ``step`` (benchmark only)."""

    step_seconds = 0.0

    def step(self, *args: Any, **kwargs: Any) -> Any:
        start = time.perf_counter()
        try:
            return super().step(*args, **kwargs)  # type: ignore[misc]
        finally:
            self.step_seconds += time.perf_counter() - start


class _TimedStock(_TimedStep, FlowMatchEulerDiscreteScheduler):
    """The stock scheduler, timed."""


class _TimedCNS(_TimedStep, ColoredNoiseScheduler):
    """The CNS scheduler, timed."""


def bench_pipeline(size: int, steps: int, repeats: int, device: str, reference: bool) -> dict[str, float]:
    """Median seconds of a whole run, and of the time inside scheduler.step, plain and with CNS."""
    pipe = build_tiny_pipeline(seed=0).to(device)
    picture = make_example_image(size, size) if reference else None
    stock = _TimedStock.from_config(pipe.scheduler.config)
    cns = _TimedCNS.from_config(pipe.scheduler.config)
    params = _cns_params(0.5)

    def edit(scheduler: _TimedStock | _TimedCNS, num_steps: int = steps) -> tuple[float, float]:
        pipe.scheduler = scheduler
        if isinstance(scheduler, ColoredNoiseScheduler):
            scheduler.configure_cns(params, noise_generators([0], device), token_grid(pipe, size, size))
        scheduler.step_seconds = 0.0
        start = time.perf_counter()
        pipe(
            image=picture,
            prompt="a red house at dusk",
            height=size,
            width=size,
            num_inference_steps=num_steps,
            guidance_scale=4.0,
            generator=torch.Generator(device).manual_seed(0),
            output_type="latent",
        )
        _sync(device)
        return time.perf_counter() - start, scheduler.step_seconds

    edit(stock, 2), edit(cns, 2)  # warm both paths up (short runs) before timing either
    plain_runs, cns_runs = [], []
    for _ in range(repeats):  # interleaved, so drift in machine load hits both alike
        plain_runs.append(edit(stock))
        cns_runs.append(edit(cns))
    return {
        "plain": statistics.median(run[0] for run in plain_runs),
        "cns": statistics.median(run[0] for run in cns_runs),
        "plain_steps": statistics.median(run[1] for run in plain_runs),
        "cns_steps": statistics.median(run[1] for run in cns_runs),
    }


def bench_step(repeats: int, device: str) -> dict[str, float]:
    """Milliseconds per call at a 1024x1024 request's grid: (1, 128, 64, 64) = 4096 tokens x 128."""
    channels, height, width, num_bins = 128, 64, 64, 32
    generator = torch.Generator(device).manual_seed(0)
    white = torch.randn(1, channels, height, width, generator=generator, device=device)
    bins = radial_bins(height, width, num_bins, device=device)
    weights = band_weights(approximation_gamma(10, 28, num_bins), -0.2, 0.75, 1.73, True).to(device)
    tokens = torch.randn(1, height * width, channels, generator=generator, device=device).to(torch.bfloat16)
    velocity = torch.randn_like(tokens)

    def colour_only() -> None:
        colour_noise(white, weights, bins, 0.98)
        _sync(device)

    def draw_and_colour() -> None:
        fresh = torch.randn(channels, height, width, generator=generator, device=device)
        colour_noise(fresh.unsqueeze(0), weights, bins, 0.98)
        _sync(device)

    def noised_steps(scheduler: FlowMatchEulerDiscreteScheduler) -> Callable[[], None]:
        def run() -> None:
            scheduler.set_timesteps(28, device=device)
            for t in scheduler.timesteps[:-1]:  # the last step of a run adds no noise
                scheduler.step(velocity, t, tokens, return_dict=False)
            _sync(device)

        return run

    stock = FlowMatchEulerDiscreteScheduler(shift=3.0)
    cns = ColoredNoiseScheduler(shift=3.0)
    cns.configure_cns(_cns_params(0.5), noise_generators([0], device), (height, width))
    return {
        "colour_noise (FFT, gain, iFFT, normalise)": _median_seconds(colour_only, repeats) * 1e3,
        "draw white noise + colour_noise": _median_seconds(draw_and_colour, repeats) * 1e3,
        "CNS step (ColoredNoiseScheduler.step)": _median_seconds(noised_steps(cns), repeats) * 1e3 / 27,
        "plain Euler step (stock scheduler.step)": _median_seconds(noised_steps(stock), repeats) * 1e3 / 27,
    }


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=256, help="edit size in pixels (default 256)")
    parser.add_argument("--steps", type=int, default=28, help="denoising steps (default 28)")
    parser.add_argument("--repeats", type=int, default=3, help="timed repetitions (default 3)")
    parser.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: torch's default)")
    parser.add_argument("--reference", action="store_true", help="edit a 256x256 input image")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.set_grad_enabled(False)
    print(f"device {args.device}, torch {torch.__version__}, {torch.get_num_threads()} intra-op threads\n")

    runs = bench_pipeline(args.size, args.steps, args.repeats, args.device, args.reference)
    ratio = runs["cns"] / runs["plain"]
    inputs = " + 1 reference" if args.reference else ""
    print(f"1. tiny klein pipeline, {args.size}x{args.size}{inputs}, {args.steps} steps, CFG 4")
    print(f"   {'sampler':<32}{'median run s':>14}{'in step() ms':>14}")
    print(f"   {'plain Euler':<32}{runs['plain']:>14.3f}{runs['plain_steps'] * 1e3:>14.1f}")
    print(f"   {'CNS, s_churn 0.5':<32}{runs['cns']:>14.3f}{runs['cns_steps'] * 1e3:>14.1f}")
    verdict = "ok" if ratio <= RATIO_TARGET else "above target"
    print(f"   {'ratio CNS / plain':<32}{ratio:>14.3f}   (target <= {RATIO_TARGET}: {verdict})")
    overhead = (runs["cns_steps"] - runs["plain_steps"]) / runs["plain"]
    print(
        f"   {'CNS time in step() / plain run':<32}{overhead:>14.2%}   (the ratio's noise is machine load)\n"
    )

    print("2. one step at a 1024x1024 request's grid: batch 1, 128 channels x 64 x 64")
    print(f"   {'operation':<44}{'median ms':>10}")
    for name, milliseconds in bench_step(max(5, args.repeats * 5), args.device).items():
        print(f"   {name:<44}{milliseconds:>10.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

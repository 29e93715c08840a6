"""Colored Noise Sampling (CNS) for the local backend: spectral noise shaping and a scheduler.

CNS (Davidson, Issachar, Benaim, *Colored Noise Diffusion Sampling*, arXiv:2605.30332) turns the
deterministic Euler sampler into a stochastic one whose injected noise is coloured: its energy goes
to the radial frequency bands the model has not resolved yet. See ``shared/reference/cns.md``.
Comments mark what follows the paper's reference code as [paper] and how it is mapped onto FLUX.2's
rectified-flow sampler as [ours].

Layers, bottom up:
- pure spectral functions on plain tensors (``radial_bins``, ``tilt_alpha``, ``band_weights``,
  ``colour_noise``) and the gamma sources (``approximation_gamma``, ``analytic_gamma_matrix``,
  ``resample_gamma``, ``gamma_at_sigmas``, ``calibrate_gamma``; its cache files are in ``gamma_files``);
- ``ColoredNoiseScheduler``, a ``FlowMatchEulerDiscreteScheduler`` that the local backend swaps into
  the klein pipeline (no fork of the pipeline) and configures before each run.

This module imports torch and diffusers, so only ``backends/local.py`` imports it. It knows nothing
about MCP, fal, presets, the result store or how requests are validated: it reads the ``cns_*`` field
names of ``EditRequest`` and nothing else.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, fields
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import torch
from diffusers import FlowMatchEulerDiscreteScheduler
from diffusers.schedulers.scheduling_flow_match_euler_discrete import FlowMatchEulerDiscreteSchedulerOutput

from .gamma_files import (
    Gamma,
    GammaCache,
    gamma_cache_path,
    load_cached_gamma,
    load_gamma_matrix,
    save_gamma_matrix,
)

if TYPE_CHECKING:
    from ..schema import EditRequest

__all__ = [
    "CNSParams",
    "ColoredNoiseScheduler",
    "Gamma",
    "GammaCache",
    "analytic_gamma_matrix",
    "approximation_gamma",
    "band_weights",
    "calibrate_gamma",
    "colour_noise",
    "gamma_at_sigmas",
    "gamma_cache_path",
    "load_cached_gamma",
    "load_gamma_matrix",
    "noise_generators",
    "radial_bins",
    "resample_gamma",
    "save_gamma_matrix",
    "tilt_alpha",
    "token_grid",
    "variance_preserving_split",
]

#: Below this standard deviation the coloured noise counts as zero (every band weight was 0).
_ZERO_STD = 1e-12
#: [ours] Offset between an image's seed and the seed of its noise generator. The pipeline draws the
#: initial latent of row i from a generator seeded with seed i; a noise generator with the same seed
#: would replay that very draw as the first injected noise, correlating noise with the starting point.
#: User seeds are < 2**32, so seed + offset never equals another image's seed.
_NOISE_SEED_OFFSET = 0x9E3779B97F4A7C15
#: [ours] Knee of the power-law latent spectrum S(f) ∝ (f + f0)^-2 of the analytic stand-in, in
#: units of the largest radial frequency; it keeps S finite at f = 0.
_ANALYTIC_F0 = 0.05
#: [ours] Reference grid on which the analytic spectrum is scaled to unit mean power (the latents are
#: normalised to roughly unit variance, the same scale as the noise). 64x64 is a 1024px request's grid.
_ANALYTIC_GRID = (64, 64)


# ---------------------------------------------------------------------------------------------
# Parameters


@dataclass(frozen=True)
class CNSParams:
    """Every ``cns_*`` field of a request, without the prefix. Built from the request, never restated."""

    s_churn: float
    gamma_source: Literal["matrix", "approximation"]
    power_gamma: float
    gamma_divider: float
    alpha_tilt_start: float
    alpha_tilt_end: float
    alpha_use_fnorm: bool
    alpha_exp_interp: bool
    alpha_exp_sharpness: float
    num_freq_bins: int
    energy_scale: float

    @classmethod
    def from_request(cls, request: EditRequest) -> CNSParams:
        """Read ``request.cns_<name>`` for every field (the schema owns names, defaults and ranges)."""
        return cls(**{f.name: getattr(request, f"cns_{f.name}") for f in fields(cls)})


# ---------------------------------------------------------------------------------------------
# Pure spectral functions


def radial_bins(h: int, w: int, num_bins: int, device: torch.device | str | None = None) -> torch.Tensor:
    """[paper] Radial frequency band of every FFT coefficient of an (h, w) grid, as a LongTensor[h, w]."""
    fy = torch.fft.fftfreq(h, device=device).view(h, 1)
    fx = torch.fft.fftfreq(w, device=device).view(1, w)
    radius = torch.sqrt(fy**2 + fx**2)
    r_max = radius.max()
    if r_max <= 0:  # a 1x1 grid has only the DC coefficient
        return torch.zeros(h, w, dtype=torch.long, device=device)
    scaled = torch.floor(radius / r_max * (num_bins - 1))
    return scaled.long().clamp(0, num_bins - 1)


def tilt_alpha(
    step: int, num_steps: int, start: float, end: float, exp_interp: bool, sharpness: float
) -> float:
    """[paper] The frequency tilt at ``step`` of ``num_steps``: start -> end, linearly or exponentially."""
    progress = step / max(1, num_steps - 1)
    if exp_interp:
        progress = math.expm1(sharpness * progress) / math.expm1(sharpness)
    return start + progress * (end - start)


def band_weights(
    gamma_row: torch.Tensor, alpha: float, power: float, divider: float, use_fnorm: bool
) -> torch.Tensor:
    """Amplitude gain of each radial band, s_b = (r_b / max r) ** power * tilt_b, r_b = max(1 - g_b / divider, 0).

    Order [ours, following the hosted endpoint]: the power is applied to the residual FIRST, then the
    tilt. The paper's code tilts first and raises the tilted residual to the power, so there the power
    also scales the tilt (exp(a*f) ** p = exp(a*p*f)). The endpoint documents that the power has no
    effect under ``approximation``.
    [ours] The residual is divided by its largest band before the power: the energy normalisation
    cancels any common factor anyway, so this changes nothing but exactness. Under ``approximation``
    every band is then exactly 1 and the power has exactly no effect, and a small residual (a small
    divider) is not raised to a power that underflows float32 to 0, which would flip that step's
    noise from full to none.
    Tilt: ``use_fnorm`` = the paper's exp(alpha * f). Otherwise [ours] the linear tilt 1 + alpha * f
    (clamped at 0), f = the band's normalised radius: the paper's flat (1 + alpha) is the same for
    every band and cancels in the normalisation, doing nothing; the linear tilt reaches (1 + alpha) at
    the highest band and, as the endpoint describes the knob, alpha > 0 boosts high frequencies,
    alpha < 0 low ones.
    Weights are never negative. All of them may be 0 (divider < 1 with gamma near 1, or alpha <= -1
    without fnorm); ``colour_noise`` then returns zero noise.
    """
    residual = (1.0 - gamma_row.to(torch.float64) / divider).clamp(min=0.0)
    peak = residual.max()
    shape = (residual / peak if peak > 0 else residual) ** power
    f_norm = torch.linspace(0.0, 1.0, gamma_row.numel(), dtype=torch.float64, device=gamma_row.device)
    tilt = torch.exp(alpha * f_norm) if use_fnorm else (1.0 + alpha * f_norm).clamp(min=0.0)
    return (shape * tilt).to(torch.float32)


def colour_noise(
    white: torch.Tensor, weights: torch.Tensor, bins: torch.Tensor, energy_scale: float
) -> torch.Tensor:
    """[paper] Shape white noise (N, C, H, W) by band weights; per-image std = ``energy_scale``.

    ``real(ifft2(fft2(w) * weights[bins]))``, computed as rfft2/irfft2: the gain depends on |f| only,
    so it is Hermitian-symmetric and the half spectrum gives the same real result at half the cost.
    [ours] The std is normalised per image over its C x H x W (the paper uses the whole batch) so
    that row i of a batch equals a single run with seed i. Runs in float32 whatever ``white`` is.
    """
    height, width = white.shape[-2:]
    noise = white.to(torch.float32)
    gain = weights.to(device=noise.device, dtype=torch.float32)[bins.to(noise.device)]
    half_gain = gain[:, : width // 2 + 1]  # fftfreq's first W//2+1 columns have rfftfreq's |f|
    coloured = torch.fft.irfft2(torch.fft.rfft2(noise) * half_gain, s=(height, width))
    std = coloured.flatten(1).std(dim=1).view(-1, *([1] * (coloured.dim() - 1)))
    nonzero = std > _ZERO_STD
    scale = torch.where(nonzero, energy_scale / std.clamp(min=_ZERO_STD), torch.zeros_like(std))
    return coloured * scale


# ---------------------------------------------------------------------------------------------
# Gamma sources: per-band progress gamma(f, t), rows = steps, columns = radial bands


def approximation_gamma(step: int, num_steps: int, num_bins: int) -> torch.Tensor:
    """[paper] The uniform approximation: every band has progress i / (N - 1) at step i."""
    return torch.full((num_bins,), step / max(1, num_steps - 1), dtype=torch.float32)


def _normalise_per_band(matrix: torch.Tensor) -> torch.Tensor:
    """[paper] Stretch each band (column) over time to [0, 1]."""
    low = matrix.min(dim=0, keepdim=True).values
    high = matrix.max(dim=0, keepdim=True).values
    return (matrix - low) / (high - low + 1e-8)


def analytic_gamma_matrix(sigmas: torch.Tensor | Sequence[float], num_bins: int) -> torch.Tensor:
    """[ours] Analytic stand-in for a calibrated matrix: one row per sigma, normalised per band.

    The Wiener gain of a power-law latent spectrum S(f) ∝ (f + f0)^-2 seen through the noise of
    x = (1 - σ)x0 + σε: g(f, σ) = S(1-σ)² / (S(1-σ)² + σ²), i.e. the share of band f that is signal
    rather than noise at σ. Low bands rise early, high bands late, as measured matrices do.
    f is the band's normalised radius (as in the tilt); S is scaled to unit mean power over the
    coefficients of a 64x64 grid, matching the unit-variance latents and white noise.
    """
    sigma = torch.as_tensor(sigmas, dtype=torch.float64).flatten().cpu().view(-1, 1)
    f_norm = torch.linspace(0.0, 1.0, num_bins, dtype=torch.float64)
    spectrum = (f_norm + _ANALYTIC_F0) ** -2
    counts = torch.bincount(radial_bins(*_ANALYTIC_GRID, num_bins).flatten(), minlength=num_bins)
    spectrum = spectrum / ((spectrum * counts).sum() / counts.sum())
    signal = spectrum.view(1, -1) * (1.0 - sigma) ** 2
    gain = signal / (signal + sigma**2).clamp(min=1e-30)
    return _normalise_per_band(gain).to(torch.float32)


def resample_gamma(matrix: torch.Tensor, num_steps: int, num_bins: int) -> torch.Tensor:
    """Map a (rows x bands) matrix onto ``num_steps`` x ``num_bins``.

    [paper] Rows by progress, row = round(i / (N - 1) * (rows - 1)) (halves round up).
    [ours] Bands by linear interpolation with the first and last bands pinned (a band's position is
    its normalised radius in both matrices), so a matrix measured with 32 bands serves any count.
    """
    matrix = matrix.to(torch.float32)
    rows, bands = matrix.shape
    if bands != num_bins:
        matrix = torch.nn.functional.interpolate(
            matrix.unsqueeze(0), size=num_bins, mode="linear", align_corners=True
        ).squeeze(0)
    progress = torch.arange(num_steps, dtype=torch.float64) / max(1, num_steps - 1)
    row_index = torch.floor(progress * (rows - 1) + 0.5).long().clamp(0, rows - 1)
    return matrix[row_index.to(matrix.device)]


def gamma_at_sigmas(
    matrix: torch.Tensor, matrix_sigmas: torch.Tensor, sigmas: torch.Tensor | Sequence[float], num_bins: int
) -> torch.Tensor:
    """[ours] The matrix's rows at noise levels ``sigmas``: (len(sigmas), num_bins).

    A calibrated row belongs to the σ it was measured at, not to a step fraction: a schedule's
    sigmas depend on the step count and the image size (klein shifts them by ``mu``), so mapping by
    σ lets one calibration serve any of them. Rows are interpolated linearly in σ; sigmas outside the
    calibrated range take the nearest row. Bands as in ``resample_gamma``.
    """
    matrix = resample_gamma(matrix, matrix.shape[0], num_bins).cpu().to(torch.float64)  # bands only
    known = matrix_sigmas.detach().cpu().to(torch.float64).flatten()
    order = torch.argsort(known)
    known, rows = known[order].numpy(), matrix[order].numpy()
    wanted = torch.as_tensor(sigmas, dtype=torch.float64).detach().cpu().flatten().numpy()
    columns = [np.interp(wanted, known, rows[:, band]) for band in range(num_bins)]
    return torch.from_numpy(np.stack(columns, axis=1)).to(torch.float32)


# ---------------------------------------------------------------------------------------------
# Calibration of a gamma matrix on the deployed pipeline, and its cache file


class _RecordingScheduler(FlowMatchEulerDiscreteScheduler):
    """The stock Euler step that also keeps each step's clean prediction and the final sample."""

    clean_predictions: list[torch.Tensor]
    step_sigmas: list[float]
    final_sample: torch.Tensor | None = None

    def step(
        self, model_output: torch.Tensor, timestep: Any, sample: torch.Tensor, *args: Any, **kwargs: Any
    ) -> Any:
        if self.step_index is None:
            self._init_step_index(timestep)
        sigma = self.sigmas[self.step_index]
        self.step_sigmas.append(float(sigma))
        # FLUX: x = (1-σ)x0 + σε and v = ε - x0, so x - σv = x0 (the stock step is x + (σ_next - σ)v).
        self.clean_predictions.append(sample.float() - sigma * model_output.float())
        output = super().step(model_output, timestep, sample, *args, **kwargs)
        self.final_sample = (output[0] if isinstance(output, tuple) else output.prev_sample).float()
        return output


def _unpack_tokens(tokens: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """(..., h*w, C) tokens in the klein pipeline's row-major order -> (..., C, h, w)."""
    height, width = grid
    return tokens.transpose(-1, -2).reshape(*tokens.shape[:-2], tokens.shape[-1], height, width)


def _band_progress(clean: torch.Tensor, final: torch.Tensor, num_bins: int) -> torch.Tensor:
    """[paper] Progress per band of clean predictions (T, C, h, w) towards the final (C, h, w): (T, bins)."""
    spectra = torch.fft.fft2(clean.to(torch.float32))
    final_spectrum = torch.fft.fft2(final.to(torch.float32))
    error = (spectra - final_spectrum).abs() ** 2
    progress = (1.0 - error / (final_spectrum.abs() ** 2 + 1e-8)).clamp(0.0, 1.0).mean(dim=1)
    bins = radial_bins(*progress.shape[-2:], num_bins, device=progress.device).flatten()
    sums = torch.zeros(progress.shape[0], num_bins, device=progress.device)
    sums.index_add_(1, bins, progress.flatten(1))
    counts = torch.bincount(bins, minlength=num_bins).clamp(min=1)
    return (sums / counts).cpu()


def calibrate_gamma(
    pipe: Any,
    image: Any,
    prompt: str,
    num_steps: int,
    guidance_scale: float,
    num_bins: int,
    seeds: Sequence[int],
    *,
    height: int | None = None,
    width: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """[paper] Measure gamma(f, t) on ``pipe`` (a klein pipeline): Tensor[num_steps, num_bins], and
    [ours] the noise level σ of each row (Tensor[num_steps]), by which the backend maps rows.

    Runs the deterministic sampler once per seed (CNS off: the pipeline's scheduler is temporarily
    replaced by a recording stock Euler scheduler), records the clean prediction x̂0 at every step and
    the final sample, measures per-band progress, averages over seeds, and normalises each band over
    time to [0, 1]. The paper averages >= 4096 samples; a handful of seeds gives a rough estimate.
    [ours] Progress is measured where the noise is injected: on the packed tokens unpacked to the
    (128-channel, h, w) grid of BatchNorm-normalised, 2x2-patchified latents, not on VAE latents.
    Blocking (runs the whole pipeline len(seeds) times): call it from a worker thread.
    """
    if not seeds:
        raise ValueError("calibrate_gamma needs at least one seed")
    recorder = _RecordingScheduler.from_config(pipe.scheduler.config)
    original = pipe.scheduler
    pipe.scheduler = recorder
    total = torch.zeros(num_steps, num_bins)
    try:
        for seed in seeds:
            recorder.clean_predictions, recorder.step_sigmas, recorder.final_sample = [], [], None
            generator = torch.Generator(device=pipe._execution_device).manual_seed(int(seed))
            output = pipe(
                image=image,
                prompt=prompt,
                height=height,
                width=width,
                num_inference_steps=num_steps,
                guidance_scale=guidance_scale,
                generator=generator,
                output_type="latent",
            )
            if recorder.final_sample is None or len(recorder.clean_predictions) != num_steps:
                raise RuntimeError(
                    f"calibration run ran {len(recorder.clean_predictions)} of {num_steps} steps"
                )
            # The returned latents are unpatchified (C/4, 2h, 2w); the tokens live on the (h, w) grid.
            latent_h, latent_w = output.images.shape[-2:]
            grid = (latent_h // 2, latent_w // 2)
            clean = _unpack_tokens(torch.stack(recorder.clean_predictions)[:, 0], grid)
            final = _unpack_tokens(recorder.final_sample[0], grid)
            total += _band_progress(clean, final, num_bins)
    finally:
        pipe.scheduler = original
    return _normalise_per_band(total / len(seeds)), torch.tensor(recorder.step_sigmas, dtype=torch.float32)


# ---------------------------------------------------------------------------------------------
# The stochastic step's coefficients


def variance_preserving_split(sigma: float, sigma_next: float, s_churn: float) -> tuple[float, float]:
    """[ours] (s, c) of a step σ → σ_next: std of the fresh noise and weight of the predicted noise.

    s² = σn²·(1 - exp(-2ησh/σn²)) ≈ 2ησh for small steps (the reference's first-order injection) and
    always below σn²; c = sqrt(σn² - s²), so c² + s² = σn² exactly. σ_next must be above 0 (the
    last step adds no noise).
    """
    h = sigma - sigma_next
    injected_var = sigma_next**2 * -math.expm1(-2.0 * s_churn * sigma * h / sigma_next**2)
    return math.sqrt(injected_var), math.sqrt(max(sigma_next**2 - injected_var, 0.0))


# ---------------------------------------------------------------------------------------------
# Glue for the local backend


def token_grid(pipe: Any, height: int, width: int) -> tuple[int, int]:
    """The packed token grid (h, w) of a height x width image in the klein pipeline.

    The VAE downsamples by ``vae_scale_factor`` and the latents are patchified 2x2, floored the way
    ``Flux2KleinPipeline.prepare_latents`` does. Pass the same height/width to the pipeline.
    """
    multiple = pipe.vae_scale_factor * 2
    return (int(height) // multiple, int(width) // multiple)


def noise_generators(seeds: Sequence[int], device: torch.device | str) -> list[torch.Generator]:
    """One generator per image for CNS noise, decorrelated from the generators of the initial latents."""
    return [
        torch.Generator(device=device).manual_seed((int(seed) + _NOISE_SEED_OFFSET) % 2**64) for seed in seeds
    ]


@dataclass
class _CNSRun:
    """What ``configure_cns`` was told for the next run, plus caches built at its first step."""

    params: CNSParams
    generators: list[torch.Generator]
    grid: tuple[int, int]
    gamma: torch.Tensor | None
    gamma_label: str
    gamma_sigmas: torch.Tensor | None = None  # the σ of each gamma row (None: rows by step fraction)
    weights: torch.Tensor | None = None  # (steps, bins) band gains, on the latents' device
    bins: torch.Tensor | None = None  # (h, w) radial bands, on the latents' device
    host_sigmas: list[float] = field(default_factory=list)  # this schedule's sigmas as floats
    noised_steps: int = 0


class ColoredNoiseScheduler(FlowMatchEulerDiscreteScheduler):
    """FLUX.2's Euler scheduler with Colored Noise Sampling.

    Swap it in with ``pipe.scheduler = ColoredNoiseScheduler.from_config(pipe.scheduler.config)`` and
    call ``configure_cns`` before each run (``clear_cns`` for a run without CNS). Not configured, or
    with ``s_churn == 0``, every step is the stock step (bit-identical).

    [ours] The stochastic step, variance-preserving at any step size. With h = σ_i - σ_{i+1},
    η = s_churn, x̂0 = x - σ_i·v and ε̂ = x + (1 - σ_i)·v (x = (1-σ)x0 + σε, v = ε - x0):
        x_{i+1} = (1 - σ_{i+1})·x̂0 + sqrt(σ_{i+1}² - s²)·ε̂ + s·w_c,   s² = σ_{i+1}²·(1 - exp(-2ησ_i·h / σ_{i+1}²))
    The noise part has exactly σ_{i+1}² variance whatever the step size (w_c has unit variance per
    element). For small steps s² ≈ 2ησh and the step is the first-order one of the reference
    (x - h·v - η·h·ε̂ + sqrt(2ησh)·w_c); at klein's large last steps (σ 0.40 → 0.24) that first-order
    form left the sample 1.26x/1.51x/2.10x noisier than the schedule at s_churn 0.5/1/2, while s²
    here never exceeds σ_{i+1}². η = 0 (s = 0) is the stock step, and runs as it, bit for bit.
    """

    _cns: _CNSRun | None = None  # class default: from_config builds the instance without our __init__

    def configure_cns(
        self,
        params: CNSParams,
        generators: Sequence[torch.Generator],
        grid: tuple[int, int],
        gamma: torch.Tensor | None = None,
        gamma_label: str = "calibrated",
        gamma_sigmas: torch.Tensor | None = None,
    ) -> None:
        """Arm CNS for the next run.

        ``generators``: one per image of the batch (see ``noise_generators``); row i's noise comes
        from generators[i] only. ``grid``: the token grid from ``token_grid``. ``gamma``: a measured
        (steps x bands) matrix, used when ``params.gamma_source == "matrix"``; without one the
        analytic stand-in is built from this run's sigmas. ``gamma_label`` says where ``gamma`` came
        from (e.g. "calibrated: <file>") for ``cns_info``; ``gamma_sigmas`` the σ of each of its rows,
        by which rows are mapped onto this run's schedule (without them: by step fraction, as the paper).
        """
        if not generators:
            raise ValueError("configure_cns needs one generator per image")
        if gamma is not None and (gamma.dim() != 2 or min(gamma.shape) < 1):
            raise ValueError(f"gamma must be a (steps x bands) matrix, got shape {tuple(gamma.shape)}")
        grid = (int(grid[0]), int(grid[1]))
        self._cns = _CNSRun(params, list(generators), grid, gamma, gamma_label, gamma_sigmas)

    def clear_cns(self) -> None:
        """Back to the plain Euler sampler."""
        self._cns = None

    def cns_info(self) -> dict[str, Any]:
        """What the last configured run used, for the result (JSON-ready)."""
        run = self._cns
        if run is None:
            return {"enabled": False}
        return {
            "enabled": True,
            "gamma": self._gamma_description(run),
            **asdict(run.params),
            "grid": list(run.grid),
            "noised_steps": run.noised_steps,
            "deterministic": run.params.s_churn == 0,
        }

    def set_timesteps(
        self,
        num_inference_steps: int | None = None,
        device: str | torch.device | None = None,
        sigmas: list[float] | None = None,
        mu: float | None = None,
        timesteps: list[float] | None = None,
    ) -> None:
        # The explicit signature matters: the pipeline inspects it for `sigmas` before passing them.
        super().set_timesteps(num_inference_steps, device, sigmas, mu, timesteps)
        if self._cns is not None:  # a new schedule needs new band gains
            self._cns.weights = None
            self._cns.noised_steps = 0

    def step(
        self,
        model_output: torch.FloatTensor,
        timestep: float | torch.FloatTensor,
        sample: torch.FloatTensor,
        s_churn: float = 0.0,
        s_tmin: float = 0.0,
        s_tmax: float = float("inf"),
        s_noise: float = 1.0,
        generator: torch.Generator | None = None,
        per_token_timesteps: torch.Tensor | None = None,
        return_dict: bool = True,
    ) -> FlowMatchEulerDiscreteSchedulerOutput | tuple:
        run = self._cns
        if self.step_index is None and not isinstance(timestep, int):
            self._init_step_index(timestep)
        # [ours] The last step (σ_next = 0) is plain Euler: it adds no noise, and the -η·h·ε̂ term
        # without its matching noise would leave -η·σ·ε in the final sample.
        plain = (
            run is None
            or run.params.s_churn == 0
            or per_token_timesteps is not None
            or self.config.stochastic_sampling
            or self.step_index is None
            or self.step_index >= len(self.sigmas) - 2
        )
        if plain:
            return super().step(
                model_output, timestep, sample, s_churn, s_tmin, s_tmax, s_noise, generator,
                per_token_timesteps, return_dict,
            )  # fmt: skip
        prev_sample = self._cns_step(run, model_output, sample).to(model_output.dtype)
        self._step_index += 1
        if not return_dict:
            return (prev_sample,)
        return FlowMatchEulerDiscreteSchedulerOutput(prev_sample=prev_sample)

    # -- internals ------------------------------------------------------------------------------

    def _cns_step(self, run: _CNSRun, model_output: torch.Tensor, sample: torch.Tensor) -> torch.Tensor:
        """One stochastic step on packed tokens (B, h*w, C), in float32.

        (1 - σn)·x̂0 + c·ε̂ + s·w_c folded into a·x + b·v + s·w_c: three passes over the latents,
        with scalar coefficients from a host copy of the sigmas (no device sync).
        """
        index = self.step_index
        noise = self._coloured_tokens(run, sample, index)  # also fills run.host_sigmas
        sigma, sigma_next = run.host_sigmas[index], run.host_sigmas[index + 1]
        injected, kept = variance_preserving_split(sigma, sigma_next, run.params.s_churn)
        out = sample.to(torch.float32) * ((1.0 - sigma_next) + kept)
        out.add_(model_output.to(torch.float32), alpha=kept * (1.0 - sigma) - (1.0 - sigma_next) * sigma)
        out.add_(noise, alpha=injected)
        run.noised_steps += 1
        return out

    def _coloured_tokens(self, run: _CNSRun, x: torch.Tensor, index: int) -> torch.Tensor:
        """Coloured noise for step ``index`` as packed tokens shaped like ``x``.

        White noise is i.i.d., so it is drawn directly on the (C, h, w) grid (one draw per image from
        that image's generator), coloured there, and packed into the pipeline's token order.
        """
        batch, tokens, channels = x.shape
        height, width = run.grid
        if height * width != tokens:
            raise ValueError(f"CNS grid {run.grid} does not match {tokens} image tokens; use token_grid()")
        if len(run.generators) != batch:
            raise ValueError(f"CNS has {len(run.generators)} generators for a batch of {batch} images")
        if run.weights is None or run.bins is None:  # once per run
            run.host_sigmas = self.sigmas.detach().cpu().tolist()
            run.weights = self._band_weight_table(run).to(x.device)
            run.bins = radial_bins(height, width, run.params.num_freq_bins, device=x.device)
        white = torch.stack(
            [
                torch.randn((channels, height, width), generator=g, device=g.device, dtype=torch.float32)
                for g in run.generators
            ]
        ).to(x.device)
        coloured = colour_noise(white, run.weights[index], run.bins, run.params.energy_scale)
        return coloured.reshape(batch, channels, tokens).transpose(1, 2)

    def _band_weight_table(self, run: _CNSRun) -> torch.Tensor:
        """Band gains for every step of the current schedule: (steps, bins), on the CPU."""
        p = run.params
        num_steps = len(self.sigmas) - 1
        gamma = self._gamma_table(run, num_steps)
        rows = []
        for i in range(num_steps):
            alpha = tilt_alpha(
                i, num_steps, p.alpha_tilt_start, p.alpha_tilt_end, p.alpha_exp_interp, p.alpha_exp_sharpness
            )
            rows.append(band_weights(gamma[i], alpha, p.power_gamma, p.gamma_divider, p.alpha_use_fnorm))
        return torch.stack(rows)

    def _gamma_table(self, run: _CNSRun, num_steps: int) -> torch.Tensor:
        bins = run.params.num_freq_bins
        if run.params.gamma_source == "approximation":
            return torch.stack([approximation_gamma(i, num_steps, bins) for i in range(num_steps)])
        if run.gamma is not None and run.gamma_sigmas is not None:
            return gamma_at_sigmas(run.gamma.cpu(), run.gamma_sigmas, self.sigmas[:-1].cpu(), bins)
        if run.gamma is not None:
            return resample_gamma(run.gamma.cpu(), num_steps, bins)
        return analytic_gamma_matrix(self.sigmas[:-1].cpu(), bins)

    @staticmethod
    def _gamma_description(run: _CNSRun) -> str:
        if run.params.gamma_source == "approximation":
            return "approximation"
        if run.gamma is not None:
            return f"matrix ({run.gamma_label})"
        return "matrix (analytic stand-in)"

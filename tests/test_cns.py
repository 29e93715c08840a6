"""Colored Noise Sampling: the spectral functions on plain tensors, then the scheduler in the tiny pipeline.

Properties, not snapshots: energy, spectral shape, guards, reproducibility, and bit-identity with the
stock Euler scheduler when CNS injects nothing.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import fields
from pathlib import Path

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler

from flux_mcp.backends.cns import (
    CNSParams,
    ColoredNoiseScheduler,
    analytic_gamma_matrix,
    approximation_gamma,
    band_weights,
    calibrate_gamma,
    colour_noise,
    gamma_at_sigmas,
    gamma_cache_path,
    load_cached_gamma,
    load_gamma_matrix,
    noise_generators,
    radial_bins,
    resample_gamma,
    save_gamma_matrix,
    tilt_alpha,
    token_grid,
    variance_preserving_split,
)
from flux_mcp.backends.tiny import _SCHEDULER_CONFIG, build_tiny_pipeline, make_example_image
from flux_mcp.schema import EditRequest

pytestmark = pytest.mark.local

SIZE = 64  # tiny pipeline: vae_scale_factor 2, so a 16 x 16 token grid of 16 channels


def params(**overrides: object) -> CNSParams:
    """CNS parameters with the schema's defaults, overridden by cns_<name> keyword arguments."""
    request = EditRequest(
        prompt="p", image_urls=["https://example.invalid/a.png"], enable_cns=True, **overrides
    )
    return CNSParams.from_request(request)


def white(n: int = 4, c: int = 8, h: int = 32, w: int = 32, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, c, h, w, generator=torch.Generator().manual_seed(seed))


def band_power(noise: torch.Tensor, num_bins: int) -> torch.Tensor:
    """Mean |FFT|² of ``noise`` within each radial band."""
    power = (torch.fft.fft2(noise).abs() ** 2).mean(dim=(0, 1)).flatten()
    bins = radial_bins(*noise.shape[-2:], num_bins).flatten()
    sums = torch.zeros(num_bins).index_add_(0, bins, power)
    return sums / torch.bincount(bins, minlength=num_bins)


# ---------------------------------------------------------------------------------------------
# Parameters


def test_params_cover_every_cns_field_of_the_request() -> None:
    request_fields = {name for name in EditRequest.model_fields if name.startswith("cns_")}
    assert {f"cns_{f.name}" for f in fields(CNSParams)} == request_fields
    p = params(cns_s_churn=1.25, cns_gamma_source="approximation", cns_num_freq_bins=48)
    assert (p.s_churn, p.gamma_source, p.num_freq_bins) == (1.25, "approximation", 48)


# ---------------------------------------------------------------------------------------------
# Pure spectral functions


@pytest.mark.parametrize(("h", "w", "num_bins"), [(16, 16, 8), (15, 22, 32), (64, 48, 128)])
def test_radial_bins_shape_range_and_symmetry(h: int, w: int, num_bins: int) -> None:
    bins = radial_bins(h, w, num_bins)
    assert bins.shape == (h, w) and bins.dtype == torch.long
    assert int(bins.min()) == 0 and int(bins[0, 0]) == 0  # DC is band 0
    assert int(bins.max()) == num_bins - 1  # the largest radius is the last band
    # |f| is the same for f and -f, so the bands are too (the colouring filter is Hermitian).
    mirrored = torch.roll(torch.flip(bins, dims=(0, 1)), shifts=(1, 1), dims=(0, 1))
    assert torch.equal(bins, mirrored)


@pytest.mark.parametrize("exp_interp", [False, True])
def test_tilt_alpha_runs_from_start_to_end(exp_interp: bool) -> None:
    start, end, steps = 0.15, -0.5, 28
    assert tilt_alpha(0, steps, start, end, exp_interp, 0.75) == pytest.approx(start)
    assert tilt_alpha(steps - 1, steps, start, end, exp_interp, 0.75) == pytest.approx(end)
    values = [tilt_alpha(i, steps, start, end, exp_interp, 0.75) for i in range(steps)]
    assert all(a > b for a, b in itertools.pairwise(values))  # monotone from start to end


def test_exponential_tilt_lags_behind_linear() -> None:
    linear = tilt_alpha(14, 29, 0.0, 1.0, False, 3.0)
    exponential = tilt_alpha(14, 29, 0.0, 1.0, True, 3.0)
    assert linear == pytest.approx(0.5)
    assert exponential == pytest.approx(math.expm1(1.5) / math.expm1(3.0))
    assert exponential < linear


@pytest.mark.parametrize("energy_scale", [0.5, 0.98, 1.5])
def test_coloured_noise_has_the_requested_energy_per_image(energy_scale: float) -> None:
    weights = torch.linspace(0.1, 2.0, 16)
    noise = colour_noise(white(), weights, radial_bins(32, 32, 16), energy_scale)
    per_image_std = noise.flatten(1).std(dim=1)
    assert torch.allclose(per_image_std, torch.full_like(per_image_std, energy_scale), rtol=1e-4)


def test_coloured_noise_equals_the_full_fft_definition() -> None:
    noise_in = white(h=15, w=22)
    weights = torch.rand(12, generator=torch.Generator().manual_seed(1))
    bins = radial_bins(15, 22, 12)
    reference = torch.fft.ifft2(torch.fft.fft2(noise_in) * weights[bins]).real
    reference = reference / reference.flatten(1).std(dim=1).view(-1, 1, 1, 1) * 0.98
    assert torch.allclose(colour_noise(noise_in, weights, bins, 0.98), reference, atol=1e-5)


def test_each_image_is_coloured_on_its_own() -> None:
    batch = white(n=3)
    weights, bins = torch.linspace(1.0, 0.0, 16), radial_bins(32, 32, 16)
    together = colour_noise(batch, weights, bins, 1.0)
    for i in range(3):
        alone = colour_noise(batch[i : i + 1], weights, bins, 1.0)
        assert torch.allclose(together[i : i + 1], alone, atol=1e-6)


def test_all_zero_weights_give_zero_noise_without_nan() -> None:
    # divider < 1 with every band resolved: 1 - 1/0.5 < 0, clamped to 0 in every band.
    weights = band_weights(torch.ones(16), alpha=0.3, power=0.75, divider=0.5, use_fnorm=True)
    assert torch.equal(weights, torch.zeros(16))
    noise = colour_noise(white(), weights, radial_bins(32, 32, 16), 0.98)
    assert torch.isfinite(noise).all() and torch.equal(noise, torch.zeros_like(noise))


def test_linear_tilt_never_makes_weights_negative() -> None:
    weights = band_weights(torch.zeros(8), alpha=-1.5, power=1.0, divider=25.0, use_fnorm=False)
    assert (weights >= 0).all() and weights[0] == 1.0 and torch.equal(weights[-3:], torch.zeros(3))
    weights = band_weights(torch.full((8,), 0.3), alpha=0.5, power=1.0, divider=1.0, use_fnorm=False)
    assert torch.allclose(weights, 1.0 + 0.5 * torch.linspace(0.0, 1.0, 8))  # residual normalised to 1


@pytest.mark.parametrize("use_fnorm", [True, False])
def test_the_tilt_knob_moves_energy_between_bands_with_and_without_fnorm(use_fnorm: bool) -> None:
    """alpha > 0 boosts high frequencies and alpha < 0 low ones, as the endpoint describes it, also
    with cns_alpha_use_fnorm = false (whose paper form, a flat 1 + alpha, did nothing)."""
    num_bins, noise_in = 16, white(n=8)
    bins = radial_bins(32, 32, num_bins)

    def high_share(alpha: float) -> float:
        weights = band_weights(approximation_gamma(5, 28, num_bins), alpha, 0.75, 1.73, use_fnorm)
        power = band_power(colour_noise(noise_in, weights, bins, 1.0), num_bins)
        return float(power[num_bins // 2 :].sum() / power.sum())

    low, flat, high = high_share(-0.8), high_share(0.0), high_share(0.8)
    assert low < 0.9 * flat and high > 1.1 * flat, (low, flat, high)


def test_power_is_exactly_without_effect_under_the_approximation() -> None:
    rows = [approximation_gamma(step, 28, 32) for step in (0, 10, 27)]
    for row in rows:
        weights = [band_weights(row, -0.3, power, 1.73, True) for power in (0.1, 0.75, 3.0)]
        assert all(torch.equal(weights[0], other) for other in weights[1:])


def test_a_tiny_residual_still_gives_full_noise() -> None:
    """A divider just above gamma leaves residuals ~1e-7: raised to the power 3 before normalising,
    they underflowed float32 to 0 and that step's noise flipped from full to none."""
    gamma_row = torch.full((16,), 0.5)
    weights = band_weights(gamma_row, 0.0, 3.0, 0.5 + 1e-7, True)
    noise = colour_noise(white(), weights, radial_bins(32, 32, 16), 0.98)
    assert torch.allclose(noise.flatten(1).std(dim=1), torch.full((4,), 0.98), atol=1e-4)


@pytest.mark.parametrize("alpha", [2.0, -2.0])
def test_tilt_moves_power_between_low_and_high_bands(alpha: float) -> None:
    num_bins = 16
    weights = band_weights(approximation_gamma(3, 28, num_bins), alpha, 0.75, 1.73, use_fnorm=True)
    power = band_power(colour_noise(white(n=8), weights, radial_bins(32, 32, num_bins), 1.0), num_bins)
    low, high = power[1:5].mean(), power[-4:].mean()  # band 0 holds few coefficients: skip it
    assert (high > 4 * low) if alpha > 0 else (low > 4 * high)


def test_resolved_bands_get_less_noise_than_unresolved_ones() -> None:
    num_bins = 16
    gamma_row = torch.cat([torch.ones(8), torch.zeros(8)])  # low bands done, high bands not started
    weights = band_weights(gamma_row, alpha=0.0, power=0.75, divider=1.73, use_fnorm=True)
    power = band_power(colour_noise(white(n=8), weights, radial_bins(32, 32, num_bins), 1.0), num_bins)
    assert power[1:8].mean() < 0.5 * power[8:].mean()
    # And reversed: progress on the high bands moves the noise down the spectrum.
    weights = band_weights(gamma_row.flip(0), alpha=0.0, power=0.75, divider=1.73, use_fnorm=True)
    power = band_power(colour_noise(white(n=8), weights, radial_bins(32, 32, num_bins), 1.0), num_bins)
    assert power[8:].mean() < 0.5 * power[1:8].mean()


def test_power_has_no_effect_under_the_approximation() -> None:
    bins, noise_in = radial_bins(32, 32, 32), white()
    gamma_row = approximation_gamma(10, 28, 32)
    shaped = [
        colour_noise(noise_in, band_weights(gamma_row, -0.3, power, 1.73, True), bins, 0.98)
        for power in (0.1, 0.75, 3.0)
    ]
    assert all(torch.allclose(shaped[0], other, atol=1e-5) for other in shaped[1:])
    # ...whereas under a non-uniform matrix it does change the noise.
    ramp = torch.linspace(0.0, 1.0, 32)
    sharp = colour_noise(noise_in, band_weights(ramp, -0.3, 3.0, 1.73, True), bins, 0.98)
    assert not torch.allclose(shaped[0], sharp, atol=1e-2)


# ---------------------------------------------------------------------------------------------
# Gamma sources and cache files


def test_approximation_gamma_is_uniform_progress() -> None:
    assert torch.equal(approximation_gamma(0, 5, 8), torch.zeros(8))
    assert torch.equal(approximation_gamma(2, 5, 8), torch.full((8,), 0.5))
    assert torch.equal(approximation_gamma(4, 5, 8), torch.ones(8))


def test_analytic_stand_in_rises_low_bands_first() -> None:
    sigmas = torch.linspace(1.0, 1 / 28, 28)
    matrix = analytic_gamma_matrix(sigmas, 32)
    assert matrix.shape == (28, 32) and torch.isfinite(matrix).all()
    assert torch.allclose(matrix.min(dim=0).values, torch.zeros(32), atol=1e-6)
    assert torch.allclose(matrix.max(dim=0).values, torch.ones(32), atol=1e-6)
    assert (matrix[1:] >= matrix[:-1] - 1e-6).all()  # progress only grows as sigma falls
    assert (matrix[10, :-1] >= matrix[10, 1:]).all() and matrix[10, 0] > matrix[10, -1] + 0.3


def test_resample_gamma_maps_rows_by_progress_and_interpolates_bands() -> None:
    matrix = torch.stack([torch.linspace(0.0, 1.0, 4) * row for row in (0.0, 0.5, 1.0)])
    assert torch.equal(resample_gamma(matrix, 3, 4), matrix)
    resampled = resample_gamma(matrix, 5, 7)
    assert resampled.shape == (5, 7)
    assert torch.equal(resampled[0], torch.zeros(7))
    assert torch.allclose(resampled[-1], torch.linspace(0.0, 1.0, 7))
    # round(i/(N-1) * (rows-1)) for N = 5, rows = 3: rows 0, 1 (0.5 rounds up), 1, 2 (1.5), 2
    assert torch.allclose(resampled[1], resampled[2]) and torch.allclose(resampled[3], resampled[4])
    assert torch.allclose(resampled[2], 0.5 * torch.linspace(0.0, 1.0, 7))


def test_gamma_rows_are_mapped_by_sigma_so_one_calibration_serves_any_schedule() -> None:
    """A matrix measured on an 8-step 256-token schedule, used on klein's 28-step 1024px one: each
    step must get the row of its own noise level (here gamma = 1 - σ, so exactly 1 - σ_i)."""
    calibration = klein_schedule(8, image_seq_len=256).sigmas[:-1]
    matrix = (1.0 - calibration).unsqueeze(1).repeat(1, 16)
    run = klein_schedule(28).sigmas[:-1]
    mapped = gamma_at_sigmas(matrix, calibration, run, 32)
    assert mapped.shape == (28, 32)
    expected = (1.0 - run.clamp(min=float(calibration.min()))).unsqueeze(1).expand(28, 32)
    torch.testing.assert_close(mapped, expected, atol=1e-6, rtol=0)
    # Rows by step fraction (the paper's mapping) miss by far on this pair of schedules.
    assert (resample_gamma(matrix, 28, 32) - expected).abs().max() > 0.1


def test_gamma_matrix_file_round_trip_and_validation(tmp_path: Path) -> None:
    matrix = torch.rand(10, 16, generator=torch.Generator().manual_seed(0))
    path = tmp_path / "sub" / "gamma.safetensors"
    save_gamma_matrix(path, matrix, {"model_id": "owner/model", "steps": 10, "guidance_scale": 4.0})
    loaded, meta, sigmas = load_gamma_matrix(path)
    assert torch.equal(loaded, matrix) and sigmas is None
    assert meta == {"model_id": "owner/model", "steps": "10", "guidance_scale": "4.0"}

    save_gamma_matrix(path, matrix * 2, {})
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        load_gamma_matrix(path)
    path.write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match="cannot read"):
        load_gamma_matrix(path)


def test_gamma_cache_path_is_a_safe_file_name_per_model(tmp_path: Path) -> None:
    names = ["black-forest-labs/FLUX.2-klein-base-9B", "black-forest-labs_FLUX.2-klein-base-9B", "../../etc"]
    paths = [gamma_cache_path(tmp_path, name) for name in names]
    assert len(set(paths)) == len(paths)
    for path in paths:
        assert path.parent == tmp_path and path.suffix == ".safetensors"
        assert "/" not in path.name and not path.name.startswith(".")
    assert "FLUX.2-klein-base-9B" in paths[0].name
    assert gamma_cache_path(tmp_path, names[0]) == paths[0]  # stable
    assert load_cached_gamma(tmp_path, names[0]) is None


# ---------------------------------------------------------------------------------------------
# The scheduler on its own


def armed_scheduler(num_steps: int, seed: int = 7, **overrides: object) -> ColoredNoiseScheduler:
    scheduler = ColoredNoiseScheduler(shift=3.0)
    scheduler.set_timesteps(num_steps)
    scheduler.configure_cns(params(**overrides), noise_generators([seed], "cpu"), (32, 32))
    return scheduler


def test_noise_depends_only_on_the_noise_generator() -> None:
    sample, velocity = torch.randn(1, 32 * 32, 16), torch.randn(1, 32 * 32, 16)

    def first_step(seed: int) -> torch.Tensor:
        scheduler = armed_scheduler(8, seed=seed)
        return scheduler.step(velocity, scheduler.timesteps[0], sample, return_dict=False)[0]

    assert torch.equal(first_step(7), first_step(7))
    assert not torch.allclose(first_step(7), first_step(8), atol=1e-3)


def test_noise_generators_do_not_replay_the_initial_latent() -> None:
    # The pipeline draws image i's starting noise from a generator seeded with seed i.
    initial = torch.randn(64, generator=torch.Generator().manual_seed(5))
    injected = torch.randn(64, generator=noise_generators([5], "cpu")[0])
    assert abs(float(torch.corrcoef(torch.stack([initial, injected]))[0, 1])) < 0.5


def test_stochastic_step_follows_the_cns_update() -> None:
    # x0 = 0, so x = σε and the exact velocity is v = ε (ε̂ = ε, x̂0 = 0). One step must give
    # c·ε plus independent noise of std s·energy_scale, with (s, c) from variance_preserving_split.
    eta, energy, index = 0.5, 0.98, 3
    scheduler = armed_scheduler(10, cns_s_churn=eta, cns_energy_scale=energy)
    scheduler.set_begin_index(index)
    eps = torch.randn(1, 32 * 32, 16, generator=torch.Generator().manual_seed(3))
    sigma, sigma_next = float(scheduler.sigmas[index]), float(scheduler.sigmas[index + 1])
    injected, kept = variance_preserving_split(sigma, sigma_next, eta)
    out = scheduler.step(eps, scheduler.timesteps[index], sigma * eps, return_dict=False)[0]
    along_eps = float((out * eps).sum() / (eps * eps).sum())
    assert along_eps == pytest.approx(kept, abs=0.02)
    residual = out - along_eps * eps
    assert float(residual.std()) == pytest.approx(injected * energy, rel=0.02)
    # A small step injects what the reference's first-order step does: 2·η·σ·h.
    h = sigma - sigma_next
    assert injected**2 == pytest.approx(2 * eta * sigma * h, rel=0.15)
    assert kept**2 + injected**2 == pytest.approx(sigma_next**2, rel=1e-12)


def klein_schedule(steps: int = 28, image_seq_len: int = 4096) -> ColoredNoiseScheduler:
    """The scheduler with the sigmas the klein pipeline sets for a 1024x1024 image."""
    from diffusers.pipelines.flux2.pipeline_flux2_klein import compute_empirical_mu

    scheduler = ColoredNoiseScheduler.from_config(FlowMatchEulerDiscreteScheduler(**_SCHEDULER_CONFIG).config)
    sigmas = [1.0 - i * (1.0 - 1.0 / steps) / (steps - 1) for i in range(steps)]
    scheduler.set_timesteps(sigmas=sigmas, mu=compute_empirical_mu(image_seq_len, steps))
    return scheduler


@pytest.mark.parametrize("s_churn", [0.5, 1.0, 2.0])
def test_noise_stays_on_schedule_over_a_whole_klein_run(s_churn: float) -> None:
    """An exact model (it knows x0) through klein's 28 steps: after every step the noise in the
    sample must have the schedule's variance σ². The first-order step ended 1.26x/1.51x/2.10x
    noisier before the last step, and removed more noise than the sample held at s_churn 2."""
    scheduler = klein_schedule()
    assert [round(float(s), 2) for s in scheduler.sigmas[-3:]] == [0.4, 0.24, 0.0]
    grid, channels = (32, 32), 16
    scheduler.configure_cns(
        params(cns_s_churn=s_churn, cns_energy_scale=1.0, cns_gamma_source="approximation"),
        noise_generators([0, 1], "cpu"),
        grid,
    )
    x0 = torch.randn(2, grid[0] * grid[1], channels, generator=torch.Generator().manual_seed(1))
    sample = torch.randn(x0.shape, generator=torch.Generator().manual_seed(2))  # σ = 1: pure noise
    ratios = []
    for index, t in enumerate(scheduler.timesteps):
        sigma = float(scheduler.sigmas[index])
        velocity = (sample - (1 - sigma) * x0) / sigma - x0  # v = ε - x0 for x = (1-σ)x0 + σε
        sample = scheduler.step(velocity, t, sample, return_dict=False)[0]
        sigma_next = float(scheduler.sigmas[index + 1])
        if sigma_next > 0:
            noise = (sample - (1 - sigma_next) * x0) / sigma_next
            ratios.append(float(noise.std()))
    assert scheduler.cns_info()["noised_steps"] == 27
    assert all(ratio == pytest.approx(1.0, abs=0.02) for ratio in ratios), ratios
    torch.testing.assert_close(sample, x0, atol=1e-4, rtol=0)  # the last (plain) step lands on x0


def test_last_step_is_plain_euler_and_dtype_is_kept() -> None:
    num_steps = 4
    cns, stock = armed_scheduler(num_steps), FlowMatchEulerDiscreteScheduler(shift=3.0)
    stock.set_timesteps(num_steps)
    sample = torch.randn(1, 32 * 32, 16).to(torch.bfloat16)
    for index, t in enumerate(cns.timesteps):
        v = torch.randn(1, 32 * 32, 16).to(torch.bfloat16)
        ours = cns.step(v, t, sample, return_dict=False)[0]
        theirs = stock.step(v, t, sample, return_dict=False)[0]
        assert ours.dtype == torch.bfloat16 and torch.isfinite(ours.float()).all()
        assert torch.equal(ours, theirs) == (index == num_steps - 1)
        sample = ours
    assert cns.cns_info()["noised_steps"] == num_steps - 1


def test_scheduler_rejects_a_wrong_grid_or_generator_count() -> None:
    scheduler = armed_scheduler(4)
    with pytest.raises(ValueError, match="token_grid"):
        scheduler.step(torch.randn(1, 100, 16), scheduler.timesteps[0], torch.randn(1, 100, 16))
    scheduler = armed_scheduler(4)
    with pytest.raises(ValueError, match="generators"):
        scheduler.step(torch.randn(2, 1024, 16), scheduler.timesteps[0], torch.randn(2, 1024, 16))


def test_cns_info_names_the_gamma_used() -> None:
    scheduler = ColoredNoiseScheduler()
    assert scheduler.cns_info() == {"enabled": False}
    generators, grid = noise_generators([1], "cpu"), (8, 8)
    scheduler.configure_cns(params(cns_gamma_source="approximation"), generators, grid)
    assert scheduler.cns_info()["gamma"] == "approximation"
    scheduler.configure_cns(params(), generators, grid)
    assert scheduler.cns_info()["gamma"] == "matrix (analytic stand-in)"
    scheduler.configure_cns(params(), generators, grid, torch.zeros(4, 8), "calibrated: g.safetensors")
    info = scheduler.cns_info()
    assert info["gamma"] == "matrix (calibrated: g.safetensors)" and info["s_churn"] == 0.5
    scheduler.clear_cns()
    assert scheduler.cns_info() == {"enabled": False}


# ---------------------------------------------------------------------------------------------
# The scheduler in the tiny klein pipeline


@pytest.fixture(scope="module")
def pipe():
    # One intra-op thread: the tiny model gains nothing from more, and on a loaded 2-core machine
    # OpenMP threads spin against other processes (a 4-step run went from 0.7 s to 10 s).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield build_tiny_pipeline(seed=0)
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def picture():
    return make_example_image(SIZE, SIZE)


def generate(
    pipe, picture, seeds: list[int], cns: CNSParams | None = None, steps: int = 4, gamma=None, label: str = ""
):
    """Run the pipeline on latents; with ``cns`` the ColoredNoiseScheduler is armed for the run."""
    scheduler = pipe.scheduler
    if isinstance(scheduler, ColoredNoiseScheduler):
        if cns is None:
            scheduler.clear_cns()
        else:
            grid = token_grid(pipe, SIZE, SIZE)
            scheduler.configure_cns(cns, noise_generators(seeds, "cpu"), grid, gamma, label)
    generators = [torch.Generator().manual_seed(seed) for seed in seeds]
    return pipe(
        image=picture,
        prompt="a red house",
        height=SIZE,
        width=SIZE,
        num_inference_steps=steps,
        guidance_scale=4.0,
        num_images_per_prompt=len(seeds),
        generator=generators,
        output_type="latent",
    ).images


@pytest.fixture
def stock_and_cns(pipe):
    stock = FlowMatchEulerDiscreteScheduler.from_config(pipe.scheduler.config)
    cns = ColoredNoiseScheduler.from_config(pipe.scheduler.config)
    yield stock, cns
    pipe.scheduler = stock


def test_token_grid_matches_the_pipelines_packing(pipe) -> None:
    assert token_grid(pipe, SIZE, SIZE) == (16, 16)
    latents, _ids = pipe.prepare_latents(1, 4, SIZE, 2 * SIZE, torch.float32, "cpu", None)
    assert latents.shape[1] == math.prod(token_grid(pipe, SIZE, 2 * SIZE))


def test_zero_churn_is_bit_identical_to_the_stock_scheduler(pipe, picture, stock_and_cns) -> None:
    stock, cns = stock_and_cns
    pipe.scheduler = stock
    reference = generate(pipe, picture, [5])
    pipe.scheduler = cns
    assert torch.equal(generate(pipe, picture, [5]), reference)  # not configured
    assert torch.equal(generate(pipe, picture, [5], params(cns_s_churn=0.0)), reference)
    assert cns.cns_info()["deterministic"] is True and cns.cns_info()["noised_steps"] == 0
    churned = generate(pipe, picture, [5], params(cns_s_churn=0.5))
    assert not torch.allclose(churned, reference, atol=1e-3)
    assert cns.cns_info()["noised_steps"] == 3


def test_seeds_reproduce_and_batch_rows_equal_single_runs(pipe, picture, stock_and_cns) -> None:
    pipe.scheduler = stock_and_cns[1]
    cns = params(cns_s_churn=0.8)
    first = generate(pipe, picture, [11], cns)
    assert torch.equal(generate(pipe, picture, [11], cns), first)
    batch = generate(pipe, picture, [11, 12, 13], cns)
    # The transformer's batched matmuls differ from single ones in the last bits only.
    assert torch.allclose(batch[0:1], first, atol=1e-4)
    assert torch.allclose(batch[2:3], generate(pipe, picture, [13], cns), atol=1e-4)
    assert not torch.allclose(batch[0], batch[1], atol=1e-2)
    assert not torch.allclose(batch[1], batch[2], atol=1e-2)


def test_calibrated_matrix_is_normalised_and_used(pipe, picture, stock_and_cns, tmp_path: Path) -> None:
    stock, cns = stock_and_cns
    pipe.scheduler = stock
    matrix, sigmas = calibrate_gamma(
        pipe, picture, "a red house", 8, 4.0, 16, seeds=[0, 1], height=SIZE, width=SIZE
    )
    assert pipe.scheduler is stock  # the recording scheduler was only borrowed
    assert matrix.shape == (8, 16) and torch.isfinite(matrix).all()
    assert torch.allclose(matrix.min(dim=0).values, torch.zeros(16), atol=1e-6)
    assert torch.allclose(matrix.max(dim=0).values, torch.ones(16), atol=1e-6)
    assert torch.allclose(matrix[-1], torch.ones(16), atol=1e-6)  # the last x̂0 is the final sample
    assert sigmas.shape == (8,) and sigmas[0] == 1.0 and (sigmas[1:] < sigmas[:-1]).all()

    meta = {"model_id": "tiny/klein", "steps": 8, "guidance_scale": 4.0}
    save_gamma_matrix(gamma_cache_path(tmp_path, "tiny/klein"), matrix, meta, sigmas)
    cached = load_cached_gamma(tmp_path, "tiny/klein")
    assert cached is not None and torch.equal(cached.matrix, matrix) and torch.equal(cached.sigmas, sigmas)

    pipe.scheduler = cns
    analytic = generate(pipe, picture, [3], params(cns_gamma_divider=1.0), steps=8)
    calibrated = generate(pipe, picture, [3], params(cns_gamma_divider=1.0), 8, cached.matrix, cached.label)
    assert cns.cns_info()["gamma"].startswith("matrix (calibrated: cns-gamma-tiny_klein")
    assert not torch.allclose(calibrated, analytic, atol=1e-3)  # a different gamma, different noise

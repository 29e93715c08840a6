"""``flux-mcp calibrate-cns``: measure the CNS gamma matrix gamma(f, t) on the configured local model.

Loads the model through the local backend's own loading code (``FLUX_MCP_MODEL``, device, offload),
runs the deterministic sampler for a few seeds on an image, measures per-band progress
(``cns.calibrate_gamma``) and stores the matrix in the user cache, keyed by model, where the local
backend picks it up for ``cns_gamma_source = "matrix"`` (at its next CNS run: no restart needed). Until
then the analytic stand-in is used. [ours] The file holds the σ of each row (the backend maps rows by σ,
so one calibration serves any step count and image size) and the model id and latent channel count,
which the backend checks against the loaded model.

The paper averages >= 4096 samples; the default of 8 seeds gives a usable rough estimate in minutes
on a GPU. Imports torch (the local extra); the hosted path never imports this module.
"""

from __future__ import annotations

import time
from pathlib import Path

from .. import media
from ..config import Settings
from ..imagecheck import max_input_pixels
from . import cns
from .local import load_pipeline

__all__ = ["calibrate"]


def calibrate(
    settings: Settings,
    *,
    steps: int,
    guidance: float,
    bins: int,
    seeds: int,
    size: int,
    image: Path | None,
    prompt: str,
) -> tuple[Path, float]:
    """Calibrate and save; returns the matrix file and the seconds it took."""
    started = time.perf_counter()
    pipe = load_pipeline(settings)
    if image is not None:
        reference = media.decode_rgb(image.read_bytes(), max_input_pixels(settings))
    else:
        from .tiny import make_example_image

        reference = make_example_image(size, size)
    matrix, sigmas = cns.calibrate_gamma(
        pipe, reference, prompt, steps, guidance, bins, list(range(seeds)), height=size, width=size
    )
    path = cns.gamma_cache_path(settings.cache_dir, settings.model)
    path.parent.mkdir(parents=True, exist_ok=True)
    meta = {
        "model": settings.model,
        "latent_channels": pipe.transformer.config.in_channels,
        "steps": steps,
        "guidance": guidance,
        "bins": bins,
        "seeds": seeds,
        "size": size,
        "prompt": prompt,
    }
    cns.save_gamma_matrix(path, matrix, meta, sigmas)
    return path, time.perf_counter() - started

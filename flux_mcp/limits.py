"""How much one local call may ask of the single GPU (FLUX_MCP_MAX_LOCAL_WORK).

The local backend runs one job at a time, so one huge call (200 MP x 8 images x 50 steps) would hold
every other caller for hours. Work is counted in megapixel-steps: output megapixels x images x
denoising steps, which is roughly what a run's time grows with. A call above the cap is refused before
it joins the GPU queue, and the message says which field to lower.

This module knows nothing about torch, MCP or the result store.
"""

from __future__ import annotations

from .config import Settings
from .errors import InvalidRequest
from .schema import EditRequest, output_size

__all__ = ["DEFAULT_AREA", "check_local_work", "local_work"]

#: An unset image_size follows the first input, fitted to at most this area (as the pipeline fits it).
DEFAULT_AREA = 1024 * 1024


def local_work(request: EditRequest, first_input: tuple[int, int] | None, images: int) -> tuple[float, float]:
    """(output megapixels, megapixel-steps) of a local call making ``images`` images."""
    size = output_size(request, first_input)
    area = size[0] * size[1] if size else DEFAULT_AREA
    if request.image_size is None:
        area = min(area, DEFAULT_AREA)
    megapixels = area / 1e6
    return megapixels, megapixels * images * request.num_inference_steps


def check_local_work(
    request: EditRequest, first_input: tuple[int, int] | None, images: int, settings: Settings
) -> None:
    """InvalidRequest, saying what to lower, when the call is above FLUX_MCP_MAX_LOCAL_WORK."""
    megapixels, work = local_work(request, first_input, images)
    cap = settings.max_local_work
    if work <= cap:
        return
    field = "image_size" if megapixels > 1.1 else "num_inference_steps"
    raise InvalidRequest(
        f"{field}: this call asks the local GPU for {megapixels:.2f} MP x {images} image(s) x "
        f"{request.num_inference_steps} steps = {work:,.0f} megapixel-steps, above the "
        f"{cap:,.0f} allowed (FLUX_MCP_MAX_LOCAL_WORK). Lower image_size, num_images (or the number of "
        "seeds) or num_inference_steps, or raise the limit.",
        field=field,
    )

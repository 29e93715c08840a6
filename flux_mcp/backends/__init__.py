"""The backends: the Backend protocol (``protocol``, re-exported here) and the factory that picks one
(auto | fal | local).

A backend turns a list of validated ``EditRequest`` runs plus their resolved input images into
generated images. It knows nothing about MCP, presets or the result store; the service does the rest.
The local backend (torch, diffusers) is imported only inside ``create_backend`` when it is chosen, so
the hosted path never imports torch. A third backend is one module implementing ``protocol.Backend``,
one line in ``create_backend`` and one value of ``FLUX_MCP_BACKEND``.
"""

from __future__ import annotations

import importlib.util
from typing import TYPE_CHECKING

from ..errors import BackendUnavailable, ConfigError
from .protocol import (
    PRICE_PER_MEGAPIXEL_USD,
    Backend,
    BackendResult,
    CostEstimate,
    GeneratedImage,
    InputImage,
    Progress,
    RunContext,
    RunOutcome,
    hosted_price,
    run_one,
)

if TYPE_CHECKING:
    from ..config import Settings

__all__ = [
    "PRICE_PER_MEGAPIXEL_USD",
    "Backend",
    "BackendResult",
    "CostEstimate",
    "GeneratedImage",
    "InputImage",
    "Progress",
    "RunContext",
    "RunOutcome",
    "create_backend",
    "hosted_price",
    "local_available",
    "run_one",
]


def local_available() -> bool:
    """Whether the ``local`` extra is installed (checked without importing torch)."""
    return all(importlib.util.find_spec(m) is not None for m in ("torch", "diffusers"))


def create_backend(settings: Settings) -> Backend:
    """The backend ``settings.backend`` asks for; ``auto`` = fal with a key, else local with a GPU."""
    choice = settings.backend
    if choice == "auto":
        if settings.fal_key:
            choice = "fal"
        elif local_available() and _cuda_present():
            choice = "local"
        else:
            raise BackendUnavailable(
                "No backend is configured. Set FAL_KEY to use the hosted endpoint "
                "(https://fal.ai/dashboard/keys), or install the local extra "
                "(pip install 'flux-mcp[local]') on a machine with a CUDA GPU and set FLUX_MCP_BACKEND=local."
            )
    if choice == "fal":
        from .fal import FalBackend

        return FalBackend(settings)
    if choice == "local":
        if not local_available():
            raise BackendUnavailable(
                "FLUX_MCP_BACKEND=local needs the local extra: pip install 'flux-mcp[local]'."
            )
        from .local import LocalBackend

        return LocalBackend(settings)
    raise ConfigError(f"FLUX_MCP_BACKEND must be auto, fal or local, not {choice!r}.")


def _cuda_present() -> bool:
    """A CUDA device is visible, checked without importing torch (the hosted path stays light)."""
    import os
    from pathlib import Path

    if os.environ.get("CUDA_VISIBLE_DEVICES", None) in ("", "-1"):
        return False
    return Path("/dev/nvidiactl").exists() or Path("/proc/driver/nvidia/version").exists()

"""The Backend protocol and the factory that picks one (auto | fal | local).

A backend turns one validated ``EditRequest`` plus its resolved input images into generated images.
It knows nothing about MCP, presets or the result store; the service does the rest. The local
backend (torch, diffusers) is imported only inside ``create_backend`` when it is chosen, so the
hosted path never imports torch.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Awaitable, Callable
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from ..errors import BackendUnavailable, ConfigError, FluxMCPError

if TYPE_CHECKING:
    from ..config import Settings
    from ..schema import EditRequest

__all__ = [
    "Backend",
    "BackendResult",
    "GeneratedImage",
    "InputImage",
    "Progress",
    "RunHooks",
    "SeedOutcome",
    "create_backend",
    "local_available",
    "run_hooks",
]


@dataclass(frozen=True)
class InputImage:
    """One resolved item of ``image_urls``.

    Either ``url`` is set (an http(s) URL the caller gave, passed to the backend unchanged), or
    ``data`` holds the bytes of an image the server read and checked itself (local file, data URI,
    earlier result), with its MIME type and pixel size.
    """

    source: str
    url: str | None = None
    data: bytes | None = None
    content_type: str | None = None
    width: int | None = None
    height: int | None = None

    @property
    def size(self) -> tuple[int, int] | None:
        return (self.width, self.height) if self.width and self.height else None


@dataclass
class GeneratedImage:
    """One output image as bytes, with what is known about it."""

    data: bytes
    content_type: str
    width: int
    height: int
    seed: int
    nsfw: bool | None = None
    source_url: str | None = None


@dataclass
class BackendResult:
    """What one backend run produced."""

    images: list[GeneratedImage]
    seed: int
    timings: dict[str, float] = field(default_factory=dict)
    #: Caveats the agent should read, e.g. "sync_mode has no effect on the local backend".
    notes: list[str] = field(default_factory=list)
    #: Backend facts for the structured result and the sidecars (request id, CNS gamma used, ...).
    details: dict[str, Any] = field(default_factory=dict)


#: One entry of ``Backend.edit_seeds``: the result for that seed, or why it failed.
SeedOutcome = BackendResult | FluxMCPError


@dataclass(frozen=True)
class RunHooks:
    """What a job runner wants to hear from a backend while a run goes on (see ``run_hooks``).

    ``submitted(request_id, seed)`` is awaited once per remote job right after it was accepted, so a
    restarted server can resume it; ``detached()`` is true while the server shuts down, when remote
    jobs must be left running (to be resumed) rather than cancelled.
    """

    submitted: Callable[[str, int | None], Awaitable[None]] | None = None
    detached: Callable[[], bool] = field(default=lambda: False)


#: Set by the job runner for the task that runs a call; backends read it, nobody else writes it.
run_hooks: ContextVar[RunHooks] = ContextVar("flux_mcp_run_hooks", default=RunHooks())  # noqa: B039


class Progress(Protocol):
    """Progress callback: ``await progress(done, total, message)``; monotonic in ``done``."""

    async def __call__(self, progress: float, total: float | None, message: str) -> None: ...


class Backend(Protocol):
    """Something that can run an edit. Small on purpose: the service does everything else."""

    #: "fal" or "local".
    name: str
    #: What ran the job: the fal endpoint id, or the local model id/directory.
    endpoint: str

    def capabilities(self) -> dict[str, Any]:
        """What this backend supports, for list_presets (e.g. {"cns": True, "max_concurrency": 4})."""
        ...

    async def edit(self, request: EditRequest, inputs: list[InputImage], progress: Progress) -> BackendResult:
        """Run one request (``request.num_images`` images; image i has seed ``seed + i``)."""
        ...

    async def edit_seeds(
        self, request: EditRequest, inputs: list[InputImage], seeds: list[int], progress: Progress
    ) -> list[SeedOutcome]:
        """Run ``request`` once per seed (one image each); one outcome per seed, in order.

        A failed seed does not fail the others: its outcome is the error.
        """
        ...

    async def aclose(self) -> None:
        """Release connections, GPU memory and worker threads."""
        ...


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

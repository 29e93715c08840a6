"""The one error tree of flux-mcp.

Every failure a user or an agent can meet is one of these, with a message that says what to
change. Foreign errors (fal-client, httpx, PIL, torch, the filesystem) are converted once, at the
boundary where they happen, with ``raise ... from exc``; the faces (MCP server, CLI) only turn
these into an ``is_error`` tool result or a readable CLI error.

    FluxMCPError
    ├── ConfigError            a setting in the environment is wrong or missing
    ├── InvalidRequest         the caller's arguments cannot be run (names the field)
    │   ├── InputImageError    an image in image_urls cannot be read or is not a sane image
    │   └── CostLimitExceeded  the estimated price is above FLUX_MCP_MAX_COST_USD
    ├── NotFound               an image id or job id that does not exist
    ├── PresetError            the user's presets file is broken (names file and line)
    └── BackendError           the model side failed
        ├── BackendUnavailable the backend cannot be reached or is not set up
        ├── BackendTimeout     the backend did not answer within a deadline
        └── JobFailed          the backend ran the job and it failed

This module knows nothing about MCP, fal or torch.
"""

from __future__ import annotations

__all__ = [
    "BackendError",
    "BackendTimeout",
    "BackendUnavailable",
    "ConfigError",
    "CostLimitExceeded",
    "FluxMCPError",
    "InputImageError",
    "InvalidRequest",
    "JobFailed",
    "NotFound",
    "PresetError",
]


class FluxMCPError(Exception):
    """Base of every error flux-mcp raises on purpose. ``str(err)`` is safe to show a user."""


class ConfigError(FluxMCPError):
    """A setting (environment variable or file) is wrong or missing."""


class InvalidRequest(FluxMCPError):
    """The arguments of a call cannot be run as given.

    ``field`` names the offending argument (dotted for nested ones, e.g. ``loras.1.scale``).
    """

    def __init__(self, message: str, *, field: str | None = None) -> None:
        super().__init__(message)
        self.field = field


class InputImageError(InvalidRequest):
    """An input image cannot be read, is not an image, or is outside the size limits."""


class CostLimitExceeded(InvalidRequest):
    """The call's estimated price is above the configured ceiling; nothing was sent."""


class NotFound(FluxMCPError):
    """An image id or job id that the store does not hold."""


class PresetError(FluxMCPError):
    """The user's presets file cannot be used (the message names the file and line)."""


class BackendError(FluxMCPError):
    """The model side failed."""


class BackendUnavailable(BackendError):
    """The backend cannot be reached, or is not configured on this machine."""


class BackendTimeout(BackendError):
    """The backend did not finish within the configured deadline."""


class JobFailed(BackendError):
    """The backend accepted the job and reported a failure."""

"""Every change flux-mcp makes to process-wide state, in one visible place, undone at close.

Libraries keep some settings in module globals. Changing them from a constructor or at import hides
the change and leaks it into whatever runs next in the process (other services, tests). Instead the
service enters ``process_effects`` when it starts and leaves it when it closes:

- fal-client's REST and CDN hosts (``fal_client.client.REST_URL`` / ``CDN_URL``): fal-client takes
  only its queue host from the environment; the other two are module globals, its documented seam
  for proxies, which ``FLUX_MCP_FAL_REST_URL`` / ``FLUX_MCP_FAL_CDN_URL`` (and the test emulator) use;
- the ``httpx`` logger's level: httpx logs every URL at INFO, twice through fal-client's clients.

This module knows nothing about MCP, the service or torch.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import partial
from typing import Any

from .config import Settings

__all__ = ["process_effects"]


@contextmanager
def process_effects(settings: Settings) -> Iterator[None]:
    """Apply the process-wide settings for the life of a service; restore what was there after."""
    undo: list[Callable[[], None]] = []

    def set_attr(owner: Any, name: str, value: Any) -> None:
        undo.append(partial(setattr, owner, name, getattr(owner, name)))
        setattr(owner, name, value)

    if settings.fal_rest_url or settings.fal_cdn_url:
        import fal_client.client

        if settings.fal_rest_url:
            set_attr(fal_client.client, "REST_URL", settings.fal_rest_url.rstrip("/"))
        if settings.fal_cdn_url:
            set_attr(fal_client.client, "CDN_URL", settings.fal_cdn_url.rstrip("/"))
    httpx_logger = logging.getLogger("httpx")
    undo.append(partial(httpx_logger.setLevel, httpx_logger.level))
    httpx_logger.setLevel(logging.WARNING)
    try:
        yield
    finally:
        for step in reversed(undo):
            step()

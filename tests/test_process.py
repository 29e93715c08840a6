"""Process-wide effects are applied while a service runs and undone when it closes."""

from __future__ import annotations

import logging
from pathlib import Path

import fal_client.client
import pytest

from flux_mcp.config import Settings
from flux_mcp.process import process_effects
from flux_mcp.service import FluxService


def test_fal_client_hosts_are_set_for_the_service_life_and_restored(tmp_path: Path) -> None:
    before = (fal_client.client.REST_URL, fal_client.client.CDN_URL, logging.getLogger("httpx").level)
    settings = Settings(fal_rest_url="https://127.0.0.1:9/rest/", fal_cdn_url="https://127.0.0.1:9/cdn")
    with process_effects(settings):
        assert fal_client.client.REST_URL == "https://127.0.0.1:9/rest"
        assert fal_client.client.CDN_URL == "https://127.0.0.1:9/cdn"
        assert logging.getLogger("httpx").level == logging.WARNING
    assert (fal_client.client.REST_URL, fal_client.client.CDN_URL, logging.getLogger("httpx").level) == before


@pytest.mark.anyio
async def test_the_service_applies_them_at_start_and_undoes_them_at_close(tmp_path: Path) -> None:
    before = fal_client.client.REST_URL
    settings = Settings(output_dir=tmp_path / "out", fal_rest_url="https://127.0.0.1:9/rest")
    service = FluxService(settings)
    assert before == fal_client.client.REST_URL, "nothing changes before the service starts"
    await service.start()
    assert fal_client.client.REST_URL == "https://127.0.0.1:9/rest"
    await service.aclose()
    assert before == fal_client.client.REST_URL


def test_the_cache_folder_is_a_setting_and_the_lora_cache_follows_it(tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    settings = Settings.from_env({"FLUX_MCP_CACHE_DIR": str(cache)})
    assert settings.cache_dir == cache and settings.lora_cache == cache / "loras"
    own = Settings.from_env({"FLUX_MCP_CACHE_DIR": str(cache), "FLUX_MCP_LORA_CACHE": str(tmp_path / "l")})
    assert own.lora_cache == tmp_path / "l"

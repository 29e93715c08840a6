"""The guards' own parts on real data: secret scrubbing of log records, stored URLs, the LoRA cache
(content-addressed, byte-bounded) on a loopback server, adapters bounded by bytes, and the stdio
transport answering lines that are not JSON-RPC."""

from __future__ import annotations

import io
import json
import logging
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from flux_mcp.config import Settings
from flux_mcp.redact import Redactor, install_log_scrubbing, public_url

from .conftest import REPO, LoopbackFiles, clean_env
from .test_http_auth import INIT

KEY = "4f1c2a9e-77b0-4c55-9d1e-0a5b6c7d8e9f:9a8b7c6d5e4f3a2b1c0d9e8f7a6b5c4d"


@pytest.fixture
def scrubbed_log() -> Iterator[io.StringIO]:
    """A handler on a private logger, scrubbed of KEY; the process's record factory restored after."""
    factory = logging.getLogRecordFactory()
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(logging.Formatter("%(levelname)s %(message)s"))
    logger = logging.getLogger("flux_mcp.test_scrub")
    logger.addHandler(handler)
    logger.propagate = False
    install_log_scrubbing([KEY], [handler])
    try:
        yield stream
    finally:
        logging.setLogRecordFactory(factory)
        logger.removeHandler(handler)


def test_every_form_of_the_key_is_scrubbed_from_log_records(scrubbed_log: io.StringIO) -> None:
    logger = logging.getLogger("flux_mcp.test_scrub")
    secret = KEY.split(":")[1]
    logger.warning("headers %r", {"Authorization": f"Key {KEY}"})
    logger.warning("json %s", json.dumps({"key": KEY}))
    logger.warning("fragment %s...", secret[:12])
    try:
        raise RuntimeError(f"bad header value {KEY!r} / {KEY.encode()!r}")
    except RuntimeError:
        logger.exception("upload failed")
    text = scrubbed_log.getvalue()
    assert "Traceback" in text and "upload failed" in text and "***" in text
    for piece in (KEY, secret, secret[:12], secret[-10:], KEY.split(":")[0][:10]):
        assert piece not in text, piece


def test_a_key_with_a_newline_is_scrubbed_in_every_spelling() -> None:
    key = "abcd-1234-efgh:first-line-XYZ\nsecond-line-XYZ"
    redact = Redactor([key])
    for shown in (key, repr(key), json.dumps(key), key.encode("unicode_escape").decode(), str(key.encode())):
        assert "line-XYZ" not in redact(f"before {shown} after"), shown
    assert redact("nothing secret here") == "nothing secret here"


def test_public_url_keeps_no_query_fragment_credentials_or_payload() -> None:
    assert (
        public_url("https://u:p@host.example:8443/a/b.png?sig=1#frag") == "https://host.example:8443/a/b.png"
    )
    assert (
        public_url("data:image/png;name=" + "x" * 500 + ";base64,AAAA")
        == "data:image/png;base64,<3 bytes omitted>"
    )
    assert public_url("/home/me/photo.png") == "/home/me/photo.png"
    assert public_url("someone/repo/file.safetensors") == "someone/repo/file.safetensors"


# -- the LoRA cache ----------------------------------------------------------------------------------


def _safetensors(size: int, fill: int) -> bytes:
    """A valid safetensors file holding one u8 tensor of ``size`` bytes."""
    header = json.dumps({"w": {"dtype": "U8", "shape": [size], "data_offsets": [0, size]}}).encode()
    header += b" " * (-len(header) % 8)
    return len(header).to_bytes(8, "little") + header + bytes([fill]) * size


@pytest.mark.anyio
async def test_lora_downloads_are_kept_once_per_content_and_bounded_by_bytes(
    tmp_path: Path, loopback_files: tuple[str, type[LoopbackFiles]]
) -> None:
    from flux_mcp.backends.loras import LoraFiles

    base, handler = loopback_files
    handler.files["/a.safetensors"] = _safetensors(600_000, 1)
    handler.files["/b.safetensors"] = _safetensors(600_000, 2)
    cache = tmp_path / "cache"
    settings = Settings(lora_cache=cache, allow_private_urls=True, lora_cache_mb=1.0, input_roots=(tmp_path,))
    files = LoraFiles(settings)
    monday = await files.resolve(0, f"{base}/a.safetensors?token=monday")
    tuesday = await files.resolve(0, f"{base}/a.safetensors?token=tuesday")
    again = await LoraFiles(settings).resolve(0, f"{base}/a.safetensors?token=monday")  # another process
    assert monday.path == tuesday.path == again.path and monday.sha256 == tuesday.sha256
    assert len(handler.hits) == 2  # each signed variant fetched once, its bytes kept once
    assert [p.name for p in cache.glob("sha256-*")] == [monday.path.name]
    assert not any("monday" in p.read_text() for p in cache.glob("url-*.ref"))
    other = await files.resolve(1, f"{base}/b.safetensors")
    assert sorted(cache.glob("sha256-*")) == [other.path]  # 1.2 MB > 1 MiB: the older file went
    assert len(list(cache.glob("url-*.ref"))) == 1  # and the URLs that led to it
    assert not list(cache.glob(".staging-*"))


def test_loaded_adapters_are_bounded_by_bytes(tmp_path: Path) -> None:
    from flux_mcp.backends.loras import AdapterCache, LoraFile
    from flux_mcp.backends.tiny import build_tiny_pipeline, make_lora_state_dict, save_lora

    pipe = build_tiny_pipeline()
    files = []
    for seed in range(3):
        path = save_lora(
            tmp_path / f"l{seed}.safetensors", make_lora_state_dict(pipe.transformer, "bfl", seed=seed)
        )
        files.append(LoraFile(path, str(seed) * 64, path.name, f"loras.{seed}.path", path.stat().st_size))
    two = files[0].size + files[1].size
    adapters = AdapterCache(capacity=8, max_bytes=two)
    for lora in files:
        adapters.activate(pipe, [(lora, 1.0)], lambda message: None)
    loaded = pipe.get_list_adapters()["transformer"]
    assert sorted(loaded) == sorted([files[1].adapter_name, files[2].adapter_name])  # the oldest went


# -- stdio -------------------------------------------------------------------------------------------


def test_lines_that_are_not_json_rpc_get_an_error_answer(tmp_path: Path) -> None:
    lines = [
        json.dumps(INIT),
        json.dumps({"jsonrpc": "2.0", "method": "notifications/initialized"}),
        '{"jsonrpc":"2.0","id":2,"method":"ping","params":' + "[" * 100_000 + "]" * 100_000 + "}",
        '{"not": "json-rpc"}',
        json.dumps({"jsonrpc": "2.0", "id": 3, "method": "ping"}),
    ]
    env = clean_env(
        FLUX_MCP_OUTPUT_DIR=str(tmp_path / "out"), FLUX_MCP_PRESETS=str(tmp_path / "presets.toml")
    )
    proc = subprocess.Popen(
        [sys.executable, "-m", "flux_mcp"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        env=env,
        cwd=REPO,
        text=True,
    )
    guard = threading.Timer(120, proc.kill)  # only against a hang: the loop below waits for answers
    guard.start()
    answers: list[dict[str, Any]] = []
    try:
        assert proc.stdin is not None and proc.stdout is not None
        proc.stdin.write("\n".join(lines) + "\n")
        proc.stdin.flush()
        while not answers or answers[-1].get("id") != 3:
            line = proc.stdout.readline()
            if not line:
                break
            answers.append(json.loads(line))
    finally:
        guard.cancel()
        if proc.stdin is not None:
            proc.stdin.close()
        proc.wait(30)
    errors = [a["error"]["code"] for a in answers if "error" in a]
    assert errors == [-32700, -32600]
    assert [a.get("id") for a in answers] == [1, None, None, 3]  # and it kept serving

"""Shared fixtures: anyio backend, an isolated environment, test images, and a flux-mcp server
subprocess driven by the real ``mcp`` client over stdio.

Every test runs with FLUX_MCP_* and FAL_* variables removed from the environment and the user
directories pointed at a temp dir, so nothing reads or writes the developer's real settings.
"""

from __future__ import annotations

import base64
import contextlib
import io
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Iterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, ClassVar

import httpx
import pytest
from mcp import Client, StdioServerParameters
from mcp.client.extension import ClientExtension
from mcp.client.stdio import stdio_client as stdio_client_transport
from PIL import Image

REPO = Path(__file__).resolve().parent.parent
#: tests/hosts runs in its own venv (.venv-hosts), started by tests/test_hosts.py.
collect_ignore = ["hosts"]


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture(autouse=True)
def isolated_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """No real settings leak in: clear our variables, point user dirs at tmp_path."""
    for name in list(os.environ):
        if name.startswith(("FLUX_MCP_", "FAL_")):
            monkeypatch.delenv(name, raising=False)
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("XDG_DATA_HOME", str(home / ".local/share"))
    monkeypatch.setenv("XDG_CONFIG_HOME", str(home / ".config"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(home / ".cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return home


def make_png(width: int = 64, height: int = 48, color: tuple[int, int, int] = (200, 80, 40)) -> bytes:
    """A small PNG with a gradient, so resizes and tints are visible."""
    img = Image.new("RGB", (width, height), color)
    for x in range(width):
        for y in range(0, height, 4):
            img.putpixel((x, y), (x * 255 // max(width - 1, 1), y * 255 // max(height - 1, 1), 128))
    out = io.BytesIO()
    img.save(out, format="PNG")
    return out.getvalue()


def data_uri(data: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode()}"


@pytest.fixture
def input_png(tmp_path: Path) -> Path:
    """A PNG inside an allowed input root (the tests' input folder)."""
    folder = tmp_path / "inputs"
    folder.mkdir(exist_ok=True)
    path = folder / "photo.png"
    path.write_bytes(make_png())
    return path


def clean_env(**extra: str) -> dict[str, str]:
    """This process's environment without any FLUX_MCP_* or FAL_* variable, plus ``extra``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("FLUX_MCP_", "FAL_"))}
    env.update(extra)
    return env


def run_cli(
    *args: str, env: dict[str, str] | None = None, timeout: float = 120
) -> subprocess.CompletedProcess[str]:
    """``python -m flux_mcp ARGS`` as a person would run it; stdout and stderr captured as text."""
    return subprocess.run(
        [sys.executable, "-m", "flux_mcp", *args],
        env=env,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def server_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    """Environment for a flux-mcp server subprocess: isolated dirs, inputs allowed from tmp_path/inputs."""
    env = clean_env()
    env.update(
        FLUX_MCP_OUTPUT_DIR=str(tmp_path / "out"),
        FLUX_MCP_INPUT_ROOTS=str(tmp_path / "inputs"),
        FLUX_MCP_PRESETS=str(tmp_path / "presets.toml"),
        PYTHONUNBUFFERED="1",
    )
    env.update(extra)
    return env


@asynccontextmanager
async def stdio_client(
    env: dict[str, str], *args: str, stderr: Path | None = None, extensions: Sequence[ClientExtension] = ()
) -> AsyncIterator[Client]:
    """A real MCP client talking to ``python -m flux_mcp`` over stdio in a subprocess.

    The server's stderr (its log) goes to ``stderr`` when given, so tests can read it; ``extensions``
    are the client extensions it declares (e.g. MCP Apps).
    """
    params = StdioServerParameters(
        command=sys.executable, args=["-m", "flux_mcp", *args], env=env, cwd=str(REPO)
    )
    with open(stderr or os.devnull, "a") as errlog:
        async with Client(
            stdio_client_transport(params, errlog=errlog), extensions=list(extensions)
        ) as client:
            yield client


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass(frozen=True)
class HttpServer:
    url: str
    port: int
    proc: subprocess.Popen[bytes]


@contextlib.contextmanager
def http_server(env: dict[str, str], log: Path | None = None, verbose: bool = False) -> Iterator[HttpServer]:
    """``flux-mcp serve --http`` on 127.0.0.1 in a subprocess, listening before this yields; stopped after."""
    port = free_port()
    command = [
        sys.executable,
        "-m",
        "flux_mcp",
        *(["--verbose"] if verbose else []),
        "serve",
        "--http",
        "--port",
        str(port),
    ]
    with open(log or os.devnull, "ab") as errors:
        proc = subprocess.Popen(command, env=env, cwd=REPO, stdout=subprocess.DEVNULL, stderr=errors)
        try:
            url = f"http://127.0.0.1:{port}/mcp"
            deadline = time.monotonic() + 30
            while True:
                assert proc.poll() is None, f"the server exited with {proc.returncode} before listening"
                try:
                    httpx.get(url, timeout=0.5)
                    break
                except httpx.TransportError:
                    assert time.monotonic() < deadline, "the server did not start listening within 30 s"
                    time.sleep(0.1)
            yield HttpServer(url, port, proc)
        finally:
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)


async def edit_once(backend: Any, request: Any, inputs: list[Any], progress: Any) -> Any:
    """One request on a backend through the Backend protocol: its result, or its error raised."""
    from flux_mcp.backends import RunContext, run_one

    return await run_one(backend, request, inputs, RunContext(progress))


def text_of(result: Any) -> str:
    return "\n".join(block.text for block in result.content if getattr(block, "type", "") == "text")


# -- the local backend's tiny model (torch is imported only by the tests that use these) ------------


@pytest.fixture(scope="module")
def one_torch_thread() -> Iterator[None]:
    """The tiny model's matrices are too small to split: threads only contend (seen: 4-15x slower
    on a busy 2-core machine), so local-backend tests run torch single-threaded."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny random klein pipeline, saved once per test session like a downloaded model."""
    from flux_mcp.backends.tiny import save_tiny_model

    return save_tiny_model(tmp_path_factory.mktemp("tiny") / "model")


@pytest.fixture
def make_backend(tiny_model: Path, tmp_path: Path) -> Any:
    """``make_backend(**settings)``: a LocalBackend on the tiny model, loaded through the real code."""
    from flux_mcp.backends.local import LocalBackend
    from flux_mcp.config import Settings

    def make(**overrides: Any) -> LocalBackend:
        settings = {
            "model": str(tiny_model),
            "device": "cpu",
            "output_dir": tmp_path / "out",
            "lora_cache": tmp_path / "lora-cache",
            "input_roots": (tmp_path,),
        }
        return LocalBackend(Settings(**(settings | overrides)))

    return make


@pytest.fixture
def emulator() -> Iterator[Any]:
    from .fal_emulator import FalEmulator

    with FalEmulator() as emu:
        yield emu


class LoopbackFiles(BaseHTTPRequestHandler):
    """Serves ``files`` (path -> bytes; no Content-Length for paths in ``unsized``; HEAD answers from
    ``heads``) on loopback and records every request in ``hits`` as (method, path)."""

    files: ClassVar[dict[str, bytes]] = {}
    unsized: ClassVar[set[str]] = set()
    heads: ClassVar[dict[str, dict[str, str]]] = {}
    hits: ClassVar[list[tuple[str, str]]] = []

    def do_HEAD(self) -> None:
        self.hits.append(("HEAD", self.path))
        headers = self.heads.get(self.path.split("?")[0])
        self.send_response(200 if headers else 404)
        for name, value in (headers or {"Content-Length": "0"}).items():
            self.send_header(name, value)
        self.end_headers()

    def do_GET(self) -> None:
        self.hits.append(("GET", self.path))
        path = self.path.split("?")[0]
        body = self.files.get(path)
        if body is None:
            self.send_response(404)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        self.send_response(200)
        if path in self.unsized:
            self.close_connection = True
        else:
            self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture
def loopback_files() -> Iterator[tuple[str, type[LoopbackFiles]]]:
    """A loopback HTTP server: (base URL, handler class); fill its ``files``/``heads``, read its ``hits``."""
    handler = type("Handler", (LoopbackFiles,), {"files": {}, "unsized": set(), "heads": {}, "hits": []})
    handler.protocol_version = "HTTP/1.0"
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", handler
    finally:
        server.shutdown()
        server.server_close()
